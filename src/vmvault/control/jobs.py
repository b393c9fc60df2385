"""Backup jobs (Microsoft.RecoveryServices/vaults/backupJobs) and the worker that runs them.

A job has Azure's shape: operation, status (InProgress, Completed,
CompletedWithWarnings, Failed, Cancelled), start, end, duration, sub-tasks and
error details taken from the error catalog. One operation per protected item at
a time (row B8). Jobs run on worker threads inside the server; a job left
InProgress by a server that died is failed at the next start.

Cancelling (`backup job stop`, rows J1-J4) is cooperative: Backup and Restore jobs
pass checkpoints (between steps, and with every progress report of a transfer); a
stop request is taken at the next checkpoint, where the job undoes what it started
and ends Cancelled. A job that has begun to commit its result can no longer be
cancelled (J2); a job that reaches no checkpoint within the stop's wait keeps
running and the stop fails (J4).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmvault import arm
from vmvault.catalog import Job, ProtectedItem, Vault, utcnow
from vmvault.context import Context
from vmvault.errors import (
    BACKUP_TOO_LONG,
    INTERNAL_ERROR,
    JOB_CANCEL_FAILED,
    JOB_CANCEL_NOT_SUPPORTED,
    JOB_CANCELLED,
    JOB_NOT_CANCELLABLE,
    JOB_NOT_IN_PROGRESS,
    OPERATION_IN_PROGRESS,
    RESTORE_TOO_LONG,
    VmvaultError,
    invalid,
    not_found,
)

log = logging.getLogger(__name__)

STATUSES = ("InProgress", "Completed", "CompletedWithWarnings", "Failed", "Cancelled")
OPERATIONS = ("Backup", "Restore", "ConfigureBackup", "DisableBackup", "DeleteBackupData")
CANCELLABLE = ("Backup", "Restore")
_item_lock = threading.Lock()


class JobCancelled(VmvaultError):
    """Raised at a checkpoint of a job whose stop was asked for."""

    def __init__(self, where: str) -> None:
        super().__init__(JOB_CANCELLED, where=where)


class CancelState:
    """One running job's side of a stop request (kept in memory by the runner)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.requested = False
        self.accepted = False
        self.committing: str | None = None  # why the job can no longer be cancelled
        self.step = "queued"
        self.started: float | None = None  # time.monotonic() when a worker took it


def get(s: Session, vault: Vault, job_id: str) -> Job:
    job = s.scalar(select(Job).where(Job.vault_id == vault.id, Job.job_id == job_id))
    if job is None:
        raise not_found("job", job_id)
    return job


def task(name: str) -> dict[str, Any]:
    return {"taskId": name, "status": "NotStarted", "startTime": None, "endTime": None,
            "duration": None, "progressPercentage": 0}


def create(ctx: Context, vault_id: int, item_id: int | None, operation: str, friendly: str,
           parameters: dict[str, Any], sub_tasks: list[str]) -> str:
    """Record a new InProgress job; refuse if the item already has one running (B8)."""
    with _item_lock, ctx.catalog.session() as s:
        if item_id is not None and operation in ("Backup", "Restore"):
            running = s.scalar(select(Job).where(Job.item_id == item_id,
                                                 Job.status == "InProgress",
                                                 Job.operation.in_(("Backup", "Restore"))))
            if running is not None:
                raise VmvaultError(OPERATION_IN_PROGRESS, name=friendly, job_id=running.job_id)
        job = Job(vault_id=vault_id, item_id=item_id, operation=operation,
                  entity_friendly_name=friendly, parameters=parameters,
                  sub_tasks=[task(t) for t in sub_tasks])
        s.add(job)
        s.flush()
        return job.job_id


class JobHandle:
    """What a running job uses to report: sub-task states, progress, the end."""

    def __init__(self, ctx: Context, job_id: str, cancel: CancelState | None = None) -> None:
        self.ctx = ctx
        self.job_id = job_id
        self.cancel = cancel or CancelState()
        self._last_progress = 0.0

    def checkpoint(self, where: str) -> None:
        """A point where the job can stop: raise JobCancelled if a stop was asked for."""
        with self.cancel.cond:
            self.cancel.step = where
            if self.cancel.requested and self.cancel.committing is None:
                self.cancel.accepted = True
                self.cancel.cond.notify_all()
                raise JobCancelled(where)

    def commit(self, what: str) -> None:
        """From here on the job completes: a stop asked for now is refused (row J2)."""
        self.checkpoint(what)
        with self.cancel.cond:
            self.cancel.committing = what
            self.cancel.cond.notify_all()

    def _update(self, change: Callable[[Job], None]) -> None:
        with self.ctx.catalog.session() as s:
            job = s.scalar(select(Job).where(Job.job_id == self.job_id))
            assert job is not None
            change(job)

    def start_task(self, name: str) -> None:
        self.checkpoint(name)

        def change(job: Job) -> None:
            job.sub_tasks = [
                {**t, "status": "InProgress", "startTime": arm.iso(utcnow())}
                if t["taskId"] == name else t for t in job.sub_tasks
            ]
        self._update(change)

    def end_task(self, name: str, status: str = "Completed") -> None:
        now = utcnow()

        def change(job: Job) -> None:
            tasks = []
            for t in job.sub_tasks:
                if t["taskId"] == name:
                    start = dt.datetime.fromisoformat(t["startTime"].rstrip("Z")) if t[
                        "startTime"] else now
                    t = {**t, "status": status, "endTime": arm.iso(now),
                         "duration": arm.duration(start, now),
                         "progressPercentage": 100 if status == "Completed" else t[
                             "progressPercentage"]}
                tasks.append(t)
            job.sub_tasks = tasks
        self._update(change)

    def progress(self, name: str, done: int, total: int, force: bool = False) -> None:
        """Record a sub-task's progress, at most twice a second."""
        now = time.monotonic()
        if not force and now - self._last_progress < 0.5:
            return
        self._last_progress = now
        percent = int(100 * done / total) if total else 100

        def change(job: Job) -> None:
            job.sub_tasks = [{**t, "progressPercentage": percent} if t["taskId"] == name else t
                             for t in job.sub_tasks]
            finished = sum(1 for t in job.sub_tasks if t["status"] == "Completed")
            job.progress_percent = int((finished * 100 + percent) / max(1, len(job.sub_tasks)))
        self._update(change)

    def set_result(self, **values: Any) -> None:
        def change(job: Job) -> None:
            job.result = {**job.result, **values}
        self._update(change)

    def finish(self, status: str, error: VmvaultError | None = None) -> None:
        def change(job: Job) -> None:
            warned = any(e.get("warning") for e in job.error_details)
            job.status = "CompletedWithWarnings" if status == "Completed" and warned else status
            job.end_time = utcnow()
            if status in ("Completed", "CompletedWithWarnings"):
                job.progress_percent = 100
            job.sub_tasks = [
                {**t, "status": "Cancelled" if status == "Cancelled" else "Failed"}
                if t["status"] in ("NotStarted", "InProgress") and status not in (
                    "Completed", "CompletedWithWarnings") else t
                for t in job.sub_tasks
            ]
            if error is not None:
                job.error_details = [*job.error_details, error.to_dict()]
        self._update(change)


class JobRunner:
    """Worker threads running jobs in the server process."""

    def __init__(self, ctx: Context, workers: int = 2) -> None:
        self.ctx = ctx
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="job")
        self._cancel: dict[str, CancelState] = {}
        self._lock = threading.Lock()

    def submit(self, job_id: str, work: Callable[[JobHandle], str | None]) -> None:
        with self._lock:
            self._cancel[job_id] = CancelState()
        self._pool.submit(self._run, job_id, work)

    def _run(self, job_id: str, work: Callable[[JobHandle], str | None]) -> None:
        with self._lock:
            cancel = self._cancel.setdefault(job_id, CancelState())
        handle = JobHandle(self.ctx, job_id, cancel)
        with cancel.cond:
            if cancel.accepted:  # stopped while it waited for a worker: already Cancelled
                cancel.step = "ended"
                return self._forget(job_id, cancel)
            cancel.step = "starting"
            cancel.started = time.monotonic()
        try:
            status = work(handle) or "Completed"
            handle.finish(status)
        except JobCancelled as exc:
            log.info("job %s cancelled (%s)", job_id, exc.fields.get("where"))
            handle.finish("Cancelled", exc)
        except VmvaultError as exc:
            log.warning("job %s failed: %s", job_id, exc)
            handle.finish("Failed", exc)
        except Exception as exc:  # a bug: the job fails with an internal error, never hangs
            log.exception("job %s crashed", job_id)
            handle.finish("Failed", VmvaultError(INTERNAL_ERROR, reason=f"{type(exc).__name__}: "
                                                 f"{exc}"))
        finally:
            self._forget(job_id, cancel)

    def _forget(self, job_id: str, cancel: CancelState) -> None:
        with self._lock:
            self._cancel.pop(job_id, None)
        with cancel.cond:
            cancel.cond.notify_all()

    def warn_long_running(self, backup_limit_s: float, restore_limit_s: float) -> None:
        """Backups running longer than their limit (12 h by default) and restores longer than
        theirs (6 h) get the best-practice warning, once; the job goes on and ends
        CompletedWithWarnings. Real time is measured, not the service clock."""
        now = time.monotonic()
        with self._lock:
            ages = {job_id: now - c.started for job_id, c in self._cancel.items()
                    if c.started is not None}
        if not ages:
            return
        with self.ctx.catalog.session() as s:
            for job in s.scalars(select(Job).where(Job.job_id.in_(ages),
                                                   Job.operation.in_(CANCELLABLE))):
                entry, limit = ((BACKUP_TOO_LONG, backup_limit_s) if job.operation == "Backup"
                                else (RESTORE_TOO_LONG, restore_limit_s))
                if ages[job.job_id] > limit:
                    add_warning(job, VmvaultError(entry, name=job.entity_friendly_name,
                                                  elapsed=_hours(ages[job.job_id]),
                                                  limit=_hours(limit)))

    def stop(self, job_id: str, wait_seconds: float) -> None:
        """Ask a running job to stop and wait until it has (rows J1-J4)."""
        with self.ctx.catalog.session() as s:
            job = s.scalar(select(Job).where(Job.job_id == job_id))
            if job is None:
                raise not_found("job", job_id)
            operation, status = job.operation, job.status
        if operation not in CANCELLABLE:
            raise VmvaultError(JOB_CANCEL_NOT_SUPPORTED, operation=operation)
        if status != "InProgress":
            raise VmvaultError(JOB_NOT_IN_PROGRESS, status=status)
        with self._lock:
            cancel = self._cancel.get(job_id)
        if cancel is None:  # it ended between the two looks
            raise VmvaultError(JOB_NOT_IN_PROGRESS, status="no longer running")
        deadline = time.monotonic() + wait_seconds
        with cancel.cond:
            if cancel.committing is not None:
                raise VmvaultError(JOB_NOT_CANCELLABLE, state=cancel.committing)
            cancel.requested = True
            if cancel.step == "queued":  # not started: nothing to undo
                cancel.accepted = True
                JobHandle(self.ctx, job_id, cancel).finish(
                    "Cancelled", JobCancelled("while it waited for a worker"))
                return
            while not cancel.accepted and cancel.committing is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                cancel.cond.wait(left)
            if cancel.committing is not None and not cancel.accepted:
                cancel.requested = False
                raise VmvaultError(JOB_NOT_CANCELLABLE, state=cancel.committing)
            if not cancel.accepted:
                cancel.requested = False
                raise VmvaultError(JOB_CANCEL_FAILED, reason=(
                    f"the job did not reach a point where it can stop within {wait_seconds:g} s "
                    f"(it is in '{cancel.step}'); it goes on"))
        self._wait_ended(job_id, deadline + 60)

    def _wait_ended(self, job_id: str, deadline: float) -> None:
        """After a stop was taken: wait until the job has undone its work and ended."""
        while time.monotonic() < deadline:
            with self._lock:
                if job_id not in self._cancel:
                    return
            time.sleep(0.05)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 360 else f"{seconds:.0f} s"


def add_warning(job: Job, warning: VmvaultError) -> None:
    """Record a warning on a job once (by code): the job ends CompletedWithWarnings."""
    if not any(e["code"] == warning.code for e in job.error_details):
        job.error_details = [*job.error_details, {**warning.to_dict(), "warning": True}]


def fail_orphans(ctx: Context, cleanup: Callable[[Session, Job], None],
                 keep: Callable[[Job], bool] = lambda job: False) -> list[str]:
    """Jobs left InProgress by a server that stopped: fail them and undo their partial work
    (except those `keep` names, which the caller runs again)."""
    failed = []
    with ctx.catalog.session() as s:
        for job in s.scalars(select(Job).where(Job.status == "InProgress")):
            if keep(job):
                continue
            cleanup(s, job)
            job.status = "Failed"
            job.end_time = utcnow()
            job.sub_tasks = [{**t, "status": "Failed"} if t["status"] in (
                "NotStarted", "InProgress") else t for t in job.sub_tasks]
            job.error_details = [*job.error_details, VmvaultError(
                INTERNAL_ERROR, reason="the server stopped while the job ran; nothing it "
                "started was kept").to_dict()]
            failed.append(job.job_id)
    return failed


def to_arm(job: Job) -> dict[str, Any]:
    vault = job.vault
    props: dict[str, Any] = {
        "jobType": "AzureIaaSVMJob",
        "backupManagementType": "AzureIaasVM",
        "operation": job.operation,
        "status": job.status,
        "entityFriendlyName": job.entity_friendly_name,
        "startTime": arm.iso(job.start_time),
        "endTime": arm.iso(job.end_time),
        "duration": arm.duration(job.start_time, job.end_time),
        "activityId": job.job_id,
        "virtualMachineVersion": "Compute",
        "errorDetails": [
            {"errorCode": e["code"], "errorString": e["message"], "errorTitle": "",
             "recommendations": [e["action"]] if e.get("action") else [], "innerError": None}
            for e in job.error_details
        ] or None,
        "extendedInfo": {
            "progressPercentage": job.progress_percent,
            "tasksList": job.sub_tasks,
            "propertyBag": job.result,
            "dynamicErrorMessage": job.error_details[-1]["message"] if job.error_details else None,
            "estimatedRemainingDuration": None,
        },
    }
    return {
        "id": arm.resource_id(vault.group.name, "Microsoft.RecoveryServices", "vaults", vault.name,
                              "backupJobs", job.job_id),
        "name": job.job_id,
        "resourceGroup": vault.group.name,
        "type": "Microsoft.RecoveryServices/vaults/backupJobs",
        "properties": props,
    }


def list_jobs(s: Session, vault: Vault, status: str | None = None, operation: str | None = None,
              start: dt.datetime | None = None, end: dt.datetime | None = None) -> list[Job]:
    query = select(Job).where(Job.vault_id == vault.id).order_by(Job.start_time.desc())
    if status:
        if status not in STATUSES:
            raise invalid("--status", f"'{status}' is not one of {', '.join(STATUSES)}")
        query = query.where(Job.status == status)
    if operation:
        if operation not in OPERATIONS:
            raise invalid("--operation", f"'{operation}' is not one of {', '.join(OPERATIONS)}")
        query = query.where(Job.operation == operation)
    if start:
        query = query.where(Job.start_time >= start)
    if end:
        query = query.where(Job.start_time <= end)
    return list(s.scalars(query))


def item_running_job(s: Session, item: ProtectedItem) -> Job | None:
    return s.scalar(select(Job).where(Job.item_id == item.id, Job.status == "InProgress"))
