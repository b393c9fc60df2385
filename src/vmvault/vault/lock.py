"""Repository locks: shared or exclusive, between threads and processes of one host.

Operations that read, add files or remove a manifest (backup, restore, delete_manifest,
check) take a *shared* lock; operations that delete data other operations may be using
(prune, rebuild_index) take an *exclusive* one. The protocol (docs/vault-format.md §12):

* Mutual exclusion is ``flock(2)`` on ``locks/flock``, an empty file created on first
  use and never removed: LOCK_SH for shared, LOCK_EX for exclusive. Every holder
  opens the file itself, so it has its own open file description, and two threads of
  one process conflict exactly as two processes do. The kernel drops the lock when
  the holder dies, so a crash never leaves the vault locked.
* ``locks/flock-gate`` gives a waiting exclusive locker precedence: a locker takes the
  gate (LOCK_EX for exclusive, LOCK_SH for shared) before ``locks/flock`` and lets go
  of it as soon as it has ``locks/flock``. While prune waits for running backups to
  finish, new backups queue behind it instead of starving it.
* Each holder writes ``locks/<32 hex digits>``, a JSON file (host, pid, thread,
  operation, time, exclusive), and keeps a LOCK_EX on that file until it removes it at
  release. The JSON files are for people and for error messages, not for exclusion: a
  JSON file nobody holds a flock on, or whose pid is dead on this host, is stale and
  the next locker removes it.
* Waiting polls with LOCK_NB until a timeout, then raises ``UserErrorVaultLocked``
  naming a holder.
* A thread that already holds the vault (through any Repository object on it) gets
  nested locks without waiting: a shared lock inside any lock, an exclusive lock
  inside an exclusive one. Asking for exclusive while holding shared raises
  RuntimeError (waiting would deadlock against this thread's own shared lock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from vmvault.errors import VAULT_LOCKED, VmvaultError

from .format import LOCKS_DIR, list_dir, utc_now, write_all

FLOCK_NAME = "flock"  # locks/flock: the flock(2) that excludes
GATE_NAME = "flock-gate"  # locks/flock-gate: exclusive lockers queue here first
LOCK_FILE_VERSION = 1
DEFAULT_SHARED_TIMEOUT_S = 3600.0  # a backup or restore waits this long for a prune to end
DEFAULT_EXCLUSIVE_TIMEOUT_S = 600.0  # prune waits this long for backups and restores to end
POLL_MIN_S = 0.002
POLL_MAX_S = 0.05
STALE_SCAN_S = 1.0  # while waiting, look for stale lock files this often
TMP_STALE_S = 60.0  # a half-written lock file (crash while locking) is removed after this

_LOCK_NAME = re.compile(r"[0-9a-f]{32}")
_TMP_NAME = re.compile(r"[0-9a-f]{32}\.tmp")
_NO_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM)


@dataclass(frozen=True)
class LockInfo:
    """What a lock file in locks/ says about its holder."""

    id: str  # the file name
    host: str
    pid: int
    thread: str
    operation: str
    time: str  # when the lock was taken
    exclusive: bool

    def holder(self) -> str:
        mode = "exclusive" if self.exclusive else "shared"
        return f"process {self.pid} on host {self.host}, thread {self.thread}, {mode}"

    def to_json(self) -> bytes:
        fields = asdict(self)
        del fields["id"]
        return json.dumps({"version": LOCK_FILE_VERSION, **fields}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, lock_id: str, data: bytes) -> LockInfo | None:
        """None when `data` is not a version-1 lock file."""
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict) or raw.get("version") != LOCK_FILE_VERSION:
                return None
            info = cls(lock_id, raw["host"], raw["pid"], raw["thread"], raw["operation"],
                       raw["time"], raw["exclusive"])
        except (ValueError, KeyError, TypeError):
            return None
        types_ok = all(isinstance(getattr(info, f), str)
                       for f in ("host", "thread", "operation", "time"))
        if not types_ok or not isinstance(info.pid, int) or not isinstance(info.exclusive, bool):
            return None
        return info


@dataclass
class _Hold:
    """One thread's hold on one vault; nested VaultLocks share it."""

    exclusive: bool
    pid: int  # the process that took it (a forked child must not release it)
    flock_fd: int | None  # None: a read-only vault (nobody can change it)
    info_fd: int | None
    info: LockInfo | None
    info_path: Path | None
    depth: int = 1


# (pid, thread ident, st_dev, st_ino of locks/) -> the hold
_holds: dict[tuple[int, int, int, int], _Hold] = {}
_holds_lock = threading.Lock()


class VaultLock:
    """A shared or exclusive lock on the vault at `root`; use as a context manager.

    `timeout` is how long acquire() waits (seconds; math.inf: forever) before it raises
    UserErrorVaultLocked. `operation` is recorded in the lock file for people to read.
    """

    def __init__(
        self,
        root: Path,
        *,
        exclusive: bool = False,
        operation: str = "",
        timeout: float = math.inf,
    ) -> None:
        self.root = Path(root)
        self.exclusive = exclusive
        self.operation = operation
        self.timeout = timeout
        self._key: tuple[int, int, int, int] | None = None

    @property
    def held(self) -> bool:
        return self._key is not None

    @property
    def info(self) -> LockInfo | None:
        """This thread's lock file, while held (None on a read-only vault)."""
        key = self._key
        if key is None:
            return None
        with _holds_lock:
            hold = _holds.get(key)
        return hold.info if hold is not None else None

    def acquire(self) -> VaultLock:
        if self._key is not None:
            raise RuntimeError("this VaultLock is already held")
        key = _hold_key(self.root)
        with _holds_lock:
            hold = _holds.get(key)
            if hold is not None:
                if self.exclusive and not hold.exclusive:
                    raise RuntimeError(
                        f"{self.operation or 'an operation'} needs an exclusive lock on "
                        f"{self.root}, but this thread holds a shared one"
                    )
                hold.depth += 1
                self._key = key
                return self
        hold = _take(self.root, self.exclusive, self.operation, self.timeout)
        with _holds_lock:
            _holds[key] = hold
        self._key = key
        return self

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None:
            return
        with _holds_lock:
            hold = _holds[key]
            hold.depth -= 1
            if hold.depth:
                return
            del _holds[key]
        _give_back(hold)

    def __enter__(self) -> VaultLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        mode = "exclusive" if self.exclusive else "shared"
        return f"VaultLock({str(self.root)!r}, {mode}, held={self.held})"


def holds_lock(root: Path, *, exclusive: bool = False) -> bool:
    """Whether this thread holds a lock on the vault (an exclusive one, if asked)."""
    if not (Path(root) / LOCKS_DIR).is_dir():
        return False
    with _holds_lock:
        hold = _holds.get(_hold_key(root))
    return hold is not None and (hold.exclusive or not exclusive)


def list_locks(root: Path) -> list[LockInfo]:
    """The lock files in locks/ that parse, oldest first (stale ones included)."""
    out = []
    for entry in list_dir(Path(root) / LOCKS_DIR):
        if _LOCK_NAME.fullmatch(entry.name):
            info = _read_info(Path(entry.path))
            if info is not None:
                out.append(info)
    return sorted(out, key=lambda i: (i.time, i.id))


def remove_stale_locks(root: Path) -> int:
    """Remove the lock files whose holder is gone; returns how many."""
    removed = 0
    now = time.time()
    for entry in list_dir(Path(root) / LOCKS_DIR):
        path = Path(entry.path)
        if _LOCK_NAME.fullmatch(entry.name):
            stale = _is_stale(path)
        elif _TMP_NAME.fullmatch(entry.name):
            stale = _mtime(path, now) < now - TMP_STALE_S and not _flock_held(path)
        else:
            continue
        if stale:
            try:
                path.unlink()
            except OSError:  # gone already, or a read-only vault
                continue
            removed += 1
    return removed


# --- taking and giving back ------------------------------------------------------------
def _hold_key(root: Path) -> tuple[int, int, int, int]:
    locks = Path(root) / LOCKS_DIR
    if not locks.is_dir():
        locks.mkdir()  # a vault whose locks/ went missing (FileNotFoundError: no vault)
    st = os.stat(locks)
    return (os.getpid(), threading.get_ident(), st.st_dev, st.st_ino)


def _take(root: Path, exclusive: bool, operation: str, timeout: float) -> _Hold:
    deadline = time.monotonic() + timeout
    flock_fd = _open_lock_file(root / LOCKS_DIR / FLOCK_NAME, exclusive)
    try:
        if flock_fd is not None:
            _wait_through_gate(root, flock_fd, exclusive, deadline)
        info_fd, info, info_path = _write_info(root, exclusive, operation)
    except BaseException:
        if flock_fd is not None:
            os.close(flock_fd)
        raise
    remove_stale_locks(root)
    return _Hold(exclusive, os.getpid(), flock_fd, info_fd, info, info_path)


def _wait_through_gate(root: Path, flock_fd: int, exclusive: bool, deadline: float) -> None:
    """Pass the gate (an exclusive waiter holds it shut), then take locks/flock."""
    gate_fd = _open_lock_file(root / LOCKS_DIR / GATE_NAME, exclusive)
    try:
        if gate_fd is not None:
            _poll_flock(root, gate_fd, exclusive, deadline)
        _poll_flock(root, flock_fd, exclusive, deadline)
    finally:
        if gate_fd is not None:
            os.close(gate_fd)  # lets the gate go


def _poll_flock(root: Path, fd: int, exclusive: bool, deadline: float) -> None:
    op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    delay = POLL_MIN_S
    next_scan = time.monotonic() + STALE_SCAN_S
    while True:
        try:
            fcntl.flock(fd, op)
            return
        except BlockingIOError:
            pass
        now = time.monotonic()
        if now >= deadline:
            raise _locked_error(root, exclusive)
        if now >= next_scan:
            remove_stale_locks(root)
            next_scan = now + STALE_SCAN_S
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, POLL_MAX_S)


def _open_lock_file(path: Path, exclusive: bool) -> int | None:
    """Open (creating if needed) a flock file. Without write access a read-only descriptor
    does (flock needs none). None: a read-only file system where the file was never created,
    so a shared locker needs no flock (nobody can change that vault)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno not in _NO_WRITE:
            raise
        error = exc
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        if error.errno == errno.EROFS and not exclusive:
            return None
        raise error from None


def _write_info(
    root: Path, exclusive: bool, operation: str
) -> tuple[int | None, LockInfo | None, Path | None]:
    """Write locks/<id> and keep a LOCK_EX on it: the holder's visible, provably live mark."""
    info = LockInfo(
        id=secrets.token_hex(16),
        host=socket.gethostname(),
        pid=os.getpid(),
        thread=threading.current_thread().name,
        operation=operation,
        time=utc_now(),
        exclusive=exclusive,
    )
    final = root / LOCKS_DIR / info.id
    tmp = final.with_name(f"{info.id}.tmp")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        if exc.errno in _NO_WRITE and not exclusive:
            return None, None, None  # a reader without write access: locked, but unseen
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # nobody else knows the file yet: never waits
        write_all(fd, info.to_json() + b"\n")
        os.rename(tmp, final)  # under its final name, the file is whole and locked
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fd, info, final


def _give_back(hold: _Hold) -> None:
    fds = [fd for fd in (hold.info_fd, hold.flock_fd) if fd is not None]
    if hold.pid != os.getpid():  # a forked child's copy: the parent still holds the lock
        for fd in fds:
            os.close(fd)
        return
    if hold.info_path is not None:
        with contextlib.suppress(FileNotFoundError):
            hold.info_path.unlink()  # first the mark, then the lock itself
    for fd in fds:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)  # also when a forked child shares the descriptor
        os.close(fd)


# --- reading lock files ----------------------------------------------------------------
def _read_info(path: Path) -> LockInfo | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return LockInfo.from_json(path.name, data)


def _is_stale(path: Path) -> bool:
    info = _read_info(path)
    if info is not None and info.host == socket.gethostname() and not _pid_alive(info.pid):
        return True
    return not _flock_held(path)


def _flock_held(path: Path) -> bool:
    """Whether some open file description holds a flock on `path` (False if it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we can judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def _mtime(path: Path, default: float) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return default


def _locked_error(root: Path, exclusive: bool) -> VmvaultError:
    """UserErrorVaultLocked naming the holder most likely in the way."""
    others = [i for i in list_locks(root) if not _is_stale(root / LOCKS_DIR / i.id)]
    blocking = [i for i in others if i.exclusive] if not exclusive else []
    fields: dict[str, Any] = {"path": str(root), "holder": "an unknown process",
                              "operation": "unknown operation", "since": "unknown"}
    if blocking or others:
        holder = (blocking or others)[0]
        fields.update(holder=holder.holder(), operation=holder.operation or "unnamed operation",
                      since=holder.time)
    return VmvaultError(VAULT_LOCKED, **fields)
