"""The "Take Snapshot" sub-task through the guest (ARCHITECTURE.md, steps 3 to 6).

The server builds the VMSnapshot extension's settings in the seed's schema, with short-lived
SAS URIs scoped to each disk and to a status and a log blob, encrypts the protected part to
the VM's certificate and puts the extension into the VM's goal state. The VM agent runs the
handler; the handler freezes, snapshots every disk through its SAS URI, thaws and writes its
status document to the status blob, which this module reads back.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from vmvault.catalog import VirtualMachine
from vmvault.clock import real_utcnow
from vmvault.context import Context
from vmvault.control.recoverypoints import drop_snapshots
from vmvault.errors import (
    AGENT_NOT_RESPONDING,
    AGENT_UNREACHABLE,
    EXTENSION_FAILED,
    FS_FREEZE_FAILED,
    GUEST_OVERLOADED,
    SNAPSHOT_AUTH_FAILED,
    SNAPSHOT_NO_NETWORK,
    ErrorEntry,
    VmvaultError,
)
from vmvault.extensions import vmsnapshot as handler
from vmvault.fabric import agents, extensions
from vmvault.storage import auth

log = logging.getLogger(__name__)

EXTENSION_NAME = "VMSnapshot"
STATUS_CONTAINER = "vmvault-vmsnapshot"
VM_TYPE = "microsoft.compute/virtualmachines"
TICKS_AT_EPOCH = 621355968000000000  # .NET ticks (100 ns since 0001-01-01) at 1970-01-01
POLL_SECONDS = 0.2
# snapshotConsistency in the status document -> Azure's recoveryPointType
CONSISTENCY = {0: "CrashConsistent", 1: "FileSystemConsistent", 2: "AppConsistent",
               3: "CrashConsistent"}
FREEZE_CODES = (121, 122, 123)
NETWORK_CODES = (15, 76, 761)


@dataclass
class SnapshotResult:
    disks: list[dict[str, Any]]
    consistency: str
    freeze_window_ms: float | None
    status: dict[str, Any] = field(default_factory=dict)


def ticks(when: dt.datetime) -> int:
    return TICKS_AT_EPOCH + int(when.replace(tzinfo=dt.UTC).timestamp() * 10**7)


def _b64json(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def _sas_url(ctx: Context, account: str, key: str, container: str, blob: str,
             expiry: dt.datetime) -> str:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    sas = auth.generate_blob_sas(account, key, container, blob, "rw", expiry, start)
    return auth.blob_url(ctx.blob_url, account, container, blob, sas=sas)


def wait_for_quiet_guest(ctx: Context, vm_pk: int, name: str) -> None:
    """Row S4: while the guest's CPU or memory is above the limit, the snapshot waits; if it
    stays there past the pickup time, the job fails and says why."""
    limit = ctx.guest.load_limit_percent
    deadline = time.monotonic() + ctx.guest.pickup_seconds
    while True:
        with ctx.catalog.session() as s:
            vm = s.get_one(VirtualMachine, vm_pk)
            load = dict(vm.agent.load) if vm.agent else {}
        busy = [(res, float(load.get(key) or 0)) for res, key in
                (("CPU", "cpuPercent"), ("memory", "memoryPercent"))
                if float(load.get(key) or 0) > limit]
        if not busy:
            return
        if time.monotonic() >= deadline:
            resource, value = busy[0]
            raise VmvaultError(GUEST_OVERLOADED, name=name, resource=resource,
                               limit=f"{limit:.0f}", value=f"{value:.0f}")
        time.sleep(1.0)


def start(ctx: Context, vm_pk: int, job_id: str) -> tuple[str, dict[str, Any]]:
    """Put a snapshot command into the VM's goal state; returns the task id and what is needed
    to follow it."""
    now = real_utcnow()  # the guest compares it with its own clock
    task_id = f"{job_id}_1"
    with ctx.catalog.session() as s:
        vm = s.get_one(VirtualMachine, vm_pk)
        account = vm.storage_account.name
        key = ctx.store.get_account(account).key1
        expiry = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=ctx.guest.sas_ttl_seconds)
        ctx.store.create_container(account, STATUS_CONTAINER, exist_ok=True)
        prefix = f"{vm.vm_id}.{task_id}"
        status_blob, logs_blob = f"{prefix}.v2.Status.txt", f"{prefix}.v2.Logs.txt"
        for blob in (status_blob, logs_blob):
            ctx.store.create_page_blob(account, STATUS_CONTAINER, blob, 0)
        disks = [{"name": d.name, "lun": d.lun, "size": d.size_bytes, "fsType": d.fs_type,
                  "account": account, "container": d.container, "blob": d.blob}
                 for d in vm.disks]
        sas_uris = [_sas_url(ctx, account, key, d.container, d.blob, expiry) for d in vm.disks]
        public = {
            "locale": "en-us",
            "taskId": task_id,
            "commandToExecute": "snapshot",
            "commandStartTimeUTCTicks": str(ticks(now)),
            "vmType": VM_TYPE,
            "objectStr": _b64json({
                "backupMetadata": [{"Key": "vmvaultjobid", "Value": job_id}],
                "includedDisks": {"dataDiskLunList": [d.lun for d in vm.disks if d.lun >= 0],
                                  "isOSDiskIncluded": True},
            }),
        }
        protected = {
            "objectStr": _b64json({"blobSASUri": sas_uris}),
            "logsBlobUri": _sas_url(ctx, account, key, STATUS_CONTAINER, logs_blob, expiry),
            "statusBlobUri": _sas_url(ctx, account, key, STATUS_CONTAINER, status_blob, expiry),
        }
        ext = extensions.put(ctx, s, vm, EXTENSION_NAME, handler.PUBLISHER, handler.TYPE,
                             handler.VERSION, public, protected)
        follow = {"vm": vm.name, "vmPk": vm_pk, "account": account, "statusBlob": status_blob,
                  "logsBlob": logs_blob, "sequenceNumber": ext.sequence_number, "disks": disks,
                  "taskId": task_id, "vmId": vm.vm_id,
                  "incarnation": vm.incarnation}
    agents.notify_goal_state()
    log.info("job %s: VMSnapshot sequence %d put into the goal state of %s", job_id,
             follow["sequenceNumber"], follow["vm"])
    return task_id, follow


def read_status(ctx: Context, account: str, blob: str) -> dict[str, Any] | None:
    """The handler's status document from the status blob (None while it is empty)."""
    text = ctx.store.read(account, STATUS_CONTAINER, blob).decode("utf-8", "replace")
    text = text.strip().strip("\0").strip()
    if not text:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None  # a write in progress (cleared, not yet updated)
    if isinstance(doc, list) and doc:
        doc = doc[0]
    status = doc.get("status") if isinstance(doc, dict) else None
    return status if isinstance(status, dict) else None


def _fetched(follow: dict[str, Any], heartbeat_age: float | None) -> bool:
    """The agent fetched the goal state with the task, and was heard from afterwards."""
    if agents.delivered(follow["vmId"]) < follow["incarnation"]:
        return False
    since = agents.seconds_since_delivery(follow["vmId"])
    return heartbeat_age is not None and since is not None and heartbeat_age <= since


def _agent_view(ctx: Context, follow: dict[str, Any]) -> tuple[dict[str, Any] | None,
                                                                 float | None]:
    with ctx.catalog.session() as s:
        vm = s.get_one(VirtualMachine, follow["vmPk"])
        ext = next((e for e in vm.extensions if e.name == EXTENSION_NAME), None)
        report = None
        if ext is not None and ext.sequence_number == follow["sequenceNumber"]:
            report = extensions.handler_report(vm, ext)
        age = agents.seconds_since(vm.agent.last_heartbeat) if vm.agent else None
    return report, age


def status_from_file(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The status document the handler put in its status file (substatus[0].name holds the
    status blob's document): what the server reads when the status blob could not be written,
    e.g. because the storage was unreachable or the SAS had expired."""
    doc: Any = (report or {}).get("statusFile")
    try:
        top = doc[0] if isinstance(doc, list) else doc
        inner = json.loads(top["status"]["substatus"][0]["name"])
        inner = inner[0] if isinstance(inner, list) else inner
        status = inner["status"]
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return status if isinstance(status, dict) else None


TRANSITIONING_CODE = "4"  # ExtensionTempTerminalState: Azure's enable reports it, then works on


def _final(status: dict[str, Any] | None, task_id: str) -> bool:
    return (status is not None and status.get("taskId") == task_id
            and status.get("status") in ("success", "error")
            and str(status.get("code")) != TRANSITIONING_CODE)


def wait(ctx: Context, task_id: str, follow: dict[str, Any]) -> dict[str, Any]:
    """Follow the extension until its status blob (or, failing that, the status file the agent
    reports) holds a final status for this task."""
    name = follow["vm"]
    started = time.monotonic()
    while True:
        status = read_status(ctx, follow["account"], follow["statusBlob"])
        if status is not None and _final(status, task_id):
            return status
        report, age = _agent_view(ctx, follow)
        if report is not None:
            from_file = status_from_file(report)
            if from_file is not None and _final(from_file, task_id):
                return from_file
            if report.get("status") == "error" or report.get("code") not in (None, 0):
                raise VmvaultError(EXTENSION_FAILED, extension=EXTENSION_NAME, name=name,
                                   reason=_report_reason(report))
        picked_up = status is not None or report is not None or _fetched(follow, age)
        elapsed = time.monotonic() - started
        if picked_up and age is not None and age > ctx.guest.agent_stale_seconds:
            raise VmvaultError(AGENT_NOT_RESPONDING, name=name,
                               reason=f"the agent took the snapshot task up, then stopped "
                                      f"reporting (no heartbeat for {age:.0f} s)")
        if not picked_up and elapsed > ctx.guest.pickup_seconds:
            if age is not None and age > ctx.guest.agent_stale_seconds:
                raise VmvaultError(AGENT_UNREACHABLE, name=name,
                                   reason=f"no heartbeat for {age:.0f} s")
            raise VmvaultError(AGENT_NOT_RESPONDING, name=name,
                               reason=f"the snapshot task was not taken up in "
                                      f"{ctx.guest.pickup_seconds:.0f} s")
        if elapsed > ctx.guest.snapshot_seconds:
            raise VmvaultError(AGENT_NOT_RESPONDING, name=name,
                               reason=f"the snapshot task did not finish in "
                                      f"{ctx.guest.snapshot_seconds:.0f} s")
        time.sleep(POLL_SECONDS)


def _report_reason(report: dict[str, Any]) -> str:
    code = report.get("code")
    if code == -1:
        return "the handler's enable command timed out and was killed"
    if code == -2:
        return f"the handler package could not be installed: {report.get('message', '')}"
    return str(report.get("message") or f"exit code {code}")


def _message(status: dict[str, Any]) -> dict[str, Any]:
    text = (status.get("formattedMessage") or {}).get("message") or ""
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) else {"messageStr": text}
    except ValueError:
        return {"messageStr": text}


def _snapshot_id(uri: str | None) -> str | None:
    if not uri:
        return None
    return urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query).get("snapshot", [None])[0]


def result(ctx: Context, status: dict[str, Any], follow: dict[str, Any]) -> SnapshotResult:
    """The snapshots the extension took, or the catalog error its code means."""
    code = int(status.get("code") or 2)
    message = _message(status)
    info = status.get("snapshotInfo") or []
    disks = []
    for disk, snap in zip(follow["disks"], info, strict=False):
        sid = _snapshot_id(snap.get("snapshotUri")) if snap.get("isSuccessful") else None
        disks.append({**disk, "snapshot": sid})
    complete = len(disks) == len(follow["disks"]) and all(d["snapshot"] for d in disks)
    if code in (0, 1) and complete:
        freeze = status.get("freezeWindowMilliseconds")
        consistency = CONSISTENCY.get(int(message.get("snapshotConsistency") or 0),
                                      "CrashConsistent")
        return SnapshotResult(disks, consistency, float(freeze) if freeze is not None else None,
                              status)
    drop = [d for d in disks if d.get("snapshot")]

    drop_snapshots(ctx, drop)
    raise _failure(code, message, info, follow["vm"])


def _failure(code: int, message: dict[str, Any], info: list[Any], name: str) -> VmvaultError:
    text = str(message.get("messageStr") or f"extension code {code}").strip()
    entry: ErrorEntry
    if code in FREEZE_CODES:
        entry = FS_FREEZE_FAILED
    elif code in NETWORK_CODES or any(not s.get("isSuccessful") for s in info):
        statuses = {s.get("statusCode") for s in info}
        entry = SNAPSHOT_AUTH_FAILED if 403 in statuses else SNAPSHOT_NO_NETWORK
    else:
        return VmvaultError(EXTENSION_FAILED, extension=EXTENSION_NAME, name=name,
                            reason=f"code {code}: {text}")
    return VmvaultError(entry, name=name, reason=text)


def host_snapshot(ctx: Context, vm_pk: int, job_id: str) -> SnapshotResult:
    """A VM that is shut down has no running guest: the host snapshots its disks (unmounted,
    so nothing is in flight). Azure calls such a point crash-consistent; so does vmvault."""
    with ctx.catalog.session() as s:
        vm = s.get_one(VirtualMachine, vm_pk)
        account = vm.storage_account.name
        disks: list[dict[str, Any]] = [
            {"name": d.name, "lun": d.lun, "size": d.size_bytes, "fsType": d.fs_type,
             "account": account, "container": d.container, "blob": d.blob} for d in vm.disks]
    taken: list[dict[str, Any]] = []

    try:
        for d in disks:
            snap = ctx.store.snapshot_blob(account, d["container"], d["blob"],
                                           metadata={"vmvaultjobid": job_id})
            taken.append({**d, "snapshot": snap})
    except BaseException:
        drop_snapshots(ctx, taken)
        raise
    return SnapshotResult(taken, "CrashConsistent", None)


def take(ctx: Context, vm_pk: int, job_id: str) -> SnapshotResult:
    """The whole sub-task: through the guest when the VM runs (goal state, wait, result), by
    the host when it is shut down."""
    with ctx.catalog.session() as s:
        vm = s.get_one(VirtualMachine, vm_pk)
        name, running = vm.name, vm.power_state == "running"
    if not running:
        return host_snapshot(ctx, vm_pk, job_id)
    wait_for_quiet_guest(ctx, vm_pk, name)
    task_id, follow = start(ctx, vm_pk, job_id)
    try:
        status = wait(ctx, task_id, follow)
    finally:
        _remove_status_blobs(ctx, follow)
    return result(ctx, status, follow)


def _remove_status_blobs(ctx: Context, follow: dict[str, Any]) -> None:
    """Keep the last status and log blobs of a VM only (they are read by people debugging)."""
    account = follow["account"]
    keep = {follow["statusBlob"], follow["logsBlob"]}
    try:
        for blob in ctx.store.list_blobs(account, STATUS_CONTAINER, prefix=follow["vmId"] + "."):
            if blob.name not in keep:
                ctx.store.delete_blob(account, STATUS_CONTAINER, blob.name)
    except VmvaultError:
        pass
