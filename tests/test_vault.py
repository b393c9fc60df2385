"""The vault (vmvault.vault): keys, config, round trips, zero chunks, dedup, incremental,
data ranges, delete/prune, rebuild of the index. Real files in tmp_path."""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

import pytest

from vmvault.errors import VmvaultError
from vmvault.vault import (
    DEFAULT_CHUNK_SIZE,
    BackupStats,
    CheckReport,
    DiskSource,
    KdfParams,
    Repository,
)
from vmvault.vault.keys import FAST_KDF

CS = 64 * 1024  # smallest chunk size: many chunks from little data
PACK = 256 * 1024  # small packs: several packs per test


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def make_disk(path: Path, size: int, parts: list[tuple[int, bytes]]) -> Path:
    """A sparse file of `size` bytes with `parts` (offset, data) written into it."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in parts:
            f.seek(offset)
            f.write(data)
    return path


def new_repo(tmp_path: Path, **kw: object) -> Repository:
    kw.setdefault("chunk_size", CS)
    kw.setdefault("pack_size", PACK)
    if "password" not in kw:
        kw.setdefault("key_file", tmp_path / "vault.key")
    return Repository.create(tmp_path / "vault", **kw)  # type: ignore[arg-type]


def restored(repo: Repository, rp: str, disk: str, tmp_path: Path) -> bytes:
    target = tmp_path / f"restored-{rp}-{disk}.raw"
    repo.restore_disk(rp, disk, target)
    return target.read_bytes()


def code(exc: pytest.ExceptionInfo[VmvaultError]) -> str:
    return exc.value.code


# --- create / open / keys -------------------------------------------------------------


def test_create_and_open_with_key_file(tmp_path: Path) -> None:
    key = tmp_path / "k" / "vault.key"
    key.parent.mkdir()
    repo = Repository.create(tmp_path / "vault", key_file=key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(bytes.fromhex(key.read_text().strip())) == 32
    assert repo.chunk_size == DEFAULT_CHUNK_SIZE and repo.path == tmp_path / "vault"
    config = json.loads((tmp_path / "vault" / "config").read_text())
    assert config["version"] == 1 and config["id"] == repo.id
    assert config["chunk_size"] == DEFAULT_CHUNK_SIZE
    assert config["algorithms"]["encryption"] == "aes-256-gcm"
    for sub in ("keys", "data/00", "data/ff", "index", "manifests", "locks", "tmp"):
        assert (tmp_path / "vault" / sub).is_dir()
    again = Repository.open(tmp_path / "vault", key_file=key)
    assert again.id == repo.id and again.chunk_size == repo.chunk_size
    # the same key file opens a second vault and is not rewritten
    before = key.read_bytes()
    Repository.create(tmp_path / "vault2", key_file=key)
    assert key.read_bytes() == before
    Repository.open(tmp_path / "vault2", key_file=key)


def test_password_slot_and_wrong_secrets(tmp_path: Path) -> None:
    repo = Repository.create(tmp_path / "vault", password="correct horse")  # default Argon2id
    slots = list((tmp_path / "vault" / "keys").iterdir())
    assert len(slots) == 1
    slot = json.loads(slots[0].read_text())
    assert slot["kdf"]["algorithm"] == "argon2id" and slot["kdf"]["memory_cost_kib"] == 65536
    assert "correct horse" not in slots[0].read_text()
    assert Repository.open(tmp_path / "vault", password="correct horse").id == repo.id
    with pytest.raises(VmvaultError) as exc:
        Repository.open(tmp_path / "vault", password="wrong")
    assert code(exc) == "UserErrorVaultKeyIncorrect"
    other_key = tmp_path / "other.key"
    Repository.create(tmp_path / "other", key_file=other_key)
    with pytest.raises(VmvaultError) as exc:
        Repository.open(tmp_path / "vault", key_file=other_key)
    assert code(exc) == "UserErrorVaultKeyIncorrect"
    with pytest.raises(VmvaultError) as exc:
        Repository.open(tmp_path / "vault", key_file=tmp_path / "missing.key")
    assert code(exc) == "UserErrorVaultKeyIncorrect"


def test_key_file_and_password_slots_and_add_key(tmp_path: Path) -> None:
    key = tmp_path / "vault.key"
    repo = Repository.create(tmp_path / "vault", key_file=key, password="pw", kdf=FAST_KDF)
    assert len(list((tmp_path / "vault" / "keys").iterdir())) == 2
    assert Repository.open(tmp_path / "vault", key_file=key).id == repo.id
    assert Repository.open(tmp_path / "vault", password="pw").id == repo.id
    # a wrong password with the right key file still opens (any slot that fits)
    assert Repository.open(tmp_path / "vault", key_file=key, password="nope").id == repo.id
    repo.add_key(password="second", kdf=KdfParams(time_cost=1, memory_cost_kib=8192))
    assert Repository.open(tmp_path / "vault", password="second").id == repo.id


def test_create_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(VmvaultError) as exc:
        Repository.create(tmp_path / "v0")
    assert code(exc) == "InvalidArgumentValue"
    for bad in (1000, 32 * 1024, 8 * 1024 * 1024, 3 * 64 * 1024):
        with pytest.raises(VmvaultError) as exc:
            Repository.create(tmp_path / f"v{bad}", chunk_size=bad, key_file=tmp_path / "k")
        assert code(exc) == "InvalidArgumentValue"
    for good in (64 * 1024, 4 * 1024 * 1024):
        assert Repository.create(tmp_path / f"g{good}", chunk_size=good,
                                 key_file=tmp_path / "k").chunk_size == good
    with pytest.raises(VmvaultError) as exc:
        Repository.create(tmp_path / f"g{64 * 1024}", key_file=tmp_path / "k")
    assert code(exc) == "ResourceAlreadyExists"
    with pytest.raises(VmvaultError) as exc:
        Repository.open(tmp_path / "nothing-here", key_file=tmp_path / "k")
    assert code(exc) == "ResourceNotFound"


def test_other_format_version_is_refused(tmp_path: Path) -> None:
    new_repo(tmp_path)
    config_path = tmp_path / "vault" / "config"
    config = json.loads(config_path.read_text())
    config["version"] = 2
    config_path.write_text(json.dumps(config))
    with pytest.raises(VmvaultError) as exc:
        Repository.open(tmp_path / "vault", key_file=tmp_path / "vault.key")
    assert code(exc) == "UserErrorVaultFormatUnsupported"
    assert "version 2" in exc.value.message


# --- round trips ---------------------------------------------------------------------


def test_round_trip_zero_chunks_short_last_chunk_and_sparse_restore(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    size = 40 * CS + 12345  # the last chunk is short
    parts = [(0, rand(3 * CS, 1)), (10 * CS + 7, b"x" * 100), (20 * CS, rand(2 * CS, 2)),
             (40 * CS, rand(12345, 3))]
    disk = make_disk(tmp_path / "disk.raw", size, parts)
    stats = repo.backup("rp-1", [DiskSource("osdisk", size, disk)], metadata={"vm": "vm1"})
    assert isinstance(stats, BackupStats)
    assert stats.bytes_total == size
    # the file's holes are not read (SEEK_DATA): only the written blocks are
    assert 5 * CS + 12345 + 100 <= stats.bytes_scanned <= 5 * CS + 12345 + CS
    assert stats.chunks_new == 7 and stats.chunks_zero == 34 and stats.chunks_reused == 0
    assert stats.bytes_added > 0 and stats.duration_s > 0
    m = repo.manifest("rp-1")
    assert m.metadata == {"vm": "vm1"} and m.created.endswith("Z") and m.created_at.year >= 2024
    [d] = m.disks
    assert (d.name, d.size, d.chunk_size, len(d.chunks)) == ("osdisk", size, CS, 41)
    assert [i for i, c in enumerate(d.chunks) if c is not None] == [0, 1, 2, 10, 20, 21, 40]
    target = tmp_path / "restored.raw"
    written = repo.restore_disk("rp-1", "osdisk", target)
    assert written == 6 * CS + 12345
    assert target.read_bytes() == disk.read_bytes()
    assert target.stat().st_blocks * 512 < 12 * CS  # zero chunks were not written
    # restoring over an existing bigger file truncates it first
    target.write_bytes(b"\xff" * (size + 999))
    repo.restore_disk("rp-1", "osdisk", target)
    assert target.read_bytes() == disk.read_bytes()
    assert repo.manifests() == ["rp-1"]
    report = repo.check(read_data=True)
    assert isinstance(report, CheckReport)
    assert report.ok, report
    assert report.counts["chunks_read"] == 7 and report.counts["manifests"] == 1


def test_several_disks_sink_and_progress(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    a = make_disk(tmp_path / "a.raw", 5 * CS, [(CS, rand(CS, 5))])
    b = make_disk(tmp_path / "b.raw", 0, [])
    c = make_disk(tmp_path / "c.raw", 100, [(0, b"hello")])
    calls: list[tuple[int, int]] = []
    repo.backup("rp", [DiskSource("osdisk", 5 * CS, a), DiskSource("datadisk-0", 0, b),
                       DiskSource("datadisk-1", 100, c)],
                progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 5 * CS + 100) and calls[-1] == (5 * CS + 100, 5 * CS + 100)
    assert all(x[0] <= y[0] for x, y in zip(calls, calls[1:], strict=False))
    assert [d.name for d in repo.manifest("rp").disks] == ["osdisk", "datadisk-0", "datadisk-1"]
    writes: list[tuple[int, bytes]] = []
    assert repo.restore_disk_to("rp", "osdisk", lambda o, d: writes.append((o, d))) == CS
    assert writes == [(CS, rand(CS, 5))]
    assert restored(repo, "rp", "datadisk-0", tmp_path) == b""
    assert restored(repo, "rp", "datadisk-1", tmp_path) == b"hello" + bytes(95)
    with pytest.raises(VmvaultError) as exc:
        repo.restore_disk("rp", "nope", tmp_path / "x")
    assert code(exc) == "ResourceNotFound"


def test_dedup_within_and_across_backups(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    block = rand(CS, 7)
    disk = make_disk(tmp_path / "d.raw", 8 * CS, [(0, block), (3 * CS, block), (5 * CS, block)])
    twin = make_disk(tmp_path / "t.raw", 8 * CS, [(CS, block)])
    s1 = repo.backup("rp-1", [DiskSource("osdisk", 8 * CS, disk), DiskSource("twin", 8 * CS, twin)])
    assert s1.chunks_new == 1 and s1.chunks_reused == 3
    packs_before = repo.stats()["packs"]
    s2 = repo.backup("rp-2", [DiskSource("osdisk", 8 * CS, disk)])
    assert s2.chunks_new == 0 and s2.chunks_reused == 3 and s2.packs_written == 0
    assert s2.bytes_added < 2000  # just the manifest
    assert repo.stats()["packs"] == packs_before
    assert restored(repo, "rp-2", "osdisk", tmp_path) == disk.read_bytes()
    assert restored(repo, "rp-1", "twin", tmp_path) == twin.read_bytes()


def test_data_ranges_holes_are_not_read(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    size = 64 * CS
    # the file holds garbage everywhere; only the data ranges count, holes are zero
    disk = make_disk(tmp_path / "d.raw", size, [(0, rand(size, 9))])
    data = [(5 * CS, 2 * CS), (20 * CS + 100, 50), (63 * CS, CS)]
    stats = repo.backup("rp", [DiskSource("osdisk", size, disk, data_ranges=data)])
    assert stats.bytes_scanned == 3 * CS + 50
    assert stats.chunks_new == 4
    full = disk.read_bytes()
    expected = bytearray(size)
    for off, length in data:
        expected[off : off + length] = full[off : off + length]
    assert restored(repo, "rp", "osdisk", tmp_path) == bytes(expected)


def test_incremental_reads_only_changed_chunks(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    size = 16 * CS
    base = rand(size, 11)
    disk = make_disk(tmp_path / "d.raw", size, [(0, base)])
    repo.backup("rp-1", [DiskSource("osdisk", size, disk)])
    with open(disk, "r+b") as f:
        f.seek(3 * CS + 5)
        f.write(b"A" * 10)
        f.seek(10 * CS)
        f.write(b"B")
    changed = [(3 * CS + 5, 10), (10 * CS, 1)]
    stats = repo.backup("rp-2", [DiskSource("osdisk", size, disk, changed_ranges=changed)],
                        parent="rp-1")
    assert stats.bytes_scanned == 2 * CS
    assert stats.chunks_new == 2 and stats.chunks_parent == 14
    assert repo.manifest("rp-2").parent == "rp-1"
    old, new = repo.manifest("rp-1").disks[0].chunks, repo.manifest("rp-2").disks[0].chunks
    assert [i for i in range(16) if old[i] != new[i]] == [3, 10]
    assert restored(repo, "rp-2", "osdisk", tmp_path) == disk.read_bytes()
    assert restored(repo, "rp-1", "osdisk", tmp_path) == base
    # nothing changed: nothing read
    stats = repo.backup("rp-3", [DiskSource("osdisk", size, disk, changed_ranges=[])],
                        parent="rp-2")
    assert stats.bytes_scanned == 0 and stats.chunks_parent == 16
    assert repo.manifest("rp-3").disks[0].chunks == new
    # a changed range that became zeros (trim) with data_ranges: not read, stored as zero
    with open(disk, "r+b") as f:
        f.seek(4 * CS)
        f.write(bytes(CS))
    stats = repo.backup("rp-4", [DiskSource("osdisk", size, disk, changed_ranges=[(4 * CS, CS)],
                                            data_ranges=[(0, 4 * CS), (5 * CS, 11 * CS)])],
                        parent="rp-3")
    assert stats.bytes_scanned == 0
    assert repo.manifest("rp-4").disks[0].chunks[4] is None
    assert restored(repo, "rp-4", "osdisk", tmp_path) == disk.read_bytes()


def test_incremental_falls_back_to_full_for_new_or_resized_disks(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    a = make_disk(tmp_path / "a.raw", 4 * CS, [(0, rand(4 * CS, 1))])
    repo.backup("rp-1", [DiskSource("osdisk", 4 * CS, a)])
    with open(a, "ab") as f:
        f.write(rand(2 * CS, 3))  # the disk grew
    b = make_disk(tmp_path / "b.raw", 2 * CS, [(0, rand(2 * CS, 2))])
    stats = repo.backup("rp-2", [DiskSource("osdisk", 6 * CS, a, changed_ranges=[]),
                                 DiskSource("datadisk-0", 2 * CS, b, changed_ranges=[])],
                        parent="rp-1")
    assert stats.bytes_scanned == 8 * CS and stats.chunks_parent == 0
    assert restored(repo, "rp-2", "osdisk", tmp_path) == a.read_bytes()
    assert restored(repo, "rp-2", "datadisk-0", tmp_path) == b.read_bytes()


def test_backup_arguments_are_checked(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    disk = make_disk(tmp_path / "d.raw", CS, [(0, b"x")])
    src = [DiskSource("osdisk", CS, disk)]
    for bad in ("", ".", "..", "../etc", "a/b", "a b", "é"):
        with pytest.raises(VmvaultError) as exc:
            repo.backup(bad, src)
        assert code(exc) == "InvalidArgumentValue", bad
    repo.backup("rp-1", src)
    with pytest.raises(VmvaultError) as exc:
        repo.backup("rp-1", src)
    assert code(exc) == "ResourceAlreadyExists"
    with pytest.raises(VmvaultError) as exc:
        repo.backup("rp-2", src, parent="nope")
    assert code(exc) == "ResourceNotFound"
    with pytest.raises(VmvaultError) as exc:
        repo.backup("rp-2", [DiskSource("osdisk", 2 * CS, disk)])  # file shorter than size
    assert code(exc) == "InvalidArgumentValue"
    with pytest.raises(VmvaultError) as exc:
        repo.backup("rp-2", src * 2)
    assert code(exc) == "InvalidArgumentValue"
    with pytest.raises(VmvaultError) as exc:
        repo.backup("rp-2", src, metadata={"x": object()})
    assert code(exc) == "InvalidArgumentValue"
    assert repo.manifests() == ["rp-1"]
    assert repo.check().ok


# --- delete, prune, rebuild -----------------------------------------------------------


def test_delete_and_prune(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    a = make_disk(tmp_path / "a.raw", 32 * CS, [(0, rand(32 * CS, 1))])
    b = make_disk(tmp_path / "b.raw", 32 * CS, [(0, rand(32 * CS, 2))])
    repo.backup("rp-a", [DiskSource("osdisk", 32 * CS, a)])
    repo.backup("rp-b", [DiskSource("osdisk", 32 * CS, b)])
    before = repo.stats()
    assert before["chunks"] == 64 and before["manifests"] == 2
    repo.delete_manifest("rp-a")
    with pytest.raises(VmvaultError) as exc:
        repo.delete_manifest("rp-a")
    assert code(exc) == "ResourceNotFound"
    report = repo.check()
    assert report.ok and report.counts["chunks_unreferenced"] == 32
    assert any("not used by any recovery point" in i for i in report.infos)
    pruned = repo.prune()
    assert pruned.packs_deleted >= 4 and pruned.chunks_deleted == 32 and pruned.bytes_freed > 0
    after = repo.stats()
    assert after["chunks"] == 32 and after["bytes_stored"] < before["bytes_stored"] * 0.6
    report = repo.check(read_data=True)
    assert report.ok and report.infos == [], report
    assert restored(repo, "rp-b", "osdisk", tmp_path) == b.read_bytes()
    assert repo.prune().packs_deleted == 0  # nothing left to do


def test_prune_rewrites_partly_used_packs(tmp_path: Path) -> None:
    repo = new_repo(tmp_path, pack_size=32 * 1024 * 1024)  # everything in one pack
    a = make_disk(tmp_path / "a.raw", 16 * CS, [(0, rand(16 * CS, 3))])
    repo.backup("rp-a", [DiskSource("osdisk", 16 * CS, a)])
    b = make_disk(tmp_path / "b.raw", 4 * CS, [(0, rand(16 * CS, 3)[: 4 * CS])])
    assert repo.backup("rp-b", [DiskSource("osdisk", 4 * CS, b)]).chunks_new == 0
    assert repo.stats()["packs"] == 1
    repo.delete_manifest("rp-a")
    # below the threshold the pack is kept whole
    kept = repo.prune(rewrite_threshold=0.9)
    assert kept.packs_rewritten == 0 and kept.packs_deleted == 0
    pruned = repo.prune()
    assert pruned.packs_rewritten == 1 and pruned.packs_written == 1 and pruned.packs_deleted == 1
    assert repo.stats()["chunks"] == 4 and repo.stats()["packs"] == 1
    assert repo.check(read_data=True).ok
    assert restored(repo, "rp-b", "osdisk", tmp_path) == b.read_bytes()


def test_rebuild_index_from_packs(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    disk = make_disk(tmp_path / "d.raw", 20 * CS, [(0, rand(20 * CS, 4))])
    repo.backup("rp", [DiskSource("osdisk", 20 * CS, disk)])
    for f in (tmp_path / "vault" / "index").iterdir():
        f.unlink()
    reopened = Repository.open(tmp_path / "vault", key_file=tmp_path / "vault.key")
    assert not reopened.check().ok  # the manifest's chunks are in no index
    assert reopened.rebuild_index() == repo.stats()["packs"] >= 4
    assert reopened.check(read_data=True).ok
    assert restored(reopened, "rp", "osdisk", tmp_path) == disk.read_bytes()


def test_manifest_cannot_be_renamed(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    disk = make_disk(tmp_path / "d.raw", CS, [(0, b"data")])
    repo.backup("rp-1", [DiskSource("osdisk", CS, disk)])
    mdir = tmp_path / "vault" / "manifests"
    (mdir / "rp-2").write_bytes((mdir / "rp-1").read_bytes())
    with pytest.raises(VmvaultError) as exc:
        repo.manifest("rp-2")
    assert code(exc) == "UserErrorVaultDataCorrupted"
    report = repo.check()
    assert not report.ok and any("rp-2" in e for e in report.errors)


def test_second_repository_object_sees_new_index_files(tmp_path: Path) -> None:
    first = new_repo(tmp_path)
    second = Repository.open(tmp_path / "vault", key_file=tmp_path / "vault.key")
    disk = make_disk(tmp_path / "d.raw", 4 * CS, [(0, rand(4 * CS, 5))])
    second.stats()  # loads the (empty) index
    first.backup("rp-1", [DiskSource("osdisk", 4 * CS, disk)])
    assert second.backup("rp-2", [DiskSource("osdisk", 4 * CS, disk)]).chunks_new == 0
    first.delete_manifest("rp-1")
    first.delete_manifest("rp-2")
    first.prune()
    # second's cached index is stale: it must notice and store the chunks again
    assert second.backup("rp-3", [DiskSource("osdisk", 4 * CS, disk)]).chunks_new == 4
    assert restored(second, "rp-3", "osdisk", tmp_path) == disk.read_bytes()
    assert os.listdir(tmp_path / "vault" / "tmp") == []


def test_restore_progress_and_zero_writes_for_non_sparse_targets(tmp_path: Path) -> None:
    from vmvault.vault.restore import restore_to

    repo = new_repo(tmp_path)
    size = 6 * CS + 10
    disk = make_disk(tmp_path / "d.raw", size, [(2 * CS, rand(CS, 8)), (6 * CS, b"end")])
    repo.backup("rp", [DiskSource("osdisk", size, disk)])
    calls: list[tuple[int, int]] = []
    repo.restore_disk("rp", "osdisk", tmp_path / "out.raw",
                      progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, size) and calls[-1] == (size, size)
    # a block device cannot be left sparse: every chunk is written, zeros included
    writes: dict[int, bytes] = {}
    n = restore_to(repo, "rp", "osdisk", lambda o, d: writes.setdefault(o, bytes(d)),
                   write_zeros=True)
    assert n == size and sorted(writes) == [i * CS for i in range(7)]
    assert b"".join(writes[o] for o in sorted(writes)) == disk.read_bytes()


def test_empty_vault_check_prune_stats(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    assert repo.check(read_data=True).ok
    assert repo.prune().packs_deleted == 0
    s = repo.stats()
    assert (s["packs"], s["chunks"], s["bytes_stored"], s["manifests"]) == (0, 0, 0, 0)
    assert repo.manifests() == []
    with pytest.raises(VmvaultError) as exc:
        repo.manifest("nope")
    assert code(exc) == "ResourceNotFound"


def test_holes_of_a_sparse_source_file_are_not_read(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    size = 256 * CS
    disk = make_disk(tmp_path / "d.raw", size, [(7 * CS, rand(CS, 1)), (200 * CS, b"x")])
    stats = repo.backup("rp-1", [DiskSource("osdisk", size, disk)])
    assert stats.bytes_scanned <= 2 * CS and stats.chunks_new == 2 and stats.chunks_zero == 254
    repo.skip_file_holes = False
    stats = repo.backup("rp-2", [DiskSource("osdisk", size, disk)])
    assert stats.bytes_scanned == size and stats.chunks_reused == 2 and stats.chunks_zero == 254
    assert repo.manifest("rp-1").disks[0].chunks == repo.manifest("rp-2").disks[0].chunks
    assert restored(repo, "rp-1", "osdisk", tmp_path) == disk.read_bytes()
