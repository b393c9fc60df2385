"""Freeze and thaw the guest's file systems (wire spec section 5), guarded by the watchdog.

Mounts come from /proc/self/mountinfo: ext3, ext4, xfs and btrfs under the mount root, minus
vmbackup.conf ``MountsToSkip``, one per file system (a file system mounted twice is frozen
once), most recently mounted first and ``/`` last. Each is opened O_RDONLY and frozen with
FIFREEZE; the thaw (FITHAW) goes in reverse order and only touches what this run froze.
``MountsToSkip`` entries are mount points as the guest names them (under the mount root) or
as they are; skipping one skips its file system.
"""

from __future__ import annotations

import configparser
import contextlib
import datetime as dt
import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vmvault.extensions.vmsnapshot import codes
from vmvault.extensions.vmsnapshot.watchdog import Watchdog, WatchdogError

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
FREEZABLE_TYPES = ("ext3", "ext4", "xfs", "btrfs")
DEFAULT_FREEZE_BOUND = 30.0  # vmvault's default; Azure's safefreeze uses 60 s
MAX_FREEZE_BOUND = 600.0


# --- /etc/azure/vmbackup.conf ---------------------------------------------------------------


@dataclass
class VmBackupConfig:
    """The [SnapshotThread] keys the handler honours."""

    freeze_bound: float = DEFAULT_FREEZE_BOUND
    mounts_to_skip: list[str] = field(default_factory=list)
    sequential_snapshots: bool = False
    expedite_freeze: bool = True  # vmvault's key; see rcu.py
    warnings: list[str] = field(default_factory=list)


def read_vmbackup_conf(path: Path) -> VmBackupConfig:
    """Read vmbackup.conf; a missing file gives the defaults, a bad value a warning."""
    conf = VmBackupConfig()
    parser = configparser.RawConfigParser()
    try:
        parser.read(path)
    except (configparser.Error, UnicodeDecodeError) as exc:
        conf.warnings.append(f"{path} ignored: {exc}")
        return conf
    section = "SnapshotThread"
    if not parser.has_section(section):
        return conf
    timeout = parser.get(section, "timeout", fallback="").strip()
    if timeout:
        try:
            value = float(timeout)
            if not 0 < value <= MAX_FREEZE_BOUND:
                raise ValueError
            conf.freeze_bound = value
        except ValueError:
            conf.warnings.append(f"{path}: [SnapshotThread] timeout {timeout!r} is not a "
                                 f"number of seconds in (0, {MAX_FREEZE_BOUND:g}]; using "
                                 f"{conf.freeze_bound:g}")
    skip = parser.get(section, "MountsToSkip", fallback="")
    conf.mounts_to_skip = [m.strip() for m in skip.split(",") if m.strip()]
    conf.sequential_snapshots = parser.get(section, "seqsnapshot",
                                           fallback="0").strip() in ("1", "2")
    expedite = parser.get(section, "expediteFreeze", fallback="1").strip().lower()
    if expedite not in ("0", "1", "true", "false", "yes", "no"):
        conf.warnings.append(f"{path}: [SnapshotThread] expediteFreeze {expedite!r} is not "
                             "0 or 1; using 1")
    conf.expedite_freeze = expedite not in ("0", "false", "no")
    return conf


# --- mounts -------------------------------------------------------------------------------


def _fifreeze(fd: int) -> OSError | None:
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
    except OSError as exc:
        return exc
    return None


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fs_type: str
    source: str
    device: str  # major:minor


def _unescape(field_text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field_text):
        if field_text[i] == "\\" and field_text[i + 1:i + 4].isdigit():
            out.append(chr(int(field_text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field_text[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        mounts.append(Mount(_unescape(fields[4]), tail[0], _unescape(tail[1]), fields[2]))
    return mounts


def _under(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root.rstrip("/") + "/")


def _skipped(mount_point: str, root: str, skip: Iterable[str]) -> bool:
    """MountsToSkip entries name a mount point as is, or relative to the mount root (the
    path the guest sees)."""
    for entry in skip:
        entry = entry.rstrip("/") or "/"
        if mount_point == entry:
            return True
        if os.path.normpath(os.path.join(root, entry.lstrip("/"))) == mount_point:
            return True
    return False


def select_mounts(mount_root: Path, skip: Iterable[str] = (),
                  mountinfo: str | None = None) -> list[Mount]:
    """The mounts to freeze, in freeze order."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    root = os.path.realpath(mount_root)
    skip = list(skip)
    candidates = [m for m in parse_mountinfo(mountinfo)
                  if m.fs_type in FREEZABLE_TYPES and _under(m.mount_point, root)]
    # skipping a mount point skips its file system, wherever else it is mounted
    skipped = {m.device for m in candidates if _skipped(m.mount_point, root, skip)}
    chosen: dict[str, Mount] = {}
    for mount in candidates:
        if mount.device in skipped:
            continue
        chosen.pop(mount.device, None)  # one freeze per file system: its latest mount
        chosen[mount.device] = mount
    ordered = list(reversed(chosen.values()))
    return [m for m in ordered if m.mount_point != "/"] + [
        m for m in ordered if m.mount_point == "/"]


# --- freeze and thaw ------------------------------------------------------------------------


class FreezeError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _errno_text(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"{name} ({exc.strerror})"


@dataclass
class ThawReport:
    problems: list[str] = field(default_factory=list)
    not_frozen: list[str] = field(default_factory=list)  # EINVAL: someone thawed it first

    @property
    def consistent(self) -> bool:
        return not self.problems and not self.not_frozen


class Freezer:
    """Freezes a list of mounts; the watchdog is told about each mount before its freeze."""

    def __init__(self, mounts: list[Mount], watchdog: Watchdog | None,
                 log: Callable[[str], None]) -> None:
        self.mounts = mounts
        self.watchdog = watchdog
        self.log = log
        self.frozen: list[tuple[Mount, int]] = []
        self.started: float | None = None
        self.ended: float | None = None
        self.freeze_time: dt.datetime | None = None
        self.thaw_time: dt.datetime | None = None

    @property
    def window_ms(self) -> int:
        if self.started is None:
            return 0
        end = self.ended if self.ended is not None else time.monotonic()
        return round((end - self.started) * 1000)

    def freeze(self) -> None:
        """Freeze every mount; on a failure thaw what was frozen and raise FreezeError.

        The file systems are frozen together (one thread each: FIFREEZE's flush is most of the
        window, so the window is the slowest flush, not their sum); the guest's root, when it
        is among them, is frozen last, as Azure's extension does."""
        fds = self._open_all()
        try:
            rest = [i for i, m in enumerate(self.mounts) if m.mount_point != "/"]
            root = [i for i, m in enumerate(self.mounts) if m.mount_point == "/"]
            for group in (rest, root):
                if group:
                    self._freeze_group(group, fds)
        except FreezeError:
            self.thaw()
            raise
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)

    def _freeze_group(self, indexes: list[int], fds: list[int]) -> None:
        for i in indexes:
            self._arm(self.mounts[i])
        if self.started is None:
            self.started = time.monotonic()
            self.freeze_time = dt.datetime.now(dt.UTC)
        if len(indexes) == 1:
            errors = [_fifreeze(fds[indexes[0]])]
        else:
            with ThreadPoolExecutor(len(indexes), thread_name_prefix="freeze") as pool:
                errors = list(pool.map(lambda i: _fifreeze(fds[i]), indexes))
        failure: FreezeError | None = None
        for i, exc in zip(indexes, errors, strict=True):
            mount = self.mounts[i]
            if exc is None:
                self.frozen.append((mount, fds[i]))
                fds[i] = -1  # owned by self.frozen now
                self.log(f"froze {mount.mount_point} ({mount.fs_type} on {mount.source})")
                continue
            self._disarm(mount)
            if failure is None:
                hint = (" - it is frozen already (by another tool?); this run leaves it as it is"
                        if exc.errno == errno.EBUSY else "")
                failure = FreezeError(codes.FREEZE_FAILED,
                                      f"freezing {mount.mount_point} ({mount.fs_type}) failed: "
                                      f"{_errno_text(exc)}{hint}")
        if failure is not None:
            raise failure

    def _open_all(self) -> list[int]:
        fds: list[int] = []
        for mount in self.mounts:
            try:
                fds.append(os.open(mount.mount_point, os.O_RDONLY | os.O_DIRECTORY))
            except OSError as exc:
                for fd in fds:
                    os.close(fd)
                raise FreezeError(codes.UNABLE_TO_OPEN_MOUNT,
                                  f"cannot open the mount point {mount.mount_point} to freeze "
                                  f"it: {_errno_text(exc)}") from None
        return fds

    def _arm(self, mount: Mount) -> None:
        """Name the mount to the watchdog before it is frozen."""
        if self.watchdog is not None:
            try:
                self.watchdog.arm(mount.mount_point)
            except WatchdogError as exc:
                raise FreezeError(codes.FREEZE_FAILED, f"not freezing {mount.mount_point}: "
                                                       f"{exc}") from None

    def _disarm(self, mount: Mount) -> None:
        if self.watchdog is None:
            return
        with contextlib.suppress(WatchdogError):
            self.watchdog.skip(mount.mount_point)

    def thaw(self) -> ThawReport:
        """Thaw what this run froze, in reverse order."""
        report = ThawReport()
        while self.frozen:
            mount, fd = self.frozen.pop()
            try:
                fcntl.ioctl(fd, FITHAW, 0)
                self.log(f"thawed {mount.mount_point}")
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    report.not_frozen.append(mount.mount_point)
                    self.log(f"{mount.mount_point} was thawed before the handler thawed it")
                else:
                    report.problems.append(f"thawing {mount.mount_point} failed: "
                                           f"{_errno_text(exc)}")
            finally:
                os.close(fd)
        if self.started is not None and self.ended is None:
            self.ended = time.monotonic()
            self.thaw_time = dt.datetime.now(dt.UTC)
        return report
