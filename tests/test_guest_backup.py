"""Backups through the guest, for real: the VM agent runs the VMSnapshot extension, which
freezes the lab VM's mounted file systems, snapshots its disks over SAS URIs and thaws.

Application consistency with a SQLite database written in a loop and a pre-script that
checkpoints it; and the catalog rows that need the guest (B2, B3, B5, B6, B11, B12, B14, S1,
S4, an expired SAS), each made to happen for real and checked through the CLI.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    Stack,
    backup,
    item_args,
    make_stack,
    make_vm,
    needs_root,
    protect,
    vm_path,
    wait_agent_ready,
)

# Short bounds so that each failure shows in seconds. The lab guest's CPU is this machine's,
# which the test run itself keeps busy: the load limit (row S4) is off except in its own test.
FAST = {"VMVAULT_AGENT_STALE_SECONDS": "4", "VMVAULT_AGENT_PICKUP_SECONDS": "6",
        "VMVAULT_AGENT_STOP_SECONDS": "5", "VMVAULT_AGENT_HEARTBEAT_SECONDS": "1",
        "VMVAULT_GUEST_LOAD_LIMIT": "101"}


@pytest.fixture(scope="module")
def gstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = make_stack(tmp_path_factory.mktemp("vmvault-guest"), **FAST)
    yield s
    s.run("down", ok=False)


@contextlib.contextmanager
def own_stack(tmp_path: Path, **env: str) -> Iterator[Stack]:
    """A stack of its own, for a test that needs other server settings."""
    s = make_stack(tmp_path / "home", **{**FAST, **env})
    try:
        yield s
    finally:
        s.run("down", ok=False)


def guest_root(stack: Stack, n: dict[str, str]) -> Path:
    return stack.home / "vms" / n["rg"] / n["vm"] / "guest"


def agent_pid(stack: Stack, n: dict[str, str]) -> int:
    return int((guest_root(stack, n) / "var" / "run" / "waagent.pid").read_text())


def ready_vm(stack: Stack, n: dict[str, str], *disks: str, **kw: Any) -> dict[str, Any]:
    vm = make_vm(stack, n, data_disks=disks or ("1",), **kw)
    wait_agent_ready(stack, n)
    protect(stack, n)
    return vm


def failed_backup(stack: Stack, n: dict[str, str]) -> dict[str, Any]:
    job = backup(stack, n)
    assert job["properties"]["status"] == "Failed", job
    return job


def error_of(job: dict[str, Any]) -> dict[str, Any]:
    return dict(job["properties"]["errorDetails"][0])


def show_job_text(stack: Stack, n: dict[str, str], job: dict[str, Any]) -> str:
    """What a user reads: the job shown as a table and the error lines."""
    r = stack.run("backup", "job", "show", "-g", n["rg"], "-v", n["vault"], "-n", job["name"])
    return r.out + r.err


def assert_row(stack: Stack, n: dict[str, str], job: dict[str, Any], code: str,
               words: str) -> None:
    err = error_of(job)
    assert err["errorCode"] == code, err
    assert words.lower() in err["errorString"].lower(), err
    assert err["recommendations"], err
    assert code in show_job_text(stack, n, job) or code in json.dumps(job)


# --- the happy path ---------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sqlite3, sys, time
    db, log = sys.argv[1], sys.argv[2]
    con = sqlite3.connect(db, timeout=60, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, payload BLOB)")
    with open(log, "a") as out:
        i = 0
        while True:
            i += 1
            con.execute("BEGIN")
            con.execute("INSERT INTO t VALUES (?, ?)", (i, bytes(2000)))
            con.execute("COMMIT")
            out.write(f"{i}\\n"); out.flush()
            time.sleep(0.002)
""")

PRE_SCRIPT = """#!/bin/sh
# Checkpoint the database and note the last committed transaction (the app's "pre" step).
"${{VMVAULT_PYTHON:-python3}}" - <<'EOF'
import sqlite3
con = sqlite3.connect("{db}", timeout=60)
con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
(last,) = con.execute("SELECT max(id) FROM t").fetchone()
open("{marker}", "w").write(str(last))
EOF
"""


def install_scripts(root: Path, db: Path, marker: Path) -> None:
    """The pre/post script plugin configuration of Azure's extension, root-owned, 600/700.
    Paths inside the configuration are the guest's (under the guest root in the lab)."""
    etc = root / "etc" / "azure"
    etc.mkdir(parents=True, exist_ok=True)
    pre, post = etc / "pre.sh", etc / "post.sh"
    pre.write_text(PRE_SCRIPT.format(db=db, marker=marker))
    post.write_text("#!/bin/sh\nexit 0\n")
    for script in (pre, post):
        script.chmod(0o700)
    plugin = etc / "VMSnapshotScriptPluginConfig.json"
    plugin.write_text(json.dumps({
        "pluginName": "ScriptRunner", "preScriptLocation": "/etc/azure/pre.sh",
        "postScriptLocation": "/etc/azure/post.sh", "preScriptParams": [], "postScriptParams": [],
        "preScriptNoOfRetries": 0, "postScriptNoOfRetries": 0, "timeoutInSeconds": 30,
        "continueBackupOnFailure": False, "fsFreezeEnabled": True}))
    plugin.chmod(0o600)
    host = etc / "VMSnapshotPluginHost.conf"
    host.write_text("[pre_post]\ntimeoutInSeconds=60\nnumberOfPlugins=1\n"
                    "pluginName0=ScriptRunner\npluginPath0=/etc/azure\n"
                    "pluginConfigPath0=/etc/azure/VMSnapshotScriptPluginConfig.json\n")
    host.chmod(0o644)


def restored_disk(stack: Stack, n: dict[str, str], job: dict[str, Any], lun: int) -> Path:
    """The file of a restored data disk in the pool."""
    disks = job["properties"]["extendedInfo"]["propertyBag"]["Restored Disks"]
    return Path(next(d for d in disks if d["lun"] == lun)["path"])


@needs_root()
def test_application_consistent_backup_of_a_live_database(gstack: Stack, names: dict[str, str],
                                                          tmp_path: Path) -> None:
    n = names
    vm = ready_vm(gstack, n, "1", "1", fs=("ext4", "xfs"))
    mount = Path(vm["storageProfile"]["dataDisks"][1]["mountPoint"])
    db, committed, marker = mount / "app.db", tmp_path / "committed.log", tmp_path / "pre.txt"
    install_scripts(guest_root(gstack, n), db, marker)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(committed)])
    try:
        time.sleep(1.0)
        job = backup(gstack, n)
        time.sleep(0.5)
    finally:
        writer.kill()
        writer.wait()
    assert job["properties"]["status"] == "Completed", job
    bag = job["properties"]["extendedInfo"]["propertyBag"]
    assert bag["Consistency"] == "AppConsistent"
    assert float(bag["Freeze Window (ms)"]) >= 0
    last_before = int(marker.read_text())
    assert last_before > 10
    rps = gstack.json("backup", "recoverypoint", "list", *item_args(n))
    assert rps[0]["properties"]["recoveryPointType"] == "AppConsistent"
    assert rps[0]["properties"]["freezeWindowMilliseconds"] is not None

    # Restore into a new account, mount the restored xfs disk, check the database.
    gstack.run("storage", "account", "create", "-g", n["rg"], "-n", n["restore_sa"], "--sku",
               "Standard_LRS")
    rjob = gstack.json("backup", "restore", "restore-disks", *item_args(n), "-r", rps[0]["name"],
                       "--storage-account", n["restore_sa"])
    done = gstack.wait(n["rg"], n["vault"], rjob["name"])
    assert done["properties"]["status"] == "Completed", done
    image = restored_disk(gstack, n, done, 1)
    target = tmp_path / "restored"
    target.mkdir()
    subprocess.run(["mount", "-o", "loop,nouuid", str(image), str(target)], check=True)
    try:
        con = sqlite3.connect(target / "app.db")
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = {row[0] for row in con.execute("SELECT id FROM t")}
        con.close()
    finally:
        subprocess.run(["umount", str(target)], check=False)
    missing = set(range(1, last_before + 1)) - ids
    assert not missing, f"{len(missing)} transactions committed before the freeze are missing"


@needs_root()
def test_extension_list_and_logs_after_first_backup(gstack: Stack, names: dict[str, str]) -> None:
    n = names
    ready_vm(gstack, n)
    assert gstack.json("vm", "extension", "list", "-g", n["rg"], "--vm-name", n["vm"]) == []
    job = backup(gstack, n)
    assert job["properties"]["status"] == "Completed", job
    table = gstack.run("vm", "extension", "list", "--resource-group", n["rg"], "--vm-name",
                       n["vm"], "-o", "table").out
    head = table.splitlines()[0].split()
    assert head == ["Name", "ProvisioningState", "Publisher", "Version",
                    "AutoUpgradeMinorVersion"], table
    assert "VMSnapshot" in table and "Succeeded" in table and "1.9" in table
    ext = gstack.json("vm", "extension", "show", "-g", n["rg"], "--vm-name", n["vm"], "-n",
                      "VMSnapshot")
    assert ext["protectedSettings"] is None  # never shown back
    assert ext["settings"]["commandToExecute"] == "snapshot"
    log = (guest_root(gstack, n) / "var" / "log" / "waagent.log").read_text()
    assert "Microsoft.RecoveryServices.VMSnapshot" in log


# --- the catalog rows ---------------------------------------------------------------------------


def test_b11_no_agent(gstack: Stack, names: dict[str, str]) -> None:
    n = names
    gstack.run("group", "create", "-n", n["rg"], "-l", n["loc"])
    gstack.run("storage", "account", "create", "-g", n["rg"], "-n", n["sa"], "--sku",
               "Standard_LRS")
    gstack.run("vm", "create", "-g", n["rg"], "-n", n["vm"], "--storage-account", n["sa"],
               "--os-disk-size-gb", "1", "--enable-agent", "false")
    protect(gstack, n)
    job = failed_backup(gstack, n)
    assert_row(gstack, n, job, "UserErrorGuestAgentNotInstalled", "has no VM agent")


def test_b2_agent_stopped(gstack: Stack, names: dict[str, str]) -> None:
    n = names
    ready_vm(gstack, n)
    os.kill(agent_pid(gstack, n), signal.SIGKILL)
    time.sleep(5)  # past VMVAULT_AGENT_STALE_SECONDS
    job = failed_backup(gstack, n)
    assert_row(gstack, n, job, "UserErrorGuestAgentStatusUnavailable", "unreachable")
    gstack.run("vm", "agent", "start", "-g", n["rg"], "--vm-name", n["vm"])
    wait_agent_ready(gstack, n)
    again = backup(gstack, n)
    assert again["properties"]["status"] == "Completed", again["properties"]["errorDetails"]


def test_s2_guest_shut_down_from_inside_is_stopped_and_still_backed_up(
        gstack: Stack, names: dict[str, str]) -> None:
    n = names
    ready_vm(gstack, n)
    root = guest_root(gstack, n)
    (root / "run/systemd/shutdown").mkdir(parents=True, exist_ok=True)
    (root / "run/systemd/shutdown/scheduled").write_text("USEC=0\nMODE=poweroff\n")
    os.kill(agent_pid(gstack, n), signal.SIGTERM)  # what 'shutdown -h now' does to services

    def state() -> str:
        return str(gstack.json("vm", "show", "-g", n["rg"], "-n", n["vm"])["powerState"])
    deadline = time.monotonic() + 30
    while state() != "VM stopped":
        assert time.monotonic() < deadline, state()
        time.sleep(0.3)
    (root / "run/systemd/shutdown/scheduled").unlink()
    done = backup(gstack, n)  # a stopped VM is snapshotted by the host: no agent needed
    assert done["properties"]["status"] == "Completed", done["properties"]["errorDetails"]
    assert done["properties"]["extendedInfo"]["propertyBag"]["Consistency"] == "CrashConsistent"
    gstack.run("vm", "start", "-g", n["rg"], "-n", n["vm"])
    wait_agent_ready(gstack, n)


def test_s2_an_agent_stopped_without_a_shutdown_leaves_the_vm_running(
        gstack: Stack, names: dict[str, str]) -> None:
    n = names
    ready_vm(gstack, n)
    os.kill(agent_pid(gstack, n), signal.SIGTERM)  # 'systemctl stop waagent': not a shutdown
    time.sleep(3)
    assert gstack.json("vm", "show", "-g", n["rg"], "-n", n["vm"])["powerState"] == "VM running"


def test_b5_agent_hangs(gstack: Stack, names: dict[str, str]) -> None:
    n = names
    ready_vm(gstack, n)
    pid = agent_pid(gstack, n)
    os.kill(pid, signal.SIGSTOP)  # heartbeats are still recent: the hang shows at pickup
    try:
        job = failed_backup(gstack, n)
    finally:
        os.kill(pid, signal.SIGCONT)
    err = error_of(job)
    assert err["errorCode"] in ("GuestAgentSnapshotTaskStatusError",
                                "UserErrorGuestAgentStatusUnavailable"), err
    assert err["errorCode"] == "GuestAgentSnapshotTaskStatusError" or "heartbeat" in \
        err["errorString"]


@needs_root()
def test_b12_vm_stopping(gstack: Stack, names: dict[str, str]) -> None:
    n = names
    ready_vm(gstack, n)
    os.kill(agent_pid(gstack, n), signal.SIGSTOP)  # a hung agent keeps the VM 'stopping'
    gstack.run("vm", "stop", "-g", n["rg"], "-n", n["vm"], "--no-wait")
    assert gstack.json("vm", "show", "-g", n["rg"], "-n", n["vm"])["powerState"] == "VM stopping"
    job = failed_backup(gstack, n)
    assert_row(gstack, n, job, "UserErrorVmNotInDesirableState", "stopping")


@needs_root()
def test_b14_mount_that_cannot_be_frozen(gstack: Stack, names: dict[str, str]) -> None:
    n = names
    vm = ready_vm(gstack, n, "1")
    mount = vm["storageProfile"]["dataDisks"][0]["mountPoint"]
    subprocess.run(["fsfreeze", "-f", mount], check=True)  # another tool holds it frozen
    try:
        job = failed_backup(gstack, n)
    finally:
        subprocess.run(["fsfreeze", "-u", mount], check=False)
    assert_row(gstack, n, job, "UserErrorFsFreezeFailed", mount)
    # The extension never thawed what it had not frozen; after the other tool thaws, it works.
    again = backup(gstack, n)
    assert again["properties"]["status"] == "Completed", again["properties"]["errorDetails"]


def test_b3_failed_extension_fails_the_vm(gstack: Stack, names: dict[str, str]) -> None:
    n = names
    ready_vm(gstack, n)
    # The seed's settings with a field the handler refuses (vmType): the extension fails.
    gstack.run("vm", "extension", "set", "-g", n["rg"], "--vm-name", n["vm"], "-n", "VMSnapshot",
               "--publisher", "Microsoft.RecoveryServices", "--version", "1.9",
               "--settings", json.dumps({"locale": "en-us", "taskId": "x_1",
                                         "commandToExecute": "snapshot",
                                         "commandStartTimeUTCTicks": "6.36458E+17",
                                         "vmType": "not-a-vm-type"}))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ext = gstack.json("vm", "extension", "show", "-g", n["rg"], "--vm-name", n["vm"],
                          "-n", "VMSnapshot")
        if ext["provisioningState"] != "Creating":
            break
        time.sleep(0.3)
    assert ext["provisioningState"] == "Failed", ext
    assert gstack.json("vm", "show", "-g", n["rg"], "-n", n["vm"])["provisioningState"] == "Failed"
    job = failed_backup(gstack, n)
    assert_row(gstack, n, job, "UserErrorVmProvisioningStateFailed", "failed provisioning")
    # The action: remove the failed extension, restart the VM.
    gstack.run("vm", "extension", "delete", "-g", n["rg"], "--vm-name", n["vm"], "-n",
               "VMSnapshot")
    assert gstack.json("vm", "show", "-g", n["rg"], "-n", n["vm"])["provisioningState"] == \
        "Succeeded"


def test_deploy_the_seed_resource_from_a_template(gstack: Stack, names: dict[str, str],
                                                  tmp_path: Path) -> None:
    n = names
    ready_vm(gstack, n)
    seed = {"type": "extensions", "name": "VMSnapshot", "location": "<myLocation>",
            "properties": {"publisher": "Microsoft.RecoveryServices", "type": "VMSnapshot",
                           "typeHandlerVersion": "1.9", "autoUpgradeMinorVersion": True,
                           "settings": {"locale": "<location>",
                                        "taskId": "<id of the backup task>",
                                        "commandToExecute": "snapshot",
                                        "commandStartTimeUTCTicks": "<scheduled start time>",
                                        "vmType": "microsoft.compute/virtualmachines"},
                           "protectedSettings": {"objectStr": "<encoded array>",
                                                 "logsBlobUri": "<blob URI>",
                                                 "statusBlobUri": "<blob URI>"}}}
    template = {"$schema": "https://schema.management.azure.com/schemas/2015-01-01/"
                           "deploymentTemplate.json#", "contentVersion": "1.0.0.0",
                "parameters": {"vmName": {"type": "string"}},
                "resources": [{"type": "Microsoft.Compute/virtualMachines",
                               "name": "[parameters('vmName')]", "apiVersion": "2015-06-15",
                               "location": "[resourceGroup().location]", "resources": [seed]}]}
    path = tmp_path / "template.json"
    path.write_text(json.dumps(template))
    out = gstack.json("deployment", "group", "create", "-g", n["rg"], "--template-file",
                      str(path), "--parameters", f"vmName={n['vm']}")
    assert out["properties"]["provisioningState"] == "Succeeded"
    ext = gstack.json("vm", "extension", "show", "-g", n["rg"], "--vm-name", n["vm"], "-n",
                      "VMSnapshot")
    assert ext["typeHandlerVersion"] == "1.9" and ext["publisher"] == "Microsoft.RecoveryServices"
    # The placeholders are not a valid command: the handler says which field is wrong.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and ext["provisioningState"] in ("Creating", "Updating"):
        time.sleep(0.3)
        ext = gstack.json("vm", "extension", "show", "-g", n["rg"], "--vm-name", n["vm"], "-n",
                          "VMSnapshot")
    assert "commandStartTimeUTCTicks" in json.dumps(ext["instanceView"]), ext


def test_b6_agent_older_than_the_minimum(tmp_path: Path, names: dict[str, str]) -> None:
    with own_stack(tmp_path, VMVAULT_MIN_AGENT_VERSION="99.0") as s:
        ready_vm(s, names)
        job = failed_backup(s, names)
        assert_row(s, names, job, "UserErrorGuestAgentVersionNotSupported",
                   "older than the minimum")


def test_expired_sas(tmp_path: Path, names: dict[str, str]) -> None:
    with own_stack(tmp_path, VMVAULT_SAS_TTL_SECONDS="-60") as s:
        ready_vm(s, names)
        job = failed_backup(s, names)
        assert_row(s, names, job, "ExtensionSnapshotFailedAuthorization", "refused")


def test_s4_busy_guest(tmp_path: Path, names: dict[str, str]) -> None:
    with own_stack(tmp_path, VMVAULT_GUEST_LOAD_LIMIT="60") as s:
        ready_vm(s, names)
        # Every core busy in the guest (this machine is the lab guest's host).
        burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                   for _ in range(os.cpu_count() or 2)]
        try:
            time.sleep(3)
            job = failed_backup(s, names)
        finally:
            for b in burners:
                b.kill()
                b.wait()
        assert_row(s, names, job, "UserErrorGuestResourcesOverloaded", "CPU")


def test_s1_storage_unreachable_from_the_guest(tmp_path: Path, names: dict[str, str]) -> None:
    with own_stack(tmp_path) as s:
        ready_vm(s, names)
        blob_pid = int(json.loads((s.home / "stack.json").read_text())["blob_pid"])
        os.kill(blob_pid, signal.SIGKILL)  # the guest's connections to storage are refused
        started = time.monotonic()
        job = failed_backup(s, names)
        assert time.monotonic() - started < 60
        assert_row(s, names, job, "ExtensionSnapshotFailedNoNetwork", "could not reach")


def test_agent_is_started_and_stopped_with_the_vm(gstack: Stack, names: dict[str, str]) -> None:
    n = names
    ready_vm(gstack, n)
    pid = agent_pid(gstack, n)
    gstack.run("vm", "stop", "-g", n["rg"], "-n", n["vm"])
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    view = gstack.api(vm_path(n, "instanceView"))["vmAgent"]
    assert view["pid"] is None
    gstack.run("vm", "start", "-g", n["rg"], "-n", n["vm"])
    wait_agent_ready(gstack, n)
    text = gstack.run("vm", "agent", "show", "-g", n["rg"], "--vm-name", n["vm"], "-o",
                      "table").out
    assert "Ready" in text


class ForwardingProxy:
    """A plain HTTP proxy on 127.0.0.1 that forwards absolute-form requests and counts them
    by path, so a test can see which calls went through it."""

    def __init__(self) -> None:
        import http.server
        import threading

        import httpx

        self.paths: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("proxy-connection", "connection", "host")}
                proxy.paths.append(urllib.parse.urlsplit(self.path).path)
                try:
                    with httpx.Client(timeout=None) as client:
                        r = client.request(self.command, self.path, headers=headers,
                                           content=body)
                except httpx.HTTPError:
                    self.send_error(502)
                    return
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("transfer-encoding", "connection",
                                         "content-encoding", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(r.content)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = forward  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_agent_proxy_set_from_the_cli(gstack: Stack, names: dict[str, str]) -> None:
    n = names
    ready_vm(gstack, n)
    conf_path = guest_root(gstack, n) / "etc" / "vmvault" / "agent.json"
    vm_args = ("-g", n["rg"], "--vm-name", n["vm"])
    bad = gstack.run("vm", "agent", "set", *vm_args, "--proxy", "ftp://proxy", ok=False)
    assert bad.code != 0 and "--proxy" in bad.err and "http://HOST:PORT" in bad.err
    assert "Traceback" not in bad.err and "httpProxy" not in conf_path.read_text()
    proxy = ForwardingProxy()
    try:
        old_pid = agent_pid(gstack, n)
        gstack.run("vm", "agent", "set", *vm_args, "--proxy", proxy.url)
        assert json.loads(conf_path.read_text())["httpProxy"] == proxy.url
        assert oct(conf_path.stat().st_mode & 0o777) == "0o600"
        assert agent_pid(gstack, n) != old_pid  # restarted to take the change
        wait_agent_ready(gstack, n)
        # the agent's calls and the extension's (the snapshots, the status blob) go through it
        job = backup(gstack, n)
        assert job["properties"]["status"] == "Completed", job
        assert "/vmvault/agent/status" in proxy.paths
        assert any(p.endswith(".vhd") for p in proxy.paths), proxy.paths
    finally:
        proxy.close()
    gstack.run("vm", "agent", "set", *vm_args, "--proxy", "")
    assert "httpProxy" not in json.loads(conf_path.read_text())
    wait_agent_ready(gstack, n)
    assert backup(gstack, n)["properties"]["status"] == "Completed"


# --- Azure's extension under vmvault-agent ------------------------------------------------------

REFERENCE = Path(__file__).parent / "azure_reference"


@needs_root()
def test_a_reference_azure_extension_backs_up_under_vmvault_agent(
        tmp_path: Path, names: dict[str, str]) -> None:
    """The extension Azure ships, as vmsnapshot-wire.md describes it (tests/azure_reference:
    absolute /var/lib/waagent paths, openssl cms, a forked daemon, page-blob status writes, no
    x-ms-version on its snapshots), delivered instead of vmvault's own handler: the agent and
    the Blob endpoint serve it and the backup job reads its status."""
    n = names
    with own_stack(tmp_path, VMVAULT_VMSNAPSHOT_PACKAGE=str(REFERENCE)) as s:
        ready_vm(s, n)
        root = guest_root(s, n)
        job = backup(s, n)
        assert job["properties"]["status"] == "Completed", job
        points = s.json("backup", "recoverypoint", "list", *item_args(n))
        assert [p["properties"]["recoveryPointType"] for p in points] == ["CrashConsistent"]
        hdir = next((root / "var/lib/waagent").glob("Microsoft.RecoveryServices.VMSnapshot-*"))
        assert (hdir / "main" / "handle.py").read_bytes() == (
            REFERENCE / "main" / "handle.py").read_bytes()
        # it read the certificate where Azure's agent keeps it, through the agent's namespace
        logs = root / "var/log/azure/Microsoft.RecoveryServices.VMSnapshot"
        ext_log = (logs / "extension.log").read_text()
        assert "decrypted with openssl cms (/var/lib/waagent/" in ext_log, ext_log
        assert "HTTP 201" in ext_log and "daemon failed" not in ext_log
        assert "enable with /usr/bin/python" in (logs / "shell.log").read_text()
        assert not list(Path("/var/lib/waagent").glob("*.prv")), "the host's view changed"
        settings = json.loads(next((hdir / "config").glob("*.settings")).read_text())
        assert "protectedSettings" not in settings["runtimeSettings"][0]["handlerSettings"]
        # its status file: transitioning first, then the blob document inside substatus
        status_file = json.loads(next((hdir / "status").glob("*.status")).read_text())
        inner = json.loads(status_file[0]["status"]["substatus"][0]["name"])[0]["status"]
        assert (inner["code"], inner["status"]) == ("1", "success")
        assert len(inner["snapshotInfo"]) == 2 and all(
            i["isSuccessful"] for i in inner["snapshotInfo"])
