"""Restore disks (az backup restore restore-disks): a recovery point's disks into a storage
account, as page blobs, with a config blob that describes the VM they came from.

The source is the snapshot tier while it still holds the recovery point (a
reflink copy: instant), otherwise the vault. The target storage account must
pass the restore validations of the troubleshooting guide (rows R6, R7, R8).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from vmvault import arm
from vmvault.catalog import Job, StorageAccount
from vmvault.context import Context
from vmvault.control import jobs, protection, vaults
from vmvault.errors import (
    KEY_NOT_AVAILABLE,
    RESTORE_FAILED,
    STORAGE_ACCOUNT_FULL,
    STORAGE_ACCOUNT_NOT_ONLINE,
    STORAGE_REGION_MISMATCH,
    STORAGE_TYPE_NOT_SUPPORTED,
    VmvaultError,
    invalid,
)
from vmvault.fabric import groups, storage_accounts
from vmvault.storage import extents

log = logging.getLogger(__name__)

RESTORE_TASK = "Transfer data"
RESTORE_SKUS = ("Standard_LRS", "Standard_GRS")
SOURCES = ("Auto", "Vault", "Snapshot")


def clone_file(source: Path, target: Path) -> None:
    """Copy a snapshot into a restored blob: a reflink (instant, no space) where the pool
    allows it, else a sparse copy."""
    with open(source, "rb") as src, open(target, "r+b") as dst:
        try:
            extents.reflink(src.fileno(), dst.fileno())
        except OSError as exc:
            if not extents.reflink_unsupported(exc):
                raise
            extents.sparse_copy(src.fileno(), dst.fileno())


def validate_target(ctx: Context, account: StorageAccount, vault_location: str,
                    needed: int) -> None:
    if account.location != vault_location:
        raise VmvaultError(STORAGE_REGION_MISMATCH, name=account.name,
                           account_location=account.location, vault_location=vault_location)
    if account.sku not in RESTORE_SKUS:
        raise VmvaultError(STORAGE_TYPE_NOT_SUPPORTED, name=account.name, sku=account.sku)
    if ctx.store.get_account(account.name).status != "online":
        raise VmvaultError(STORAGE_ACCOUNT_NOT_ONLINE, name=account.name)
    free = account.capacity_bytes - ctx.store.used_bytes(account.name)
    if needed > free:
        raise VmvaultError(STORAGE_ACCOUNT_FULL, name=account.name, needed=needed, free=free)


def restore_disks(ctx: Context, group: str, vault_name: str, container: str, item: str | None,
                  rp_name: str, storage_account: str, target_group: str | None,
                  runner: jobs.JobRunner, source: str = "Auto") -> dict[str, Any]:
    if source not in SOURCES:
        raise invalid("--restore-from", f"'{source}' is not one of {', '.join(SOURCES)}")
    with ctx.catalog.session() as s:
        vault = vaults.get(s, group, vault_name)
        pi = protection.get_item(s, vault, container, item)
        rp = protection.get_rp(s, pi, rp_name)
        account = storage_accounts.get(s, storage_account)
        if target_group:
            groups.get(s, target_group)
        has_snapshots = all(d.get("snapshot") for d in rp.disks)
        if source == "Snapshot" and not has_snapshots:
            raise invalid("--restore-from", f"recovery point {rp_name} is no longer in the "
                          "snapshot tier; restore it from the vault")
        needed = sum(int(d["size"]) for d in rp.disks) if source == "Snapshot" else int(
            rp.stats.get("bytesScanned", 0))
        validate_target(ctx, account, vault.location, needed)
        use_snapshot = has_snapshots and source != "Vault"
        params = {"recoveryPoint": rp.name, "storageAccount": account.name,
                  "targetResourceGroup": target_group, "source": "Snapshot" if use_snapshot
                  else "Vault"}
        vault_id, item_id, name = vault.id, pi.id, pi.vm_name
    job_id = jobs.create(ctx, vault_id, item_id, "Restore", name, params, [RESTORE_TASK])
    runner.submit(job_id, lambda handle: run_restore(ctx, handle))
    with ctx.catalog.session() as s:
        return jobs.to_arm(s.scalars(select(Job).where(Job.job_id == job_id)).one())


def _drop_container(ctx: Context, account: str, container: str) -> None:
    try:
        ctx.store.delete_container(account, container)
    except VmvaultError as exc:
        log.warning("could not remove the restore container %s/%s: %s", account, container, exc)


def _progress(handle: jobs.JobHandle, offset: int, total: int) -> Callable[[int, int], None]:
    def report(n: int, _disk_total: int) -> None:
        handle.checkpoint(RESTORE_TASK)
        handle.progress(RESTORE_TASK, offset + n, total)
    return report


def run_restore(ctx: Context, handle: jobs.JobHandle) -> str:
    with ctx.catalog.session() as s:
        job = s.scalars(select(Job).where(Job.job_id == handle.job_id)).one()
        params = dict(job.parameters)
        assert job.item is not None
        rp = protection.get_rp(s, job.item, params["recoveryPoint"])
        rp_disks, rp_time = list(rp.disks), rp.time
        vault, vm_name = job.item.vault, job.item.vm_name
        manifest_meta_vm = {"vmName": vm_name, "resourceGroup": job.item.vm_group}
    account = params["storageAccount"]
    container = f"vmvault-restore-{handle.job_id[:8]}"
    use_snapshot = params["source"] == "Snapshot"
    total = sum(int(d["size"]) for d in rp_disks)
    done = 0
    restored: list[dict[str, Any]] = []
    handle.start_task(RESTORE_TASK)
    ctx.store.create_container(account, container, exist_ok=True)
    try:
        repo = None if use_snapshot else vaults.open_repository(vault)
        for d in rp_disks:
            handle.checkpoint(RESTORE_TASK)
            blob = f"{vm_name}-{d['name']}-{rp.name}.vhd"
            ctx.store.create_page_blob(account, container, blob, int(d["size"]))
            target = ctx.store.blob_path(account, container, blob)
            if use_snapshot:
                source_path = ctx.store.blob_path(d["account"], d["container"], d["blob"],
                                                  snapshot=d["snapshot"])
                clone_file(source_path, target)
            else:
                assert repo is not None
                repo.restore_disk(rp.name, d["name"], target,
                                  progress=_progress(handle, done, total))
            done += int(d["size"])
            handle.progress(RESTORE_TASK, done, total, force=True)
            restored.append({"name": d["name"], "lun": d["lun"], "sizeBytes": d["size"],
                             "fsType": d.get("fsType"),
                             "uri": f"{ctx.blob_url}/{account}/{container}/{blob}",
                             "path": str(target)})
        handle.commit("writing the restored VM's configuration")
        config = {"source": manifest_meta_vm, "recoveryPoint": rp.name,
                  "recoveryPointTime": arm.iso(rp_time), "disks": restored,
                  "restoredFrom": params["source"]}
        ctx.store.put_block_blob(account, container, "vmconfig.json",
                                 json.dumps(config, indent=2).encode(),
                                 content_type="application/json")
    except BaseException as exc:
        _drop_container(ctx, account, container)  # no half-restored disks left behind
        if isinstance(exc, jobs.JobCancelled) or not isinstance(exc, VmvaultError | OSError):
            raise
        if isinstance(exc, OSError):
            raise VmvaultError(RESTORE_FAILED, reason=str(exc)) from exc
        if exc.code.startswith("UserErrorVault") or exc.code == KEY_NOT_AVAILABLE.code:
            raise  # the vault's own rows (B13 among them) say what to do better
        raise VmvaultError(RESTORE_FAILED, reason=exc.message) from exc
    handle.end_task(RESTORE_TASK)
    handle.set_result(**{
        "Target Storage Account Name": account,
        "Config Blob Container Name": container,
        "Config Blob Name": "vmconfig.json",
        "Config Blob Uri": f"{ctx.blob_url}/{account}/{container}/vmconfig.json",
        "Restored From": params["source"],
        "Recovery Point Time": arm.iso(rp_time),
        "Restored Disks": restored,
    })
    return "Completed"
