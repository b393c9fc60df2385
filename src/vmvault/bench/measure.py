"""Running a measured subprocess: wall time and peak RSS.

Peak RSS is read from /proc while the command runs (every 20 ms): the larger of
the highest ``VmHWM`` (the kernel's high-water mark of one process's resident
set, so spikes between samples are not missed) of any process of the
command's tree, and the highest sum of ``VmRSS`` over the tree (for tools that
run several processes at once).

CPU time (user + system) comes from ``wait4``. Its ``ru_maxrss`` (like
``getrusage(RUSAGE_CHILDREN)``'s) is not used for memory:
Python starts children with vfork, and the kernel carries the parent's
high-water mark into the child's ``ru_maxrss`` across exec, so a 10 MiB tool
started from a 200 MiB harness would report 200 MiB; and ``RUSAGE_CHILDREN``
keeps the maximum over every child ever waited for.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunResult:
    argv: list[str]
    returncode: int
    seconds: float
    peak_rss: int  # bytes
    stdout: str
    stderr: str
    cpu_seconds: float = 0.0  # user + system time of the command and its waited-for children

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def check(self) -> RunResult:
        if self.returncode != 0:
            tail = (self.stderr or self.stdout).strip().splitlines()[-15:]
            raise RuntimeError(
                f"{' '.join(self.argv[:4])}... exited {self.returncode}:\n" + "\n".join(tail)
            )
        return self

    def then(self, other: RunResult) -> RunResult:
        """This command followed by `other`, as one measurement: times and CPU add up, the
        peak RSS is the larger one, the exit status is the first failure's."""
        return RunResult(
            argv=[*self.argv, "&&", *other.argv],
            returncode=self.returncode or other.returncode,
            seconds=self.seconds + other.seconds,
            peak_rss=max(self.peak_rss, other.peak_rss),
            stdout=self.stdout + other.stdout,
            stderr=self.stderr + other.stderr,
            cpu_seconds=self.cpu_seconds + other.cpu_seconds,
        )


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return out


def _status_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of a process in bytes, or None when it is gone or has no memory."""
    rss = hwm = -1
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    if rss < 0 or hwm < 0:
        return None
    return rss, hwm


def tree_memory(pid: int) -> tuple[int, dict[int, int]]:
    """Sum of VmRSS over ``pid`` and its descendants, and each one's VmHWM, in bytes."""
    total = 0
    hwm: dict[int, int] = {}
    stack = [pid]
    while stack:
        p = stack.pop()
        if p in hwm:
            continue
        got = _status_kib(p)
        if got is None:
            continue
        total += got[0]
        hwm[p] = got[1]
        stack.extend(_children(p))
    return total, hwm


class _Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            total, hwm = tree_memory(self.pid)
            self.peak = max(self.peak, total, *hwm.values())
            self.done.wait(self.interval)


def run_measured(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> RunResult:
    """Run ``argv`` to completion; stdout/stderr go to temporary files (no pipe stalls)."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(argv), stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=full_env, cwd=cwd
        )
        sampler = _Sampler(proc.pid)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            sampler.done.set()
        seconds = time.perf_counter() - start
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    return RunResult(
        argv=list(argv),
        returncode=proc.returncode,
        seconds=seconds,
        peak_rss=sampler.peak,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        stdout=stdout,
        stderr=stderr,
    )


def drop_caches() -> str | None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; returns why it failed, or None."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None


def tree_size(path: Path) -> int:
    """Apparent size (sum of st_size) of every regular file under ``path``."""
    total = 0
    if path.is_file():
        return path.stat().st_size
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            total += st.st_size
    return total
