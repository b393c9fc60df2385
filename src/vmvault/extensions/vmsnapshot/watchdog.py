"""The freeze watchdog: a separate process that thaws the frozen file systems when the
handler cannot (vmvault's answer to wire spec section 5, where a SIGKILL of Azure's freezer
leaves the file systems frozen).

The handler starts it (``python -m vmvault.extensions.vmsnapshot.watchdog --bound S``) in a
new session, so that killing the handler's process group does not reach it, and talks to it
over its stdin, one JSON object a line:

* ``{"op": "arm", "path": P}``: sent just before the handler freezes P;
* ``{"op": "skip", "path": P}``: the freeze of P failed (e.g. EBUSY: another tool froze it),
  the watchdog must not thaw it;
* ``{"op": "expedited", "path": P}``: the handler turned the RCU switch P on for the freeze
  window (rcu.py); a thaw of the watchdog's own turns it off again;
* ``{"op": "thawed"}``: the handler thawed everything; the watchdog exits.

It thaws every armed mount, most recently armed first, when its stdin reaches EOF (the
handler closed it or died: thaw at once), when ``--bound`` seconds have passed since the
first ``arm``, or on SIGTERM, SIGINT or SIGHUP. A mount that is not frozen any more (EINVAL)
is fine. (A handler killed between a failed FIFREEZE and its ``skip`` leaves an armed mount
that another tool froze: the watchdog would thaw it; that window is a few microseconds, and
thawing too much is the safer mistake.) It reports on its stdout (``{"event": "ready"}``,
then ``{"event": "thawed", "reason": ..., "mounts": [...], "errors": [...]}``) and, after a
thaw of its own, appends a line to ``--log`` (the file system is thawed by then). It writes
nothing while a file system is frozen and imports only the standard library (and rcu.py,
which does too).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from vmvault.extensions.vmsnapshot.rcu import restore_switch

FITHAW = 0xC0045878
READY_TIMEOUT = 15.0


class _Signalled(Exception):
    pass


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Signalled(signal.Signals(signum).name)


class _State:
    def __init__(self, bound: float) -> None:
        self.bound = bound
        self.armed: dict[str, int | None] = {}
        self.deadline: float | None = None
        self.expedited: str | None = None
        self.buffer = b""

    def handle(self, line: bytes) -> bool:
        """Apply one command; True when the handler reported that it thawed."""
        try:
            msg = json.loads(line)
            op, path = msg.get("op"), msg.get("path")
        except (ValueError, AttributeError):
            return False
        if op == "arm" and isinstance(path, str):
            self.armed.pop(path, None)
            self.armed[path] = _open_dir(path)
            if self.deadline is None:
                self.deadline = time.monotonic() + self.bound
        elif op == "expedited" and isinstance(path, str):
            self.expedited = path
        elif op == "skip" and isinstance(path, str):
            _close(self.armed.pop(path, None))
        elif op == "thawed":
            for fd in self.armed.values():
                _close(fd)
            self.armed.clear()
            return True
        return False

    def thaw_all(self) -> tuple[list[str], list[str]]:
        thawed, errors = [], []
        for path, fd in reversed(list(self.armed.items())):
            problem = thaw_path(path, fd)
            if problem:
                errors.append(problem)
            else:
                thawed.append(path)
        self.armed.clear()
        if self.expedited is not None:
            restore_switch(Path(self.expedited))
            self.expedited = None
        return thawed, errors


def _open_dir(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None  # opened again at thaw time


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def thaw_path(path: str, fd: int | None = None) -> str | None:
    """FITHAW on path (through fd when given); None on success or when it was not frozen."""
    try:
        if fd is None:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.ioctl(fd, FITHAW, 0)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            return f"{path}: {errno.errorcode.get(exc.errno or 0, exc.errno)} {exc.strerror}"
    finally:
        _close(fd)
    return None


def _emit(event: dict[str, Any]) -> None:
    try:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, OSError, ValueError):
        pass  # the handler is gone


def _log(path: str | None, text: str) -> None:
    if not path:
        return
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    try:
        with open(path, "a") as f:
            f.write(f"{stamp} Warning watchdog[{os.getpid()}]: {text}\n")
    except OSError:
        pass


def serve(state: _State, stdin_fd: int) -> str | None:
    """Read commands until the handler thawed (None) or a thaw is due (the reason)."""
    while True:
        timeout = None if state.deadline is None else max(0.0, state.deadline -
                                                          time.monotonic())
        ready, _, _ = select.select([stdin_fd], [], [], timeout)
        if not ready:
            return "timeout"
        data = os.read(stdin_fd, 65536)
        lines = (state.buffer + data).split(b"\n")
        state.buffer = lines.pop()
        for line in lines:
            if line.strip() and state.handle(line):
                return None
        if not data:
            return "eof"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmsnapshot-watchdog")
    parser.add_argument("--bound", type=float, required=True,
                        help="seconds a file system may stay frozen")
    parser.add_argument("--log", help="file to append a line to after a thaw of its own")
    args = parser.parse_args(argv)
    state = _State(max(args.bound, 0.1))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    _emit({"event": "ready", "pid": os.getpid()})
    try:
        reason = serve(state, sys.stdin.fileno())
    except _Signalled as exc:
        reason = f"signal {exc}"
    if reason is None:
        return 0
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the thaw whatever comes
    thawed, errors = state.thaw_all()
    _emit({"event": "thawed", "reason": reason, "mounts": thawed, "errors": errors})
    if thawed or errors:
        why = {"eof": "the handler went away", "timeout": f"the {args.bound:g} s freeze bound "
               "elapsed"}.get(reason, reason)
        _log(args.log, f"{why}: thawed {', '.join(thawed) or 'nothing'}"
                       + (f"; errors: {'; '.join(errors)}" if errors else ""))
    return 0


# --- the handler's side ---------------------------------------------------------------------


class WatchdogError(Exception):
    pass


class Watchdog:
    """The handler's end of the watchdog: start it, arm mounts, tell it the thaw is done."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self._buffer = b""

    @classmethod
    def start(cls, bound: float, log_path: Path | None = None,
              python: str | None = None) -> Watchdog:
        cmd = [python or sys.executable, "-m", "vmvault.extensions.vmsnapshot.watchdog",
               "--bound", f"{bound:g}"]
        if log_path is not None:
            cmd += ["--log", str(log_path)]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, start_new_session=True,
                                    close_fds=True, env=env, cwd="/")
        except OSError as exc:
            raise WatchdogError(f"cannot start the freeze watchdog: {exc}") from exc
        dog = cls(proc)
        dog._wait_ready()
        return dog

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not any(e.get("event") == "ready" for e in self.events):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read_events(remaining):
                self.proc.kill()
                self.proc.wait()
                raise WatchdogError("the freeze watchdog did not start")

    def _read_events(self, timeout: float) -> bool:
        """Read what the watchdog wrote; False at EOF or timeout."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], max(timeout, 0))
        if not ready:
            return False
        data = os.read(fd, 65536)
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                continue
        return bool(data)

    def _send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise WatchdogError(f"the freeze watchdog is gone: {exc}") from exc

    def arm(self, path: str) -> None:
        self._send({"op": "arm", "path": path})

    def skip(self, path: str) -> None:
        self._send({"op": "skip", "path": path})

    def expedited(self, path: Path) -> None:
        self._send({"op": "expedited", "path": str(path)})

    def finish(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Report the thaw, let the watchdog exit; the events it sent (a ``thawed`` event
        means it thawed on its own, e.g. after its bound)."""
        with contextlib.suppress(WatchdogError):
            self._send({"op": "thawed"})
        return self.close(timeout)

    def close(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Close its stdin (EOF: it thaws whatever is still armed) and reap it."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        deadline = time.monotonic() + timeout
        while self._read_events(deadline - time.monotonic()):
            pass
        try:
            self.proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return [e for e in self.events if e.get("event") != "ready"]

    def thawed_on_its_own(self) -> dict[str, Any] | None:
        for event in self.events:
            if event.get("event") == "thawed" and event.get("mounts"):
                return event
        return None


if __name__ == "__main__":
    sys.exit(main())
