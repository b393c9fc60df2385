"""vmvault backup item: protected items (az backup item)."""

from __future__ import annotations

from typing import Any

from knack.arguments import ArgumentsContext
from knack.commands import CommandGroup
from knack.help_files import helps

from vmvault.cli.client import call, item_path, vault_path
from vmvault.cli.commands._common import backup_flags, table

helps["backup item"] = """
type: group
short-summary: Show protected items.
"""


def list_items(resource_group_name: str, vault_name: str) -> Any:
    """List the vault's protected items."""
    return call("GET", vault_path(resource_group_name, vault_name, "backupProtectedItems"))


def show_item(resource_group_name: str, vault_name: str, container_name: str, name: str) -> Any:
    """Show a protected item."""
    return call("GET", item_path(resource_group_name, vault_name, container_name, name))


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


def load_arguments(loader: Any) -> None:
    backup_flags(loader, "backup item")
    with ArgumentsContext(loader, "backup item") as ac:
        ac.argument("name", options_list=["--name", "-n"], help="Name of the item (the VM).")
