"""Virtual machines (Microsoft.Compute/virtualMachines) in the lab guest runtime.

A VM's disks are page blobs in its storage account (container ``vhds``), as
unmanaged Azure disks are. Power states follow Azure: running, stopped
(powered off, still allocated) and deallocated, with the transitions starting,
stopping and deallocating in between.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmvault import arm
from vmvault.catalog import Disk, VirtualMachine
from vmvault.config import is_root
from vmvault.context import Context
from vmvault.errors import (
    RESOURCE_EXISTS,
    STORAGE_ACCOUNT_NOT_ONLINE,
    VM_NOT_IN_DESIRABLE_STATE,
    VmvaultError,
    invalid,
    not_found,
)
from vmvault.fabric import agents, groups, lab, storage_accounts

log = logging.getLogger(__name__)

DISK_CONTAINER = "vhds"
MAX_DATA_DISKS = 64
MAX_DISK_GB = 4095
TRANSITIONS = ("starting", "stopping", "deallocating")


def get(s: Session, group: str, name: str) -> VirtualMachine:
    vm = s.scalar(select(VirtualMachine).join(VirtualMachine.group)
                  .where(VirtualMachine.name == name, groups.ResourceGroup.name == group))
    if vm is None:
        groups.get(s, group)  # a missing group is named as such
        raise not_found("VM", name)
    return vm


def find(s: Session, group: str, name: str) -> VirtualMachine | None:
    try:
        return get(s, group, name)
    except VmvaultError:
        return None


def disk_uri(ctx: Context, vm: VirtualMachine, disk: Disk) -> str:
    return f"{ctx.blob_url}/{vm.storage_account.name}/{disk.container}/{disk.blob}"


def to_arm(ctx: Context, vm: VirtualMachine) -> dict[str, Any]:
    def disk_json(d: Disk) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": d.name,
            "diskSizeGb": d.size_bytes // 1024**3,
            "vhd": {"uri": disk_uri(ctx, vm, d)},
            "caching": "ReadWrite" if d.lun < 0 else "None",
            "createOption": "FromImage" if d.lun < 0 else "Empty",
            "fileSystem": d.fs_type,
            "mountPoint": d.mount_point,
        }
        if d.lun >= 0:
            out["lun"] = d.lun
        else:
            out["osType"] = "Linux"
        return out

    os_disk = next(d for d in vm.disks if d.lun < 0)
    return {
        "id": arm.resource_id(vm.group.name, "Microsoft.Compute", "virtualMachines", vm.name),
        "name": vm.name,
        "location": vm.location,
        "resourceGroup": vm.group.name,
        "type": "Microsoft.Compute/virtualMachines",
        "vmId": vm.vm_id,
        "hardwareProfile": {"vmSize": vm.size},
        "storageProfile": {
            "osDisk": disk_json(os_disk),
            "dataDisks": [disk_json(d) for d in vm.disks if d.lun >= 0],
        },
        "provisioningState": vm.provisioning_state,
        "powerState": f"VM {vm.power_state}",
        "guestRuntime": vm.runtime,
        "disksMounted": vm.mounted,
        "osProfile": {"linuxConfiguration": {"provisionVMAgent": vm.agent is not None}},
        "resources": [{"name": e.name, "publisher": e.publisher, "typeHandlerVersion": e.version,
                       "provisioningState": e.provisioning_state} for e in vm.extensions],
        "timeCreated": arm.iso(vm.created),
    }


def _check_sizes(os_disk_size_gb: int, data_disk_sizes_gb: list[int],
                 fs_types: list[str]) -> None:
    if len(data_disk_sizes_gb) > MAX_DATA_DISKS:
        raise invalid("--data-disk-sizes-gb", f"at most {MAX_DATA_DISKS} data disks")
    for flag, size in [("--os-disk-size-gb", os_disk_size_gb)] + [
        ("--data-disk-sizes-gb", s) for s in data_disk_sizes_gb
    ]:
        if not 1 <= size <= MAX_DISK_GB:
            raise invalid(flag, f"{size} is not a size in GiB from 1 to {MAX_DISK_GB}")
    for fs in fs_types:
        if fs not in lab.FS_TYPES:
            raise invalid("--data-disk-fs-types", f"'{fs}' is not one of {', '.join(lab.FS_TYPES)}")


def create(ctx: Context, group: str, name: str, storage_account: str, *,
           os_disk_size_gb: int = 4, data_disk_sizes_gb: list[int] | None = None,
           os_disk_fs_type: str = "ext4", data_disk_fs_types: list[str] | None = None,
           location: str | None = None, size: str = "Standard_B2s",
           enable_agent: bool = True) -> dict[str, Any]:
    arm.check_name("virtual machine", name)
    data_sizes = list(data_disk_sizes_gb or [])
    data_fs = list(data_disk_fs_types or [])
    if len(data_fs) > len(data_sizes):
        raise invalid("--data-disk-fs-types", "more file system types than data disks")
    data_fs += ["xfs" if gb * 1024**3 >= lab.XFS_MIN_BYTES else "ext4"
                for gb in data_sizes[len(data_fs):]]
    _check_sizes(os_disk_size_gb, data_sizes, [os_disk_fs_type, *data_fs])
    with ctx.catalog.session() as s:
        rg = groups.get(s, group)
        if find(s, group, name) is not None:
            raise VmvaultError(RESOURCE_EXISTS, kind="VM", name=name)
        account = storage_accounts.get(s, storage_account)
        if ctx.store.get_account(account.name).status != "online":
            raise VmvaultError(STORAGE_ACCOUNT_NOT_ONLINE, name=account.name)
        vm = VirtualMachine(name=name, group=rg, storage_account=account, size=size,
                            location=arm.normalize_location(location or rg.location),
                            provisioning_state="Creating", power_state="starting")
        s.add(vm)
        s.flush()
        specs = [("osdisk", -1, os_disk_size_gb, os_disk_fs_type)] + [
            (f"datadisk-{lun}", lun, gb, fs)
            for lun, (gb, fs) in enumerate(zip(data_sizes, data_fs, strict=True))
        ]
        ctx.store.create_container(account.name, DISK_CONTAINER, exist_ok=True)
        try:
            for disk_name, lun, gb, fs in specs:
                blob = f"{name}-{disk_name}-{vm.vm_id[:8]}.vhd"
                ctx.store.create_page_blob(account.name, DISK_CONTAINER, blob, gb * 1024**3)
                lab.make_filesystem(ctx.store.blob_path(account.name, DISK_CONTAINER, blob), fs,
                                    f"{name[:8]}-{disk_name[:3]}{max(lun, 0)}")
                vm.disks.append(Disk(name=disk_name, lun=lun, size_bytes=gb * 1024**3,
                                     fs_type=fs, blob=blob, container=DISK_CONTAINER))
            s.flush()
            _start_disks(ctx, vm)
            if enable_agent:
                agents.install(ctx, vm)
                agents.start(ctx, vm)
        except BaseException:
            agents.stop(ctx, vm, timeout=5)
            _stop_disks(vm)
            for d in vm.disks:
                ctx.store.delete_blob(account.name, DISK_CONTAINER, d.blob,
                                      delete_snapshots="include")
            raise
        vm.provisioning_state = "Succeeded"
        vm.power_state = "running"
        return to_arm(ctx, vm)


def _start_disks(ctx: Context, vm: VirtualMachine) -> None:
    if not is_root():
        vm.mounted = False
        return
    folder = ctx.vm_folder(vm.group.name, vm.name)
    for d in vm.disks:
        if d.loop_device and d.mount_point and lab.is_mounted(Path(d.mount_point)):
            continue
        mount_point = folder / d.name
        path = ctx.store.blob_path(vm.storage_account.name, d.container, d.blob)
        d.loop_device = lab.start_disk(path, mount_point)
        d.mount_point = str(mount_point)
    vm.mounted = True


def _stop_disks(vm: VirtualMachine) -> None:
    for d in vm.disks:
        lab.stop_disk(Path(d.mount_point) if d.mount_point else None, d.loop_device)
        d.loop_device = None
        d.mount_point = None
    vm.mounted = False


def show(ctx: Context, group: str, name: str) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        return to_arm(ctx, get(s, group, name))


def list_all(ctx: Context, group: str | None = None) -> list[dict[str, Any]]:
    with ctx.catalog.session() as s:
        query = select(VirtualMachine).order_by(VirtualMachine.name)
        if group is not None:
            query = query.where(VirtualMachine.group_id == groups.get(s, group).id)
        return [to_arm(ctx, vm) for vm in s.scalars(query)]


def _require_settled(vm: VirtualMachine) -> None:
    if vm.power_state in TRANSITIONS or vm.provisioning_state not in ("Succeeded", "Failed"):
        raise VmvaultError(VM_NOT_IN_DESIRABLE_STATE, name=vm.name,
                           state=f"VM {vm.power_state}, provisioning {vm.provisioning_state}")


def start(ctx: Context, group: str, name: str) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        vm = get(s, group, name)
        _require_settled(vm)
        if vm.power_state != "running":
            _start_disks(ctx, vm)
            vm.power_state = "running"
        agents.start(ctx, vm)
        return to_arm(ctx, vm)


def power_off(ctx: Context, group: str, name: str, deallocate: bool = False,
              no_wait: bool = False) -> dict[str, Any]:
    """Stop (or deallocate) a VM: the VM is 'stopping' while its agent shuts down (SIGTERM, then
    SIGKILL after a bound) and its disks are unmounted."""
    with ctx.catalog.session() as s:
        vm = get(s, group, name)
        _require_settled(vm)
        vm.power_state = "deallocating" if deallocate else "stopping"
        vm_pk = vm.id
        result = to_arm(ctx, vm)
    if no_wait:
        threading.Thread(target=_finish_power_off, args=(ctx, vm_pk, deallocate),
                         daemon=True).start()
        return result
    _finish_power_off(ctx, vm_pk, deallocate)
    with ctx.catalog.session() as s:
        return to_arm(ctx, s.get_one(VirtualMachine, vm_pk))


def _finish_power_off(ctx: Context, vm_pk: int, deallocate: bool) -> None:
    with ctx.catalog.session() as s:
        vm = s.get_one(VirtualMachine, vm_pk)
        final = "deallocated" if deallocate else "stopped"
        try:
            agents.stop(ctx, vm)
            _stop_disks(vm)
        except VmvaultError as exc:
            log.warning("stopping VM %s: %s", vm.name, exc)
            final = "running"
        vm.power_state = final


def stopped_by_guest(ctx: Context, vm_pk: int) -> None:
    """The guest shut itself down (its agent said so, row S2): the VM is stopped, as if
    'vm stop' had run, once the agent has gone."""
    with ctx.catalog.session() as s:
        vm = s.get_one(VirtualMachine, vm_pk)
        if vm.power_state != "running":  # a stop the service started itself
            return
        log.info("VM %s was shut down from inside the guest", vm.name)
        vm.power_state = "stopping"
    _finish_power_off(ctx, vm_pk, deallocate=False)


def delete(ctx: Context, group: str, name: str) -> None:
    with ctx.catalog.session() as s:
        vm = get(s, group, name)
        _require_settled(vm)
        agents.stop(ctx, vm)
        _stop_disks(vm)
        account = vm.storage_account.name
        for d in vm.disks:
            # A disk with snapshots still serves instant restore; its blob goes with them.
            if not ctx.store.list_snapshots(account, d.container, d.blob):
                ctx.store.delete_blob(account, d.container, d.blob)
        shutil.rmtree(agents.guest_root(ctx, vm), ignore_errors=True)
        s.delete(vm)


def detach_all(ctx: Context) -> None:
    """Unmount every lab VM's disks (the stack is going down); power states stay."""
    with ctx.catalog.session() as s:
        for vm in s.scalars(select(VirtualMachine)):
            agents.stop(ctx, vm, timeout=5)
            if vm.mounted:
                _stop_disks(vm)


def reattach_running(ctx: Context) -> None:
    """Mount the disks of the VMs that are running (the stack came up)."""
    with ctx.catalog.session() as s:
        for vm in s.scalars(select(VirtualMachine).where(VirtualMachine.power_state == "running")):
            try:
                _start_disks(ctx, vm)
            except VmvaultError as exc:
                log.warning("could not mount the disks of VM %s: %s", vm.name, exc)
            agents.start(ctx, vm)
