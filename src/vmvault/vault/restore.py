"""The restore pipeline: read blobs from packs -> decrypt/decompress/verify in workers ->
write at offset in the caller's thread, in disk order, with a bounded number in flight."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from vmvault.errors import VAULT_CORRUPT, VmvaultError, invalid, not_found

from .chunks import ChunkError
from .format import pread_exact, validate_rp_id
from .index import Location
from .manifest import DiskEntry, Manifest, read_manifest
from .pack import pack_path

if TYPE_CHECKING:
    from .repository import Repository

Progress = Callable[[int, int], None]
Sink = Callable[[int, bytes], None]
PROGRESS_INTERVAL_S = 0.2
WRITEBACK_STEP = 32 * 1024 * 1024


class PackReader:
    """Keeps each worker thread's last pack open; all descriptors close in close()."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[int] = set()

    def read(self, pack_id: str, offset: int, length: int, what: str) -> bytes:
        local = self._local
        if getattr(local, "pack", None) != pack_id:
            old = getattr(local, "fd", None)
            if old is not None:
                with self._lock:
                    self._open.discard(old)
                os.close(old)
                local.fd = None
                local.pack = None
            try:
                fd = os.open(pack_path(self.root, pack_id), os.O_RDONLY)
            except FileNotFoundError:
                raise VmvaultError(
                    VAULT_CORRUPT, reason=f"pack {pack_id} is missing (needed for {what})"
                ) from None
            with self._lock:
                self._open.add(fd)
            local.fd = fd
            local.pack = pack_id
        return pread_exact(local.fd, length, offset, f"pack {pack_id} ({what})")

    def close(self) -> None:
        with self._lock:
            fds, self._open = self._open, set()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


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


def restore_to(
    repo: Repository,
    rp_id: str,
    disk_name: str,
    write: Sink,
    *,
    progress: Progress | None = None,
    write_zeros: bool = False,
) -> int:
    """Write every stored chunk of a disk through `write(offset, data)`; returns bytes written.

    Zero chunks are skipped unless write_zeros (targets that are not sparse files).
    Never passes data that did not authenticate and hash to its id: VAULT_CORRUPT instead.
    """
    _, disk = load_disk(repo, rp_id, disk_name)
    repo._index.refresh(repo.path, repo._crypto)
    index = repo._index.entries
    crypto = repo._crypto
    reader = PackReader(repo.path)

    def locate(i: int, cid: bytes) -> Location:
        loc = index.get(cid)
        if loc is None:
            raise VmvaultError(
                VAULT_CORRUPT,
                reason=f"chunk {cid.hex()} (disk {disk_name}, chunk {i}, recovery point "
                f"{rp_id}) is not in the index",
            )
        return loc

    def work(i: int, cid: bytes, loc: Location) -> bytes:
        pack_id, offset, length, raw_length, flags = loc
        what = f"chunk {cid.hex()} at offset {offset}"
        blob = reader.read(pack_id, offset, length, what)
        try:
            data = crypto.open_chunk(cid, blob, flags, raw_length)
        except ChunkError as exc:
            raise VmvaultError(
                VAULT_CORRUPT,
                reason=f"pack {pack_id}, chunk {cid.hex()} (disk {disk_name}, chunk {i}): {exc}",
            ) from None
        _, expected = disk.chunk_span(i)
        if len(data) != expected:
            raise VmvaultError(
                VAULT_CORRUPT,
                reason=f"chunk {cid.hex()} (disk {disk_name}, chunk {i}) holds {len(data)} "
                f"bytes, the disk needs {expected}",
            )
        return data

    def jobs() -> Iterator[tuple[int, bytes | None]]:
        for i, cid in enumerate(disk.chunks):
            if cid is not None or write_zeros:
                yield i, cid

    written = 0
    last = 0.0
    zero = bytes(disk.chunk_size)
    inflight: deque[tuple[int, Future[bytes] | None]] = deque()
    max_inflight = repo.max_inflight()

    def drain_one() -> None:
        nonlocal written, last
        i, fut = inflight.popleft()
        offset, length = disk.chunk_span(i)
        data = fut.result() if fut is not None else zero[:length]
        write(offset, data)
        written += length
        if progress is not None:
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL_S:
                last = now
                progress(offset + length, disk.size)

    if progress is not None:
        progress(0, disk.size)
    try:
        with ThreadPoolExecutor(repo.threads, thread_name_prefix="vmvault-restore") as pool:
            try:
                for i, cid in jobs():
                    fut = None if cid is None else pool.submit(work, i, cid, locate(i, cid))
                    inflight.append((i, fut))
                    if len(inflight) >= max_inflight:
                        drain_one()
                while inflight:
                    drain_one()
            except BaseException:
                for _, f in inflight:
                    if f is not None:
                        f.cancel()
                raise
    finally:
        reader.close()
    if progress is not None:
        progress(disk.size, disk.size)
    return written


class _WritebackKicker:
    """Start the kernel's writeback of what a restore wrote, every WRITEBACK_STEP bytes.

    Without it, a restore into a file on a machine with much RAM leaves everything
    dirty in the page cache and the final fsync writes it all while nothing else
    happens; POSIX_FADV_DONTNEED starts writeback of a range at once (and drops the
    pages once clean, so a restore does not evict everything else from the cache).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.done = 0  # writeback started below this offset
        self.high = 0  # highest offset written

    def written(self, end: int) -> None:
        self.high = max(self.high, end)
        if self.high - self.done >= WRITEBACK_STEP:
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(self.fd, self.done, self.high - self.done, os.POSIX_FADV_DONTNEED)
            self.done = self.high


def restore_file(
    repo: Repository, rp_id: str, disk_name: str, target: Path, *, progress: Progress | None
) -> int:
    """Restore into a file (created or truncated to the disk size, sparse) or a block device.

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

        kick = _WritebackKicker(fd)

        def write(offset: int, data: bytes) -> None:
            view = memoryview(data)
            end = offset + len(view)
            while view:
                n = os.pwrite(fd, view, offset)
                view = view[n:]
                offset += n
            kick.written(end)

        try:
            written = restore_to(
                repo, rp_id, disk_name, write, progress=progress, write_zeros=not regular
            )
        except BaseException:
            if regular:  # leave no half-restored image that looks like a disk
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            raise
        os.fsync(fd)
        return written
    finally:
        os.close(fd)

