"""The pool: reflink probe, the XFS image loop-mounted as root, the plain-folder fallback."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest_storage import need_root, xfs_dir  # noqa: F401
from vmvault import config
from vmvault.config import Paths
from vmvault.storage import pool as pool_mod
from vmvault.storage.diskstore import DiskStore
from vmvault.storage.pool import (
    NO_REFLINK_WARNING,
    ensure_pool,
    mount_of,
    probe_reflink,
    release_pool,
)


def _mount_count(path: Path) -> int:
    return sum(1 for m in pool_mod.mounts() if m.target == path.resolve())


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[Paths]:
    home = tmp_path / "home"
    home.mkdir()
    tmpfs = False
    if probe_reflink(tmp_path) and os.geteuid() == 0:
        # The image path is only taken where the home cannot reflink: give it a tmpfs.
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(home)],
                       check=True)
        tmpfs = True
    p = Paths(home)
    p.ensure()
    try:
        yield p
    finally:  # never leave a mount or a loop device behind, even when a test fails
        for _ in range(3):
            release_pool(p)
            if _mount_count(p.pool) == 0:
                break
        if _mount_count(p.pool):
            subprocess.run(["umount", "-l", str(p.pool)], check=False)
        if tmpfs:
            subprocess.run(["umount", "-l", str(home)], check=False)


def test_probe_reflink(xfs_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    assert probe_reflink(xfs_dir) is True
    entry = mount_of(tmp_path)
    assert entry is not None
    if entry.fs_type in ("ext4", "ext3", "ext2", "tmpfs"):
        assert probe_reflink(tmp_path) is False
    assert probe_reflink(tmp_path / "missing") is False
    assert not [p for p in xfs_dir.iterdir() if p.name.startswith(".reflink-probe")]


@pytest.mark.root
def test_xfs_image_pool(paths: Paths) -> None:
    need_root()
    assert not probe_reflink(paths.root)
    info = ensure_pool(paths, image_size_gb=1)
    assert (info.reflink, info.fs_type, info.image, info.warning) == (
        True, "xfs", paths.pool_image, None)
    assert paths.pool_image.stat().st_blocks * 512 < 1024**3 // 4  # sparse image
    assert _mount_count(paths.pool) == 1
    # Idempotent: the mount is reused, not stacked.
    again = ensure_pool(paths, image_size_gb=1)
    assert again == info and _mount_count(paths.pool) == 1
    store = DiskStore(info.path)
    assert store.reflink
    store.create_account("poolacct", location="westeurope", sku="Standard_LRS",
                         capacity_bytes=1 << 30)
    store.create_container("poolacct", "cont")
    store.create_page_blob("poolacct", "cont", "d", 1 << 20)
    store.write_pages("poolacct", "cont", "d", 0, b"x" * 4096)
    release_pool(paths)
    assert _mount_count(paths.pool) == 0
    assert not (paths.pool / "poolacct").exists()
    release_pool(paths)  # not mounted: nothing to do
    # Mounting again reuses the image (no mkfs): the data is still there.
    info = ensure_pool(paths, image_size_gb=1)
    assert info.reflink and _mount_count(paths.pool) == 1
    assert DiskStore(info.path).read("poolacct", "cont", "d", 0, 4096) == b"x" * 4096


@pytest.mark.root
def test_non_empty_folder_is_not_hidden(paths: Paths) -> None:
    need_root()
    assert not probe_reflink(paths.root)
    (paths.pool / "acct").mkdir()
    info = ensure_pool(paths, image_size_gb=1)
    assert not info.reflink and info.image is None
    assert info.warning and info.warning.startswith(NO_REFLINK_WARNING)
    assert _mount_count(paths.pool) == 0


def test_fallback_without_root(paths: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "is_root", lambda: False)
    info = ensure_pool(paths)
    assert _mount_count(paths.pool) == 0 and info.image is None
    if probe_reflink(paths.root):  # a developer's home on XFS/btrfs
        assert info.reflink and info.warning is None
    else:
        assert not info.reflink and info.warning == NO_REFLINK_WARNING
        assert not paths.pool_image.exists()
    assert info.path == paths.pool and info.fs_type
    assert ensure_pool(paths) == info


@pytest.mark.root
def test_release_ignores_foreign_mounts(xfs_dir: Path, paths: Paths) -> None:  # noqa: F811
    """A pool that is some other mount (here a bind mount of an XFS folder) is used as it
    is, and release_pool does not unmount it."""
    need_root()
    source = xfs_dir / "foreign-pool"
    source.mkdir(exist_ok=True)
    subprocess.run(["mount", "--bind", str(source), str(paths.pool)], check=True)
    try:
        info = ensure_pool(paths)
        assert (info.reflink, info.image, info.fs_type) == (True, None, "xfs")
        release_pool(paths)
        assert _mount_count(paths.pool) == 1
    finally:
        subprocess.run(["umount", str(paths.pool)], check=False)
