"""The local stack: 'vmvault up', 'vmvault down', 'vmvault status'.

'up' prepares the disk pool (an XFS reflink file system in a loop-mounted image
when root on another file system), then starts the Blob endpoint and the server
(REST API and job workers) in the background on 127.0.0.1, and records their
ports and pids in $VMVAULT_HOME/stack.json. It is idempotent: a stack that runs
and answers is left as it is.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from vmvault.config import DEFAULT_API_PORT, DEFAULT_BLOB_PORT, Paths, StackInfo, paths
from vmvault.errors import INTERNAL_ERROR, VmvaultError
from vmvault.storage.pool import ensure_pool, release_pool

START_TIMEOUT = 60.0


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is not alive: reap it
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass
    try:  # nor is a zombie that init has not reaped yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code < 500
    except httpx.HTTPError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _choose_port(env: str, default: int) -> int:
    wanted = int(os.environ.get(env, default))
    return wanted if wanted == 0 or _port_free(wanted) else _free_port()


def _spawn(args: list[str], log: Path) -> int:
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=os.environ)
    return proc.pid


def running(p: Paths | None = None) -> StackInfo | None:
    p = p or paths()
    info = StackInfo.load(p.stack_file)
    if info and _alive(info.server_pid) and _alive(info.blob_pid) and _answers(
            info.api_url + "/vmvault/status"):
        return info
    return None


def up() -> dict[str, Any]:
    p = paths().ensure()
    info = running(p)
    if info:
        return {**status(), "changed": False}
    down(quiet=True)  # whatever is left of a stack that died
    pool = ensure_pool(p)
    api_port = _choose_port("VMVAULT_API_PORT", DEFAULT_API_PORT) or _free_port()
    blob_port = _choose_port("VMVAULT_BLOB_PORT", DEFAULT_BLOB_PORT) or _free_port()
    blob_url = f"http://127.0.0.1:{blob_port}"
    api_url = f"http://127.0.0.1:{api_port}"
    blob_pid = _spawn(["-m", "vmvault.storage.blob_endpoint", "--root", str(pool.path),
                       "--host", "127.0.0.1", "--port", str(blob_port)], p.logs / "blob.log")
    server_pid = _spawn(["-m", "vmvault.server", "--port", str(api_port), "--blob-url", blob_url],
                        p.logs / "server.log")
    info = StackInfo(api_url=api_url, blob_url=blob_url, server_pid=server_pid,
                     blob_pid=blob_pid, pool={"path": str(pool.path), "fsType": pool.fs_type,
                                              "reflink": pool.reflink, "warning": pool.warning})
    info.save(p.stack_file)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not (_alive(server_pid) and _alive(blob_pid)):
            break
        if _answers(api_url + "/vmvault/status") and _answers(blob_url + "/"):
            return {**status(), "changed": True}
        time.sleep(0.2)
    log_tail = (p.logs / "server.log").read_text(errors="replace").strip().splitlines()[-5:]
    down(quiet=True)
    raise VmvaultError(INTERNAL_ERROR, reason="the stack did not start; server log ends with: "
                       + " | ".join(log_tail))


def _stop(pid: int, timeout: float = 20.0) -> None:
    if not _alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)


def down(quiet: bool = False) -> dict[str, Any]:
    p = paths()
    info = StackInfo.load(p.stack_file)
    stopped = []
    if info:
        for name, pid in (("server", info.server_pid), ("blob endpoint", info.blob_pid)):
            if _alive(pid):
                _stop(pid)
                stopped.append(name)
    if p.db.exists():
        _detach_vms(p)
    release_pool(p)
    p.stack_file.unlink(missing_ok=True)
    return {"stopped": stopped, "running": False}


def _detach_vms(p: Paths) -> None:
    """Unmount lab VMs' disks that a killed server left mounted."""
    from vmvault.catalog import Catalog, database_url
    from vmvault.context import Context
    from vmvault.fabric import vms
    from vmvault.storage.diskstore import DiskStore
    from vmvault.storage.pool import PoolInfo

    pool = PoolInfo(path=p.pool, fs_type="", reflink=False, image=None, warning=None)
    ctx = Context(p, Catalog(database_url(p.db)), DiskStore(p.pool), pool, "")
    vms.detach_all(ctx)


def status() -> dict[str, Any]:
    p = paths()
    info = StackInfo.load(p.stack_file)
    if info is None:
        return {"running": False, "home": str(p.root),
                "hint": "start the local stack with 'vmvault up'"}
    server_ok = _alive(info.server_pid) and _answers(info.api_url + "/vmvault/status")
    blob_ok = _alive(info.blob_pid) and _answers(info.blob_url + "/")
    return {
        "running": server_ok and blob_ok,
        "home": str(p.root),
        "server": {"url": info.api_url, "pid": info.server_pid, "ok": server_ok,
                   "workers": "job workers run in the server process",
                   "log": str(p.logs / "server.log")},
        "blobEndpoint": {"url": info.blob_url, "pid": info.blob_pid, "ok": blob_ok,
                         "log": str(p.logs / "blob.log")},
        "pool": info.pool,
        "catalog": str(p.db),
    }
