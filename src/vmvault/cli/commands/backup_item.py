"""vmvault backup item: protected items (az backup item)."""

from __future__ import annotations

from typing import Any

from knack.arguments import ArgumentsContext
from knack.commands import CommandGroup
from knack.help_files import helps

from vmvault.cli.client import call, item_path, vault_path
from vmvault.cli.commands._common import backup_flags, table
from vmvault.cli.commands.backup_job import job_table

helps["backup item"] = """
type: group
short-summary: Show protected items and change their policy.
"""
helps["backup item set-policy"] = """
type: command
short-summary: Protect an item with another policy; its scheduled recovery points take the new retention.
examples:
  - name: Move a VM to the policy Weekly.
    text: vmvault backup item set-policy -g MyResourceGroup -v MyVault -c MyVm -n MyVm --policy-name Weekly
"""


def list_items(resource_group_name: str, vault_name: str) -> Any:
    """List the vault's protected items."""
    return call("GET", vault_path(resource_group_name, vault_name, "backupProtectedItems"))


def show_item(resource_group_name: str, vault_name: str, container_name: str, name: str) -> Any:
    """Show a protected item."""
    return call("GET", item_path(resource_group_name, vault_name, container_name, name))


def set_policy(resource_group_name: str, vault_name: str, container_name: str, name: str,
               policy_name: str) -> Any:
    """Move a protected item to another policy (its scheduled points take the new retention)."""
    return call("PUT", item_path(resource_group_name, vault_name, container_name, name),
                {"properties": {"policyId": f"backupPolicies/{policy_name}"}})


def _table(rows: Any) -> Any:
    return table(rows, [("Name", "properties.friendlyName"),
                        ("ContainerName", "properties.containerName"),
                        ("ResourceGroup", "resourceGroup"),
                        ("ProtectionState", "properties.protectionState"),
                        ("LastBackupStatus", "properties.lastBackupStatus"),
                        ("LastRecoveryPoint", "properties.lastRecoveryPoint"),
                        ("Policy", "properties.policyName")])


def load_commands(loader: Any) -> None:
    with CommandGroup(loader, "backup item", "vmvault.cli.commands.backup_item#{}") as g:
        g.command("list", "list_items", table_transformer=_table)
        g.command("show", "show_item", table_transformer=_table)
        g.command("set-policy", "set_policy", table_transformer=job_table)


def load_arguments(loader: Any) -> None:
    backup_flags(loader, "backup item")
    with ArgumentsContext(loader, "backup item") as ac:
        ac.argument("name", options_list=["--name", "-n"], help="Name of the item (the VM).")
        ac.argument("policy_name", options_list=["--policy-name", "-p"],
                    help="Name of the backup policy.")
