"""Deterministic disk images for the benchmark.

An image is cut into 1 MiB regions; a seeded shuffle makes 40% of them
incompressible (BLAKE3 output), 30% compressible text (words drawn from a
seeded vocabulary, about 3:1 under zstd) and 30% zeros. Zero regions are left
as holes by default (as in a thin page blob), or written out with
``zeros="written"``. Every text and random region is unique, so no tool gains
from deduplicating regions against each other.

The incremental workload rewrites about 1% of the image as 64 KiB writes of
new random data at random 4 KiB-aligned, non-overlapping offsets: 640 writes
for 4 GiB (40 MiB), scaled linearly with the size.
"""

from __future__ import annotations

import array
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import blake3

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

REGION = MiB
RANDOM, TEXT, ZERO = "random", "text", "zero"
FRACTIONS = {RANDOM: 0.4, TEXT: 0.3, ZERO: 0.3}

WRITE_SIZE = 64 * KiB
WRITE_ALIGN = 4 * KiB

Progress = Callable[[int], None]

_LETTERS = "etaoinshrdlucmfwypvbgkjqxz"
_LETTER_WEIGHTS = [
    12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.4,
    2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.2, 0.15, 0.15, 0.1, 0.07, 0.1,
]  # fmt: skip
_SEPARATORS = [" "] * 20 + [", ", ". ", "\n", ": ", " = ", "/", ".\n"]
_PHRASES = 1 << 14  # a power of two: indices are masked from 16-bit values


def _seed_bytes(seed: int, label: str, index: int = 0) -> bytes:
    return f"vmvault-bench/{seed}/{label}/{index}".encode()


def random_bytes(seed: int, label: str, index: int, length: int) -> bytes:
    """``length`` pseudo-random bytes, a pure function of its arguments."""
    return blake3.blake3(_seed_bytes(seed, label, index)).digest(length=length)


@lru_cache(maxsize=4)
def _phrases(seed: int) -> tuple[bytes, ...]:
    rng = random.Random(f"vmvault-bench/{seed}/vocabulary")
    words = []
    for _ in range(4096):
        n = max(1, min(12, int(rng.gauss(5, 2.5))))
        words.append("".join(rng.choices(_LETTERS, _LETTER_WEIGHTS, k=n)))
    phrases = []
    for _ in range(_PHRASES):
        text = " ".join(rng.choices(words, k=rng.randint(8, 24))) + rng.choice(_SEPARATORS)
        if rng.random() < 0.1:
            text = text.capitalize()
        if rng.random() < 0.05:
            text += f"{rng.randint(0, 99999)} "
        phrases.append(text.encode())
    return tuple(phrases)


def text_region(seed: int, index: int, length: int = REGION) -> bytes:
    """Compressible, unique text: seeded phrases in an order drawn per region."""
    phrases = _phrases(seed)
    out = b""
    extra = 0
    while len(out) < length:
        idx = array.array("H")
        idx.frombytes(random_bytes(seed, "text", index * 1000 + extra, 2 * (length // 40 + 64)))
        out += b"".join([phrases[j & (_PHRASES - 1)] for j in idx])
        extra += 1
    return out[:length]


@dataclass(frozen=True)
class ImageSpec:
    size: int
    seed: int = 1

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % REGION:
            raise ValueError(f"image size must be a positive multiple of 1 MiB, not {self.size}")

    @property
    def regions(self) -> int:
        return self.size // REGION

    def kinds(self) -> list[str]:
        return region_kinds(self.regions, self.seed)

    def region(self, index: int, kind: str) -> bytes | None:
        """The bytes of one region, or None for a zero region."""
        if kind == RANDOM:
            return random_bytes(self.seed, "random", index, REGION)
        if kind == TEXT:
            return text_region(self.seed, index)
        return None


def region_kinds(regions: int, seed: int) -> list[str]:
    """Exactly 40/30/30 (rounded) random/text/zero regions, in a seeded order."""
    n_random = round(regions * FRACTIONS[RANDOM])
    n_text = round(regions * FRACTIONS[TEXT])
    n_text = min(n_text, regions - n_random)
    kinds = [RANDOM] * n_random + [TEXT] * n_text + [ZERO] * (regions - n_random - n_text)
    random.Random(f"vmvault-bench/{seed}/layout").shuffle(kinds)
    return kinds


def write_image(
    path: Path,
    spec: ImageSpec,
    *,
    zeros: str = "holes",
    progress: Progress | None = None,
) -> dict[str, int]:
    """Write the image into ``path`` (created, or an existing page blob file).

    Returns the bytes written per region kind.
    """
    if zeros not in ("holes", "written"):
        raise ValueError("zeros must be 'holes' or 'written'")
    counts = {RANDOM: 0, TEXT: 0, ZERO: 0}
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size < spec.size:
            os.ftruncate(fd, spec.size)
        zero = bytes(REGION)
        for i, kind in enumerate(spec.kinds()):
            data = spec.region(i, kind)
            if data is None and zeros == "written":
                data = zero
            if data is not None:
                os.pwrite(fd, data, i * REGION)
            counts[kind] += REGION
            if progress:
                progress(REGION)
    finally:
        os.close(fd)
    return counts


# --- the 1% rewrite ---------------------------------------------------------


def rewrite_count(size: int) -> int:
    """How many 64 KiB writes make the incremental: 640 per 4 GiB, at least 1."""
    return max(1, size * 640 // (4 * GiB))


def rewrite_plan(size: int, seed: int, count: int | None = None) -> list[int]:
    """Sorted, distinct, non-overlapping 4 KiB-aligned offsets of 64 KiB writes."""
    n = rewrite_count(size) if count is None else count
    slots = (size - WRITE_SIZE) // WRITE_ALIGN + 1
    if n * WRITE_SIZE > size // 2:
        raise ValueError("image too small for the rewrite")
    rng = random.Random(f"vmvault-bench/{seed}/rewrite")
    blocks_per_write = WRITE_SIZE // WRITE_ALIGN
    taken: set[int] = set()
    offsets: list[int] = []
    while len(offsets) < n:
        slot = rng.randrange(slots)
        span = range(slot, slot + blocks_per_write)
        if any(b in taken for b in span):
            continue
        taken.update(span)
        offsets.append(slot * WRITE_ALIGN)
    return sorted(offsets)


def apply_rewrites(path: Path, offsets: Iterable[int], seed: int) -> int:
    """pwrite new random data at each offset, in place; returns the bytes written."""
    written = 0
    fd = os.open(path, os.O_RDWR)
    try:
        for i, off in enumerate(offsets):
            written += os.pwrite(fd, random_bytes(seed, "rewrite", i, WRITE_SIZE), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


# --- the sparse disk of the memory check ------------------------------------


def write_sparse(path: Path, size: int, data_bytes: int, seed: int) -> int:
    """A mostly-hole disk: ``data_bytes`` in 1 MiB random/text regions at random places."""
    regions = size // REGION
    n = min(regions, max(1, data_bytes // REGION))
    rng = random.Random(f"vmvault-bench/{seed}/sparse")
    picks = sorted(rng.sample(range(regions), n))
    spec = ImageSpec(REGION, seed)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        for j, region in enumerate(picks):
            kind = RANDOM if j % 7 < 4 else TEXT
            data = spec.region(region, kind)
            assert data is not None
            os.pwrite(fd, data, region * REGION)
    finally:
        os.close(fd)
    return n * REGION


def file_digest(path: Path, block: int = 4 * MiB) -> str:
    """BLAKE3 of a file's content (holes read as zeros)."""
    h = blake3.blake3()
    with open(path, "rb", buffering=0) as f:
        while True:
            data = f.read(block)
            if not data:
                break
            h.update(data)
    return h.hexdigest()
