"""The scheduler: fires each protected item's policy at its time, and runs retention.

A thread in the server wakes every tick (1 s) and reads the service clock
(vmvault.clock). For each protected item it asks the policy for the slots between
the item's cursor and now (control/schedule.py); the newest becomes a Backup job,
and the cursor moves to it in the same transaction. Each job carries its slot
("Policy@2026-11-23T20:30:00Z"), unique per item in the catalog, so a slot never
fires twice, even across restarts or two schedulers on one catalog.

A slot found more than `late_seconds` after its time was missed while the server
was down: it gets one catch-up job that says so (and names any older slots it
stands in for). When more backups of one resource group fall due together than
`group_concurrency` (5, row S3), the rest wait for a turn and carry a warning.

Retention runs every `retention_interval_seconds`: expired snapshots leave the
instant tier, expired recovery points are removed (catalog row first, then the
manifest and the snapshots), then the vault's garbage collection (prune) frees
what no manifest references; prune holds the vault's exclusive lock, so it waits
for running backups and they wait for it.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import Counter, defaultdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from vmvault import arm
from vmvault.catalog import Job, Policy, ProtectedItem, utcnow
from vmvault.context import Context
from vmvault.control import backup, jobs, recoverypoints, schedule
from vmvault.errors import BACKUPS_QUEUED, CATCH_UP, OPERATION_IN_PROGRESS, VmvaultError

log = logging.getLogger(__name__)

ACTIVE_STATES = ("IRPending", "Protected")


class Scheduler:
    def __init__(self, ctx: Context, runner: jobs.JobRunner) -> None:
        self.ctx = ctx
        self.runner = runner
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._gates: dict[str, threading.BoundedSemaphore] = defaultdict(
            lambda: threading.BoundedSemaphore(int(ctx.service.group_concurrency)))
        self._last_retention = 0.0

    # --- the thread ---------------------------------------------------------------------------
    def start(self) -> None:
        self.resubmit_unstarted()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        """Look at the clock now (it was moved, or a policy changed)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the scheduler must outlive a bad tick; the log says why
                log.exception("scheduler tick failed")
            if time.monotonic() - self._last_retention >= \
                    self.ctx.service.retention_interval_seconds:
                self._last_retention = time.monotonic()
                try:
                    recoverypoints.apply_retention(self.ctx)
                except Exception:
                    log.exception("retention pass failed")
            self._wake.wait(max(0.05, self.ctx.service.scheduler_tick_seconds))
            self._wake.clear()

    # --- one tick -----------------------------------------------------------------------------
    def tick(self) -> list[str]:
        """Create the jobs of the slots due now; returns their ids."""
        settings = self.ctx.service
        self.runner.warn_long_running(settings.backup_warn_seconds,
                                      settings.restore_warn_seconds)
        if not settings.schedule_policies:
            return []
        now = utcnow()
        try:
            with self.ctx.catalog.session() as s:
                due = self._due_jobs(s, now)
        except IntegrityError:  # another scheduler took these slots first
            log.info("slots already taken by another scheduler")
            return []
        for job_id, group, queued in due:
            self.runner.submit(job_id, self._work(group, queued))
        return [job_id for job_id, _, _ in due]

    def _due_jobs(self, s: Session, now: dt.datetime) -> list[tuple[str, str, bool]]:
        rows = s.execute(select(ProtectedItem, Policy).join(Policy)
                         .where(ProtectedItem.protection_state.in_(ACTIVE_STATES))).all()
        fired: list[tuple[Job, ProtectedItem, dt.datetime]] = []
        for item, policy in rows:
            cursor = item.schedule_cursor or item.created
            slots = schedule.slots_between(policy.properties, cursor, now)
            if not slots:
                continue
            item.schedule_cursor = slots[-1]
            job = self._slot_job(s, item, policy, slots, now)
            if job is not None:
                fired.append((job, item, slots[-1]))
        s.flush()
        per_group = Counter((item.vm_group, slot) for _, item, slot in fired)
        seen: Counter[tuple[str, dt.datetime]] = Counter()
        result = []
        limit = int(self.ctx.service.group_concurrency)
        for job, item, slot in fired:
            key = (item.vm_group, slot)
            seen[key] += 1
            queued = seen[key] > limit
            if queued:  # row S3
                jobs.add_warning(job, VmvaultError(
                    BACKUPS_QUEUED, count=per_group[key], group=item.vm_group,
                    time=f"{slot:%Y-%m-%d %H:%M} UTC", limit=limit))
            result.append((job.job_id, item.vm_group, queued))
        return result

    def _slot_job(self, s: Session, item: ProtectedItem, policy: Policy,
                  slots: list[dt.datetime], now: dt.datetime) -> Job | None:
        slot = slots[-1]
        late = (now - slot).total_seconds() > self.ctx.service.late_seconds
        params: dict[str, Any] = {
            "backupType": "Scheduled", "policy": policy.name, "slotTime": arm.iso(slot),
            "catchUp": late, "missedSlots": [arm.iso(t) for t in slots[:-1]],
        }
        running = jobs.item_running_job(s, item)
        job = Job(vault_id=item.vault_id, item=item, operation="Backup",
                  entity_friendly_name=item.vm_name, parameters=params,
                  slot=schedule.slot_id(policy.name, slot), start_time=now,
                  result={"Backup Type": "Scheduled", "Slot": schedule.slot_id(policy.name, slot),
                          "Catch-up": str(late)},
                  error_details=[],
                  sub_tasks=[jobs.task(backup.TAKE_SNAPSHOT), jobs.task(backup.TRANSFER)])
        s.add(job)
        if late:
            missed = ", ".join(f"{t:%Y-%m-%d %H:%M} UTC" for t in slots)
            jobs.add_warning(job, VmvaultError(CATCH_UP, missed=missed))
            log.warning("%s: slot %s was missed; catch-up job", item.vm_name, arm.iso(slot))
        if running is not None:  # row B8: the slot's job says why it did not run
            s.flush()
            job.status, job.end_time = "Failed", now
            job.sub_tasks = [{**t, "status": "Failed"} for t in job.sub_tasks]
            job.error_details = [*job.error_details, VmvaultError(
                OPERATION_IN_PROGRESS, name=item.vm_name, job_id=running.job_id).to_dict()]
            item.last_backup_status = "Failed"
            return None
        return job

    def _work(self, group: str, queued: bool) -> Any:
        gate = self._gates[group]

        def work(handle: jobs.JobHandle) -> str:
            if queued:
                handle.set_result(Queued=f"waited for a turn among resource group {group}'s "
                                  "backups (S3)")
            while not gate.acquire(timeout=0.5):
                handle.checkpoint("queued behind other backups of the resource group")
            try:
                return backup.run_backup(self.ctx, handle)
            finally:
                gate.release()
        return work

    # --- restart ------------------------------------------------------------------------------
    def resubmit_unstarted(self) -> None:
        """Scheduled jobs a stopped server created but never started: run them now (the
        slot keeps its one job)."""
        with self.ctx.catalog.session() as s:
            rows = s.scalars(select(Job).where(Job.status == "InProgress",
                                               Job.slot.is_not(None))).all()
            pending = [(j.job_id, j.item.vm_group if j.item else "") for j in rows
                       if not started(j)]
        for job_id, group in pending:
            log.info("resubmitting scheduled job %s (created, never started)", job_id)
            self.runner.submit(job_id, self._work(group, False))


def started(job: Job) -> bool:
    return any(t["status"] != "NotStarted" for t in job.sub_tasks)
