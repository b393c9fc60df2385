"""Vault locks (vmvault.vault.lock): shared and exclusive between processes, threads and
Repository objects; stale lock files; timeouts; and backups racing prune without losing data."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmvault.errors import VmvaultError
from vmvault.vault import DiskSource, LockInfo, Repository, VaultLock
from vmvault.vault.format import parse_time

CS = 64 * 1024  # smallest chunk size: many chunks from little data
PACK = 256 * 1024  # small packs: prune has many packs to delete and rewrite
MODES = [(False, False, False), (False, True, True), (True, False, True), (True, True, True)]
MODE_IDS = ["shared-shared", "shared-exclusive", "exclusive-shared", "exclusive-exclusive"]

# holds the vault lock in a child process until a line arrives on stdin
HOLDER = """
import sys
from pathlib import Path
from vmvault.vault.lock import VaultLock
lock = VaultLock(Path(sys.argv[1]), exclusive=sys.argv[2] == "exclusive", operation=sys.argv[3])
with lock:
    print("locked", flush=True)
    sys.stdin.readline()
"""


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def make_disk(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def new_repo(tmp_path: Path) -> Repository:
    return Repository.create(tmp_path / "vault", chunk_size=CS, pack_size=PACK,
                             key_file=tmp_path / "vault.key")


def open_repo(tmp_path: Path) -> Repository:
    return Repository.open(tmp_path / "vault", key_file=tmp_path / "vault.key")


def restored(repo: Repository, rp: str, tmp_path: Path) -> bytes:
    target = tmp_path / f"restored-{rp}.raw"
    repo.restore_disk(rp, "osdisk", target)
    data = target.read_bytes()
    target.unlink()
    return data


def mode(exclusive: bool) -> str:
    return "exclusive" if exclusive else "shared"


@contextmanager
def held_in_child(root: Path, exclusive: bool, operation: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), mode(exclusive), operation],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        with suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        proc.wait(timeout=10)


@contextmanager
def held_in_thread(repo: Repository, exclusive: bool, operation: str) -> Iterator[None]:
    locked, done = threading.Event(), threading.Event()

    def hold() -> None:
        with repo.lock(exclusive=exclusive, operation=operation):
            locked.set()
            done.wait(30)

    thread = threading.Thread(target=hold, name="holder")
    thread.start()
    assert locked.wait(10)
    try:
        yield
    finally:
        done.set()
        thread.join(10)


def try_lock(root: Path, exclusive: bool, timeout: float) -> VmvaultError | None:
    """None if the lock was taken (and given back), else the error."""
    try:
        with VaultLock(root, exclusive=exclusive, operation="probe", timeout=timeout):
            return None
    except VmvaultError as exc:
        return exc


def gate_shut(root: Path) -> bool:
    """Whether an exclusive locker is waiting at (or passing through) locks/flock-gate."""
    fd = os.open(root / "locks" / "flock-gate", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def pack_files(root: Path) -> set[str]:
    return {p.name for p in (root / "data").glob("*/*")}


def lock_files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "locks").iterdir() if not p.name.startswith("flock"))


# --- (a) shared and exclusive, between processes and between threads -------------------


@pytest.mark.parametrize(("held", "wanted", "conflict"), MODES, ids=MODE_IDS)
def test_lock_modes_between_processes(
    tmp_path: Path, held: bool, wanted: bool, conflict: bool
) -> None:
    root = new_repo(tmp_path).path
    with held_in_child(root, held, f"child {mode(held)}") as child:
        err = try_lock(root, wanted, timeout=0.3)
        if conflict:
            assert err is not None and err.code == "UserErrorVaultLocked"
            assert f"process {child.pid} " in err.message and f"child {mode(held)}" in err.message
        else:
            assert err is None
    assert try_lock(root, True, timeout=0) is None  # free once the child let go
    assert lock_files(root) == []


@pytest.mark.parametrize(("held", "wanted", "conflict"), MODES, ids=MODE_IDS)
def test_lock_modes_between_threads_and_repository_objects(
    tmp_path: Path, held: bool, wanted: bool, conflict: bool
) -> None:
    first = new_repo(tmp_path)
    second = open_repo(tmp_path)
    with held_in_thread(first, held, "holder op"):
        started = time.monotonic()
        try:
            with second.lock(exclusive=wanted, operation="waiter", timeout=0.3):
                got = True
        except VmvaultError as exc:
            got = False
            assert exc.code == "UserErrorVaultLocked" and "holder op" in exc.message
            assert "thread holder" in exc.message and time.monotonic() - started >= 0.3
        assert got is not conflict
    with second.lock(exclusive=True, timeout=0):
        pass


def test_prune_waits_for_a_running_backup_and_new_backups_wait_for_prune(
    tmp_path: Path,
) -> None:
    repo = new_repo(tmp_path)
    old = make_disk(tmp_path / "old.raw", rand(16 * CS, 1))
    repo.backup("rp-0", [DiskSource("osdisk", 16 * CS, old)])
    repo.delete_manifest("rp-0")  # prune has something to delete
    old_packs = pack_files(repo.path)  # only rp-0's chunks: prune deletes them all
    disk = make_disk(tmp_path / "d.raw", rand(16 * CS, 2))
    in_backup, release = threading.Event(), threading.Event()
    finished: list[str] = []
    seen_by_backup2: list[set[str]] = []

    def watch(done: int, total: int) -> None:  # runs under backup rp-2's lock
        if not seen_by_backup2:
            seen_by_backup2.append(pack_files(repo.path))

    def slow_progress(done: int, total: int) -> None:
        if not in_backup.is_set():
            in_backup.set()
            release.wait(30)

    def run(name: str, job: object) -> threading.Thread:
        def target() -> None:
            job()  # type: ignore[operator]
            finished.append(name)
        thread = threading.Thread(target=target, name=name)
        thread.start()
        return thread

    backup1 = run("backup rp-1", lambda: open_repo(tmp_path).backup(
        "rp-1", [DiskSource("osdisk", 16 * CS, disk)], progress=slow_progress))
    assert in_backup.wait(10)
    with pytest.raises(VmvaultError) as exc:
        open_repo(tmp_path).prune(lock_timeout=0.2)
    assert exc.value.code == "UserErrorVaultLocked" and "(backup rp-1, since" in exc.value.message
    pruner = run("prune", lambda: open_repo(tmp_path).prune(lock_timeout=30))
    wait_for(lambda: gate_shut(repo.path))  # the prune waits, in front of new lockers
    backup2 = run("backup rp-2", lambda: open_repo(tmp_path).backup(
        "rp-2", [DiskSource("osdisk", 16 * CS, disk)], progress=watch))
    time.sleep(0.3)
    assert finished == []  # the prune waits for backup rp-1, backup rp-2 for the prune
    release.set()
    for thread in (backup1, pruner, backup2):
        thread.join(30)
    assert sorted(finished) == ["backup rp-1", "backup rp-2", "prune"]
    # backup rp-2 started only once the prune had deleted rp-0's packs
    assert old_packs and seen_by_backup2 and not seen_by_backup2[0] & old_packs
    assert repo.check(read_data=True).ok
    assert restored(repo, "rp-2", tmp_path) == disk.read_bytes()


def test_an_exclusive_waiter_is_not_starved_by_overlapping_shared_locks(tmp_path: Path) -> None:
    root = new_repo(tmp_path).path
    stop = threading.Event()

    def reader(offset: float) -> None:
        time.sleep(offset)
        while not stop.is_set():
            with VaultLock(root, operation="reader", timeout=30):
                time.sleep(0.1)

    readers = [threading.Thread(target=reader, args=(i * 0.05,)) for i in range(2)]
    for t in readers:
        t.start()
    time.sleep(0.2)  # from here on there is always a reader holding the vault
    started = time.monotonic()
    try:
        with VaultLock(root, exclusive=True, operation="prune", timeout=5):
            waited = time.monotonic() - started
    finally:
        stop.set()
        for t in readers:
            t.join(10)
    assert waited < 1.0


def test_nested_locks_in_one_thread_do_not_wait(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    other = open_repo(tmp_path)
    disk = make_disk(tmp_path / "d.raw", rand(4 * CS, 3))
    with repo.lock(exclusive=True, operation="outer", timeout=0):
        other.backup("rp-1", [DiskSource("osdisk", 4 * CS, disk)], lock_timeout=0)
        assert repo.check(lock_timeout=0).ok
        repo.prune(lock_timeout=0)
        assert len(repo.locks()) == 1  # one lock file for the whole nest
    with repo.lock(operation="outer"):
        other.backup("rp-2", [DiskSource("osdisk", 4 * CS, disk)], lock_timeout=0)
        with pytest.raises(RuntimeError, match="holds a shared one"):
            other.prune(lock_timeout=0)
    assert repo.locks() == [] and lock_files(repo.path) == []
    assert restored(other, "rp-2", tmp_path) == disk.read_bytes()


def test_lock_files_show_the_holder_and_check_lists_other_holders(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    with held_in_thread(open_repo(tmp_path), False, "backup rp-9"):
        [info] = repo.locks()
        assert (info.host, info.pid, info.thread) == (socket.gethostname(), os.getpid(), "holder")
        assert (info.operation, info.exclusive) == ("backup rp-9", False)
        assert abs(parse_time(info.time).timestamp() - time.time()) < 60
        raw = json.loads((repo.path / "locks" / info.id).read_bytes())
        assert raw == {"version": 1, "host": info.host, "pid": info.pid, "thread": "holder",
                       "operation": "backup rp-9", "time": info.time, "exclusive": False}
        report = repo.check()
        assert report.ok and any("backup rp-9" in i and "thread holder" in i
                                 for i in report.infos), report
    assert repo.locks() == [] and repo.check().infos == []


# --- (b) stale lock files ----------------------------------------------------------------


def write_lock_file(root: Path, **fields: object) -> str:
    lock_id = secrets.token_hex(16)
    info = {"version": 1, "host": socket.gethostname(), "pid": 1, "thread": "MainThread",
            "operation": "prune", "time": "2024-05-01T12:00:00.000000Z", "exclusive": True}
    (root / "locks" / lock_id).write_text(json.dumps({**info, **fields}))
    return lock_id


def test_lock_files_of_gone_holders_do_not_block_and_are_removed(tmp_path: Path) -> None:
    root = new_repo(tmp_path).path
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock_file(root, pid=dead.pid)  # the process is gone
    write_lock_file(root, pid=os.getpid())  # a live pid, but nobody holds the file (reboot)
    write_lock_file(root, host="elsewhere", pid=4242)  # another host, nobody holds the file
    assert len(lock_files(root)) == 3
    with VaultLock(root, exclusive=True, operation="prune", timeout=0) as lock:
        assert lock.info is not None and lock_files(root) == [lock.info.id]
    assert lock_files(root) == []


def test_a_killed_holder_does_not_block_the_vault(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    with held_in_child(repo.path, True, "prune") as child:
        assert [i.pid for i in repo.locks()] == [child.pid]
        assert try_lock(repo.path, False, timeout=0.1) is not None
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert lock_files(repo.path) != []  # kill -9 left its lock file behind
        assert try_lock(repo.path, True, timeout=0) is None
        assert lock_files(repo.path) == []


def test_a_read_only_vault_is_read_without_lock_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = new_repo(tmp_path)
    disk = make_disk(tmp_path / "d.raw", rand(4 * CS, 5))
    repo.backup("rp-1", [DiskSource("osdisk", 4 * CS, disk)])
    real_open = os.open

    def read_only_open(path: object, flags: int, *args: object, **kw: object) -> int:
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", read_only_open)
    chunks: dict[int, bytes] = {}
    repo.restore_disk_to("rp-1", "osdisk", lambda offset, data: chunks.setdefault(offset, data))
    assert b"".join(chunks[o] for o in sorted(chunks)) == disk.read_bytes()
    assert lock_files(repo.path) == []
    with pytest.raises(OSError) as exc:
        repo.prune(lock_timeout=0)  # prune could not delete anything either
    assert exc.value.errno == errno.EROFS
    monkeypatch.undo()
    for name in ("flock", "flock-gate"):  # never created: a read-only vault needs no flock
        (repo.path / "locks" / name).unlink()
    monkeypatch.setattr(os, "open", read_only_open)
    assert repo.check().ok and lock_files(repo.path) == []


# --- (c) timeouts ------------------------------------------------------------------------


def test_timeout_raises_vault_locked_naming_the_holder(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    disk = make_disk(tmp_path / "d.raw", rand(4 * CS, 4))
    with held_in_child(repo.path, True, "prune") as child:
        started = time.monotonic()
        with pytest.raises(VmvaultError) as exc:
            repo.backup("rp-1", [DiskSource("osdisk", 4 * CS, disk)], lock_timeout=0.5)
        assert 0.5 <= time.monotonic() - started < 5
    err = exc.value
    assert (err.code, err.http_status) == ("UserErrorVaultLocked", 409)
    host = socket.gethostname()
    assert err.message.startswith(
        f"The vault at {repo.path} is locked by process {child.pid} on host {host}, "
        "thread MainThread, exclusive (prune, since 20")
    assert "is removed automatically" in err.action
    assert repo.manifests() == []
    repo.shared_lock_timeout = 0  # the default of every shared operation
    assert repo.backup("rp-1", [DiskSource("osdisk", 4 * CS, disk)]).chunks_new == 4


# --- (d) backups racing deletes and prunes ---------------------------------------------

STRESS_SECONDS = 5.0
DISK_CHUNKS = 48  # 3 MiB images
POOL = 24  # chunk contents are drawn from this pool: contents that prune dropped come back
CHANGES = 8  # chunks changed per round
KEEP = 2  # the pruner keeps the newest this many recovery points


@dataclass
class StressResult:
    backups: int
    prunes: int
    packs_deleted: int
    chunks_reused: int
    errors: list[BaseException]
    mismatched: list[str]  # recovery points that restored wrong or failed to restore
    check_errors: list[str]


class _Stress:
    def __init__(self, tmp_path: Path, seconds: float) -> None:
        self.tmp_path = tmp_path
        self.seconds = seconds
        self.pool = [rand(CS, 100 + i) for i in range(POOL)] + [bytes(CS)]  # last: zeros
        self.images: dict[str, bytes] = {}  # rp id -> the exact image backed up for it
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.backups = self.prunes = self.packs_deleted = self.chunks_reused = 0

    def guarded(self, name: str, body: object) -> threading.Thread:
        def target() -> None:
            try:
                body()  # type: ignore[operator]
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)
                self.stop.set()
        return threading.Thread(target=target, name=name)

    def writer(self) -> None:
        repo = open_repo(self.tmp_path)
        rng = random.Random(7)
        layout = [rng.randrange(len(self.pool)) for _ in range(DISK_CHUNKS)]
        source = self.tmp_path / "source.raw"
        parent: str | None = None
        while not self.stop.is_set():
            changed = sorted(rng.sample(range(DISK_CHUNKS), CHANGES))
            for i in changed:
                layout[i] = rng.randrange(len(self.pool))
            image = b"".join(self.pool[c] for c in layout)
            source.write_bytes(image)
            rp = f"rp-{self.backups:05d}"
            self.images[rp] = image
            incremental = parent is not None and self.backups % 2 == 1
            disk = DiskSource("osdisk", len(image), source,
                              changed_ranges=[(i * CS, CS) for i in changed] if incremental
                              else None)
            stats = repo.backup(rp, [disk], parent=parent if incremental else None)
            self.chunks_reused += stats.chunks_reused
            self.backups += 1
            parent = rp

    def pruner(self) -> None:
        repo = open_repo(self.tmp_path)
        while not self.stop.is_set():
            for rp in sorted(repo.manifests())[:-KEEP]:
                repo.delete_manifest(rp)
                self.images.pop(rp, None)
            self.packs_deleted += repo.prune().packs_deleted
            self.prunes += 1

    def run(self) -> StressResult:
        new_repo(self.tmp_path)
        threads = [self.guarded("writer", self.writer), self.guarded("pruner", self.pruner)]
        for t in threads:
            t.start()
        self.stop.wait(self.seconds)
        self.stop.set()
        for t in threads:
            t.join(60)
        return self.verify()

    def verify(self) -> StressResult:
        repo = open_repo(self.tmp_path)
        mismatched = []
        for rp in repo.manifests():
            try:
                ok = restored(repo, rp, self.tmp_path) == self.images[rp]
            except (VmvaultError, KeyError):
                ok = False
            if not ok:
                mismatched.append(rp)
        report = repo.check(read_data=True)
        return StressResult(self.backups, self.prunes, self.packs_deleted, self.chunks_reused,
                            self.errors, mismatched, report.errors)


def stress(tmp_path: Path, seconds: float = STRESS_SECONDS) -> StressResult:
    """Back up mutating images in one thread while another deletes old recovery points and
    prunes (each with its own Repository object), then restore and check everything."""
    return _Stress(tmp_path, seconds).run()


def test_backups_racing_deletes_and_prunes_lose_nothing(tmp_path: Path) -> None:
    result = stress(tmp_path)
    assert result.errors == [], result.errors
    assert result.mismatched == [] and result.check_errors == [], result
    # the race was really run: many rounds of each, prune deleted packs, backups deduplicated
    assert result.backups >= 10 and result.prunes >= 5, result
    assert result.packs_deleted > 0 and result.chunks_reused > 0, result


def test_lock_info_json_round_trip() -> None:
    info = LockInfo("ab" * 16, "h", 12, "t", "backup rp-1", "2024-05-01T12:00:00.000000Z", True)
    assert LockInfo.from_json(info.id, info.to_json()) == info
    pid_as_text = info.to_json().replace(b'"pid": 12', b'"pid": "12"')
    for bad in (b"", b"[]", b'{"version": 2}', pid_as_text):
        assert LockInfo.from_json(info.id, bad) is None
