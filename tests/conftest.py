"""Shared fixtures: a real vmvault stack in a temporary VMVAULT_HOME, driven through the CLI
as a subprocess, the way a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
IS_ROOT = os.geteuid() == 0


def needs_root() -> pytest.MarkDecorator:
    """Root-only tests run in CI (root there); only a developer without root skips them."""
    return pytest.mark.skipif(not IS_ROOT and not IN_CI, reason="needs root (CI runs it)")


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Stack:
    home: Path
    env: dict[str, str] = field(default_factory=dict)
    api_url: str = ""

    def run(self, *args: str, ok: bool = True, timeout: float = 300) -> Result:
        if args and args[0] in ("up", "down"):
            self.api_url = ""  # a restarted server may listen on another port
        proc = subprocess.run([sys.executable, "-m", "vmvault.cli.main", *args],
                              capture_output=True, text=True, env=self.env, timeout=timeout,
                              check=False)
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        if ok and proc.returncode != 0:
            raise AssertionError(f"vmvault {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stderr}\n{proc.stdout}")
        return result

    def json(self, *args: str) -> Any:
        return self.run(*args, "-o", "json").json()

    def api(self, path: str) -> Any:
        """GET straight from the REST API (no CLI start: for tight polling)."""
        if not self.api_url:
            self.api_url = self.status()["server"]["url"]
        response = httpx.get(self.api_url + path, timeout=30)
        response.raise_for_status()
        return response.json()

    def status(self) -> dict[str, Any]:
        return dict(self.json("status"))

    def wait(self, group: str, vault: str, job: str) -> dict[str, Any]:
        return dict(self.json("backup", "job", "wait", "-g", group, "-v", vault, "-n", job,
                              "--timeout", "240"))


def make_stack(home: Path, **extra_env: str) -> Stack:
    env = dict(os.environ)
    env.update(VMVAULT_HOME=str(home), VMVAULT_API_PORT="0", VMVAULT_BLOB_PORT="0")
    # A lab guest's CPU is this machine's, which the test run keeps busy: the load limit (row
    # S4) is off unless a test sets it (tests/test_guest_backup.py::test_s4_busy_guest).
    env["VMVAULT_GUEST_LOAD_LIMIT"] = "101"
    # Policies do not fire in test stacks (DefaultPolicy runs at 20:30 UTC, which a test run
    # may cross), except where a test asks for the scheduler (tests/test_scheduler.py).
    env["VMVAULT_SCHEDULE_POLICIES"] = "0"
    env.update(extra_env)
    env.pop("VMVAULT_API_URL", None)
    stack = Stack(home, env)
    stack.run("up")
    return stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = make_stack(tmp_path_factory.mktemp("vmvault-home"))
    yield s
    s.run("down", ok=False)


@pytest.fixture
def names() -> dict[str, str]:
    """Fresh resource names for one test (storage account names are global)."""
    tag = uuid.uuid4().hex[:8]
    return {"rg": f"rg-{tag}", "sa": f"sa{tag}", "vm": f"vm-{tag}", "vault": f"vault-{tag}",
            "restore_sa": f"rs{tag}", "loc": "eastus"}


def make_vm(stack: Stack, n: dict[str, str], data_disks: tuple[str, ...] = ("1",),
            fs: tuple[str, ...] = ()) -> dict[str, Any]:
    stack.run("group", "create", "-n", n["rg"], "-l", n["loc"])
    stack.run("storage", "account", "create", "-g", n["rg"], "-n", n["sa"], "--sku",
              "Standard_LRS")
    args = ["vm", "create", "-g", n["rg"], "-n", n["vm"], "--storage-account", n["sa"],
            "--os-disk-size-gb", "1", "--data-disk-sizes-gb", *data_disks]
    if fs:
        args += ["--data-disk-fs-types", *fs]
    vm = dict(stack.json(*args))
    wait_agent_ready(stack, n)
    return vm


def protect(stack: Stack, n: dict[str, str], *extra: str) -> None:
    stack.run("backup", "vault", "create", "-g", n["rg"], "-n", n["vault"], "-l", n["loc"],
              *extra)
    stack.run("backup", "protection", "enable-for-vm", "-g", n["rg"], "-v", n["vault"], "--vm",
              n["vm"], "--policy-name", "DefaultPolicy")


def item_args(n: dict[str, str]) -> list[str]:
    return ["-g", n["rg"], "-v", n["vault"], "-c", n["vm"], "-i", n["vm"]]


def backup(stack: Stack, n: dict[str, str]) -> dict[str, Any]:
    job = stack.json("backup", "protection", "backup-now", *item_args(n))
    return stack.wait(n["rg"], n["vault"], job["name"])


def vm_path(n: dict[str, str], *parts: str) -> str:
    return (f"/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/{n['rg']}"
            f"/providers/Microsoft.Compute/virtualMachines/{n['vm']}"
            + "".join(f"/{p}" for p in parts))


def wait_agent_ready(stack: Stack, n: dict[str, str], timeout: float = 60) -> dict[str, Any]:
    """Poll the VM's instance view until its agent has registered and reports Ready."""
    import time

    deadline = time.monotonic() + timeout
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = stack.api(vm_path(n, "instanceView"))["vmAgent"]
        if view["statuses"][0]["displayStatus"] == "Ready" and view.get("thumbprint"):
            return view
        time.sleep(0.2)
    raise AssertionError(f"the agent of {n['vm']} did not become Ready: {view}")
