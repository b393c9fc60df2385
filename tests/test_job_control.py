"""Job control through the CLI against real stacks: `backup job stop` (rows J1-J4) for backups
and restores, what a cancelled job leaves behind (nothing), retries of transient transfer
failures (B9, a busy vault), B13 (the vault's key file gone), B4 (a premium account too small
for its disks' data), the long-running warnings, and `backup troubleshoot`.

Each group of tests that needs other server settings has a stack of its own (module-scoped):
a stack starts in about two seconds. Everything goes through the CLI (and the Blob REST API
for what is in storage) except two stand-ins for the world around the service: another
process holding the vault's exclusive lock (as a prune does) and slow storage (another writer
holding a blob's lock in the pool); they make the rows that depend on timing (J2, a busy
vault, a stop during a restore) happen every time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from azure.storage.blob import BlobServiceClient
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from conftest import (
    Result,
    Stack,
    backup,
    item_args,
    make_stack,
    make_vm,
    needs_root,
    protect,
    wait_agent_ready,
)
from vmvault.cli.client import vault_path
from vmvault.storage.diskstore import blob_key

T = TypeVar("T")

# The guest path with short bounds (as tests/test_guest_backup.py), and a short wait for a
# stop to be taken: row J4 shows in seconds.
FAST = {"VMVAULT_AGENT_STALE_SECONDS": "4", "VMVAULT_AGENT_PICKUP_SECONDS": "10",
        "VMVAULT_AGENT_STOP_SECONDS": "5", "VMVAULT_AGENT_HEARTBEAT_SECONDS": "1"}
CANCEL_WAIT = "2"
MiB = 2**20


# --- stacks --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def downs() -> Iterator[list[threading.Thread]]:
    """The stacks' 'vmvault down', run side by side at the end of the module (a stack whose
    lab VMs run takes up to 20 s to stop: the agents' long polls of their goal state)."""
    threads: list[threading.Thread] = []
    yield threads
    for thread in threads:
        thread.join()


def _stack(factory: pytest.TempPathFactory, downs: list[threading.Thread], name: str,
           **env: str) -> Iterator[Stack]:
    s = make_stack(factory.mktemp(name), **env)
    try:
        yield s
    finally:
        thread = threading.Thread(target=s.run, args=("down",), kwargs={"ok": False})
        thread.start()
        downs.append(thread)


@pytest.fixture(scope="module")
def jstack(tmp_path_factory: pytest.TempPathFactory,
           downs: list[threading.Thread]) -> Iterator[Stack]:
    """Job stop, B13, B4: default transfer settings, a 2 s wait for a stop."""
    yield from _stack(tmp_path_factory, downs, "vmvault-jobs", **FAST,
                      VMVAULT_CANCEL_WAIT_SECONDS=CANCEL_WAIT)


@pytest.fixture(scope="module")
def retry_stack(tmp_path_factory: pytest.TempPathFactory,
                downs: list[threading.Thread]) -> Iterator[Stack]:
    """Every transfer attempt times out (B9): 2 retries, 0.2 s then 0.4 s apart."""
    yield from _stack(tmp_path_factory, downs, "vmvault-retry",
                      VMVAULT_TRANSFER_TIMEOUT_SECONDS="0.3", VMVAULT_TRANSFER_RETRIES="2",
                      VMVAULT_RETRY_BACKOFF_SECONDS="0.2")


@pytest.fixture(scope="module")
def lock_stack(tmp_path_factory: pytest.TempPathFactory,
               downs: list[threading.Thread]) -> Iterator[Stack]:
    """A transfer attempt (its wait for the vault lock included) may last 3 s."""
    yield from _stack(tmp_path_factory, downs, "vmvault-lock",
                      VMVAULT_TRANSFER_TIMEOUT_SECONDS="3", VMVAULT_TRANSFER_RETRIES="3",
                      VMVAULT_RETRY_BACKOFF_SECONDS="0.2")


@pytest.fixture(scope="module")
def warn_stack(tmp_path_factory: pytest.TempPathFactory,
               downs: list[threading.Thread]) -> Iterator[Stack]:
    """Backups and restores longer than 1 s get the long-running warning."""
    yield from _stack(tmp_path_factory, downs, "vmvault-warn",
                      VMVAULT_BACKUP_WARN_SECONDS="1", VMVAULT_RESTORE_WARN_SECONDS="1",
                      VMVAULT_SCHEDULER_TICK_SECONDS="0.2")


# --- helpers -------------------------------------------------------------------------------------

def fresh_names() -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {"rg": f"rg-{tag}", "sa": f"sa{tag}", "vm": f"vm-{tag}", "vault": f"vault-{tag}",
            "restore_sa": f"rs{tag}", "loc": "eastus"}


def poll(check: Callable[[], T], what: str, timeout: float = 60, every: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def job_now(s: Stack, n: dict[str, str], job_id: str) -> dict[str, Any]:
    """A job's properties straight from the REST API (for tight polling)."""
    return dict(s.api(vault_path(n["rg"], n["vault"], "backupJobs", job_id))["properties"])


def poll_job(s: Stack, n: dict[str, str], job_id: str, ready: Callable[[dict[str, Any]], bool],
             what: str, timeout: float = 60) -> dict[str, Any]:
    """The job's properties once `ready` says so; fails if the job ends first."""
    def check() -> dict[str, Any] | None:
        props = job_now(s, n, job_id)
        assert props["status"] == "InProgress", f"the job ended before {what}: {props}"
        return props if ready(props) else None
    return poll(check, what, timeout)


def show(s: Stack, n: dict[str, str], job_id: str) -> dict[str, Any]:
    return dict(s.json("backup", "job", "show", "-g", n["rg"], "-v", n["vault"], "-n",
                       job_id)["properties"])


def task(props: dict[str, Any], name: str) -> dict[str, Any]:
    return dict(next(t for t in props["extendedInfo"]["tasksList"] if t["taskId"] == name))


def bag(props: dict[str, Any]) -> dict[str, Any]:
    return dict(props["extendedInfo"]["propertyBag"])


def stop(s: Stack, n: dict[str, str], job_id: str, ok: bool = True) -> Result:
    return s.run("backup", "job", "stop", "-g", n["rg"], "-v", n["vault"], "-n", job_id,
                 "-o", "json", ok=ok)


def assert_cli_error(r: Result, code: str, *words: str, exit_code: int = 1) -> None:
    """What the user reads: exit code, 'ERROR: (Code) message', 'Recommended action: ...'."""
    assert r.code == exit_code, (r.code, r.err)
    assert f"ERROR: ({code})" in r.err, r.err
    assert "Recommended action: " in r.err, r.err
    assert "Traceback" not in r.err, r.err
    for word in words:
        assert word in r.err, (word, r.err)


def error_codes(props: dict[str, Any]) -> list[str]:
    return [e["errorCode"] for e in props.get("errorDetails") or []]


def seconds(duration: str) -> float:
    h, m, sec = duration.split(":")
    return int(h) * 3600 + int(m) * 60 + float(sec)


def rp_names(s: Stack, n: dict[str, str]) -> list[str]:
    return [rp["name"] for rp in s.json("backup", "recoverypoint", "list", *item_args(n))]


def item(s: Stack, n: dict[str, str]) -> dict[str, Any]:
    return dict(s.json("backup", "item", "show", "-g", n["rg"], "-v", n["vault"], "-c",
                       n["vm"], "-n", n["vm"])["properties"])


def vault_check(s: Stack, n: dict[str, str]) -> dict[str, Any]:
    return dict(s.json("backup", "vault", "check", "-g", n["rg"], "-n", n["vault"]))


def disk_file(s: Stack, vm: dict[str, Any], lun: int) -> Path:
    """The raw image of a VM's data disk in the pool."""
    uri = vm["storageProfile"]["dataDisks"][lun]["vhd"]["uri"]
    account, container, blob = uri.split("/")[-3:]
    return Path(s.status()["pool"]["path"]) / account / container / blob


def fill_random(path: Path, mib: int) -> None:
    """Incompressible, never repeating data from 1 MiB on (AES-CTR of zeros: fast)."""
    enc = Cipher(algorithms.AES(os.urandom(16)), modes.CTR(os.urandom(16))).encryptor()
    zeros = bytes(8 * MiB)
    with open(path, "r+b") as f:
        f.seek(MiB)
        for _ in range(mib // 8):
            f.write(enc.update(zeros))
        f.flush()
        os.fsync(f.fileno())


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(4 * MiB):
            h.update(b)
    return h.hexdigest()


def blob_service(s: Stack, group: str, account: str) -> BlobServiceClient:
    """A Blob REST client on the account, with its key (what a user's tools use)."""
    key = s.json("storage", "account", "keys", "list", "-g", group, "-n", account)[0]["value"]
    url = s.status()["blobEndpoint"]["url"]
    return BlobServiceClient(f"{url}/{account}",
                             credential={"account_name": account, "account_key": key})


def disk_snapshots(s: Stack, n: dict[str, str], vm: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(blob, snapshot, job id in its metadata) of every snapshot of the VM's disk blobs."""
    container = vm["storageProfile"]["osDisk"]["vhd"]["uri"].split("/")[-2]
    cc = blob_service(s, n["rg"], n["sa"]).get_container_client(container)
    return sorted((b.name, b.snapshot, (b.metadata or {}).get("vmvaultjobid", ""))
                  for b in cc.list_blobs(include=["snapshots", "metadata"]) if b.snapshot)


def stall_blob(pool: Path, account: str, container: str, blob: str) -> int:
    """Slow storage, on demand: once the container exists, another writer holds the blob's
    lock in the pool (the lock the Blob endpoint and the control plane share), so nobody can
    write that blob until the returned descriptor is closed."""
    meta = pool / account / container / ".meta"
    poll(meta.is_dir, f"container {container}", every=0.01)
    fd = os.open(meta / f"{blob_key(blob)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from vmvault.vault import Repository
    repo = Repository.open(Path(sys.argv[1]), key_file=Path(sys.argv[2]))
    with repo.lock(exclusive=True, operation="prune (maintenance)"):
        print("locked", flush=True)
        sys.stdin.readline()
""")


@contextlib.contextmanager
def vault_held(s: Stack, n: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """Another process holds the vault's exclusive lock (as a prune does) until the block
    ends."""
    vault = s.json("backup", "vault", "show", "-g", n["rg"], "-n", n["vault"])["properties"]
    key = s.home / "keys" / f"{vault['vaultId']}.key"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, vault["repositoryPath"], str(key)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=s.env)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        if holder.stdin is not None:
            holder.stdin.close()  # the maintenance ends: the lock is released
        holder.wait(timeout=30)


def restore_job(s: Stack, n: dict[str, str], rp: str, source: str) -> dict[str, Any]:
    return dict(s.json("backup", "restore", "restore-disks", *item_args(n), "-r", rp,
                       "--storage-account", n["restore_sa"], "--restore-from", source))


def restored_data_disk(props: dict[str, Any]) -> Path:
    return Path(next(d["path"] for d in bag(props)["Restored Disks"]
                     if d["name"] == "datadisk-0"))


def big_vm(s: Stack, n: dict[str, str], mib: int, disk_gb: str = "2") -> dict[str, Any]:
    """A protected, shut-down VM (host snapshots) whose data disk holds `mib` MiB of random
    data: a transfer that lasts long enough to be stopped halfway."""
    vm = make_vm(s, n, data_disks=(disk_gb,), fs=("ext4",))
    s.run("vm", "stop", "-g", n["rg"], "-n", n["vm"])  # no guest writes race the raw ones
    fill_random(disk_file(s, vm, 0), mib)
    protect(s, n)
    s.run("storage", "account", "create", "-g", n["rg"], "-n", n["restore_sa"])
    return vm


# --- J1, J3: stops that are refused at once ------------------------------------------------------

@needs_root()
def test_stop_refused_for_other_job_types_and_for_finished_jobs(jstack: Stack,
                                                                names: dict[str, str]) -> None:
    s, n = jstack, names
    make_vm(s, n)
    protect(s, n)
    configure = s.json("backup", "job", "list", "-g", n["rg"], "-v", n["vault"], "--operation",
                       "ConfigureBackup")
    assert len(configure) == 1
    r = stop(s, n, configure[0]["name"], ok=False)  # J1, whatever the job's status
    assert_cli_error(r, "UserErrorJobCancellationNotSupported", "ConfigureBackup",
                     "Recommended action: Wait until the job completes.")
    assert show(s, n, configure[0]["name"])["status"] == "Completed"

    done = backup(s, n)
    assert done["properties"]["status"] == "Completed", done["properties"]["errorDetails"]
    r = stop(s, n, done["name"], ok=False)  # J3
    assert_cli_error(r, "UserErrorJobNotInProgress", "this job is Completed",
                     "vmvault backup job show")
    after = show(s, n, done["name"])
    assert after["status"] == "Completed" and after["errorDetails"] is None
    assert len(rp_names(s, n)) == 1

    r = stop(s, n, "00000000-0000-0000-0000-00000000beef", ok=False)
    assert_cli_error(r, "ResourceNotFound", "00000000-0000-0000-0000-00000000beef", exit_code=3)


# --- a cancelled backup, a cancelled restore, J2 -------------------------------------------------

@pytest.fixture(scope="module")
def big(jstack: Stack) -> dict[str, Any]:
    n = fresh_names()
    vm = big_vm(jstack, n, 1024)
    return {"n": n, "vm": vm, "sha": sha(disk_file(jstack, vm, 0))}  # the VM stays shut down


def a_recovery_point(s: Stack, n: dict[str, str]) -> str:
    names = rp_names(s, n)
    if names:
        return names[0]
    done = backup(s, n)["properties"]
    assert done["status"] == "Completed", done["errorDetails"]
    return str(bag(done)["Recovery Point Name"])


@needs_root()
def test_cancel_backup_mid_transfer_keeps_nothing(jstack: Stack, big: dict[str, Any]) -> None:
    s, n, vm = jstack, big["n"], big["vm"]
    points_before = rp_names(s, n)
    snaps_before = disk_snapshots(s, n, vm)
    manifests_before = vault_check(s, n)["counts"]["manifests"]

    job = s.json("backup", "protection", "backup-now", *item_args(n))
    running = poll_job(s, n, job["name"],
                       lambda p: task(p, "Transfer data to vault")["progressPercentage"] >= 5,
                       "the transfer to be under way")
    assert task(running, "Transfer data to vault")["progressPercentage"] < 90, running

    out = stop(s, n, job["name"]).json()["properties"]  # returns once the job has stopped
    assert out["status"] == "Cancelled", out
    assert error_codes(out) == ["JobCancelledByUser"]
    err = out["errorDetails"][0]
    assert "Transfer data to vault" in err["errorString"], err
    assert "nothing it started was kept" in err["errorString"], err
    assert err["recommendations"] == ["Start the operation again when you need it."]
    assert task(out, "Take Snapshot")["status"] == "Completed"
    assert task(out, "Transfer data to vault")["status"] == "Cancelled"
    assert out["endTime"] is not None
    assert show(s, n, job["name"])["status"] == "Cancelled"
    assert_cli_error(stop(s, n, job["name"], ok=False), "UserErrorJobNotInProgress",
                     "this job is Cancelled")  # J3: stopped already
    cancelled = s.json("backup", "job", "list", "-g", n["rg"], "-v", n["vault"], "--status",
                       "Cancelled")
    assert [j["name"] for j in cancelled] == [job["name"]]

    # No recovery point, no manifest, no snapshot of the cancelled job; the item says so.
    rp = bag(out)["Recovery Point Name"]
    assert rp_names(s, n) == points_before and rp not in points_before
    check = vault_check(s, n)
    assert check["ok"] is True, check
    assert check["counts"]["manifests"] == manifests_before
    assert not any("manifests the catalog does not list" in i for i in check["infos"]), check
    snaps = disk_snapshots(s, n, vm)
    assert snaps == snaps_before
    assert not [x for x in snaps if x[2] == job["name"]]
    assert item(s, n)["lastBackupStatus"] == "Cancelled"

    # The next backup works, and its point restores the disk bit for bit.
    again = backup(s, n)["properties"]
    assert again["status"] == "Completed", again["errorDetails"]
    assert rp_names(s, n)[0] == bag(again)["Recovery Point Name"]
    assert item(s, n)["lastBackupStatus"] == "Completed"
    restored = restore_job(s, n, bag(again)["Recovery Point Name"], "Snapshot")
    done = s.wait(n["rg"], n["vault"], restored["name"])["properties"]
    assert done["status"] == "Completed", done["errorDetails"]
    assert sha(restored_data_disk(done)) == big["sha"]


@needs_root()
def test_cancel_restore_mid_transfer_leaves_no_container(jstack: Stack,
                                                         big: dict[str, Any]) -> None:
    """The restore has created its container and its first disk's blob, and waits for the
    vault (a prune holds it) when the stop comes: the job stops at its next checkpoint and
    removes what it wrote."""
    s, n = jstack, big["n"]
    rp = a_recovery_point(s, n)
    svc = blob_service(s, n["rg"], n["restore_sa"])
    with vault_held(s, n):
        job = restore_job(s, n, rp, "Vault")
        cc = svc.get_container_client(f"vmvault-restore-{job['name'][:8]}")
        poll(lambda: cc.exists() and [b.name for b in cc.list_blobs()], "the first disk's blob")
        assert [b.name for b in cc.list_blobs()] == [f"{n['vm']}-osdisk-{rp}.vhd"]
        stopper = subprocess.Popen(
            [sys.executable, "-m", "vmvault.cli.main", "backup", "job", "stop", "-g", n["rg"],
             "-v", n["vault"], "-n", job["name"], "-o", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=s.env)
        time.sleep(1.0)  # the stop is asked for while the restore waits for the vault
        assert job_now(s, n, job["name"])["status"] == "InProgress"
    stdout, stderr = stopper.communicate(timeout=60)
    assert stopper.returncode == 0, stderr
    out = json.loads(stdout)["properties"]
    assert out["status"] == "Cancelled", out
    assert error_codes(out) == ["JobCancelledByUser"]
    assert "Transfer data" in out["errorDetails"][0]["errorString"]
    assert task(out, "Transfer data")["status"] == "Cancelled"
    assert task(out, "Transfer data")["progressPercentage"] < 100
    assert "Restored Disks" not in bag(out)
    # no half-restored disks left behind: the container is gone, with its blobs
    assert cc.container_name not in [c.name for c in svc.list_containers()]
    assert not cc.exists()
    # the recovery point is untouched: the restore runs again and completes
    again = s.wait(n["rg"], n["vault"], restore_job(s, n, rp, "Snapshot")["name"])
    assert again["properties"]["status"] == "Completed"


@needs_root()
def test_stop_while_a_restore_commits_is_refused_j2(jstack: Stack, big: dict[str, Any]) -> None:
    """J2 for real: the restore has written its disks and committed to finishing (it writes
    the restored VM's configuration blob), and the storage is slow to take that blob. The
    restore is held at its start by a busy vault until the stall is in place."""
    s, n = jstack, big["n"]
    rp = a_recovery_point(s, n)
    pool = Path(s.status()["pool"]["path"])
    with vault_held(s, n):  # the job starts and waits for the vault
        job = restore_job(s, n, rp, "Vault")
        container = f"vmvault-restore-{job['name'][:8]}"
        stall = stall_blob(pool, n["restore_sa"], container, "vmconfig.json")
    try:  # the vault is free: the disks are written, then the configuration blob stalls
        poll_job(s, n, job["name"], lambda p: task(p, "Transfer data")["progressPercentage"]
                 == 100, "the restore's disks to be written")
        time.sleep(0.3)  # from the last disk to the commit: a few instructions
        assert job_now(s, n, job["name"])["status"] == "InProgress"
        r = stop(s, n, job["name"], ok=False)
        assert_cli_error(r, "UserErrorJobNotInCancellableState",
                         "writing the restored VM's configuration",
                         "Recommended action: Wait until the job completes.")
        assert job_now(s, n, job["name"])["status"] == "InProgress"
    finally:
        os.close(stall)  # the storage catches up
    done = s.wait(n["rg"], n["vault"], job["name"])["properties"]
    assert done["status"] == "Completed", done["errorDetails"]
    assert done["errorDetails"] is None
    assert bag(done)["Config Blob Container Name"] == container
    svc = blob_service(s, n["rg"], n["restore_sa"])
    assert svc.get_blob_client(container, "vmconfig.json").exists()
    assert sha(restored_data_disk(done)) == big["sha"]


# --- J4: a stop that reaches no checkpoint in time -----------------------------------------------

@needs_root()
def test_stop_during_a_snapshot_that_waits_for_the_agent_fails_j4(
        jstack: Stack, names: dict[str, str]) -> None:
    s, n = jstack, names
    make_vm(s, n)
    protect(s, n)
    vm_args = ("-g", n["rg"], "--vm-name", n["vm"])
    s.run("vm", "agent", "stop", *vm_args)  # the snapshot task waits for the agent's pickup
    job = s.json("backup", "protection", "backup-now", *item_args(n))
    poll_job(s, n, job["name"], lambda p: task(p, "Take Snapshot")["status"] == "InProgress",
             "the snapshot step")
    started = time.monotonic()
    r = stop(s, n, job["name"], ok=False)
    waited = time.monotonic() - started
    assert_cli_error(r, "UserErrorJobCancellationFailed",
                     f"did not reach a point where it can stop within {CANCEL_WAIT} s",
                     "Take Snapshot", "it goes on",
                     "Recommended action: Wait until the job completes.")
    assert waited >= float(CANCEL_WAIT)
    running = job_now(s, n, job["name"])
    assert running["status"] == "InProgress", running
    assert task(running, "Take Snapshot")["status"] == "InProgress"

    # The agent comes back within the pickup time: the job goes on through its transfer's
    # checkpoints and completes; the refused stop is not taken later.
    s.run("vm", "agent", "start", *vm_args)
    done = s.wait(n["rg"], n["vault"], job["name"])["properties"]
    assert done["status"] == "Completed", done["errorDetails"]
    assert done["errorDetails"] is None
    assert rp_names(s, n) == [bag(done)["Recovery Point Name"]]
    assert item(s, n)["lastBackupStatus"] == "Completed"


# --- B13, B4 -------------------------------------------------------------------------------------

@needs_root()
def test_b13_vault_key_file_missing(jstack: Stack, names: dict[str, str],
                                    tmp_path: Path) -> None:
    s, n = jstack, names
    vm = make_vm(s, n)
    protect(s, n)
    first = backup(s, n)["properties"]
    assert first["status"] == "Completed", first["errorDetails"]
    rp = bag(first)["Recovery Point Name"]
    vault_id = s.json("backup", "vault", "show", "-g", n["rg"], "-n", n["vault"])[
        "properties"]["vaultId"]
    key = s.home / "keys" / f"{vault_id}.key"
    assert key.is_file()
    kept = tmp_path / "vault.key"
    shutil.move(key, kept)
    try:
        job = backup(s, n)
        props = job["properties"]
        assert props["status"] == "Failed", props
        err = props["errorDetails"][0]
        assert err["errorCode"] == "UserErrorKeyvaultPermissionsNotConfigured", err
        assert n["vault"] in err["errorString"] and "key file is missing" in err["errorString"]
        assert str(key) in err["recommendations"][0], err
        assert task(props, "Transfer data to vault")["status"] == "Failed"
        assert item(s, n)["lastBackupStatus"] == "Failed"
        assert rp_names(s, n) == [rp]
        assert not [x for x in disk_snapshots(s, n, vm) if x[2] == job["name"]]
        r = s.run("backup", "vault", "check", "-g", n["rg"], "-n", n["vault"], ok=False)
        assert_cli_error(r, "UserErrorKeyvaultPermissionsNotConfigured", str(key))
        # a restore from the vault needs the key too, and says so with the same row
        s.run("storage", "account", "create", "-g", n["rg"], "-n", n["restore_sa"])
        restore = s.wait(n["rg"], n["vault"], restore_job(s, n, rp, "Vault")["name"])
        rprops = restore["properties"]
        assert rprops["status"] == "Failed", rprops
        assert error_codes(rprops) == ["UserErrorKeyvaultPermissionsNotConfigured"]
        assert str(key) in rprops["errorDetails"][0]["recommendations"][0]
    finally:
        shutil.move(kept, key)
    again = backup(s, n)["properties"]
    assert again["status"] == "Completed", again["errorDetails"]
    assert len(rp_names(s, n)) == 2
    assert item(s, n)["lastBackupStatus"] == "Completed"
    assert vault_check(s, n)["ok"] is True


@needs_root()
def test_b4_premium_account_too_small_for_the_disks_data(jstack: Stack,
                                                        names: dict[str, str]) -> None:
    s, n = jstack, names
    s.run("group", "create", "-n", n["rg"], "-l", n["loc"])
    s.run("storage", "account", "create", "-g", n["rg"], "-n", n["sa"], "--sku", "Premium_LRS",
          "--capacity-gb", "1")
    vm = s.json("vm", "create", "-g", n["rg"], "-n", n["vm"], "--storage-account", n["sa"],
                "--os-disk-size-gb", "1", "--data-disk-sizes-gb", "1", "--data-disk-fs-types",
                "ext4")
    wait_agent_ready(s, n)
    mount = Path(vm["storageProfile"]["dataDisks"][0]["mountPoint"])
    with open(mount / "data.bin", "wb") as f:  # the guest writes 600 MiB
        block = b"vmvault " * MiB
        for _ in range(75):
            f.write(block)
        os.fsync(f.fileno())
    protect(s, n)
    job = backup(s, n)
    props = job["properties"]
    assert props["status"] == "Failed", props
    err = props["errorDetails"][0]
    assert err["errorCode"] == "UserErrorBCMPremiumStorageQuotaError", err
    assert f"'{n['sa']}'" in err["errorString"] and "bytes free" in err["errorString"], err
    assert "raise its capacity" in err["recommendations"][0], err
    assert item(s, n)["lastBackupStatus"] == "Failed"
    assert rp_names(s, n) == []
    assert disk_snapshots(s, n, vm) == []  # refused before any snapshot
    s.run("storage", "account", "update", "-g", n["rg"], "-n", n["sa"], "--capacity-gb", "4")
    again = backup(s, n)["properties"]
    assert again["status"] == "Completed", again["errorDetails"]
    assert len(rp_names(s, n)) == 1


# --- retries of transient transfer failures ------------------------------------------------------

@needs_root()
def test_b9_transfer_timeout_retried_then_failed(retry_stack: Stack,
                                                 names: dict[str, str]) -> None:
    s, n = retry_stack, names
    # A retry resumes: what an attempt stored is not copied again. 768 MiB need more than
    # three attempts of 0.3 s.
    vm = big_vm(s, n, 768, disk_gb="1")
    job = backup(s, n)
    props = job["properties"]
    assert props["status"] == "Failed", props
    assert error_codes(props) == ["CopyingVHDsFromBackUpVaultTakingLongTime"]
    err = props["errorDetails"][0]
    assert "did not finish within 0.3 s" in err["errorString"], err
    assert "retry in a few minutes" in err["recommendations"][0], err
    info = bag(props)
    assert info["Transfer Retries"] == "2", info
    for attempt in (1, 2):
        assert info[f"Transfer Attempt {attempt}"].startswith(
            "(CopyingVHDsFromBackUpVaultTakingLongTime) Copying the disks of"), info
    assert "Transfer Attempt 3" not in info  # the third attempt's failure is the job's error
    assert seconds(props["duration"]) >= 0.2 + 0.4  # the doubling backoff was waited
    assert task(props, "Transfer data to vault")["status"] == "Failed"
    assert rp_names(s, n) == []
    check = vault_check(s, n)
    assert check["ok"] is True and check["counts"]["manifests"] == 0, check
    assert not [x for x in disk_snapshots(s, n, vm) if x[2] == job["name"]]
    assert item(s, n)["lastBackupStatus"] == "Failed"


@needs_root()
def test_busy_vault_is_retried_until_its_lock_is_released(lock_stack: Stack,
                                                          names: dict[str, str]) -> None:
    s, n = lock_stack, names
    make_vm(s, n)
    protect(s, n)
    with vault_held(s, n) as holder:
        job = s.json("backup", "protection", "backup-now", *item_args(n))
        waiting = poll_job(s, n, job["name"], lambda p: "Transfer Retries" in bag(p),
                           "a retry of the transfer", timeout=30)
        first = bag(waiting)["Transfer Attempt 1"]
        assert first.startswith("(UserErrorVaultLocked) The vault at"), first
        assert f"process {holder.pid} on host" in first and "exclusive" in first, first
        assert "prune (maintenance)" in first, first
    done = s.wait(n["rg"], n["vault"], job["name"])["properties"]
    assert done["status"] == "Completed", done["errorDetails"]
    assert done["errorDetails"] is None
    info = bag(done)
    assert info["Transfer Retries"] == "1", info
    assert "(UserErrorVaultLocked)" in info["Transfer Attempt 1"]
    assert rp_names(s, n) == [info["Recovery Point Name"]]
    assert vault_check(s, n)["ok"] is True


@needs_root()
def test_stop_a_backup_that_waits_for_a_busy_vault(lock_stack: Stack,
                                                   names: dict[str, str]) -> None:
    """No checkpoint while the transfer waits for the vault's lock: the stop is taken at the
    wait before the next retry, and the snapshot is not kept."""
    s, n = lock_stack, names
    vm = make_vm(s, n)
    protect(s, n)
    with vault_held(s, n):
        job = s.json("backup", "protection", "backup-now", *item_args(n))
        poll_job(s, n, job["name"], lambda p: "Transfer Retries" in bag(p),
                 "a retry of the transfer", timeout=30)
        out = stop(s, n, job["name"]).json()["properties"]  # waits up to 30 s by default
        assert out["status"] == "Cancelled", out
    assert error_codes(out) == ["JobCancelledByUser"]
    assert "(waiting to retry the transfer)" in out["errorDetails"][0]["errorString"]
    assert task(out, "Transfer data to vault")["status"] == "Cancelled"
    assert "(UserErrorVaultLocked)" in bag(out)["Transfer Attempt 1"]
    assert rp_names(s, n) == []
    assert not [x for x in disk_snapshots(s, n, vm) if x[2] == job["name"]]
    assert item(s, n)["lastBackupStatus"] == "Cancelled"
    check = vault_check(s, n)
    assert check["ok"] is True and check["counts"]["manifests"] == 0, check


# --- long-running warnings -----------------------------------------------------------------------

@needs_root()
def test_long_backup_and_restore_end_with_warnings(warn_stack: Stack,
                                                   names: dict[str, str]) -> None:
    s, n = warn_stack, names
    vm = big_vm(s, n, 768, disk_gb="1")
    job = backup(s, n)
    props = job["properties"]
    assert seconds(props["duration"]) > 2, props["duration"]
    assert props["status"] == "CompletedWithWarnings", props
    assert error_codes(props) == ["BackupTakingLongerThanExpected"]
    warning = props["errorDetails"][0]
    assert f"The backup of '{n['vm']}' has been running for" in warning["errorString"], warning
    assert "longer than 1 s" in warning["errorString"], warning
    assert warning["recommendations"][0].startswith("Best practice: keep a VM's backup under")
    rp = bag(props)["Recovery Point Name"]
    assert rp_names(s, n) == [rp]  # a warning, not a failure: the point is kept
    assert item(s, n)["lastBackupStatus"] == "Completed"
    listed = s.json("backup", "job", "list", "-g", n["rg"], "-v", n["vault"], "--status",
                    "CompletedWithWarnings")
    assert [j["name"] for j in listed] == [job["name"]]

    # A restore from the vault that waits 2 s for a prune to let go of the vault.
    with vault_held(s, n):
        job = restore_job(s, n, rp, "Vault")
        time.sleep(2)
    slow = s.wait(n["rg"], n["vault"], job["name"])["properties"]
    assert seconds(slow["duration"]) > 2, slow["duration"]
    assert slow["status"] == "CompletedWithWarnings", slow
    assert error_codes(slow) == ["RestoreTakingLongerThanExpected"]
    assert "Best practice: keep restores under" in slow["errorDetails"][0]["recommendations"][0]
    assert sha(restored_data_disk(slow)) == sha(disk_file(s, vm, 0))
    # the snapshot tier restores at once: no warning
    fast = s.wait(n["rg"], n["vault"], restore_job(s, n, rp, "Snapshot")["name"])["properties"]
    assert fast["status"] == "Completed" and fast["errorDetails"] is None, fast


# --- backup troubleshoot -------------------------------------------------------------------------

def test_troubleshoot_codes_and_rows(tmp_path: Path) -> None:
    env = dict(os.environ, VMVAULT_HOME=str(tmp_path / "home"))
    env.pop("VMVAULT_API_URL", None)
    s = Stack(tmp_path / "home", env)  # offline: no stack is started

    def entries(key: str) -> list[dict[str, Any]]:
        return list(s.json("backup", "troubleshoot", "--code", key))

    b8 = entries("B8")
    assert [(e["code"], e["row"], e["applies"]) for e in b8] == [
        ("UserErrorBackupOperationInProgress", "B8", True)]
    assert b8[0]["action"] == "Wait for the running job to finish, then retry."
    freeze = entries("userErrorFsFreezeFailed")  # codes are matched case-insensitively
    assert [(e["code"], e["row"]) for e in freeze] == [("UserErrorFsFreezeFailed", "B14")]
    assert "fsck" in freeze[0]["action"]
    assert [e["code"] for e in entries("j2")] == ["UserErrorJobNotInCancellableState"]
    w3 = entries("W3")
    assert len(w3) == 1 and w3[0]["applies"] is False and w3[0]["code"] is None
    assert w3[0]["row"] == "W3" and "Windows only" in w3[0]["action"]

    table = s.run("backup", "troubleshoot", "--code", "B4", "-o", "table").out
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["Row", "Code", "Message"] and "Recommended action" in lines[0]
    assert lines[2].split()[:2] == ["B4", "UserErrorBCMPremiumStorageQuotaError"], table
    assert "raise its capacity" in table
    assert "(does not apply)" in s.run("backup", "troubleshoot", "--code", "W3", "-o",
                                       "table").out

    every = s.json("backup", "troubleshoot")
    rows = {e["row"] for e in every}
    assert {"J1", "J2", "J3", "J4"} <= rows
    codes = {e["code"] for e in every}
    assert {"JobCancelledByUser", "BackupTakingLongerThanExpected",
            "UserErrorKeyvaultPermissionsNotConfigured"} <= codes

    r = s.run("backup", "troubleshoot", "--code", "NoSuchCode", ok=False)
    assert_cli_error(r, "ResourceNotFound", "'NoSuchCode'", exit_code=3)


@needs_root()
def test_b10_vault_storage_refusing_writes_is_retried_then_fails(lock_stack: Stack,
                                                                 names: dict[str, str]) -> None:
    """Row B10 for real: the vault's file system refuses new packs (the data folder made
    immutable, which binds root too); each attempt fails, is retried with backoff, and the job
    fails with BackUpOperationFailed. Writable again, the next backup works."""
    s, n = lock_stack, names
    make_vm(s, n)
    protect(s, n)
    repo = Path(s.json("backup", "vault", "show", "-g", n["rg"], "-n", n["vault"])[
        "properties"]["repositoryPath"])
    frozen = [d for d in (repo / "data").iterdir() if d.is_dir()] + [repo / "data", repo / "tmp"]
    subprocess.run(["chattr", "+i", *map(str, frozen)], check=True)
    try:
        job = s.json("backup", "protection", "backup-now", *item_args(n))
        done = s.wait(n["rg"], n["vault"], job["name"])["properties"]
    finally:
        subprocess.run(["chattr", "-i", *map(str, frozen)], check=True)
    assert done["status"] == "Failed", done
    error = done["errorDetails"][0]
    assert error["errorCode"] == "BackUpOperationFailed", error
    assert "Operation not permitted" in error["errorString"], error
    assert error["recommendations"] == ["Retry in a few minutes."]
    info = bag(done)
    assert info["Transfer Retries"] == "3", info
    assert all("(BackUpOperationFailed)" in info[f"Transfer Attempt {i}"] for i in (1, 2, 3))
    assert rp_names(s, n) == []
    again = s.wait(n["rg"], n["vault"], s.json("backup", "protection", "backup-now",
                                               *item_args(n))["name"])["properties"]
    assert again["status"] == "Completed", again["errorDetails"]
    assert vault_check(s, n)["ok"] is True
