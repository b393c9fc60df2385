"""vmvault backup restore: restore disks (az backup restore)."""

from __future__ import annotations

from typing import Any

from knack.arguments import ArgumentsContext
from knack.commands import CommandGroup
from knack.help_files import helps

from vmvault.cli.client import call, item_path
from vmvault.cli.commands._common import backup_flags
from vmvault.cli.commands.backup_job import job_table

helps["backup restore"] = """
type: group
short-summary: Restore backed up VMs.
"""
helps["backup restore restore-disks"] = """
type: command
short-summary: Restore the disks of a recovery point into a storage account.
long-summary: |
    Writes each disk as a page blob into a new container of the storage account, with
    vmconfig.json describing the VM. The job's propertyBag names the container and the disks.
    The storage account must be in the vault's region (R6), Standard_LRS or Standard_GRS (R7)
    and online (R8). Source: the snapshot tier while it holds the point, else the vault
    (--restore-from Vault forces the vault copy).
examples:
  - name: Restore the disks of a recovery point.
    text: vmvault backup restore restore-disks -g MyResourceGroup -v MyVault -c MyVm -i MyVm -r 1763896512345678 --storage-account restoresa
"""


def restore_disks(resource_group_name: str, vault_name: str, container_name: str,
                  item_name: str, rp_name: str, storage_account: str,
                  target_resource_group: str | None = None, restore_from: str = "Auto") -> Any:
    """Restore the disks of a recovery point into a storage account."""
    return call("POST", item_path(resource_group_name, vault_name, container_name, item_name,
                                  "recoveryPoints", rp_name, "restore"),
                {"properties": {"objectType": "IaasVMRestoreRequest",
                                "recoveryType": "RestoreDisks",
                                "storageAccountId": storage_account,
                                "targetResourceGroupId": target_resource_group,
                                "restoreFrom": restore_from}})


def load_commands(loader: Any) -> None:
    with CommandGroup(loader, "backup restore", "vmvault.cli.commands.backup_restore#{}") as g:
        g.command("restore-disks", "restore_disks", table_transformer=job_table)


def load_arguments(loader: Any) -> None:
    backup_flags(loader, "backup restore")
    with ArgumentsContext(loader, "backup restore") as ac:
        ac.argument("rp_name", options_list=["--rp-name", "-r"],
                    help="Name of the recovery point.")
        ac.argument("storage_account", help="Storage account to restore the disks into.")
        ac.argument("target_resource_group", options_list=["--target-resource-group", "-t"],
                    help="Resource group for the restored resources.")
        ac.argument("restore_from", choices=["Auto", "Vault", "Snapshot"],
                    help="Where to read the recovery point from (vmvault).")
