"""The VMSnapshot handler's parts on their own: mount selection, vmbackup.conf, the blob
writer against the real Blob endpoint (page and block blobs), the status documents, the
handler package, the watchdog's bound."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import uuid
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conftest_storage import BlobServer, blob_server  # noqa: F401
from vmvault.extensions import vmsnapshot
from vmvault.extensions.vmsnapshot import codes, freeze, package, rcu, status
from vmvault.extensions.vmsnapshot.blobwriter import BlobWriteError, BlobWriter
from vmvault.extensions.vmsnapshot.watchdog import Watchdog
from vmvault.storage.auth import blob_url, generate_blob_sas

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:25 / /proc rw - proc proc rw
40 22 7:0 / /vms/vm1/data\\040disk rw,relatime shared:5 - xfs /dev/loop0 rw
41 22 7:1 / /vms/vm1/logs rw,relatime - ext4 /dev/loop1 rw
42 22 7:1 /sub /vms/vm1/logs-again rw,relatime - ext4 /dev/loop1 rw
43 22 0:50 / /vms/vm1/nfs rw - nfs4 server:/x rw
44 22 7:2 / /vms/vm2/data rw - btrfs /dev/loop2 rw
45 22 0:51 / /vms/vm1/tmp rw - tmpfs tmpfs rw
"""


# --- mounts and vmbackup.conf ---------------------------------------------------------------


def test_select_mounts_under_the_mount_root_latest_first() -> None:
    chosen = freeze.select_mounts(Path("/vms/vm1"), [], MOUNTINFO)
    # loop1 is mounted twice: frozen once, through its latest mount; nfs and tmpfs never
    assert [m.mount_point for m in chosen] == ["/vms/vm1/logs-again", "/vms/vm1/data disk"]
    assert chosen[1].fs_type == "xfs" and chosen[1].source == "/dev/loop0"


def test_select_mounts_of_a_real_vm_freezes_root_last() -> None:
    chosen = freeze.select_mounts(Path("/"), [], MOUNTINFO)
    assert chosen[-1].mount_point == "/"
    assert [m.mount_point for m in chosen][0] == "/vms/vm2/data"


def test_mounts_to_skip_as_the_guest_names_them_or_as_is() -> None:
    guest_view = freeze.select_mounts(Path("/vms/vm1"), ["/logs-again"], MOUNTINFO)
    host_view = freeze.select_mounts(Path("/vms/vm1"), ["/vms/vm1/logs-again/"], MOUNTINFO)
    assert [m.mount_point for m in guest_view] == [m.mount_point for m in host_view] == [
        "/vms/vm1/data disk"]


def test_vmbackup_conf(tmp_path: Path) -> None:
    conf_path = tmp_path / "vmbackup.conf"
    assert freeze.read_vmbackup_conf(conf_path).freeze_bound == 30  # vmvault's default
    conf_path.write_text("[SnapshotThread]\ntimeout = 45\nMountsToSkip = /a, /b\n"
                         "seqsnapshot = 2\n")
    conf = freeze.read_vmbackup_conf(conf_path)
    assert (conf.freeze_bound, conf.mounts_to_skip, conf.sequential_snapshots) == (
        45, ["/a", "/b"], True)
    conf_path.write_text("[SnapshotThread]\ntimeout = forever\n")
    conf = freeze.read_vmbackup_conf(conf_path)
    assert conf.freeze_bound == 30 and "timeout 'forever'" in conf.warnings[0]
    conf_path.write_text("not an ini file")
    assert freeze.read_vmbackup_conf(conf_path).warnings
    assert freeze.read_vmbackup_conf(conf_path).expedite_freeze  # on by default
    conf_path.write_text("[SnapshotThread]\nexpediteFreeze = 0\n")
    assert not freeze.read_vmbackup_conf(conf_path).expedite_freeze
    conf_path.write_text("[SnapshotThread]\nexpediteFreeze = maybe\n")
    conf = freeze.read_vmbackup_conf(conf_path)
    assert conf.expedite_freeze and "expediteFreeze 'maybe'" in conf.warnings[0]


def _switches(tmp_path: Path, expedited: str, normal: str = "0") -> tuple[Path, Path]:
    (tmp_path / "rcu_expedited").write_text(expedited + "\n")
    (tmp_path / "rcu_normal").write_text(normal + "\n")
    return tmp_path / "rcu_expedited", tmp_path / "rcu_normal"


def test_expedite_turns_the_switch_on_and_back_off(tmp_path: Path) -> None:
    switch, normal = _switches(tmp_path, "0")
    state = rcu.Expedite.enable(switch, normal)
    assert state.enabled and switch.read_text() == "1"
    assert "set back to 0" in state.restore() and switch.read_text() == "0"
    assert state.restore() == ""  # once


def test_expedite_leaves_an_administrators_setting_alone(tmp_path: Path) -> None:
    switch, normal = _switches(tmp_path, "1")
    state = rcu.Expedite.enable(switch, normal)
    assert not state.enabled and "is 1 already" in state.note
    assert state.restore() == "" and switch.read_text().strip() == "1"
    switch, normal = _switches(tmp_path, "0", normal="1")
    state = rcu.Expedite.enable(switch, normal)
    assert not state.enabled and "normal grace periods forced" in state.note
    assert switch.read_text().strip() == "0"
    # someone else turned it off (or on again after us) during the freeze: not touched
    switch, normal = _switches(tmp_path, "0")
    state = rcu.Expedite.enable(switch, normal)
    switch.write_text("2")
    assert "changed by someone else" in state.restore() and switch.read_text() == "2"
    state = rcu.Expedite.enable(tmp_path / "missing", normal)
    assert not state.enabled and "not readable" in state.note


def test_the_watchdog_turns_the_switch_off_when_it_thaws_on_its_own(tmp_path: Path) -> None:
    switch, _ = _switches(tmp_path, "1")
    dog = Watchdog.start(0.3, tmp_path / "log")
    dog.expedited(switch)
    dog.arm(str(tmp_path))
    time.sleep(0.6)  # past the bound
    events = dog.finish()
    assert events and events[0]["reason"] == "timeout"
    assert switch.read_text() == "0"


def test_the_watchdog_thaws_nothing_it_was_not_told_and_exits(tmp_path: Path) -> None:
    dog = Watchdog.start(0.3, tmp_path / "log")
    dog.arm(str(tmp_path))  # not a frozen file system: FITHAW gives EINVAL, which is fine
    time.sleep(0.6)  # past the bound
    events = dog.finish()
    assert events and events[0]["reason"] == "timeout" and events[0]["errors"] == []
    assert dog.proc.returncode == 0


def test_the_watchdog_exits_quietly_after_thawed(tmp_path: Path) -> None:
    dog = Watchdog.start(30, tmp_path / "log")
    dog.arm(str(tmp_path))
    started = time.monotonic()
    assert dog.finish() == []
    assert time.monotonic() - started < 3
    assert not (tmp_path / "log").exists()


# --- the blob writer ------------------------------------------------------------------------


class Blobs:
    def __init__(self, server: BlobServer) -> None:
        self.server = server
        self.store = server.store
        self.account = server.account.name
        self.store.create_container(self.account, "writer", exist_ok=True)

    def uri(self, blob: str) -> str:
        sas = generate_blob_sas(self.account, self.server.account.key1, "writer", blob, "rw",
                                datetime.now(UTC) + timedelta(hours=1))
        return blob_url(self.server.url, self.account, "writer", blob, sas)

    def read(self, blob: str) -> bytes:
        return self.store.read(self.account, "writer", blob)

    def props(self, blob: str):  # type: ignore[no-untyped-def]
        return self.store.get_properties(self.account, "writer", blob)


@pytest.fixture
def blobs(blob_server: BlobServer) -> Blobs:  # noqa: F811
    return Blobs(blob_server)


def test_page_blob_is_grown_padded_and_cleared(blobs: Blobs) -> None:
    name = f"{uuid.uuid4().hex}.Status.txt"
    blobs.store.create_page_blob(blobs.account, "writer", name, 0)
    with BlobWriter() as writer:
        writer.write(blobs.uri(name), "x" * 1000)
        assert blobs.props(name).size == 1024
        assert blobs.read(name) == b"x" * 1000 + b" " * 24
        writer.write(blobs.uri(name), "short")  # the old text is cleared, the size stays
    assert blobs.props(name).blob_type == "PageBlob"
    assert blobs.read(name) == b"short" + b" " * 507 + b"\0" * 512


def test_page_blob_writes_go_in_4_mib_chunks(blobs: Blobs) -> None:
    name = f"{uuid.uuid4().hex}.Logs.txt"
    blobs.store.create_page_blob(blobs.account, "writer", name, 512)
    text = "0123456789abcdef" * (5 * 1024 * 1024 // 16)
    with BlobWriter() as writer:
        writer.write(blobs.uri(name), text)
    assert blobs.read(name) == text.encode()


def test_block_blobs_must_be_empty_unless_written_by_this_run(blobs: Blobs) -> None:
    full, empty = f"{uuid.uuid4().hex}-full", f"{uuid.uuid4().hex}-empty"
    blobs.store.put_block_blob(blobs.account, "writer", full, b"someone's data")
    blobs.store.put_block_blob(blobs.account, "writer", empty, b"")
    with BlobWriter() as writer:
        with pytest.raises(BlobWriteError, match="not empty"):
            writer.write(blobs.uri(full), "status")
        assert blobs.read(full) == b"someone's data"
        writer.write(blobs.uri(empty), "first")
        writer.write(blobs.uri(empty), "second, longer")  # the same run may rewrite it
    assert blobs.read(empty) == b"second, longer"
    assert blobs.props(empty).blob_type == "BlockBlob"


def test_a_missing_blob_is_created_and_bad_sas_is_an_error(blobs: Blobs) -> None:
    name = f"{uuid.uuid4().hex}-new"
    with BlobWriter() as writer:
        writer.write(blobs.uri(name), "hello")
        with pytest.raises(BlobWriteError, match="HTTP 403 AuthenticationFailed"):
            writer.write(blobs.uri(name).replace("sig=", "sig=AAAA"), "hello")
    assert blobs.read(name) == b"hello"


# --- status documents ---------------------------------------------------------------------


def _report(**changes: object) -> status.Report:
    report = status.Report(name="Microsoft.RecoveryServices.VMSnapshot", version="1.9",
                           status="error", code=76, message="no network", ext_error=761,
                           task_id="t_1", command_start_ticks="639000000000000000",
                           vm_type="Microsoft.Compute/virtualMachines",
                           telemetry={"snapshotCreator": "guestExtension"},
                           snapshot_info=[], freeze_window_ms=12)
    for key, value in changes.items():
        setattr(report, key, value)
    return report


def test_blob_and_file_documents_have_azures_shape() -> None:
    report = _report()
    when = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    blob_text = status.blob_document(report, when)
    assert f'"timestampUTC": "\\/Date({int(when.timestamp() * 1000)})\\/"' in blob_text
    doc = json.loads(blob_text)[0]["status"]
    assert list(doc) == ["name", "operation", "status", "substatus", "code", "taskId",
                         "formattedMessage", "storageDetails", "commandStartTimeUTCTicks",
                         "telemetryData", "uniqueMachineId", "snapshotInfo", "vmHealthInfo",
                         "freezeWindowMilliseconds"]
    assert doc["code"] == "76" and doc["status"] == "error"
    assert doc["vmHealthInfo"] == {"vmHealthState": 256, "vmHealthStatusCode": 761}
    inner = json.loads(doc["formattedMessage"]["message"])
    assert inner["messageStr"] == ("no network StatusCode.FailedRetryableSnapshotFailed"
                                   "RestrictedNetwork, snapshotCreator=guestExtension, ")
    assert inner["snapshotConsistency"] == 0
    telemetry = {t["Key"]: t["Value"] for t in doc["telemetryData"]}
    assert telemetry["extErrorCode"] == "FailedRetryableSnapshotFailedRestrictedNetwork"
    file_doc = json.loads(status.file_document(report, blob_text, when))[0]
    assert file_doc["timestampUTC"] == "2026-11-23T12:00:00Z"
    assert file_doc["status"]["status"] == "success"  # microsoft.compute: terminal -> success
    assert file_doc["status"]["substatus"] == [{"code": "0", "name": blob_text,
                                               "status": "success", "formattedMessage": None}]
    classic = json.loads(status.file_document(
        _report(vm_type="microsoft.classiccompute/virtualmachines"), blob_text, when))[0]
    assert classic["status"]["status"] == "error"


def test_codes_in_one_table() -> None:
    assert codes.health(76) == codes.RED and codes.health(121) == codes.YELLOW
    assert codes.health(173) == codes.GREEN and codes.name(402) == (
        "FailedGuestAgentInvokedCommandTooLate")
    outcome = codes.Outcome()
    outcome.fail(76, "first", 761)
    outcome.fail(2, "second")
    assert (outcome.code, outcome.ext_error) == (2, 761)  # the first ExtErrorCode wins


# --- the package ----------------------------------------------------------------------------


def test_handler_package(tmp_path: Path) -> None:
    path = package.build_package(tmp_path)
    assert path.name == "Microsoft.RecoveryServices.VMSnapshot-1.9.zip"
    assert (vmsnapshot.PUBLISHER, vmsnapshot.TYPE, vmsnapshot.VERSION) == (
        "Microsoft.RecoveryServices", "VMSnapshot", "1.9")
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read("HandlerManifest.json"))
        zf.extractall(tmp_path / "x")
        mode = zf.getinfo("bin/vmsnapshot.sh").external_attr >> 16
    assert mode & stat.S_IXUSR
    assert manifest == [{"name": "Microsoft.RecoveryServices.VMSnapshot", "version": "1.9",
                         "handlerManifest": {
                             "installCommand": "bin/vmsnapshot.sh install",
                             "uninstallCommand": "bin/vmsnapshot.sh uninstall",
                             "updateCommand": "bin/vmsnapshot.sh update",
                             "enableCommand": "bin/vmsnapshot.sh enable",
                             "disableCommand": "bin/vmsnapshot.sh disable",
                             "rebootAfterInstall": False, "reportHeartbeat": False,
                             "enableTimeoutInSeconds": 300}}]
    script = tmp_path / "x/bin/vmsnapshot.sh"
    script.chmod(0o755)
    env = dict(os.environ, VMVAULT_PYTHON=sys.executable)
    proc = subprocess.run([str(script), "nonsense"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: python -m vmvault.extensions.vmsnapshot" in \
        proc.stderr
