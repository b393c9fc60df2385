"""Byte and chunk interval arithmetic for data_ranges / changed_ranges.

Intervals are half-open (start, end) pairs, sorted and disjoint after merge().
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

from vmvault.errors import invalid

Interval = tuple[int, int]


def merge(ranges: Iterable[tuple[int, int]], size: int, field: str) -> list[Interval]:
    """(offset, length) pairs -> sorted disjoint [start, end) intervals clipped to [0, size)."""
    spans = []
    for item in ranges:
        try:
            offset, length = item
        except (TypeError, ValueError):
            raise invalid(field, f"{item!r} is not an (offset, length) pair") from None
        if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0:
            raise invalid(field, f"({offset!r}, {length!r}) needs integers >= 0")
        end = min(offset + length, size)
        if end > offset:
            spans.append((offset, end))
    spans.sort()
    merged: list[Interval] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def to_chunks(intervals: list[Interval], chunk_size: int) -> list[Interval]:
    """Byte intervals -> the chunk index intervals [first, end) that overlap them."""
    out: list[Interval] = []
    for start, end in intervals:
        first = start // chunk_size
        last = -(-end // chunk_size)
        if out and first <= out[-1][1]:
            if last > out[-1][1]:
                out[-1] = (out[-1][0], last)
        else:
            out.append((first, last))
    return out


def intersect(a: list[Interval], b: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start = max(a[i][0], b[j][0])
        end = min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def union(a: list[Interval], b: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for start, end in sorted(a + b):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def from_indices(indices: Iterable[int]) -> list[Interval]:
    """Sorted chunk indices -> intervals."""
    out: list[Interval] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def total(intervals: list[Interval]) -> int:
    return sum(end - start for start, end in intervals)


MAX_EXTENTS = 100_000


def file_extents(fd: int, size: int, limit: int = MAX_EXTENTS) -> list[Interval] | None:
    """Where a regular file holds data, from SEEK_DATA/SEEK_HOLE (holes read as zeros).

    None when the file system cannot tell. Past `limit` extents the rest of the file
    counts as data (bounded memory for badly fragmented files).
    """
    seek_data = getattr(os, "SEEK_DATA", None)
    seek_hole = getattr(os, "SEEK_HOLE", None)
    if seek_data is None or seek_hole is None:
        return None
    out: list[Interval] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, seek_data)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, seek_hole), size)
            if len(out) >= limit:
                out.append((start, size))
                break
            out.append((start, end))
            pos = end
    except OSError:
        return None
    return out
