"""Backup policies: validation (Azure's rules for V1 AzureIaasVM policies), the schedule's
slots across time zones and DST, and the retention (expiry and tags) of scheduled points.

Pure unit and property tests: no server, no catalog.
"""

from __future__ import annotations

import calendar
import copy
import datetime as dt
from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmvault.control import policies, retention, schedule
from vmvault.errors import VmvaultError

P = "properties"
SP = "properties.schedulePolicy"
RP = "properties.retentionPolicy"
H = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)
DELETE = object()

SAMPLE_ZONES = ("Pacific Standard Time", "W. Europe Standard Time", "AUS Eastern Standard Time",
                "Korea Standard Time", "UTC", "India Standard Time")
NO_DST = {"UTC", "Korea Standard Time", "India Standard Time"}


# --- policies used by the tests ------------------------------------------------------------


def stamp(hour: int, minute: int) -> str:
    return f"2026-01-01T{hour:02d}:{minute:02d}:00Z"


def daily_policy(zone: str = "UTC", hour: int = 20, minute: int = 30) -> dict[str, Any]:
    props = policies.default_policy_properties(dt.datetime(2026, 1, 1))
    props["timeZone"] = zone
    props["schedulePolicy"]["scheduleRunTimes"] = [stamp(hour, minute)]
    props["retentionPolicy"]["dailySchedule"]["retentionTimes"] = [stamp(hour, minute)]
    return props


def weekly_policy(zone: str = "W. Europe Standard Time", hour: int = 2, minute: int = 30,
                  days: tuple[str, ...] = ("Sunday", "Wednesday")) -> dict[str, Any]:
    """A weekly policy with weekly, monthly (first of days[0]) and yearly (January)
    retention."""
    at = [stamp(hour, minute)]
    return {
        "backupManagementType": "AzureIaasVM",
        "policyType": "V1",
        "instantRpRetentionRangeInDays": 5,
        "schedulePolicy": {
            "schedulePolicyType": "SimpleSchedulePolicy",
            "scheduleRunFrequency": "Weekly",
            "scheduleRunDays": list(days),
            "scheduleRunTimes": at,
            "scheduleWeeklyFrequency": 0,
        },
        "retentionPolicy": {
            "retentionPolicyType": "LongTermRetentionPolicy",
            "dailySchedule": None,
            "weeklySchedule": {"daysOfTheWeek": list(days), "retentionTimes": at,
                               "retentionDuration": {"count": 12, "durationType": "Weeks"}},
            "monthlySchedule": {
                "retentionScheduleFormatType": "Weekly",
                "retentionScheduleDaily": None,
                "retentionScheduleWeekly": {"daysOfTheWeek": [days[0]],
                                            "weeksOfTheMonth": ["First"]},
                "retentionTimes": at,
                "retentionDuration": {"count": 60, "durationType": "Months"},
            },
            "yearlySchedule": {
                "retentionScheduleFormatType": "Weekly",
                "monthsOfYear": ["January"],
                "retentionScheduleDaily": None,
                "retentionScheduleWeekly": {"daysOfTheWeek": [days[0]],
                                            "weeksOfTheMonth": ["First"]},
                "retentionTimes": at,
                "retentionDuration": {"count": 10, "durationType": "Years"},
            },
        },
        "timeZone": zone,
    }


def full_daily_policy(zone: str = "UTC") -> dict[str, Any]:
    """Daily 30 d, weekly Sunday 12 w, monthly First Sunday 60 m, yearly January First
    Sunday 10 y."""
    props = daily_policy(zone)
    weekly = weekly_policy(zone, 20, 30, ("Sunday",))["retentionPolicy"]
    props["retentionPolicy"].update(weeklySchedule=weekly["weeklySchedule"],
                                    monthlySchedule=weekly["monthlySchedule"],
                                    yearlySchedule=weekly["yearlySchedule"])
    return props


def month_days_rule(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"retentionScheduleFormatType": "Daily",
            "retentionScheduleDaily": {"daysOfTheMonth": list(entries)},
            "retentionScheduleWeekly": None}


def changed(props: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of props with the dotted path set to value (or deleted)."""
    out = copy.deepcopy(props)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return out


def refusal(call: Callable[[], object]) -> VmvaultError:
    with pytest.raises(VmvaultError) as info:
        call()
    assert info.value.code == "InvalidArgumentValue"
    return info.value


# --- validation: accepted policies -------------------------------------------------------


def test_default_policy_is_valid_and_stable() -> None:
    props = policies.default_policy_properties(dt.datetime(2026, 1, 1))
    out = policies.validate(props, "DefaultPolicy")
    assert out == props
    assert policies.validate(out) == out


@pytest.mark.parametrize("props", [weekly_policy(), full_daily_policy("Pacific Standard Time"),
                                   weekly_policy("AUS Eastern Standard Time", 23, 0,
                                                 ("Sunday", "Monday", "Friday"))],
                         ids=["weekly", "daily-full", "weekly-3-days"])
def test_realistic_policies_pass_unchanged(props: dict[str, Any]) -> None:
    assert policies.validate(props) == props


def test_daily_format_monthly_and_yearly_pass() -> None:
    props = daily_policy("Korea Standard Time")
    rule = month_days_rule({"date": 1, "isLast": False}, {"date": 0, "isLast": True})
    props["retentionPolicy"]["monthlySchedule"] = {
        **rule, "retentionTimes": [stamp(20, 30)],
        "retentionDuration": {"count": 1188, "durationType": "Months"}}
    props["retentionPolicy"]["yearlySchedule"] = {
        **rule, "monthsOfYear": ["June", "December"], "retentionTimes": [stamp(20, 30)],
        "retentionDuration": {"count": 99, "durationType": "Years"}}
    assert policies.validate(props)["retentionPolicy"] == props["retentionPolicy"]


def test_normalises_case_defaults_and_read_only_fields() -> None:
    given = {
        "backupManagementType": "azureiaasvm",
        "protectedItemsCount": 3,
        "instantRpDetails": {"azureBackupRgNamePrefix": None},  # az CLI's spelling
        "tieringPolicy": {"ArchivedRP": {"tieringMode": "DoNotTier"}},
        "resourceGuardOperationRequests": None,
        "schedulePolicy": {"schedulePolicyType": "simpleschedulepolicy",
                           "scheduleRunFrequency": "weekly", "hourlySchedule": None,
                           "scheduleRunDays": ["sunday", "WEDNESDAY"],
                           "scheduleRunTimes": ["2026-03-01T02:00:00"]},
        "retentionPolicy": {"retentionPolicyType": "longtermretentionpolicy",
                            "weeklySchedule": {"daysOfTheWeek": ["Wednesday", "Sunday"],
                                               "retentionDuration": {"count": 4,
                                                                     "durationType": "weeks"}}},
        "timeZone": "w. europe standard time",
    }
    out = policies.validate(given)
    assert "protectedItemsCount" not in out and "resourceGuardOperationRequests" not in out
    assert out["backupManagementType"] == "AzureIaasVM"
    assert out["policyType"] == "V1"
    assert out["instantRpRetentionRangeInDays"] == 5  # a weekly policy's fixed value
    assert out["instantRPDetails"] == {"azureBackupRgNamePrefix": None}
    assert out["tieringPolicy"] == given["tieringPolicy"]
    assert out["timeZone"] == "W. Europe Standard Time"
    assert out["schedulePolicy"] == {
        "schedulePolicyType": "SimpleSchedulePolicy", "scheduleRunFrequency": "Weekly",
        "scheduleRunDays": ["Sunday", "Wednesday"], "scheduleRunTimes": ["2026-03-01T02:00:00"],
        "scheduleWeeklyFrequency": 0}
    weekly = out["retentionPolicy"]["weeklySchedule"]
    assert weekly == {"daysOfTheWeek": ["Wednesday", "Sunday"],
                      "retentionTimes": ["2026-03-01T02:00:00"],  # filled from the schedule
                      "retentionDuration": {"count": 4, "durationType": "Weeks"}}
    assert out["retentionPolicy"]["dailySchedule"] is None
    assert policies.validate(out) == out


def test_defaults_for_a_minimal_daily_policy() -> None:
    out = policies.validate({
        "backupManagementType": "AzureIaasVM",
        "schedulePolicy": {"schedulePolicyType": "SimpleSchedulePolicy",
                           "scheduleRunFrequency": "Daily",
                           "scheduleRunTimes": ["2026-01-01T23:00:00+00:00"]},
        "retentionPolicy": {"retentionPolicyType": "LongTermRetentionPolicy",
                            "dailySchedule": {"retentionDuration": {"count": 7,
                                                                    "durationType": "Days"}}},
    })
    assert out["timeZone"] == "UTC"
    assert out["instantRpRetentionRangeInDays"] == 2
    assert out["schedulePolicy"]["scheduleRunDays"] is None
    assert out["schedulePolicy"]["scheduleWeeklyFrequency"] == 0


def test_zone_maps_windows_ids_to_iana() -> None:
    assert policies.zone(daily_policy("Pacific Standard Time")) == ZoneInfo("America/Los_Angeles")
    assert policies.zone(daily_policy("India Standard Time")).utcoffset(
        dt.datetime(2026, 1, 1)) == dt.timedelta(hours=5, minutes=30)
    assert policies.zone({}) == ZoneInfo("Etc/UTC")


def test_summary() -> None:
    assert policies.summary(policies.validate(daily_policy())) == \
        "Daily at 20:30 UTC; daily 30 d; snapshots 2 d"
    assert policies.summary(weekly_policy()) == (
        "Weekly on Sunday, Wednesday at 02:30 W. Europe Standard Time; weekly 12 w on Sunday, "
        "Wednesday, monthly 60 m on First Sunday, yearly 10 y in January on First Sunday; "
        "snapshots 5 d")
    props = daily_policy()
    props["retentionPolicy"]["monthlySchedule"] = {
        **month_days_rule({"date": 1, "isLast": False}, {"date": 0, "isLast": True}),
        "retentionDuration": {"count": 6, "durationType": "Months"}}
    assert "monthly 6 m on day 1, last" in policies.summary(policies.validate(props))


@pytest.mark.parametrize("name", ["abc", "DefaultPolicy", "p-1", "a" * 150])
def test_valid_names(name: str) -> None:
    assert policies.validate_name(name) == name


@pytest.mark.parametrize("name", ["ab", "1abc", "-abc", "a_bc", "a bc", "a" * 151, ""])
def test_invalid_names(name: str) -> None:
    error = refusal(lambda: policies.validate_name(name))
    assert error.fields["field"] == "--name"
    assert "3 to 150 characters, letters, digits and hyphens" in error.fields["reason"]
    assert error.fields["field"] == refusal(lambda: policies.validate(daily_policy(),
                                                                      name)).fields["field"]


# --- validation: one refusal per rule ----------------------------------------------------

DAILY = daily_policy()
WEEKLY = weekly_policy()
FULL = full_daily_policy()
MONTHLY = f"{RP}.monthlySchedule"
YEARLY = f"{RP}.yearlySchedule"
WEEK_RULE = f"{MONTHLY}.retentionScheduleWeekly"
V2 = "enhanced (V2, hourly) policies are not supported by vmvault yet"

# (id, base policy, dotted path to change, new value, field named, phrase of the reason)
REFUSALS: list[tuple[str, dict[str, Any], str, Any, str, str]] = [
    ("not-an-object", DAILY, "schedulePolicy", "Daily", SP, "must be a JSON object"),
    ("unknown-top-key", DAILY, "schedulPolicy", {}, f"{P}.schedulPolicy", "unknown field"),
    ("arm-body", DAILY, "properties", {}, f"{P}.properties", "field of the policy resource"),
    ("unknown-nested-key", DAILY, "retentionPolicy.dailySchedule.retentionDurations", {},
     f"{RP}.dailySchedule.retentionDurations", "unknown field"),
    ("key-twice", DAILY, "timezone", "UTC", f"{P}.timezone", "given twice"),
    ("management-type", DAILY, "backupManagementType", "AzureStorage",
     f"{P}.backupManagementType", "'AzureStorage' is not a backup management type"),
    ("management-type-missing", DAILY, "backupManagementType", DELETE,
     f"{P}.backupManagementType", "is required"),
    ("policy-type-v2", DAILY, "policyType", "V2", f"{P}.policyType", V2),
    ("policy-type-other", DAILY, "policyType", "V3", f"{P}.policyType",
     "'V3' is not a policy type"),
    ("instant-rp-low", DAILY, "instantRpRetentionRangeInDays", 0,
     f"{P}.instantRpRetentionRangeInDays", "from 1 to 5"),
    ("instant-rp-high", DAILY, "instantRpRetentionRangeInDays", 6,
     f"{P}.instantRpRetentionRangeInDays", "out of range"),
    ("instant-rp-string", DAILY, "instantRpRetentionRangeInDays", "2",
     f"{P}.instantRpRetentionRangeInDays", "not an integer"),
    ("instant-rp-bool", DAILY, "instantRpRetentionRangeInDays", True,
     f"{P}.instantRpRetentionRangeInDays", "not an integer"),
    ("instant-rp-weekly", WEEKLY, "instantRpRetentionRangeInDays", 2,
     f"{P}.instantRpRetentionRangeInDays", "weekly policy 5 days"),
    ("instant-rp-details", DAILY, "instantRPDetails", "x", f"{P}.instantRPDetails",
     "must be a JSON object"),
    ("tiering-policy", DAILY, "tieringPolicy", [], f"{P}.tieringPolicy", "must be a JSON object"),
    ("time-zone-iana", DAILY, "timeZone", "Europe/Berlin", f"{P}.timeZone",
     "IANA name; Azure uses Windows time zone ids: use 'W. Europe Standard Time'"),
    ("time-zone-unknown", DAILY, "timeZone", "Mars Standard Time", f"{P}.timeZone",
     "use one such as 'UTC', 'Pacific Standard Time'"),
    ("time-zone-number", DAILY, "timeZone", 1, f"{P}.timeZone", "not a time zone id"),
    ("resource-guard", DAILY, "resourceGuardOperationRequests", ["x"],
     f"{P}.resourceGuardOperationRequests", "not supported"),
    ("snapshot-consistency", DAILY, "snapshotConsistencyType", "OnlyCrashConsistent",
     f"{P}.snapshotConsistencyType", "enhanced (V2)"),
    ("schedule-missing", DAILY, "schedulePolicy", DELETE, SP, "is required"),
    ("schedule-type-v2", DAILY, "schedulePolicy.schedulePolicyType", "SimpleSchedulePolicyV2",
     f"{SP}.schedulePolicyType", V2),
    ("schedule-type-other", DAILY, "schedulePolicy.schedulePolicyType", "LogSchedulePolicy",
     f"{SP}.schedulePolicyType", "not a schedule policy type"),
    ("hourly-schedule", DAILY, "schedulePolicy.hourlySchedule", {"interval": 4},
     f"{SP}.hourlySchedule", V2),
    ("frequency-hourly", DAILY, "schedulePolicy.scheduleRunFrequency", "Hourly",
     f"{SP}.scheduleRunFrequency", V2),
    ("frequency-other", DAILY, "schedulePolicy.scheduleRunFrequency", "Monthly",
     f"{SP}.scheduleRunFrequency", "use 'Daily' or 'Weekly'"),
    ("frequency-missing", DAILY, "schedulePolicy.scheduleRunFrequency", DELETE,
     f"{SP}.scheduleRunFrequency", "is required"),
    ("run-times-two", DAILY, "schedulePolicy.scheduleRunTimes", [stamp(1, 0), stamp(2, 0)],
     f"{SP}.scheduleRunTimes", "exactly one run time"),
    ("run-times-none", DAILY, "schedulePolicy.scheduleRunTimes", DELETE,
     f"{SP}.scheduleRunTimes", "exactly one run time"),
    ("run-time-minutes", DAILY, "schedulePolicy.scheduleRunTimes", [stamp(20, 15)],
     f"{SP}.scheduleRunTimes", "minutes 00 or 30"),
    ("run-time-seconds", DAILY, "schedulePolicy.scheduleRunTimes", ["2026-01-01T20:30:10Z"],
     f"{SP}.scheduleRunTimes", "seconds 00"),
    ("run-time-garbage", DAILY, "schedulePolicy.scheduleRunTimes", ["half past eight"],
     f"{SP}.scheduleRunTimes", "not an ISO 8601 date-time"),
    ("run-time-date-only", DAILY, "schedulePolicy.scheduleRunTimes", ["2026-01-01"],
     f"{SP}.scheduleRunTimes", "no time of day"),
    ("run-time-number", DAILY, "schedulePolicy.scheduleRunTimes", [2030],
     f"{SP}.scheduleRunTimes", "not a date-time string"),
    ("run-days-daily", DAILY, "schedulePolicy.scheduleRunDays", ["Monday"],
     f"{SP}.scheduleRunDays", "must be null or empty for a Daily schedule"),
    ("run-days-empty", WEEKLY, "schedulePolicy.scheduleRunDays", [], f"{SP}.scheduleRunDays",
     "non-empty list of days"),
    ("run-days-funday", WEEKLY, "schedulePolicy.scheduleRunDays", ["Sunday", "Funday"],
     f"{SP}.scheduleRunDays", "'Funday' is not a day; use Sunday..Saturday"),
    ("run-days-twice", WEEKLY, "schedulePolicy.scheduleRunDays", ["Sunday", "sunday"],
     f"{SP}.scheduleRunDays", "'Sunday' is listed twice"),
    ("weekly-frequency-weekly", WEEKLY, "schedulePolicy.scheduleWeeklyFrequency", 2,
     f"{SP}.scheduleWeeklyFrequency", "every few weeks is not supported"),
    ("weekly-frequency-daily", DAILY, "schedulePolicy.scheduleWeeklyFrequency", 1,
     f"{SP}.scheduleWeeklyFrequency", "not allowed for a Daily schedule"),
    ("retention-missing", DAILY, "retentionPolicy", DELETE, RP, "is required"),
    ("retention-type", DAILY, "retentionPolicy.retentionPolicyType", "SimpleRetentionPolicy",
     f"{RP}.retentionPolicyType", "not a retention policy type"),
    ("daily-missing", DAILY, "retentionPolicy.dailySchedule", None, f"{RP}.dailySchedule",
     "is required for a daily policy"),
    ("daily-in-weekly", WEEKLY, "retentionPolicy.dailySchedule", DAILY["retentionPolicy"][
        "dailySchedule"], f"{RP}.dailySchedule", "must be null for a weekly policy"),
    ("weekly-missing", WEEKLY, "retentionPolicy.weeklySchedule", None, f"{RP}.weeklySchedule",
     "is required for a weekly policy"),
    ("daily-count-low", DAILY, "retentionPolicy.dailySchedule.retentionDuration.count", 6,
     f"{RP}.dailySchedule.retentionDuration.count", "from 7 to 9999 days"),
    ("daily-count-high", DAILY, "retentionPolicy.dailySchedule.retentionDuration.count", 10000,
     f"{RP}.dailySchedule.retentionDuration.count", "out of range"),
    ("daily-count-string", DAILY, "retentionPolicy.dailySchedule.retentionDuration.count",
     "30", f"{RP}.dailySchedule.retentionDuration.count", "'30' is not an integer"),
    ("daily-count-bool", DAILY, "retentionPolicy.dailySchedule.retentionDuration.count",
     True, f"{RP}.dailySchedule.retentionDuration.count", "not an integer"),
    ("daily-duration-type", DAILY,
     "retentionPolicy.dailySchedule.retentionDuration.durationType", "Weeks",
     f"{RP}.dailySchedule.retentionDuration.durationType", "use 'Days'"),
    ("duration-missing", DAILY, "retentionPolicy.dailySchedule.retentionDuration", DELETE,
     f"{RP}.dailySchedule.retentionDuration", "is required"),
    ("retention-time-differs", DAILY, "retentionPolicy.dailySchedule.retentionTimes",
     [stamp(21, 0)], f"{RP}.dailySchedule.retentionTimes", "must equal the run time"),
    ("retention-times-two", DAILY, "retentionPolicy.dailySchedule.retentionTimes",
     [stamp(20, 30), stamp(20, 30)], f"{RP}.dailySchedule.retentionTimes",
     "exactly one retention time"),
    ("weekly-days-empty", FULL, "retentionPolicy.weeklySchedule.daysOfTheWeek", [],
     f"{RP}.weeklySchedule.daysOfTheWeek", "non-empty list of days"),
    ("weekly-days-funday", FULL, "retentionPolicy.weeklySchedule.daysOfTheWeek", ["Funday"],
     f"{RP}.weeklySchedule.daysOfTheWeek", "'Funday' is not a day"),
    ("weekly-days-not-run-days", WEEKLY, "retentionPolicy.weeklySchedule.daysOfTheWeek",
     ["Sunday"], f"{RP}.weeklySchedule.daysOfTheWeek", "list exactly scheduleRunDays"),
    ("weekly-count", FULL, "retentionPolicy.weeklySchedule.retentionDuration.count", 5164,
     f"{RP}.weeklySchedule.retentionDuration.count", "from 1 to 5163 weeks"),
    ("weekly-duration-type", FULL,
     "retentionPolicy.weeklySchedule.retentionDuration.durationType", "Days",
     f"{RP}.weeklySchedule.retentionDuration.durationType", "use 'Weeks'"),
    ("monthly-format", FULL, "retentionPolicy.monthlySchedule.retentionScheduleFormatType",
     "Hourly", f"{MONTHLY}.retentionScheduleFormatType", "not a retention schedule format"),
    ("monthly-daily-format-in-weekly", WEEKLY, "retentionPolicy.monthlySchedule",
     {**month_days_rule({"date": 1}), "retentionDuration": {"count": 1,
                                                            "durationType": "Months"}},
     f"{MONTHLY}.retentionScheduleFormatType", "needs a daily policy"),
    ("monthly-weekly-format-with-daily", FULL,
     "retentionPolicy.monthlySchedule.retentionScheduleDaily", {"daysOfTheMonth": []},
     f"{MONTHLY}.retentionScheduleDaily", "must be null with the Weekly format"),
    ("monthly-weekly-rule-missing", FULL,
     "retentionPolicy.monthlySchedule.retentionScheduleWeekly", None, WEEK_RULE,
     "is required with the Weekly format"),
    ("monthly-week-fifth", FULL,
     "retentionPolicy.monthlySchedule.retentionScheduleWeekly.weeksOfTheMonth", ["Fifth"],
     f"{WEEK_RULE}.weeksOfTheMonth", "'Fifth' is not a week of the month"),
    ("monthly-weekday-not-run-day", WEEKLY,
     "retentionPolicy.monthlySchedule.retentionScheduleWeekly.daysOfTheWeek", ["Monday"],
     f"{WEEK_RULE}.daysOfTheWeek", "Monday is not a run day"),
    ("monthly-daily-format-with-weekly", FULL,
     "retentionPolicy.monthlySchedule.retentionScheduleFormatType", "Daily",
     f"{WEEK_RULE}", "must be null with the Daily format"),
    ("monthly-date-29", DAILY, "retentionPolicy.monthlySchedule",
     {**month_days_rule({"date": 29, "isLast": False}),
      "retentionDuration": {"count": 1, "durationType": "Months"}},
     f"{MONTHLY}.retentionScheduleDaily.daysOfTheMonth[0].date", "from 1 to 28"),
    ("monthly-last-with-date", DAILY, "retentionPolicy.monthlySchedule",
     {**month_days_rule({"date": 1}, {"date": 31, "isLast": True}),
      "retentionDuration": {"count": 1, "durationType": "Months"}},
     f"{MONTHLY}.retentionScheduleDaily.daysOfTheMonth[1].date", "with isLast true"),
    ("monthly-is-last-string", DAILY, "retentionPolicy.monthlySchedule",
     {**month_days_rule({"date": 0, "isLast": "yes"}),
      "retentionDuration": {"count": 1, "durationType": "Months"}},
     f"{MONTHLY}.retentionScheduleDaily.daysOfTheMonth[0].isLast", "not true or false"),
    ("monthly-dates-twice", DAILY, "retentionPolicy.monthlySchedule",
     {**month_days_rule({"date": 3}, {"date": 3, "isLast": False}),
      "retentionDuration": {"count": 1, "durationType": "Months"}},
     f"{MONTHLY}.retentionScheduleDaily.daysOfTheMonth", "listed twice"),
    ("monthly-dates-empty", DAILY, "retentionPolicy.monthlySchedule",
     {**month_days_rule(), "retentionDuration": {"count": 1, "durationType": "Months"}},
     f"{MONTHLY}.retentionScheduleDaily.daysOfTheMonth", "non-empty list"),
    ("monthly-count", FULL, "retentionPolicy.monthlySchedule.retentionDuration.count", 1189,
     f"{MONTHLY}.retentionDuration.count", "from 1 to 1188 months"),
    ("yearly-months-smarch", FULL, "retentionPolicy.yearlySchedule.monthsOfYear", ["Smarch"],
     f"{YEARLY}.monthsOfYear", "'Smarch' is not a month; use January..December"),
    ("yearly-months-empty", FULL, "retentionPolicy.yearlySchedule.monthsOfYear", [],
     f"{YEARLY}.monthsOfYear", "non-empty list of months"),
    ("yearly-count", FULL, "retentionPolicy.yearlySchedule.retentionDuration.count", 100,
     f"{YEARLY}.retentionDuration.count", "from 1 to 99 years"),
    ("yearly-duration-type", FULL,
     "retentionPolicy.yearlySchedule.retentionDuration.durationType", "Months",
     f"{YEARLY}.retentionDuration.durationType", "use 'Years'"),
]


@pytest.mark.parametrize(("base", "path", "value", "field", "phrase"),
                         [case[1:] for case in REFUSALS], ids=[case[0] for case in REFUSALS])
def test_refusals_name_the_field(base: dict[str, Any], path: str, value: Any, field: str,
                                 phrase: str) -> None:
    props = changed(base, path, value)
    error = refusal(lambda: policies.validate(props))
    assert error.fields["field"] == field
    assert phrase in error.fields["reason"]
    assert error.message == f"Invalid value for {field}: {error.fields['reason']}"


def test_refusal_ids_are_unique() -> None:
    assert len({case[0] for case in REFUSALS}) == len(REFUSALS)


# --- schedule: explicit cases ------------------------------------------------------------


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute)  # naive = UTC, the project's convention


def local(slot: dt.datetime, zone: str) -> dt.datetime:
    return schedule.utc_to_wall(slot, policies.zone({"timeZone": zone}))


def test_default_policy_slots_and_ids() -> None:
    props = daily_policy()
    assert schedule.run_time(props) == dt.time(20, 30)
    assert schedule.slots_between(props, utc(2026, 11, 23, 20, 30), utc(2026, 11, 25, 20, 30)) \
        == [utc(2026, 11, 24, 20, 30), utc(2026, 11, 25, 20, 30)]
    assert schedule.next_slot(props, utc(2026, 11, 23, 20, 29)) == utc(2026, 11, 23, 20, 30)
    assert schedule.next_slot(props, utc(2026, 11, 23, 20, 30)) == utc(2026, 11, 24, 20, 30)
    assert schedule.slot_id("DefaultPolicy", utc(2026, 11, 23, 20, 30)) == \
        "DefaultPolicy@2026-11-23T20:30:00Z"
    aware = dt.datetime(2026, 11, 23, 12, 30, tzinfo=ZoneInfo("America/Los_Angeles"))
    assert schedule.slot_id("P", aware) == "P@2026-11-23T20:30:00Z"
    assert schedule.slots_between(props, utc(2026, 1, 2), utc(2026, 1, 1)) == []


def test_pacific_spring_forward_fires_after_the_gap() -> None:
    props = daily_policy("Pacific Standard Time", 2, 30)
    slots = schedule.slots_between(props, utc(2026, 3, 7), utc(2026, 3, 10))
    # 02:30 PST, 02:30 does not exist on 8 March (02:00 -> 03:00): 03:30 PDT, then 02:30 PDT.
    assert slots == [utc(2026, 3, 7, 10, 30), utc(2026, 3, 8, 10, 30), utc(2026, 3, 9, 9, 30)]
    assert local(slots[1], "Pacific Standard Time") == dt.datetime(2026, 3, 8, 3, 30)
    assert slots[1] >= utc(2026, 3, 8, 10, 0)  # the end of the gap (03:00 PDT)


def test_pacific_fall_back_fires_once() -> None:
    props = daily_policy("Pacific Standard Time", 1, 30)
    slots = schedule.slots_between(props, utc(2026, 10, 31), utc(2026, 11, 3))
    # 01:30 happens twice on 1 November (08:30 and 09:30 UTC): only the first fires.
    assert slots == [utc(2026, 10, 31, 8, 30), utc(2026, 11, 1, 8, 30), utc(2026, 11, 2, 9, 30)]
    assert utc(2026, 11, 1, 9, 30) not in slots
    assert [b - a for a, b in zip(slots, slots[1:], strict=False)] == [24 * H, 25 * H]


def test_southern_hemisphere_dst() -> None:
    props = daily_policy("AUS Eastern Standard Time", 2, 30)
    # Sydney springs forward on 4 October 2026 (02:00 -> 03:00): 02:30 fires at 03:30 AEDT.
    slots = schedule.slots_between(props, utc(2026, 10, 2), utc(2026, 10, 5))
    assert slots == [utc(2026, 10, 2, 16, 30), utc(2026, 10, 3, 16, 30),
                     utc(2026, 10, 4, 15, 30)]
    assert local(slots[1], "AUS Eastern Standard Time") == dt.datetime(2026, 10, 4, 3, 30)


def test_weekly_policy_runs_on_its_local_days_only() -> None:
    props = weekly_policy("Korea Standard Time", 8, 0, ("Sunday", "Wednesday"))
    slots = schedule.slots_between(props, utc(2026, 1, 1), utc(2026, 1, 29))
    assert len(slots) == 8
    for slot in slots:
        assert policies.day_name(local(slot, "Korea Standard Time").date()) in ("Sunday",
                                                                                "Wednesday")
        # 08:00 in Seoul is 23:00 UTC of the day before: Saturday and Tuesday in UTC.
        assert slot.time() == dt.time(23, 0)
        assert policies.day_name(slot.date()) in ("Saturday", "Tuesday")
    assert schedule.next_slot(props, utc(2026, 1, 4)) == utc(2026, 1, 6, 23, 0)


def test_a_skipped_date_gives_no_duplicate() -> None:
    # Samoa skipped 30 December 2011 (UTC-10 -> UTC+14): its slot is the next day's.
    props = daily_policy("Samoa Standard Time", 20, 30)
    slots = schedule.slots_between(props, utc(2011, 12, 27), utc(2012, 1, 3))
    assert slots == sorted(set(slots))
    dates = [local(s, "Samoa Standard Time").date() for s in slots]
    assert dt.date(2011, 12, 30) not in dates and dt.date(2011, 12, 31) in dates


def test_a_year_of_slots_is_day_by_day() -> None:
    slots = schedule.slots_between(daily_policy("W. Europe Standard Time"), utc(2026, 1, 1),
                                   utc(2027, 1, 1))
    assert len(slots) == 365


# --- schedule: properties ----------------------------------------------------------------

run_hours = st.integers(0, 23)
run_minutes = st.sampled_from([0, 30])
starts = st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2035, 12, 31))
spans = st.timedeltas(min_value=dt.timedelta(0), max_value=dt.timedelta(days=731))


def wall_exists(day: dt.date, at: dt.time, zone: ZoneInfo) -> bool:
    """Whether a wall time occurs on a date (not in a spring-forward gap)."""
    wall = dt.datetime.combine(day, at, tzinfo=zone)
    return wall.astimezone(dt.UTC).astimezone(zone).replace(tzinfo=None) == \
        wall.replace(tzinfo=None)


def fires_as_expected(wall: dt.datetime, at: dt.time, zone: ZoneInfo) -> bool:
    """A slot's local time is the run time, or, in a gap, a time after it that day."""
    if wall.time() == at:
        return True
    return not wall_exists(wall.date(), at, zone) and wall > dt.datetime.combine(wall.date(), at)


@settings(max_examples=150, deadline=None)
@given(zone_id=st.sampled_from(SAMPLE_ZONES), hour=run_hours, minute=run_minutes,
       after=starts, span=spans, split=st.floats(0, 1))
def test_daily_slots_properties(zone_id: str, hour: int, minute: int, after: dt.datetime,
                                span: dt.timedelta, split: float) -> None:
    props = daily_policy(zone_id, hour, minute)
    zone, at = policies.zone(props), dt.time(hour, minute)
    until = after + span
    slots = schedule.slots_between(props, after, until)
    assert all(after < s <= until for s in slots)
    assert all(a < b for a, b in zip(slots, slots[1:], strict=False))
    locals_ = [schedule.utc_to_wall(s, zone) for s in slots]
    assert all(fires_as_expected(wall, at, zone) for wall in locals_)
    assert len({wall.date() for wall in locals_}) == len(slots)  # at most once a local day
    allowed = {24 * H} if zone_id in NO_DST else {23 * H, 24 * H, 25 * H}
    assert {b - a for a, b in zip(slots, slots[1:], strict=False)} <= allowed
    if span >= 25 * H:  # never missed: no stretch of more than a day without a slot
        assert slots and slots[0] - after <= 25 * H and until - slots[-1] < 25 * H
    middle = after + span * split
    assert schedule.slots_between(props, after, middle) + \
        schedule.slots_between(props, middle, until) == slots


@settings(max_examples=100, deadline=None)
@given(zone_id=st.sampled_from(SAMPLE_ZONES), hour=run_hours, minute=run_minutes,
       days=st.sets(st.sampled_from(policies.DAYS), min_size=1), after=starts, span=spans,
       split=st.floats(0, 1))
def test_weekly_slots_properties(zone_id: str, hour: int, minute: int, days: set[str],
                                 after: dt.datetime, span: dt.timedelta, split: float) -> None:
    props = policies.validate(weekly_policy(zone_id, hour, minute, tuple(sorted(days))))
    zone = policies.zone(props)
    until = after + span
    slots = schedule.slots_between(props, after, until)
    assert all(after < s <= until for s in slots)
    assert all(a < b for a, b in zip(slots, slots[1:], strict=False))
    for slot in slots:
        wall = schedule.utc_to_wall(slot, zone)
        assert policies.day_name(wall.date()) in days
        assert fires_as_expected(wall, dt.time(hour, minute), zone)
    assert all(b - a <= 7 * DAY + H for a, b in zip(slots, slots[1:], strict=False))
    if span >= 7 * DAY + H:
        assert slots and slots[0] - after <= 7 * DAY + H
    middle = after + span * split
    assert schedule.slots_between(props, after, middle) + \
        schedule.slots_between(props, middle, until) == slots
    if slots:
        assert schedule.next_slot(props, after) == slots[0]


# --- retention: explicit cases -----------------------------------------------------------


def test_first_sunday_of_a_month_is_kept_monthly() -> None:
    props = policies.validate(full_daily_policy())
    # 1 February 2026 is a Sunday: daily 30 d, weekly 12 w, monthly 60 m.
    expiry, tags = retention.scheduled_expiry(props, utc(2026, 2, 1, 20, 30))
    assert tags == ["Daily", "Weekly", "Monthly"]
    assert expiry == utc(2031, 2, 1, 20, 30)
    # The second Sunday: daily and weekly only.
    expiry, tags = retention.scheduled_expiry(props, utc(2026, 2, 8, 20, 30))
    assert (expiry, tags) == (utc(2026, 5, 3, 20, 30), ["Daily", "Weekly"])
    # A Monday: daily only.
    assert retention.scheduled_expiry(props, utc(2026, 2, 9, 20, 30)) == \
        (utc(2026, 3, 11, 20, 30), ["Daily"])


def test_first_sunday_of_january_is_kept_yearly() -> None:
    props = policies.validate(full_daily_policy())
    expiry, tags = retention.scheduled_expiry(props, utc(2026, 1, 4, 20, 30))
    assert tags == ["Daily", "Weekly", "Monthly", "Yearly"]
    assert expiry == utc(2036, 1, 4, 20, 30)
    assert retention.describe(tags, expiry) == "Daily, Weekly, Monthly, Yearly until 2036-01-04"


def test_is_last_day_of_february() -> None:
    props = daily_policy()
    rule = month_days_rule({"date": 0, "isLast": True})
    props["retentionPolicy"]["monthlySchedule"] = {
        **rule, "retentionDuration": {"count": 12, "durationType": "Months"}}
    props["retentionPolicy"]["yearlySchedule"] = {
        **rule, "monthsOfYear": ["February"],
        "retentionDuration": {"count": 1, "durationType": "Years"}}
    props = policies.validate(props)
    # 2026 is not a leap year: 28 February is the last day.
    assert retention.scheduled_expiry(props, utc(2026, 2, 28, 20, 30)) == \
        (utc(2027, 2, 28, 20, 30), ["Daily", "Monthly", "Yearly"])
    assert retention.scheduled_expiry(props, utc(2028, 2, 28, 20, 30))[1] == ["Daily"]
    # 29 February 2028 + 1 year is 28 February 2029.
    assert retention.scheduled_expiry(props, utc(2028, 2, 29, 20, 30)) == \
        (utc(2029, 2, 28, 20, 30), ["Daily", "Monthly", "Yearly"])
    # 31 January + 12 months, a month-end that the rule also keeps.
    assert retention.scheduled_expiry(props, utc(2026, 1, 31, 20, 30)) == \
        (utc(2027, 1, 31, 20, 30), ["Daily", "Monthly"])


def test_month_clamping() -> None:
    assert retention.add_months(dt.datetime(2026, 1, 31, 3), 1) == dt.datetime(2026, 2, 28, 3)
    assert retention.add_months(dt.datetime(2026, 12, 15), 1) == dt.datetime(2027, 1, 15)
    assert retention.add_months(dt.datetime(2028, 2, 29), 12) == dt.datetime(2029, 2, 28)


def test_weekly_tag_only_on_listed_days() -> None:
    props = policies.validate(full_daily_policy())  # weekly on Sunday only
    for day in range(1, 8):  # 1..7 June 2026, Monday..Sunday
        tags = retention.scheduled_expiry(props, utc(2026, 6, day, 20, 30))[1]
        assert ("Weekly" in tags) == (day == 7)


def test_local_date_decides_the_rules() -> None:
    props = policies.validate(full_daily_policy("Korea Standard Time"))
    # 31 January 23:30 UTC is Sunday 1 February 08:30 in Seoul: the first Sunday.
    expiry, tags = retention.scheduled_expiry(props, utc(2026, 1, 31, 23, 30))
    assert tags == ["Daily", "Weekly", "Monthly"]
    assert expiry == utc(2031, 1, 31, 23, 30)


def test_weekly_policy_points() -> None:
    props = policies.validate(weekly_policy())  # Sunday and Wednesday, 02:30 Berlin
    for slot in schedule.slots_between(props, utc(2026, 1, 1), utc(2026, 3, 1)):
        expiry, tags = retention.scheduled_expiry(props, slot)
        assert tags[0] == "Weekly" and "Daily" not in tags
        wall = schedule.utc_to_wall(slot, policies.zone(props))
        first_sunday = policies.day_name(wall.date()) == "Sunday" and wall.day <= 7
        assert ("Monthly" in tags) == first_sunday
        assert ("Yearly" in tags) == (first_sunday and wall.month == 1)
        assert expiry >= slot + 12 * 7 * DAY - H


def test_describe_without_tags() -> None:
    assert retention.describe([], utc(2026, 1, 1)) == "kept by no retention schedule"
    props = policies.validate(weekly_policy())
    assert retention.scheduled_expiry(props, utc(2026, 1, 5, 1, 30)) == \
        (utc(2026, 1, 5, 1, 30), [])  # a Monday: no schedule of this policy keeps it


# --- retention: properties ---------------------------------------------------------------


@st.composite
def retention_policies(draw: st.DrawFn) -> dict[str, Any]:
    props = daily_policy(draw(st.sampled_from(SAMPLE_ZONES)), draw(run_hours),
                         draw(run_minutes))
    rp = props["retentionPolicy"]
    rp["dailySchedule"]["retentionDuration"]["count"] = draw(st.integers(7, 9999))
    if draw(st.booleans()):
        rp["weeklySchedule"] = {
            "daysOfTheWeek": sorted(draw(st.sets(st.sampled_from(policies.DAYS), min_size=1))),
            "retentionDuration": {"count": draw(st.integers(1, 5163)), "durationType": "Weeks"}}
    if draw(st.booleans()):
        rp["monthlySchedule"] = {**draw(day_rules()), "retentionDuration": {
            "count": draw(st.integers(1, 1188)), "durationType": "Months"}}
    if draw(st.booleans()):
        months = sorted(draw(st.sets(st.sampled_from(policies.MONTHS), min_size=1)))
        rp["yearlySchedule"] = {**draw(day_rules()), "monthsOfYear": months,
                                "retentionDuration": {"count": draw(st.integers(1, 99)),
                                                      "durationType": "Years"}}
    return policies.validate(props)


@st.composite
def day_rules(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):
        dates = draw(st.sets(st.integers(0, 28), min_size=1))
        return month_days_rule(*({"date": d, "isLast": d == 0} for d in sorted(dates)))
    return {"retentionScheduleFormatType": "Weekly", "retentionScheduleDaily": None,
            "retentionScheduleWeekly": {
                "daysOfTheWeek": sorted(draw(st.sets(st.sampled_from(policies.DAYS),
                                                     min_size=1))),
                "weeksOfTheMonth": sorted(draw(st.sets(st.sampled_from(policies.WEEKS_OF_MONTH),
                                                       min_size=1)))}}


def oracle_day_rule(rule: dict[str, Any], day: dt.date) -> bool:
    """The month-day rule, written independently of retention.py."""
    month_length = calendar.monthrange(day.year, day.month)[1]
    if rule["retentionScheduleFormatType"] == "Daily":
        entries = rule["retentionScheduleDaily"]["daysOfTheMonth"]
        return any(e["date"] == day.day or (e["isLast"] and day.day == month_length)
                   for e in entries)
    weekly = rule["retentionScheduleWeekly"]
    if day.strftime("%A") not in weekly["daysOfTheWeek"]:
        return False
    occurrence = ("First", "Second", "Third", "Fourth", "Fifth")[(day.day - 1) // 7]
    is_last = day.day + 7 > month_length
    return occurrence in weekly["weeksOfTheMonth"] or (is_last and
                                                       "Last" in weekly["weeksOfTheMonth"])


@settings(max_examples=300, deadline=None)
@given(props=retention_policies(), taken=starts)
def test_retention_properties(props: dict[str, Any], taken: dt.datetime) -> None:
    rp = props["retentionPolicy"]
    expiry, tags = retention.scheduled_expiry(props, taken)
    wall = schedule.utc_to_wall(taken, policies.zone(props))
    expected = ["Daily"]
    if rp["weeklySchedule"] and wall.strftime("%A") in rp["weeklySchedule"]["daysOfTheWeek"]:
        expected.append("Weekly")
    if rp["monthlySchedule"] and oracle_day_rule(rp["monthlySchedule"], wall.date()):
        expected.append("Monthly")
    yearly = rp["yearlySchedule"]
    if yearly and wall.strftime("%B") in yearly["monthsOfYear"] and \
            oracle_day_rule(yearly, wall.date()):
        expected.append("Yearly")
    assert tags == expected
    slack = dt.timedelta(0) if props["timeZone"] in NO_DST else H  # a DST change in between
    minimum = {"Daily": rp["dailySchedule"]["retentionDuration"]["count"] * DAY}
    if "Weekly" in tags:
        minimum["Weekly"] = rp["weeklySchedule"]["retentionDuration"]["count"] * 7 * DAY
    if "Monthly" in tags:
        minimum["Monthly"] = rp["monthlySchedule"]["retentionDuration"]["count"] * 28 * DAY
    if "Yearly" in tags:
        minimum["Yearly"] = yearly["retentionDuration"]["count"] * 365 * DAY
    for kept in minimum.values():
        assert expiry >= taken + kept - slack
    assert retention.describe(tags, expiry).startswith(", ".join(tags) + " until ")
