"""One backup, end to end: preflight, "Take Snapshot", "Transfer data to vault".

"Take Snapshot" goes through the guest (control/vmsnapshot.py): the VM agent runs the
VMSnapshot extension, which freezes the file systems, snapshots every disk through SAS URIs
and thaws; the recovery point records the consistency reached and the freeze window. The
transfer reads only what changed since the previous snapshot (extent maps of reflinked
snapshots), and the vault writes the manifest last, so a recovery point is whole or absent.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import defaultdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmvault import arm
from vmvault.catalog import Job, ProtectedItem, RecoveryPoint, VirtualMachine, utcnow
from vmvault.context import Context
from vmvault.control import jobs, policies, protection, vaults, vmsnapshot
from vmvault.errors import (
    BACKUP_INTERNAL,
    STORAGE_ACCOUNT_NOT_ONLINE,
    VM_NOT_FOUND,
    VM_NOT_IN_DESIRABLE_STATE,
    VM_PROVISIONING_FAILED,
    VmvaultError,
    invalid,
)
from vmvault.fabric import agents, vms
from vmvault.vault import DiskSource

log = logging.getLogger(__name__)

# Until the vault has repository locks (docs/vault-format.md), transfers into one vault run one
# at a time; prune never runs during them.
_vault_locks: dict[int, threading.Lock] = defaultdict(threading.Lock)

TAKE_SNAPSHOT = "Take Snapshot"
TRANSFER = "Transfer data to vault"
DEFAULT_RETENTION_DAYS = 30


def backup_now(ctx: Context, group: str, vault_name: str, container: str, item: str | None,
               retain_until: str | None, runner: jobs.JobRunner) -> dict[str, Any]:
    """Start an on-demand backup job (az backup protection backup-now)."""
    now = utcnow()
    if retain_until:
        expiry = arm.parse_date(retain_until, "--retain-until")
        if expiry <= now:
            raise invalid("--retain-until", f"{retain_until} is not in the future")
    else:
        expiry = now + dt.timedelta(days=DEFAULT_RETENTION_DAYS)
    with ctx.catalog.session() as s:
        vault = vaults.get(s, group, vault_name)
        pi = protection.get_item(s, vault, container, item)
        vault_id, item_id, name = vault.id, pi.id, pi.vm_name
    job_id = jobs.create(ctx, vault_id, item_id, "Backup", name,
                         {"retainUntil": arm.iso(expiry), "backupType": "OnDemand"},
                         [TAKE_SNAPSHOT, TRANSFER])
    runner.submit(job_id, lambda handle: run_backup(ctx, handle))
    with ctx.catalog.session() as s:
        return jobs.to_arm(s.scalars(select(Job).where(Job.job_id == job_id)).one())


def new_rp_name() -> str:
    """Recovery point names are numbers, as Azure's are (microseconds since the epoch)."""
    return str(time.time_ns() // 1000)


def preflight(s: Session, pi: ProtectedItem, ctx: Context) -> VirtualMachine:
    """The checks before a snapshot, each failure mapped to its catalog row (B1, B3, B12, R8,
    then the agent's: B11, B6, B2)."""
    vm = vms.find(s, pi.vm_group, pi.vm_name)
    if vm is None:
        raise VmvaultError(VM_NOT_FOUND, name=pi.vm_name)
    if vm.provisioning_state == "Failed":
        raise VmvaultError(VM_PROVISIONING_FAILED, name=vm.name)
    if vm.power_state in vms.TRANSITIONS or vm.provisioning_state != "Succeeded":
        raise VmvaultError(VM_NOT_IN_DESIRABLE_STATE, name=vm.name,
                           state=f"VM {vm.power_state}, provisioning {vm.provisioning_state}")
    if ctx.store.get_account(vm.storage_account.name).status != "online":
        raise VmvaultError(STORAGE_ACCOUNT_NOT_ONLINE, name=vm.storage_account.name)
    if vm.power_state == "running":  # a VM that is shut down is snapshotted by the host
        agents.check_ready(ctx, vm)
    return vm


def drop_snapshots(ctx: Context, disks: list[dict[str, Any]]) -> None:
    for d in disks:
        if d.get("snapshot"):
            try:
                ctx.store.delete_blob(d["account"], d["container"], d["blob"],
                                      snapshot=d["snapshot"])
            except VmvaultError as exc:
                log.warning("could not delete snapshot %s of %s: %s", d["snapshot"], d["blob"], exc)


def _disk_sources(ctx: Context, disks: list[dict[str, Any]],
                  previous: dict[str, Any]) -> tuple[list[DiskSource], bool]:
    """What to read of each disk: its data ranges, and its changed ranges when the previous
    backup's snapshot of that disk still exists (then the backup is incremental)."""
    sources = []
    incremental = False
    prev_disks = previous.get("disks", {})
    for d in disks:
        acct, cont, blob, snap = d["account"], d["container"], d["blob"], d["snapshot"]
        changed = None
        prev = prev_disks.get(d["name"])
        if prev and prev.get("blob") == blob and prev.get("snapshot") in ctx.store.list_snapshots(
                acct, cont, blob):
            changed = ctx.store.changed_ranges(acct, cont, blob, snap, prev["snapshot"])
            incremental = True
        sources.append(DiskSource(
            name=d["name"], size=d["size"],
            path=ctx.store.blob_path(acct, cont, blob, snapshot=snap),
            data_ranges=ctx.store.data_ranges(acct, cont, blob, snapshot=snap),
            changed_ranges=changed,
        ))
    return sources, incremental


def run_backup(ctx: Context, handle: jobs.JobHandle) -> str:
    with ctx.catalog.session() as s:
        job = s.scalars(select(Job).where(Job.job_id == handle.job_id)).one()
        assert job.item is not None
        vm_group, vm_name = job.item.vm_group, job.item.vm_name
    agents.wait_registered(ctx, vm_group, vm_name)
    with ctx.catalog.session() as s:
        job = s.scalars(select(Job).where(Job.job_id == handle.job_id)).one()
        pi = job.item
        assert pi is not None
        try:
            vm = preflight(s, pi, ctx)
        except VmvaultError:
            pi.last_backup_status = "Failed"
            raise
        item_id = pi.id
        previous = dict(pi.last_snapshots or {})
        vault = pi.vault
        expiry = arm.parse_date(job.parameters["retainUntil"], "retainUntil")
        instant_days = policies.instant_rp_days(pi.policy)
        vm_pk = vm.id
        vm_info = {"vmName": vm.name, "vmId": vm.vm_id, "vmSize": vm.size,
                   "location": vm.location, "resourceGroup": vm.group.name}

    handle.start_task(TAKE_SNAPSHOT)
    snap_time = utcnow()
    try:
        snap = vmsnapshot.take(ctx, vm_pk, handle.job_id)
    except VmvaultError:
        _mark_item(ctx, item_id, "Failed")
        raise
    disks, consistency = snap.disks, snap.consistency
    rp_name = new_rp_name()
    freeze = {} if snap.freeze_window_ms is None else {
        "Freeze Window (ms)": f"{snap.freeze_window_ms:.0f}"}
    handle.set_result(**{"Recovery Point Name": rp_name, "Snapshot Time": arm.iso(snap_time),
                         "Consistency": consistency, **freeze})
    handle.end_task(TAKE_SNAPSHOT)

    handle.start_task(TRANSFER)
    try:
        with _vault_locks[vault.id]:
            repo = vaults.open_repository(vault)
            sources, incremental = _disk_sources(ctx, disks, previous)
            parent = previous.get("recoveryPoint") if incremental else None
            if parent and parent not in repo.manifests():
                parent, sources = None, [DiskSource(s.name, s.size, s.path, s.data_ranges, None)
                                         for s in sources]
            stats = repo.backup(
                rp_name, sources, parent=parent,
                metadata={"vm": vm_info, "disks": disks, "consistency": consistency,
                          "freezeWindowMs": snap.freeze_window_ms,
                          "jobId": handle.job_id, "time": arm.iso(snap_time)},
                progress=lambda done, total: handle.progress(TRANSFER, done, total),
            )
    except VmvaultError:
        drop_snapshots(ctx, disks)
        _mark_item(ctx, item_id, "Failed")
        raise
    except Exception as exc:
        drop_snapshots(ctx, disks)
        _mark_item(ctx, item_id, "Failed")
        raise VmvaultError(BACKUP_INTERNAL, reason=f"{type(exc).__name__}: {exc}") from exc
    handle.end_task(TRANSFER)

    transfer = {
        "bytesTotal": stats.bytes_total, "bytesScanned": stats.bytes_scanned,
        "bytesAdded": stats.bytes_added, "chunksNew": stats.chunks_new,
        "chunksReused": stats.chunks_reused, "durationSeconds": round(stats.duration_s, 3),
        "incremental": parent is not None, "freezeWindowMs": snap.freeze_window_ms,
    }
    with ctx.catalog.session() as s:
        pi = s.get_one(ProtectedItem, item_id)
        s.add(RecoveryPoint(name=rp_name, item=pi, job_id=handle.job_id, time=snap_time,
                            consistency=consistency, expiry=expiry, disks=disks,
                            stats=transfer))
        pi.last_snapshots = {"recoveryPoint": rp_name,
                             "disks": {d["name"]: d for d in disks}}
        pi.protection_state = "Protected"
        pi.last_backup_status = "Completed"
        pi.last_backup_time = snap_time
        s.flush()
        expire_snapshots(ctx, s, pi, instant_days)
    handle.set_result(**{
        "Backup Size": f"{stats.bytes_added / 2**20:.1f} MiB",
        "Data Scanned": f"{stats.bytes_scanned / 2**20:.1f} MiB",
        "Incremental": str(parent is not None),
    })
    return "Completed"


def _mark_item(ctx: Context, item_id: int, status: str) -> None:
    with ctx.catalog.session() as s:
        s.get_one(ProtectedItem, item_id).last_backup_status = status


def expire_snapshots(ctx: Context, s: Session, pi: ProtectedItem, instant_days: int) -> None:
    """The snapshot tier keeps `instant_days` of snapshots, and always the newest one (the base
    of the next incremental backup)."""
    cutoff = utcnow() - dt.timedelta(days=instant_days)
    newest = pi.last_snapshots.get("recoveryPoint")
    rps = s.scalars(select(RecoveryPoint).where(RecoveryPoint.item_id == pi.id,
                                                RecoveryPoint.time < cutoff)).all()
    for rp in rps:
        if rp.name == newest or not any(d.get("snapshot") for d in rp.disks):
            continue
        drop_snapshots(ctx, rp.disks)
        rp.disks = [{**d, "snapshot": None} for d in rp.disks]


def cleanup_orphan(ctx: Context, s: Session, job: Job) -> None:
    """Undo what a backup job that died halfway left: its manifest (if the vault wrote one but
    the catalog never learned of it) and its snapshots."""
    if job.operation != "Backup" or job.item is None:
        return
    rp_name = job.result.get("Recovery Point Name")
    if rp_name and s.scalar(select(RecoveryPoint).where(RecoveryPoint.name == rp_name)) is None:
        try:
            repo = vaults.open_repository(job.item.vault)
            if rp_name in repo.manifests():
                repo.delete_manifest(rp_name)
        except VmvaultError as exc:
            log.warning("could not clean the vault after job %s: %s", job.job_id, exc)
    vm = vms.find(s, job.item.vm_group, job.item.vm_name)
    if vm is None:
        return
    for d in vm.disks:
        for snap in ctx.store.list_snapshots(vm.storage_account.name, d.container, d.blob):
            meta = ctx.store.get_properties(vm.storage_account.name, d.container, d.blob,
                                            snapshot=snap).metadata
            if meta.get("vmvaultjobid") == job.job_id:
                ctx.store.delete_blob(vm.storage_account.name, d.container, d.blob, snapshot=snap)
