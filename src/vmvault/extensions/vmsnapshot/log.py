"""The handler's log: kept in memory for the log blob, appended to <logFolder>/extension.log,
and held back while file systems are frozen (a write to a frozen file system would block the
handler with everything frozen), then flushed after the thaw."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

SHELL_LOG_TAIL = 10


class HandlerLog:
    def __init__(self, path: Path | None, prefix: str = "") -> None:
        self.path = path
        self.prefix = prefix
        self.lines: list[str] = []
        self._pending: list[str] = []
        self.frozen = False
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError:
                self.path = None

    def _write(self, level: str, message: str) -> None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        line = f"{stamp} {level} {self.prefix}{message}"
        self.lines.append(line)
        if self.frozen:
            self._pending.append(line)
        else:
            self._append([line])

    def _append(self, lines: list[str]) -> None:
        if self.path is None or not lines:
            return
        try:
            with open(self.path, "a") as f:
                f.write("".join(line + "\n" for line in lines))
        except OSError:
            pass

    def info(self, message: str) -> None:
        self._write("Info", message)

    def warning(self, message: str) -> None:
        self._write("Warning", message)

    def error(self, message: str) -> None:
        self._write("Error", message)

    def freeze_start(self) -> None:
        """From now on hold the lines back (the file systems are about to freeze)."""
        self.info("Logs during Freeze Start")
        self.frozen = True

    def freeze_end(self) -> None:
        """The file systems are thawed: write what was held back."""
        self.frozen = False
        pending, self._pending = self._pending, []
        self._append(pending)
        self.info("Logs during Freeze End")

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines)


def tail(path: Path, count: int = SHELL_LOG_TAIL) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-count:]


def log_blob_text(agent_version: str, distro: str, log: HandlerLog, shell_log: Path) -> str:
    """The log blob's text (wire spec 3.2)."""
    parts = [f"Guest Agent Version is :{agent_version}\n", f"Distro Info:{distro}\n",
             log.text(), "Tail of shell script log:\n"]
    parts += [line + "\n" for line in tail(shell_log)]
    return "".join(parts)
