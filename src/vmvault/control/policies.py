"""Backup policies (Microsoft.RecoveryServices/vaults/backupPolicies), Azure's JSON shape.

Each vault gets DefaultPolicy at creation: daily at a fixed time, 30 days of
daily retention, 2 days of instant-restore snapshots. :func:`validate` checks a
policy's ``properties`` as ``az backup policy create/set --policy FILE`` sends
them (V1 daily or weekly policies, Azure's rules) and returns the form to store;
the schedule's slots are in :mod:`vmvault.control.schedule`, the retention of the
points in :mod:`vmvault.control.retention`.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session
from tzlocal.windows_tz import tz_win, win_tz

from vmvault import arm
from vmvault.catalog import Policy, ProtectedItem, Vault, utcnow
from vmvault.context import Context
from vmvault.errors import RESOURCE_EXISTS, RESOURCE_IN_USE, VmvaultError, invalid, not_found

DEFAULT_POLICY = "DefaultPolicy"


def default_policy_properties(now: dt.datetime | None = None) -> dict[str, Any]:
    run_time = (now or utcnow()).replace(hour=20, minute=30, second=0, microsecond=0)
    stamp = run_time.isoformat() + "+00:00"
    return {
        "backupManagementType": "AzureIaasVM",
        "instantRpRetentionRangeInDays": 2,
        "policyType": "V1",
        "schedulePolicy": {
            "schedulePolicyType": "SimpleSchedulePolicy",
            "scheduleRunFrequency": "Daily",
            "scheduleRunDays": None,
            "scheduleRunTimes": [stamp],
            "scheduleWeeklyFrequency": 0,
        },
        "retentionPolicy": {
            "retentionPolicyType": "LongTermRetentionPolicy",
            "dailySchedule": {
                "retentionTimes": [stamp],
                "retentionDuration": {"count": 30, "durationType": "Days"},
            },
            "weeklySchedule": None,
            "monthlySchedule": None,
            "yearlySchedule": None,
        },
        "timeZone": "UTC",
    }


def get(s: Session, vault: Vault, name: str) -> Policy:
    policy = s.scalar(select(Policy).where(Policy.vault_id == vault.id, Policy.name == name))
    if policy is None:
        raise not_found("policy", name)
    return policy


def list_for(s: Session, vault: Vault) -> list[Policy]:
    return list(s.scalars(select(Policy).where(Policy.vault_id == vault.id).order_by(Policy.name)))


def to_arm(s: Session, policy: Policy) -> dict[str, Any]:
    vault = policy.vault
    count = len(s.scalars(select(ProtectedItem.id)
                          .where(ProtectedItem.policy_id == policy.id)).all())
    return {
        "id": arm.resource_id(vault.group.name, "Microsoft.RecoveryServices", "vaults", vault.name,
                              "backupPolicies", policy.name),
        "name": policy.name,
        "resourceGroup": vault.group.name,
        "type": "Microsoft.RecoveryServices/vaults/backupPolicies",
        "properties": {**policy.properties, "protectedItemsCount": count},
    }


def put(ctx: Context, group: str, vault_name: str, name: str, props: dict[str, Any],
        must_exist: bool = False, must_not_exist: bool = False) -> dict[str, Any]:
    """Create or change a policy (az backup policy create / set). A changed policy's retention
    applies to its items' scheduled points, and its items' schedules go on from now."""
    from vmvault.control import protection, schedule, vaults

    validate_name(name)
    stored = validate(props)
    with ctx.catalog.session() as s:
        vault = vaults.get(s, group, vault_name)
        policy = s.scalar(select(Policy).where(Policy.vault_id == vault.id, Policy.name == name))
        if policy is None and must_exist:
            raise not_found("policy", name)
        if policy is not None and must_not_exist:
            raise VmvaultError(RESOURCE_EXISTS, kind="policy", name=name)
        if policy is None:
            policy = Policy(vault=vault, name=name, properties=stored)
            s.add(policy)
            s.flush()
            return to_arm(s, policy)
        policy.properties = stored
        now = utcnow()
        for item in s.scalars(select(ProtectedItem).where(ProtectedItem.policy_id == policy.id)):
            item.schedule_cursor = schedule.restart_cursor(item.schedule_cursor, now,
                                                           ctx.service.late_seconds)
            protection.retention_changed(s, item)
        return to_arm(s, policy)


def delete(ctx: Context, group: str, vault_name: str, name: str) -> None:
    """Delete a policy that no protected item uses."""
    from vmvault.control import vaults

    with ctx.catalog.session() as s:
        policy = get(s, vaults.get(s, group, vault_name), name)
        users = s.scalars(select(ProtectedItem.vm_name)
                          .where(ProtectedItem.policy_id == policy.id)).all()
        if users:
            raise VmvaultError(RESOURCE_IN_USE, kind="policy", name=name,
                               reason=f"it protects {', '.join(sorted(users))}; move them to "
                               "another policy ('vmvault backup item set-policy') or stop "
                               "their protection first")
        s.delete(policy)


def default_for_vm(ctx: Context, group: str, vault_name: str) -> dict[str, Any]:
    """The vault's DefaultPolicy, or the shape it is created with if it was deleted."""
    from vmvault.control import vaults

    with ctx.catalog.session() as s:
        vault = vaults.get(s, group, vault_name)
        policy = s.scalar(select(Policy).where(Policy.vault_id == vault.id,
                                               Policy.name == DEFAULT_POLICY))
        if policy is not None:
            return to_arm(s, policy)
        return {"name": DEFAULT_POLICY, "resourceGroup": vault.group.name,
                "type": "Microsoft.RecoveryServices/vaults/backupPolicies",
                "properties": {**default_policy_properties(), "protectedItemsCount": 0}}


def instant_rp_days(policy: Policy | None) -> int:
    if policy is None:
        return 2
    return int(policy.properties.get("instantRpRetentionRangeInDays", 2))


# --- validation (az backup policy create/set --policy FILE) ----------------------------------

DAYS = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
WEEKS_OF_MONTH = ("First", "Second", "Third", "Fourth", "Last")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")

_ROOT = "properties"
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]{2,149}$")
_V2_REASON = ("enhanced (V2, hourly) policies are not supported by vmvault yet; "
              "use a V1 daily or weekly policy")
_TZ_EXAMPLES = "'UTC', 'Pacific Standard Time' or 'W. Europe Standard Time'"
_WINDOWS_IDS = {key.lower(): key for key in win_tz}
_RESOURCE_KEYS = ("id", "name", "type", "location", "tags", "etag", "properties")

_TOP_KEYS = ("backupManagementType", "policyType", "instantRpRetentionRangeInDays",
             "instantRPDetails", "timeZone", "schedulePolicy", "retentionPolicy",
             "tieringPolicy", "protectedItemsCount", "resourceGuardOperationRequests",
             "snapshotConsistencyType")
_SCHEDULE_KEYS = ("schedulePolicyType", "scheduleRunFrequency", "scheduleRunTimes",
                  "scheduleRunDays", "scheduleWeeklyFrequency", "hourlySchedule")
_RETENTION_KEYS = ("retentionPolicyType", "dailySchedule", "weeklySchedule", "monthlySchedule",
                   "yearlySchedule")
_DAILY_KEYS = ("retentionTimes", "retentionDuration")
_WEEKLY_KEYS = ("daysOfTheWeek", "retentionTimes", "retentionDuration")
_MONTHLY_KEYS = ("retentionScheduleFormatType", "retentionScheduleDaily",
                 "retentionScheduleWeekly", "retentionTimes", "retentionDuration")
_YEARLY_KEYS = ("monthsOfYear", *_MONTHLY_KEYS)
_DURATION_KEYS = ("count", "durationType")


@dataclass(frozen=True)
class _Schedule:
    """What the retention rules need to know of the validated schedule."""

    weekly: bool
    days: tuple[str, ...]  # the run days of a weekly policy; () for a daily one
    time: dt.time
    stamp: str  # the run time as the user wrote it


def validate_name(name: str) -> str:
    """Check a policy name (the ``--name`` of ``az backup policy create``); return it."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise invalid("--name", f"{_show(name)} is not a valid policy name: use 3 to 150 "
                                "characters, letters, digits and hyphens, starting with a letter")
    return name


def validate(props: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """Validate an AzureIaasVM policy's ``properties`` object; return the form to store.

    Enum values are accepted in any case and stored in Azure's spelling; times keep the
    string the user gave; read-only ``protectedItemsCount`` is dropped. Anything vmvault
    would not run exactly as Azure does is refused, naming the field and what is allowed.
    """
    if name is not None:
        validate_name(name)
    given = _fields(props, _ROOT, _TOP_KEYS)
    out: dict[str, Any] = {
        "backupManagementType": _enum(given.get("backupManagementType"),
                                      f"{_ROOT}.backupManagementType", ("AzureIaasVM",),
                                      "a backup management type vmvault serves",
                                      required=True),
        "policyType": _policy_type(given.get("policyType")),
    }
    schedule_out, schedule = _schedule_policy(given.get("schedulePolicy"))
    out["instantRpRetentionRangeInDays"] = _instant_rp_days(
        given.get("instantRpRetentionRangeInDays"), schedule)
    out["schedulePolicy"] = schedule_out
    out["retentionPolicy"] = _retention_policy(given.get("retentionPolicy"), schedule)
    out["timeZone"] = _time_zone(given.get("timeZone"))
    for key in ("instantRPDetails", "tieringPolicy"):
        if given.get(key) is not None:
            out[key] = _object(given[key], f"{_ROOT}.{key}")
    _unsupported_must_be_empty(given)
    return out


def zone(props: dict[str, Any]) -> ZoneInfo:
    """The policy's time zone (its Windows ``timeZone`` id, mapped to IANA)."""
    return _zone_for(_time_zone(props.get("timeZone")))


def parse_run_time(value: object, field: str) -> dt.time:
    """The time of day of one ISO 8601 date-time string (its date and offset do not count:
    Azure reads the time of day in the policy's ``timeZone``)."""
    example = "give an ISO 8601 date-time such as '2024-01-01T20:30:00Z'"
    if not isinstance(value, str):
        raise invalid(field, f"{_show(value)} is not a date-time string; {example}")
    try:
        stamp = dt.datetime.fromisoformat(value)
    except ValueError:
        raise invalid(field, f"'{value}' is not an ISO 8601 date-time; {example}") from None
    if "T" not in value.upper() and " " not in value:
        raise invalid(field, f"'{value}' has no time of day; {example}")
    if stamp.minute not in (0, 30) or stamp.second or stamp.microsecond:
        raise invalid(field, f"'{value}' is at {stamp:%H:%M:%S}; backups start on the hour or "
                             "the half hour (minutes 00 or 30, seconds 00)")
    return stamp.time()


def run_days(props: dict[str, Any]) -> tuple[str, ...]:
    """The run days of a weekly policy (validated props); () for a daily policy."""
    schedule = props.get("schedulePolicy") or {}
    if schedule.get("scheduleRunFrequency") != "Weekly":
        return ()
    return tuple(schedule.get("scheduleRunDays") or ())


def day_name(day: dt.date) -> str:
    """Azure's name of a date's weekday (Sunday..Saturday)."""
    return DAYS[(day.weekday() + 1) % 7]


def summary(props: dict[str, Any]) -> str:
    """One line for table output, e.g. 'Daily at 20:30 UTC; daily 30 d; snapshots 2 d'."""
    schedule = props.get("schedulePolicy") or {}
    times = schedule.get("scheduleRunTimes") or []
    at = parse_run_time(times[0], "scheduleRunTimes").strftime("%H:%M") if times else "?"
    tz = props.get("timeZone") or "UTC"
    days = run_days(props)
    when = f"Weekly on {', '.join(days)}" if days else "Daily"
    retention = props.get("retentionPolicy") or {}
    kept = [part for part in (_daily_text(retention.get("dailySchedule")),
                              _weekly_text(retention.get("weeklySchedule")),
                              _monthly_text(retention.get("monthlySchedule")),
                              _yearly_text(retention.get("yearlySchedule"))) if part]
    snapshots = props.get("instantRpRetentionRangeInDays", 2)
    return f"{when} at {at} {tz}; {', '.join(kept) or 'no retention'}; snapshots {snapshots} d"


# --- validation helpers --------------------------------------------------------------------


def _show(value: object) -> str:
    """A value as the user wrote it (JSON), for an error's reason."""
    if isinstance(value, str):
        return f"'{value}'"
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _object(value: object, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(field, f"must be a JSON object, not {_kind(value)}")
    return value


def _fields(value: object, field: str, known: tuple[str, ...]) -> dict[str, Any]:
    """An object's fields under Azure's spelling (keys match case-insensitively, as Azure's
    deserializer does); an unknown key is refused, so that a typo does not pass silently."""
    given = _object(value, field)
    spelling = {key.lower(): key for key in known}
    out: dict[str, Any] = {}
    for key, item in given.items():
        name = spelling.get(str(key).lower())
        if name is None:
            raise invalid(f"{field}.{key}", _unknown_reason(str(key), field, known))
        if name in out:
            raise invalid(f"{field}.{key}", f"is given twice (also as '{name}'); field names "
                                            "are not case-sensitive")
        out[name] = item
    return out


def _unknown_reason(key: str, field: str, known: tuple[str, ...]) -> str:
    if field == _ROOT and key.lower() in _RESOURCE_KEYS:
        return ("is a field of the policy resource, not of its properties; give the "
                "'properties' object of the policy")
    return f"unknown field; {field} takes {', '.join(known)}"


def _enum(value: object, field: str, allowed: tuple[str, ...], what: str, *,
          required: bool = False, hint: str = "") -> str:
    """``value`` in Azure's spelling when it names one of ``allowed`` (case-insensitively)."""
    choices = hint or " or ".join(f"'{a}'" for a in allowed)
    if value is None and required:
        raise invalid(field, f"is required; use {choices}")
    if isinstance(value, str):
        for name in allowed:
            if value.lower() == name.lower():
                return name
    raise invalid(field, f"{_show(value)} is not {what}; use {choices}")


def _integer(value: object, field: str, low: int, high: int, unit: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(field, f"{_show(value)} is not an integer; give a whole number from "
                             f"{low} to {high}{unit}")
    if not low <= value <= high:
        raise invalid(field, f"{value} is out of range; give a whole number from {low} to "
                             f"{high}{unit}")
    return value


def _names(value: object, field: str, allowed: tuple[str, ...], what: str,
           hint: str) -> list[str]:
    """A non-empty list of distinct enum names, in Azure's spelling."""
    if not isinstance(value, list) or not value:
        raise invalid(field, f"must be a non-empty list of {what}s ({hint}), not "
                             f"{'an empty list' if value == [] else _kind(value)}")
    names = [_enum(item, field, allowed, f"a {what}", hint=hint) for item in value]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise invalid(field, f"'{name}' is listed twice; list each {what} once")
    return names


def _days(value: object, field: str) -> list[str]:
    return _names(value, field, DAYS, "day", "Sunday..Saturday")


def _policy_type(value: object) -> str:
    field = f"{_ROOT}.policyType"
    if value is None:
        return "V1"
    if isinstance(value, str) and value.upper() == "V2":
        raise invalid(field, _V2_REASON)
    return _enum(value, field, ("V1",), "a policy type vmvault runs")


def _instant_rp_days(value: object, schedule: _Schedule) -> int:
    field = f"{_ROOT}.instantRpRetentionRangeInDays"
    if value is None:
        return 5 if schedule.weekly else 2
    days = _integer(value, field, 1, 5, " days")
    if schedule.weekly and days != 5:
        raise invalid(field, f"{days} days is not allowed for a weekly policy: Azure keeps the "
                             "instant-restore snapshots of a weekly policy 5 days; give 5 or "
                             "leave it out")
    return days


def _time_zone(value: object) -> str:
    field = f"{_ROOT}.timeZone"
    if value is None:
        return "UTC"
    if not isinstance(value, str):
        raise invalid(field, f"{_show(value)} is not a time zone id; use a Windows time zone "
                             f"id such as {_TZ_EXAMPLES}")
    canonical = _WINDOWS_IDS.get(value.strip().lower())
    if canonical is not None:
        return canonical
    windows = _IANA_TO_WINDOWS.get(value.strip().lower())
    if windows is not None:
        raise invalid(field, f"'{value}' is an IANA name; Azure uses Windows time zone ids: "
                             f"use '{windows}'")
    raise invalid(field, f"'{value}' is not a Windows time zone id; use one such as "
                         f"{_TZ_EXAMPLES}")


_IANA_TO_WINDOWS = {key.lower(): value for key, value in tz_win.items()}


@functools.cache
def _zone_for(windows_id: str) -> ZoneInfo:
    return ZoneInfo(win_tz[windows_id])


def _unsupported_must_be_empty(given: dict[str, Any]) -> None:
    """Azure fields that ``az backup policy show`` prints as null: accepted when empty."""
    reasons = {
        "resourceGuardOperationRequests": "resource guard (multi-user authorization) is not "
                                          "supported by vmvault; leave it null",
        "snapshotConsistencyType": "snapshot consistency belongs to enhanced (V2) policies, "
                                   "which vmvault does not support yet; leave it null",
    }
    for key, reason in reasons.items():
        if given.get(key) not in (None, []):
            raise invalid(f"{_ROOT}.{key}", reason)


# --- schedulePolicy ------------------------------------------------------------------------


def _schedule_policy(value: object) -> tuple[dict[str, Any], _Schedule]:
    field = f"{_ROOT}.schedulePolicy"
    if value is None:
        raise invalid(field, "is required: a SimpleSchedulePolicy object (scheduleRunFrequency "
                             "Daily or Weekly, and one scheduleRunTimes entry)")
    given = _fields(value, field, _SCHEDULE_KEYS)
    policy_type = given.get("schedulePolicyType")
    if isinstance(policy_type, str) and policy_type.lower() == "simpleschedulepolicyv2":
        raise invalid(f"{field}.schedulePolicyType", _V2_REASON)
    _enum(policy_type, f"{field}.schedulePolicyType", ("SimpleSchedulePolicy",),
          "a schedule policy type vmvault runs", required=True)
    if given.get("hourlySchedule") is not None:
        raise invalid(f"{field}.hourlySchedule", _V2_REASON)
    frequency = given.get("scheduleRunFrequency")
    if isinstance(frequency, str) and frequency.lower() == "hourly":
        raise invalid(f"{field}.scheduleRunFrequency", _V2_REASON)
    weekly = _enum(frequency, f"{field}.scheduleRunFrequency", ("Daily", "Weekly"),
                   "a schedule frequency", required=True) == "Weekly"
    stamp = _run_times(given.get("scheduleRunTimes"), f"{field}.scheduleRunTimes")
    days = _run_days(given.get("scheduleRunDays"), f"{field}.scheduleRunDays", weekly)
    every = _weekly_frequency(given.get("scheduleWeeklyFrequency"),
                              f"{field}.scheduleWeeklyFrequency", weekly)
    schedule = _Schedule(weekly, tuple(days or ()), parse_run_time(stamp, ""), stamp)
    return {
        "schedulePolicyType": "SimpleSchedulePolicy",
        "scheduleRunFrequency": "Weekly" if weekly else "Daily",
        "scheduleRunDays": days,
        "scheduleRunTimes": [stamp],
        "scheduleWeeklyFrequency": every,
    }, schedule


def _run_times(value: object, field: str) -> str:
    if not isinstance(value, list) or len(value) != 1:
        count = f"{len(value)} times" if isinstance(value, list) else _kind(value)
        raise invalid(field, f"give exactly one run time (a list of one ISO 8601 date-time), "
                             f"not {count}; a V1 policy runs once a day (several a day is an "
                             "enhanced (V2/hourly) policy, not supported yet)")
    parse_run_time(value[0], field)
    return str(value[0])


def _run_days(value: object, field: str, weekly: bool) -> list[str] | None:
    if not weekly:
        if value not in (None, []):
            raise invalid(field, "must be null or empty for a Daily schedule (it runs every "
                                 "day); set scheduleRunFrequency to Weekly to choose days")
        return None
    return _days(value, field)


def _weekly_frequency(value: object, field: str, weekly: bool) -> int:
    if value is None:
        return 0
    if not weekly:
        if isinstance(value, bool) or value != 0:
            raise invalid(field, f"{_show(value)} is not allowed for a Daily schedule; give 0 "
                                 "or leave it out")
        return 0
    return _integer(value, field, 0, 1, " (0 or 1: every week; every few weeks is not "
                                        "supported)")


# --- retentionPolicy -----------------------------------------------------------------------


def _retention_policy(value: object, schedule: _Schedule) -> dict[str, Any]:
    field = f"{_ROOT}.retentionPolicy"
    if value is None:
        raise invalid(field, "is required: a LongTermRetentionPolicy object with a "
                             "dailySchedule (daily policy) or a weeklySchedule (weekly policy)")
    given = _fields(value, field, _RETENTION_KEYS)
    _enum(given.get("retentionPolicyType"), f"{field}.retentionPolicyType",
          ("LongTermRetentionPolicy",), "a retention policy type vmvault runs", required=True)
    _daily_weekly_presence(given, field, schedule)
    daily, weekly = given.get("dailySchedule"), given.get("weeklySchedule")
    monthly, yearly = given.get("monthlySchedule"), given.get("yearlySchedule")
    return {
        "retentionPolicyType": "LongTermRetentionPolicy",
        "dailySchedule": None if daily is None
        else _daily_retention(daily, f"{field}.dailySchedule", schedule),
        "weeklySchedule": None if weekly is None
        else _weekly_retention(weekly, f"{field}.weeklySchedule", schedule),
        "monthlySchedule": None if monthly is None
        else _monthly_retention(monthly, f"{field}.monthlySchedule", schedule),
        "yearlySchedule": None if yearly is None
        else _yearly_retention(yearly, f"{field}.yearlySchedule", schedule),
    }


def _daily_weekly_presence(given: dict[str, Any], field: str, schedule: _Schedule) -> None:
    if schedule.weekly:
        if given.get("dailySchedule") is not None:
            raise invalid(f"{field}.dailySchedule", "must be null for a weekly policy (it takes "
                                                    "no daily points); keep its points with "
                                                    "weeklySchedule")
        if given.get("weeklySchedule") is None:
            raise invalid(f"{field}.weeklySchedule", "is required for a weekly policy: "
                                                     "daysOfTheWeek (its run days), "
                                                     "retentionDuration in Weeks")
    elif given.get("dailySchedule") is None:
        raise invalid(f"{field}.dailySchedule", "is required for a daily policy: "
                                                "retentionDuration of 7 to 9999 Days")


def _retention_times(value: object, field: str, schedule: _Schedule) -> list[str]:
    if value is None:
        return [schedule.stamp]
    if not isinstance(value, list) or len(value) != 1:
        raise invalid(field, "give exactly one retention time, the schedule's run time "
                             f"({schedule.time:%H:%M})")
    at = parse_run_time(value[0], field)
    if at != schedule.time:
        raise invalid(field, f"{_show(value[0])} is at {at:%H:%M} but the schedule runs at "
                             f"{schedule.time:%H:%M}; retention times must equal the run time")
    return [str(value[0])]


def _duration(value: object, field: str, unit: str, low: int, high: int) -> dict[str, Any]:
    field = f"{field}.retentionDuration"
    if value is None:
        raise invalid(field, f"is required: {{\"count\": {low}..{high}, \"durationType\": "
                             f"\"{unit}\"}}")
    given = _fields(value, field, _DURATION_KEYS)
    duration_type = _enum(given.get("durationType"), f"{field}.durationType", (unit,),
                          "the duration type of this schedule", required=True)
    count = _integer(given.get("count"), f"{field}.count", low, high, f" {unit.lower()}")
    return {"count": count, "durationType": duration_type}


def _daily_retention(value: object, field: str, schedule: _Schedule) -> dict[str, Any]:
    given = _fields(value, field, _DAILY_KEYS)
    return {
        "retentionTimes": _retention_times(given.get("retentionTimes"),
                                           f"{field}.retentionTimes", schedule),
        "retentionDuration": _duration(given.get("retentionDuration"), field, "Days", 7, 9999),
    }


def _weekly_retention(value: object, field: str, schedule: _Schedule) -> dict[str, Any]:
    given = _fields(value, field, _WEEKLY_KEYS)
    days = _days(given.get("daysOfTheWeek"), f"{field}.daysOfTheWeek")
    if schedule.weekly and set(days) != set(schedule.days):
        raise invalid(f"{field}.daysOfTheWeek",
                      f"{', '.join(days)} differs from the run days; a weekly policy keeps every "
                      f"point it takes: list exactly scheduleRunDays ({', '.join(schedule.days)})")
    return {
        "daysOfTheWeek": days,
        "retentionTimes": _retention_times(given.get("retentionTimes"),
                                           f"{field}.retentionTimes", schedule),
        "retentionDuration": _duration(given.get("retentionDuration"), field, "Weeks", 1, 5163),
    }


def _monthly_retention(value: object, field: str, schedule: _Schedule) -> dict[str, Any]:
    given = _fields(value, field, _MONTHLY_KEYS)
    return {
        **_day_rule(given, field, schedule),
        "retentionTimes": _retention_times(given.get("retentionTimes"),
                                           f"{field}.retentionTimes", schedule),
        "retentionDuration": _duration(given.get("retentionDuration"), field, "Months", 1,
                                       1188),
    }


def _yearly_retention(value: object, field: str, schedule: _Schedule) -> dict[str, Any]:
    given = _fields(value, field, _YEARLY_KEYS)
    return {
        "monthsOfYear": _names(given.get("monthsOfYear"), f"{field}.monthsOfYear", MONTHS,
                               "month", "January..December"),
        **_day_rule(given, field, schedule),
        "retentionTimes": _retention_times(given.get("retentionTimes"),
                                           f"{field}.retentionTimes", schedule),
        "retentionDuration": _duration(given.get("retentionDuration"), field, "Years", 1, 99),
    }


def _day_rule(given: dict[str, Any], field: str, schedule: _Schedule) -> dict[str, Any]:
    """The day-of-month rule of a monthly or yearly schedule (Daily or Weekly format)."""
    format_type = _enum(given.get("retentionScheduleFormatType"),
                        f"{field}.retentionScheduleFormatType", ("Daily", "Weekly"),
                        "a retention schedule format", required=True)
    daily, weekly = given.get("retentionScheduleDaily"), given.get("retentionScheduleWeekly")
    if format_type == "Weekly":
        if daily is not None:
            raise invalid(f"{field}.retentionScheduleDaily", "must be null with the Weekly "
                                                             "format; the days are given by "
                                                             "retentionScheduleWeekly")
        return {"retentionScheduleFormatType": "Weekly", "retentionScheduleDaily": None,
                "retentionScheduleWeekly": _week_rule(weekly, field, schedule)}
    if schedule.weekly:
        raise invalid(f"{field}.retentionScheduleFormatType",
                      "the Daily format (days of the month) needs a daily policy; a weekly "
                      "policy uses the Weekly format (e.g. First Sunday)")
    if weekly is not None:
        raise invalid(f"{field}.retentionScheduleWeekly", "must be null with the Daily format; "
                                                          "the days are given by "
                                                          "retentionScheduleDaily")
    return {"retentionScheduleFormatType": "Daily",
            "retentionScheduleDaily": _month_days_rule(daily, field),
            "retentionScheduleWeekly": None}


def _week_rule(value: object, field: str, schedule: _Schedule) -> dict[str, Any]:
    field = f"{field}.retentionScheduleWeekly"
    if value is None:
        raise invalid(field, "is required with the Weekly format: daysOfTheWeek and "
                             "weeksOfTheMonth (First..Fourth, Last)")
    given = _fields(value, field, ("daysOfTheWeek", "weeksOfTheMonth"))
    days = _days(given.get("daysOfTheWeek"), f"{field}.daysOfTheWeek")
    outside = [day for day in days if schedule.weekly and day not in schedule.days]
    if outside:
        raise invalid(f"{field}.daysOfTheWeek",
                      f"{', '.join(outside)} is not a run day: the policy takes no point then; "
                      f"use days among scheduleRunDays ({', '.join(schedule.days)})")
    weeks = _names(given.get("weeksOfTheMonth"), f"{field}.weeksOfTheMonth", WEEKS_OF_MONTH,
                   "week of the month", "First, Second, Third, Fourth or Last")
    return {"daysOfTheWeek": days, "weeksOfTheMonth": weeks}


def _month_days_rule(value: object, field: str) -> dict[str, Any]:
    field = f"{field}.retentionScheduleDaily"
    if value is None:
        raise invalid(field, "is required with the Daily format: daysOfTheMonth, e.g. "
                             "[{\"date\": 1, \"isLast\": false}]")
    given = _fields(value, field, ("daysOfTheMonth",))
    entries = given.get("daysOfTheMonth")
    field = f"{field}.daysOfTheMonth"
    if not isinstance(entries, list) or not entries:
        raise invalid(field, "must be a non-empty list of {\"date\": 1..28, \"isLast\": false} "
                             "or {\"date\": 0, \"isLast\": true}")
    days = [_month_day(entry, f"{field}[{index}]") for index, entry in enumerate(entries)]
    for index, day in enumerate(days):
        if day in days[:index]:
            raise invalid(field, f"{_show(day)} is listed twice; list each day once")
    return {"daysOfTheMonth": days}


def _month_day(value: object, field: str) -> dict[str, Any]:
    given = _fields(value, field, ("date", "isLast"))
    is_last = given.get("isLast", False)
    if not isinstance(is_last, bool):
        raise invalid(f"{field}.isLast", f"{_show(is_last)} is not true or false")
    if is_last:
        _integer(given.get("date", 0), f"{field}.date", 0, 0,
                 " (with isLast true the date is 0)")
        return {"date": 0, "isLast": True}
    date = _integer(given.get("date"), f"{field}.date", 1, 28,
                    " (for the last day of the month use {\"date\": 0, \"isLast\": true})")
    return {"date": date, "isLast": False}


# --- summary helpers -----------------------------------------------------------------------


def _count(schedule: dict[str, Any]) -> str:
    duration = schedule.get("retentionDuration") or {}
    unit = {"Days": "d", "Weeks": "w", "Months": "m", "Years": "y"}
    return f"{duration.get('count')} {unit.get(duration.get('durationType', ''), '?')}"


def _daily_text(schedule: dict[str, Any] | None) -> str:
    return f"daily {_count(schedule)}" if schedule else ""


def _weekly_text(schedule: dict[str, Any] | None) -> str:
    if not schedule:
        return ""
    return f"weekly {_count(schedule)} on {', '.join(schedule.get('daysOfTheWeek') or [])}"


def _day_rule_text(schedule: dict[str, Any]) -> str:
    if schedule.get("retentionScheduleFormatType") == "Daily":
        entries = (schedule.get("retentionScheduleDaily") or {}).get("daysOfTheMonth") or []
        dates = ["last" if e.get("isLast") else str(e.get("date")) for e in entries]
        return f"day {', '.join(dates)}"
    rule = schedule.get("retentionScheduleWeekly") or {}
    return (f"{', '.join(rule.get('weeksOfTheMonth') or [])} "
            f"{', '.join(rule.get('daysOfTheWeek') or [])}")


def _monthly_text(schedule: dict[str, Any] | None) -> str:
    if not schedule:
        return ""
    return f"monthly {_count(schedule)} on {_day_rule_text(schedule)}"


def _yearly_text(schedule: dict[str, Any] | None) -> str:
    if not schedule:
        return ""
    months = ", ".join(schedule.get("monthsOfYear") or [])
    return f"yearly {_count(schedule)} in {months} on {_day_rule_text(schedule)}"
