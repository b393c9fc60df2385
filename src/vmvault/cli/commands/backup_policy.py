"""vmvault backup policy: backup policies (az backup policy)."""

from __future__ import annotations

from typing import Any

from knack.arguments import ArgumentsContext
from knack.commands import CommandGroup
from knack.help_files import helps

from vmvault.cli.client import call, vault_path
from vmvault.cli.commands._common import resource_group, table, vault_name

helps["backup policy"] = """
type: group
short-summary: Show backup policies.
"""


def list_policies(resource_group_name: str, vault_name: str) -> Any:
    """List the vault's policies."""
    return call("GET", vault_path(resource_group_name, vault_name, "backupPolicies"))


def show_policy(resource_group_name: str, vault_name: str, name: str) -> Any:
    """Show a policy."""
    return call("GET", vault_path(resource_group_name, vault_name, "backupPolicies", name))


def _table(rows: Any) -> Any:
    return table(rows, [("Name", "name"), ("ResourceGroup", "resourceGroup"),
                        ("Type", "properties.backupManagementType"),
                        ("Frequency", "properties.schedulePolicy.scheduleRunFrequency"),
                        ("ProtectedItems", "properties.protectedItemsCount")])


def load_commands(loader: Any) -> None:
    with CommandGroup(loader, "backup policy", "vmvault.cli.commands.backup_policy#{}") as g:
        g.command("list", "list_policies", table_transformer=_table)
        g.command("show", "show_policy", table_transformer=_table)


def load_arguments(loader: Any) -> None:
    with ArgumentsContext(loader, "backup policy") as ac:
        ac.argument("resource_group_name", resource_group)
        ac.argument("vault_name", vault_name)
        ac.argument("name", options_list=["--name", "-n"], help="Name of the policy.")
