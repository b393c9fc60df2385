"""Low-level file tools of the disk store: reflink, sparse copy, hole punching, extent maps.

Everything here works on open file descriptors or paths and knows nothing of
accounts or blobs. Linux only (ioctl numbers are the x86-64/arm64 ones).

* :func:`reflink` clones a whole file (``FICLONE``): instant, shares blocks.
* :func:`sparse_copy` copies only the data segments (``SEEK_DATA``/``SEEK_HOLE``).
* :func:`punch_hole` frees a byte range (``fallocate(PUNCH_HOLE|KEEP_SIZE)``).
* :func:`data_segments` lists the ranges holding data, per ``SEEK_DATA``/``SEEK_HOLE``.
* :func:`fiemap` reads a file's extent map (``FS_IOC_FIEMAP``), and
  :func:`diff_extent_maps` compares two maps: a logical range mapped to the same
  physical blocks in both files is unchanged, everything else may differ.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

FICLONE = 0x40049409
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x00000001

FIEMAP_EXTENT_LAST = 0x00000001
FIEMAP_EXTENT_UNKNOWN = 0x00000002
FIEMAP_EXTENT_DELALLOC = 0x00000004
FIEMAP_EXTENT_ENCODED = 0x00000008
FIEMAP_EXTENT_DATA_ENCRYPTED = 0x00000080
FIEMAP_EXTENT_NOT_ALIGNED = 0x00000100
FIEMAP_EXTENT_DATA_INLINE = 0x00000200
FIEMAP_EXTENT_DATA_TAIL = 0x00000400
FIEMAP_EXTENT_UNWRITTEN = 0x00000800
FIEMAP_EXTENT_SHARED = 0x00002000

# Extents whose physical address does not identify their content: compare as "changed".
_OPAQUE = (
    FIEMAP_EXTENT_UNKNOWN
    | FIEMAP_EXTENT_DELALLOC
    | FIEMAP_EXTENT_ENCODED
    | FIEMAP_EXTENT_DATA_ENCRYPTED
    | FIEMAP_EXTENT_NOT_ALIGNED
    | FIEMAP_EXTENT_DATA_INLINE
    | FIEMAP_EXTENT_DATA_TAIL
)

_FIEMAP_HEAD = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, mapped, count, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2x res64, flags, 3x res
_EXTENTS_PER_CALL = 2048

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def reflink(src_fd: int, dst_fd: int) -> None:
    """Make dst share all of src's blocks (FICLONE). Raises OSError where unsupported."""
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


def reflink_unsupported(exc: OSError) -> bool:
    """True when the error means 'this file system (pair) cannot reflink'."""
    return exc.errno in (
        errno.EOPNOTSUPP,
        errno.ENOTTY,
        errno.EINVAL,
        errno.EXDEV,
        errno.ENOSYS,
        errno.EPERM,
    )


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset+length): reads return zeros, the size stays."""
    if length <= 0:
        return
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EOPNOTSUPP:
            raise OSError(err, os.strerror(err))
        # No hole punching here: write zeros instead (correct, just not sparse).
        zeros = bytes(min(length, 1 << 20))
        pos, end = offset, offset + length
        while pos < end:
            n = min(len(zeros), end - pos)
            os.pwrite(fd, zeros[:n], pos)
            pos += n


def data_segments(fd: int, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """[(offset, length)] of the ranges holding data within [start, end), by SEEK_DATA/HOLE."""
    size = os.fstat(fd).st_size
    end = size if end is None else min(end, size)
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            raise
        if data >= end:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        hole = min(hole, end)
        out.append((data, hole - data))
        pos = hole
    return out


def sparse_copy(src_fd: int, dst_fd: int) -> None:
    """Copy src into dst (same size, holes kept as holes) using copy_file_range."""
    size = os.fstat(src_fd).st_size
    os.ftruncate(dst_fd, size)
    for offset, length in data_segments(src_fd):
        done = 0
        while done < length:
            n = os.copy_file_range(
                src_fd, dst_fd, length - done, offset + done, offset + done
            )
            if n <= 0:  # pragma: no cover - copy_file_range gives up: fall back to read/write
                chunk = os.pread(src_fd, min(length - done, 1 << 20), offset + done)
                if not chunk:
                    break
                n = os.pwrite(dst_fd, chunk, offset + done)
            done += n


@dataclass(frozen=True)
class Extent:
    logical: int
    physical: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.logical + self.length


def fiemap(fd: int, *, sync: bool = True, start: int = 0, length: int | None = None
           ) -> list[Extent]:
    """The file's extent map, in logical order. sync flushes dirty data first (delalloc)."""
    if length is None:
        length = (1 << 64) - 1 - start
    end = start + length
    flags = FIEMAP_FLAG_SYNC if sync else 0
    out: list[Extent] = []
    pos = start
    buf = bytearray(_FIEMAP_HEAD.size + _FIEMAP_EXTENT.size * _EXTENTS_PER_CALL)
    while pos < end:
        _FIEMAP_HEAD.pack_into(buf, 0, pos, end - pos, flags, 0, _EXTENTS_PER_CALL, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        mapped = _FIEMAP_HEAD.unpack_from(buf, 0)[3]
        if mapped == 0:
            break
        last = False
        for i in range(mapped):
            lg, ph, ln, _r1, _r2, fl, _a, _b, _c = _FIEMAP_EXTENT.unpack_from(
                buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size
            )
            out.append(Extent(lg, ph, ln, fl))
            if fl & FIEMAP_EXTENT_LAST:
                last = True
        if last:
            break
        nxt = out[-1].end
        if nxt <= pos:  # pragma: no cover - defensive: never loop forever
            break
        pos = nxt
        flags &= ~FIEMAP_FLAG_SYNC  # flushed once is enough
    return out


# A mapping: sorted, non-overlapping (start, end, physical-at-start or None=opaque).
Mapping = Sequence[tuple[int, int, int | None]]


def data_mapping(extents: Iterable[Extent]) -> Mapping:
    """Extents that hold data, as a mapping. Unwritten extents read as zeros: left out
    (they are holes for comparison purposes); opaque extents map to None."""
    out: list[tuple[int, int, int | None]] = []
    for e in extents:
        if e.flags & FIEMAP_EXTENT_UNWRITTEN:
            continue
        phys = None if e.flags & _OPAQUE else e.physical
        out.append((e.logical, e.end, phys))
    out.sort()
    return out


_HOLE = -1


def _phys_at(mapping: Mapping, starts: list[int], pos: int) -> int | None:
    """Physical byte address of logical pos (_HOLE for a hole, None for opaque)."""
    i = bisect.bisect_right(starts, pos) - 1
    if i < 0:
        return _HOLE
    s, e, p = mapping[i]
    if pos >= e:
        return _HOLE
    if p is None:
        return None
    return p + (pos - s)


def diff_extent_maps(
    old: Mapping, new: Mapping, size: int
) -> Iterator[tuple[int, int, bool, bool]]:
    """Yield (start, end, old_has_data, new_has_data) for each piece of [0, size) where the two
    mappings may differ in content; pieces come in order, not merged."""
    points = {0, size}
    for m in (old, new):
        for s, e, _ in m:
            if s < size:
                points.add(s)
            if e < size:
                points.add(e)
    bounds = sorted(points)
    old_starts = [s for s, _, _ in old]
    new_starts = [s for s, _, _ in new]
    for a, b in zip(bounds, bounds[1:], strict=False):
        if a >= b:
            continue
        po = _phys_at(old, old_starts, a)
        pn = _phys_at(new, new_starts, a)
        if po == _HOLE and pn == _HOLE:
            continue
        if po is not None and pn is not None and po == pn:
            continue
        yield a, b, po != _HOLE, pn != _HOLE


def merge_ranges(pairs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge sorted-or-not (start, end) pairs that touch or overlap."""
    out: list[list[int]] = []
    for s, e in sorted(pairs):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def align_out(start: int, end: int, unit: int = 512) -> tuple[int, int]:
    return start - start % unit, -(-end // unit) * unit
