"""The pool: the folder that holds the disk store, on a file system with reflink if we can.

Snapshots of page blobs (VM disks) are reflinked copies: instant, and sharing
blocks with the base blob. That needs XFS (reflink=1) or btrfs. ``ensure_pool``
picks, in order:

1. ``paths.pool`` itself, when its file system can reflink (FICLONE works there);
2. when root: an XFS image ``paths.pool_image`` (sparse file, ``mkfs.xfs -m reflink=1``),
   loop-mounted on ``paths.pool`` (reused when already mounted there);
3. the plain folder, with a warning: snapshots become full (sparse) copies.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vmvault import config
from vmvault.config import Paths
from vmvault.storage.extents import reflink, reflink_unsupported

NO_REFLINK_WARNING = (
    "snapshots are full copies on this file system (slow, use space); run as root or put "
    "VMVAULT_HOME on XFS/btrfs for instant snapshots"
)


@dataclass
class PoolInfo:
    path: Path
    fs_type: str
    reflink: bool
    image: Path | None
    warning: str | None

    def to_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "fs_type": self.fs_type,
            "reflink": self.reflink,
            "image": str(self.image) if self.image else None,
            "warning": self.warning,
        }


def probe_reflink(directory: Path) -> bool:
    """True when FICLONE works between two files in directory."""
    try:
        src_fd, src_name = tempfile.mkstemp(prefix=".reflink-probe-", dir=directory)
    except OSError:
        return False
    dst_fd = -1
    dst_name = src_name + ".clone"
    try:
        os.write(src_fd, b"\xa5" * 4096)
        dst_fd = os.open(dst_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        reflink(src_fd, dst_fd)
        return True
    except OSError as exc:
        if reflink_unsupported(exc):
            return False
        raise
    finally:
        os.close(src_fd)
        if dst_fd >= 0:
            os.close(dst_fd)
        for name in (src_name, dst_name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)


@dataclass(frozen=True)
class MountEntry:
    source: str
    target: Path
    fs_type: str


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[MountEntry]:
    """The mount table, from /proc/self/mountinfo (later mounts last)."""
    entries: list[MountEntry] = []
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return entries
    for line in text.splitlines():
        parts = line.split()
        if "-" not in parts:
            continue
        sep = parts.index("-")
        if len(parts) < sep + 3 or len(parts) < 5:
            continue
        entries.append(MountEntry(_unescape(parts[sep + 2]), Path(_unescape(parts[4])),
                                  parts[sep + 1]))
    return entries


def mount_of(path: Path) -> MountEntry | None:
    """The mount that holds path (the last-mounted one with the longest matching target)."""
    path = path.resolve()
    best: MountEntry | None = None
    for entry in mounts():
        target = entry.target
        inside = path == target or target in path.parents
        if inside and (best is None or len(str(target)) >= len(str(best.target))):
            best = entry
    return best


def _mounted_on(path: Path) -> MountEntry | None:
    path = path.resolve()
    found = None
    for entry in mounts():
        if entry.target == path:
            found = entry
    return found


def _loop_backing_file(device: str) -> Path | None:
    name = os.path.basename(device)
    if not name.startswith("loop"):
        return None
    try:
        text = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return None
    return Path(text.removesuffix(" (deleted)"))


def _is_our_mount(entry: MountEntry | None, image: Path) -> bool:
    if entry is None:
        return False
    backing = _loop_backing_file(entry.source)
    if backing is None:
        return False
    try:
        return backing.resolve() == image.resolve()
    except OSError:
        return False


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")


def _has_filesystem(image: Path) -> bool:
    """True when image holds a file system signature we must not overwrite."""
    blkid = shutil.which("blkid")
    if blkid:
        proc = subprocess.run([blkid, "-p", "-o", "value", "-s", "TYPE", str(image)],
                              capture_output=True, text=True)
        if proc.returncode == 0 and proc.stdout.strip():
            return True
        if proc.returncode == 2:  # nothing found
            return False
    with open(image, "rb") as f:  # XFS superblock magic at offset 0
        return f.read(4) == b"XFSB"


def _make_image(image: Path, size_gb: int) -> None:
    image.parent.mkdir(parents=True, exist_ok=True)
    if not image.exists() or image.stat().st_size == 0:
        with open(image, "wb") as f:
            f.truncate(size_gb * 1024**3)  # sparse: takes no room until written
    if not _has_filesystem(image):
        _run("mkfs.xfs", "-q", "-m", "reflink=1", str(image))


def _mount_image(image: Path, pool: Path) -> None:
    """Loop-mount the pool image, on a direct-I/O loop device where that mounts: the pool's
    writes then do not pile up as dirty pages of the image file, which an XFS log force (a
    disk snapshot, FICLONE) would otherwise have to write out, inside a guest's freeze."""
    proc = subprocess.run(["losetup", "--direct-io=on", "--find", "--show", str(image)],
                          capture_output=True, text=True)
    device = proc.stdout.strip()
    if proc.returncode == 0 and device:
        if subprocess.run(["mount", "-o", "discard", device, str(pool)],
                          capture_output=True).returncode == 0:
            return
        subprocess.run(["losetup", "-d", device], capture_output=True)
    _run("mount", "-o", "loop,discard", str(image), str(pool))


def _fs_type(path: Path) -> str:
    entry = mount_of(path)
    return entry.fs_type if entry else "unknown"


def ensure_pool(paths: Paths, image_size_gb: int = 256) -> PoolInfo:
    """Make paths.pool ready and say what it is. Idempotent."""
    pool = paths.pool
    pool.mkdir(parents=True, exist_ok=True)
    image = paths.pool_image
    ours = _is_our_mount(_mounted_on(pool), image)
    if probe_reflink(pool):
        return PoolInfo(pool, _fs_type(pool), True, image if ours else None, None)
    if config.is_root() and not ours:
        if any(pool.iterdir()):
            # Mounting would hide what is already stored there: keep the folder.
            return PoolInfo(pool, _fs_type(pool), False, None,
                            NO_REFLINK_WARNING + f" ({pool} is not empty, so no XFS image "
                            "was mounted over it)")
        _make_image(image, image_size_gb)
        _mount_image(image, pool)
        if probe_reflink(pool):
            return PoolInfo(pool, _fs_type(pool), True, image, None)
        warning = NO_REFLINK_WARNING + " (the XFS image does not reflink)"
        return PoolInfo(pool, _fs_type(pool), False, image, warning)
    return PoolInfo(pool, _fs_type(pool), False, image if ours else None, NO_REFLINK_WARNING)


def release_pool(paths: Paths) -> None:
    """Unmount the XFS image from paths.pool if we mounted it there; else do nothing."""
    entry = _mounted_on(paths.pool)
    if not _is_our_mount(entry, paths.pool_image):
        return
    proc = subprocess.run(["umount", str(paths.pool)], capture_output=True, text=True)
    if proc.returncode != 0:
        # Busy (an open file, a lab VM's loop mount): detach lazily, it goes when freed.
        _run("umount", "-l", str(paths.pool))
    if entry is not None and entry.source.startswith("/dev/loop"):
        # A device attached by losetup is not freed by umount; 'losetup -d' frees it now, or
        # (busy) as soon as it is released.
        subprocess.run(["losetup", "-d", entry.source], capture_output=True)
