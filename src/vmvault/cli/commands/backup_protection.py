"""vmvault backup protection: enable protection, back up now (az backup protection)."""

from __future__ import annotations

from typing import Any

from knack.arguments import ArgumentsContext
from knack.commands import CommandGroup
from knack.help_files import helps

from vmvault.cli.client import call as api
from vmvault.cli.client import item_path
from vmvault.cli.commands._common import backup_flags
from vmvault.cli.commands.backup_job import job_table

helps["backup protection"] = """
type: group
short-summary: Protect VMs and back them up on demand.
"""
helps["backup protection enable-for-vm"] = """
type: command
short-summary: Start protecting a VM with a policy.
examples:
  - name: Protect a VM with the default policy.
    text: vmvault backup protection enable-for-vm -g MyResourceGroup -v MyVault --vm MyVm --policy-name DefaultPolicy
"""
helps["backup protection backup-now"] = """
type: command
short-summary: Back up a protected VM now; returns the Backup job (follow it with 'backup job wait').
examples:
  - name: Back up now and keep the recovery point until the end of 2027.
    text: vmvault backup protection backup-now -g MyResourceGroup -v MyVault -c MyVm -i MyVm --retain-until 31-12-2027
"""


def enable_for_vm(resource_group_name: str, vault_name: str, vm: str,
                  policy_name: str = "DefaultPolicy") -> Any:
    """Start protecting a VM."""
    name = vm.rstrip("/").split("/")[-1]
    policy = f"backupPolicies/{policy_name}"
    return api("PUT", item_path(resource_group_name, vault_name, name, name),
               {"properties": {"protectedItemType": "Microsoft.Compute/virtualMachines",
                               "sourceResourceId": vm, "policyId": policy}})


def backup_now(resource_group_name: str, vault_name: str, container_name: str, item_name: str,
               retain_until: str | None = None) -> Any:
    """Back up a protected VM now."""
    return api("POST", item_path(resource_group_name, vault_name, container_name, item_name,
                                 "backup"),
               {"properties": {"objectType": "IaasVMBackupRequest",
                               "recoveryPointExpiryTimeInUTC": retain_until}})


def load_commands(loader: Any) -> None:
    with CommandGroup(loader, "backup protection",
                      "vmvault.cli.commands.backup_protection#{}") as g:
        g.command("enable-for-vm", "enable_for_vm", table_transformer=job_table)
        g.command("backup-now", "backup_now", table_transformer=job_table)


def load_arguments(loader: Any) -> None:
    backup_flags(loader, "backup protection")
    with ArgumentsContext(loader, "backup protection") as ac:
        ac.argument("vm", help="Name or ID of the VM to protect.")
        ac.argument("policy_name", options_list=["--policy-name", "-p"],
                    help="Name of the backup policy.")
        ac.argument("retain_until", help="Keep the recovery point until this date, UTC "
                    "(dd-mm-yyyy or ISO 8601); 30 days from now by default.")
