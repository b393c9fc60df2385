"""Damage is found, never restored silently: flipped bytes in packs (blobs and trailer),
missing packs, damaged index files, swapped blobs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from vmvault.errors import VmvaultError
from vmvault.vault import DiskSource, Repository
from vmvault.vault.chunks import ChunkError, Crypto
from vmvault.vault.keys import MasterKey
from vmvault.vault.pack import read_trailer

CS = 64 * 1024


def setup_vault(tmp_path: Path) -> tuple[Repository, bytes]:
    repo = Repository.create(tmp_path / "vault", chunk_size=CS, pack_size=256 * 1024,
                             key_file=tmp_path / "key")
    rng = random.Random(5)
    content = rng.randbytes(6 * CS) + b"text " * (3 * CS // 5) + bytes(CS)
    content += bytes(-len(content) % CS)
    (tmp_path / "disk.raw").write_bytes(content)
    repo.backup("rp", [DiskSource("osdisk", len(content), tmp_path / "disk.raw")])
    return repo, content


def packs(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "vault" / "data").rglob("*") if p.is_file())


def first_blob(repo: Repository, pack: Path) -> tuple[bytes, int, int]:
    """(chunk id, offset, length) of the first blob in a pack, from its trailer."""
    import os

    fd = os.open(pack, os.O_RDONLY)
    try:
        entries = read_trailer(fd, pack.stat().st_size, repo._crypto, pack.name)
    finally:
        os.close(fd)
    e = entries[0]
    return e.id, e.offset, e.length


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_flipped_byte_in_a_blob(tmp_path: Path) -> None:
    repo, _ = setup_vault(tmp_path)
    pack = packs(tmp_path)[0]
    chunk_id, offset, length = first_blob(repo, pack)
    flip(pack, offset + length // 2)
    assert repo.check().ok  # structure is intact
    report = repo.check(read_data=True)
    assert not report.ok
    assert any(pack.name in e and chunk_id.hex() in e for e in report.errors), report.errors
    assert any("does not hash to the pack id" in e for e in report.errors)
    target = tmp_path / "out.raw"
    with pytest.raises(VmvaultError) as exc:
        repo.restore_disk("rp", "osdisk", target)
    assert exc.value.code == "UserErrorVaultDataCorrupted"
    assert pack.name in exc.value.message and chunk_id.hex() in exc.value.message
    assert target.stat().st_size == 0  # no half-restored image left behind
    sink_writes: list[int] = []
    with pytest.raises(VmvaultError):
        repo.restore_disk_to("rp", "osdisk", lambda o, d: sink_writes.append(o))
    # nothing at or after the damaged chunk reached the sink
    chunks = repo.manifest("rp").disks[0].chunks
    bad_index = chunks.index(chunk_id)
    assert all(o < bad_index * CS for o in sink_writes)


def test_flipped_nonce_and_trailer(tmp_path: Path) -> None:
    repo, _ = setup_vault(tmp_path)
    first, second = packs(tmp_path)[:2]
    _, offset, _ = first_blob(repo, first)
    flip(first, offset + 3)  # inside the nonce
    size = second.stat().st_size
    flip(second, size - 10)  # inside the trailer's tag
    report = repo.check()
    assert not report.ok and any(second.name in e and "trailer" in e for e in report.errors)
    report = repo.check(read_data=True)
    assert any(first.name in e and "authentication failed" in e for e in report.errors)
    with pytest.raises(VmvaultError) as exc:
        repo.restore_disk("rp", "osdisk", tmp_path / "out.raw")
    assert exc.value.code == "UserErrorVaultDataCorrupted"


def test_missing_pack(tmp_path: Path) -> None:
    repo, _ = setup_vault(tmp_path)
    gone = packs(tmp_path)[-1]
    gone.unlink()
    report = repo.check()
    assert not report.ok and any(gone.name in e and "missing" in e for e in report.errors)
    with pytest.raises(VmvaultError) as exc:
        repo.restore_disk("rp", "osdisk", tmp_path / "out.raw")
    assert exc.value.code == "UserErrorVaultDataCorrupted" and gone.name in exc.value.message
    with pytest.raises(VmvaultError) as exc:
        repo.prune()  # refuses to touch a damaged vault
    assert exc.value.code == "UserErrorVaultDataCorrupted"


def test_damaged_index_file(tmp_path: Path) -> None:
    repo, _ = setup_vault(tmp_path)
    [index_file] = list((tmp_path / "vault" / "index").iterdir())
    flip(index_file, 30)
    reopened = Repository.open(tmp_path / "vault", key_file=tmp_path / "key")
    report = reopened.check()
    assert not report.ok and any(index_file.name in e for e in report.errors)
    with pytest.raises(VmvaultError) as exc:
        reopened.restore_disk("rp", "osdisk", tmp_path / "out.raw")
    assert exc.value.code == "UserErrorVaultDataCorrupted"
    index_file.unlink()  # the packs alone are enough to rebuild it
    assert reopened.rebuild_index() == len(packs(tmp_path))
    assert reopened.check(read_data=True).ok
    reopened.restore_disk("rp", "osdisk", tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == (tmp_path / "disk.raw").read_bytes()


def test_blob_cannot_be_swapped_or_misread() -> None:
    crypto = Crypto(MasterKey.generate())
    a, b = b"a" * 5000, b"b" * 5000
    ida, idb = crypto.chunk_id(a), crypto.chunk_id(b)
    blob_a, flags_a = crypto.seal_chunk(ida, a)
    assert crypto.open_chunk(ida, blob_a, flags_a, len(a)) == a
    with pytest.raises(ChunkError, match="authentication"):
        crypto.open_chunk(idb, blob_a, flags_a, len(a))  # AAD = chunk id
    with pytest.raises(ChunkError):
        crypto.open_chunk(ida, blob_a, flags_a ^ 1, len(a))  # flag flipped in the index
    with pytest.raises(ChunkError):
        crypto.open_chunk(ida, blob_a, flags_a, len(a) - 1)
    other = Crypto(MasterKey.generate())
    with pytest.raises(ChunkError):
        other.open_chunk(ida, blob_a, flags_a, len(a))
    assert crypto.chunk_id(a) != other.chunk_id(a)  # ids are keyed
    incompressible = random.Random(1).randbytes(5000)
    _, flags = crypto.seal_chunk(crypto.chunk_id(incompressible), incompressible)
    assert flags == 0 and flags_a == 1
