"""The end-to-end demo: `make demo` (or `python -m vmvault.demo`).

Makes a VM with two data disks, writes known files, backs it up, changes 1% of
the data, backs it up again (incrementally), restores the first recovery point
from the vault into a new storage account, and proves with checksums that the
restored disks hold the files as they were at the first backup. Every step is
printed as the command a user would type.

As root the disks are mounted (ext4 and xfs) and the files checked through the
file systems; without root the disks stay unmounted, the data is written
through the Blob endpoint and the raw disks are checksummed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from vmvault.config import is_root

RG, SA, RESTORE_SA = "demo-rg", "demodisks", "demorestore"
VM, VAULT, LOC = "demo-vm", "demo-vault", "eastus"
FILE_MIB = 24  # per data disk
CHANGE_FRACTION = 0.01


class DemoFailed(Exception):
    pass


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def vmvault(*args: str, capture: bool = False) -> Any:
    """Run a vmvault command as a user would, printing it first."""
    print(f"$ vmvault {shlex.join(args)}", flush=True)
    cmd = [sys.executable, "-m", "vmvault.cli.main", *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True,
                          check=False)
    if proc.returncode != 0:
        raise DemoFailed(f"'vmvault {shlex.join(args)}' exited with {proc.returncode}")
    return json.loads(proc.stdout) if capture and proc.stdout.strip() else None


def wait(job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = vmvault("backup", "job", "wait", "-g", RG, "-v", VAULT, "-n", job_id,
                                  "-o", "json", capture=True)
    props = job["properties"]
    print(f"   job {job_id[:8]}: {props['status']} in {props['duration']}")
    if props["status"] != "Completed":
        raise DemoFailed(f"job {job_id} ended {props['status']}: {props.get('errorDetails')}")
    return job


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _payload(rng: random.Random, size: int) -> bytes:
    """Half random bytes, half text: a little like real data."""
    half = size // 2
    text = (b"vmvault demo line %d: the quick brown fox jumps over the lazy dog\n" * 1)
    lines = b"".join(text.replace(b"%d", str(i).encode()) for i in range(half // len(text) + 1))
    return rng.randbytes(half) + lines[: size - half]


# --- the two ways to reach the disks ---------------------------------------------------------


def mounted_disks(vm: dict[str, Any]) -> list[tuple[str, Path]]:
    disks = vm["storageProfile"]["dataDisks"]
    return [(d["name"], Path(d["mountPoint"])) for d in disks]


def write_files(vm: dict[str, Any], rng: random.Random) -> dict[str, str]:
    sums = {}
    for name, mount in mounted_disks(vm):
        for i in range(2):
            path = mount / f"data-{i}.bin"
            path.write_bytes(_payload(rng, FILE_MIB * 2**20 // 2))
            sums[f"{name}/{path.name}"] = sha256(path)
        (mount / "hello.txt").write_text(f"written by the vmvault demo on {name}\n")
        sums[f"{name}/hello.txt"] = sha256(mount / "hello.txt")
    os.sync()
    return sums


def change_files(vm: dict[str, Any], rng: random.Random) -> int:
    """Rewrite 1% of the data in place, as 64 KiB writes at random offsets."""
    written = 0
    for _name, mount in mounted_disks(vm):
        for path in sorted(mount.glob("data-*.bin")):
            size = path.stat().st_size
            with open(path, "r+b") as f:
                for _ in range(max(1, int(size * CHANGE_FRACTION) // 65536)):
                    f.seek(rng.randrange(0, size - 65536) & ~4095)
                    f.write(rng.randbytes(65536))
                    written += 65536
                os.fsync(f.fileno())
    return written


def blob_client(account: str, container: str, blob: str) -> Any:
    from azure.storage.blob import BlobClient

    keys = vmvault("storage", "account", "keys", "list", "-g", RG, "-n", account, "-o", "json",
                   capture=True)
    status = vmvault("status", "-o", "json", capture=True)
    return BlobClient(f"{status['blobEndpoint']['url']}/{account}", container, blob,
                      credential={"account_name": account, "account_key": keys[0]["value"]})


def write_raw(vm: dict[str, Any], rng: random.Random, fraction: float) -> int:
    """Without root: write pages straight into the data disks through the Blob endpoint."""
    written = 0
    for disk in vm["storageProfile"]["dataDisks"]:
        container, blob = disk["vhd"]["uri"].rsplit("/", 2)[-2:]
        client = blob_client(SA, container, blob)
        size = disk["diskSizeGb"] * 2**30
        total = int(size * fraction) if fraction < 1 else FILE_MIB * 2**20
        for _ in range(total // 65536):
            offset = rng.randrange(2**20, size - 65536) & ~511
            client.upload_page(_payload(rng, 65536), offset=offset, length=65536)
            written += 65536
    return written


def raw_sums(vm: dict[str, Any]) -> dict[str, str]:
    sums = {}
    for disk in vm["storageProfile"]["dataDisks"]:
        container, blob = disk["vhd"]["uri"].rsplit("/", 2)[-2:]
        h = hashlib.sha256()
        for chunk in blob_client(SA, container, blob).download_blob().chunks():
            h.update(chunk)
        sums[disk["name"]] = h.hexdigest()
    return sums


# --- checking the restore --------------------------------------------------------------------


def check_restored_mounted(restored: list[dict[str, Any]], expected: dict[str, str],
                           live: dict[str, str], workdir: Path) -> int:
    checked = 0
    for disk in restored:
        if disk["lun"] < 0:
            continue
        mount = workdir / f"restored-{disk['name']}"
        mount.mkdir(parents=True, exist_ok=True)
        # Read-write: a crash-consistent image replays its journal when mounted (a read-only
        # mount would refuse); it is a restored copy, nothing else uses it.
        options = "loop,nouuid" if disk.get("fsType") == "xfs" else "loop"
        print(f"$ mount -o {options} {disk['path']} {mount}")
        proc = subprocess.run(["mount", "-o", options, disk["path"], str(mount)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise DemoFailed(f"the restored {disk['name']} does not mount: {proc.stderr.strip()}")
        try:
            for key, digest in expected.items():
                disk_name, file_name = key.split("/", 1)
                if disk_name != disk["name"]:
                    continue
                got = sha256(mount / file_name)
                mark = "ok" if got == digest else "DIFFERENT"
                if live.get(key, digest) != digest:
                    mark += " (the live VM's copy has changed since)"
                print(f"   {key}: sha256 {got[:16]}... {mark}")
                if got != digest:
                    raise DemoFailed(f"{key} differs from the first backup's")
                checked += 1
        finally:
            subprocess.run(["umount", str(mount)], check=False)
    return checked


def check_restored_raw(restored: list[dict[str, Any]], expected: dict[str, str],
                       live: dict[str, str]) -> int:
    checked = 0
    for disk in restored:
        if disk["name"] not in expected:
            continue
        got = sha256(Path(disk["path"]))
        mark = "ok" if got == expected[disk["name"]] else "DIFFERENT"
        if live.get(disk["name"]) != expected[disk["name"]]:
            mark += " (the live disk has changed since)"
        print(f"   {disk['name']} (raw): sha256 {got[:16]}... {mark}")
        if got != expected[disk["name"]]:
            raise DemoFailed(f"restored {disk['name']} differs from the first backup's")
        checked += 1
    return checked


# --- the story -------------------------------------------------------------------------------


def run(keep: bool) -> None:
    rng = random.Random(20261123)
    root = is_root()
    retain = (dt.date.today() + dt.timedelta(days=30)).strftime("%d-%m-%Y")
    item = ["-g", RG, "-v", VAULT, "-c", VM, "-i", VM]

    say("Start the local stack (server, job workers, Blob endpoint)")
    vmvault("up", "-o", "table")
    vmvault("status", "--query", "{server: server.url, blob: blobEndpoint.url, pool: pool}",
            "-o", "yaml")

    say("Make the fabric: a resource group, a storage account, a VM with two data disks")
    vmvault("group", "create", "-n", RG, "-l", LOC, "-o", "table")
    vmvault("storage", "account", "create", "-g", RG, "-n", SA, "-l", LOC, "--sku",
            "Standard_LRS", "-o", "table")
    vm = vmvault("vm", "create", "-g", RG, "-n", VM, "--storage-account", SA,
                 "--os-disk-size-gb", "1", "--data-disk-sizes-gb", "1", "1",
                 "--data-disk-fs-types", "ext4", "xfs", "-o", "json", capture=True)
    vmvault("vm", "list", "-g", RG, "-o", "table")

    say("Write known data into the VM's disks")
    if root and vm["disksMounted"]:
        expected = write_files(vm, rng)
        print(f"   wrote {len(expected)} files on the mounted data disks (ext4 and xfs)")
    else:
        print("   not root: the disks are not mounted; writing pages through the Blob endpoint")
        write_raw(vm, rng, 1.0)
        expected = raw_sums(vm)

    say("Create a vault and protect the VM (the Azure CLI's own commands, az -> vmvault)")
    vmvault("backup", "vault", "create", "-g", RG, "-n", VAULT, "-l", LOC, "-o", "table")
    vmvault("backup", "protection", "enable-for-vm", "-g", RG, "-v", VAULT, "--vm", VM,
            "--policy-name", "DefaultPolicy", "-o", "table")

    say("The VM agent runs in the guest and has registered with the server")
    vmvault("vm", "agent", "show", "-g", RG, "--vm-name", VM, "-o", "table")

    say("First backup (full; the VM agent installs the VMSnapshot extension, which freezes the "
        "file systems, snapshots the disks and thaws)")
    job = vmvault("backup", "protection", "backup-now", *item, "--retain-until", retain,
                  "-o", "json", capture=True)
    first = wait(job["name"])
    bag = first["properties"]["extendedInfo"]["propertyBag"]
    first_rp = bag["Recovery Point Name"]
    print(f"   recovery point {first_rp}: {bag['Consistency']}, freeze window "
          f"{bag.get('Freeze Window (ms)', '-')} ms, scanned {bag['Data Scanned']}, "
          f"added {bag['Backup Size']}")
    vmvault("vm", "extension", "list", "--resource-group", RG, "--vm-name", VM, "-o", "table")

    say("Change 1% of the data")
    if root and vm["disksMounted"]:
        changed = change_files(vm, rng)
        live = {key: sha256(mount / key.split("/", 1)[1]) for key in expected
                for name, mount in mounted_disks(vm) if key.startswith(name + "/")}
    else:
        changed = write_raw(vm, rng, CHANGE_FRACTION)
        live = raw_sums(vm)
    if live == expected:
        raise DemoFailed("the change did not change anything")
    print(f"   rewrote {changed / 2**20:.1f} MiB in 64 KiB writes at random offsets")

    say("Second backup (incremental: only the changed ranges are read)")
    job = vmvault("backup", "protection", "backup-now", *item, "--retain-until", retain,
                  "-o", "json", capture=True)
    second = wait(job["name"])
    bag = second["properties"]["extendedInfo"]["propertyBag"]
    print(f"   recovery point {bag['Recovery Point Name']}: incremental={bag['Incremental']}, "
          f"scanned {bag['Data Scanned']}, added {bag['Backup Size']}")
    if bag["Incremental"] != "True":
        raise DemoFailed("the second backup was not incremental")
    vmvault("backup", "recoverypoint", "list", *item, "-o", "table")
    vmvault("backup", "job", "list", "-g", RG, "-v", VAULT, "-o", "table")

    say("Restore the first recovery point from the vault into a new storage account")
    vmvault("storage", "account", "create", "-g", RG, "-n", RESTORE_SA, "-l", LOC, "--sku",
            "Standard_LRS", "-o", "table")
    job = vmvault("backup", "restore", "restore-disks", *item, "-r", first_rp,
                  "--storage-account", RESTORE_SA, "--restore-from", "Vault", "-o", "json",
                  capture=True)
    restored_job = wait(job["name"])
    restored = restored_job["properties"]["extendedInfo"]["propertyBag"]["Restored Disks"]
    for disk in restored:
        print(f"   {disk['name']}: {disk['uri']}")

    say("Prove the restored disks hold the data of the first backup's time")
    with tempfile.TemporaryDirectory(prefix="vmvault-demo-") as tmp:
        if root and vm["disksMounted"]:
            checked = check_restored_mounted(restored, expected, live, Path(tmp))
        else:
            checked = check_restored_raw(restored, expected, live)
    if checked != len(expected):
        raise DemoFailed(f"checked {checked} of {len(expected)} expected items")

    say("Verify every chunk in the vault")
    report = vmvault("backup", "vault", "check", "-g", RG, "-n", VAULT, "--read-data",
                     "-o", "json", capture=True)
    print(f"   ok={report['ok']} errors={len(report['errors'])} counts={report['counts']}")
    if not report["ok"]:
        raise DemoFailed(f"vault check found errors: {report['errors']}")

    if not keep:
        say("Stop the stack")
        vmvault("down", "-o", "none")
    mode = ("mounted ext4/xfs disks frozen by the VMSnapshot extension, files checked"
            if root and vm["disksMounted"] else "no root: crash-consistent, raw disks checked")
    print(f"\nDEMO SUCCEEDED: {checked} checksums match the first backup ({mode}).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vmvault-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", help="VMVAULT_HOME for the demo (default: a fresh "
                        "./demo-home, wiped first)")
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    args = parser.parse_args(argv)
    home = Path(args.home or os.environ.get("VMVAULT_DEMO_HOME") or "demo-home").resolve()
    os.environ["VMVAULT_HOME"] = str(home)
    os.environ.pop("VMVAULT_API_URL", None)
    if home.exists():
        subprocess.run([sys.executable, "-m", "vmvault.cli.main", "down", "-o", "none"],
                       check=False)
        shutil.rmtree(home)
    print(f"vmvault demo in VMVAULT_HOME={home} ({'root' if is_root() else 'not root'})")
    try:
        run(args.keep)
    except DemoFailed as exc:
        print(f"\nDEMO FAILED: {exc}\nLogs: {home / 'logs'}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "vmvault.cli.main", "down", "-o", "none"],
                       check=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
