"""vmvault backup protection: enable, stop and resume protection, back up now
(az backup protection)."""

from __future__ import annotations

from typing import Any

from knack.arguments import ArgumentsContext
from knack.commands import CommandGroup
from knack.help_files import helps
from knack.prompting import NoTTYException, prompt_y_n

from vmvault.cli.client import call as api
from vmvault.cli.client import item_path
from vmvault.cli.commands._common import backup_flags
from vmvault.cli.commands.backup_job import job_table
from vmvault.errors import invalid

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
helps["backup protection disable"] = """
type: command
short-summary: Stop protecting a VM; keep its recovery points, or delete them with --delete-backup-data true.
long-summary: |
    Kept recovery points stay restorable and do not expire while protection is stopped; no
    scheduled backup runs. Resume with 'vmvault backup protection resume'. Deleting the data
    runs a DeleteBackupData job that removes every recovery point and the protected item,
    then frees the vault's space; it asks for confirmation unless --yes is given.
examples:
  - name: Stop protection and keep the data.
    text: vmvault backup protection disable -g MyResourceGroup -v MyVault -c MyVm -i MyVm
  - name: Stop protection and delete the data, without a prompt.
    text: vmvault backup protection disable -g MyResourceGroup -v MyVault -c MyVm -i MyVm --delete-backup-data true --yes
"""
helps["backup protection resume"] = """
type: command
short-summary: Resume protection of a VM whose protection was stopped (with its data kept).
examples:
  - name: Resume with the default policy.
    text: vmvault backup protection resume -g MyResourceGroup -v MyVault -c MyVm -i MyVm --policy-name DefaultPolicy
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
                               "sourceResourceId": vm, "policyId": policy}},
               headers={"If-None-Match": "*"})


def backup_now(resource_group_name: str, vault_name: str, container_name: str, item_name: str,
               retain_until: str | None = None) -> Any:
    """Back up a protected VM now."""
    return api("POST", item_path(resource_group_name, vault_name, container_name, item_name,
                                 "backup"),
               {"properties": {"objectType": "IaasVMBackupRequest",
                               "recoveryPointExpiryTimeInUTC": retain_until}})


def disable(resource_group_name: str, vault_name: str, container_name: str, item_name: str,
            delete_backup_data: str = "false", yes: bool = False) -> Any:
    """Stop protecting a VM: keep its recovery points, or delete them."""
    if delete_backup_data.lower() not in ("true", "false"):
        raise invalid("--delete-backup-data", "give true or false")
    path = item_path(resource_group_name, vault_name, container_name, item_name)
    if delete_backup_data.lower() == "false":
        return api("PUT", path, {"properties": {"protectionState": "ProtectionStopped",
                                                "policyId": ""}})
    if not yes and not _confirm(f"Delete every recovery point of '{item_name}' in vault "
                                f"'{vault_name}'? This cannot be undone."):
        raise invalid("--yes", "not confirmed: nothing was deleted")
    return api("DELETE", path)


def _confirm(question: str) -> bool:
    try:
        return prompt_y_n(question, default="n")
    except NoTTYException:
        raise invalid("--yes", "deleting backup data needs a confirmation: run in a terminal, "
                      "or add --yes") from None


def resume(resource_group_name: str, vault_name: str, container_name: str, item_name: str,
           policy_name: str) -> Any:
    """Resume the protection of a VM whose protection was stopped."""
    return api("PUT", item_path(resource_group_name, vault_name, container_name, item_name),
               {"properties": {"policyId": f"backupPolicies/{policy_name}"}})


def load_commands(loader: Any) -> None:
    with CommandGroup(loader, "backup protection",
                      "vmvault.cli.commands.backup_protection#{}") as g:
        g.command("enable-for-vm", "enable_for_vm", table_transformer=job_table)
        g.command("backup-now", "backup_now", table_transformer=job_table)
        g.command("disable", "disable", table_transformer=job_table)
        g.command("resume", "resume", table_transformer=job_table)


def load_arguments(loader: Any) -> None:
    backup_flags(loader, "backup protection")
    with ArgumentsContext(loader, "backup protection") as ac:
        ac.argument("vm", help="Name or ID of the VM to protect.")
        ac.argument("policy_name", options_list=["--policy-name", "-p"],
                    help="Name of the backup policy.")
        ac.argument("delete_backup_data", choices=["false", "true"],
                    help="Also delete every recovery point (asks for confirmation).")
        ac.argument("yes", options_list=["--yes", "-y"], action="store_true",
                    help="Do not ask for confirmation.")
        ac.argument("retain_until", help="Keep the recovery point until this date, UTC "
                    "(dd-mm-yyyy or ISO 8601); 30 days from now by default.")
