"""vmvault's own VMSnapshot extension handler, Microsoft.RecoveryServices.VMSnapshot 1.9.

It speaks the handler protocol of docs/agent-protocol.md and writes the status documents and
error codes of Azure's extension (/work/shared/spec/vmsnapshot-wire.md), so that whatever
reads Azure's statuses reads ours. Run it as ``python -m vmvault.extensions.vmsnapshot
<install|enable|disable|update|uninstall>`` from the handler folder.

Where it does better than Azure's: a watchdog process thaws the file systems even when the
handler is killed with SIGKILL; timed-out scripts are killed; snapshot calls and blob writes
really retry, with backoff; RCU grace periods are expedited during the freeze (rcu.py), which
takes the freeze itself from tens of milliseconds to a few.
"""

PUBLISHER = "Microsoft.RecoveryServices"
TYPE = "VMSnapshot"
VERSION = "1.9"
HANDLER_NAME = f"{PUBLISHER}.{TYPE}"
