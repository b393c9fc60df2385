"""The disk store: accounts, containers, page and block blobs, snapshots, range diffs.

Runs twice where it matters: on a real XFS loop mount with reflink (root; CI) and on the
copy fallback (no reflink)."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest_storage import copy_dir, fresh_folder, make_store, xfs_dir  # noqa: F401
from vmvault.errors import VmvaultError
from vmvault.storage import extents as ext
from vmvault.storage.diskstore import DiskStore, blob_key

A, C = "acct1", "disks"
MiB = 1024 * 1024


@pytest.fixture(params=["reflink", "copy"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DiskStore]:
    if request.param == "reflink":
        root = fresh_folder(request.getfixturevalue("xfs_dir"), "store")
    else:
        root = tmp_path / "store"
    s = make_store(root, request.param == "reflink")
    s.create_account(A, location="westeurope", sku="Standard_LRS", capacity_bytes=1 << 40)
    s.create_container(A, C)
    yield s


def _pages(data: bytes, fill: int) -> bytes:
    return bytes([fill]) * len(data)


# --- accounts and containers ------------------------------------------------------------


def test_accounts(tmp_path: Path) -> None:
    s = DiskStore(tmp_path)
    info = s.create_account("acct2", location="westeurope", sku="Standard_GRS",
                            capacity_bytes=10 * 1024**3)
    assert info.status == "online"
    assert len(base64.b64decode(info.key1)) == 64 and info.key1 != info.key2
    assert s.get_account("acct2") == info
    assert [a.name for a in s.list_accounts()] == ["acct2"]
    with pytest.raises(VmvaultError) as exc:
        s.create_account("acct2", location="x", sku="Standard_LRS", capacity_bytes=1)
    assert exc.value.code == "ResourceAlreadyExists"
    with pytest.raises(VmvaultError) as exc:
        s.create_account("Bad_Name", location="x", sku="Standard_LRS", capacity_bytes=1)
    assert exc.value.code == "InvalidArgumentValue"
    assert s.set_account_status("acct2", False).status == "offline"
    with pytest.raises(VmvaultError) as exc:
        s.require_online("acct2")
    assert exc.value.code == "UserErrorStorageAccountNotOnline"
    s.set_account_status("acct2", True)
    s.require_online("acct2")
    assert (tmp_path / "acct2" / "account.json").stat().st_mode & 0o077 == 0
    s.delete_account("acct2")
    s.delete_account("acct2")  # idempotent
    with pytest.raises(VmvaultError) as exc:
        s.get_account("acct2")
    assert exc.value.code == "ResourceNotFound" and exc.value.fields["kind"] == "storage account"


def test_containers(store: DiskStore) -> None:
    with pytest.raises(VmvaultError) as exc:
        store.create_container(A, C)
    assert exc.value.code == "ResourceAlreadyExists"
    assert store.create_container(A, C, exist_ok=True).name == C
    store.create_container(A, "other", metadata={"k": "v"})
    assert [c.name for c in store.list_containers(A)] == [C, "other"]
    assert store.get_container(A, "other").metadata == {"k": "v"}
    store.create_page_blob(A, "other", "x", 512)
    store.delete_container(A, "other")
    with pytest.raises(VmvaultError) as exc:
        store.get_properties(A, "other", "x")
    assert exc.value.fields["kind"] == "container"
    for bad in ("ab", "Upper", "a--b", "-ab", "a" * 64):
        with pytest.raises(VmvaultError):
            store.create_container(A, bad)


# --- page blobs -------------------------------------------------------------------------


def test_page_blob_basics(store: DiskStore) -> None:
    props = store.create_page_blob(A, C, "vm1/os.vhd", 4 * MiB, {"role": "os"})
    assert (props.size, props.blob_type, props.metadata) == (4 * MiB, "PageBlob", {"role": "os"})
    assert re.fullmatch(r'"0x[0-9A-F]{15}"', props.etag)
    path = store.blob_path(A, C, "vm1/os.vhd")
    assert path.stat().st_size == 4 * MiB and path.stat().st_blocks == 0  # sparse
    assert path.name == "vm1%2Fos.vhd"
    p2 = store.write_pages(A, C, "vm1/os.vhd", 1 * MiB, b"x" * 8192)
    assert p2.etag != props.etag and p2.created == props.created
    assert store.read(A, C, "vm1/os.vhd", 1 * MiB - 512, 1024) == bytes(512) + b"x" * 512
    assert store.data_ranges(A, C, "vm1/os.vhd") == [(1 * MiB, 8192)]
    store.clear_pages(A, C, "vm1/os.vhd", 1 * MiB, 4096)
    assert store.read(A, C, "vm1/os.vhd", 1 * MiB, 8192) == bytes(4096) + b"x" * 4096
    assert store.data_ranges(A, C, "vm1/os.vhd") == [(1 * MiB + 4096, 4096)]
    # The control plane's fast path: writing the file directly changes the ETag too.
    before = store.get_properties(A, C, "vm1/os.vhd").etag
    with open(path, "r+b") as f:
        f.seek(0)
        f.write(b"direct")
    assert store.get_properties(A, C, "vm1/os.vhd").etag != before
    with pytest.raises(VmvaultError) as exc:
        store.write_pages(A, C, "vm1/os.vhd", 100, b"x" * 512)
    assert exc.value.code == "InvalidPageRange"
    with pytest.raises(VmvaultError) as exc:
        store.write_pages(A, C, "vm1/os.vhd", 4 * MiB, b"x" * 512)
    assert exc.value.code == "InvalidPageRange"
    with pytest.raises(VmvaultError) as exc:
        store.create_page_blob(A, C, "odd", 1000)
    assert exc.value.code == "InvalidArgumentValue"


def test_metadata_properties_resize(store: DiskStore) -> None:
    store.create_page_blob(A, C, "d", MiB)
    store.write_pages(A, C, "d", MiB - 512, b"z" * 512)
    p = store.set_metadata(A, C, "d", {"a": "1"})
    assert p.metadata == {"a": "1"}
    p = store.set_properties(A, C, "d", content={"content_type": "application/x-vhd"})
    assert p.content_type == "application/x-vhd" and p.metadata == {"a": "1"}
    p = store.resize(A, C, "d", 2 * MiB)
    assert p.size == 2 * MiB and p.content_type == "application/x-vhd"
    assert store.read(A, C, "d", MiB - 512, 1024) == b"z" * 512 + bytes(512)
    assert store.resize(A, C, "d", 512).size == 512
    with pytest.raises(VmvaultError):
        store.resize(A, C, "d", 1000)
    p = store.set_properties(A, C, "d", sequence_number_action="update", sequence_number=7)
    assert p.sequence_number == 7
    assert store.set_properties(A, C, "d", sequence_number_action="increment").sequence_number == 8


def test_block_blobs(store: DiskStore) -> None:
    p = store.put_block_blob(A, C, "notes/a.txt", b"hello", content_type="text/plain",
                             metadata={"m": "1"})
    assert (p.blob_type, p.size, p.content_type) == ("BlockBlob", 5, "text/plain")
    assert p.content_md5 == base64.b64encode(hashlib.md5(b"hello").digest()).decode()
    assert store.read(A, C, "notes/a.txt") == b"hello"
    with pytest.raises(VmvaultError) as exc:
        store.write_pages(A, C, "notes/a.txt", 0, b"x" * 512)
    assert exc.value.code == "InvalidBlobType"
    with pytest.raises(VmvaultError) as exc:
        store.put_block_blob(A, C, "notes/a.txt", b"x", overwrite=False)
    assert exc.value.code == "ResourceAlreadyExists"
    b1, b2 = base64.b64encode(b"one").decode(), base64.b64encode(b"two").decode()
    store.stage_block(A, C, "blocks", b1, b"AAA")
    store.stage_block(A, C, "blocks", b2, [b"BB", b"B"])
    p = store.commit_block_list(A, C, "blocks", [("Latest", b2), ("Latest", b1)])
    assert store.read(A, C, "blocks") == b"BBBAAA"
    store.stage_block(A, C, "blocks", b1, b"CC")
    store.commit_block_list(A, C, "blocks", [("Committed", b2), ("Uncommitted", b1)])
    assert store.read(A, C, "blocks") == b"BBBCC"
    committed, uncommitted = store.get_block_list(A, C, "blocks")
    assert [(b.block_id, b.size) for b in committed] == [(b2, 3), (b1, 2)] and not uncommitted
    with pytest.raises(VmvaultError) as exc:
        store.commit_block_list(A, C, "blocks", [("Uncommitted", b2)])
    assert exc.value.code == "InvalidBlockList"


def test_blob_names(store: DiskStore) -> None:
    names = ["a/b/c", ".hidden", "..", "spaces and ünïcödé", "x" * 1024, "%2F", "a%2Fb"]
    for i, name in enumerate(names):
        store.put_block_blob(A, C, name, bytes([i]))
    assert len({blob_key(n) for n in names}) == len(names)
    assert all(len(blob_key(n).encode()) <= 255 for n in names)
    assert sorted(p.name for p in store.list_blobs(A, C)) == sorted(names)
    for i, name in enumerate(names):
        assert store.read(A, C, name) == bytes([i])
    assert [p.name for p in store.list_blobs(A, C, prefix="a")] == ["a%2Fb", "a/b/c"]


# --- snapshots --------------------------------------------------------------------------


def test_snapshots(store: DiskStore) -> None:
    store.create_page_blob(A, C, "d", MiB, {"v": "0"})
    store.write_pages(A, C, "d", 0, b"1" * 4096)
    base = store.get_properties(A, C, "d")
    s1 = store.snapshot_blob(A, C, "d")
    s2 = store.snapshot_blob(A, C, "d", metadata={"tag": "two"})
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z", s1) and s1 < s2
    assert store.list_snapshots(A, C, "d") == [s1, s2]
    store.write_pages(A, C, "d", 0, b"2" * 4096)
    store.set_metadata(A, C, "d", {"v": "1"})
    p1 = store.get_properties(A, C, "d", s1)
    assert (p1.metadata, p1.etag, p1.snapshot) == ({"v": "0"}, base.etag, s1)
    assert store.get_properties(A, C, "d", s2).metadata == {"tag": "two"}
    assert store.read(A, C, "d", 0, 4096, snapshot=s1) == b"1" * 4096
    assert store.read(A, C, "d", 0, 4096) == b"2" * 4096
    assert store.blob_path(A, C, "d", s1).read_bytes()[:4096] == b"1" * 4096
    assert store.blob_path(A, C, "d", s1).stat().st_size == MiB
    listed = [(p.name, p.snapshot) for p in store.list_blobs(A, C, include_snapshots=True)]
    assert listed == [("d", s1), ("d", s2), ("d", None)]
    # Many snapshots in a row: ids stay unique.
    many = [store.snapshot_blob(A, C, "d") for _ in range(20)]
    assert len(set(many)) == 20
    with pytest.raises(VmvaultError) as exc:
        store.get_properties(A, C, "d", "2001-01-01T00:00:00.0000000Z")
    assert exc.value.fields["kind"] == "snapshot"


def test_delete_with_snapshots(store: DiskStore) -> None:
    store.create_page_blob(A, C, "d", MiB)
    s1 = store.snapshot_blob(A, C, "d")
    s2 = store.snapshot_blob(A, C, "d")
    with pytest.raises(VmvaultError) as exc:
        store.delete_blob(A, C, "d")
    assert exc.value.code == "SnapshotsPresent" and exc.value.http_status == 409
    with pytest.raises(VmvaultError):
        store.delete_blob(A, C, "d", snapshot=s1, delete_snapshots="include")
    store.delete_blob(A, C, "d", snapshot=s1)
    assert store.list_snapshots(A, C, "d") == [s2]
    store.delete_blob(A, C, "d", delete_snapshots="only")
    assert store.list_snapshots(A, C, "d") == [] and store.exists(A, C, "d")
    store.snapshot_blob(A, C, "d")
    store.delete_blob(A, C, "d", delete_snapshots="include")
    assert not store.exists(A, C, "d")
    assert store.list_blobs(A, C, include_snapshots=True) == []
    with pytest.raises(VmvaultError) as exc:
        store.delete_blob(A, C, "d")
    assert exc.value.code == "ResourceNotFound"


def test_used_bytes(store: DiskStore) -> None:
    store.create_page_blob(A, C, "d", 8 * MiB)
    store.write_pages(A, C, "d", 0, os.urandom(4 * MiB))
    used = store.used_bytes(A)
    assert 4 * MiB <= used < 5 * MiB
    store.snapshot_blob(A, C, "d")
    after = store.used_bytes(A)
    if store.reflink:
        assert after - used < 256 * 1024  # the snapshot shares every block
    else:
        assert after - used >= 4 * MiB  # a full (sparse) copy
    store.write_pages(A, C, "d", 4 * MiB, os.urandom(MiB))  # a new region
    grown = store.used_bytes(A)
    assert MiB <= grown - after < MiB + 512 * 1024
    if store.reflink:  # overwriting shared blocks: copy-on-write takes new room
        store.write_pages(A, C, "d", 0, os.urandom(MiB))
        assert MiB <= store.used_bytes(A) - grown < MiB + 512 * 1024


# --- page ranges and diffs --------------------------------------------------------------


def test_page_ranges_and_clears(store: DiskStore) -> None:
    store.create_page_blob(A, C, "d", 4 * MiB)
    store.write_pages(A, C, "d", 0, b"a" * 8192)
    store.write_pages(A, C, "d", 2 * MiB, b"b" * 8192)
    pages, clears = store.page_ranges(A, C, "d")
    assert (pages, clears) == ([(0, 8192), (2 * MiB, 2 * MiB + 8192)], [])
    s1 = store.snapshot_blob(A, C, "d")
    store.clear_pages(A, C, "d", 2 * MiB, 8192)
    store.write_pages(A, C, "d", 3 * MiB, b"c" * 4096)
    pages, clears = store.page_ranges(A, C, "d", prev_snapshot=s1)
    assert pages == [(3 * MiB, 3 * MiB + 4096)]
    assert clears == [(2 * MiB, 2 * MiB + 8192)]
    assert store.changed_ranges(A, C, "d", None, s1) == [(2 * MiB, 8192), (3 * MiB, 4096)]
    s2 = store.snapshot_blob(A, C, "d")
    assert store.changed_ranges(A, C, "d", s2, s1) == [(2 * MiB, 8192), (3 * MiB, 4096)]
    assert store.changed_ranges(A, C, "d", None, s2) == []
    # A range limits the answer.
    pages, clears = store.page_ranges(A, C, "d", prev_snapshot=s1, offset=3 * MiB, length=512)
    assert (pages, clears) == ([(3 * MiB, 3 * MiB + 512)], [])
    # Growing the blob adds no changed range; shrinking clips.
    store.resize(A, C, "d", 8 * MiB)
    assert store.changed_ranges(A, C, "d", None, s2) == []
    store.resize(A, C, "d", 2 * MiB + 4096)
    assert store.changed_ranges(A, C, "d", None, s1) == [(2 * MiB, 4096)]


def _apply_ops(store: DiskStore, blob: str, size: int, ops: list[tuple[str, int, int]],
               seed: int) -> list[tuple[int, int]]:
    rnd = random.Random(seed)
    touched = []
    for kind, page, npages in ops:
        offset = (page * 512) % size
        length = min(npages * 512, size - offset)
        if kind == "write":
            store.write_pages(A, C, blob, offset, rnd.randbytes(length))
        elif kind == "clear":
            store.clear_pages(A, C, blob, offset, length)
        else:  # preallocate: unwritten extents, which read as zeros
            fd = os.open(store.blob_path(A, C, blob), os.O_RDWR)
            try:
                os.posix_fallocate(fd, offset, length)
            finally:
                os.close(fd)
        touched.append((offset, offset + length))
    return touched


def _check_diff(store: DiskStore, blob: str, prev: str, snap: str | None,
                touched: list[tuple[int, int]]) -> None:
    old = store.blob_path(A, C, blob, prev).read_bytes()
    new = store.blob_path(A, C, blob, snap).read_bytes()
    changed = store.changed_ranges(A, C, blob, snap, prev)
    covered = bytearray(len(new))
    for o, n in changed:
        assert o % 512 == 0 and n % 512 == 0 and n > 0
        covered[o : o + n] = b"\x01" * n
    for i in range(0, len(new), 512):  # superset: every differing page is covered
        if old[i : i + 512] != new[i : i + 512]:
            assert covered[i], f"page at {i} differs but is not in changed_ranges"
    # ... and small: within what the operations touched, rounded out to 4 KiB blocks.
    bound = sum(e - s for s, e in ext.merge_ranges(ext.align_out(s, e, 4096)
                                                   for s, e in touched))
    assert sum(n for _, n in changed) <= bound
    # Page ranges + clear ranges rebuild the new version from the old one.
    pages, clears = store.page_ranges(A, C, blob, snapshot=snap, prev_snapshot=prev)
    rebuilt = bytearray(old[: len(new)].ljust(len(new), b"\0"))
    for s, e in pages:
        rebuilt[s:e] = new[s:e]
    for s, e in clears:
        assert new[s:e] == bytes(e - s), "a clear range holds data"
        rebuilt[s:e] = bytes(e - s)
    assert bytes(rebuilt) == new


ops_strategy = st.lists(
    st.tuples(st.sampled_from(["write", "write", "clear", "prealloc"]), st.integers(0, 8191),
              st.integers(1, 64)),
    min_size=1, max_size=12)


@pytest.mark.parametrize("kind", ["reflink", "copy"])
def test_changed_ranges_property(kind: str, request: pytest.FixtureRequest,
                                 tmp_path: Path) -> None:
    root = (fresh_folder(request.getfixturevalue("xfs_dir"), "prop") if kind == "reflink"
            else tmp_path / "prop")
    s = make_store(root, kind == "reflink")
    s.create_account(A, location="westeurope", sku="Standard_LRS", capacity_bytes=1 << 40)
    s.create_container(A, C)
    counter = iter(range(10**6))

    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(before=ops_strategy, after=ops_strategy, seed=st.integers(0, 2**32),
           size_pages=st.integers(1, 8192), second=st.booleans())
    def check(before: list[tuple[str, int, int]], after: list[tuple[str, int, int]],
              seed: int, size_pages: int, second: bool) -> None:
        blob = f"b{next(counter)}"
        size = size_pages * 512
        s.create_page_blob(A, C, blob, size)
        _apply_ops(s, blob, size, before, seed)
        prev = s.snapshot_blob(A, C, blob)
        touched = _apply_ops(s, blob, size, after, seed + 1)
        _check_diff(s, blob, prev, None, touched)
        if second:  # between two snapshots, with more writes on the base afterwards
            snap = s.snapshot_blob(A, C, blob)
            _apply_ops(s, blob, size, before, seed + 2)
            _check_diff(s, blob, prev, snap, touched)
        s.delete_blob(A, C, blob, delete_snapshots="include")

    check()


def test_changed_ranges_4gib_fast(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
                                  ) -> None:
    """4 GiB disk, 640 random 64 KiB writes after a snapshot: answered from the extent maps
    alone (no data read), quickly, and close to what was written."""
    s = make_store(fresh_folder(request.getfixturevalue("xfs_dir"), "big"), True)
    s.create_account(A, location="westeurope", sku="Standard_LRS", capacity_bytes=1 << 40)
    s.create_container(A, C)
    size = 4 * 1024**3
    s.create_page_blob(A, C, "big.vhd", size)
    rnd = random.Random(7)
    chunk = rnd.randbytes(64 * 1024)
    fd = os.open(s.blob_path(A, C, "big.vhd"), os.O_WRONLY)
    try:
        for _ in range(640):  # some data before the snapshot, too
            os.pwrite(fd, chunk, rnd.randrange(size // 65536) * 65536)
        snap = s.snapshot_blob(A, C, "big.vhd")
        written = []
        for _ in range(640):
            offset = rnd.randrange(size // 65536) * 65536
            os.pwrite(fd, rnd.randbytes(64 * 1024), offset)
            written.append((offset, offset + 65536))
    finally:
        os.close(fd)

    def no_reads(*args: object) -> bytes:
        raise AssertionError("changed_ranges read data")

    monkeypatch.setattr(os, "pread", no_reads)
    monkeypatch.setattr(os, "read", no_reads)
    t0 = time.perf_counter()
    changed = s.changed_ranges(A, C, "big.vhd", None, snap)
    elapsed = time.perf_counter() - t0
    monkeypatch.undo()
    expected = ext.merge_ranges(written)
    assert [(o, o + n) for o, n in changed] == expected
    print(f"changed_ranges 4 GiB / 640 x 64 KiB: {elapsed * 1000:.1f} ms, "
          f"{len(changed)} ranges")
    assert elapsed < 2.0


def test_diff_extent_maps_splits() -> None:
    """Extents split differently in two files still compare by physical address."""
    old = [(0, 8192, 100_000), (8192, 16384, 200_000)]
    new = [(0, 4096, 100_000), (4096, 8192, 104_096), (8192, 12288, 999_000),
           (12288, 16384, 204_096)]
    pieces = list(ext.diff_extent_maps(old, new, 20480))
    assert [(a, b) for a, b, _, _ in pieces] == [(8192, 12288)]
    hole_now = list(ext.diff_extent_maps(old, [(0, 8192, 100_000)], 16384))
    assert hole_now == [(8192, 16384, True, False)]
    opaque = list(ext.diff_extent_maps([(0, 4096, None)], [(0, 4096, None)], 4096))
    assert opaque == [(0, 4096, True, True)]
