"""The service clock: the "now" of the scheduler, jobs, recovery points and retention.

It is the system's UTC time, unless the server was started with
``VMVAULT_SIMULATED_CLOCK=1``: then it is the system's time plus an offset kept in
``$VMVAULT_HOME/clock.json`` (``{"offsetSeconds": N}``), which ``vmvault clock set``
moves. Time keeps flowing at its normal pace; only the offset jumps. That is how a
developer (or a test) sees a policy fire at 20:30 in Seoul, a recovery point expire
after 30 days or a yearly point be kept, without waiting for it. The offset lives in a
file so that it survives a server restart.

Things that measure real durations (agent heartbeats, SAS lifetimes, timeouts) keep
using the system's clock (:func:`real_utcnow`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from pathlib import Path

ENV = "VMVAULT_SIMULATED_CLOCK"
FILE_NAME = "clock.json"

_lock = threading.Lock()
_cache: dict[str, tuple[float, float]] = {}  # path -> (mtime, offset seconds)


def real_utcnow() -> dt.datetime:
    """The system's time, UTC, naive (the catalog's convention)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def simulated() -> bool:
    return os.environ.get(ENV, "").lower() in ("1", "true", "yes")


def clock_file() -> Path:
    from vmvault.config import home

    return home() / FILE_NAME


def offset_seconds() -> float:
    """The simulated clock's lead over the system's (0 when the clock is not simulated)."""
    if not simulated():
        return 0.0
    path = clock_file()
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0.0
    key = str(path)
    with _lock:
        cached = _cache.get(key)
        if cached and cached[0] == mtime:
            return cached[1]
    try:
        offset = float(json.loads(path.read_text())["offsetSeconds"])
    except (OSError, ValueError, KeyError, TypeError):
        offset = 0.0
    with _lock:
        _cache[key] = (mtime, offset)
    return offset


def utcnow() -> dt.datetime:
    """The service's now: UTC, naive."""
    offset = offset_seconds()
    now = real_utcnow()
    return now + dt.timedelta(seconds=offset) if offset else now


def set_offset(seconds: float) -> None:
    """Write the offset atomically (the server and the CLI share the file)."""
    path = clock_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"offsetSeconds": seconds}) + "\n")
    os.replace(tmp, path)
