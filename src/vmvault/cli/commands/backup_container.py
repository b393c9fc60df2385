"""vmvault backup container: protection containers (az backup container)."""

from __future__ import annotations

from typing import Any

from knack.commands import CommandGroup
from knack.help_files import helps

from vmvault.cli.client import call, vault_path
from vmvault.cli.commands._common import backup_flags, table

helps["backup container"] = """
type: group
short-summary: Show the containers (one per protected VM).
"""


def list_containers(resource_group_name: str, vault_name: str,
                    backup_management_type: str = "AzureIaasVM") -> Any:
    """List the vault's containers."""
    return call("GET", vault_path(resource_group_name, vault_name, "backupProtectionContainers"))


def _table(rows: Any) -> Any:
    return table(rows, [("Name", "name"), ("FriendlyName", "properties.friendlyName"),
                        ("ResourceGroup", "resourceGroup"),
                        ("Status", "properties.registrationStatus")])


def load_commands(loader: Any) -> None:
    with CommandGroup(loader, "backup container",
                      "vmvault.cli.commands.backup_container#{}") as g:
        g.command("list", "list_containers", table_transformer=_table)


def load_arguments(loader: Any) -> None:
    backup_flags(loader, "backup container")
