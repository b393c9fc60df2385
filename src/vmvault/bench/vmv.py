"""The benchmark's bridge to vmvault itself: the reflink pool, the disk store that
holds the image as a page blob, and vmvault's backups (run through
``python -m vmvault.bench.worker`` so they are measured like the peers).

Each piece is looked up separately: when one is missing or broken the
benchmark still measures the peers, on a plain folder, and says why vmvault was
not measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmvault.bench.measure import RunResult, run_measured, tree_size
from vmvault.bench.peers import PASSWORD

ACCOUNT = "benchacct"
CONTAINER = "disks"


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip().splitlines()[0][:200]


def vault_problem() -> str | None:
    """None when vmvault.vault can be used, else why not."""
    try:
        from vmvault.vault import DiskSource, Repository  # noqa: F401
    except Exception as e:
        return f"vmvault.vault not usable yet ({_why(e)})"
    return None


def store_problem() -> str | None:
    try:
        from vmvault.storage.diskstore import DiskStore  # noqa: F401
    except Exception as e:
        return f"vmvault.storage.diskstore not usable yet ({_why(e)})"
    return None


def pool_problem() -> str | None:
    try:
        from vmvault.storage.pool import ensure_pool, release_pool  # noqa: F401
    except Exception as e:
        return f"vmvault.storage.pool not usable yet ({_why(e)})"
    return None


@dataclass
class Pool:
    """Where everything of a run lives: vmvault's pool, or a plain folder."""

    base: Path  # folder for repos, restores, caches
    store_root: Path | None  # the DiskStore's root, when there is a store
    fs: str
    note: str
    _paths: Any = None

    def release(self) -> str | None:
        if self._paths is None:
            return None
        try:
            from vmvault.storage.pool import release_pool

            release_pool(self._paths)
        except Exception as e:
            return f"release_pool failed: {_why(e)}"
        finally:
            self._paths = None
        return None


def fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path`` (from /proc/self/mounts)."""
    best, kind = "", "unknown"
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                    best
                ):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def open_pool(workdir: Path) -> Pool:
    """Make vmvault's pool under ``workdir/home`` (XFS with reflinks when root on ext4)."""
    problem = pool_problem()
    if problem is None:
        from vmvault.config import Paths
        from vmvault.storage.pool import ensure_pool

        paths = Paths(workdir / "home")
        paths.ensure()
        try:
            info = ensure_pool(paths)
        except Exception as e:
            problem = f"ensure_pool failed ({_why(e)})"
        else:
            pool_path = Path(getattr(info, "path", paths.pool))
            base = pool_path / "bench"
            base.mkdir(parents=True, exist_ok=True)
            kind = getattr(info, "fs_type", None) or fs_type(pool_path)
            reflink = getattr(info, "reflink", None)
            image = getattr(info, "image", None)
            fs = f"{kind}" + (" with reflinks" if reflink else " without reflinks")
            if image:
                fs += f", loop-mounted image on {fs_type(Path(image).parent)}"
            warning = getattr(info, "warning", None)
            note = f"vmvault pool at {pool_path}" + (f" (warning: {warning})" if warning else "")
            store_root = pool_path if store_problem() is None else None
            return Pool(base, store_root, fs, note, paths)
    base = workdir / "data"
    base.mkdir(parents=True, exist_ok=True)
    return Pool(base, None, fs_type(base), f"plain folder: {problem}")


class Image:
    """The disk image: a page blob in vmvault's disk store, or a plain file."""

    def __init__(self, pool: Pool, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self.store: Any = None
        if pool.store_root is not None:
            from vmvault.storage.diskstore import DiskStore

            self.store = DiskStore(pool.store_root)
            _ensure_account(self.store)
            self.store.create_page_blob(ACCOUNT, CONTAINER, name, size)
            self.path = Path(self.store.blob_path(ACCOUNT, CONTAINER, name))
        else:
            self.path = pool.base / "images" / name
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "wb") as f:
                f.truncate(size)

    def snapshot(self) -> str:
        """Snapshot the image: the store's snapshot (a reflink), or a plain copy without one."""
        if self.store is None:
            self._copies = getattr(self, "_copies", 0) + 1
            snap = f"copy-{self._copies}"
            shutil.copyfile(self.path, self.snapshot_path(snap))
            return snap
        return str(self.store.snapshot_blob(ACCOUNT, CONTAINER, self.name))

    def snapshot_path(self, snapshot: str) -> Path:
        if self.store is None:
            return self.path.with_name(f"{self.path.name}.{snapshot}")
        return Path(self.store.blob_path(ACCOUNT, CONTAINER, self.name, snapshot=snapshot))

    def delete(self) -> None:
        """Delete the blob and its snapshots (frees the pool for the next phase)."""
        if self.store is not None:
            try:
                self.store.delete_blob(ACCOUNT, CONTAINER, self.name, delete_snapshots="include")
                return
            except Exception:
                pass
        for path in [self.path, *self.path.parent.glob(f"{self.path.name}.copy-*")]:
            with contextlib.suppress(OSError):
                path.unlink()


def _ensure_account(store: Any) -> None:
    try:
        store.get_account(ACCOUNT)
    except Exception:
        store.create_account(ACCOUNT, location="local", sku="Standard_LRS", capacity_bytes=0)
    store.create_container(ACCOUNT, CONTAINER, exist_ok=True)


class Vmvault:
    """vmvault's backups, each in a ``python -m vmvault.bench.worker`` process."""

    name = "vmvault"

    def __init__(self, home: Path, store_root: Path, chunk_size: int | None = None) -> None:
        self.home = home
        self.repo = home / "repo"
        self.store_root = store_root
        self.chunk_size = chunk_size
        self.last_info: dict[str, Any] = {}

    def _run(self, *args: str) -> RunResult:
        env = {"VMVAULT_BENCH_PASSWORD": PASSWORD, "PYTHONUNBUFFERED": "1"}
        res = run_measured([sys.executable, "-m", "vmvault.bench.worker", *args], env=env)
        res.check()
        lines = res.stdout.strip().splitlines()
        self.last_info = json.loads(lines[-1]) if lines else {}
        return res

    def init(self) -> RunResult:
        self.home.mkdir(parents=True, exist_ok=True)
        args = ["init", "--repo", str(self.repo)]
        if self.chunk_size:
            args += ["--chunk-size", str(self.chunk_size)]
        return self._run(*args)

    def backup(
        self, rp_id: str, image: Image, snapshot: str, prev_snapshot: str | None, parent: str | None
    ) -> RunResult:
        args = [
            "backup",
            "--repo",
            str(self.repo),
            "--rp-id",
            rp_id,
            "--store",
            str(self.store_root),
            "--account",
            ACCOUNT,
            "--container",
            CONTAINER,
            "--blob",
            image.name,
            "--snapshot",
            snapshot,
        ]
        if prev_snapshot:
            args += ["--prev-snapshot", prev_snapshot]
        if parent:
            args += ["--parent", parent]
        return self._run(*args)

    def restore(self, rp_id: str, target: Path) -> RunResult:
        target.parent.mkdir(parents=True, exist_ok=True)
        return self._run(
            "restore", "--repo", str(self.repo), "--rp-id", rp_id, "--target", str(target)
        )

    def size(self) -> int:
        return tree_size(self.repo)


def describe_exception(e: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(e), e)).strip()
