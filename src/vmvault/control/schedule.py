"""When a policy's scheduled backups run: its slots, in UTC.

A slot is the policy's run time (the time of day of ``scheduleRunTimes[0]``) on a
local date of the policy's time zone: every date for a Daily policy, the
``scheduleRunDays`` weekdays for a Weekly one. Times are naive UTC datetimes, the
project's convention.

Daylight saving time: a run time that does not exist on a date (the spring-forward
gap) fires as the same wall time read with the offset before the gap, i.e. shifted
by the gap (02:30 becomes 03:30 when clocks go from 02:00 to 03:00), always after
the gap's start; a run time that occurs twice (fall back) fires once, at its first
occurrence. Both follow ``zoneinfo`` with ``fold=0``.

The slots are a fixed set of instants that depends only on the policy, so a
scheduler that asks for ``slots_between(last_seen, now)`` after each wake-up (or
restart) runs every slot exactly once.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

from vmvault.control import policies

_ONE_DAY = dt.timedelta(days=1)
_SEARCH_WINDOW = dt.timedelta(days=8)


def run_time(props: dict[str, Any]) -> dt.time:
    """The policy's time of day (in its time zone)."""
    field = "properties.schedulePolicy.scheduleRunTimes"
    times = (props.get("schedulePolicy") or {}).get("scheduleRunTimes") or [None]
    return policies.parse_run_time(times[0], field)


def wall_to_utc(wall: dt.datetime, zone: ZoneInfo) -> dt.datetime:
    """A naive local wall time in ``zone`` as naive UTC (``fold=0``: a time in a gap is
    read with the offset before the gap, an ambiguous time as its first occurrence)."""
    local = wall.replace(tzinfo=zone, fold=0)
    return local.astimezone(dt.UTC).replace(tzinfo=None)


def utc_to_wall(instant: dt.datetime, zone: ZoneInfo) -> dt.datetime:
    """A naive UTC instant as naive local wall time in ``zone``."""
    return instant.replace(tzinfo=dt.UTC).astimezone(zone).replace(tzinfo=None)


def slots_between(props: dict[str, Any], after: dt.datetime,
                  until: dt.datetime) -> list[dt.datetime]:
    """Every slot t with ``after < t <= until`` (naive UTC), increasing, each once.

    Works a day at a time: a year of a daily policy is 365 conversions.
    """
    if until <= after:
        return []
    zone = policies.zone(props)
    at = run_time(props)
    weekdays = _run_weekdays(props)
    found: set[dt.datetime] = set()
    # A local date is within a day of the UTC date (offsets are under 24 h).
    day, last = after.date() - _ONE_DAY, until.date() + _ONE_DAY
    while day <= last:
        if weekdays is None or day.weekday() in weekdays:
            slot = wall_to_utc(dt.datetime.combine(day, at), zone)
            if after < slot <= until:
                found.add(slot)
        day += _ONE_DAY
    return sorted(found)


def next_slot(props: dict[str, Any], after: dt.datetime) -> dt.datetime:
    """The first slot after ``after`` (naive UTC)."""
    start = after
    for _ in range(8):  # a weekly policy has a slot in every 8 days but around a skipped date
        slots = slots_between(props, start, start + _SEARCH_WINDOW)
        if slots:
            return slots[0]
        start += _SEARCH_WINDOW
    raise ValueError("the policy has no schedule slot")  # not reached for a validated policy


def slot_id(policy_name: str, slot: dt.datetime) -> str:
    """A stable id of one slot of one policy, e.g. 'DefaultPolicy@2026-11-23T20:30:00Z'."""
    if slot.tzinfo is not None:
        slot = slot.astimezone(dt.UTC).replace(tzinfo=None)
    return f"{policy_name}@{slot:%Y-%m-%dT%H:%M:%S}Z"


def _run_weekdays(props: dict[str, Any]) -> frozenset[int] | None:
    """The run days as ``date.weekday()`` numbers; None for a daily policy."""
    days = policies.run_days(props)
    if not days:
        return None
    return frozenset((policies.DAYS.index(day) - 1) % 7 for day in days)


def restart_cursor(cursor: dt.datetime | None, now: dt.datetime,
                   late_seconds: float) -> dt.datetime:
    """Where an item's schedule goes on from after its policy changed (or protection resumed):
    slots older than the lateness limit are not caught up (they belonged to another schedule),
    a slot that fell due just now still fires, and a slot already fired never fires again."""
    recent = now - dt.timedelta(seconds=late_seconds)
    return max(cursor, recent) if cursor is not None else recent
