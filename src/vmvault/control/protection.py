"""Protected items, containers and recovery points: what `backup protection`, `backup item`
and `backup recoverypoint` work on."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmvault import arm
from vmvault.catalog import Job, ProtectedItem, RecoveryPoint, Vault, utcnow
from vmvault.context import Context
from vmvault.control import jobs, policies, recoverypoints, retention, schedule, vaults
from vmvault.errors import (
    ALREADY_PROTECTED,
    NOT_PROTECTED,
    OPERATION_IN_PROGRESS,
    VmvaultError,
    invalid,
    not_found,
)
from vmvault.fabric import vms

CONTAINER_PREFIX = "iaasvmcontainerv2"


def container_name(group: str, vm: str) -> str:
    return f"IaasVMContainer;{CONTAINER_PREFIX};{group};{vm}"


def item_name(group: str, vm: str) -> str:
    return f"VM;{CONTAINER_PREFIX};{group};{vm}"


def friendly(name: str) -> str:
    """'VM;iaasvmcontainerv2;rg;vm' or 'IaasVMContainer;iaasvmcontainerv2;rg;vm' -> 'vm'."""
    return name.split(";")[-1] if ";" in name else name


def vm_from_id_or_name(vm: str) -> tuple[str | None, str]:
    """--vm takes a name or a resource id; returns (group or None, name)."""
    if vm.startswith("/subscriptions/"):
        parts = vm.strip("/").split("/")
        try:
            return parts[parts.index("resourceGroups") + 1], parts[-1]
        except (ValueError, IndexError) as exc:
            raise invalid("--vm", f"'{vm}' is not a VM resource id") from exc
    return None, vm


def get_item(s: Session, vault: Vault, container: str, item: str | None = None) -> ProtectedItem:
    name = friendly(item or container)
    if item is not None and friendly(container) != name:
        raise invalid("--item-name", f"item '{item}' is not in container '{container}'")
    rows = s.scalars(select(ProtectedItem).where(ProtectedItem.vault_id == vault.id,
                                                 ProtectedItem.vm_name == name)).all()
    if ";" in (item or container):  # a full name also says the group
        group = (item or container).split(";")[-2]
        rows = [r for r in rows if r.vm_group.lower() == group.lower()]
    if not rows:
        raise VmvaultError(NOT_PROTECTED, name=name, vault=vault.name)
    if len(rows) > 1:
        raise invalid("--container-name", f"'{name}' matches VMs in several resource groups; "
                      "give the full container name")
    return rows[0]


def item_to_arm(s: Session, item: ProtectedItem) -> dict[str, Any]:
    vault = item.vault
    last_rp = s.scalar(select(RecoveryPoint).where(RecoveryPoint.item_id == item.id)
                       .order_by(RecoveryPoint.time.desc()))
    container = container_name(item.vm_group, item.vm_name)
    name = item_name(item.vm_group, item.vm_name)
    vm_id = arm.resource_id(item.vm_group, "Microsoft.Compute", "virtualMachines", item.vm_name)
    return {
        "id": arm.resource_id(vault.group.name, "Microsoft.RecoveryServices", "vaults", vault.name,
                              "backupFabrics", "Azure", "protectionContainers", container,
                              "protectedItems", name),
        "name": name,
        "resourceGroup": vault.group.name,
        "type": "Microsoft.RecoveryServices/vaults/backupFabrics/protectionContainers/"
                "protectedItems",
        "properties": {
            "backupManagementType": "AzureIaasVM",
            "workloadType": "VM",
            "protectedItemType": "Microsoft.Compute/virtualMachines",
            "containerName": container.split(";", 1)[1],
            "friendlyName": item.vm_name,
            "sourceResourceId": vm_id,
            "virtualMachineId": vm_id,
            "policyName": item.policy.name if item.policy else None,
            "policyId": policies.to_arm(s, item.policy)["id"] if item.policy else None,
            "protectionState": item.protection_state,
            "protectionStatus": item.protection_status,
            "healthStatus": "Passed" if item.last_backup_status != "Failed" else "ActionRequired",
            "lastBackupStatus": item.last_backup_status,
            "lastBackupTime": arm.iso(item.last_backup_time),
            "lastRecoveryPoint": arm.iso(last_rp.time) if last_rp else None,
        },
    }


def enable_for_vm(ctx: Context, group: str, vault_name: str, vm: str,
                  policy_name: str) -> dict[str, Any]:
    vm_group, vm_name = vm_from_id_or_name(vm)
    vm_group = vm_group or group
    with ctx.catalog.session() as s:
        vault = vaults.get(s, group, vault_name)
        policy = policies.get(s, vault, policy_name)
        machine = vms.get(s, vm_group, vm_name)
        if machine.location != vault.location:
            raise invalid("--vm", f"VM '{vm_name}' is in '{machine.location}' and vault "
                          f"'{vault_name}' in '{vault.location}': a vault protects VMs of its "
                          "own region")
        existing = s.scalar(select(ProtectedItem).where(ProtectedItem.vm_group == vm_group,
                                                        ProtectedItem.vm_name == vm_name))
        if existing is not None:
            raise VmvaultError(ALREADY_PROTECTED, name=vm_name, vault=existing.vault.name)
        item = ProtectedItem(vault=vault, policy=policy, vm_group=vm_group, vm_name=vm_name,
                             source_vm_id=machine.vm_id)
        s.add(item)
        s.flush()
        return jobs.to_arm(_record_job(s, item, "ConfigureBackup"))


def list_items(ctx: Context, group: str, vault_name: str) -> list[dict[str, Any]]:
    with ctx.catalog.session() as s:
        vault = vaults.get(s, group, vault_name)
        rows = s.scalars(select(ProtectedItem).where(ProtectedItem.vault_id == vault.id)
                         .order_by(ProtectedItem.vm_name))
        return [item_to_arm(s, i) for i in rows]


def show_item(ctx: Context, group: str, vault_name: str, container: str,
              item: str | None) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        vault = vaults.get(s, group, vault_name)
        return item_to_arm(s, get_item(s, vault, container, item))


def list_containers(ctx: Context, group: str, vault_name: str) -> list[dict[str, Any]]:
    with ctx.catalog.session() as s:
        vault = vaults.get(s, group, vault_name)
        rows = s.scalars(select(ProtectedItem).where(ProtectedItem.vault_id == vault.id))
        return [{
            "name": container_name(i.vm_group, i.vm_name),
            "resourceGroup": vault.group.name,
            "type": "Microsoft.RecoveryServices/vaults/backupFabrics/protectionContainers",
            "properties": {"friendlyName": i.vm_name, "backupManagementType": "AzureIaasVM",
                           "registrationStatus": "Registered", "healthStatus": "Healthy",
                           "containerType": "Microsoft.Compute/virtualMachines",
                           "resourceGroup": i.vm_group},
        } for i in rows]


# --- recovery points -----------------------------------------------------------------------------


def rp_to_arm(rp: RecoveryPoint) -> dict[str, Any]:
    item = rp.item
    vault = item.vault
    tiers = []
    if any(d.get("snapshot") for d in rp.disks):
        tiers.append({"type": "InstantRP", "status": "Valid"})
    tiers.append({"type": "HardenedRP", "status": "Valid"})
    return {
        "id": arm.resource_id(vault.group.name, "Microsoft.RecoveryServices", "vaults", vault.name,
                              "backupFabrics", "Azure", "protectionContainers",
                              container_name(item.vm_group, item.vm_name), "protectedItems",
                              item_name(item.vm_group, item.vm_name), "recoveryPoints", rp.name),
        "name": rp.name,
        "resourceGroup": vault.group.name,
        "type": "Microsoft.RecoveryServices/vaults/backupFabrics/protectionContainers/"
                "protectedItems/recoveryPoints",
        "properties": {
            "objectType": "IaasVMRecoveryPoint",
            "recoveryPointTime": arm.iso(rp.time),
            "recoveryPointType": rp.consistency,
            "recoveryPointTierDetails": tiers,
            "tier": recoverypoints.tier(rp),
            "expiryTime": arm.iso(rp.expiry),
            "recoveryPointKind": rp.kind,
            "retainedBy": (retention.describe(rp.retention_tags, rp.expiry)
                           if rp.kind == "Scheduled" and rp.expiry
                           else f"on demand until {rp.expiry:%Y-%m-%d}" if rp.expiry else None),
            "sourceVMStorageType": "NormalStorage",
            "recoveryPointDiskConfiguration": {
                "numberOfDisksIncludedInBackup": len(rp.disks),
                "numberOfDisksAttachedToVm": len(rp.disks),
                "includedDiskList": [{"diskLun": d["lun"], "diskName": d["name"],
                                      "diskSizeBytes": d["size"]} for d in rp.disks],
            },
            "backupJobId": rp.job_id,
            "freezeWindowMilliseconds": rp.stats.get("freezeWindowMs"),
            "transferStats": rp.stats,
        },
    }


def get_rp(s: Session, item: ProtectedItem, name: str) -> RecoveryPoint:
    rp = s.scalar(select(RecoveryPoint).where(RecoveryPoint.item_id == item.id,
                                              RecoveryPoint.name == name))
    if rp is None:
        raise not_found("recovery point", name)
    return rp


def list_rps(ctx: Context, group: str, vault_name: str, container: str, item: str | None,
             start: dt.datetime | None = None, end: dt.datetime | None = None
             ) -> list[dict[str, Any]]:
    with ctx.catalog.session() as s:
        vault = vaults.get(s, group, vault_name)
        pi = get_item(s, vault, container, item)
        query = (select(RecoveryPoint).where(RecoveryPoint.item_id == pi.id)
                 .order_by(RecoveryPoint.time.desc()))
        if start:
            query = query.where(RecoveryPoint.time >= start)
        if end:
            query = query.where(RecoveryPoint.time <= end)
        return [rp_to_arm(rp) for rp in s.scalars(query)]


def show_rp(ctx: Context, group: str, vault_name: str, container: str, item: str | None,
            name: str) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        vault = vaults.get(s, group, vault_name)
        return rp_to_arm(get_rp(s, get_item(s, vault, container, item), name))


# --- protection lifecycle (az backup protection disable / resume, az backup item set-policy) ---


def _record_job(s: Session, item: ProtectedItem, operation: str) -> Job:
    """A job for an operation that completes at once (ConfigureBackup, DisableBackup)."""
    now = utcnow()
    job = Job(vault=item.vault, item=item, operation=operation, status="Completed",
              entity_friendly_name=item.vm_name, start_time=now, end_time=now,
              progress_percent=100)
    s.add(job)
    s.flush()
    return job


def update_item(ctx: Context, group: str, vault_name: str, container: str, item: str,
                state: str | None, policy_name: str | None) -> dict[str, Any]:
    """PUT on an existing protected item: stop protection and keep the data
    (protectionState ProtectionStopped), resume it (a policy on a stopped item), or move it
    to another policy. The schedule goes on from now: no slot of the past is caught up
    (schedule.restart_cursor)."""
    with ctx.catalog.session() as s:
        vault = vaults.get(s, group, vault_name)
        pi = get_item(s, vault, container, item)
        if state == "ProtectionStopped":
            if pi.protection_state == "ProtectionStopped":
                raise invalid("--container-name", f"protection of '{pi.vm_name}' is already "
                              "stopped; resume it with 'vmvault backup protection resume'")
            pi.protection_state, pi.policy = "ProtectionStopped", None
            return jobs.to_arm(_record_job(s, pi, "DisableBackup"))
        if not policy_name:
            raise invalid("--policy-name", "give the policy to protect the VM with")
        policy = policies.get(s, vault, policy_name)
        resumed = pi.protection_state == "ProtectionStopped"
        pi.policy = policy
        pi.schedule_cursor = schedule.restart_cursor(pi.schedule_cursor, utcnow(),
                                                     ctx.service.late_seconds)
        if resumed:
            pi.protection_state = "Protected" if pi.last_backup_time else "IRPending"
        retention_changed(s, pi)
        return jobs.to_arm(_record_job(s, pi, "ConfigureBackup"))


def retention_changed(s: Session, pi: ProtectedItem) -> None:
    """A new policy's retention applies to the item's existing scheduled points too."""
    if pi.policy is None:
        return
    for rp in s.scalars(select(RecoveryPoint).where(RecoveryPoint.item_id == pi.id,
                                                    RecoveryPoint.kind == "Scheduled")):
        rp.expiry, rp.retention_tags = retention.scheduled_expiry(pi.policy.properties, rp.time)


def delete_backup_data(ctx: Context, group: str, vault_name: str, container: str, item: str,
                       runner: jobs.JobRunner) -> dict[str, Any]:
    """Stop protection and delete the backup data (az backup protection disable
    --delete-backup-data): a DeleteBackupData job removes every recovery point, then the
    item; the vault's garbage collection frees the space."""
    with ctx.catalog.session() as s:
        vault = vaults.get(s, group, vault_name)
        pi = get_item(s, vault, container, item)
        running = jobs.item_running_job(s, pi)
        if running is not None:
            raise VmvaultError(OPERATION_IN_PROGRESS, name=pi.vm_name, job_id=running.job_id)
        vault_id, item_id, name = vault.id, pi.id, pi.vm_name
    job_id = jobs.create(ctx, vault_id, item_id, "DeleteBackupData", name, {},
                         [DELETE_TASK])
    runner.submit(job_id, lambda handle: _delete_data(ctx, handle, item_id))
    with ctx.catalog.session() as s:
        return jobs.to_arm(s.scalars(select(Job).where(Job.job_id == job_id)).one())


DELETE_TASK = "Delete backup data"


def _delete_data(ctx: Context, handle: jobs.JobHandle, item_id: int) -> str:
    handle.start_task(DELETE_TASK)
    handle.commit("deleting the backup data")
    with ctx.catalog.session() as s:
        pi = s.get_one(ProtectedItem, item_id)
        rps = list(s.scalars(select(RecoveryPoint).where(RecoveryPoint.item_id == pi.id)))
        removal = recoverypoints.remove(s, rps)
        for job in s.scalars(select(Job).where(Job.item_id == pi.id)):
            job.item_id = None
        s.delete(pi)
    report = recoverypoints.finish_removal(ctx, removal)
    handle.end_task(DELETE_TASK)
    freed = sum(int(r.get("bytesFreed", 0)) for r in report.values())
    handle.set_result(**{"Recovery Points Deleted": str(len(rps)),
                         "Vault Space Freed": f"{max(freed, 0) / 2**20:.1f} MiB"})
    return "Completed"


def exists(ctx: Context, group: str, vault_name: str, container: str, item: str) -> bool:
    with ctx.catalog.session() as s:
        vault = vaults.get(s, group, vault_name)
        try:
            get_item(s, vault, container, item)
        except VmvaultError as exc:
            if exc.code == NOT_PROTECTED.code:
                return False
            raise
        return True
