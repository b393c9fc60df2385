"""The backup pipeline.

    main thread: plan chunks -> submit (bounded) -> collect in order -> pack writer
    worker threads (one per core): pread -> zero test -> BLAKE3 id -> dedup claim
                                   -> zstd -> AES-GCM
    committer thread: fsync + rename finished packs (so the disk flush overlaps work)

At most `max_inflight` chunks are in flight, so memory stays a few dozen MiB
whatever the disk size. Packs are made durable before the index file naming
them, and the index before the manifest, which is written last.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmvault.errors import RESOURCE_EXISTS, VmvaultError, invalid, not_found

from . import ranges
from .format import MANIFESTS_DIR, utc_now, validate_rp_id
from .index import write_index_file
from .manifest import DiskEntry, Manifest, expected_chunk_count, read_manifest, write_manifest
from .pack import PackEntry, PackWriter, commit_pack

if TYPE_CHECKING:
    from .repository import Repository

Progress = Callable[[int, int], None]
PROGRESS_INTERVAL_S = 0.2
BATCH_BYTES = 1024 * 1024  # chunks per worker task: about this many bytes


@dataclass
class DiskSource:
    name: str  # e.g. "osdisk", "datadisk-0"
    size: int  # bytes
    path: Path  # a file to read with os.pread (a snapshot of the disk)
    data_ranges: list[tuple[int, int]] | None = None  # (offset, length) where data may be
    changed_ranges: list[tuple[int, int]] | None = None  # since the parent's snapshot


@dataclass
class BackupStats:
    bytes_scanned: int = 0  # bytes read from the sources
    bytes_total: int = 0  # sum of the disk sizes
    chunks_new: int = 0  # stored by this backup
    chunks_reused: int = 0  # read and hashed, but already in the vault (dedup)
    bytes_added: int = 0  # bytes of new packs, index and manifest files
    duration_s: float = 0.0
    # every chunk of the recovery point is counted once in new, reused, parent or zero
    chunks_parent: int = 0  # non-zero chunks copied from the parent's manifest, not read
    chunks_zero: int = 0  # all-zero chunks (read as zeros, holes, outside data_ranges)
    packs_written: int = 0


@dataclass
class _Task:
    disk: int
    index: int  # chunk index on the disk
    offset: int
    length: int
    pieces: list[tuple[int, int]] | None  # data intervals inside the chunk; None = all of it


@dataclass
class _Result:
    kind: str  # "zero" | "dup" | "new"
    chunk_id: bytes | None = None
    blob: bytearray | None = None
    flags: int = 0
    scanned: int = 0


@dataclass
class _Plan:
    source: DiskSource
    fd: int
    chunks: list[bytes | None]
    runs: list[ranges.Interval]  # chunk intervals to read
    data: list[ranges.Interval] | None
    from_parent: int = 0


@dataclass
class _PackState:
    committed: list[tuple[str, list[PackEntry]]] = field(default_factory=list)
    unindexed: list[tuple[str, list[PackEntry]]] = field(default_factory=list)
    pending: deque[tuple[Future[None], str, list[PackEntry]]] = field(default_factory=deque)


def _source_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def _read_into(fd: int, view: memoryview, offset: int, path: Path) -> int:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise invalid("disks", f"{path} ended at {offset + done}, before the disk size")
        done += n
    return done


class _Backup:
    def __init__(self, repo: Repository, rp_id: str, progress: Progress | None) -> None:
        self.repo = repo
        self.rp_id = rp_id
        self.progress = progress
        self.stats = BackupStats()
        self.claimed: set[bytes] = set()
        self.claim_lock = threading.Lock()
        self.zero = bytes(repo.chunk_size)
        self.packs = _PackState()
        self.writer: PackWriter | None = None
        self.committer = ThreadPoolExecutor(1, thread_name_prefix="vmvault-commit")
        self._last_progress = 0.0

    # --- planning ------------------------------------------------------------------
    def plan(self, src: DiskSource, parent: Manifest | None) -> _Plan:
        cs = self.repo.chunk_size
        count = expected_chunk_count(src.size, cs)
        try:
            fd = os.open(src.path, os.O_RDONLY)
        except OSError as exc:
            raise invalid("disks", f"cannot open {src.path}: {exc.strerror}") from None
        try:
            actual = _source_size(fd)
            if actual < src.size:
                raise invalid(
                    "disks", f"{src.path} holds {actual} bytes, less than the size {src.size}"
                )
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            pdisk = parent.disk(src.name) if parent is not None else None
            from_parent = 0
            if (
                pdisk is not None
                and src.changed_ranges is not None
                and pdisk.size == src.size
                and pdisk.chunk_size == cs
            ):
                chunks = list(pdisk.chunks)
                changed = ranges.to_chunks(
                    ranges.merge(src.changed_ranges, src.size, "changed_ranges"), cs
                )
                # a parent chunk that is no longer in the index is read again
                index = self.repo._index.entries
                lost = ranges.from_indices(
                    i for i, c in enumerate(chunks) if c is not None and c not in index
                )
                runs = ranges.union(changed, lost)
                for start, end in runs:
                    chunks[start:end] = [None] * (end - start)
                from_parent = sum(1 for c in chunks if c is not None)
            else:
                chunks = [None] * count
                runs = [(0, count)] if count else []
            data = None
            if src.data_ranges is not None:
                data = ranges.merge(src.data_ranges, src.size, "data_ranges")
            if self.repo.skip_file_holes and stat.S_ISREG(os.fstat(fd).st_mode):
                extents = ranges.file_extents(fd, src.size)  # holes of a sparse file
                if extents is not None:
                    data = extents if data is None else ranges.intersect(data, extents)
            if data is not None:
                runs = ranges.intersect(runs, ranges.to_chunks(data, cs))
            return _Plan(src, fd, chunks, runs, data, from_parent)
        except BaseException:
            os.close(fd)
            raise

    def tasks(self, plans: list[_Plan]) -> Iterator[_Task]:
        cs = self.repo.chunk_size
        for d, plan in enumerate(plans):
            size = plan.source.size
            data = plan.data
            j = 0
            for start, end in plan.runs:
                for i in range(start, end):
                    offset = i * cs
                    length = min(cs, size - offset)
                    pieces: list[tuple[int, int]] | None = None
                    if data is not None:
                        stop = offset + length
                        while j < len(data) and data[j][1] <= offset:
                            j += 1
                        pieces = []
                        k = j
                        while k < len(data) and data[k][0] < stop:
                            pieces.append((max(data[k][0], offset), min(data[k][1], stop)))
                            k += 1
                        if pieces == [(offset, stop)]:
                            pieces = None
                    yield _Task(d, i, offset, length, pieces)

    # --- worker side ------------------------------------------------------------------
    def work(self, plan: _Plan, task: _Task) -> _Result:
        buf = bytearray(task.length)  # zero-filled: the holes between data pieces stay zero
        view = memoryview(buf)
        pieces = task.pieces
        if pieces is None:
            pieces = [(task.offset, task.offset + task.length)]
        scanned = 0
        for start, end in pieces:
            piece = view[start - task.offset : end - task.offset]
            scanned += _read_into(plan.fd, piece, start, plan.source.path)
        zero = self.zero if task.length == len(self.zero) else bytes(task.length)
        if buf == zero:
            return _Result("zero", scanned=scanned)
        crypto = self.repo._crypto
        cid = crypto.chunk_id(buf)
        with self.claim_lock:
            if cid in self.claimed or cid in self.repo._index.entries:
                return _Result("dup", cid, scanned=scanned)
            self.claimed.add(cid)
        blob, flags = crypto.seal_chunk(cid, buf)
        return _Result("new", cid, blob, flags, scanned)

    # --- pack side --------------------------------------------------------------------
    def store(self, cid: bytes, blob: bytearray, flags: int, raw_length: int) -> None:
        if self.writer is None:
            self.writer = PackWriter(self.repo.path)
        self.writer.add(cid, blob, flags, raw_length)
        if self.writer.size >= self.repo.pack_size:
            self.rotate()

    def rotate(self) -> None:
        writer, self.writer = self.writer, None
        if writer is None:
            return
        if not writer.entries:
            writer.abort()
            return
        try:
            pack_id = writer.finish(self.repo._crypto)
        except BaseException:
            writer.abort()
            raise
        self.stats.bytes_added += writer.size
        self.stats.packs_written += 1
        fut = self.committer.submit(
            commit_pack, self.repo.path, writer.fd, writer.tmp_path, pack_id
        )
        self.packs.pending.append((fut, pack_id, writer.entries))
        self.harvest(block=len(self.packs.pending) > 2)

    def harvest(self, *, block: bool) -> None:
        pending = self.packs.pending
        while pending and (pending[0][0].done() or block):
            fut, pack_id, entries = pending.popleft()
            fut.result()
            self.packs.unindexed.append((pack_id, entries))
            block = False
        if len(self.packs.unindexed) >= self.repo.index_flush_packs:
            self.flush_index()

    def flush_index(self) -> None:
        unindexed = self.packs.unindexed
        if not unindexed:
            return
        repo = self.repo
        file_id = write_index_file(repo.path, repo._crypto, unindexed)
        self.stats.bytes_added += (repo.path / "index" / file_id).stat().st_size
        with repo._index.lock:
            for pack_id, entries in unindexed:
                repo._index.add_pack(pack_id, entries)
            repo._index.files.add(file_id)
        self.packs.committed.extend(unindexed)
        self.packs.unindexed = []

    def finish_packs(self) -> None:
        self.rotate()
        while self.packs.pending:
            self.harvest(block=True)
        self.flush_index()

    def cleanup_after_error(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        # keep what is durable findable: a later backup can reuse those chunks
        for fut, pack_id, entries in self.packs.pending:
            try:
                fut.result()
            except Exception:  # noqa: BLE001 - best effort after the real error
                continue
            self.packs.unindexed.append((pack_id, entries))
        self.packs.pending.clear()
        with contextlib.suppress(Exception):
            self.flush_index()

    # --- progress ---------------------------------------------------------------------
    def report(self, done: int, *, force: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if force or now - self._last_progress >= PROGRESS_INTERVAL_S:
            self._last_progress = now
            self.progress(done, self.stats.bytes_total)

    # --- the run ----------------------------------------------------------------------
    def batches(self, plans: list[_Plan]) -> Iterator[list[_Task]]:
        """Tasks in groups of about BATCH_BYTES (one future per group: less overhead)."""
        per_batch = max(1, BATCH_BYTES // self.repo.chunk_size)
        batch: list[_Task] = []
        for task in self.tasks(plans):
            if batch and (len(batch) >= per_batch or batch[-1].disk != task.disk):
                yield batch
                batch = []
            batch.append(task)
        if batch:
            yield batch

    def work_batch(self, plan: _Plan, batch: list[_Task]) -> list[_Result]:
        return [self.work(plan, task) for task in batch]

    def run(self, plans: list[_Plan]) -> None:
        repo = self.repo
        bases = []
        base = 0
        for plan in plans:
            bases.append(base)
            base += plan.source.size
        self.report(0, force=True)
        inflight: deque[tuple[list[_Task], Future[list[_Result]]]] = deque()
        per_batch = max(1, BATCH_BYTES // repo.chunk_size)
        max_inflight = max(2, repo.max_inflight() // per_batch)
        with ThreadPoolExecutor(repo.threads, thread_name_prefix="vmvault-backup") as pool:
            try:
                for batch in self.batches(plans):
                    plan = plans[batch[0].disk]
                    inflight.append((batch, pool.submit(self.work_batch, plan, batch)))
                    if len(inflight) >= max_inflight:
                        self.handle_batch(plans, bases, *inflight.popleft())
                while inflight:
                    self.handle_batch(plans, bases, *inflight.popleft())
            except BaseException:
                for _, fut in inflight:
                    fut.cancel()
                raise
        self.finish_packs()
        self.report(self.stats.bytes_total, force=True)

    def handle_batch(
        self,
        plans: list[_Plan],
        bases: list[int],
        batch: list[_Task],
        fut: Future[list[_Result]],
    ) -> None:
        for task, res in zip(batch, fut.result(), strict=True):
            self.handle(plans, bases, task, res)

    def handle(self, plans: list[_Plan], bases: list[int], task: _Task, res: _Result) -> None:
        plan = plans[task.disk]
        self.stats.bytes_scanned += res.scanned
        if res.kind == "dup":
            self.stats.chunks_reused += 1
            plan.chunks[task.index] = res.chunk_id
        elif res.kind == "new":
            assert res.chunk_id is not None and res.blob is not None
            self.stats.chunks_new += 1
            plan.chunks[task.index] = res.chunk_id
            self.store(res.chunk_id, res.blob, res.flags, task.length)
        self.report(bases[task.disk] + task.offset + task.length)


def run_backup(
    repo: Repository,
    rp_id: str,
    disks: list[DiskSource],
    *,
    parent: str | None,
    metadata: dict[str, Any] | None,
    progress: Progress | None,
) -> BackupStats:
    started = time.monotonic()
    validate_rp_id(rp_id)
    if (repo.path / MANIFESTS_DIR / rp_id).exists():
        raise VmvaultError(RESOURCE_EXISTS, kind="recovery point", name=rp_id)
    names = [d.name for d in disks]
    if len(set(names)) != len(names):
        raise invalid("disks", "disk names must be unique")
    for d in disks:
        if not isinstance(d.name, str) or not d.name:
            raise invalid("disks", f"disk name {d.name!r} must be a non-empty string")
        if not isinstance(d.size, int) or d.size < 0:
            raise invalid("disks", f"disk {d.name!r}: size {d.size!r} must be an integer >= 0")
    meta = dict(metadata or {})
    repo._index.refresh(repo.path, repo._crypto)
    parent_manifest = None
    if parent is not None:
        validate_rp_id(parent)
        try:
            parent_manifest = read_manifest(repo.path, repo._crypto, parent)
        except FileNotFoundError:
            raise not_found("recovery point", parent) from None

    job = _Backup(repo, rp_id, progress)
    job.stats.bytes_total = sum(d.size for d in disks)
    plans: list[_Plan] = []
    try:
        for src in disks:
            plans.append(job.plan(src, parent_manifest))
        for plan in plans:
            job.stats.chunks_parent += plan.from_parent
        try:
            job.run(plans)
        except BaseException:
            job.cleanup_after_error()
            raise
    finally:
        job.committer.shutdown(wait=True)
        for plan in plans:
            os.close(plan.fd)

    job.stats.chunks_zero = sum(p.chunks.count(None) for p in plans)
    manifest = Manifest(
        rp_id=rp_id,
        created=utc_now(),
        repository_id=repo.id,
        chunk_size=repo.chunk_size,
        parent=parent,
        metadata=meta,
        disks=[
            DiskEntry(p.source.name, p.source.size, repo.chunk_size, p.chunks) for p in plans
        ],
    )
    if (repo.path / MANIFESTS_DIR / rp_id).exists():
        raise VmvaultError(RESOURCE_EXISTS, kind="recovery point", name=rp_id)
    write_manifest(repo.path, repo._crypto, manifest)
    job.stats.bytes_added += (repo.path / MANIFESTS_DIR / rp_id).stat().st_size
    job.stats.duration_s = time.monotonic() - started
    return job.stats
