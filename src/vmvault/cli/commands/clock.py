"""vmvault clock: the service clock (a simulated one, for developing against schedules)."""

from __future__ import annotations

import re
from typing import Any

from knack.arguments import ArgumentsContext
from knack.commands import CommandGroup
from knack.help_files import helps

from vmvault.cli.client import call
from vmvault.errors import invalid

helps["clock"] = """
type: group
short-summary: Show or move the service clock that policies, jobs and retention follow.
long-summary: |
    The clock is the system's, unless the stack was started with VMVAULT_SIMULATED_CLOCK=1:
    then 'clock set' moves it (time keeps flowing from there), so a policy's 20:30 slot, a
    30-day expiry or a yearly point can be seen at once. The offset survives restarts;
    'clock reset' returns to the system's time.
"""
helps["clock set"] = """
type: command
short-summary: Move the simulated clock to a time, or forward by a duration.
examples:
  - name: Jump to a minute before a policy's slot.
    text: vmvault clock set --time 2026-12-01T20:29:00Z
  - name: Move forward by a day and a half.
    text: vmvault clock set --advance 1d12h
"""

_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> float:
    """'1d12h', '90m', '30s', '-2h' -> seconds."""
    match = re.fullmatch(r"(-?)((?:\d+(?:\.\d+)?[dhms])+)", text.strip())
    if not match:
        raise invalid("--advance", f"'{text}' is not a duration; write e.g. 1d, 12h, 90m, 1d12h")
    seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([dhms])",
                                                                match.group(2)))
    return -seconds if match.group(1) else seconds


def show() -> Any:
    """Show the service clock."""
    return call("GET", "/vmvault/clock")


def set_clock(time: str | None = None, advance: str | None = None) -> Any:
    """Move the simulated clock."""
    if bool(time) == bool(advance):
        raise invalid("--time/--advance", "give exactly one of them")
    body = {"now": time} if time else {"advanceSeconds": parse_duration(advance or "")}
    return call("PUT", "/vmvault/clock", body)


def reset() -> Any:
    """Return to the system's time."""
    return call("PUT", "/vmvault/clock", {"reset": True})


def load_commands(loader: Any) -> None:
    with CommandGroup(loader, "clock", "vmvault.cli.commands.clock#{}") as g:
        g.command("show", "show")
        g.command("set", "set_clock")
        g.command("reset", "reset")


def load_arguments(loader: Any) -> None:
    with ArgumentsContext(loader, "clock") as ac:
        ac.argument("time", help="The new time, UTC (ISO 8601 or dd-mm-yyyy).")
        ac.argument("advance", help="Move forward (or back, with '-') by a duration: 1d, 12h, "
                    "90m, 1d12h.")
