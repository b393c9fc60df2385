"""vmvault backup vault: Recovery Services vaults (az backup vault)."""

from __future__ import annotations

import os
from typing import Any

from knack.arguments import ArgumentsContext
from knack.commands import CommandGroup
from knack.help_files import helps

from vmvault.cli.client import SUB, call, provider_path, vault_path
from vmvault.cli.commands._common import resource_group, table

helps["backup"] = """
type: group
short-summary: Manage backups of VMs (az backup).
"""
helps["backup vault"] = """
type: group
short-summary: Manage Recovery Services vaults.
"""
helps["backup vault create"] = """
type: command
short-summary: Create a vault; it gets DefaultPolicy (daily, 30 days, 2 days of snapshots).
long-summary: |
    The vault's master key is opened by a key file the server keeps under $VMVAULT_HOME/keys.
    With --password (or $VMVAULT_VAULT_PASSWORD) the password opens it too, so the vault can be
    read without the server's key file.
examples:
  - name: Create a vault.
    text: vmvault backup vault create -g MyResourceGroup -n MyVault -l eastus
"""
helps["backup vault check"] = """
type: command
short-summary: Verify the vault's repository (structure; every chunk with --read-data).
"""


def create_vault(resource_group_name: str, name: str, location: str | None = None,
                 password: str | None = None, chunk_size: int | None = None) -> Any:
    """Create a Recovery Services vault."""
    password = password or os.environ.get("VMVAULT_VAULT_PASSWORD")
    return call("PUT", vault_path(resource_group_name, name),
                {"location": location,
                 "properties": {"password": password, "chunkSizeBytes": chunk_size}})


def show_vault(resource_group_name: str, name: str) -> Any:
    """Show a vault."""
    return call("GET", vault_path(resource_group_name, name))


def list_vaults(resource_group_name: str | None = None) -> Any:
    """List vaults."""
    if resource_group_name:
        return call("GET", provider_path(resource_group_name, "Microsoft.RecoveryServices",
                                         "vaults"))
    return call("GET", f"{SUB}/providers/Microsoft.RecoveryServices/vaults")


def delete_vault(resource_group_name: str, name: str, yes: bool = False) -> None:
    """Delete a vault that protects nothing."""
    call("DELETE", vault_path(resource_group_name, name))


def check_vault(resource_group_name: str, name: str, read_data: bool = False,
                password: str | None = None) -> Any:
    """Verify the vault's repository."""
    return call("POST", vault_path(resource_group_name, name, "check"),
                {"readData": read_data, "password": password})


def _table(rows: Any) -> Any:
    return table(rows, [("Name", "name"), ("ResourceGroup", "resourceGroup"),
                        ("Location", "location"), ("ChunkSize", "properties.chunkSizeBytes")])


def load_commands(loader: Any) -> None:
    with CommandGroup(loader, "backup vault", "vmvault.cli.commands.backup_vault#{}") as g:
        g.command("create", "create_vault", table_transformer=_table)
        g.command("show", "show_vault", table_transformer=_table)
        g.command("list", "list_vaults", table_transformer=_table)
        g.command("delete", "delete_vault", confirmation=True)
        g.command("check", "check_vault")


def load_arguments(loader: Any) -> None:
    with ArgumentsContext(loader, "backup vault") as ac:
        ac.argument("resource_group_name", resource_group)
        ac.argument("name", options_list=["--name", "-n"], help="Name of the vault.")
        ac.argument("location", options_list=["--location", "-l"], help="Location.")
        ac.argument("password", help="A password that also opens the vault's key (vmvault).")
        ac.argument("chunk_size", type=int,
                    help="Chunk size in bytes, a power of two from 65536 to 4194304 (vmvault).")
        ac.argument("read_data", action="store_true",
                    help="Also read, decrypt and verify every chunk.")
        ac.argument("yes", options_list=["--yes", "-y"], action="store_true",
                    help="Do not prompt for confirmation.")
