"""The lab guest runtime: a VM's disks as loop devices mounted on this machine.

A lab VM has no kernel of its own: its disks (page blobs in the disk store) are
attached to loop devices and mounted under ``$VMVAULT_HOME/vms/<rg>/<vm>/``
while the VM runs. Without root nothing is mounted; the disks still get their
file systems (mkfs works on a plain file) and backups are crash-consistent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
from pathlib import Path

from vmvault.config import is_root
from vmvault.errors import INTERNAL_ERROR, VmvaultError, invalid

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
FS_TYPES = ("ext4", "xfs")
XFS_MIN_BYTES = 300 * 1024 * 1024  # mkfs.xfs refuses smaller file systems


def _run(args: list[str], what: str) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)
    except FileNotFoundError as exc:
        raise VmvaultError(
            INTERNAL_ERROR, reason=f"{what}: '{args[0]}' is not installed (run 'make setup')"
        ) from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise VmvaultError(
            INTERNAL_ERROR, reason=f"{what} failed: {detail[-1] if detail else proc.returncode}"
        )
    return proc.stdout.strip()


def make_filesystem(image: Path, fs_type: str, label: str) -> None:
    """Put a fresh file system on a disk image (no root needed: mkfs works on a file)."""
    if fs_type not in FS_TYPES:
        raise invalid("file system type", f"'{fs_type}' is not one of {', '.join(FS_TYPES)}")
    if fs_type == "xfs":
        if image.stat().st_size < XFS_MIN_BYTES:
            raise invalid("file system type", "xfs needs a disk of at least 300 MiB; use ext4")
        _run(["mkfs.xfs", "-q", "-f", "-L", label[:12], str(image)], "mkfs.xfs")
    else:
        _run(["mkfs.ext4", "-q", "-F", "-L", label[:16], "-E", "nodiscard", str(image)],
             "mkfs.ext4")


def attach(image: Path, direct_io: bool = True) -> str:
    """Attach an image to a free loop device; return the device path. With direct I/O (where
    the pool allows it) the guest's writes do not pile up as dirty pages of the image file,
    which a disk snapshot (FICLONE) would otherwise flush inside the freeze window."""
    if direct_io:
        try:
            return _run(["losetup", "--direct-io=on", "--find", "--show", str(image)],
                        "losetup")
        except VmvaultError:
            pass
    return _run(["losetup", "--find", "--show", str(image)], "losetup")


def detach(device: str) -> None:
    subprocess.run(["losetup", "-d", device], capture_output=True, check=False)


def is_mounted(mount_point: Path) -> bool:
    return os.path.ismount(mount_point)


def mount(device: str, mount_point: Path) -> None:
    mount_point.mkdir(parents=True, exist_ok=True)
    _run(["mount", device, str(mount_point)], f"mount {device}")


def unmount(mount_point: Path) -> None:
    if is_mounted(mount_point):
        _run(["umount", str(mount_point)], f"umount {mount_point}")


def start_disk(image: Path, mount_point: Path) -> str | None:
    """Attach and mount one disk; returns the loop device, or None without root."""
    if not is_root():
        return None
    device = attach(image)
    try:
        mount(device, mount_point)
    except VmvaultError:
        # A direct-I/O loop device takes the pool's sector size (4096 on some pools); a file
        # system made with 512-byte sectors then does not mount: attach it without direct I/O.
        detach(device)
        device = attach(image, direct_io=False)
        try:
            mount(device, mount_point)
        except VmvaultError:
            detach(device)
            raise
    return device


def stop_disk(mount_point: Path | None, device: str | None) -> None:
    """Unmount and detach one disk; safe to call on a disk that is not mounted."""
    if mount_point is not None:
        unmount(mount_point)
    if device:
        detach(device)


def sync_filesystem(mount_point: Path) -> None:
    """Flush a mounted file system to its disk (syncfs), so a crash-consistent snapshot
    holds everything written before it."""
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)
