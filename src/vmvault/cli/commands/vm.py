"""vmvault vm: lab virtual machines (az vm)."""

from __future__ import annotations

import sys
from typing import Any

from knack.arguments import ArgumentsContext
from knack.commands import CommandGroup
from knack.help_files import helps

from vmvault.cli.client import SUB, call, provider_path
from vmvault.cli.commands._common import resource_group, table

helps["vm"] = """
type: group
short-summary: Manage lab virtual machines.
long-summary: |
    A lab VM's disks are page blobs in a storage account. As root, vmvault puts a file system on
    each disk, attaches it to a loop device and mounts it under $VMVAULT_HOME/vms/<rg>/<vm>/
    while the VM runs. Without root the disks stay unmounted and backups are crash-consistent.
"""
helps["vm create"] = """
type: command
short-summary: Create a lab VM with an OS disk and data disks.
examples:
  - name: A VM with a 4 GiB OS disk and two data disks.
    text: vmvault vm create -g MyResourceGroup -n MyVm --storage-account mystorageacct --os-disk-size-gb 4 --data-disk-sizes-gb 1 2
"""


def _path(group: str, name: str, *parts: str) -> str:
    return provider_path(group, "Microsoft.Compute", "virtualMachines", name, *parts)


def create_vm(resource_group_name: str, name: str, storage_account: str,
              os_disk_size_gb: int = 4, data_disk_sizes_gb: list[int] | None = None,
              os_disk_fs_type: str = "ext4", data_disk_fs_types: list[str] | None = None,
              location: str | None = None, size: str = "Standard_B2s",
              enable_agent: str = "true") -> Any:
    """Create a lab VM (with its VM agent running, unless --enable-agent false)."""
    vm = call("PUT", _path(resource_group_name, name), {
        "location": location,
        "properties": {"storageAccount": storage_account, "osDiskSizeGb": os_disk_size_gb,
                       "dataDiskSizesGb": data_disk_sizes_gb or [],
                       "osDiskFsType": os_disk_fs_type,
                       "dataDiskFsTypes": data_disk_fs_types or [], "vmSize": size,
                       "provisionVMAgent": enable_agent.lower() == "true"},
    })
    if not vm.get("disksMounted"):
        print("WARNING: not running as root: the VM's disks are not mounted; write to them "
              "through the Blob endpoint. Backups of this VM are crash-consistent.",
              file=sys.stderr)
    return vm


def show_vm(resource_group_name: str, name: str) -> Any:
    """Show a VM."""
    return call("GET", _path(resource_group_name, name))


def list_vms(resource_group_name: str | None = None) -> Any:
    """List VMs."""
    if resource_group_name:
        return call("GET", provider_path(resource_group_name, "Microsoft.Compute",
                                         "virtualMachines"))
    return call("GET", f"{SUB}/providers/Microsoft.Compute/virtualMachines")


def start_vm(resource_group_name: str, name: str) -> Any:
    """Start a VM (mount its disks)."""
    return call("POST", _path(resource_group_name, name, "start"))


def stop_vm(resource_group_name: str, name: str, no_wait: bool = False) -> Any:
    """Power off a VM (its agent stops, its disks are unmounted); it stays allocated."""
    return call("POST", _path(resource_group_name, name, "powerOff"),
                params={"noWait": "true" if no_wait else None})


def deallocate_vm(resource_group_name: str, name: str, no_wait: bool = False) -> Any:
    """Stop and deallocate a VM."""
    return call("POST", _path(resource_group_name, name, "deallocate"),
                params={"noWait": "true" if no_wait else None})


def get_instance_view(resource_group_name: str, name: str) -> Any:
    """The VM's instance view: its VM agent, extensions and states."""
    return call("GET", _path(resource_group_name, name, "instanceView"))


def delete_vm(resource_group_name: str, name: str, yes: bool = False) -> None:
    """Delete a VM; disks with snapshots are kept for them."""
    call("DELETE", _path(resource_group_name, name))


def _table(rows: Any) -> Any:
    return table(rows, [("Name", "name"), ("ResourceGroup", "resourceGroup"),
                        ("Location", "location"), ("PowerState", "powerState"),
                        ("ProvisioningState", "provisioningState")])


def load_commands(loader: Any) -> None:
    with CommandGroup(loader, "vm", "vmvault.cli.commands.vm#{}") as g:
        g.command("create", "create_vm", table_transformer=_table)
        g.command("show", "show_vm", table_transformer=_table)
        g.command("list", "list_vms", table_transformer=_table)
        g.command("start", "start_vm", table_transformer=_table)
        g.command("stop", "stop_vm", table_transformer=_table)
        g.command("deallocate", "deallocate_vm", table_transformer=_table)
        g.command("delete", "delete_vm", confirmation=True)
        g.command("get-instance-view", "get_instance_view")


def load_arguments(loader: Any) -> None:
    with ArgumentsContext(loader, "vm") as ac:
        ac.argument("resource_group_name", resource_group)
        ac.argument("name", options_list=["--name", "-n"], help="Name of the VM.")
        ac.argument("storage_account", help="Storage account that holds the VM's disks.")
        ac.argument("os_disk_size_gb", type=int, help="OS disk size in GiB.")
        ac.argument("data_disk_sizes_gb", nargs="+", type=int,
                    help="Sizes in GiB of the data disks, one per disk.")
        ac.argument("os_disk_fs_type", choices=["ext4", "xfs"],
                    help="File system of the OS disk.")
        ac.argument("data_disk_fs_types", nargs="+",
                    help="File systems of the data disks (ext4 or xfs), in order; xfs by default "
                         "(ext4 for disks under 300 MiB).")
        ac.argument("location", options_list=["--location", "-l"],
                    help="Location; the resource group's when omitted.")
        ac.argument("size", help="The VM size name (recorded only).")
        ac.argument("enable_agent", arg_type=None, choices=["true", "false"],
                    help="Install the VM agent (vmvault-agent); without it backups fail "
                         "(UserErrorGuestAgentNotInstalled).")
        ac.argument("no_wait", action="store_true",
                    help="Do not wait for the operation to finish.")
        ac.argument("yes", options_list=["--yes", "-y"], action="store_true",
                    help="Do not prompt for confirmation.")
