"""The restore pipeline.

The main thread plans the disk's stored chunks, in disk order, into *batches*: runs
of chunks whose blobs lie close together in one pack, so that one large pread
covers a whole batch (a backup writes a disk's chunks into packs in disk order, so
most batches are as long as allowed). It asks the kernel to read the packs
READ_AHEAD bytes ahead of the workers (POSIX_FADV_WILLNEED). A worker thread reads
a batch into a buffer of its own, drops those pack pages from the page cache, then
decrypts, decompresses and verifies each chunk (AES-GCM, zstd and BLAKE3 release
the GIL, so this runs on every core), and then

* restore_file: the worker writes the batch itself, one pwritev per run of
  disk-contiguous chunks, from buffers reused from batch to batch; a flusher
  thread makes the written data durable as the restore goes (and drops it from
  the page cache), so the final fsync has little left to wait for;
* restore_to: the chunks go back to the caller's thread, which passes them to
  write(offset, data) in disk order.

At most a bounded number of batches is in flight, so memory stays a few dozen MiB
whatever the disk size. No byte reaches a target unless its chunk authenticated
and hashed to its id.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vmvault.errors import VAULT_CORRUPT, VmvaultError, invalid, not_found

from .chunks import Buffer, ChunkError, Crypto
from .format import MIB, validate_rp_id
from .index import Location
from .manifest import DiskEntry, Manifest, read_manifest
from .pack import pack_path

if TYPE_CHECKING:
    from .repository import Repository

Progress = Callable[[int, int], None]
Sink = Callable[[int, bytes], None]
PROGRESS_INTERVAL_S = 0.2
READ_MAX = 4 * MIB  # one pread covers at most this much of a pack (or one blob, if longer)
READ_GAP_MAX = 1 * MIB  # a batch reads through this many bytes of unneeded blobs
BATCH_RAW_MAX = 4 * MIB  # plaintext bytes per batch (or one chunk, if larger)
INFLIGHT_RAW = 32 * MIB  # plaintext bytes in flight (bounds restore_to's memory)
READ_AHEAD = 64 * MIB  # bytes of packs the kernel is asked to read ahead of the workers
FLUSH_STEP = 64 * MIB  # restore_file makes its data durable every this many bytes
OPEN_PACKS = 8  # pack descriptors the planner keeps open for read-ahead
IOV_MAX = 1024  # buffers per pwritev (the Linux limit)


@dataclass(slots=True)
class _Item:
    index: int  # chunk index on the disk
    chunk_id: bytes
    pos: int  # of the blob, from the start of the batch's read
    length: int  # of the blob
    raw_length: int
    flags: int


@dataclass(slots=True)
class _Batch:
    """Chunks first..last of a disk (ascending, maybe with gaps) read from one pack
    range [start, end); pack_id None: the zero chunks first..last (nothing to read)."""

    pack_id: str | None
    start: int
    end: int
    first: int
    last: int
    raw: int = 0  # plaintext bytes
    items: list[_Item] = field(default_factory=list)


def load_disk(repo: Repository, rp_id: str, disk_name: str) -> tuple[Manifest, DiskEntry]:
    validate_rp_id(rp_id)
    try:
        manifest = read_manifest(repo.path, repo._crypto, rp_id)
    except FileNotFoundError:
        raise not_found("recovery point", rp_id) from None
    disk = manifest.disk(disk_name)
    if disk is None:
        raise not_found("disk", f"{rp_id}/{disk_name}")
    return manifest, disk


def _batch_limit(threads: int, chunk_size: int) -> float:
    """How much of READ_MAX and BATCH_RAW_MAX a batch may use: every worker holds a batch's
    read, plaintext and decompressed chunks, so many threads mean smaller batches."""
    share = INFLIGHT_RAW // (2 * max(1, threads))
    return min(1.0, max(share, chunk_size) / max(1, BATCH_RAW_MAX))


def _plan(
    disk: DiskEntry,
    index: dict[bytes, Location],
    rp_id: str,
    write_zeros: bool,
    scale: float = 1.0,
) -> Iterator[_Batch]:
    """The disk's chunks as batches, in disk order (lazily: VAULT_CORRUPT for a chunk
    missing from the index comes when the plan reaches it)."""
    cs = disk.chunk_size
    read_max = int(READ_MAX * scale)
    raw_max = int(BATCH_RAW_MAX * scale)
    cur: _Batch | None = None
    for i, cid in enumerate(disk.chunks):
        if cid is None:
            if not write_zeros:
                continue
            if (
                cur is not None
                and cur.pack_id is None
                and cur.last == i - 1
                and cur.raw + cs <= raw_max
            ):
                cur.last = i
                cur.raw += disk.chunk_span(i)[1]
                continue
            if cur is not None:
                yield cur
            cur = _Batch(None, 0, 0, i, i, disk.chunk_span(i)[1])
            continue
        loc = index.get(cid)
        if loc is None:
            raise VmvaultError(
                VAULT_CORRUPT,
                reason=f"chunk {cid.hex()} (disk {disk.name}, chunk {i}, recovery point "
                f"{rp_id}) is not in the index",
            )
        pack_id, offset, length, raw_length, flags = loc
        end = offset + length
        size = disk.chunk_span(i)[1]  # what the chunk must hold (raw_length is checked)
        if (
            cur is not None
            and cur.pack_id == pack_id
            and cur.raw + size <= raw_max
            and (
                cur.start <= offset and end <= cur.end  # read already (a repeated chunk)
                or cur.end <= offset <= cur.end + READ_GAP_MAX and end - cur.start <= read_max
            )
        ):
            cur.end = max(cur.end, end)
        else:
            if cur is not None:
                yield cur
            cur = _Batch(pack_id, offset, end, i, i)
        cur.items.append(_Item(i, cid, offset - cur.start, length, raw_length, flags))
        cur.last = i
        cur.raw += size
    if cur is not None:
        yield cur


class _Buffers(threading.local):
    """Each worker thread's read and output buffers, grown as needed, reused."""

    def __init__(self) -> None:
        self.read = bytearray()
        self.out = bytearray()

    def get(self, read_len: int, out_len: int) -> tuple[memoryview, memoryview]:
        if len(self.read) < read_len:
            self.read = bytearray(read_len)
        if len(self.out) < out_len:
            self.out = bytearray(out_len)
        return memoryview(self.read)[:read_len], memoryview(self.out)[:out_len]


class _PackFiles(threading.local):
    """Each thread's last pack, kept open; _Pipeline.close() closes every descriptor."""

    def __init__(self, root: Path, registry: set[int], lock: threading.Lock) -> None:
        self.root = root
        self.registry = registry
        self.lock = lock
        self.pack: str | None = None
        self.fd = -1

    def fd_for(self, pack_id: str, what: str) -> int:
        if self.pack == pack_id:
            return self.fd
        if self.fd >= 0:
            with self.lock:
                self.registry.discard(self.fd)
            os.close(self.fd)
            self.fd, self.pack = -1, None
        fd = _open_pack(self.root, pack_id, what)
        with self.lock:
            self.registry.add(fd)
        self.fd, self.pack = fd, pack_id
        return fd


def _open_pack(root: Path, pack_id: str, what: str) -> int:
    try:
        return os.open(pack_path(root, pack_id), os.O_RDONLY)
    except FileNotFoundError:
        raise VmvaultError(
            VAULT_CORRUPT, reason=f"pack {pack_id} is missing (needed for {what})"
        ) from None


class _Pipeline:
    """What the worker threads share for one restore."""

    def __init__(self, repo: Repository, disk: DiskEntry) -> None:
        self.root = repo.path
        self.crypto: Crypto = repo._crypto
        self.disk = disk
        self.buffers = _Buffers()
        self._fds: set[int] = set()
        self._lock = threading.Lock()
        self.packs = _PackFiles(repo.path, self._fds, self._lock)
        self._ahead: OrderedDict[str, int] = OrderedDict()  # the planner's descriptors

    def _what(self, b: _Batch) -> str:
        return f"disk {self.disk.name}, chunks {b.first}-{b.last}"

    def read_ahead(self, b: _Batch) -> None:
        """Ask the kernel to start reading a queued batch (the planner's thread)."""
        if b.pack_id is None:
            return
        fd = self._ahead.get(b.pack_id)
        if fd is None:
            try:
                fd = os.open(pack_path(self.root, b.pack_id), os.O_RDONLY)
            except OSError:
                return  # the worker reports it
            self._ahead[b.pack_id] = fd
            if len(self._ahead) > OPEN_PACKS:
                os.close(self._ahead.popitem(last=False)[1])
        else:
            self._ahead.move_to_end(b.pack_id)
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, b.start, b.end - b.start, os.POSIX_FADV_WILLNEED)

    def read(self, b: _Batch, into: memoryview) -> None:
        assert b.pack_id is not None
        what = self._what(b)
        fd = self.packs.fd_for(b.pack_id, what)
        done = 0
        while done < len(into):
            n = os.preadv(fd, [into[done:]], b.start + done)
            if n == 0:
                raise VmvaultError(
                    VAULT_CORRUPT,
                    reason=f"pack {b.pack_id} ({what}): file ends at {b.start + done}, "
                    f"expected {len(into)} bytes at offset {b.start}",
                )
            done += n
        # Done with these pages: drop them, so that a restore streams through the vault
        # instead of filling the page cache with it, and the next reads reuse the pages.
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, b.start, len(into), os.POSIX_FADV_DONTNEED)

    def _open(self, b: _Batch, item: _Item, blob: memoryview, out: memoryview | None) -> Buffer:
        try:
            if out is None:
                data: Buffer = self.crypto.open_chunk(
                    item.chunk_id, blob, item.flags, item.raw_length
                )
            else:
                data = self.crypto.open_chunk_into(
                    item.chunk_id, blob, item.flags, item.raw_length, out
                )
        except ChunkError as exc:
            raise VmvaultError(
                VAULT_CORRUPT,
                reason=f"pack {b.pack_id}, chunk {item.chunk_id.hex()} (disk {self.disk.name}, "
                f"chunk {item.index}): {exc}",
            ) from None
        _, expected = self.disk.chunk_span(item.index)
        if len(data) != expected:
            raise VmvaultError(
                VAULT_CORRUPT,
                reason=f"chunk {item.chunk_id.hex()} (disk {self.disk.name}, chunk "
                f"{item.index}) holds {len(data)} bytes, the disk needs {expected}",
            )
        return data

    def chunks(self, b: _Batch) -> list[tuple[int, bytes]]:
        """(offset, plaintext) of every chunk of a batch, in its own bytes (restore_to)."""
        cs = self.disk.chunk_size
        if b.pack_id is None:
            return [(i * cs, bytes(self.disk.chunk_span(i)[1])) for i in range(b.first, b.last + 1)]
        view, _ = self.buffers.get(b.end - b.start, 0)
        self.read(b, view)
        out = []
        for item in b.items:
            blob = view[item.pos : item.pos + item.length]
            out.append((item.index * cs, bytes(self._open(b, item, blob, None))))
        return out

    def write_batch(self, b: _Batch, fd: int, zero: memoryview) -> int:
        """Read, open and verify a batch, then pwritev it at its disk offsets (restore_file)."""
        cs = self.disk.chunk_size
        runs: list[tuple[int, list[Buffer]]] = []  # (disk offset, buffers) of contiguous chunks
        if b.pack_id is None:
            spans = (self.disk.chunk_span(i)[1] for i in range(b.first, b.last + 1))
            runs.append((b.first * cs, [zero[:n] for n in spans]))
        else:
            view, out = self.buffers.get(b.end - b.start, b.raw)
            self.read(b, view)
            pos = 0
            prev = -2
            for item in b.items:
                blob = view[item.pos : item.pos + item.length]
                size = self.disk.chunk_span(item.index)[1]
                data = self._open(b, item, blob, out[pos : pos + size])
                pos += size
                if item.index == prev + 1:
                    runs[-1][1].append(data)
                else:
                    runs.append((item.index * cs, [data]))
                prev = item.index
        written = 0
        for offset, bufs in runs:
            written += _pwritev_all(fd, bufs, offset)
        return written

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds), set()
        fds += self._ahead.values()
        self._ahead.clear()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _pwritev_all(fd: int, bufs: list[Buffer], offset: int) -> int:
    """Write the buffers back to back at `offset`, whatever pwritev's partial writes."""
    views = [memoryview(b).cast("B") for b in bufs]
    total = sum(len(v) for v in views)
    i = 0
    while i < len(views):
        group = views[i : i + IOV_MAX]
        n = os.pwritev(fd, group, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"pwritev wrote nothing at offset {offset}")
        offset += n
        for v in group:  # skip what was written; a partly written buffer keeps its rest
            if n >= len(v):
                n -= len(v)
                i += 1
            else:
                views[i] = v[n:]
                break
    return total


def _ahead(pipe: _Pipeline, batches: Iterator[_Batch]) -> Iterator[_Batch]:
    """The batches, each passed on once READ_AHEAD bytes of packs after it are asked for."""
    queue: deque[_Batch] = deque()
    queued = 0
    for b in batches:
        pipe.read_ahead(b)
        queue.append(b)
        queued += b.end - b.start
        while queued > READ_AHEAD:
            first = queue.popleft()
            queued -= first.end - first.start
            yield first
    yield from queue


def _run(
    repo: Repository,
    pipe: _Pipeline,
    rp_id: str,
    write_zeros: bool,
    work: Callable[[_Batch], object],
    done: Callable[[_Batch, object], None],
) -> None:
    """Run `work` on every batch in the pool, then `done` in the caller's thread, in order."""
    disk = pipe.disk
    scale = _batch_limit(repo.threads, disk.chunk_size)
    batches = _plan(disk, repo._index.entries, rp_id, write_zeros, scale)
    per_batch = max(int(BATCH_RAW_MAX * scale), disk.chunk_size)
    max_batches = max(2 * repo.threads + 2, INFLIGHT_RAW // per_batch)
    inflight: deque[tuple[_Batch, Future[object]]] = deque()
    try:
        with ThreadPoolExecutor(repo.threads, thread_name_prefix="vmvault-restore") as pool:
            try:
                for b in _ahead(pipe, batches):
                    inflight.append((b, pool.submit(work, b)))
                    if len(inflight) >= max_batches:
                        first, fut = inflight.popleft()
                        done(first, fut.result())
                while inflight:
                    first, fut = inflight.popleft()
                    done(first, fut.result())
            except BaseException:
                for _, f in inflight:
                    f.cancel()
                raise
    finally:
        pipe.close()


class _ProgressReport:
    def __init__(self, progress: Progress | None, disk: DiskEntry) -> None:
        self.progress = progress
        self.disk = disk
        self.last = 0.0
        if progress is not None:
            progress(0, disk.size)

    def __call__(self, b: _Batch) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if now - self.last >= PROGRESS_INTERVAL_S:
            self.last = now
            offset, length = self.disk.chunk_span(b.last)
            self.progress(offset + length, self.disk.size)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(self.disk.size, self.disk.size)


def _restore_to_disk(
    repo: Repository,
    rp_id: str,
    disk: DiskEntry,
    write: Sink,
    *,
    progress: Progress | None,
    write_zeros: bool,
) -> int:
    repo._index.refresh(repo.path, repo._crypto)
    pipe = _Pipeline(repo, disk)
    report = _ProgressReport(progress, disk)
    written = 0

    def done(b: _Batch, result: object) -> None:
        nonlocal written
        assert isinstance(result, list)
        for offset, data in result:
            write(offset, data)
            written += len(data)
        report(b)

    _run(repo, pipe, rp_id, write_zeros, pipe.chunks, done)
    report.finish()
    return written


def restore_to(
    repo: Repository,
    rp_id: str,
    disk_name: str,
    write: Sink,
    *,
    progress: Progress | None = None,
    write_zeros: bool = False,
) -> int:
    """Write every stored chunk of a disk through `write(offset, data)`, in disk order;
    returns bytes written.

    Zero chunks are skipped unless write_zeros (targets that are not sparse files).
    Never passes data that did not authenticate and hash to its id: VAULT_CORRUPT instead
    (and nothing at or after the damaged chunk has been passed then).
    """
    _, disk = load_disk(repo, rp_id, disk_name)
    return _restore_to_disk(
        repo, rp_id, disk, write, progress=progress, write_zeros=write_zeros
    )


class _Flusher:
    """Make what a restore wrote durable while it goes on, in a thread of its own.

    Without it the data would sit dirty in the page cache (on a machine with much RAM,
    all of it) and the final fsync would write it all while nothing else happens.
    Every FLUSH_STEP bytes written in disk order, the thread fdatasyncs the file (which
    also flushes the device's cache, and so pushes a loop device's backing file to its
    disk), then drops the now clean pages of that part (POSIX_FADV_DONTNEED), so a
    restore does not evict everything else from the page cache. An fdatasync error is
    kept and raised by finish(): the kernel reports a writeback error once per file.
    """

    def __init__(self, fd: int, step: int | None = None) -> None:
        self.fd = fd
        self.step = FLUSH_STEP if step is None else step
        self._cond = threading.Condition()
        self._want = 0  # flush requested: everything below this offset is written
        self._asked = 0
        self._done = 0  # durable and dropped below this offset
        self._stop = False
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._loop, name="vmvault-restore-flush")
        self._thread.daemon = True
        self._thread.start()

    def written_below(self, offset: int) -> None:
        if offset - self._asked >= self.step:
            self._asked = offset
            with self._cond:
                self._want = offset
                self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._want <= self._done and not self._stop:
                    self._cond.wait()
                if self._stop:  # the caller's fsync does the rest
                    return
                upto = self._want
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                self._error = exc
                return
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(self.fd, self._done, upto - self._done, os.POSIX_FADV_DONTNEED)
            self._done = upto

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()

    def finish(self) -> None:
        """Stop; raise the background flush's error, if one failed."""
        self.stop()
        if self._error is not None:
            raise self._error


def restore_file(
    repo: Repository, rp_id: str, disk_name: str, target: Path, *, progress: Progress | None
) -> int:
    """Restore into a file (created or truncated to the disk size, sparse) or a block device;
    durable (fsynced) on return.

    A block device gets zeros written for zero chunks. On failure a regular file is
    truncated to 0 bytes, so no half-restored image is left that looks like a disk.
    """
    _, disk = load_disk(repo, rp_id, disk_name)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        st = os.fstat(fd)
        regular = stat.S_ISREG(st.st_mode)
        if regular:
            os.ftruncate(fd, 0)  # drop old contents so skipped zero chunks read as zeros
            os.ftruncate(fd, disk.size)
        else:
            end = os.lseek(fd, 0, os.SEEK_END)
            if end < disk.size:
                raise invalid("target", f"{target} holds {end} bytes, the disk needs {disk.size}")
        try:
            written = _restore_into(repo, rp_id, disk, fd, progress, write_zeros=not regular)
        except BaseException:
            if regular:  # leave no half-restored image that looks like a disk
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            raise
        return written
    finally:
        os.close(fd)


def _restore_into(
    repo: Repository,
    rp_id: str,
    disk: DiskEntry,
    fd: int,
    progress: Progress | None,
    *,
    write_zeros: bool,
) -> int:
    repo._index.refresh(repo.path, repo._crypto)
    pipe = _Pipeline(repo, disk)
    report = _ProgressReport(progress, disk)
    zero = memoryview(bytes(disk.chunk_size)) if write_zeros else memoryview(b"")
    flusher = _Flusher(fd)
    written = 0

    def work(b: _Batch) -> int:
        return pipe.write_batch(b, fd, zero)

    def done(b: _Batch, result: object) -> None:
        nonlocal written
        assert isinstance(result, int)
        written += result
        offset, length = disk.chunk_span(b.last)
        flusher.written_below(offset + length)
        report(b)

    try:
        _run(repo, pipe, rp_id, write_zeros, work, done)
    except BaseException:
        flusher.stop()
        raise
    flusher.finish()
    os.fsync(fd)
    report.finish()
    return written
