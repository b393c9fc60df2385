"""vmvault's VMSnapshot handler, for real: ext4 and xfs loop mounts frozen with FIFREEZE, the
Blob endpoint on 127.0.0.1 with page blobs and real SAS, a real VM certificate with
CMS-encrypted protected settings, the watchdog process, pre/post scripts.

The handler runs as the agent runs it (``python -m vmvault.extensions.vmsnapshot enable`` in
the handler folder) where that matters (freeze, SIGKILL), in-process elsewhere (faster).
Test-only hooks of the handler: VMVAULT_TEST_FROZEN_MARKER, VMVAULT_TEST_HOLD_FROZEN_SECONDS.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conftest_storage import BlobServer, blob_server, need_root  # noqa: F401
from vmvault.extensions.vmsnapshot import handle, rcu
from vmvault.extensions.vmsnapshot.settings import datetime_to_ticks
from vmvault.guest.certificates import Identity, encrypt_settings, make_identity
from vmvault.storage.auth import blob_url, generate_blob_sas

DISKS = "vhds"
STATUS = "vmsnapshot-status"
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
              "ALL_PROXY")


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def identity() -> Identity:
    return make_identity("vmvault-agent-test-vm")


@pytest.fixture(scope="module")
def stranger() -> Identity:
    return make_identity("vmvault-agent-another-vm")


def _umount(target: Path) -> None:
    subprocess.run(["fsfreeze", "-u", str(target)], capture_output=True)
    if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture(scope="module")
def mounts() -> Iterator[list[Path]]:
    """A mount root holding disk0 (ext4, mounted first) and disk1 (xfs, mounted second)."""
    need_root()
    base = Path(tempfile.mkdtemp(prefix="vmvault-vmsnapshot-"))
    root = base / "vm"
    made: list[Path] = []
    try:
        for name, mkfs, size in (("disk0", ["mkfs.ext4", "-q", "-F"], 64),
                                 ("disk1", ["mkfs.xfs", "-q", "-f"], 320)):
            image, target = base / f"{name}.img", root / name
            target.mkdir(parents=True)
            with open(image, "wb") as f:
                f.truncate(size * 1024 * 1024)
            subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
            subprocess.run(["mount", "-o", "loop", str(image), str(target)], check=True)
            made.append(target)
        yield made
    finally:
        for target in reversed(made):
            _umount(target)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def empty_mount_root(tmp_path: Path) -> Path:
    root = tmp_path / "no-mounts"
    root.mkdir()
    return root


@dataclass
class Result:
    file_doc: list[dict[str, Any]]
    blob_text: str | None

    @property
    def file_status(self) -> dict[str, Any]:
        return self.file_doc[0]["status"]

    @property
    def top(self) -> dict[str, Any]:
        """The status blob's document (else the one inside the status file)."""
        text = self.blob_text or self.file_status["substatus"][0]["name"]
        doc: dict[str, Any] = json.loads(text.rstrip(" \0"))[0]
        return doc

    @property
    def status(self) -> dict[str, Any]:
        return self.top["status"]

    @property
    def code(self) -> int:
        return int(self.status["code"])

    @property
    def inner(self) -> dict[str, Any]:
        return json.loads(self.status["formattedMessage"]["message"])

    @property
    def message(self) -> str:
        return str(self.inner["messageStr"])

    @property
    def telemetry(self) -> dict[str, str]:
        return {t["Key"]: t["Value"] for t in self.status["telemetryData"] or []}

    @property
    def health(self) -> dict[str, int]:
        return self.status["vmHealthInfo"]


@dataclass
class Guest:
    base: Path
    mount_root: Path
    identity: Identity
    server: BlobServer
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    disk_count: int = 2
    seq: int = -1

    def __post_init__(self) -> None:
        self.root = self.base / "guest"
        self.handler = self.root / "var/lib/waagent/Microsoft.RecoveryServices.VMSnapshot-1.9"
        self.log_folder = self.root / "var/log/azure/Microsoft.RecoveryServices.VMSnapshot"
        for folder in (self.handler / "config", self.handler / "status", self.log_folder,
                       self.root / "etc/azure"):
            folder.mkdir(parents=True, exist_ok=True)
        self.identity.save(self.root / "var/lib/waagent")
        env = {"logFolder": str(self.log_folder), "configFolder": str(self.handler / "config"),
               "statusFolder": str(self.handler / "status"),
               "heartbeatFile": str(self.handler / "heartbeat.log"),
               "eventsFolder": str(self.handler / "events")}
        (self.handler / "HandlerEnvironment.json").write_text(json.dumps(
            [{"name": "Microsoft.RecoveryServices.VMSnapshot", "version": "1.9",
              "handlerEnvironment": env}]))
        store, account = self.server.store, self.server.account.name
        for container in (DISKS, STATUS):
            store.create_container(account, container, exist_ok=True)
        for blob in self.disk_blobs:
            store.create_page_blob(account, DISKS, blob, 1024 * 1024)
        for blob in (self.status_blob, self.logs_blob):
            store.create_page_blob(account, STATUS, blob, 0)

    @property
    def disk_blobs(self) -> list[str]:
        return [f"{self.tag}-disk{i}.vhd" for i in range(self.disk_count)]

    @property
    def status_blob(self) -> str:
        return f"{self.tag}.v2.Status.txt"

    @property
    def logs_blob(self) -> str:
        return f"{self.tag}.v2.Logs.txt"

    def uri(self, container: str, blob: str, expiry: datetime | None = None,
            start: datetime | None = None, permission: str = "rw") -> str:
        account = self.server.account
        sas = generate_blob_sas(account.name, account.key1, container, blob, permission,
                                expiry or datetime.now(UTC) + timedelta(hours=1), start)
        return blob_url(self.server.url, account.name, container, blob, sas)

    def public(self, **changes: Any) -> dict[str, Any]:
        meta = {"backupMetadata": [{"Key": "vmvaultjobid", "Value": self.tag}],
                "includedDisks": {"dataDiskLunList": [0], "isOSDiskIncluded": True}}
        doc = {"locale": "en-us", "taskId": f"{self.tag}_1", "commandToExecute": "snapshot",
               "commandStartTimeUTCTicks": str(datetime_to_ticks(datetime.now(UTC))),
               "vmType": "microsoft.compute/virtualmachines", "objectStr": b64json(meta)}
        doc.update(changes)
        return {k: v for k, v in doc.items() if v is not None}

    def protected(self, sas_uris: list[str] | None = None, **changes: Any) -> dict[str, Any]:
        uris = sas_uris if sas_uris is not None else [self.uri(DISKS, b)
                                                      for b in self.disk_blobs]
        doc = {"objectStr": b64json({"blobSASUri": uris}),
               "logsBlobUri": self.uri(STATUS, self.logs_blob),
               "statusBlobUri": self.uri(STATUS, self.status_blob)}
        doc.update(changes)
        return {k: v for k, v in doc.items() if v is not None}

    def write_settings(self, public: dict[str, Any] | None = None,
                       protected: dict[str, Any] | None = None, *,
                       encrypt_to: Identity | None = None, raw_protected: Any = "unset",
                       thumbprint: Any = "unset") -> Path:
        self.seq += 1
        cert = encrypt_to or self.identity
        handler: dict[str, Any] = {
            "publicSettings": public if public is not None else self.public(),
            "protectedSettingsCertThumbprint": (self.identity.thumbprint
                                                if thumbprint == "unset" else thumbprint),
            "protectedSettings": (encrypt_settings(protected or self.protected(),
                                                   cert.certificate_pem)
                                  if raw_protected == "unset" else raw_protected),
        }
        handler = {k: v for k, v in handler.items() if v is not None}
        path = self.handler / "config" / f"{self.seq}.settings"
        path.write_text(json.dumps({"runtimeSettings": [{"handlerSettings": handler}]}))
        return path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
        env.update({"ConfigSequenceNumber": str(self.seq), "VMVAULT_GUEST_ROOT": str(self.root),
                    "VMVAULT_MOUNT_ROOT": str(self.mount_root), "NO_PROXY": "*"})
        env.update(extra)
        return env

    def command(self, **extra: str) -> tuple[list[str], dict[str, str]]:
        cmd = [sys.executable, "-m", "vmvault.extensions.vmsnapshot", "enable"]
        return cmd, self.env(**extra)

    def enable(self, subprocess_run: bool = False, **extra: str) -> Result:
        if subprocess_run:
            cmd, env = self.command(**extra)
            proc = subprocess.run(cmd, cwd=self.handler, env=env, capture_output=True,
                                  text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
            assert "Traceback" not in proc.stderr
        else:
            assert handle.run("enable", self.handler, self.env(**extra)) == 0
        return self.result()

    def result(self) -> Result:
        file_doc = json.loads((self.handler / "status" / f"{self.seq}.status").read_text())
        return Result(file_doc, self.read(STATUS, self.status_blob) or None)

    def read(self, container: str, blob: str) -> str:
        data = self.server.store.read(self.server.account.name, container, blob)
        return data.decode("utf-8", "replace").rstrip("\0 ")

    def snapshots(self) -> dict[str, list[str]]:
        store, account = self.server.store, self.server.account.name
        return {b: store.list_snapshots(account, DISKS, b) for b in self.disk_blobs}

    def write_conf(self, text: str) -> None:
        (self.root / "etc/azure/vmbackup.conf").write_text(text)


def b64json(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


@pytest.fixture
def guest(tmp_path: Path, empty_mount_root: Path, identity: Identity,
          blob_server: BlobServer) -> Guest:  # noqa: F811
    return Guest(tmp_path, empty_mount_root, identity, blob_server)


@pytest.fixture
def mounted_guest(tmp_path: Path, mounts: list[Path], identity: Identity,
                  blob_server: BlobServer) -> Guest:  # noqa: F811
    return Guest(tmp_path, mounts[0].parent, identity, blob_server)


class Writer(threading.Thread):
    """Writes and fsyncs a file; blocks while its file system is frozen."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.done_at: float | None = None

    def run(self) -> None:
        with open(self.path, "wb") as f:
            f.write(os.urandom(4096))
            f.flush()
            os.fsync(f.fileno())
        self.done_at = time.monotonic()


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the handler exited ({proc.returncode}) before freezing: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        assert time.monotonic() < deadline, "the handler did not freeze in time"
        time.sleep(0.02)


def writable(path: Path, timeout: float = 3.0) -> bool:
    writer = Writer(path / f"probe-{uuid.uuid4().hex[:6]}")
    writer.start()
    writer.join(timeout)
    return writer.done_at is not None


# --- end to end ---------------------------------------------------------------------------


def test_enable_snapshots_two_mounted_disks(mounted_guest: Guest, mounts: list[Path]) -> None:
    g = mounted_guest
    settings_path = g.write_settings()
    switch_before = rcu.RCU_EXPEDITED.read_text().strip()
    result = g.enable(subprocess_run=True)
    status = result.status
    assert result.code == 1, result.message
    assert status["status"] == "success" and status["operation"] == "Enable"
    assert status["taskId"] == f"{g.tag}_1"
    assert result.inner["snapshotConsistency"] == 1
    assert result.health == {"vmHealthState": 0, "vmHealthStatusCode": 1}
    # one snapshotInfo per disk, in blobSASUri order, naming real snapshots
    snaps = g.snapshots()
    assert [i["blobUri"].rsplit("/", 1)[1] for i in status["snapshotInfo"]] == g.disk_blobs
    for info in status["snapshotInfo"]:
        blob = info["blobUri"].rsplit("/", 1)[1]
        assert info["isSuccessful"] and info["statusCode"] == 201
        snap_id = info["snapshotUri"].split("?snapshot=", 1)[1]
        assert snaps[blob] == [snap_id]
        props = g.server.store.get_properties(g.server.account.name, DISKS, blob, snap_id)
        assert props.metadata.get("vmvaultjobid") == g.tag
    # the freeze: both file systems, measured
    tele = result.telemetry
    assert status["storageDetails"]["partitionCount"] == 2
    assert int(tele["FreezeWindowMs"]) == status["freezeWindowMilliseconds"] >= 0
    assert tele["FreezeTime"] and tele["ThawTime"] and tele["snapshotCreator"] == "guestExtension"
    assert tele["consistencyType"] == "fileSystemConsistent"
    assert result.top["timestampUTC"].startswith("/Date(") and result.top["version"] == "1.9"
    assert "\\/Date(" in g.read(STATUS, g.status_blob)  # as Azure writes it: \/Date(ms)\/
    # the status file for the agent: the blob document inside substatus[0].name
    file_status = result.file_status
    assert file_status["code"] == "1" and file_status["status"] == "success"
    assert file_status["telemetryData"] is None and file_status["snapshotInfo"] is None
    assert json.loads(file_status["substatus"][0]["name"])[0]["status"]["snapshotInfo"] == \
        status["snapshotInfo"]
    assert not (g.handler / "status" / "tempStatusFile.status").exists()
    # the log blob and extension.log
    log_text = g.read(STATUS, g.logs_blob)
    assert log_text.startswith("Guest Agent Version is :")
    assert "Tail of shell script log:" in log_text
    for mount in mounts:
        assert f"froze {mount}" in log_text and f"thawed {mount}" in log_text
    assert "Logs during Freeze End" in (g.log_folder / "extension.log").read_text()
    # RCU grace periods expedited for the window only (the freeze takes a few ms, not tens)
    assert rcu.RCU_EXPEDITED.read_text().strip() == switch_before
    if switch_before == "0":
        assert "rcu_expedited set to 1 for the freeze window" in log_text
        assert log_text.index("set to 1 for the freeze") < log_text.index("froze ")
        assert log_text.index("rcu_expedited set back to 0") > log_text.index("thawed ")
    # protectedSettings are gone from the settings file; everything is writable again
    handler_settings = json.loads(settings_path.read_text())["runtimeSettings"][0]
    assert "protectedSettings" not in handler_settings["handlerSettings"]
    assert all(writable(m) for m in mounts)


def test_frozen_file_system_blocks_writes_until_thaw(mounted_guest: Guest,
                                                     mounts: list[Path]) -> None:
    g = mounted_guest
    g.write_settings()
    marker = g.base / "frozen.marker"
    cmd, env = g.command(VMVAULT_TEST_FROZEN_MARKER=str(marker),
                         VMVAULT_TEST_HOLD_FROZEN_SECONDS="1.5")
    proc = subprocess.Popen(cmd, cwd=g.handler, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(marker, proc)
        writer = Writer(mounts[0] / "blocked.bin")
        started = time.monotonic()
        writer.start()
        writer.join(0.7)
        assert writer.done_at is None, "a write went through while the file system was frozen"
        assert proc.wait(30) == 0
        writer.join(5)
        assert writer.done_at is not None, "the write stayed blocked after the thaw"
        assert writer.done_at - started >= 0.7
    finally:
        proc.kill()
        proc.wait()
    result = g.result()
    assert result.code == 1, result.message
    assert result.status["freezeWindowMilliseconds"] >= 1500


def test_sigkill_of_the_handler_mid_freeze_is_thawed_by_the_watchdog(
        mounted_guest: Guest, mounts: list[Path]) -> None:
    g = mounted_guest
    g.write_settings()
    g.write_conf("[SnapshotThread]\ntimeout = 30\n")
    marker = g.base / "frozen.marker"
    switch_before = rcu.RCU_EXPEDITED.read_text().strip()
    cmd, env = g.command(VMVAULT_TEST_FROZEN_MARKER=str(marker),
                         VMVAULT_TEST_HOLD_FROZEN_SECONDS="60")
    proc = subprocess.Popen(cmd, cwd=g.handler, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(marker, proc)
        writers = [Writer(m / "after-kill.bin") for m in mounts]
        for writer in writers:
            writer.start()
        time.sleep(0.3)
        assert all(w.done_at is None for w in writers), "not frozen"
        if switch_before == "0":
            assert rcu.RCU_EXPEDITED.read_text().strip() == "1"
        killed = time.monotonic()
        os.killpg(proc.pid, signal.SIGKILL)  # the handler and its process group, as an agent
        proc.wait(5)
        for writer in writers:
            writer.join(10)
            assert writer.done_at is not None, "still frozen after the handler was killed"
            assert writer.done_at - killed < 5, "thawed by the bound, not at the pipe's EOF"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 5
    log = g.log_folder / "extension.log"
    while "the handler went away" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "the handler went away: thawed" in log.read_text()
    assert rcu.RCU_EXPEDITED.read_text().strip() == switch_before  # turned off again


def test_sigterm_mid_freeze_thaws_and_reports(mounted_guest: Guest, mounts: list[Path]) -> None:
    g = mounted_guest
    g.write_settings()
    marker = g.base / "frozen.marker"
    cmd, env = g.command(VMVAULT_TEST_FROZEN_MARKER=str(marker),
                         VMVAULT_TEST_HOLD_FROZEN_SECONDS="30")
    proc = subprocess.Popen(cmd, cwd=g.handler, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(marker, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()
    result = g.result()
    assert result.code == 2 and "stopped by SIGTERM" in result.message
    assert all(writable(m) for m in mounts)


def test_watchdog_bound_thaws_and_the_result_is_not_consistent(mounted_guest: Guest,
                                                               mounts: list[Path]) -> None:
    g = mounted_guest
    g.write_settings()
    g.write_conf("[SnapshotThread]\ntimeout = 1\n")
    result = g.enable(VMVAULT_TEST_HOLD_FROZEN_SECONDS="2")
    assert result.code == 2
    assert "thawed before the snapshots ended" in result.message
    assert "freeze bound elapsed" in (g.log_folder / "extension.log").read_text()
    assert all(writable(m) for m in mounts)


def test_a_mount_frozen_by_another_tool_gives_121_and_stays_frozen(
        mounted_guest: Guest, mounts: list[Path]) -> None:
    g = mounted_guest
    g.write_settings()
    disk0, disk1 = mounts
    subprocess.run(["fsfreeze", "-f", str(disk0)], check=True)
    try:
        result = g.enable()
        assert result.code == 121, result.message
        assert str(disk0) in result.message and "EBUSY" in result.message
        assert result.health == {"vmHealthState": 128, "vmHealthStatusCode": 121}
        assert result.status["snapshotInfo"] is None
        assert all(not s for s in g.snapshots().values())
        assert writable(disk1), "disk1 (frozen first) was not thawed after disk0 failed"
    finally:
        thawed = subprocess.run(["fsfreeze", "-u", str(disk0)], capture_output=True)
    assert thawed.returncode == 0, "the handler thawed a mount it did not freeze"


def test_mounts_to_skip(mounted_guest: Guest, mounts: list[Path]) -> None:
    g = mounted_guest
    g.write_settings()
    g.write_conf("[SnapshotThread]\nMountsToSkip = /disk0\n")  # as the guest names it
    result = g.enable()
    assert result.code == 1, result.message
    assert result.status["storageDetails"]["partitionCount"] == 1
    log = g.read(STATUS, g.logs_blob)
    assert f"froze {mounts[1]}" in log and f"froze {mounts[0]}" not in log


# --- settings refused ---------------------------------------------------------------------


def test_unencrypted_protected_settings_are_refused(guest: Guest) -> None:
    guest.write_settings(raw_protected=guest.protected())
    result = guest.enable()
    assert result.code == 11
    assert "protectedSettings" in result.message and "plain JSON object" in result.message
    assert result.blob_text is None  # no status blob URI was believed
    assert all(not s for s in guest.snapshots().values())


def test_protected_settings_for_another_certificate_are_refused(guest: Guest,
                                                                stranger: Identity) -> None:
    guest.write_settings(encrypt_to=stranger)
    result = guest.enable()
    assert result.code == 16
    assert "protectedSettings cannot be decrypted with certificate" in result.message
    assert result.health == {"vmHealthState": 128, "vmHealthStatusCode": 16}


def test_missing_thumbprint_is_refused(guest: Guest) -> None:
    guest.write_settings(thumbprint=None)
    result = guest.enable()
    assert result.code == 16
    assert "protectedSettingsCertThumbprint is missing" in result.message


def test_missing_certificate_files_are_refused(guest: Guest) -> None:
    guest.write_settings(thumbprint="AB" * 20)
    result = guest.enable()
    assert result.code == 16 and "not found" in result.message


@pytest.mark.parametrize(("changes", "field", "code"), [
    ({"locale": "english please"}, "publicSettings.locale", 11),
    ({"taskId": ""}, "publicSettings.taskId", 11),
    ({"taskId": None}, "publicSettings.taskId", 11),
    ({"commandToExecute": "format c:"}, "publicSettings.commandToExecute", 11),
    ({"commandStartTimeUTCTicks": "yesterday"}, "publicSettings.commandStartTimeUTCTicks", 11),
    ({"commandStartTimeUTCTicks": "6.36458E+17"}, "publicSettings.commandStartTimeUTCTicks",
     402),
    ({"vmType": "microsoft.compute/disks"}, "publicSettings.vmType", 11),
    ({"vmType": None}, "publicSettings.vmType", 11),
    ({"objectStr": "not base64!"}, "publicSettings.objectStr", 11),
    ({"objectStr": b64json({"backupMetadata": [{"Key": "bad key", "Value": "x"}]})},
     "publicSettings.objectStr.backupMetadata[0].Key", 11),
])
def test_bad_public_settings_are_refused_naming_the_field(guest: Guest, changes: dict[str, Any],
                                                          field: str, code: int) -> None:
    guest.write_settings(guest.public(**changes))
    result = guest.enable()
    assert result.code == code, result.message
    assert field in result.message
    assert result.status["status"] == "error"
    # Azure's quirk: for microsoft.compute VMs the file shows a terminal status as success
    assert result.file_status["status"] == ("error" if "vmType" in changes else "success")
    assert result.health["vmHealthStatusCode"] == code  # the status blob got the error too
    assert all(not s for s in guest.snapshots().values())


@pytest.mark.parametrize(("uris", "field"), [
    (["https://acct.blob.core.windows.net/c/d.vhd"], "blobSASUri[0]"),
    (None, "blobSASUri[1]"),
    ([], "blobSASUri must be a non-empty list"),
    (["ftp://host/c/d.vhd?sig=a&se=b&sp=rw"], "blobSASUri[0]"),
])
def test_bad_sas_uris_are_refused_naming_the_index(guest: Guest, uris: list[str] | None,
                                                   field: str) -> None:
    if uris is None:
        uris = [guest.uri(DISKS, guest.disk_blobs[0]), "http://127.0.0.1:1/a/b/c?sig=x"]
    guest.write_settings(protected=guest.protected(sas_uris=uris))
    result = guest.enable()
    assert result.code == 11
    assert f"protectedSettings.objectStr.{field}" in result.message


def test_seed_ticks_form_is_accepted() -> None:
    from vmvault.extensions.vmsnapshot.settings import parse_ticks, ticks_to_datetime

    assert parse_ticks("6.36458E+17") == 636_458_000_000_000_000
    assert ticks_to_datetime(parse_ticks("6.36458E+17")).year == 2017
    assert parse_ticks(str(datetime_to_ticks(datetime(2026, 1, 2, tzinfo=UTC)))) == \
        datetime_to_ticks(datetime(2026, 1, 2, tzinfo=UTC))


# --- snapshot failures ----------------------------------------------------------------------


def test_expired_sas_fails_403_with_code_76(guest: Guest) -> None:
    past = datetime.now(UTC) - timedelta(hours=1)
    uris = [guest.uri(DISKS, b, expiry=past, start=past - timedelta(hours=1))
            for b in guest.disk_blobs]
    guest.write_settings(protected=guest.protected(sas_uris=uris))
    result = guest.enable()
    assert result.code == 76
    assert result.health == {"vmHealthState": 256, "vmHealthStatusCode": 76}
    for info in result.status["snapshotInfo"]:
        assert info["statusCode"] == 403 and not info["isSuccessful"]
        assert "AuthenticationFailed" in info["errorMessage"]
    assert all(not s for s in guest.snapshots().values())


def test_one_disk_failing_is_a_partial_failure_761(guest: Guest) -> None:
    uris = [guest.uri(DISKS, guest.disk_blobs[0]), guest.uri(DISKS, "no-such-disk.vhd")]
    guest.write_settings(protected=guest.protected(sas_uris=uris))
    result = guest.enable()
    assert result.code == 76
    assert result.health["vmHealthStatusCode"] == 761
    ok, missing = result.status["snapshotInfo"]
    assert ok["isSuccessful"] and not missing["isSuccessful"] and missing["statusCode"] == 404


def test_unreachable_storage_fails_fast_after_retries(guest: Guest) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connection refused
    uris = [f"http://127.0.0.1:{port}/acct/vhds/{b}?sv=2020-10-02&sr=b&sp=rw&se=2099-01-01&sig=x"
            for b in guest.disk_blobs]
    guest.write_settings(protected=guest.protected(sas_uris=uris))
    started = time.monotonic()
    result = guest.enable()
    assert time.monotonic() - started < 10
    assert result.code == 76
    for info in result.status["snapshotInfo"]:
        assert info["statusCode"] is None and "ConnectError" in info["errorMessage"]
    assert "no disk snapshot could be taken" in result.message


# --- task dedupe, install, lifecycle --------------------------------------------------------


def test_a_repeated_task_id_takes_no_new_snapshot(guest: Guest) -> None:
    guest.write_settings()
    assert guest.enable().code == 1
    first_blob = guest.read(STATUS, guest.status_blob)
    guest.write_settings()  # same taskId, new sequence number
    result = guest.enable()
    assert result.file_status["code"] == "3"
    assert all(len(s) == 1 for s in guest.snapshots().values())
    assert guest.read(STATUS, guest.status_blob) == first_blob  # the first result stays


def test_install_command_and_lifecycle_commands(guest: Guest) -> None:
    guest.write_settings(guest.public(commandToExecute="Install"))
    result = guest.enable()
    assert result.code == 1 and all(not s for s in guest.snapshots().values())
    for command in ("install", "disable", "update", "uninstall"):
        proc = subprocess.run([sys.executable, "-m", "vmvault.extensions.vmsnapshot", command],
                              cwd=guest.handler, env=guest.env(), capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        status = json.loads((guest.handler / "status" / f"{guest.seq}.status").read_text())
        assert status[0]["status"]["operation"] == command.capitalize()
        assert status[0]["status"]["status"] == "success"


def test_bad_command_line_and_missing_environment(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "vmvault.extensions.vmsnapshot"]
    proc = subprocess.run([*cmd, "explode"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
    proc = subprocess.run([*cmd, "enable"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 1 and "HandlerEnvironment.json" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- pre/post scripts -----------------------------------------------------------------------


def plugin_setup(g: Guest, pre: str, post: str, *, pre_mode: int = 0o700,
                 **config: Any) -> None:
    etc = g.root / "etc/azure"
    (etc / "VMSnapshotPluginHost.conf").write_text(
        "[pre_post]\ntimeoutInSeconds = 60\nnumberOfPlugins = 1\n"
        "pluginName0 = ScriptRunner\npluginPath0 = /etc/azure\n"
        "pluginConfigPath0 = /etc/azure/VMSnapshotScriptPluginConfig.json\n")
    (etc / "VMSnapshotPluginHost.conf").chmod(0o644)
    for name, text, mode in (("pre.sh", pre, pre_mode), ("post.sh", post, 0o700)):
        (etc / name).write_text("#!/bin/sh\n" + text + "\n")
        (etc / name).chmod(mode)
    doc = {"pluginName": "ScriptRunner", "preScriptLocation": "/etc/azure/pre.sh",
           "postScriptLocation": "/etc/azure/post.sh", "timeoutInSeconds": 30,
           "continueBackupOnFailure": True, "fsFreezeEnabled": True, **config}
    (etc / "VMSnapshotScriptPluginConfig.json").write_text(json.dumps(doc))
    (etc / "VMSnapshotScriptPluginConfig.json").chmod(0o600)


def test_pre_and_post_scripts_make_an_app_consistent_backup(mounted_guest: Guest,
                                                            mounts: list[Path]) -> None:
    g = mounted_guest
    trail = g.base / "trail"
    # the post-script writes to a mount: it would block if it ran before the thaw
    plugin_setup(g, f"echo pre >> {trail}", f"echo post >> {trail} && touch {mounts[0]}/post")
    g.write_settings()
    result = g.enable()
    assert result.code == 0, result.message
    assert result.inner["snapshotConsistency"] == 2
    assert result.telemetry["consistencyType"] == "applicationConsistent"
    assert result.telemetry["prePostEnabled"] == "True"
    assert trail.read_text().split() == ["pre", "post"]
    assert all(len(s) == 1 for s in g.snapshots().values())


def test_a_group_writable_script_is_refused(guest: Guest) -> None:
    plugin_setup(guest, "true", "true", pre_mode=0o770, continueBackupOnFailure=False)
    guest.write_settings()
    result = guest.enable()
    assert result.code == 306
    assert "pre.sh is refused" in result.message and "770" in result.message
    assert all(not s for s in guest.snapshots().values())


def test_a_refused_script_with_continue_on_failure_still_backs_up(
        guest: Guest) -> None:
    plugin_setup(guest, "true", "true", pre_mode=0o750)
    guest.write_settings()
    result = guest.enable()
    # Code 1 (the backup went on); this guest has no mounts, so nothing was frozen and the
    # status says crash-consistent (3) rather than file-system consistent.
    assert result.code == 1 and result.inner["snapshotConsistency"] == 3
    assert result.health == {"vmHealthState": 128, "vmHealthStatusCode": 306}
    assert all(len(s) == 1 for s in guest.snapshots().values())


def test_a_script_past_its_timeout_is_killed(guest: Guest) -> None:
    pidfile = guest.base / "script.pid"
    plugin_setup(guest, f"echo $$ > {pidfile}; sleep 30", "true", timeoutInSeconds=1,
                 continueBackupOnFailure=False)
    guest.write_settings()
    started = time.monotonic()
    result = guest.enable()
    assert time.monotonic() - started < 10
    assert result.code == 308, result.message
    assert "was killed" in result.message
    assert live_processes_in_group(int(pidfile.read_text())) == []  # script and sleep


def live_processes_in_group(pgid: int) -> list[int]:
    """Processes of the group that are not zombies (this sandbox's init may not reap)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


# --- wire compatibility -------------------------------------------------------------------


def test_openssl_cms_opens_the_protected_settings(tmp_path: Path, identity: Identity) -> None:
    # openssl is what Azure's own extension decrypts with (make setup installs it).
    assert shutil.which("openssl"), "openssl is not installed (make setup installs it)"
    crt, prv = identity.save(tmp_path)
    der = tmp_path / "settings.der"
    der.write_bytes(base64.b64decode(encrypt_settings({"objectStr": "x"},
                                                      identity.certificate_pem)))
    proc = subprocess.run(["openssl", "cms", "-decrypt", "-inform", "DER", "-in", str(der),
                           "-recip", str(crt), "-inkey", str(prv)], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"objectStr": "x"}
