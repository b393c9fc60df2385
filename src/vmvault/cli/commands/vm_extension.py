"""vmvault vm extension and vmvault vm agent: VM extensions (az vm extension) and the lab's
VM agent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from knack.arguments import ArgumentsContext
from knack.commands import CommandGroup
from knack.help_files import helps

from vmvault.cli.client import call, provider_path
from vmvault.cli.commands._common import resource_group, table
from vmvault.errors import invalid

helps["vm extension"] = """
type: group
short-summary: Manage the extensions of a VM (the VM agent runs them).
long-summary: |
    Backup installs Microsoft.RecoveryServices VMSnapshot 1.9 on a VM's first backup; you can
    also deploy it by hand, with 'vm extension set' or an ARM template
    ('vmvault deployment group create'). The extension's execution output is logged in the
    guest at /var/log/waagent.log (for a lab VM: $VMVAULT_HOME/vms/<rg>/<vm>/guest/var/log/).
"""
helps["vm extension list"] = """
type: command
short-summary: List the extensions of a VM.
examples:
  - name: See the deployment state of the VM's extensions.
    text: vmvault vm extension list --resource-group myResourceGroup --vm-name myVM -o table
"""
helps["vm extension set"] = """
type: command
short-summary: Set (install or update) an extension on a VM.
long-summary: |
    --settings and --protected-settings take JSON text or the path of a JSON file. Protected
    settings are encrypted to the VM's certificate; only the guest can read them.
examples:
  - name: Run a VMSnapshot command by hand.
    text: vmvault vm extension set -g myResourceGroup --vm-name myVM -n VMSnapshot --publisher Microsoft.RecoveryServices --version 1.9 --settings settings.json --protected-settings protected.json
"""
helps["vm agent"] = """
type: group
short-summary: Manage a lab VM's agent (vmvault-agent); a real VM's agent is managed inside it.
"""


def _path(group: str, vm: str, *parts: str) -> str:
    return provider_path(group, "Microsoft.Compute", "virtualMachines", vm, *parts)


def _json_arg(value: str | None, flag: str) -> Any:
    if value is None:
        return None
    text = value
    if not value.lstrip().startswith(("{", "[")):
        path = Path(value.lstrip("@")).expanduser()
        if not path.is_file():
            raise invalid(flag, f"'{value}' is neither JSON nor the path of a JSON file")
        text = path.read_text()
    try:
        return json.loads(text)
    except ValueError as exc:
        raise invalid(flag, f"not valid JSON: {exc}") from exc


def list_extensions(resource_group_name: str, vm_name: str) -> Any:
    """List the extensions of a VM."""
    return call("GET", _path(resource_group_name, vm_name, "extensions"))


def show_extension(resource_group_name: str, vm_name: str, name: str) -> Any:
    """Show one extension of a VM, with its instance view."""
    return call("GET", _path(resource_group_name, vm_name, "extensions", name))


def set_extension(resource_group_name: str, vm_name: str, name: str, publisher: str,
                  version: str | None = None, settings: str | None = None,
                  protected_settings: str | None = None, no_auto_upgrade: bool = False,
                  extension_type: str | None = None) -> Any:
    """Set an extension on a VM."""
    return call("PUT", _path(resource_group_name, vm_name, "extensions", name), {
        "properties": {"publisher": publisher, "type": extension_type or name,
                       "typeHandlerVersion": version,
                       "autoUpgradeMinorVersion": not no_auto_upgrade,
                       "settings": _json_arg(settings, "--settings"),
                       "protectedSettings": _json_arg(protected_settings,
                                                      "--protected-settings")}})


def delete_extension(resource_group_name: str, vm_name: str, name: str) -> None:
    """Remove an extension from a VM."""
    call("DELETE", _path(resource_group_name, vm_name, "extensions", name))


def _agent(action: str) -> Any:
    def run(resource_group_name: str, vm_name: str) -> Any:
        return call("POST", _path(resource_group_name, vm_name, "vmAgent", action))

    run.__doc__ = {"show": "Show the lab VM's agent: version, heartbeat, handlers.",
                   "start": "Start the lab VM's agent.",
                   "stop": "Stop the lab VM's agent (SIGTERM, then SIGKILL after a bound).",
                   "restart": "Restart the lab VM's agent.",
                   "install": "Install the VM agent into a lab VM that has none.",
                   "uninstall": "Remove the VM agent from a lab VM."}[action]
    return run


show_agent, start_agent, stop_agent = _agent("show"), _agent("start"), _agent("stop")
restart_agent, install_agent, uninstall_agent = (_agent("restart"), _agent("install"),
                                                 _agent("uninstall"))


def set_agent(resource_group_name: str, vm_name: str, proxy: str) -> Any:
    """Set the lab VM's agent configuration: its HTTP proxy (restarts a running agent)."""
    return call("PATCH", _path(resource_group_name, vm_name, "vmAgent"), {"httpProxy": proxy})


def _ext_table(rows: Any) -> Any:
    return table(rows, [("Name", "name"), ("ProvisioningState", "provisioningState"),
                        ("Publisher", "publisher"), ("Version", "typeHandlerVersion"),
                        ("AutoUpgradeMinorVersion", "autoUpgradeMinorVersion")])


def _agent_table(row: Any) -> Any:
    return table(row, [("Version", "vmAgentVersion"), ("Status", "statuses.0.displayStatus"),
                       ("LastHeartbeat", "lastHeartbeat"), ("Pid", "pid"),
                       ("Message", "statuses.0.message")])


def load_commands(loader: Any) -> None:
    with CommandGroup(loader, "vm extension", "vmvault.cli.commands.vm_extension#{}") as g:
        g.command("list", "list_extensions", table_transformer=_ext_table)
        g.command("show", "show_extension", table_transformer=_ext_table)
        g.command("set", "set_extension", table_transformer=_ext_table)
        g.command("delete", "delete_extension")
    with CommandGroup(loader, "vm agent", "vmvault.cli.commands.vm_extension#{}") as g:
        for action in ("show", "start", "stop", "restart", "install", "uninstall"):
            g.command(action, f"{action}_agent", table_transformer=_agent_table)
        g.command("set", "set_agent", table_transformer=_agent_table)


def load_arguments(loader: Any) -> None:
    for scope in ("vm extension", "vm agent"):
        with ArgumentsContext(loader, scope) as ac:
            ac.argument("resource_group_name", resource_group)
            ac.argument("vm_name", options_list=["--vm-name"], help="Name of the VM.")
    with ArgumentsContext(loader, "vm agent set") as ac:
        ac.argument("proxy", options_list=["--proxy"],
                    help='The agent\'s HTTP proxy, http://HOST:PORT (WALinuxAgent\'s '
                         'HttpProxy.Host and HttpProxy.Port); "" removes it.')
    with ArgumentsContext(loader, "vm extension") as ac:
        ac.argument("name", options_list=["--name", "-n"], help="Name of the extension.")
        ac.argument("publisher", help="The extension's publisher, e.g. "
                                      "Microsoft.RecoveryServices.")
        ac.argument("version", help="The handler version (typeHandlerVersion), e.g. 1.9.")
        ac.argument("settings", help="Public settings: JSON text or a JSON file.")
        ac.argument("protected_settings", help="Protected settings: JSON text or a JSON file.")
        ac.argument("no_auto_upgrade", action="store_true",
                    help="Do not upgrade to a newer minor version automatically.")
        ac.argument("extension_type", options_list=["--extension-type"],
                    help="The handler's type, when it differs from --name.")
