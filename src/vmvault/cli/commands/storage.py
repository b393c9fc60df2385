"""vmvault storage account: storage accounts held by the local disk store (az storage account)."""

from __future__ import annotations

from typing import Any

from knack.arguments import ArgumentsContext
from knack.commands import CommandGroup
from knack.help_files import helps

from vmvault.cli.client import SUB, call, provider_path
from vmvault.cli.commands._common import resource_group, table

helps["storage"] = """
type: group
short-summary: Manage storage accounts.
"""
helps["storage account"] = """
type: group
short-summary: Manage storage accounts (page blobs for VM disks, served over Blob REST).
"""
helps["storage account create"] = """
type: command
short-summary: Create a storage account.
examples:
  - name: Create a locally redundant account.
    text: vmvault storage account create -g MyResourceGroup -n mystorageacct -l eastus --sku Standard_LRS
"""
helps["storage account update"] = """
type: command
short-summary: Change a storage account's capacity, or take it offline (vmvault's lab knobs).
"""

SKUS = ["Standard_LRS", "Standard_GRS", "Standard_ZRS", "Premium_LRS"]


def _path(group: str, name: str) -> str:
    return provider_path(group, "Microsoft.Storage", "storageAccounts", name)


def create_account(resource_group_name: str, name: str, location: str | None = None,
                   sku: str = "Standard_LRS", capacity_gb: int = 1024) -> Any:
    """Create a storage account."""
    return call("PUT", _path(resource_group_name, name),
                {"location": location, "sku": {"name": sku},
                 "properties": {"capacityGb": capacity_gb}})


def show_account(resource_group_name: str, name: str) -> Any:
    """Show a storage account."""
    return call("GET", _path(resource_group_name, name))


def list_accounts(resource_group_name: str | None = None) -> Any:
    """List storage accounts."""
    if resource_group_name:
        return call("GET", provider_path(resource_group_name, "Microsoft.Storage",
                                         "storageAccounts"))
    return call("GET", f"{SUB}/providers/Microsoft.Storage/storageAccounts")


def update_account(resource_group_name: str, name: str, capacity_gb: int | None = None,
                   status: str | None = None) -> Any:
    """Change a storage account's capacity or availability."""
    return call("PATCH", _path(resource_group_name, name),
                {"properties": {"capacityGb": capacity_gb, "statusOfPrimary": status}})


def keys_list(resource_group_name: str, account_name: str) -> Any:
    """List the account's access keys."""
    return call("POST", _path(resource_group_name, account_name) + "/listKeys")["keys"]


def delete_account(resource_group_name: str, name: str, yes: bool = False) -> None:
    """Delete a storage account."""
    call("DELETE", _path(resource_group_name, name))


def _table(rows: Any) -> Any:
    return table(rows, [("Name", "name"), ("ResourceGroup", "resourceGroup"),
                        ("Location", "location"), ("Sku", "sku.name"),
                        ("Status", "statusOfPrimary"), ("CapacityBytes", "capacityBytes"),
                        ("UsedBytes", "usedBytes")])


def load_commands(loader: Any) -> None:
    with CommandGroup(loader, "storage account", "vmvault.cli.commands.storage#{}") as g:
        g.command("create", "create_account", table_transformer=_table)
        g.command("show", "show_account", table_transformer=_table)
        g.command("list", "list_accounts", table_transformer=_table)
        g.command("update", "update_account", table_transformer=_table)
        g.command("delete", "delete_account", confirmation=True)
    with CommandGroup(loader, "storage account keys", "vmvault.cli.commands.storage#{}") as g:
        g.command("list", "keys_list")


def load_arguments(loader: Any) -> None:
    with ArgumentsContext(loader, "storage account") as ac:
        ac.argument("resource_group_name", resource_group)
        ac.argument("name", options_list=["--name", "-n"], help="Name of the storage account.")
        ac.argument("account_name", options_list=["--account-name", "-n"],
                    help="Name of the storage account.")
        ac.argument("location", options_list=["--location", "-l"],
                    help="Location; the resource group's when omitted.")
        ac.argument("sku", choices=SKUS, help="The storage account SKU.")
        ac.argument("capacity_gb", type=int, help="Capacity in GiB (vmvault).")
        ac.argument("status", choices=["available", "unavailable"],
                    help="Take the account offline (unavailable) or back online (vmvault).")
        ac.argument("yes", options_list=["--yes", "-y"], action="store_true",
                    help="Do not prompt for confirmation.")
