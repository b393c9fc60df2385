"""Azurite, the Azure Storage emulator, as the reference for vmvault's Blob endpoint.

`make setup` installs the version pinned in package.json into ./node_modules (npm ci).
:func:`require_azurite` skips a test when it is missing, except in CI (CI=true), where it
fails: there the differential tests must run. :func:`running_azurite` starts the blob
service on a free port of 127.0.0.1 with a fresh workspace and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NODE_MODULES = REPO / "node_modules"
AZURITE_BLOB = NODE_MODULES / ".bin" / "azurite-blob"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Azurite's well-known development account (documented, public, the same everywhere).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def pinned_version() -> str:
    """The azurite version package.json pins (exact)."""
    manifest = json.loads((REPO / "package.json").read_text())
    return str(manifest["devDependencies"]["azurite"])


def installed_version() -> str | None:
    try:
        manifest = json.loads((NODE_MODULES / "azurite" / "package.json").read_text())
    except (OSError, ValueError):
        return None
    return str(manifest.get("version"))


def require_azurite() -> Path:
    """The azurite-blob launcher. Missing (or not the pinned version): skipped for a
    developer, with how to get it; a failure in CI, where these tests must run."""
    pinned, installed = pinned_version(), installed_version()
    problem = None
    if shutil.which("node") is None:
        problem = "Node.js (`node`) is not on PATH; Azurite needs it"
    elif installed is None or not AZURITE_BLOB.exists():
        problem = f"Azurite {pinned} is not installed in ./node_modules"
    elif installed != pinned:
        problem = f"./node_modules has Azurite {installed}, package.json pins {pinned}"
    if problem is None:
        return AZURITE_BLOB
    message = f"{problem}: `make setup` installs it (npm ci from package.json)"
    if IN_CI:
        pytest.fail(f"{message}; CI must run the Azurite differential tests", pytrace=False)
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Azurite:
    url: str  # http://127.0.0.1:PORT
    version: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def account_url(self) -> str:
        return f"{self.url}/{ACCOUNT}"

    @property
    def credential(self) -> dict[str, str]:
        return {"account_name": ACCOUNT, "account_key": KEY}


def _start(launcher: Path, workspace: Path) -> Azurite:
    port = _free_port()
    log = workspace / "azurite.log"
    data = workspace / "data"
    data.mkdir(exist_ok=True)
    args = [str(launcher), "--blobHost", "127.0.0.1", "--blobPort", str(port),
            "--location", str(data), "--silent", "--skipApiVersionCheck", "--loose",
            "--disableTelemetry"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while not _listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"Azurite did not start on port {port} "
                               f"(exit {proc.returncode}):\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    return Azurite(f"http://127.0.0.1:{port}", installed_version() or "?", proc, log)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def running_azurite(workspace: Path) -> Iterator[Azurite]:
    """Azurite's blob service on 127.0.0.1, its data in ``workspace``; stopped on exit."""
    launcher = require_azurite()
    try:
        server = _start(launcher, workspace)
    except RuntimeError:  # the free port was taken in between: once more
        server = _start(launcher, workspace)
    try:
        yield server
    finally:
        _stop(server.process)
