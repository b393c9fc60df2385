"""`prune`: remove what no recovery point references.

Policy (also in docs/vault-format.md):
  * packs with no referenced chunk are deleted;
  * packs where unreferenced blobs take more than `rewrite_threshold` of the
    pack's bytes are rewritten: their referenced blobs are copied, still
    encrypted, into new packs, then the old pack is deleted;
  * other packs are kept whole (their dead blobs stay until they cross the
    threshold);
  * packs no index names and temp files (leftovers of interrupted backups) are
    deleted.

Order, so that a crash at any point leaves a readable vault: new packs durable
-> one new index file naming every kept and new pack durable -> old index files
removed -> old packs removed.

Concurrency (docs/vault-format.md §12): prune runs under the exclusive vault lock,
which Repository.prune takes. It waits until running backups, restores and checks
(shared lock holders) have finished, and operations that start meanwhile wait for
it, so no backup can be writing a temp pack or a pack that no index names yet, and
none can deduplicate against a chunk that prune is about to delete. Other Repository
objects on the vault notice the new index: every operation reloads the index after
it has taken its lock, and Index.refresh starts over when an index file it had
loaded is gone.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmvault.errors import VAULT_CORRUPT, VmvaultError

from .check import manifest_names, scan_packs, tmp_files
from .format import INDEX_DIR, TMP_DIR, fsync_dir, pread_exact
from .index import Index, PackList, list_index_files, read_index_file, write_index_file
from .lock import holds_lock
from .manifest import read_manifest
from .pack import PackEntry, PackWriter, commit_pack, pack_path

if TYPE_CHECKING:
    from .repository import Repository

DEFAULT_REWRITE_THRESHOLD = 0.25


@dataclass
class PruneStats:
    packs_deleted: int = 0  # whole packs removed (unused, rewritten or leftover)
    packs_rewritten: int = 0  # partly used packs whose live blobs were copied
    packs_written: int = 0  # new packs holding the copied blobs
    chunks_deleted: int = 0  # index entries dropped
    bytes_freed: int = 0  # bytes of removed packs minus bytes of new packs
    tmp_files_removed: int = 0
    index_files_removed: int = 0
    duration_s: float = 0.0


def run_prune(
    repo: Repository, *, rewrite_threshold: float = DEFAULT_REWRITE_THRESHOLD
) -> PruneStats:
    started = time.monotonic()
    root = repo.path
    if not holds_lock(root, exclusive=True):
        raise RuntimeError("prune needs the exclusive vault lock (Repository.prune takes it)")
    crypto = repo._crypto
    stats = PruneStats()

    referenced: set[bytes] = set()
    for rp_id in manifest_names(root):
        m = read_manifest(root, crypto, rp_id)  # VAULT_CORRUPT aborts before any change
        for disk in m.disks:
            referenced.update(c for c in disk.chunks if c is not None)

    old_index_files = list_index_files(root)
    packs: dict[str, dict[tuple[bytes, int], PackEntry]] = {}
    for file_id in old_index_files:
        for pack_id, entries in read_index_file(root, crypto, file_id):
            slot = packs.setdefault(pack_id, {})
            for e in entries:
                slot[(e.id, e.offset)] = e
    on_disk, _ = scan_packs(root)
    missing = sorted(p for p in packs if p not in on_disk)
    if missing:
        raise VmvaultError(
            VAULT_CORRUPT,
            reason=f"the index names {len(missing)} missing packs (first {missing[0]}); "
            "prune stopped without changes, run check",
        )

    # one home per referenced chunk, preferring the packs with the most live bytes
    def live_bytes(pack_id: str) -> int:
        return sum(e.length for e in packs[pack_id].values() if e.id in referenced)

    home: dict[bytes, str] = {}
    for pack_id in sorted(packs, key=lambda p: (-live_bytes(p), p)):
        for e in packs[pack_id].values():
            if e.id in referenced:
                home.setdefault(e.id, pack_id)
    lost = referenced - set(home)
    if lost:
        raise VmvaultError(
            VAULT_CORRUPT,
            reason=f"{len(lost)} chunks used by recovery points are in no pack (first "
            f"{next(iter(lost)).hex()}); prune stopped without changes, run check",
        )

    keep: PackList = []
    rewrite: list[tuple[str, list[PackEntry]]] = []
    delete: list[str] = []
    for pack_id in sorted(packs):
        entries = sorted(packs[pack_id].values(), key=lambda e: e.offset)
        used = [e for e in entries if home.get(e.id) == pack_id]
        total = on_disk[pack_id]
        dead = sum(e.length for e in entries) - sum(e.length for e in used)
        if not used:
            delete.append(pack_id)
            stats.chunks_deleted += len(entries)
        elif dead > rewrite_threshold * total:
            rewrite.append((pack_id, used))
            stats.chunks_deleted += len(entries) - len(used)
        else:
            keep.append((pack_id, entries))

    new_packs = _copy_blobs(repo, rewrite, stats)
    stats.packs_rewritten = len(rewrite)

    new_file = write_index_file(root, crypto, keep + new_packs) if keep or new_packs else None
    for file_id in old_index_files:
        if file_id != new_file:
            os.unlink(root / INDEX_DIR / file_id)
            stats.index_files_removed += 1
    fsync_dir(root / INDEX_DIR)

    leftovers = [p for p in on_disk if p not in packs]
    for pack_id in delete + [p for p, _ in rewrite] + leftovers:
        path = pack_path(root, pack_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            stats.packs_deleted += 1
            stats.bytes_freed += on_disk[pack_id]
    for name in tmp_files(root):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(root / TMP_DIR / name)
            stats.tmp_files_removed += 1

    repo._index = Index()
    repo._index.refresh(root, crypto)
    stats.duration_s = time.monotonic() - started
    return stats


def _copy_blobs(
    repo: Repository, rewrite: list[tuple[str, list[PackEntry]]], stats: PruneStats
) -> PackList:
    """Copy the given blobs (still encrypted) into new packs; returns the new packs' entries."""
    new_packs: PackList = []
    writer: PackWriter | None = None

    def rotate() -> None:
        nonlocal writer
        if writer is None:
            return
        w, writer = writer, None
        pack_id = w.finish(repo._crypto)
        commit_pack(repo.path, w.fd, w.tmp_path, pack_id)
        new_packs.append((pack_id, w.entries))
        stats.packs_written += 1
        stats.bytes_freed -= w.size

    try:
        for pack_id, entries in rewrite:
            fd = os.open(pack_path(repo.path, pack_id), os.O_RDONLY)
            try:
                for e in entries:
                    blob = pread_exact(fd, e.length, e.offset, f"pack {pack_id}")
                    if writer is None:
                        writer = PackWriter(repo.path)
                    writer.add(e.id, blob, e.flags, e.raw_length)
                    if writer.size >= repo.pack_size:
                        rotate()
            finally:
                os.close(fd)
        rotate()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return new_packs
