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
from vmvault.catalog import Job, ProtectedItem, RecoveryPoint, Vault, VirtualMachine, utcnow
from vmvault.context import Context
from vmvault.control import jobs, policies, protection, retention, vaults, vmsnapshot
from vmvault.control.recoverypoints import drop_snapshots, expire_snapshots
from vmvault.errors import (
    BACKUP_INTERNAL,
    BACKUP_TRANSFER_TIMEOUT,
    PREMIUM_STORAGE_QUOTA,
    PROTECTION_STOPPED,
    STORAGE_ACCOUNT_NOT_ONLINE,
    VAULT_LOCKED,
    VM_NOT_FOUND,
    VM_NOT_IN_DESIRABLE_STATE,
    VM_PROVISIONING_FAILED,
    VmvaultError,
    invalid,
)
from vmvault.fabric import agents, vms
from vmvault.vault import BackupStats, DiskSource

log = logging.getLogger(__name__)

# Transfers into one vault run one at a time (they would compete for the same disks and CPU);
# the vault's own locks (docs/vault-format.md, section 12) keep prune and backups apart.
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
        if pi.protection_state == "ProtectionStopped":
            raise VmvaultError(PROTECTION_STOPPED, name=pi.vm_name)
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
    check_premium_room(ctx, vm)
    if vm.power_state == "running":  # a VM that is shut down is snapshotted by the host
        agents.check_ready(ctx, vm)
    return vm


def check_premium_room(ctx: Context, vm: VirtualMachine) -> None:
    """Row B4: a premium account keeps a snapshot's data while the disks change, so it needs
    free space equal to the disks' data."""
    account = vm.storage_account
    if not account.sku.startswith("Premium"):
        return
    needed = sum(length for d in vm.disks
                 for _, length in ctx.store.data_ranges(account.name, d.container, d.blob))
    free = account.capacity_bytes - ctx.store.used_bytes(account.name)
    if needed > free:
        raise VmvaultError(PREMIUM_STORAGE_QUOTA, name=account.name, free=free, needed=needed)


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
        vm_group, vm_name, item_id = job.item.vm_group, job.item.vm_name, job.item.id
    agents.wait_registered(ctx, vm_group, vm_name)
    try:
        with ctx.catalog.session() as s:
            job = s.scalars(select(Job).where(Job.job_id == handle.job_id)).one()
            pi = job.item
            assert pi is not None
            vm = preflight(s, pi, ctx)
            previous = dict(pi.last_snapshots or {})
            vault = pi.vault
            params = dict(job.parameters)
            instant_days = policies.instant_rp_days(pi.policy)
            vm_pk = vm.id
            vm_info = {"vmName": vm.name, "vmId": vm.vm_id, "vmSize": vm.size,
                       "location": vm.location, "resourceGroup": vm.group.name}
    except VmvaultError:  # recorded in a session of its own: the one above rolled back
        _mark_item(ctx, item_id, "Failed")
        raise

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

    metadata = {"vm": vm_info, "disks": disks, "consistency": consistency,
                "freezeWindowMs": snap.freeze_window_ms, "jobId": handle.job_id,
                "time": arm.iso(snap_time)}
    try:
        handle.start_task(TRANSFER)
        stats, parent = _transfer(ctx, handle, vault, rp_name, disks, previous, metadata)
        handle.end_task(TRANSFER)
        handle.commit("committing the recovery point")
    except BaseException as exc:
        drop_snapshots(ctx, disks)
        _drop_manifest(vault, rp_name)
        _mark_item(ctx, item_id, "Cancelled" if isinstance(exc, jobs.JobCancelled) else "Failed")
        if isinstance(exc, VmvaultError) or not isinstance(exc, Exception):
            raise
        raise VmvaultError(BACKUP_INTERNAL, reason=f"{type(exc).__name__}: {exc}") from exc

    transfer = {
        "bytesTotal": stats.bytes_total, "bytesScanned": stats.bytes_scanned,
        "bytesAdded": stats.bytes_added, "chunksNew": stats.chunks_new,
        "chunksReused": stats.chunks_reused, "durationSeconds": round(stats.duration_s, 3),
        "incremental": parent is not None, "freezeWindowMs": snap.freeze_window_ms,
    }
    with ctx.catalog.session() as s:
        pi = s.get_one(ProtectedItem, item_id)
        kind, expiry, tags = _retention_of(pi, params, snap_time)
        s.add(RecoveryPoint(name=rp_name, item=pi, job_id=handle.job_id, time=snap_time,
                            consistency=consistency, expiry=expiry, disks=disks,
                            stats=transfer, kind=kind, retention_tags=tags))
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
        "Recovery Point Expiry Time": arm.iso(expiry),
    })
    return "Completed"


def _retention_of(pi: ProtectedItem, params: dict[str, Any], taken: dt.datetime
                  ) -> tuple[str, dt.datetime, list[str]]:
    """(kind, expiry, tags) of a new recovery point: an on-demand point is kept until its
    --retain-until; a scheduled one as its policy's retention schedules say (control/retention),
    counted from the point's time."""
    if params.get("backupType") == "Scheduled" and pi.policy is not None:
        expiry, tags = retention.scheduled_expiry(pi.policy.properties, taken)
        return "Scheduled", expiry, tags
    return "OnDemand", arm.parse_date(params["retainUntil"], "retainUntil"), []


TRANSIENT = (BACKUP_TRANSFER_TIMEOUT.code, BACKUP_INTERNAL.code, VAULT_LOCKED.code)


def _transfer(ctx: Context, handle: jobs.JobHandle, vault: Vault, rp_name: str,
              disks: list[dict[str, Any]], previous: dict[str, Any],
              metadata: dict[str, Any]) -> tuple[BackupStats, str | None]:
    """Copy the snapshots into the vault; a transient failure (B9, B10, a busy vault) is
    retried with a doubling backoff before the job fails."""
    settings = ctx.service
    attempt = 0
    while True:
        try:
            return _transfer_once(ctx, handle, vault, rp_name, disks, previous, metadata)
        except jobs.JobCancelled:
            raise
        except VmvaultError as exc:
            error = exc
        except OSError as exc:
            error = VmvaultError(BACKUP_INTERNAL, reason=f"{type(exc).__name__}: {exc}")
        if error.code not in TRANSIENT or attempt >= settings.transfer_retries:
            raise error
        attempt += 1
        delay = settings.retry_backoff_seconds * 2 ** (attempt - 1)
        log.warning("job %s: transfer attempt %d failed (%s); retrying in %g s",
                    handle.job_id, attempt, error, delay)
        handle.set_result(**{"Transfer Retries": str(attempt),
                             f"Transfer Attempt {attempt}": f"({error.code}) {error.message}"})
        _sleep(handle, delay)


def _sleep(handle: jobs.JobHandle, seconds: float) -> None:
    """Wait, staying cancellable."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        handle.checkpoint("waiting to retry the transfer")
        time.sleep(min(0.2, left))


def _transfer_once(ctx: Context, handle: jobs.JobHandle, vault: Vault, rp_name: str,
                   disks: list[dict[str, Any]], previous: dict[str, Any],
                   metadata: dict[str, Any]) -> tuple[BackupStats, str | None]:
    limit = ctx.service.transfer_timeout_seconds
    started = time.monotonic()

    def progress(done: int, total: int) -> None:
        handle.checkpoint(TRANSFER)
        if time.monotonic() - started > limit:
            raise VmvaultError(BACKUP_TRANSFER_TIMEOUT, name=metadata["vm"]["vmName"],
                               limit=f"{limit:g} s",
                               reason=f"{done * 100 // max(total, 1)}% copied")
        handle.progress(TRANSFER, done, total)

    with _vault_locks[vault.id]:
        repo = vaults.open_repository(vault)
        sources, incremental = _disk_sources(ctx, disks, previous)
        parent = previous.get("recoveryPoint") if incremental else None
        if parent and parent not in repo.manifests():
            parent, sources = None, [DiskSource(s.name, s.size, s.path, s.data_ranges, None)
                                     for s in sources]
        # A busy vault (another process holds it exclusively, e.g. a prune) is waited for
        # within this attempt's limit; UserErrorVaultLocked is then retried as transient.
        lock_wait = min(repo.shared_lock_timeout,
                        max(0.0, limit - (time.monotonic() - started)))
        stats = repo.backup(rp_name, sources, parent=parent, metadata=metadata,
                            progress=progress, lock_timeout=lock_wait)
    return stats, parent


def _drop_manifest(vault: Vault, rp_name: str) -> None:
    """Remove a manifest the catalog will not record (a failed or cancelled job's)."""
    try:
        repo = vaults.open_repository(vault)
        if rp_name in repo.manifests():
            repo.delete_manifest(rp_name)
    except VmvaultError as exc:
        log.warning("could not remove manifest %s from vault %s: %s", rp_name, vault.name, exc)


def _mark_item(ctx: Context, item_id: int, status: str) -> None:
    with ctx.catalog.session() as s:
        s.get_one(ProtectedItem, item_id).last_backup_status = status


def cleanup_orphan(ctx: Context, s: Session, job: Job) -> None:
    """Undo what a backup job that died halfway left: its manifest (if the vault wrote one but
    the catalog never learned of it) and its snapshots."""
    if job.operation != "Backup" or job.item is None:
        return
    rp_name = job.result.get("Recovery Point Name")
    if rp_name and s.scalar(select(RecoveryPoint).where(RecoveryPoint.name == rp_name)) is None:
        _drop_manifest(job.item.vault, rp_name)
    vm = vms.find(s, job.item.vm_group, job.item.vm_name)
    if vm is None:
        return
    for d in vm.disks:
        for snap in ctx.store.list_snapshots(vm.storage_account.name, d.container, d.blob):
            meta = ctx.store.get_properties(vm.storage_account.name, d.container, d.blob,
                                            snapshot=snap).metadata
            if meta.get("vmvaultjobid") == job.job_id:
                ctx.store.delete_blob(vm.storage_account.name, d.container, d.blob, snapshot=snap)
