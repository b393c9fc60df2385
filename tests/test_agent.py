"""vmvault-agent against a small fake server (docs/agent-protocol.md, sections 1 to 4).

The fake server is a real FastAPI app on 127.0.0.1 in a thread: registration, the long-polled
goal state, packages and status reports, checking every signature with verify_request. It
also acts as the agent's HTTP proxy (it accepts absolute-form request targets) so that a test
can see the agent's calls go through the proxy. The handler is a test package: a zip with
HandlerManifest.json, a shell script and a Python recorder that logs every invocation (its
environment, cwd and process group) and writes status/<N>.status.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from conftest import needs_root
from vmvault import __version__
from vmvault.guest import handlers
from vmvault.guest.certificates import CertificateError, thumbprint, verify_request

VM_ID = "vm-0001"
TOKEN = "registration-token-1"
PUBLISHER, TYPE = "Test.Publisher", "TestExt"
FULL = f"{PUBLISHER}.{TYPE}"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z (INFO|WARNING|ERROR) \S+ \S")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], Any], what: str, timeout: float = 10.0,
               root: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    log = (root / "var/log/waagent.log").read_text()[-3000:] if root else ""
    raise AssertionError(f"timed out waiting for {what}\n--- waagent.log ---\n{log}")


# --- the fake server ------------------------------------------------------------------------


class FakeServer:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.certs: dict[str, str] = {}
        self.registrations: list[dict[str, Any]] = []
        self.incarnation = 1
        self.goal_body: Any = {"incarnation": 1, "vmId": VM_ID, "extensions": []}
        self.packages: dict[str, bytes] = {}
        self.statuses: list[dict[str, Any]] = []
        self.verified = 0
        self.auth_failures: list[str] = []
        self.proxied = 0
        self.closing = False
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    # what the tests change

    def set_goal_state(self, extensions: list[Any] | None = None, raw: str | None = None) -> int:
        with self.lock:
            self.incarnation += 1
            self.goal_body = raw if raw is not None else {
                "incarnation": self.incarnation, "vmId": VM_ID, "minimumAgentVersion": "0.1.0",
                "extensions": extensions or []}
            return self.incarnation

    def handler_reports(self, name: str = FULL) -> list[dict[str, Any]]:
        with self.lock:
            return [h for s in self.statuses for h in s["handlers"] if h["name"] == name]

    def last_report(self, name: str = FULL) -> dict[str, Any] | None:
        with self.lock:
            for status in reversed(self.statuses):
                for h in status["handlers"]:
                    if h["name"] == name:
                        return dict(h)
        return None

    # the app

    def app(self) -> Any:
        app = FastAPI()

        @app.post("/vmvault/agent/register")
        async def register(request: Request) -> Response:
            body = json.loads(await request.body())
            if body.get("registrationToken") != TOKEN:
                return _fail("bad token")
            with self.lock:
                self.certs[body["vmId"]] = body["certificate"]
                self.registrations.append(body)
            return JSONResponse({"thumbprint": thumbprint(body["certificate"]),
                                 "minimumAgentVersion": "0.1.0", "heartbeatSeconds": 1,
                                 "pollSeconds": 2})

        @app.get("/vmvault/agent/goalstate")
        async def goal_state(request: Request, incarnation: int, wait: int) -> Response:
            if (denied := await self.verify(request)) is not None:
                return denied
            deadline = time.monotonic() + min(wait, 30)
            while (self.incarnation == incarnation and time.monotonic() < deadline
                   and not self.closing):
                await asyncio.sleep(0.05)
            with self.lock:
                body = self.goal_body
            if isinstance(body, str):
                return Response(body, media_type="application/json")
            return JSONResponse(body)

        @app.get("/vmvault/agent/packages/{name}/{version}")
        async def package(request: Request, name: str, version: str) -> Response:
            if (denied := await self.verify(request)) is not None:
                return denied
            data = self.packages.get(f"{name}/{version}")
            if data is None:
                return JSONResponse({"error": {"code": "NotFound", "message": "no"}}, 404)
            return Response(data, media_type="application/zip")

        @app.post("/vmvault/agent/status")
        async def status(request: Request) -> Response:
            if (denied := await self.verify(request)) is not None:
                return denied
            with self.lock:
                self.statuses.append(json.loads(await request.body()))
            return JSONResponse({})

        return self.absolute_form(app)

    def absolute_form(self, app: Any) -> Any:
        """Serve absolute-form targets (what an HTTP proxy gets) as the path they name."""

        async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"].startswith("http://"):
                path = urlsplit(scope["path"]).path
                scope = dict(scope, path=path, raw_path=path.encode())
                with self.lock:
                    self.proxied += 1
            await app(scope, receive, send)

        return wrapped

    async def verify(self, request: Request) -> Response | None:
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        cert = self.certs.get(headers.get("x-vmvault-vm-id", ""))
        try:
            if cert is None:
                raise CertificateError("the VM is not registered")
            verify_request(cert, headers, request.method, target, body)
        except CertificateError as exc:
            with self.lock:
                self.auth_failures.append(f"{request.method} {target}: {exc}")
            return _fail(str(exc))
        with self.lock:
            self.verified += 1
        return None

    # the thread

    def start(self) -> FakeServer:
        config = uvicorn.Config(self.app(), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.closing = False
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server is not None and self.server.started, "the fake server")
        return self

    def stop(self) -> None:
        self.closing = True
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(5)


def _fail(message: str) -> Response:
    return JSONResponse({"error": {"code": "AgentAuthenticationFailed", "message": message}},
                        401)


@pytest.fixture
def server() -> Iterator[FakeServer]:
    srv = FakeServer().start()
    yield srv
    srv.stop()


# --- the test handler package ---------------------------------------------------------------

RECORDER = '''\
import json, os, sys
LOG, VERSION, op = {log!r}, {version!r}, sys.argv[1]
keys = ("ConfigSequenceNumber", "VMVAULT_GUEST_ROOT", "VMVAULT_MOUNT_ROOT", "VMVAULT_PYTHON",
        "http_proxy", "https_proxy")
rec = {{"op": op, "version": VERSION, "cwd": os.getcwd(), "pgid": os.getpgid(0),
       "sid": os.getsid(0), "env": {{k: os.environ.get(k) for k in keys}}}}
with open(LOG, "a") as f:
    f.write(json.dumps(rec) + "\\n")
if op == "enable":
    env = json.load(open("HandlerEnvironment.json"))[0]["handlerEnvironment"]
    seq = os.environ["ConfigSequenceNumber"]
    status = "transitioning" if {hang!r} else "success"
    doc = [{{"version": 1.0, "timestampUTC": "2026-11-23T12:00:00Z", "status": {{
        "name": "TestExt", "operation": "Enable", "status": status, "code": 0,
        "formattedMessage": {{"lang": "en-US", "message": "enabled " + seq}}}}}}]
    with open(os.path.join(env["statusFolder"], seq + ".status"), "w") as f:
        json.dump(doc, f)
'''

SCRIPT = '''\
#!/bin/sh
echo "test handler: $1 (seq $ConfigSequenceNumber)"
echo "to stderr: $1" >&2
"$VMVAULT_PYTHON" record.py "$1" || exit 70
if [ "$1" = enable ]; then
{enable}
fi
exit 0
'''

ENABLE = {"ok": "  :",
          "fail": "  echo 'enable broke' >&2; exit 3",
          "hang": '  sleep 300 & echo $! > "{pids}"\n  sleep 300'}


def make_package(tmp: Path, version: str = "1.0", enable: str = "ok",
                 timeout: int | None = None) -> bytes:
    manifest: dict[str, Any] = {
        "installCommand": "./handle.sh install", "uninstallCommand": "./handle.sh uninstall",
        "updateCommand": "./handle.sh update", "enableCommand": "./handle.sh enable",
        "disableCommand": "./handle.sh disable", "rebootAfterInstall": False,
        "reportHeartbeat": False}
    if timeout is not None:
        manifest["enableTimeoutInSeconds"] = timeout
    pids = tmp / "child.pid"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("HandlerManifest.json", json.dumps(
            [{"name": TYPE, "version": version, "handlerManifest": manifest}]))
        zf.writestr("handle.sh", SCRIPT.format(enable=ENABLE[enable].format(pids=pids)))
        zf.writestr("record.py", RECORDER.format(log=str(tmp / "invocations.jsonl"),
                                                 version=version, hang=enable == "hang"))
    return buf.getvalue()


def extension(server: FakeServer, tmp: Path, seq: int, *, version: str = "1.0",
              state: str = "enabled", enable: str = "ok", timeout: int | None = None,
              type_: str = TYPE, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """A goal-state entry, its package published on the server."""
    key = f"{PUBLISHER}.{type_}/{version}"
    server.packages[key] = make_package(tmp, version, enable, timeout)
    return {"name": type_, "publisher": PUBLISHER, "type": type_, "version": version,
            "state": state, "sequenceNumber": seq,
            "packageUri": f"/vmvault/agent/packages/{key}",
            "settings": settings if settings is not None else _settings(seq)}


def _settings(seq: int) -> dict[str, Any]:
    return {"runtimeSettings": [{"handlerSettings": {
        "publicSettings": {"taskId": f"task-{seq}", "commandToExecute": "snapshot"},
        "protectedSettings": "TUlJQ0FB", "protectedSettingsCertThumbprint": "ABC"}}]}


def invocations(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "invocations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def ops(tmp: Path) -> list[tuple[str, str]]:
    return [(r["op"], r["version"]) for r in invocations(tmp)]


# --- the agent process ----------------------------------------------------------------------


def agent_command() -> list[str]:
    script = Path(sys.executable).parent / "vmvault-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vmvault.guest.agent"]


def write_config(root: Path, server_url: str, **extra: Any) -> None:
    cfg = root / "etc/vmvault/agent.json"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(json.dumps({"serverUrl": server_url, "vmId": VM_ID,
                               "registrationToken": TOKEN, "mountRoot": str(root.parent),
                               "pollSeconds": 2, "heartbeatSeconds": 1, **extra}))
    cfg.chmod(0o600)


def start_agent(root: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([*agent_command(), "--root", str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop_agent(proc: subprocess.Popen[str], timeout: float = 8.0) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
        raise AssertionError("the agent did not stop within {timeout}s after SIGTERM") from None
    return proc.returncode, err


@pytest.fixture
def guest(tmp_path: Path) -> Path:
    root = tmp_path / "guest"
    root.mkdir()
    return root


@pytest.fixture
def agents() -> Iterator[list[subprocess.Popen[str]]]:
    """Agents a test starts; killed at the end if the test left them running."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def agent_state(root: Path) -> dict[str, Any]:
    return json.loads((root / "var/lib/waagent/agent-state.json").read_text())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


# --- tests ----------------------------------------------------------------------------------


def test_version_and_bad_configuration(guest: Path) -> None:
    out = subprocess.run([*agent_command(), "--version"], capture_output=True, text=True,
                         check=False)
    assert (out.returncode, out.stdout.strip()) == (0, __version__)
    missing = subprocess.run([*agent_command(), "--root", str(guest)], capture_output=True,
                             text=True, check=False)
    assert missing.returncode == 2 and "agent.json" in missing.stderr
    (guest / "etc/vmvault").mkdir(parents=True)
    (guest / "etc/vmvault/agent.json").write_text("{not json")
    garbage = subprocess.run([*agent_command(), "--root", str(guest)], capture_output=True,
                             text=True, check=False)
    assert garbage.returncode == 2 and "not JSON" in garbage.stderr
    assert "Traceback" not in missing.stderr + garbage.stderr


def test_registers_signs_heartbeats_and_stops(server: FakeServer, guest: Path,
                                              agents: list[subprocess.Popen[str]]) -> None:
    write_config(guest, server.url)
    agents.append(proc := start_agent(guest))
    wait_until(lambda: len(server.statuses) >= 2, "two heartbeats", root=guest)
    lib = guest / "var/lib/waagent"
    thumb = agent_state(guest)["thumbprint"]
    reg = server.registrations[0]
    assert (reg["vmId"], reg["agentName"], reg["agentVersion"]) == (VM_ID, "vmvault-agent",
                                                                   __version__)
    assert thumbprint(server.certs[VM_ID]) == thumb
    assert (lib / f"{thumb}.crt").read_text() == server.certs[VM_ID]
    assert (lib / f"{thumb}.prv").stat().st_mode & 0o777 == 0o600
    assert (guest / "var/run/waagent.pid").read_text().strip() == str(proc.pid)
    assert server.verified >= 3 and server.auth_failures == []
    beat = server.statuses[-1]
    assert (beat["agentName"], beat["agentVersion"], beat["status"]) == (
        "vmvault-agent", __version__, "Ready")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", beat["timestampUTC"])
    for key in ("cpuPercent", "memoryPercent"):
        assert isinstance(beat["load"][key], float) and 0 <= beat["load"][key] <= 100
    assert beat["load"]["memoryPercent"] > 0

    # the server forgets the VM: the next signed request gets 401, the agent registers again
    with server.lock:
        server.certs.clear()
    wait_until(lambda: len(server.registrations) >= 2, "a new registration", root=guest)
    count = len(server.statuses)
    wait_until(lambda: len(server.statuses) > count, "heartbeats after it", root=guest)
    assert server.auth_failures and server.registrations[1]["certificate"] == reg["certificate"]

    code, err = stop_agent(proc)
    assert code == 0, err
    assert not (guest / "var/run/waagent.pid").exists()
    lines = (guest / "var/log/waagent.log").read_text().splitlines()
    assert all(LOG_LINE.match(line) for line in lines), lines
    assert "Received SIGTERM" in lines[-2] and lines[-1].endswith("vmvault-agent stopped")


def test_extension_lifecycle(server: FakeServer, guest: Path, tmp_path: Path,
                             agents: list[subprocess.Popen[str]]) -> None:
    write_config(guest, server.url, httpProxy=server.url)
    agents.append(proc := start_agent(guest))
    server.set_goal_state([extension(server, tmp_path, 1)])
    report = wait_until(lambda: (r := server.last_report()) and r["statusFile"] and r,
                        "the enable status", root=guest)
    hdir = guest / f"var/lib/waagent/{FULL}-1.0"
    logs = guest / f"var/log/azure/{FULL}"
    assert json.loads((hdir / "HandlerEnvironment.json").read_text()) == [
        {"name": FULL, "version": "1.0", "handlerEnvironment": {
            "logFolder": str(logs), "configFolder": str(hdir / "config"),
            "statusFolder": str(hdir / "status"), "heartbeatFile": str(hdir / "heartbeat.log"),
            "eventsFolder": str(hdir / "events")}}]
    assert json.loads((hdir / "config/1.settings").read_text()) == _settings(1)
    assert ops(tmp_path) == [("install", "1.0"), ("enable", "1.0")]
    enable = invocations(tmp_path)[1]
    assert enable["env"] == {"ConfigSequenceNumber": "1", "VMVAULT_GUEST_ROOT": str(guest),
                             "VMVAULT_MOUNT_ROOT": str(guest.parent),
                             "VMVAULT_PYTHON": enable["env"]["VMVAULT_PYTHON"],
                             "http_proxy": server.url, "https_proxy": server.url}
    assert Path(enable["env"]["VMVAULT_PYTHON"]).resolve() == Path(sys.executable).resolve()
    assert enable["cwd"] == str(hdir)
    assert enable["sid"] == enable["pgid"] != os.getpgid(proc.pid)
    output = (logs / "CommandExecution.log").read_text()
    assert "test handler: enable (seq 1)" in output and "to stderr: enable" in output
    assert {k: report[k] for k in ("version", "sequenceNumber", "state", "status", "code",
                                   "message")} == {
        "version": "1.0", "sequenceNumber": 1, "state": "enabled", "status": "success",
        "code": 0, "message": "enabled 1"}
    assert report["statusFile"][0]["status"]["operation"] == "Enable"
    assert server.proxied > 0 and server.auth_failures == []

    # a new sequence number: enable runs again, with the new settings
    server.set_goal_state([extension(server, tmp_path, 2)])
    wait_until(lambda: (r := server.last_report()) and r["sequenceNumber"] == 2
               and r["message"] == "enabled 2", "the second enable", root=guest)
    assert ops(tmp_path)[2:] == [("enable", "1.0")]
    assert json.loads((hdir / "config/2.settings").read_text()) == _settings(2)

    # a restart, then a new incarnation with the same sequence number: not run again
    assert stop_agent(proc)[0] == 0
    agents.append(proc := start_agent(guest))
    incarnation = server.set_goal_state([extension(server, tmp_path, 2)])
    wait_until(lambda: agent_state(guest)["incarnation"] == incarnation, "the incarnation",
               root=guest)
    assert len(ops(tmp_path)) == 3
    assert len(list((guest / "var/lib/waagent").glob("*.crt"))) == 1

    # a new version: old disable, new update, old uninstall, then enable of the new one
    server.set_goal_state([extension(server, tmp_path, 3, version="1.1")])
    wait_until(lambda: (r := server.last_report()) and r["version"] == "1.1"
               and r["message"] == "enabled 3", "the update", root=guest)
    assert ops(tmp_path)[3:] == [("disable", "1.0"), ("update", "1.1"), ("uninstall", "1.0"),
                                 ("enable", "1.1")]
    assert not hdir.exists() and (guest / f"var/lib/waagent/{FULL}-1.1").is_dir()

    # disabled: disable runs once, however many goal states say so
    server.set_goal_state([extension(server, tmp_path, 3, version="1.1", state="disabled")])
    wait_until(lambda: (r := server.last_report()) and r["state"] == "disabled", "disabled",
               root=guest)
    incarnation = server.set_goal_state([extension(server, tmp_path, 3, version="1.1",
                                                   state="disabled")])
    wait_until(lambda: agent_state(guest)["incarnation"] == incarnation, "the incarnation",
               root=guest)
    assert ops(tmp_path)[7:] == [("disable", "1.1")]

    # uninstall: disable and uninstall run, the folder goes, the handler leaves the report
    server.set_goal_state([extension(server, tmp_path, 3, version="1.1", state="uninstall")])
    wait_until(lambda: not (guest / f"var/lib/waagent/{FULL}-1.1").exists(), "the uninstall",
               root=guest)
    assert ops(tmp_path)[8:] == [("disable", "1.1"), ("uninstall", "1.1")]
    count = len(server.statuses)
    wait_until(lambda: len(server.statuses) > count and not server.statuses[-1]["handlers"],
               "a report without the handler", root=guest)
    assert stop_agent(proc)[0] == 0


def test_hung_enable_is_killed_and_sigterm_aborts(server: FakeServer, guest: Path,
                                                  tmp_path: Path,
                                                  agents: list[subprocess.Popen[str]]) -> None:
    write_config(guest, server.url)
    agents.append(proc := start_agent(guest))
    server.set_goal_state([extension(server, tmp_path, 1, enable="hang", timeout=2)])
    report = wait_until(lambda: (r := server.last_report()) and r["code"] == -1 and r,
                        "the timeout", timeout=15, root=guest)
    assert report["status"] == "error" and "timed out after 2s" in report["message"]
    child = int((tmp_path / "child.pid").read_text())
    wait_until(lambda: not alive(child), "the hung command's child to be killed")
    (tmp_path / "child.pid").unlink()

    # SIGTERM while a handler command runs: the command's group is killed, the agent exits 0
    server.set_goal_state([extension(server, tmp_path, 2, version="2.0", enable="hang")])
    wait_until(lambda: (tmp_path / "child.pid").exists(), "the second hung enable", root=guest)
    child = int((tmp_path / "child.pid").read_text())
    started = time.monotonic()
    code, err = stop_agent(proc)
    assert code == 0 and time.monotonic() - started < 5, err
    assert not alive(child) and not (guest / "var/run/waagent.pid").exists()
    record = agent_state(guest)["handlers"][FULL]
    assert record["lastSequenceNumberRun"] != 2  # aborted: a restart runs sequence number 2 again


def test_failures_are_reported_and_survived(server: FakeServer, guest: Path, tmp_path: Path,
                                            agents: list[subprocess.Popen[str]]) -> None:
    write_config(guest, server.url)
    agents.append(proc := start_agent(guest))
    failing = extension(server, tmp_path, 1, type_="Failing", enable="fail")
    broken = extension(server, tmp_path, 1, type_="Broken")
    server.packages[f"{PUBLISHER}.Broken/1.0"] = b"this is not a zip"
    missing = dict(extension(server, tmp_path, 1, type_="Missing"),
                   packageUri="/vmvault/agent/packages/nothing/here")
    evil = dict(extension(server, tmp_path, 1, type_="Evil"), version="../../etc")
    good = extension(server, tmp_path, 1)
    server.set_goal_state([failing, broken, missing, evil, "garbage", good])
    wait_until(lambda: (r := server.last_report()) and r["statusFile"],
               "the good handler's status", root=guest)
    reports = {n: server.last_report(f"{PUBLISHER}.{n}") or {}
               for n in ("Failing", "Broken", "Missing", "Evil", TYPE)}
    assert (reports["Failing"]["code"], reports["Failing"]["status"]) == (3, "error")
    assert "exit code 3" in reports["Failing"]["message"]
    assert "enable broke" in reports["Failing"]["message"]
    for name, words in (("Broken", "not a zip"), ("Missing", "HTTP 404"), ("Evil", "safe name")):
        assert reports[name].get("code") == -2, name
        assert words in reports[name]["message"], reports[name]
    assert reports[TYPE]["status"] == "success"
    assert not (guest / f"var/lib/waagent/{PUBLISHER}.Broken-1.0").exists()

    # a goal state that is not JSON: logged, reported, survived
    server.set_goal_state(raw="{this is not json")
    wait_until(lambda: server.statuses[-1]["message"].startswith("the goal state is not valid"),
               "the garbage goal state's report", root=guest)
    server.set_goal_state([extension(server, tmp_path, 2)])
    wait_until(lambda: (r := server.last_report()) and r["message"] == "enabled 2",
               "the next enable", root=guest)
    assert proc.poll() is None
    assert stop_agent(proc)[0] == 0


def test_waits_for_the_server(guest: Path, agents: list[subprocess.Popen[str]]) -> None:
    server = FakeServer()
    write_config(guest, server.url)
    agents.append(proc := start_agent(guest))
    log = guest / "var/log/waagent.log"
    wait_until(lambda: log.exists() and log.read_text().count("Registration failed") >= 2,
               "registration attempts", root=guest)
    assert proc.poll() is None
    server.start()
    try:
        wait_until(lambda: server.registrations and server.statuses, "registration",
                   timeout=10, root=guest)
        assert len(server.registrations) == 1
        assert stop_agent(proc)[0] == 0
    finally:
        server.stop()


def test_bad_packages_are_refused(tmp_path: Path) -> None:
    ctx = handlers.GuestContext(tmp_path / "guest", tmp_path)
    spec = handlers.parse_extension(extension(FakeServer(), tmp_path, 1))
    for name, data in (("zip slip", {"../outside": "x", "HandlerManifest.json": "[]"}),
                       ("no manifest", {"handle.sh": "exit 0"}),
                       ("bad manifest", {"HandlerManifest.json": '[{"name": "x"}]'})):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for member, text in data.items():
                zf.writestr(member, text)
        with pytest.raises(handlers.HandlerError):
            handlers.install_package(ctx, spec, buf.getvalue())
        assert not (tmp_path / "outside").exists(), name
    assert handlers.installed_versions(ctx, FULL) == []
    for raw in ({}, {"publisher": "a", "type": "b", "version": "1", "state": "on"},
                {"publisher": "a", "type": "b", "version": "1", "sequenceNumber": -1},
                {"publisher": "a", "type": "/b", "version": "1", "packageUri": "/p"}):
        with pytest.raises(handlers.HandlerError):
            handlers.parse_extension(raw)


@needs_root()
def test_handler_commands_see_the_guests_files_at_azures_paths(tmp_path: Path) -> None:
    guest = tmp_path / "guest"
    assert handlers.azure_paths_available(guest)
    (guest / "var/lib/waagent/PROBE.crt").write_text("the guest's certificate\n")
    (guest / "etc/azure/vmbackup.conf").write_text("[SnapshotThread]\n")
    log_file = tmp_path / "CommandExecution.log"
    result = handlers.run_command(
        "cat /var/lib/waagent/PROBE.crt; ls /etc/azure; echo made > /var/log/azure/out.txt",
        cwd=tmp_path, env=dict(os.environ), timeout=30, log_file=log_file, label="probe",
        command="enable", namespace_root=guest)
    assert result.code == 0, log_file.read_text()
    text = log_file.read_text()
    assert "the guest's certificate" in text and "vmbackup.conf" in text
    assert (guest / "var/log/azure/out.txt").read_text() == "made\n"
    # the host's own paths are untouched
    assert not Path("/var/lib/waagent/PROBE.crt").exists()
    assert not Path("/var/log/azure/out.txt").exists()
    # without the namespace, the command sees the host's paths
    result = handlers.run_command("test -e /var/lib/waagent/PROBE.crt", cwd=tmp_path,
                                  env=dict(os.environ), timeout=30, log_file=log_file,
                                  label="probe", command="enable")
    assert result.code != 0
    # a guest whose folders cannot be bound: exit 97, and the log says why
    (guest / "etc/azure/vmbackup.conf").unlink()
    (guest / "etc/azure").rmdir()
    (guest / "etc/azure").write_text("not a folder")
    result = handlers.run_command("true", cwd=tmp_path, env=dict(os.environ), timeout=30,
                                  log_file=log_file, label="probe", command="enable",
                                  namespace_root=guest)
    assert result.code == handlers.CODE_NAMESPACE
    assert "cannot show" in log_file.read_text()
