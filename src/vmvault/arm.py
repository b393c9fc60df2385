"""Azure Resource Manager shapes: resource ids, names, times, the way Azure writes them."""

from __future__ import annotations

import datetime as dt
import re

from vmvault.config import SUBSCRIPTION_ID
from vmvault.errors import invalid

_RULES: dict[str, tuple[str, str]] = {
    "resource group": (r"^[-\w._()]{1,90}(?<!\.)$",
                       "1-90 letters, digits, '-', '_', '.', '(', ')'; not ending in '.'"),
    "storage account": (r"^[a-z0-9]{3,24}$", "3-24 lowercase letters and digits"),
    "virtual machine": (r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}[A-Za-z0-9]$|^[A-Za-z0-9]$",
                        "1-64 letters, digits, '-' and '.', starting and ending with a letter "
                        "or digit"),
    "vault": (r"^[A-Za-z][A-Za-z0-9-]{1,49}$",
              "2-50 letters, digits and '-', starting with a letter"),
    "policy": (r"^[A-Za-z][A-Za-z0-9_-]{0,149}$", "1-150 letters, digits, '-' and '_', starting "
               "with a letter"),
    "extension": (r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                  "1-64 letters, digits, '.', '-' and '_', starting with a letter or digit"),
    "location": (r"^[a-z0-9]{2,40}$", "a region name such as 'eastus' or 'westeurope'"),
}


def check_name(kind: str, name: str) -> str:
    pattern, rule = _RULES[kind]
    if not isinstance(name, str) or not re.match(pattern, name):
        raise invalid(f"{kind} name", f"'{name}' is not valid: use {rule}")
    return name


def normalize_location(location: str) -> str:
    """'East US' -> 'eastus', as Azure does."""
    return check_name("location", location.replace(" ", "").lower())


def group_id(group: str) -> str:
    return f"/subscriptions/{SUBSCRIPTION_ID}/resourceGroups/{group}"


def resource_id(group: str, provider: str, *parts: str) -> str:
    return f"{group_id(group)}/providers/{provider}/" + "/".join(parts)


def iso(value: dt.datetime | None) -> str | None:
    """A catalog time (naive UTC) as Azure writes it: 2026-11-23T11:15:00.123456Z."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return value.isoformat(timespec="microseconds") + "Z"


def duration(start: dt.datetime, end: dt.datetime | None) -> str:
    """Azure's job duration, 'H:MM:SS.ffffff'."""
    from vmvault.catalog import utcnow

    delta = max((end or utcnow()) - start, dt.timedelta(0))
    return str(delta)


def parse_date(value: str, field: str) -> dt.datetime:
    """A date as az takes it (dd-mm-yyyy) or ISO 8601; returned as naive UTC."""
    for fmt in ("%d-%m-%Y", "%Y-%m-%d"):
        try:
            return dt.datetime.strptime(value, fmt)
        except ValueError:
            pass
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise invalid(field, f"'{value}' is not a date; use dd-mm-yyyy (UTC) or ISO 8601") from exc
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
    return parsed
