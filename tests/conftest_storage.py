"""Fixtures shared by the storage tests (imported by tests/test_storage*.py, test_blob*.py).

* ``xfs_dir``: a folder on a fresh XFS file system with reflink=1 (a sparse image,
  loop-mounted). Needs root: skipped when not root, unless CI is set (then it fails).
* ``copy_dir``: a folder where the store works without reflink (snapshots are copies).
* ``blob_server``: the Blob endpoint, a real uvicorn server on 127.0.0.1 in a thread.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmvault.storage.diskstore import AccountInfo, DiskStore

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
IS_ROOT = os.geteuid() == 0


def need_root() -> None:
    """Skip when not root, except in CI, where everything must run."""
    if IS_ROOT:
        return
    if IN_CI:
        pytest.fail("CI runs the storage tests as root (loop devices, mounts)")
    pytest.skip("needs root (loop device, mount)")


def _umount(target: Path) -> None:
    if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture(scope="session")
def xfs_dir() -> Iterator[Path]:
    need_root()
    base = Path(tempfile.mkdtemp(prefix="vmvault-xfs-"))
    image, mnt = base / "xfs.img", base / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(2 * 1024**3)
    mounted = False
    try:
        subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
        mounted = True
        yield mnt
    finally:
        if mounted:
            _umount(mnt)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def copy_dir(tmp_path: Path) -> Path:
    return tmp_path


def make_store(root: Path, reflink: bool) -> DiskStore:
    store = DiskStore(root)
    if not reflink:
        store.reflink = False  # where the folder could reflink: force the copy path
    assert store.reflink == reflink
    return store


def fresh_folder(parent: Path, name: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class BlobServer:
    url: str  # http://127.0.0.1:PORT
    store: DiskStore
    account: AccountInfo

    @property
    def account_url(self) -> str:
        return f"{self.url}/{self.account.name}"

    @property
    def credential(self) -> dict[str, str]:
        return {"account_name": self.account.name, "account_key": self.account.key1}


@pytest.fixture(scope="module")
def blob_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlobServer]:
    import uvicorn

    from vmvault.storage.blob_endpoint import create_app

    root = tmp_path_factory.mktemp("blobstore")
    store = DiskStore(root)
    account = store.create_account("vmvaulttest", location="westeurope", sku="Standard_LRS",
                                   capacity_bytes=1 << 40)
    port = free_port()
    config = uvicorn.Config(create_app(store), host="127.0.0.1", port=port,
                            log_level="warning", access_log=False, server_header=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="blob-endpoint", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the Blob endpoint did not start")
        time.sleep(0.01)
    try:
        yield BlobServer(f"http://127.0.0.1:{port}", store, account)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
