"""How long a scheduled recovery point is kept: Azure's long-term retention rules.

A point taken at slot time T is read in the policy's time zone (its local date,
weekday and month). Every retention schedule that applies to it keeps it, and it
expires at the latest of their ends:

- dailySchedule: every scheduled point, ``count`` days;
- weeklySchedule: local weekday in ``daysOfTheWeek``, ``count`` weeks;
- monthlySchedule: the month-day rule (Daily format: a listed date, or the month's
  last day for ``isLast``; Weekly format: a listed weekday in a listed week of the
  month, First = days 1-7 .. Fourth = 22-28, Last = the month's last 7 days),
  ``count`` calendar months;
- yearlySchedule: a month of ``monthsOfYear`` and the month-day rule, ``count``
  calendar years.

A duration is added to the local wall time (calendar months clamp the day to the
month's length: Jan 31 + 1 month = Feb 28/29), then read back to UTC.
"""

from __future__ import annotations

import calendar
import datetime as dt
from typing import Any

from vmvault.control import policies
from vmvault.control.schedule import utc_to_wall, wall_to_utc

TAGS = ("Daily", "Weekly", "Monthly", "Yearly")


def scheduled_expiry(props: dict[str, Any],
                     taken: dt.datetime) -> tuple[dt.datetime, list[str]]:
    """(naive UTC expiry, the tags of the schedules that keep it) of a scheduled point
    taken at ``taken`` (naive UTC). No schedule applying gives ``(taken, [])``."""
    zone = policies.zone(props)
    local = utc_to_wall(taken, zone)
    kept = _kept_until(props.get("retentionPolicy") or {}, local)
    if not kept:
        return taken, []
    expiry = max(wall_to_utc(until, zone) for until in kept.values())
    return expiry, [tag for tag in TAGS if tag in kept]


def describe(tags: list[str], expiry: dt.datetime) -> str:
    """For display: 'Daily, Weekly until 2027-01-04'."""
    if not tags:
        return "kept by no retention schedule"
    return f"{', '.join(tags)} until {expiry:%Y-%m-%d}"


def add_months(wall: dt.datetime, months: int) -> dt.datetime:
    """Calendar months later, the day clamped to the target month's length."""
    index = wall.year * 12 + wall.month - 1 + months
    year, month = divmod(index, 12)
    day = min(wall.day, calendar.monthrange(year, month + 1)[1])
    return wall.replace(year=year, month=month + 1, day=day)


def weeks_of_month(day: dt.date) -> set[str]:
    """The weeksOfTheMonth names a date belongs to (e.g. the 24th of a 30-day month is in
    the Fourth week and in the Last)."""
    weeks = set()
    if day.day <= 28:
        weeks.add(policies.WEEKS_OF_MONTH[(day.day - 1) // 7])
    if day.day > calendar.monthrange(day.year, day.month)[1] - 7:
        weeks.add("Last")
    return weeks


def matches_day_rule(schedule: dict[str, Any], day: dt.date) -> bool:
    """Whether a date meets a monthly or yearly schedule's month-day rule."""
    if schedule.get("retentionScheduleFormatType") == "Daily":
        entries = (schedule.get("retentionScheduleDaily") or {}).get("daysOfTheMonth") or []
        return any(_matches_month_day(entry, day) for entry in entries)
    rule = schedule.get("retentionScheduleWeekly") or {}
    return (policies.day_name(day) in (rule.get("daysOfTheWeek") or [])
            and bool(weeks_of_month(day) & set(rule.get("weeksOfTheMonth") or [])))


def _matches_month_day(entry: dict[str, Any], day: dt.date) -> bool:
    if entry.get("isLast"):
        return day.day == calendar.monthrange(day.year, day.month)[1]
    return bool(entry.get("date") == day.day)


def _count(schedule: dict[str, Any]) -> int:
    return int((schedule.get("retentionDuration") or {}).get("count", 0))


def _kept_until(retention: dict[str, Any], local: dt.datetime) -> dict[str, dt.datetime]:
    """Tag -> local wall time until which that schedule keeps a point taken at ``local``."""
    kept: dict[str, dt.datetime] = {}
    daily = retention.get("dailySchedule")
    if daily:
        kept["Daily"] = local + dt.timedelta(days=_count(daily))
    weekly = retention.get("weeklySchedule")
    if weekly and policies.day_name(local.date()) in (weekly.get("daysOfTheWeek") or []):
        kept["Weekly"] = local + dt.timedelta(weeks=_count(weekly))
    monthly = retention.get("monthlySchedule")
    if monthly and matches_day_rule(monthly, local.date()):
        kept["Monthly"] = add_months(local, _count(monthly))
    yearly = retention.get("yearlySchedule")
    if (yearly and policies.MONTHS[local.month - 1] in (yearly.get("monthsOfYear") or [])
            and matches_day_rule(yearly, local.date())):
        kept["Yearly"] = add_months(local, 12 * _count(yearly))
    return kept
