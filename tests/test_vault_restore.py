"""The restore pipeline (vmvault.vault.restore): batched pack reads, writes from the workers,
the background flush, and the same bytes whatever the layout of the chunks in the packs."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from vmvault.errors import VmvaultError
from vmvault.vault import DiskSource, Repository
from vmvault.vault import restore as R
from vmvault.vault.chunks import ChunkError, Crypto
from vmvault.vault.format import FLAG_ZSTD
from vmvault.vault.keys import MasterKey

CS = 64 * 1024


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def text(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"etaoinshrdlu", k=rng.randint(2, 9))) for _ in range(300)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def layout_disk(path: Path, seed: int) -> bytes:
    """80 chunks and a short tail: random, text, zeros, a chunk repeated next to itself
    and far away (one blob, read several times), in a sparse file."""
    same = rand(CS, seed + 1000)
    parts: list[bytes] = []
    for i in range(80):
        kind = i % 8
        if i in (10, 11, 12, 50):
            parts.append(same)
        elif kind in (0, 1, 2):
            parts.append(rand(CS, seed * 100 + i))
        elif kind in (3, 4, 5):
            parts.append(text(CS, seed * 100 + i))
        else:
            parts.append(bytes(CS))
    parts.append(text(12345, seed))
    content = b"".join(parts)
    with open(path, "wb") as f:
        f.truncate(len(content))
        for i, part in enumerate(parts):
            if part.count(0) != len(part):
                f.seek(i * CS)
                f.write(part)
    return content


def rewrite(path: Path, content: bytes, seed: int) -> bytes:
    """Change 9 scattered chunks (some partly), so the next backup's chunks sit in new
    packs between the old ones."""
    data = bytearray(content)
    rng = random.Random(seed)
    for i in rng.sample(range(80), 9):
        start = i * CS + rng.randrange(0, CS // 2)
        data[start : start + 4096] = rand(4096, seed + i)
    with open(path, "r+b") as f:
        f.write(data)
    return bytes(data)


def sink(writes: list[tuple[int, bytes]]) -> Callable[[int, bytes], None]:
    return lambda offset, data: writes.append((offset, data))


@pytest.fixture
def vault(tmp_path: Path) -> tuple[Repository, bytes, bytes]:
    """A vault with a full and an incremental backup of the same disk (1 MiB packs)."""
    repo = Repository.create(
        tmp_path / "vault", chunk_size=CS, pack_size=1024 * 1024, key_file=tmp_path / "key"
    )
    disk = tmp_path / "disk.raw"
    v1 = layout_disk(disk, 1)
    repo.backup("rp-1", [DiskSource("osdisk", len(v1), disk)])
    v2 = rewrite(disk, v1, 2)
    repo.backup("rp-2", [DiskSource("osdisk", len(v2), disk)], parent="rp-1")
    return repo, v1, v2


@pytest.mark.parametrize(
    "limits",
    [
        {},  # the defaults: a batch per pack run
        {"READ_MAX": 100_000, "BATCH_RAW_MAX": 3 * CS, "READ_GAP_MAX": 0, "READ_AHEAD": 0},
        {"READ_MAX": 1, "BATCH_RAW_MAX": 1, "FLUSH_STEP": CS, "INFLIGHT_RAW": 1},
    ],
)
def test_same_bytes_whatever_the_batching(
    vault: tuple[Repository, bytes, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    limits: dict[str, int],
) -> None:
    repo, v1, v2 = vault
    for name, value in limits.items():
        monkeypatch.setattr(R, name, value)
    for rp, content in (("rp-1", v1), ("rp-2", v2)):
        target = tmp_path / f"{rp}.raw"
        stored = sum(1 for c in repo.manifest(rp).disks[0].chunks if c is not None)
        written = repo.restore_disk(rp, "osdisk", target)
        assert target.read_bytes() == content
        assert written == (stored - 1) * CS + 12345
        assert target.stat().st_blocks * 512 <= len(content) - 10 * CS  # zero chunks: holes
        writes: list[tuple[int, bytes]] = []
        assert repo.restore_disk_to(rp, "osdisk", sink(writes)) == written
        offsets = [o for o, _ in writes]
        assert offsets == sorted(set(offsets))  # disk order, each chunk once
        image = bytearray(len(content))
        for o, d in writes:
            image[o : o + len(d)] = d
        assert bytes(image) == content


def test_packs_are_read_in_few_large_reads(
    vault: tuple[Repository, bytes, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, _, v2 = vault
    reads: list[int] = []
    real_preadv = os.preadv

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        reads.append(sum(len(b) for b in buffers))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    repo.restore_disk("rp-2", "osdisk", tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == v2
    stored = sum(1 for c in repo.manifest("rp-2").disks[0].chunks if c is not None)
    # each changed chunk splits a run of the full backup's pack: about 2 reads per change
    assert len(reads) <= 2 * 9 + 6 < stored
    assert max(reads) > 4 * CS


def test_zero_runs_are_written_for_targets_that_are_not_sparse(
    vault: tuple[Repository, bytes, bytes], tmp_path: Path
) -> None:
    repo, _, v2 = vault
    target = tmp_path / "device.raw"
    _, disk = R.load_disk(repo, "rp-2", "osdisk")
    fd = os.open(target, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, disk.size)
        n = R._restore_into(repo, "rp-2", disk, fd, None, write_zeros=True)
    finally:
        os.close(fd)
    assert n == len(v2)
    assert target.read_bytes() == v2
    assert target.stat().st_blocks * 512 >= len(v2)  # every byte written, zeros included


def test_partial_pwritev_is_continued(
    vault: tuple[Repository, bytes, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, _, v2 = vault
    real_pwritev = os.pwritev

    def pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        first = memoryview(buffers[0])
        return real_pwritev(fd, [first[:1000]], offset)  # never more than 1000 bytes

    monkeypatch.setattr(os, "pwritev", pwritev)
    repo.restore_disk("rp-2", "osdisk", tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == v2


def test_a_failed_background_flush_fails_the_restore(
    vault: tuple[Repository, bytes, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, _, _ = vault
    monkeypatch.setattr(R, "FLUSH_STEP", CS)

    def fdatasync(fd: int) -> None:
        raise OSError(errno.EIO, "simulated writeback error")

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    target = tmp_path / "out.raw"
    with pytest.raises(OSError) as exc:
        repo.restore_disk("rp-2", "osdisk", target)
    assert exc.value.errno == errno.EIO
    assert target.stat().st_size == 0  # no half-restored image left behind


def test_truncated_pack(vault: tuple[Repository, bytes, bytes], tmp_path: Path) -> None:
    repo, _, _ = vault
    packs = sorted(p for p in (tmp_path / "vault" / "data").rglob("*") if p.is_file())
    pack = max(packs, key=lambda p: p.stat().st_size)
    os.truncate(pack, pack.stat().st_size // 2)
    target = tmp_path / "out.raw"
    with pytest.raises(VmvaultError) as exc:
        repo.restore_disk("rp-1", "osdisk", target)
    assert exc.value.code == "UserErrorVaultDataCorrupted"
    assert pack.name in exc.value.message
    assert target.stat().st_size == 0


def test_open_chunk_into() -> None:
    crypto = Crypto(MasterKey.generate())
    out = memoryview(bytearray(CS))
    raw, words = rand(5000, 1), text(5000, 2)
    for data, compressed in ((raw, False), (words, True)):
        cid = crypto.chunk_id(data)
        blob, flags = crypto.seal_chunk(cid, data)
        assert bool(flags & FLAG_ZSTD) == compressed
        got = crypto.open_chunk_into(cid, blob, flags, len(data), out)
        assert bytes(got) == data
        if not compressed:
            assert isinstance(got, memoryview) and got.obj is out.obj  # no copy
        damaged = bytearray(blob)
        damaged[-1] ^= 1
        with pytest.raises(ChunkError, match="authentication"):
            crypto.open_chunk_into(cid, damaged, flags, len(data), out)
        with pytest.raises(ChunkError):
            crypto.open_chunk_into(crypto.chunk_id(b"other"), blob, flags, len(data), out)
        with pytest.raises(ChunkError):
            crypto.open_chunk_into(cid, blob, flags, len(data) - 1, out)
        with pytest.raises(ChunkError):
            crypto.open_chunk_into(cid, blob, flags ^ FLAG_ZSTD, len(data), out)
        with pytest.raises(ChunkError):
            crypto.open_chunk_into(cid, blob, flags | 0x80, len(data), out)
        with pytest.raises(ChunkError, match="too short"):
            crypto.open_chunk_into(cid, blob[:20], flags, len(data), out)
        # a buffer too small for the payload: still opened (allocating) and verified
        assert bytes(crypto.open_chunk_into(cid, blob, flags, len(data), out[:10])) == data
