"""Policies through the CLI, the scheduler on a simulated clock (slots in a time zone, DST,
one job per slot, catch-up after downtime, row S3), retention and garbage collection, the
protection lifecycle (disable, resume, set-policy, delete data) and rows B1/B7."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Stack, item_args, make_stack, make_vm, needs_root, wait_agent_ready

ZONE_PST = "Pacific Standard Time"


def policy_json(run: str, zone: str = "UTC", daily: int = 7, weekly: list[str] | None = None,
                weekly_weeks: int = 4, instant: int = 2) -> dict[str, Any]:
    """A V1 AzureIaasVM policy as `backup policy show -o json` prints one."""
    stamp = f"2026-01-01T{run}:00Z"
    retention: dict[str, Any] = {
        "retentionPolicyType": "LongTermRetentionPolicy",
        "dailySchedule": {"retentionTimes": [stamp],
                          "retentionDuration": {"count": daily, "durationType": "Days"}},
        "weeklySchedule": None, "monthlySchedule": None, "yearlySchedule": None}
    if weekly:
        retention["weeklySchedule"] = {
            "daysOfTheWeek": weekly, "retentionTimes": [stamp],
            "retentionDuration": {"count": weekly_weeks, "durationType": "Weeks"}}
    return {"properties": {
        "backupManagementType": "AzureIaasVM", "policyType": "V1",
        "instantRpRetentionRangeInDays": instant, "timeZone": zone,
        "schedulePolicy": {"schedulePolicyType": "SimpleSchedulePolicy",
                           "scheduleRunFrequency": "Daily", "scheduleRunDays": None,
                           "scheduleRunTimes": [stamp], "scheduleWeeklyFrequency": 0},
        "retentionPolicy": retention}}


def create_policy(s: Stack, n: dict[str, str], name: str, body: dict[str, Any],
                  tmp: Path) -> dict[str, Any]:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(body))
    return dict(s.json("backup", "policy", "create", "-g", n["rg"], "-v", n["vault"], "-n", name,
                       "--policy", str(path)))


def add_vm(s: Stack, n: dict[str, str], vm: str) -> None:
    """Another VM in the group and storage account make_vm made."""
    s.run("vm", "create", "-g", n["rg"], "-n", vm, "--storage-account", n["sa"],
          "--os-disk-size-gb", "1", "--data-disk-sizes-gb", "1")
    wait_agent_ready(s, {**n, "vm": vm})


def start_protected(s: Stack, n: dict[str, str], tmp: Path, start: str, policy: str,
                    body: dict[str, Any], vms: int = 1) -> list[str]:
    """At `start` on the clock: `vms` VMs in one group, a vault, a policy protecting them."""
    set_clock(s, start)
    names = [n["vm"]] + [f"{n['vm']}-{i}" for i in range(1, vms)]
    make_vm(s, n)
    for vm in names[1:]:
        add_vm(s, n, vm)
    s.run("backup", "vault", "create", "-g", n["rg"], "-n", n["vault"], "-l", n["loc"])
    create_policy(s, n, policy, body, tmp)
    for vm in names:
        s.run("backup", "protection", "enable-for-vm", "-g", n["rg"], "-v", n["vault"], "--vm",
              vm, "--policy-name", policy)
    return names


def set_clock(s: Stack, when: str) -> None:
    s.run("clock", "set", "--time", when)


def jobs_of(s: Stack, n: dict[str, str], operation: str = "Backup") -> list[dict[str, Any]]:
    return [j for j in s.json("backup", "job", "list", "-g", n["rg"], "-v", n["vault"],
                              "--operation", operation)]


def wait_until(what: str, check: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def settled(s: Stack, n: dict[str, str], count: int, timeout: float = 120) -> list[dict[str, Any]]:
    """Wait until the vault has `count` Backup jobs and none is in progress."""
    def check() -> list[dict[str, Any]] | None:
        found = jobs_of(s, n)
        if len(found) >= count and all(j["properties"]["status"] != "InProgress" for j in found):
            return found
        return None
    return list(wait_until(f"{count} finished backup jobs", check, timeout))


def slot_of(job: dict[str, Any]) -> str:
    return str(job["properties"]["extendedInfo"]["propertyBag"].get("Slot") or "")


def codes(job: dict[str, Any]) -> list[str]:
    return [e["errorCode"] for e in job["properties"]["errorDetails"] or []]


@pytest.fixture(scope="module")
def clock_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = make_stack(tmp_path_factory.mktemp("vmvault-clock"), VMVAULT_SIMULATED_CLOCK="1",
                   VMVAULT_RETENTION_SECONDS="1", VMVAULT_SCHEDULE_POLICIES="1")
    yield s
    s.run("down", ok=False)


@pytest.fixture
def quiet(clock_stack: Stack) -> Iterator[list[dict[str, str]]]:
    """Vaults a test protects VMs in; their protection is stopped at the end, so that a later
    test's clock jumps do not fire their policies."""
    used: list[dict[str, str]] = []
    yield used
    for n in used:
        listed = clock_stack.run("backup", "item", "list", "-g", n["rg"], "-v", n["vault"],
                                 "-o", "json", ok=False)
        for item in json.loads(listed.out) if listed.code == 0 else []:
            if item["properties"]["protectionState"] != "ProtectionStopped":
                name = item["properties"]["friendlyName"]
                clock_stack.run("backup", "protection", "disable", "-g", n["rg"], "-v",
                                n["vault"], "-c", name, "-i", name, ok=False)


# --- policies ---------------------------------------------------------------------------------


def test_policy_commands_create_set_delete_and_refuse_what_az_refuses(
        clock_stack: Stack, names: dict[str, str], tmp_path: Path) -> None:
    s, n = clock_stack, names
    s.run("group", "create", "-n", n["rg"], "-l", n["loc"])
    s.run("backup", "vault", "create", "-g", n["rg"], "-n", n["vault"], "-l", n["loc"])
    default = s.json("backup", "policy", "get-default-for-vm", "-g", n["rg"], "-v", n["vault"])
    assert default["name"] == "DefaultPolicy"
    assert default["properties"]["schedulePolicy"]["scheduleRunFrequency"] == "Daily"

    body = policy_json("02:30", ZONE_PST, daily=10, weekly=["Sunday"])
    made = create_policy(s, n, "Nightly", body, tmp_path)
    assert made["properties"]["timeZone"] == ZONE_PST
    assert made["properties"]["protectedItemsCount"] == 0
    table = s.run("backup", "policy", "list", "-g", n["rg"], "-v", n["vault"], "-o", "table").out
    assert "Daily at 02:30 Pacific Standard Time" in table and "weekly 4 w" in table

    again = s.run("backup", "policy", "create", "-g", n["rg"], "-v", n["vault"], "-n", "Nightly",
                  "--policy", str(tmp_path / "Nightly.json"), ok=False)
    assert again.code == 1 and "(ResourceAlreadyExists)" in again.err

    bad_cases = [
        (("retentionPolicy", "dailySchedule", "retentionDuration", "count"), 3,
         "properties.retentionPolicy.dailySchedule.retentionDuration.count", "7 to 9999"),
        (("timeZone",), "Europe/Berlin", "properties.timeZone", "W. Europe Standard Time"),
        (("schedulePolicy", "scheduleRunTimes"), ["2026-01-01T02:10:00Z"],
         "properties.schedulePolicy.scheduleRunTimes", "minutes 00 or 30"),
        (("instantRpRetentionRangeInDays",), 9, "properties.instantRpRetentionRangeInDays",
         "1 to 5"),
        (("policyType",), "V2", "properties.policyType", "V1 daily or weekly"),
    ]
    for path, value, field, hint in bad_cases:
        broken = json.loads(json.dumps(body))
        target = broken["properties"]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        (tmp_path / "bad.json").write_text(json.dumps(broken))
        r = s.run("backup", "policy", "create", "-g", n["rg"], "-v", n["vault"], "-n", "Bad",
                  "--policy", str(tmp_path / "bad.json"), ok=False)
        assert r.code == 1, field
        assert f"(InvalidArgumentValue) Invalid value for {field}:" in r.err, r.err
        assert hint in r.err, (hint, r.err)
    assert "Bad" not in [p["name"] for p in s.json("backup", "policy", "list", "-g", n["rg"],
                                                    "-v", n["vault"])]

    body["properties"]["retentionPolicy"]["dailySchedule"]["retentionDuration"]["count"] = 20
    (tmp_path / "changed.json").write_text(json.dumps(body))
    changed = s.json("backup", "policy", "set", "-g", n["rg"], "-v", n["vault"], "-n", "Nightly",
                     "--policy", str(tmp_path / "changed.json"))
    assert changed["properties"]["retentionPolicy"]["dailySchedule"]["retentionDuration"][
        "count"] == 20
    missing = s.run("backup", "policy", "set", "-g", n["rg"], "-v", n["vault"], "-n", "Nope",
                    "--policy", str(tmp_path / "changed.json"), ok=False)
    assert missing.code == 3 and "(ResourceNotFound)" in missing.err
    s.run("backup", "policy", "delete", "-g", n["rg"], "-v", n["vault"], "-n", "Nightly")
    gone = s.run("backup", "policy", "show", "-g", n["rg"], "-v", n["vault"], "-n", "Nightly",
                 ok=False)
    assert gone.code == 3


# --- the scheduler ----------------------------------------------------------------------------


@needs_root()
def test_policy_fires_at_its_local_time_across_dst_once_per_slot_and_catches_up(
        clock_stack: Stack, names: dict[str, str], tmp_path: Path,
        quiet: list[dict[str, str]]) -> None:
    s, n = clock_stack, names
    quiet.append(n)
    start_protected(s, n, tmp_path, "2027-03-12T12:00:00Z", "Pacific0230",
                    policy_json("02:30", ZONE_PST))
    # 02:30 PST is 10:30 UTC; on 14 March 2027 02:30 does not exist (clocks go 02:00 -> 03:00)
    # and the slot is 03:30 PDT, still 10:30 UTC; from then on 02:30 PDT is 09:30 UTC.
    expected = ["2027-03-13T10:30:00Z", "2027-03-14T10:30:00Z", "2027-03-15T09:30:00Z"]
    for count, slot in enumerate(expected, start=1):
        when = dt.datetime.fromisoformat(slot.replace("Z", "+00:00")) - dt.timedelta(seconds=3)
        set_clock(s, when.isoformat())
        done = settled(s, n, count)
        newest = done[0]
        assert newest["properties"]["status"] == "Completed", newest
        assert slot_of(newest) == f"Pacific0230@{slot}"
        started = dt.datetime.fromisoformat(newest["properties"]["startTime"].replace("Z", ""))
        assert abs((started - when.replace(tzinfo=None)).total_seconds() - 3) < 3
    time.sleep(2.5)  # more ticks at the same slot fire nothing more
    assert len(jobs_of(s, n)) == 3
    rps = s.json("backup", "recoverypoint", "list", *item_args(n))
    assert len(rps) == 3 and all(r["properties"]["recoveryPointKind"] == "Scheduled" for r in rps)
    assert rps[0]["properties"]["retainedBy"] == "Daily until 2027-03-22"

    # Down across two slots: one catch-up job, that says which slots it stands for.
    s.run("down")
    (s.home / "clock.json").write_text(json.dumps({"offsetSeconds": (
        dt.datetime(2027, 3, 17, 12, 0) - dt.datetime.now(dt.UTC).replace(tzinfo=None)
    ).total_seconds()}))
    s.run("up")
    done = settled(s, n, 4)
    catch_up = done[0]
    assert catch_up["properties"]["status"] == "CompletedWithWarnings", catch_up
    assert codes(catch_up) == ["ScheduledBackupCatchUp"]
    text = catch_up["properties"]["errorDetails"][0]["errorString"]
    assert "2027-03-16 09:30 UTC, 2027-03-17 09:30 UTC" in text and "catch-up" in text
    assert slot_of(catch_up) == "Pacific0230@2027-03-17T09:30:00Z"
    assert len({slot_of(j) for j in done}) == 4


@needs_root()
def test_more_than_five_backups_of_a_group_at_once_are_queued_with_a_warning(
        clock_stack: Stack, names: dict[str, str], tmp_path: Path,
        quiet: list[dict[str, str]]) -> None:
    s, n = clock_stack, names
    quiet.append(n)
    start_protected(s, n, tmp_path, "2027-05-01T06:00:00Z", "Seven", policy_json("07:00"), 6)
    set_clock(s, "2027-05-01T06:59:58Z")
    done = settled(s, n, 6, timeout=240)
    assert len(done) == 6
    queued = [j for j in done if "ScheduledBackupsQueued" in codes(j)]
    assert len(queued) == 1, [codes(j) for j in done]
    warning = queued[0]["properties"]["errorDetails"][0]
    assert f"6 backups of resource group '{n['rg']}'" in warning["errorString"]
    assert "at least an hour" in warning["recommendations"][0]
    assert queued[0]["properties"]["status"] == "CompletedWithWarnings"
    assert all(j["properties"]["status"] == "Completed" for j in done if j not in queued)


@needs_root()
def test_deleted_vm_fails_its_scheduled_backup_then_a_recreated_one_is_protected(
        clock_stack: Stack, names: dict[str, str], tmp_path: Path,
        quiet: list[dict[str, str]]) -> None:
    s, n = clock_stack, names
    quiet.append(n)
    start_protected(s, n, tmp_path, "2027-06-01T06:00:00Z", "Eight", policy_json("08:00"))
    s.run("vm", "delete", "-g", n["rg"], "-n", n["vm"], "--yes")
    set_clock(s, "2027-06-01T07:59:58Z")
    failed = settled(s, n, 1)[0]
    assert failed["properties"]["status"] == "Failed"
    error = failed["properties"]["errorDetails"][0]
    assert error["errorCode"] == "UserErrorVmNotFound"
    assert f"The VM '{n['vm']}' no longer exists." == error["errorString"]
    assert "recreate the VM with the same name in the same resource group" in \
        error["recommendations"][0]
    item = s.json("backup", "item", "show", "-g", n["rg"], "-v", n["vault"], "-c", n["vm"],
                  "-n", n["vm"])
    assert item["properties"]["lastBackupStatus"] == "Failed"

    s.run("vm", "create", "-g", n["rg"], "-n", n["vm"], "--storage-account", n["sa"],
          "--os-disk-size-gb", "1", "--data-disk-sizes-gb", "1")
    set_clock(s, "2027-06-02T07:59:58Z")
    done = settled(s, n, 2)
    assert done[0]["properties"]["status"] == "Completed", done[0]
    assert len(s.json("backup", "recoverypoint", "list", *item_args(n))) == 1


# --- retention, garbage collection, protection lifecycle ----------------------------------------


def vault_check(s: Stack, n: dict[str, str]) -> dict[str, Any]:
    report = s.json("backup", "vault", "check", "-g", n["rg"], "-n", n["vault"], "--read-data")
    assert report["ok"] is True, report
    return dict(report)


def rp_names(s: Stack, n: dict[str, str], vm: str | None = None) -> set[str]:
    vm = vm or n["vm"]
    return {r["name"] for r in s.json("backup", "recoverypoint", "list", "-g", n["rg"], "-v",
                                      n["vault"], "-c", vm, "-i", vm)}


@needs_root()
def test_retention_expires_points_and_gc_runs_alongside_a_backup(
        clock_stack: Stack, names: dict[str, str], tmp_path: Path,
        quiet: list[dict[str, str]]) -> None:
    s, n = clock_stack, names
    quiet.append(n)
    vms = start_protected(s, n, tmp_path, "2027-07-01T06:00:00Z", "Nine",
                          policy_json("09:00", daily=7), 2)
    other = {**n, "vm": vms[1]}
    set_clock(s, "2027-07-01T08:59:58Z")
    settled(s, n, 2)
    scheduled = rp_names(s, n)
    on_demand = s.json("backup", "protection", "backup-now", *item_args(n), "--retain-until",
                       "03-07-2027")
    done = s.wait(n["rg"], n["vault"], on_demand["name"])
    assert done["properties"]["status"] == "Completed", done
    kept = done["properties"]["extendedInfo"]["propertyBag"]["Recovery Point Name"]
    assert rp_names(s, n) == scheduled | {kept}
    vault_check(s, n)

    # Two days later the on-demand point has expired; the scheduled one stays 7 days.
    set_clock(s, "2027-07-03T08:00:00Z")
    wait_until("the on-demand point to expire", lambda: kept not in rp_names(s, n), 30)
    assert scheduled <= rp_names(s, n)
    # Eight days later the first scheduled points have expired, while a backup of the other
    # VM runs (on demand, started the moment the clock jumps): both go on, and every remaining
    # point restores.
    job = s.json("backup", "protection", "backup-now", "-g", n["rg"], "-v", n["vault"], "-c",
                 other["vm"], "-i", other["vm"], "--retain-until", "01-01-2030")
    set_clock(s, "2027-07-09T09:10:00Z")
    assert s.wait(n["rg"], n["vault"], job["name"])["properties"]["status"] == "Completed"
    wait_until("the first scheduled points to expire",
               lambda: not (rp_names(s, n) & scheduled), 60)
    settled(s, n, 8)
    remaining = {vm: rp_names(s, n, vm) for vm in (n["vm"], other["vm"])}
    assert vault_check(s, n)["counts"]["manifests"] == sum(map(len, remaining.values()))
    s.run("storage", "account", "create", "-g", n["rg"], "-n", n["restore_sa"])
    for vm, points in remaining.items():
        for rp in points:
            job = s.json("backup", "restore", "restore-disks", "-g", n["rg"], "-v", n["vault"],
                         "-c", vm, "-i", vm, "-r", rp, "--storage-account", n["restore_sa"],
                         "--restore-from", "Vault")
            done = s.wait(n["rg"], n["vault"], job["name"])
            assert done["properties"]["status"] == "Completed", done


@needs_root()
def test_protection_disable_resume_set_policy_and_delete_data(
        clock_stack: Stack, names: dict[str, str], tmp_path: Path,
        quiet: list[dict[str, str]]) -> None:
    s, n = clock_stack, names
    quiet.append(n)
    start_protected(s, n, tmp_path, "2027-08-01T06:00:00Z", "Ten", policy_json("10:00", daily=7))
    create_policy(s, n, "Long", policy_json("11:00", daily=60), tmp_path)
    set_clock(s, "2027-08-01T09:59:58Z")
    point = settled(s, n, 1)[0]
    assert point["properties"]["status"] == "Completed"

    # set-policy: the scheduled point takes the new policy's retention
    s.run("backup", "item", "set-policy", "-g", n["rg"], "-v", n["vault"], "-c", n["vm"], "-n",
          n["vm"], "--policy-name", "Long")
    rp = s.json("backup", "recoverypoint", "list", *item_args(n))[0]
    assert rp["properties"]["expiryTime"].startswith("2027-09-30T10:00")

    # disable, keep data: no scheduled backup, no on-demand backup, points kept past expiry
    s.run("backup", "protection", "disable", *item_args(n))
    item = s.json("backup", "item", "show", "-g", n["rg"], "-v", n["vault"], "-c", n["vm"],
                  "-n", n["vm"])
    assert item["properties"]["protectionState"] == "ProtectionStopped"
    refused = s.run("backup", "protection", "backup-now", *item_args(n), ok=False)
    assert refused.code == 1 and "(UserErrorProtectionStopped)" in refused.err
    assert "vmvault backup protection resume" in refused.err
    set_clock(s, "2027-10-15T12:00:00Z")
    time.sleep(3)
    assert len(jobs_of(s, n)) == 1 and len(rp_names(s, n)) == 1

    # resume: the schedule goes on from now (no catch-up for the stopped weeks)
    s.run("backup", "protection", "resume", *item_args(n), "--policy-name", "Ten")
    time.sleep(2.5)
    assert len(jobs_of(s, n)) == 1
    set_clock(s, "2027-10-16T09:59:58Z")
    assert settled(s, n, 2)[0]["properties"]["status"] == "Completed"

    # delete the data: asks for confirmation; with --yes a DeleteBackupData job removes it all
    no_tty = s.run("backup", "protection", "disable", *item_args(n), "--delete-backup-data",
                   "true", ok=False)
    assert no_tty.code == 1 and "--yes" in no_tty.err
    assert len(rp_names(s, n)) >= 1
    job = s.json("backup", "protection", "disable", *item_args(n), "--delete-backup-data",
                 "true", "--yes")
    done = s.wait(n["rg"], n["vault"], job["name"])
    assert done["properties"]["operation"] == "DeleteBackupData"
    assert done["properties"]["status"] == "Completed", done
    assert s.json("backup", "item", "list", "-g", n["rg"], "-v", n["vault"]) == []
    assert vault_check(s, n)["counts"]["manifests"] == 0


# --- reliability: a simulated day with server restarts ---------------------------------------


@needs_root()
def test_a_day_of_schedule_with_restarts_gives_one_job_per_slot(
        clock_stack: Stack, names: dict[str, str], tmp_path: Path,
        quiet: list[dict[str, str]]) -> None:
    s, n = clock_stack, names
    quiet.append(n)
    rng = random.Random(20261123)
    set_clock(s, "2027-09-01T00:00:00Z")
    times = ["03:00", "09:00", "15:00", "21:00"]
    vms = [n["vm"]] + [f"{n['vm']}-{i}" for i in range(1, len(times))]
    make_vm(s, n)
    for vm in vms[1:]:
        add_vm(s, n, vm)
    s.run("backup", "vault", "create", "-g", n["rg"], "-n", n["vault"], "-l", n["loc"])
    for vm, run in zip(vms, times, strict=True):
        name = "P" + run.replace(":", "")
        create_policy(s, n, name, policy_json(run), tmp_path)
        s.run("backup", "protection", "enable-for-vm", "-g", n["rg"], "-v", n["vault"], "--vm",
              vm, "--policy-name", name)
    start = dt.datetime(2027, 9, 1, 0, 5)
    restarts = 0
    for hour in range(1, 25):  # a day, in steps of an hour (each slot is met 5 minutes late)
        set_clock(s, (start + dt.timedelta(hours=hour)).isoformat())
        time.sleep(rng.uniform(0.1, 2.0))
        if rng.random() < 0.3:  # a restart at a random moment, sometimes mid-backup
            os.kill(s.status()["server"]["pid"], signal.SIGKILL)
            s.run("up")
            restarts += 1
    assert restarts >= 3
    final = settled(s, n, len(times), timeout=180)
    slots = [slot_of(j) for j in final]
    assert len(slots) == len(set(slots)), slots  # never twice
    expected = {f"P{t.replace(':', '')}@2027-09-01T{t}:00Z" for t in times}
    assert set(slots) == expected  # never missed
    for job in final:
        assert job["properties"]["status"] in ("Completed", "CompletedWithWarnings", "Failed")
        if job["properties"]["status"] == "Failed":  # killed mid-backup: says so
            assert "server stopped" in job["properties"]["errorDetails"][0]["errorString"]
    points = sum(len(rp_names(s, n, vm)) for vm in vms)
    completed = sum(1 for j in final if j["properties"]["status"] != "Failed")
    assert points == completed
    assert vault_check(s, n)["counts"]["manifests"] == points
