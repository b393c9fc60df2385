"""Backup and restore through the CLI against a real stack: full, incremental, restore from
vault and snapshot, the catalog errors a user can meet, corruption, kill -9 of the server."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    IS_ROOT,
    Stack,
    backup,
    item_args,
    make_stack,
    make_vm,
    protect,
)
from vmvault.cli.client import vault_path


def disk_file(stack: Stack, vm: dict[str, Any], lun: int) -> Path:
    """The raw image of a VM's data disk in the pool (what the lab guest writes through)."""
    uri = vm["storageProfile"]["dataDisks"][lun]["vhd"]["uri"]
    account, container, blob = uri.split("/")[-3:]
    return Path(stack.status()["pool"]["path"]) / account / container / blob


def write_raw(path: Path, seed: int, count: int, size: int = 65536) -> None:
    rng = random.Random(seed)
    disk_size = path.stat().st_size
    with open(path, "r+b") as f:
        for _ in range(count):
            f.seek(rng.randrange(2**20, disk_size - size) & ~4095)
            f.write(rng.randbytes(size // 2) + b"text " * (size // 10) + bytes(size - size // 2
                                                                               - 5 * (size // 10)))
        f.flush()
        os.fsync(f.fileno())


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def restore(stack: Stack, n: dict[str, str], rp: str, account: str, source: str = "Auto",
            ok: bool = True) -> dict[str, Any]:
    job = stack.json("backup", "restore", "restore-disks", *item_args(n), "-r", rp,
                     "--storage-account", account, "--restore-from", source)
    done = stack.wait(n["rg"], n["vault"], job["name"])
    if ok:
        assert done["properties"]["status"] == "Completed", done["properties"]["errorDetails"]
    return done


def test_full_incremental_restore_vault_and_snapshot(stack: Stack, names: dict[str, str]) -> None:
    n = names
    vm = make_vm(stack, n, data_disks=("1",), fs=("ext4",))
    if IS_ROOT:  # stop the guest so the raw writes below do not race its file system
        stack.run("vm", "stop", "-g", n["rg"], "-n", n["vm"])
    data = disk_file(stack, vm, 0)
    write_raw(data, seed=1, count=400)  # 25 MiB
    before = sha(data)
    protect(stack, n)
    first = backup(stack, n)
    p1 = first["properties"]
    assert p1["status"] == "Completed", p1.get("errorDetails")
    assert [t["taskId"] for t in p1["extendedInfo"]["tasksList"]] == [
        "Take Snapshot", "Transfer data to vault"]
    assert all(t["status"] == "Completed" for t in p1["extendedInfo"]["tasksList"])
    bag1 = p1["extendedInfo"]["propertyBag"]
    assert bag1["Incremental"] == "False" and bag1["Consistency"] == "CrashConsistent"

    write_raw(data, seed=2, count=40)  # ~2.5 MiB of 1 GiB changed
    after = sha(data)
    assert after != before
    second = backup(stack, n)
    bag2 = second["properties"]["extendedInfo"]["propertyBag"]
    assert bag2["Incremental"] == "True"
    rps = stack.json("backup", "recoverypoint", "list", *item_args(n))
    assert len(rps) == 2
    newest, oldest = rps
    assert newest["properties"]["recoveryPointType"] == "CrashConsistent"
    assert newest["properties"]["tier"] == "SnapshotAndVaultStandard"
    stats = newest["properties"]["transferStats"]
    assert stats["incremental"] is True
    # Only what changed was read: far less than the disks (1 GiB data + 1 GiB OS disk).
    assert stats["bytesScanned"] < 16 * 2**20, stats

    stack.run("storage", "account", "create", "-g", n["rg"], "-n", n["restore_sa"])
    from_vault = restore(stack, n, oldest["name"], n["restore_sa"], "Vault")
    bag = from_vault["properties"]["extendedInfo"]["propertyBag"]
    assert bag["Restored From"] == "Vault"
    disk = next(d for d in bag["Restored Disks"] if d["name"] == "datadisk-0")
    assert sha(Path(disk["path"])) == before
    from_snap = restore(stack, n, newest["name"], n["restore_sa"], "Auto")
    bag = from_snap["properties"]["extendedInfo"]["propertyBag"]
    assert bag["Restored From"] == "Snapshot"
    disk = next(d for d in bag["Restored Disks"] if d["name"] == "datadisk-0")
    assert sha(Path(disk["path"])) == after

    check = stack.json("backup", "vault", "check", "-g", n["rg"], "-n", n["vault"], "--read-data")
    assert check["ok"] is True, check
    table = stack.run("backup", "job", "list", "-g", n["rg"], "-v", n["vault"], "-o",
                      "table").out
    assert "Backup" in table and "Restore" in table and "Completed" in table
    assert len(stack.json("backup", "job", "list", "-g", n["rg"], "-v", n["vault"],
                          "--operation", "Restore")) == 2


def test_restore_target_validations(stack: Stack, names: dict[str, str]) -> None:
    n = names
    make_vm(stack, n)
    protect(stack, n)
    rp = backup(stack, n)["properties"]["extendedInfo"]["propertyBag"]["Recovery Point Name"]
    cases = [
        (["-l", "westus"], None, "UserErrorStorageAccountLocationMismatch", "R6"),
        (["--sku", "Premium_LRS"], None, "UserErrorStorageAccountTypeNotSupported", "R7"),
        ([], "unavailable", "UserErrorStorageAccountNotOnline", "R8"),
    ]
    for i, (flags, status, code, _row) in enumerate(cases):
        account = f"{n['restore_sa']}{i}"
        stack.run("storage", "account", "create", "-g", n["rg"], "-n", account, *flags)
        if status:
            stack.run("storage", "account", "update", "-g", n["rg"], "-n", account,
                      "--status", status)
        r = stack.run("backup", "restore", "restore-disks", *item_args(n), "-r", rp,
                      "--storage-account", account, ok=False)
        assert r.code == 1 and f"({code})" in r.err and "Recommended action:" in r.err


def test_deleted_vm_fails_the_backup_with_b1(stack: Stack, names: dict[str, str]) -> None:
    n = names
    make_vm(stack, n)
    protect(stack, n)
    stack.run("vm", "delete", "-g", n["rg"], "-n", n["vm"], "--yes")
    job = backup(stack, n)["properties"]
    assert job["status"] == "Failed"
    err = job["errorDetails"][0]
    assert err["errorCode"] == "UserErrorVmNotFound"
    assert "recreate the VM" in err["recommendations"][0]


def test_wrong_vault_password_and_corrupted_pack(stack: Stack, names: dict[str, str]) -> None:
    n = names
    vm = make_vm(stack, n)
    if IS_ROOT:
        stack.run("vm", "stop", "-g", n["rg"], "-n", n["vm"])
    write_raw(disk_file(stack, vm, 0), seed=3, count=200)
    protect(stack, n, "--password", "correct horse")
    rp = backup(stack, n)["properties"]["extendedInfo"]["propertyBag"]["Recovery Point Name"]
    ok = stack.json("backup", "vault", "check", "-g", n["rg"], "-n", n["vault"], "--password",
                    "correct horse")
    assert ok["ok"] is True
    r = stack.run("backup", "vault", "check", "-g", n["rg"], "-n", n["vault"], "--password",
                  "wrong", ok=False)
    assert r.code == 1 and "(UserErrorVaultKeyIncorrect)" in r.err

    vault = stack.json("backup", "vault", "show", "-g", n["rg"], "-n", n["vault"])
    packs = sorted(Path(vault["properties"]["repositoryPath"], "data").rglob("*"))
    pack = max((p for p in packs if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(pack.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    pack.write_bytes(bytes(raw))
    bad = stack.json("backup", "vault", "check", "-g", n["rg"], "-n", n["vault"], "--read-data")
    assert bad["ok"] is False and bad["errors"]
    stack.run("storage", "account", "create", "-g", n["rg"], "-n", n["restore_sa"])
    job = restore(stack, n, rp, n["restore_sa"], "Vault", ok=False)["properties"]
    assert job["status"] == "Failed"
    assert job["errorDetails"][0]["errorCode"] == "UserErrorVaultDataCorrupted"


def fill_incompressible(path: Path, mib: int) -> None:
    with open(path, "r+b") as f:
        for i in range(mib // 8):
            f.seek(2**20 + i * 8 * 2**20)
            f.write(os.urandom(8 * 2**20))
        os.fsync(f.fileno())


def job_now(stack: Stack, n: dict[str, str], job_id: str) -> dict[str, Any]:
    """A job read straight from the REST API (faster than a CLI start, for tight polling)."""
    return dict(stack.api(vault_path(n["rg"], n["vault"], "backupJobs", job_id))["properties"])


def test_second_backup_while_one_runs_gets_b8(stack: Stack, names: dict[str, str]) -> None:
    n = names
    vm = make_vm(stack, n, data_disks=("2",), fs=("ext4",))
    if IS_ROOT:
        stack.run("vm", "stop", "-g", n["rg"], "-n", n["vm"])
    fill_incompressible(disk_file(stack, vm, 0), 1024)
    protect(stack, n)
    first = stack.json("backup", "protection", "backup-now", *item_args(n))
    assert first["properties"]["status"] == "InProgress"
    r = stack.run("backup", "protection", "backup-now", *item_args(n), ok=False)
    assert job_now(stack, n, first["name"])["status"] == "InProgress"  # it really still ran
    assert r.code == 1
    assert "(UserErrorBackupOperationInProgress)" in r.err and first["name"] in r.err
    assert "Wait for the running job to finish" in r.err
    done = stack.wait(n["rg"], n["vault"], first["name"])
    assert done["properties"]["status"] == "Completed"


@pytest.fixture
def own_stack(tmp_path: Path) -> Any:
    s = make_stack(tmp_path / "home")
    yield s
    s.run("down", ok=False)


def test_kill_9_server_mid_backup_leaves_no_partial_point(own_stack: Stack,
                                                          names: dict[str, str]) -> None:
    s, n = own_stack, names
    vm = make_vm(s, n, data_disks=("1",), fs=("ext4",))
    if IS_ROOT:
        s.run("vm", "stop", "-g", n["rg"], "-n", n["vm"])
    path = disk_file(s, vm, 0)
    fill_incompressible(path, 768)  # a backup that lasts long enough to be killed halfway
    protect(s, n)
    job = s.json("backup", "protection", "backup-now", *item_args(n))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        props = job_now(s, n, job["name"])
        tasks = {t["taskId"]: t for t in props["extendedInfo"]["tasksList"]}
        if tasks["Transfer data to vault"]["progressPercentage"] > 5:
            break
        assert props["status"] == "InProgress", props
        time.sleep(0.05)
    os.kill(s.status()["server"]["pid"], signal.SIGKILL)
    s.run("up")
    failed = s.json("backup", "job", "show", "-g", n["rg"], "-v", n["vault"], "-n", job["name"])
    assert failed["properties"]["status"] == "Failed"
    assert "server stopped" in failed["properties"]["errorDetails"][0]["errorString"]
    assert s.json("backup", "recoverypoint", "list", *item_args(n)) == []
    check = s.json("backup", "vault", "check", "-g", n["rg"], "-n", n["vault"], "--read-data")
    assert check["ok"] is True, check
    again = backup(s, n)["properties"]
    assert again["status"] == "Completed"
    rps = s.json("backup", "recoverypoint", "list", *item_args(n))
    assert len(rps) == 1
    s.run("storage", "account", "create", "-g", n["rg"], "-n", n["restore_sa"])
    done = restore(s, n, rps[0]["name"], n["restore_sa"], "Vault")
    disk = next(d for d in done["properties"]["extendedInfo"]["propertyBag"]["Restored Disks"]
                if d["name"] == "datadisk-0")
    assert sha(Path(disk["path"])) == sha(path)
