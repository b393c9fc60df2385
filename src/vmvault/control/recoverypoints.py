"""The life of recovery points after a backup: the instant (snapshot) tier expires, expired
points are removed, and the vault's garbage collection frees what nothing references.

Removal order keeps every point whole or absent: the catalog row goes first (so the point
is no longer offered for restore), then its manifest and its snapshots. A crash between the
two leaves a manifest the catalog does not know; the next pass removes such manifests once
no job that could still claim them is running. Prune holds the vault's exclusive lock, so it
waits for running backups (shared lock) and they wait for it.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmvault.catalog import Job, ProtectedItem, RecoveryPoint, Vault, utcnow
from vmvault.context import Context
from vmvault.control import policies, vaults
from vmvault.errors import VmvaultError

log = logging.getLogger(__name__)

STOPPED = "ProtectionStopped"  # stop protection and retain data: points are kept


def drop_snapshots(ctx: Context, disks: list[dict[str, Any]]) -> None:
    for d in disks:
        if d.get("snapshot"):
            try:
                ctx.store.delete_blob(d["account"], d["container"], d["blob"],
                                      snapshot=d["snapshot"])
            except VmvaultError as exc:
                log.warning("could not delete snapshot %s of %s: %s", d["snapshot"], d["blob"], exc)


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


def tier(rp: RecoveryPoint) -> str:
    """Azure's tier names: SnapshotAndVaultStandard while the instant tier still holds the
    point, then VaultStandard."""
    return "SnapshotAndVaultStandard" if any(d.get("snapshot") for d in rp.disks) \
        else "VaultStandard"


@dataclass
class Removal:
    """What is left to delete of removed points once their rows are gone (committed)."""

    manifests: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    snapshots: list[dict[str, Any]] = field(default_factory=list)


def remove(s: Session, rps: list[RecoveryPoint]) -> Removal:
    """Remove recovery points: their rows now (in `s`); the rest is for `finish_removal`,
    called once `s` is committed (so a point is never offered without its data)."""
    removal = Removal()
    for rp in rps:
        removal.snapshots.extend(d for d in rp.disks if d.get("snapshot"))
        removal.manifests[rp.item.vault_id].append(rp.name)
        if rp.item.last_snapshots.get("recoveryPoint") == rp.name:
            rp.item.last_snapshots = {}
        s.delete(rp)
    return removal


def finish_removal(ctx: Context, removal: Removal) -> dict[str, Any]:
    """Delete the snapshots and manifests of removed points, then collect the vaults'
    garbage."""
    drop_snapshots(ctx, removal.snapshots)
    report: dict[str, Any] = {}
    for vault_id, names in removal.manifests.items():
        with ctx.catalog.session() as s:
            vault = s.get_one(Vault, vault_id)
            name = vault.name
        try:
            repo = vaults.open_repository(vault)
            existing = set(repo.manifests())
            for rp_name in names:
                if rp_name in existing:
                    repo.delete_manifest(rp_name)
            stats = repo.prune()
        except VmvaultError as exc:
            log.warning("garbage collection of vault %s failed: %s", name, exc)
            report[name] = {"error": exc.to_dict()}
            continue
        report[name] = {"recoveryPointsRemoved": len(names), "packsDeleted": stats.packs_deleted,
                        "bytesFreed": stats.bytes_freed}
        log.info("vault %s: %d recovery points removed, %d bytes freed", name, len(names),
                 stats.bytes_freed)
    return report


def apply_retention(ctx: Context) -> dict[str, Any]:
    """One retention pass over every item: snapshot tier, expired points, garbage."""
    now = utcnow()
    with ctx.catalog.session() as s:
        for pi in s.scalars(select(ProtectedItem)):
            expire_snapshots(ctx, s, pi, policies.instant_rp_days(pi.policy))
        expired = list(s.scalars(
            select(RecoveryPoint).join(ProtectedItem)
            .where(RecoveryPoint.expiry <= now, ProtectedItem.protection_state != STOPPED)))
        removal = remove(s, expired)
        for vault_id, names in _unknown_manifests(s).items():
            removal.manifests[vault_id].extend(names)
    return finish_removal(ctx, removal) if removal.manifests else {}


def _unknown_manifests(s: Session) -> dict[int, list[str]]:
    """Manifests the catalog has no point for, left by a crash between a point's removal and
    its manifest's; skipped while any backup of the vault runs (its manifest is written
    before its row)."""
    found: dict[int, list[str]] = {}
    busy = set(s.scalars(select(Job.vault_id).where(Job.status == "InProgress",
                                                     Job.operation == "Backup")))
    for vault in s.scalars(select(Vault)):
        if vault.id in busy:
            continue
        try:
            names = set(vaults.open_repository(vault).manifests())
        except VmvaultError:
            continue
        known = set(s.scalars(select(RecoveryPoint.name).join(ProtectedItem)
                              .where(ProtectedItem.vault_id == vault.id)))
        if names - known:
            found[vault.id] = sorted(names - known)
    return found
