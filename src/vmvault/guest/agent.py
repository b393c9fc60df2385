"""vmvault-agent: the VM agent of a guest (docs/agent-protocol.md, sections 1 to 4).

    vmvault-agent --root GUEST_ROOT [--verbose]
    vmvault-agent --version

Reads GUEST_ROOT/etc/vmvault/agent.json, registers the VM's certificate with the server,
then long-polls the goal state and runs the extension handlers it names, while a heartbeat
thread reports the agent's load and the handlers' statuses. Logs to
GUEST_ROOT/var/log/waagent.log; SIGTERM stops it (killing a running handler command).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from vmvault import __version__
from vmvault.guest import handlers
from vmvault.guest.certificates import CertificateError, Identity, make_identity, sign_request
from vmvault.guest.handlers import (
    GuestContext,
    HandlerError,
    HandlerRecord,
    azure_paths_available,
)

AGENT_NAME = "vmvault-agent"
DEFAULT_POLL_SECONDS = 20.0
DEFAULT_HEARTBEAT_SECONDS = 30.0
MAX_WAIT_SECONDS = 30
MAX_BACKOFF_SECONDS = 30.0
REQUEST_TIMEOUT = 15.0
STOP_GRACE_SECONDS = 5.0

log = logging.getLogger("vmvault.agent")


class ConfigError(Exception):
    """agent.json is missing or not usable."""


class ServerError(Exception):
    """The server could not be reached or gave an unexpected answer."""


# --- configuration and state ----------------------------------------------------------------


@dataclass(frozen=True)
class AgentConfig:
    server_url: str
    vm_id: str
    registration_token: str
    mount_root: Path
    poll_seconds: float
    heartbeat_seconds: float
    http_proxy: str | None
    azure_paths: bool = True  # "azurePaths": handlers see the guest's files at Azure's paths

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        try:
            raw = json.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise ConfigError(f"{path} is not JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} is not a JSON object")
        url = _text(raw, "serverUrl", path)
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"serverUrl in {path} is not an http(s) URL: {url!r}")
        proxy = raw.get("httpProxy") or None
        if proxy is not None and not isinstance(proxy, str):
            raise ConfigError(f"httpProxy in {path} is not a string")
        azure_paths = raw.get("azurePaths", True)
        if not isinstance(azure_paths, bool):
            raise ConfigError(f"azurePaths in {path} is not true or false")
        return cls(url.rstrip("/"), _text(raw, "vmId", path), _text(raw, "registrationToken", path),
                   Path(str(raw.get("mountRoot") or "/")),
                   _seconds(raw, "pollSeconds", DEFAULT_POLL_SECONDS, path),
                   _seconds(raw, "heartbeatSeconds", DEFAULT_HEARTBEAT_SECONDS, path), proxy,
                   azure_paths)


def _text(raw: dict[str, Any], key: str, path: Path) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path} has no {key}")
    return value


def _seconds(raw: dict[str, Any], key: str, default: float, path: Path) -> float:
    value = raw.get(key, default)
    if not _positive(value):
        raise ConfigError(f"{key} in {path} is not a positive number: {value!r}")
    return float(value)


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


@dataclass
class AgentState:
    """agent-state.json: the certificate in use, the last incarnation done, the handlers."""

    thumbprint: str | None = None
    incarnation: int | None = None
    handlers: dict[str, HandlerRecord] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> AgentState:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            log.warning("%s cannot be read (%s): starting from an empty state", path, exc)
            return cls()
        if not isinstance(raw, dict):
            return cls()
        records = raw.get("handlers")
        records = records if isinstance(records, dict) else {}
        state = cls(raw.get("thumbprint") if isinstance(raw.get("thumbprint"), str) else None,
                    raw.get("incarnation") if _is_int(raw.get("incarnation")) else None)
        for name, value in records.items():
            record = HandlerRecord.from_json(value)
            if record is not None:
                state.handlers[name] = record
        return state

    def save(self, path: Path) -> None:
        doc = {"thumbprint": self.thumbprint, "incarnation": self.incarnation,
               "handlers": {k: v.to_json() for k, v in self.handlers.items()}}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(path)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- load ------------------------------------------------------------------------------------


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return fields[3] + fields[4], sum(fields)


def memory_percent() -> float:
    info: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) if rest.split() else 0
    total = info.get("MemTotal", 0)
    return round(100.0 * (1 - info.get("MemAvailable", total) / total), 1) if total else 0.0


class LoadMeter:
    """CPU use over the interval since the last sample, and memory use now."""

    def __init__(self) -> None:
        self._last = self._times()
        self.latest = {"cpuPercent": 0.0, "memoryPercent": self._memory()}

    @staticmethod
    def _times() -> tuple[int, int]:
        try:
            return _cpu_times()
        except (OSError, ValueError, IndexError):
            return 0, 0

    @staticmethod
    def _memory() -> float:
        try:
            return memory_percent()
        except (OSError, ValueError, IndexError):
            return 0.0

    def sample(self) -> dict[str, float]:
        idle, total = self._times()
        d_idle, d_total = idle - self._last[0], total - self._last[1]
        self._last = (idle, total)
        cpu = round(100.0 * (1 - d_idle / d_total), 1) if d_total > 0 else 0.0
        self.latest = {"cpuPercent": min(100.0, max(0.0, cpu)), "memoryPercent": self._memory()}
        return self.latest


# --- the server ------------------------------------------------------------------------------


class ServerClient:
    """Registration and signed requests; a 401 makes it register again, once."""

    def __init__(self, config: AgentConfig, identity: Identity) -> None:
        self.config, self.identity = config, identity
        self.http = httpx.Client(proxy=config.http_proxy, trust_env=False,
                                 timeout=REQUEST_TIMEOUT)
        self._register_lock = threading.Lock()
        self.on_registered: Callable[[dict[str, Any]], None] = lambda _answer: None

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.config.server_url + path

    def register(self) -> dict[str, Any]:
        body = json.dumps({"vmId": self.config.vm_id,
                           "registrationToken": self.config.registration_token,
                           "certificate": self.identity.certificate_pem.decode(),
                           "agentVersion": __version__, "agentName": AGENT_NAME}).encode()
        with self._register_lock:
            resp = self._send("POST", self.url("/vmvault/agent/register"), body,
                              {"content-type": "application/json"}, REQUEST_TIMEOUT)
            if resp.status_code != 200:
                raise ServerError(f"registration refused: {_describe(resp)}")
            answer = _json_object(resp)
        self.on_registered(answer)
        return answer

    def signed(self, method: str, path: str, body: bytes = b"",
               timeout: float = REQUEST_TIMEOUT) -> httpx.Response:
        resp = self._signed_once(method, path, body, timeout)
        if resp.status_code == 401:
            log.warning("%s %s: the server refused the agent's signature (%s): registering again",
                        method, path, _describe(resp))
            self.register()
            resp = self._signed_once(method, path, body, timeout)
        return resp

    def _signed_once(self, method: str, path: str, body: bytes,
                     timeout: float) -> httpx.Response:
        url = self.url(path)
        target = httpx.URL(url).raw_path.decode("ascii")
        headers = sign_request(self.identity, self.config.vm_id, method, target, body)
        if body:
            headers["content-type"] = "application/json"
        return self._send(method, url, body, headers, timeout)

    def _send(self, method: str, url: str, body: bytes, headers: dict[str, str],
              timeout: float) -> httpx.Response:
        try:
            return self.http.request(method, url, content=body or None, headers=headers,
                                     timeout=timeout)
        except httpx.HTTPError as exc:
            raise ServerError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self.http.close()


def _describe(resp: httpx.Response) -> str:
    try:
        err = resp.json().get("error", {})
        detail = f"{err.get('code')}: {err.get('message')}" if isinstance(err, dict) else ""
    except (ValueError, AttributeError):
        detail = ""
    return f"HTTP {resp.status_code}" + (f" {detail}" if detail else "")


def _json_object(resp: httpx.Response) -> dict[str, Any]:
    try:
        value = resp.json()
    except ValueError as exc:
        raise ServerError(f"the server's answer is not JSON (HTTP {resp.status_code})") from exc
    if not isinstance(value, dict):
        raise ServerError("the server's answer is not a JSON object")
    return value


class Backoff:
    """1, 2, 4... seconds, up to a cap."""

    def __init__(self, cap: float) -> None:
        self.cap, self.delay = cap, 1.0

    def next(self) -> float:
        delay, self.delay = min(self.delay, self.cap), min(self.delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.delay = 1.0


# --- the agent -------------------------------------------------------------------------------


class Agent:
    def __init__(self, root: Path, config: AgentConfig, stop: threading.Event) -> None:
        self.root, self.config, self.stop = root, config, stop
        self.lib_dir = root / "var/lib/waagent"
        self.state_path = self.lib_dir / "agent-state.json"
        self.state = AgentState.load(self.state_path)
        self.ctx = GuestContext(root, config.mount_root, config.http_proxy,
                                azure_paths=config.azure_paths and azure_paths_available(root))
        if self.ctx.azure_paths:
            log.info("handler commands see %s/{var/lib/waagent,etc/azure,var/log/azure} at "
                     "/var/lib/waagent, /etc/azure and /var/log/azure", root)
        self.poll_seconds = config.poll_seconds
        self.heartbeat_seconds = config.heartbeat_seconds
        self.message = "Guest Agent is running"
        self.meter = LoadMeter()
        self._lock = threading.Lock()
        self._post_lock = threading.Lock()
        self.busy = threading.Event()  # set while a goal state is being processed
        self.identity = self._identity()
        self.client = ServerClient(config, self.identity)
        self.client.on_registered = self._registered

    # identity and registration

    def _identity(self) -> Identity:
        if self.state.thumbprint:
            try:
                identity = Identity.load(self.lib_dir, self.state.thumbprint)
                log.info("Using the VM certificate %s", identity.thumbprint)
                return identity
            except CertificateError as exc:
                log.warning("%s: making a new certificate", exc)
        identity = make_identity(f"vmvault-agent-{self.config.vm_id}")
        identity.save(self.lib_dir)
        self.state.thumbprint = identity.thumbprint
        self._save()
        log.info("Created the VM certificate %s", identity.thumbprint)
        return identity

    def _registered(self, answer: dict[str, Any]) -> None:
        thumb = answer.get("thumbprint")
        if isinstance(thumb, str) and thumb.upper() != self.identity.thumbprint:
            log.warning("The server registered thumbprint %s, not the agent's %s",
                        thumb, self.identity.thumbprint)
        if _positive(answer.get("heartbeatSeconds")):
            self.heartbeat_seconds = float(answer["heartbeatSeconds"])
        if _positive(answer.get("pollSeconds")):
            self.poll_seconds = float(answer["pollSeconds"])
        _check_version(answer.get("minimumAgentVersion"))
        log.info("Registered with %s as VM %s (certificate %s)", self.config.server_url,
                 self.config.vm_id, self.identity.thumbprint)

    def register_until_done(self) -> bool:
        backoff = Backoff(self._backoff_cap())
        while not self.stop.is_set():
            try:
                self.client.register()
                return True
            except ServerError as exc:
                delay = backoff.next()
                log.warning("Registration failed: %s; retrying in %gs", exc, delay)
                self.stop.wait(delay)
        return False

    def _backoff_cap(self) -> float:
        return max(1.0, min(MAX_BACKOFF_SECONDS, self.poll_seconds))

    # the threads

    def run_ext_handler(self) -> None:
        """The ExtHandler thread: register, start the heartbeat, process goal states."""
        if not self.register_until_done():
            return
        threading.Thread(target=self.run_heartbeat, name="MonitorHandler", daemon=True).start()
        backoff = Backoff(self._backoff_cap())
        while not self.stop.is_set():
            try:
                self._goal_state_round(backoff)
            except Exception as exc:  # noqa: BLE001 - the agent outlives its own bugs
                log.error("Goal state processing failed: %s: %s", type(exc).__name__, exc)
                self.stop.wait(self.poll_seconds)

    def _goal_state_round(self, backoff: Backoff) -> None:
        started = time.monotonic()
        doc = self._poll_goal_state(backoff)
        if doc is None or self.stop.is_set():
            return
        backoff.reset()
        before = self.state.incarnation
        self.busy.set()
        try:
            applied = self.apply_goal_state(doc)
        finally:
            self.busy.clear()
        if not applied:
            self.stop.wait(self.poll_seconds)
        elif self.state.incarnation == before and time.monotonic() - started < 0.5:
            self.stop.wait(1.0)

    def _poll_goal_state(self, backoff: Backoff) -> Any:
        wait = int(min(MAX_WAIT_SECONDS, max(1, self.poll_seconds)))
        incarnation = self.state.incarnation if self.state.incarnation is not None else 0
        path = f"/vmvault/agent/goalstate?incarnation={incarnation}&wait={wait}"
        try:
            resp = self.client.signed("GET", path, timeout=wait + REQUEST_TIMEOUT)
            if resp.status_code != 200:
                raise ServerError(f"goal state: {_describe(resp)}")
        except ServerError as exc:
            delay = backoff.next()
            log.warning("Cannot fetch the goal state: %s; retrying in %gs", exc, delay)
            self.stop.wait(delay)
            return None
        try:
            return resp.json()
        except ValueError:
            return resp.text

    def run_heartbeat(self) -> None:
        """The MonitorHandler thread: a status report every heartbeatSeconds."""
        delay = 0.0
        while not self.stop.wait(delay):
            self.meter.sample()
            try:
                self.post_status()
            except Exception as exc:  # noqa: BLE001 - the heartbeat must go on
                log.error("Heartbeat failed: %s: %s", type(exc).__name__, exc)
            delay = self.heartbeat_seconds

    # goal states

    def apply_goal_state(self, doc: Any) -> bool:
        """Process a goal state; False when it has no usable incarnation."""
        incarnation = doc.get("incarnation") if isinstance(doc, dict) else None
        if not _is_int(incarnation):
            self._goal_state_error(f"the goal state is not valid (no incarnation): {_peek(doc)}")
            return False
        assert isinstance(doc, dict) and isinstance(incarnation, int)
        if incarnation == self.state.incarnation:
            return True
        log.info("Goal state incarnation %d received", incarnation)
        _check_version(doc.get("minimumAgentVersion"))
        extensions = doc.get("extensions", [])
        if not isinstance(extensions, list):
            self._goal_state_error(f"goal state {incarnation}: extensions is not a list")
            extensions = []
        else:
            self.message = "Guest Agent is running"
        for raw in extensions:
            if self.stop.is_set():
                return True
            self._apply_extension(raw)
        self.state.incarnation = incarnation
        self._save()
        log.info("Goal state incarnation %d done", incarnation)
        return True

    def _goal_state_error(self, message: str) -> None:
        log.error("%s", message)
        self.message = message
        self.post_status()

    def _apply_extension(self, raw: Any) -> None:
        try:
            spec = handlers.parse_extension(raw)
        except HandlerError as exc:
            self._bad_extension(raw, exc)
            return
        previous = self.state.handlers.get(spec.full_name)
        try:
            record = handlers.process_extension(self.ctx, spec, previous, self.fetch_package,
                                                self.stop)
        except Exception as exc:  # noqa: BLE001 - one handler must not take the agent down
            log.error("[%s] processing failed: %s: %s", spec.label, type(exc).__name__, exc)
            record = handlers.failure(spec, handlers.CODE_PACKAGE, f"{type(exc).__name__}: {exc}")
        with self._lock:
            if record is None:
                self.state.handlers.pop(spec.full_name, None)
            else:
                self.state.handlers[spec.full_name] = record
        self._save()
        if record != previous:
            self.post_status()

    def _bad_extension(self, raw: Any, exc: HandlerError) -> None:
        named = handlers.guess_full_name(raw)
        log.error("[%s] invalid extension in the goal state: %s",
                  "-".join(named) if named else "?", exc)
        if named is None:
            self.message = f"invalid extension in the goal state: {exc}"
            return
        record = HandlerRecord(named[0], named[1], str(raw.get("state", "")), None, None,
                               "error", handlers.CODE_PACKAGE, str(exc))
        with self._lock:
            self.state.handlers[named[0]] = record
        self._save()
        self.post_status()

    def fetch_package(self, uri: str) -> bytes:
        try:
            resp = self.client.signed("GET", uri, timeout=120.0)
        except ServerError as exc:
            raise HandlerError(f"package {uri} could not be downloaded: {exc}") from exc
        if resp.status_code != 200:
            raise HandlerError(f"package {uri} could not be downloaded: {_describe(resp)}")
        return resp.content

    # status

    def status_document(self, status: str = "Ready") -> dict[str, Any]:
        with self._lock:
            records = list(self.state.handlers.values())
        return {"agentName": AGENT_NAME, "agentVersion": __version__, "status": status,
                "message": self.message,
                "timestampUTC": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "load": dict(self.meter.latest),
                "handlers": [handlers.handler_report(self.ctx, r) for r in records]}

    def post_status(self, status: str = "Ready") -> bool:
        with self._post_lock:
            body = json.dumps(self.status_document(status)).encode()
            try:
                resp = self.client.signed("POST", "/vmvault/agent/status", body)
            except ServerError as exc:
                log.warning("Status report failed: %s", exc)
                return False
            if resp.status_code not in (200, 201, 202, 204):
                log.warning("Status report refused: %s", _describe(resp))
                return False
            return True

    def _save(self) -> None:
        with self._lock:
            try:
                self.state.save(self.state_path)
            except OSError as exc:
                log.error("Cannot write %s: %s", self.state_path, exc)


def _check_version(minimum: Any) -> None:
    if isinstance(minimum, str) and _version_tuple(__version__) < _version_tuple(minimum):
        log.warning("Agent version %s is older than the minimum %s the server asks for",
                    __version__, minimum)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _peek(doc: Any) -> str:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    return text[:120] + ("..." if len(text) > 120 else "")


# --- process: logging, pid file, signals -----------------------------------------------------


class WaagentFormatter(logging.Formatter):
    """``2026-11-23T12:00:00.123456Z INFO ExtHandler message``, as waagent.log."""

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created, dt.UTC)
        return (f"{when.strftime('%Y-%m-%dT%H:%M:%S.%fZ')} {record.levelname} "
                f"{record.threadName} {record.getMessage()}")


def setup_logging(root: Path, verbose: bool) -> None:
    path = root / "var/log/waagent.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler: logging.Handler = logging.FileHandler(path)
    handler.setFormatter(WaagentFormatter())
    log.handlers[:] = [handler]
    if verbose:
        echo = logging.StreamHandler(sys.stderr)
        echo.setFormatter(WaagentFormatter())
        log.addHandler(echo)
    log.setLevel(logging.INFO)
    log.propagate = False


def claim_pid_file(path: Path) -> None:
    """Write our pid; ConfigError when another agent runs on this guest root."""
    try:
        other = int(path.read_text().strip())
    except (OSError, ValueError):
        other = 0
    if other and other != os.getpid() and _is_agent(other):
        raise ConfigError(f"another vmvault-agent (pid {other}) runs on this guest root")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")


def _is_agent(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"vmvault-agent" in cmdline or b"vmvault.guest.agent" in cmdline


SHUTDOWN_MARKS = ("run/systemd/shutdown/scheduled", "run/nologin")


def guest_shutting_down(root: Path) -> bool:
    """What systemd leaves while the system goes down: a scheduled shutdown, or logins
    refused (pam_nologin's file, created by systemd-user-sessions at shutdown)."""
    return any((root / mark).exists() for mark in SHUTDOWN_MARKS)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=AGENT_NAME,
                                     description="The vmvault VM agent (waagent for vmvault).")
    parser.add_argument("--root", default="/", help="the guest root (default /)")
    parser.add_argument("--verbose", action="store_true", help="also log to stderr")
    parser.add_argument("--version", action="version", version=__version__)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    root = Path(args.root).resolve()
    try:
        config = AgentConfig.load(root / "etc/vmvault/agent.json")
        setup_logging(root, args.verbose)
        claim_pid_file(root / "var/run/waagent.pid")
    except (ConfigError, OSError) as exc:
        print(f"{AGENT_NAME}: error: {exc}", file=sys.stderr)
        return 2
    return _serve(root, config)


def _serve(root: Path, config: AgentConfig) -> int:
    threading.current_thread().name = "Daemon"
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("Received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    pid_file = root / "var/run/waagent.pid"
    log.info("%s %s starting, guest root %s, server %s", AGENT_NAME, __version__, root,
             config.server_url)
    try:
        agent = Agent(root, config, stop)
    except (OSError, CertificateError) as exc:
        log.error("Cannot start: %s", exc)
        pid_file.unlink(missing_ok=True)
        print(f"{AGENT_NAME}: error: {exc}", file=sys.stderr)
        return 1
    worker = threading.Thread(target=agent.run_ext_handler, name="ExtHandler", daemon=True)
    worker.start()
    code = 0
    while not stop.wait(1.0):
        if not worker.is_alive():
            log.error("The ExtHandler thread ended unexpectedly: stopping")
            stop.set()
            code = 1
    if agent.busy.is_set():  # let it kill a running command and save its state
        worker.join(STOP_GRACE_SECONDS)
    if guest_shutting_down(root):  # row S2: the service learns it from the guest itself
        log.info("The guest is shutting down: reporting it")
        agent.post_status("ShuttingDown")
    pid_file.unlink(missing_ok=True)
    log.info("%s stopped", AGENT_NAME)
    return code


if __name__ == "__main__":
    sys.exit(main())
