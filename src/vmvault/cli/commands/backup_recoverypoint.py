"""vmvault backup recoverypoint: recovery points (az backup recoverypoint)."""

from __future__ import annotations

from typing import Any

from knack.arguments import ArgumentsContext
from knack.commands import CommandGroup
from knack.help_files import helps

from vmvault.cli.client import call, item_path
from vmvault.cli.commands._common import backup_flags, table

helps["backup recoverypoint"] = """
type: group
short-summary: Show the recovery points of a protected VM.
"""


def list_rps(resource_group_name: str, vault_name: str, container_name: str, item_name: str,
             start_date: str | None = None, end_date: str | None = None) -> Any:
    """List recovery points, newest first."""
    return call("GET", item_path(resource_group_name, vault_name, container_name, item_name,
                                 "recoveryPoints"),
                params={"startDate": start_date, "endDate": end_date})


def show_rp(resource_group_name: str, vault_name: str, container_name: str, item_name: str,
            name: str) -> Any:
    """Show a recovery point."""
    return call("GET", item_path(resource_group_name, vault_name, container_name, item_name,
                                 "recoveryPoints", name))


def _table(rows: Any) -> Any:
    return table(rows, [("Name", "name"), ("Time", "properties.recoveryPointTime"),
                        ("Consistency", "properties.recoveryPointType"),
                        ("Tier", "properties.tier"), ("Expiry", "properties.expiryTime"),
                        ("Kept by", "properties.retainedBy")])


def load_commands(loader: Any) -> None:
    with CommandGroup(loader, "backup recoverypoint",
                      "vmvault.cli.commands.backup_recoverypoint#{}") as g:
        g.command("list", "list_rps", table_transformer=_table)
        g.command("show", "show_rp", table_transformer=_table)


def load_arguments(loader: Any) -> None:
    backup_flags(loader, "backup recoverypoint")
    with ArgumentsContext(loader, "backup recoverypoint") as ac:
        ac.argument("name", options_list=["--name", "-n"], help="Name of the recovery point.")
        ac.argument("start_date", help="Recovery points from this date (dd-mm-yyyy, UTC).")
        ac.argument("end_date", help="Recovery points up to this date (dd-mm-yyyy, UTC).")
