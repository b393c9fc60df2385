"""The extension handler protocol, as WALinuxAgent runs handlers (docs/agent-protocol.md,
sections 1 and 4).

A handler package is a zip with ``HandlerManifest.json`` at its root. It is unzipped into
``var/lib/waagent/<Publisher>.<Type>-<Version>/`` under the guest root, which also gets
``HandlerEnvironment.json``, ``config/<N>.settings``, ``status/``, ``events/`` and a
``config/HandlerState`` file saying how far the handler got (Installed, Enabled, Disabled).
Commands run through ``/bin/sh -c`` in the handler folder, in a process group of their own,
with their output appended to ``<logFolder>/CommandExecution.log``.

``process_extension`` runs the lifecycle for one extension of a goal state and returns the
``HandlerRecord`` the agent remembers and reports.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

log = logging.getLogger("vmvault.agent")

DEFAULT_TIMEOUT = 300.0
CODE_TIMEOUT = -1
CODE_PACKAGE = -2
STATES = ("enabled", "disabled", "uninstall")
MAX_PACKAGE_BYTES = 1 << 30
OUTPUT_TAIL = 500
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_STATUS_VALUES = {"success": "success", "warning": "success", "error": "error",
                  "transitioning": "transitioning"}


class HandlerError(Exception):
    """A goal-state entry, package or manifest that cannot be used (reported with code -2)."""


@dataclass(frozen=True)
class GuestContext:
    """Where handlers live and what their commands get in their environment."""

    guest_root: Path
    mount_root: Path
    proxy: str | None = None
    python: str = sys.executable
    # Run commands in a private mount namespace that shows the guest's own /var/lib/waagent,
    # /etc/azure and /var/log/azure at those paths (azure_paths_available).
    azure_paths: bool = False

    @property
    def lib_dir(self) -> Path:
        return self.guest_root / "var/lib/waagent"

    def log_folder(self, full_name: str) -> Path:
        return self.guest_root / "var/log/azure" / full_name


@dataclass(frozen=True)
class ExtensionSpec:
    """One entry of the goal state's ``extensions``."""

    name: str
    publisher: str
    type: str
    version: str
    state: str
    sequence_number: int
    package_uri: str
    settings: dict[str, Any]

    @property
    def full_name(self) -> str:
        return f"{self.publisher}.{self.type}"

    @property
    def label(self) -> str:
        return f"{self.full_name}-{self.version}"


@dataclass(frozen=True)
class HandlerRecord:
    """What the agent remembers of one handler (agent-state.json) and reports for it.

    ``last_run`` is the sequence number whose enable last ran to completion, by ``version``.
    """

    name: str
    version: str
    state: str
    sequence_number: int | None
    last_run: int | None
    status: str
    code: int
    message: str

    def to_json(self) -> dict[str, Any]:
        return {_JSON_KEYS.get(k, k): v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, raw: Any) -> HandlerRecord | None:
        try:
            record = cls(**{k: raw[_JSON_KEYS.get(k, k)] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            return None
        texts = (record.name, record.version, record.state, record.status, record.message)
        numbers = (record.sequence_number, record.last_run)
        if (all(isinstance(t, str) for t in texts) and isinstance(record.code, int)
                and all(n is None or isinstance(n, int) for n in numbers)):
            return record
        return None


_JSON_KEYS = {"sequence_number": "sequenceNumber", "last_run": "lastSequenceNumberRun"}


@dataclass(frozen=True)
class CommandResult:
    command: str
    code: int
    message: str
    aborted: bool = False

    @property
    def ok(self) -> bool:
        return self.code == 0 and not self.aborted


# --- goal-state entries ----------------------------------------------------------------------


def _safe(raw: dict[str, Any], key: str, default: str | None = None) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or not _SAFE_NAME.match(value) or ".." in value:
        raise HandlerError(f"extension field '{key}' is missing or not a safe name: {value!r}")
    return value


def parse_extension(raw: Any) -> ExtensionSpec:
    """Check one goal-state extension entry; HandlerError when it cannot be used."""
    if not isinstance(raw, dict):
        raise HandlerError("extension entry is not a JSON object")
    publisher, type_, version = _safe(raw, "publisher"), _safe(raw, "type"), _safe(raw, "version")
    state = raw.get("state", "enabled")
    if state not in STATES:
        raise HandlerError(f"extension state {state!r} is not one of {', '.join(STATES)}")
    seq = raw.get("sequenceNumber", 0)
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise HandlerError(f"extension sequenceNumber {seq!r} is not a non-negative integer")
    uri = raw.get("packageUri", "")
    if not isinstance(uri, str) or (state != "uninstall" and not uri):
        raise HandlerError("extension packageUri is missing")
    settings = raw.get("settings") or {}
    if not isinstance(settings, dict):
        raise HandlerError("extension settings are not a JSON object")
    name = raw.get("name") if isinstance(raw.get("name"), str) else type_
    return ExtensionSpec(str(name), publisher, type_, version, state, seq, uri, settings)


def guess_full_name(raw: Any) -> tuple[str, str] | None:
    """(Publisher.Type, version) of an entry parse_extension refused, when it has them."""
    if not isinstance(raw, dict):
        return None
    pub, typ, ver = raw.get("publisher"), raw.get("type"), raw.get("version")
    if not (isinstance(pub, str) and isinstance(typ, str)) or not pub or not typ:
        return None
    return f"{pub}.{typ}", ver if isinstance(ver, str) else ""


# --- an installed handler --------------------------------------------------------------------


class InstalledHandler:
    """The folder of one handler version under the agent's library folder."""

    def __init__(self, ctx: GuestContext, full_name: str, version: str) -> None:
        self.ctx, self.full_name, self.version = ctx, full_name, version
        self.dir = ctx.lib_dir / f"{full_name}-{version}"
        self.log_folder = ctx.log_folder(full_name)

    @property
    def label(self) -> str:
        return f"{self.full_name}-{self.version}"

    @property
    def state_file(self) -> Path:
        return self.dir / "config" / "HandlerState"

    def handler_state(self) -> str | None:
        try:
            return self.state_file.read_text().strip() or None
        except OSError:
            return None

    def set_handler_state(self, value: str) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(value + "\n")

    def is_installed(self) -> bool:
        return self.handler_state() is not None and (self.dir / "HandlerManifest.json").is_file()

    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.dir / "HandlerManifest.json")

    def environment_document(self) -> list[dict[str, Any]]:
        return [{"name": self.full_name, "version": self.version, "handlerEnvironment": {
            "logFolder": str(self.log_folder),
            "configFolder": str(self.dir / "config"),
            "statusFolder": str(self.dir / "status"),
            "heartbeatFile": str(self.dir / "heartbeat.log"),
            "eventsFolder": str(self.dir / "events")}}]

    def prepare(self) -> None:
        """Write HandlerEnvironment.json and make the folders it names."""
        for sub in ("config", "status", "events"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.log_folder.mkdir(parents=True, exist_ok=True)
        _write_json(self.dir / "HandlerEnvironment.json", self.environment_document())

    def write_settings(self, seq: int, settings: dict[str, Any]) -> Path:
        path = self.dir / "config" / f"{seq}.settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(settings, f)
        return path

    def read_status(self, seq: int | None) -> Any:
        """The parsed status/<N>.status, or None when it is missing or not JSON."""
        if seq is None:
            return None
        try:
            return json.loads((self.dir / "status" / f"{seq}.status").read_text())
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def run(self, command: str, seq: int, stop: threading.Event | None = None) -> CommandResult:
        """Run the manifest's ``<command>Command`` (install, enable, ...) to completion,
        timeout or abort (stop set)."""
        try:
            manifest = self.manifest()
        except HandlerError as exc:
            return CommandResult(command, CODE_PACKAGE, str(exc))
        line = manifest.get(f"{command}Command")
        if not line:
            log.info("[%s] no %sCommand in the manifest: nothing to run", self.label, command)
            return CommandResult(command, 0, f"{command.capitalize()}: no command")
        if not isinstance(line, str):
            return CommandResult(command, CODE_PACKAGE, f"{command}Command is not a string")
        timeout = command_timeout(manifest, command)
        return run_command(line, cwd=self.dir, env=self.command_env(seq), timeout=timeout,
                           log_file=self.log_folder / "CommandExecution.log",
                           label=self.label, command=command, stop=stop,
                           namespace_root=self.ctx.guest_root if self.ctx.azure_paths else None)

    def command_env(self, seq: int) -> dict[str, str]:
        return handler_env(self.ctx, seq)


def read_manifest(path: Path) -> dict[str, Any]:
    """The ``handlerManifest`` object of a HandlerManifest.json; HandlerError when invalid."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HandlerError(f"HandlerManifest.json cannot be read: {exc}") from exc
    entry = raw[0] if isinstance(raw, list) and raw else raw
    manifest = entry.get("handlerManifest") if isinstance(entry, dict) else None
    if not isinstance(manifest, dict):
        raise HandlerError("HandlerManifest.json has no handlerManifest object")
    if not isinstance(manifest.get("enableCommand"), str):
        raise HandlerError("HandlerManifest.json has no enableCommand")
    return manifest


def command_timeout(manifest: dict[str, Any], command: str) -> float:
    value = manifest.get(f"{command}TimeoutInSeconds")
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return DEFAULT_TIMEOUT


def handler_env(ctx: GuestContext, seq: int) -> dict[str, str]:
    """The environment of a handler command (section 1)."""
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy")}
    env.update(ConfigSequenceNumber=str(seq), VMVAULT_GUEST_ROOT=str(ctx.guest_root),
               VMVAULT_MOUNT_ROOT=str(ctx.mount_root), VMVAULT_PYTHON=ctx.python)
    if ctx.proxy:
        env["http_proxy"] = env["https_proxy"] = ctx.proxy
    return env


# --- running a command -----------------------------------------------------------------------

# The paths a handler written for Azure's agent uses as they are (/var/lib/waagent/<thumb>.crt
# and .prv, /etc/azure/vmbackup.conf, /var/log/azure); in a lab VM they live under its guest
# root. Exit status of a command whose paths could not be set up.
AZURE_PATHS = ("/var/lib/waagent", "/etc/azure", "/var/log/azure")
CODE_NAMESPACE = 97
_NAMESPACE_SCRIPT = (
    'g=$1; line=$2; for d in ' + " ".join(AZURE_PATHS) + '; do '
    'mount --bind "$g$d" "$d" || { echo "vmvault-agent: cannot show $g$d at $d" >&2; '
    f'exit {CODE_NAMESPACE}; }}; done; exec /bin/sh -c "$line"')


def azure_paths_available(guest_root: Path) -> bool:
    """Can handler commands see the guest's files at Azure's paths? Root, a guest root that is
    not / (a lab VM) and a working ``unshare``: the empty mount points are made on the host
    (if missing) and the guest's folders bound over them inside each command's own mount
    namespace only; the host's view of those paths never changes."""
    if os.geteuid() != 0 or guest_root.resolve() == Path("/") or not shutil.which("unshare"):
        return False
    try:
        for path in AZURE_PATHS:
            (guest_root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
            Path(path).mkdir(parents=True, exist_ok=True)
        probe = subprocess.run(_namespaced(guest_root, "true"), capture_output=True,
                               timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("handlers run with the guest's paths as they are: %s", exc)
        return False
    if probe.returncode != 0:
        log.warning("handlers run with the guest's paths as they are: %s",
                    probe.stderr.decode(errors="replace").strip() or f"exit {probe.returncode}")
    return probe.returncode == 0


def _namespaced(guest_root: Path, line: str) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
            _NAMESPACE_SCRIPT, "vmvault-namespace", str(guest_root), line]


def run_command(line: str, *, cwd: Path, env: dict[str, str], timeout: float, log_file: Path,
                label: str, command: str, stop: threading.Event | None = None,
                namespace_root: Path | None = None) -> CommandResult:
    """Run ``/bin/sh -c line`` in a new process group; kill the group on timeout or stop.
    With namespace_root, in a mount namespace of its own that shows namespace_root's Azure
    paths at Azure's paths."""
    if stop is not None and stop.is_set():
        return _result(command, label, 0, "aborted", timeout, "")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    seq = env.get("ConfigSequenceNumber", "")
    log.info("[%s] Executing %sCommand: %s (ConfigSequenceNumber=%s, timeout %gs)",
             label, command, line, seq, timeout)
    with open(log_file, "ab") as out:
        out.write(f"{_now()} [{label}] {command}Command: {line} "
                  f"(ConfigSequenceNumber={seq})\n".encode())
        out.flush()
        start = out.tell()
        try:
            argv = (["/bin/sh", "-c", line] if namespace_root is None
                    else _namespaced(namespace_root, line))
            proc = subprocess.Popen(argv, cwd=cwd, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            log.error("[%s] %sCommand could not start: %s", label, command, exc)
            return CommandResult(command, CODE_PACKAGE, f"{command}Command could not start: {exc}")
        outcome = _wait(proc, timeout, stop)
    return _result(command, label, proc.returncode, outcome, timeout, _tail(log_file, start))


def _wait(proc: subprocess.Popen[bytes], timeout: float, stop: threading.Event | None) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            proc.wait(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
            return "exited"
        except subprocess.TimeoutExpired:
            pass
        if stop is not None and stop.is_set():
            kill_group(proc)
            return "aborted"
        if time.monotonic() >= deadline:
            kill_group(proc)
            return "timeout"


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the command's whole process group and reap the command."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _result(command: str, label: str, code: int, outcome: str, timeout: float,
            tail: str) -> CommandResult:
    title = command.capitalize()
    if outcome == "timeout":
        log.error("[%s] %s timed out after %gs: its process group was killed", label, title,
                  timeout)
        return CommandResult(command, CODE_TIMEOUT,
                             f"{title} timed out after {timeout:g}s; the command was killed")
    if outcome == "aborted":
        log.warning("[%s] %s aborted: the agent is stopping", label, title)
        return CommandResult(command, CODE_TIMEOUT, f"{title} aborted: the agent stopped",
                             aborted=True)
    log.info("[%s] %s completed, exit code %d", label, title, code)
    if code == 0:
        return CommandResult(command, 0, f"{title} succeeded")
    detail = f": {tail}" if tail else ""
    return CommandResult(command, code, f"{title} failed with exit code {code}{detail}")


def _tail(path: Path, start: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(start, path.stat().st_size - OUTPUT_TAIL))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


# --- installing ------------------------------------------------------------------------------


def installed_versions(ctx: GuestContext, full_name: str) -> list[str]:
    """Versions of a handler that have a folder under the library folder."""
    prefix = f"{full_name}-"
    try:
        entries = list(ctx.lib_dir.iterdir())
    except OSError:
        return []
    return sorted(p.name[len(prefix):] for p in entries
                  if p.is_dir() and p.name.startswith(prefix)
                  and "-" not in p.name[len(prefix):] and (p / "HandlerManifest.json").exists())


def install_package(ctx: GuestContext, spec: ExtensionSpec, data: bytes) -> InstalledHandler:
    """Unzip a package into the handler's folder and write HandlerEnvironment.json.
    HandlerError when the zip or its manifest cannot be used. Runs no command."""
    handler = InstalledHandler(ctx, spec.full_name, spec.version)
    ctx.lib_dir.mkdir(parents=True, exist_ok=True)
    tmp = ctx.lib_dir / f".{handler.dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _unzip(data, tmp)
        read_manifest(tmp / "HandlerManifest.json")
        shutil.rmtree(handler.dir, ignore_errors=True)
        tmp.rename(handler.dir)
    except HandlerError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HandlerError(f"package cannot be unpacked: {exc}") from exc
    handler.prepare()
    log.info("[%s] package unpacked into %s", handler.label, handler.dir)
    return handler


def _unzip(data: bytes, dest: Path) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError) as exc:
        raise HandlerError(f"package is not a zip file: {exc}") from exc
    with archive:
        infos = archive.infolist()
        if sum(i.file_size for i in infos) > MAX_PACKAGE_BYTES:
            raise HandlerError("package is larger than 1 GiB unpacked")
        for info in infos:
            parts = PurePosixPath(info.filename).parts
            if info.filename.startswith("/") or ".." in parts:
                raise HandlerError(f"package member {info.filename!r} is outside the package")
        dest.mkdir(parents=True)
        try:
            for info in infos:
                _extract(archive, info, dest)
        except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as exc:
            raise HandlerError(f"package cannot be unpacked: {exc}") from exc


def _extract(archive: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path) -> None:
    target = Path(archive.extract(info, dest))
    if info.is_dir():
        return
    mode = (info.external_attr >> 16) & 0o777
    # WALinuxAgent adds the owner's execute bit to every file of a package
    target.chmod((mode or 0o644) | stat.S_IRUSR | stat.S_IWUSR | stat.S_IXUSR)


# --- the lifecycle ---------------------------------------------------------------------------


Fetch = Callable[[str], bytes]


def process_extension(ctx: GuestContext, spec: ExtensionSpec, previous: HandlerRecord | None,
                      fetch: Fetch, stop: threading.Event | None = None) -> HandlerRecord | None:
    """Bring one handler to the goal state's state (section 4). Returns the new record, or
    None once the handler is uninstalled. Never raises HandlerError: a package that cannot be
    downloaded or installed is reported with code -2."""
    if spec.state == "uninstall":
        uninstall_all(ctx, spec.full_name, spec.sequence_number, stop)
        return None
    base = previous if previous and previous.version == spec.version else None
    try:
        handler, failed = ensure_installed(ctx, spec, fetch, stop)
    except HandlerError as exc:
        log.error("[%s] %s", spec.label, exc)
        return failure(spec, CODE_PACKAGE, str(exc))
    if failed is not None:
        return record_for(spec, base, failed, ran=False)
    if spec.state == "enabled":
        return _enable(handler, spec, base, stop)
    return _disable(handler, spec, base, stop)


def ensure_installed(ctx: GuestContext, spec: ExtensionSpec, fetch: Fetch,
                     stop: threading.Event | None) -> tuple[InstalledHandler, CommandResult | None]:
    """The installed handler of spec's version, installing or updating to it when needed;
    with the result of a failed install or update command (None when all went well)."""
    handler = InstalledHandler(ctx, spec.full_name, spec.version)
    if handler.is_installed():
        return handler, None
    olds = [InstalledHandler(ctx, spec.full_name, v)
            for v in installed_versions(ctx, spec.full_name) if v != spec.version]
    handler = install_package(ctx, spec, fetch(spec.package_uri))
    seq = spec.sequence_number
    result = _update(handler, olds, seq, stop) if olds else handler.run("install", seq, stop)
    if not result.ok:
        handler.remove()
        return handler, result
    handler.set_handler_state("Installed")
    return handler, None


def _update(new: InstalledHandler, olds: list[InstalledHandler], seq: int,
            stop: threading.Event | None) -> CommandResult:
    """Old disable, new update, old uninstall, remove the old folders (WALinuxAgent's order)."""
    for old in olds:
        log.info("[%s] updating to version %s", old.label, new.version)
        old.run("disable", seq, stop)
    result = new.run("update", seq, stop)
    if not result.ok:
        return result
    for old in olds:
        old.run("uninstall", seq, stop)
        old.remove()
        log.info("[%s] removed after the update to %s", old.label, new.version)
    return result


def _enable(handler: InstalledHandler, spec: ExtensionSpec, base: HandlerRecord | None,
            stop: threading.Event | None) -> HandlerRecord:
    seq = spec.sequence_number
    if base and base.last_run == seq and base.state == "enabled":
        log.info("[%s] sequence number %d already ran: nothing to do", handler.label, seq)
        return replace(base, sequence_number=seq)
    handler.write_settings(seq, spec.settings)
    result = handler.run("enable", seq, stop)
    if not result.aborted:
        handler.set_handler_state("Enabled")
    return record_for(spec, base, result, ran=not result.aborted)


def _disable(handler: InstalledHandler, spec: ExtensionSpec, base: HandlerRecord | None,
             stop: threading.Event | None) -> HandlerRecord:
    if base and base.state == "disabled":
        return replace(base, sequence_number=spec.sequence_number)
    result = handler.run("disable", spec.sequence_number, stop)
    if not result.aborted:
        handler.set_handler_state("Disabled")
    record = record_for(spec, base, result, ran=False)
    return record if result.aborted else replace(record, state="disabled")


def uninstall_all(ctx: GuestContext, full_name: str, seq: int,
                  stop: threading.Event | None = None) -> None:
    """Disable, uninstall and remove every installed version of a handler."""
    for version in installed_versions(ctx, full_name):
        handler = InstalledHandler(ctx, full_name, version)
        handler.run("disable", seq, stop)
        handler.run("uninstall", seq, stop)
        handler.remove()
        log.info("[%s] uninstalled", handler.label)


def record_for(spec: ExtensionSpec, base: HandlerRecord | None, result: CommandResult,
               ran: bool) -> HandlerRecord:
    """The record after a command; ``ran`` marks spec's sequence number as run."""
    last_run = spec.sequence_number if ran else (base.last_run if base else None)
    state = base.state if (result.aborted and base) else spec.state
    return HandlerRecord(spec.full_name, spec.version, state, spec.sequence_number, last_run,
                         "success" if result.ok else "error", result.code, result.message)


def failure(spec: ExtensionSpec, code: int, message: str) -> HandlerRecord:
    return HandlerRecord(spec.full_name, spec.version, spec.state, spec.sequence_number, None,
                         "error", code, message)


# --- reporting -------------------------------------------------------------------------------


def handler_report(ctx: GuestContext, record: HandlerRecord) -> dict[str, Any]:
    """The status-report entry of a handler (section 3), with its status file read now."""
    status_file = None
    if _SAFE_NAME.match(record.name) and _SAFE_NAME.match(record.version):
        handler = InstalledHandler(ctx, record.name, record.version)
        status_file = handler.read_status(record.sequence_number)
    status, message = record.status, record.message
    inner = _status_object(status_file)
    if record.code == 0 and record.state == "enabled":
        status = _STATUS_VALUES.get(str(inner.get("status", "")).lower(), "transitioning")
    formatted = inner.get("formattedMessage")
    if record.code == 0 and isinstance(formatted, dict) and formatted.get("message"):
        message = str(formatted["message"])
    return {"name": record.name, "version": record.version,
            "sequenceNumber": record.sequence_number, "state": record.state,
            "status": status, "code": record.code, "message": message,
            "statusFile": status_file}


def _status_object(status_file: Any) -> dict[str, Any]:
    entry = status_file[0] if isinstance(status_file, list) and status_file else status_file
    inner = entry.get("status") if isinstance(entry, dict) else None
    return inner if isinstance(inner, dict) else {}


# --- helpers ---------------------------------------------------------------------------------


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
