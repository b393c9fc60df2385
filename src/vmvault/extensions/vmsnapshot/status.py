"""The status documents Azure's extension writes (wire spec 1.7 and 3.1).

* The status blob: ``[ {version, timestampUTC: "\\/Date(ms)\\/", status: {...}} ]`` with
  telemetry, snapshotInfo, vmHealthInfo, and vmvault's ``freezeWindowMilliseconds``.
* The status file ``status/<N>.status`` for the agent: the same shape, its
  ``substatus[0].name`` holding the status blob's whole JSON text, telemetry, snapshotInfo and
  vmHealthInfo null, and for ``microsoft.compute`` VMs a terminal status shown as
  ``success`` (the outcome is in ``code``), as Azure's. Written to
  ``tempStatusFile.status``, then renamed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmvault.extensions.vmsnapshot import codes

TEMP_STATUS_FILE = "tempStatusFile.status"
_DATE_PLACEHOLDER = "e2794170-c93d-4178-a8da-9bc7fd91ecc0"
TERMINAL = ("success", "error")


@dataclass
class StorageDetails:
    partition_count: int = 0
    used_bytes: int = 0
    size_failed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"partitionCount": self.partition_count,
                "totalUsedSizeInBytes": self.used_bytes,
                "isStoragespacePresent": False,
                "isSizeComputationFailed": self.size_failed}


@dataclass
class Report:
    """What one status says; ``status`` is success, error or transitioning."""

    name: str
    version: str
    status: str
    code: int
    message: str
    ext_error: int = codes.SUCCESS
    operation: str = "Enable"
    task_id: str | None = None
    command_start_ticks: str | None = None
    vm_type: str | None = None
    telemetry: dict[str, str] = field(default_factory=dict)
    snapshot_info: list[dict[str, Any]] | None = None
    storage: StorageDetails = field(default_factory=StorageDetails)
    unique_machine_id: str = ""
    freeze_window_ms: int | None = None
    crash_consistent: bool = False

    @property
    def consistency(self) -> int:
        return codes.consistency(self.code, self.crash_consistent)

    def message_text(self) -> str:
        """messageStr: the message, the StatusCode suffix and the snapshot telemetry, as
        Azure's extension builds it."""
        text = self.message
        if not codes.is_success(self.ext_error):
            text += codes.status_suffix(self.ext_error)
        if "statusBlobUploadError" in self.telemetry:
            text += f" statusBlobUploadError={self.telemetry['statusBlobUploadError']}, "
        extra = "".join(f"{key}={self.telemetry[key]}, " for key in (
            "snapshotCreator", "hostStatusCodePreSnapshot", "hostStatusCodeDoSnapshot")
            if key in self.telemetry)
        if extra and not text.endswith(" "):
            text += " "
        return text + extra

    def formatted_message(self) -> dict[str, str]:
        inner = {"messageStr": self.message_text(), "snapshotConsistency": self.consistency,
                 "jobMessage": "", "isSizeComputationFailed": self.storage.size_failed}
        return {"lang": "en-US", "message": json.dumps(inner)}

    def full_telemetry(self) -> list[dict[str, str]]:
        data = dict(self.telemetry)
        data["extErrorCode"] = codes.name(self.ext_error)
        data["consistencyType"] = codes.CONSISTENCY_NAMES[self.consistency]
        return [{"Value": value, "Key": key} for key, value in data.items()]


def _status_object(report: Report, status: str, substatus: list[dict[str, Any]],
                   full: bool) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "name": report.name,
        "operation": report.operation,
        "status": status,
        "substatus": substatus,
        "code": str(report.code),
        "taskId": report.task_id,
        "formattedMessage": report.formatted_message(),
        "storageDetails": report.storage.to_json(),
        "commandStartTimeUTCTicks": report.command_start_ticks,
        "telemetryData": report.full_telemetry() if full else None,
        "uniqueMachineId": report.unique_machine_id,
        "snapshotInfo": report.snapshot_info if full else None,
        "vmHealthInfo": ({"vmHealthState": codes.health(report.ext_error),
                          "vmHealthStatusCode": report.ext_error} if full else None),
    }
    if report.freeze_window_ms is not None:
        obj["freezeWindowMilliseconds"] = report.freeze_window_ms
    return obj


def blob_document(report: Report, now: dt.datetime | None = None) -> str:
    """The status blob's JSON text; timestampUTC is the literal ``\\/Date(<ms>)\\/``."""
    now = now or dt.datetime.now(dt.UTC)
    doc = [{"version": report.version, "timestampUTC": _DATE_PLACEHOLDER,
            "status": _status_object(report, report.status, [], full=True)}]
    millis = int(now.timestamp() * 1000)
    return json.dumps(doc).replace(_DATE_PLACEHOLDER, rf"\/Date({millis})\/")


def file_document(report: Report, blob_text: str, now: dt.datetime | None = None) -> str:
    """The status file's JSON text, the blob document in ``substatus[0].name``."""
    now = now or dt.datetime.now(dt.UTC)
    status = report.status
    if (report.vm_type or "").lower() == "microsoft.compute/virtualmachines" and \
            status in TERMINAL:
        status = "success"
    substatus = [{"code": "0", "name": blob_text, "status": "success",
                  "formattedMessage": None}]
    doc = [{"version": report.version, "timestampUTC": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "status": _status_object(report, status, substatus, full=False)}]
    return json.dumps(doc)


def write_status_file(status_folder: Path, sequence: int, text: str) -> Path:
    """Write status/<N>.status through status/tempStatusFile.status and a rename."""
    status_folder.mkdir(parents=True, exist_ok=True)
    tmp, final = status_folder / TEMP_STATUS_FILE, status_folder / f"{sequence}.status"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def parse_blob_document(text: str) -> dict[str, Any]:
    """The status object of a status blob's text (trailing page-blob padding ignored)."""
    doc = json.loads(text.rstrip(" \x00\n"))
    status: dict[str, Any] = doc[0]["status"]
    return status
