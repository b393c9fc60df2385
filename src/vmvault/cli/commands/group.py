"""vmvault group: resource groups (az group)."""

from __future__ import annotations

from typing import Any

from knack.arguments import ArgumentsContext
from knack.commands import CommandGroup
from knack.help_files import helps

from vmvault.cli.client import SUB, call, rg_path
from vmvault.cli.commands._common import table

helps["group"] = """
type: group
short-summary: Manage resource groups.
"""
helps["group create"] = """
type: command
short-summary: Create a resource group.
examples:
  - name: Create a resource group in eastus.
    text: vmvault group create -n MyResourceGroup -l eastus
"""


def create_group(name: str, location: str) -> Any:
    """Create a resource group."""
    return call("PUT", rg_path(name), {"location": location})


def show_group(name: str) -> Any:
    """Show a resource group."""
    return call("GET", rg_path(name))


def list_groups() -> Any:
    """List resource groups."""
    return call("GET", f"{SUB}/resourceGroups")


def delete_group(name: str, yes: bool = False) -> None:
    """Delete an empty resource group."""
    call("DELETE", rg_path(name))


def _table(rows: Any) -> Any:
    return table(rows, [("Name", "name"), ("Location", "location"),
                        ("Status", "properties.provisioningState")])


def load_commands(loader: Any) -> None:
    with CommandGroup(loader, "group", "vmvault.cli.commands.group#{}") as g:
        g.command("create", "create_group", table_transformer=_table)
        g.command("show", "show_group", table_transformer=_table)
        g.command("list", "list_groups", table_transformer=_table)
        g.command("delete", "delete_group", confirmation=True)


def load_arguments(loader: Any) -> None:
    with ArgumentsContext(loader, "group") as ac:
        ac.argument("name", options_list=["--name", "-n", "--resource-group", "-g"],
                    help="Name of the resource group.")
        ac.argument("location", options_list=["--location", "-l"],
                    help="Location, e.g. eastus.")
        ac.argument("yes", options_list=["--yes", "-y"], action="store_true",
                    help="Do not prompt for confirmation.")
