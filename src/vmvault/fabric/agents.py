"""VM agents: installing and running vmvault-agent for lab VMs, its registration, its signed
calls (goal state, packages, status) and what the server makes of its reports.

The protocol is docs/agent-protocol.md. A lab VM's agent runs as a process of this machine
with the VM's guest root (``$VMVAULT_HOME/vms/<rg>/<vm>/guest``); it is started and stopped
with the VM.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmvault import __version__, arm
from vmvault.catalog import VirtualMachine, VmAgent, VmExtension
from vmvault.clock import real_utcnow as utcnow  # heartbeats measure real time
from vmvault.context import Context
from vmvault.errors import (
    AGENT_AUTH_FAILED,
    AGENT_NOT_INSTALLED,
    AGENT_TOO_OLD,
    AGENT_UNREACHABLE,
    VmvaultError,
    invalid,
)
from vmvault.guest import certificates

log = logging.getLogger(__name__)

AGENT_NAME = "vmvault-agent"
MAX_WAIT_SECONDS = 30.0
_goal_state_changed = threading.Condition()
# The newest goal state incarnation each VM's agent has fetched (this server process's memory):
# how the backup service knows that the agent took a task up.
_delivered: dict[str, int] = {}
_delivered_at: dict[str, float] = {}  # time.monotonic() of the newest delivery


# --- where the guest lives --------------------------------------------------------------------


def guest_root(ctx: Context, vm: VirtualMachine) -> Path:
    return ctx.vm_folder(vm.group.name, vm.name) / "guest"


def mount_root(ctx: Context, vm: VirtualMachine) -> Path:
    return ctx.vm_folder(vm.group.name, vm.name)


def _pid_file(root: Path) -> Path:
    return root / "var" / "run" / "waagent.pid"


def parse_version(text: str | None) -> tuple[int, ...]:
    parts = []
    for piece in (text or "0").split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


# --- install, start, stop ---------------------------------------------------------------------


def install(ctx: Context, vm: VirtualMachine) -> None:
    """Put the agent into the VM: its configuration (with a fresh registration token) and a
    catalog row that waits for its registration."""
    token = secrets.token_urlsafe(32)
    path = config_path(ctx, vm)
    path.parent.mkdir(parents=True, exist_ok=True)
    conf = {"serverUrl": ctx.api_url, "vmId": vm.vm_id, "registrationToken": token,
            "mountRoot": str(mount_root(ctx, vm)), "pollSeconds": 20,
            "heartbeatSeconds": ctx.guest.heartbeat_seconds}
    _write_private_json(path, conf)
    token_hash = hashlib.sha256(token.encode()).hexdigest()
    if vm.agent is None:
        vm.agent = VmAgent(token_hash=token_hash)
    else:
        vm.agent.token_hash = token_hash


def config_path(ctx: Context, vm: VirtualMachine) -> Path:
    """The lab agent's configuration, etc/vmvault/agent.json under the guest root."""
    return guest_root(ctx, vm) / "etc" / "vmvault" / "agent.json"


def _write_private_json(path: Path, data: dict[str, Any]) -> None:
    """The agent's configuration holds its registration token: root-only, replaced whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def update_server_url(ctx: Context, vm: VirtualMachine) -> None:
    """The stack may come up on other ports: point the agent's configuration at this server."""
    path = config_path(ctx, vm)
    try:
        conf = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if conf.get("serverUrl") != ctx.api_url:
        conf["serverUrl"] = ctx.api_url
        _write_private_json(path, conf)


def _check_proxy(proxy: str) -> None:
    parts = urllib.parse.urlsplit(proxy)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None \
            or parts.path not in ("", "/") or parts.query:
        raise invalid("--proxy", f"'{proxy}' is not a proxy URL like http://HOST:PORT; "
                                 "give one, or \"\" to remove the proxy")


def configure(ctx: Context, group: str, name: str, http_proxy: str | None) -> dict[str, Any]:
    """Set (or, with "", remove) the lab agent's HTTP proxy (WALinuxAgent's HttpProxy.Host
    and .Port) and restart a running agent so that it takes the change."""
    from vmvault.fabric import vms

    if http_proxy:
        _check_proxy(http_proxy)
    with ctx.catalog.session() as s:
        vm = vms.get(s, group, name)
        if vm.agent is None:
            raise VmvaultError(AGENT_NOT_INSTALLED, name=vm.name)
        path = config_path(ctx, vm)
        conf = json.loads(path.read_text())
        if http_proxy:
            conf["httpProxy"] = http_proxy
        else:
            conf.pop("httpProxy", None)
        _write_private_json(path, conf)
        if running_pid(ctx, vm) is not None:
            stop(ctx, vm)
            start(ctx, vm)
        return instance_view(ctx, vm)


def running_pid(ctx: Context, vm: VirtualMachine) -> int | None:
    try:
        pid = int(_pid_file(guest_root(ctx, vm)).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def start(ctx: Context, vm: VirtualMachine) -> int | None:
    """Start the VM's agent process unless it runs; returns its pid (None: no agent)."""
    if vm.agent is None:
        return None
    pid = running_pid(ctx, vm)
    if pid:
        return pid
    update_server_url(ctx, vm)
    root = guest_root(ctx, vm)
    logs = root / "var" / "log"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "waagent.stdout", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vmvault.guest.agent", "--root", str(root)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True)
    _pid_file(root).parent.mkdir(parents=True, exist_ok=True)
    if not _pid_file(root).exists():
        _pid_file(root).write_text(str(proc.pid))
    vm.agent.status = "NotReady"
    vm.agent.message = "the agent is starting"
    return proc.pid


def stop(ctx: Context, vm: VirtualMachine, timeout: float | None = None) -> bool:
    """SIGTERM the agent, SIGKILL after the timeout; True when it has gone."""
    pid = running_pid(ctx, vm)
    if pid is None:
        return True
    limit = ctx.guest.agent_stop_seconds if timeout is None else timeout
    try:
        os.kill(pid, signal.SIGTERM)  # a hung agent does not act on it: SIGKILL after the bound
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if not _alive(pid):
            break
        time.sleep(0.05)
    else:
        log.warning("VM agent %d of %s did not stop in %.0f s: killed", pid, vm.name, limit)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    _pid_file(guest_root(ctx, vm)).unlink(missing_ok=True)
    if vm.agent is not None:
        vm.agent.status = "NotReady"
        vm.agent.message = "the agent is stopped"
    return True


# --- registration and signed calls ------------------------------------------------------------


def _vm_by_id(s: Session, vm_id: str) -> VirtualMachine:
    vm = s.scalar(select(VirtualMachine).where(VirtualMachine.vm_id == vm_id))
    if vm is None or vm.agent is None:
        raise VmvaultError(AGENT_AUTH_FAILED, reason=f"no VM with an agent has the id {vm_id!r}")
    return vm


def register(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    vm_id = str(body.get("vmId", ""))
    token = str(body.get("registrationToken", ""))
    pem = str(body.get("certificate", ""))
    with ctx.catalog.session() as s:
        vm = _vm_by_id(s, vm_id)
        assert vm.agent is not None
        if not secrets.compare_digest(hashlib.sha256(token.encode()).hexdigest(),
                                      vm.agent.token_hash):
            raise VmvaultError(AGENT_AUTH_FAILED, reason="the registration token is not the VM's")
        try:
            thumb = certificates.thumbprint(pem)
        except certificates.CertificateError as exc:
            raise invalid("certificate", str(exc)) from exc
        agent = vm.agent
        changed = agent.thumbprint is not None and agent.thumbprint != thumb
        agent.certificate, agent.thumbprint = pem, thumb
        agent.version = str(body.get("agentVersion") or "0")
        agent.registered = agent.last_heartbeat = utcnow()
        agent.status, agent.message = "Ready", "registered"
        log.info("VM agent %s of %s registered (certificate %s)", agent.version, vm.name, thumb)
        if changed:
            # Protected settings encrypted to the old certificate can no longer be read: they
            # are dropped (the backup service sets new ones with every backup).
            for ext in vm.extensions:
                if ext.protected_settings:
                    ext.protected_settings = None
                    ext.instance_view = {"status": "warning", "message": "the VM's certificate "
                                         "changed: set the extension again"}
        return {"thumbprint": thumb, "minimumAgentVersion": ctx.guest.min_agent_version,
                "heartbeatSeconds": ctx.guest.heartbeat_seconds, "pollSeconds": 20}


def authenticate(ctx: Context, headers: dict[str, str], method: str, path_and_query: str,
                 body: bytes) -> str:
    """The vmId of a correctly signed agent request (AgentAuthenticationFailed otherwise)."""
    vm_id = headers.get("x-vmvault-vm-id", "")
    with ctx.catalog.session() as s:
        vm = _vm_by_id(s, vm_id)
        assert vm.agent is not None
        if not vm.agent.certificate:
            raise VmvaultError(AGENT_AUTH_FAILED, reason="the agent has not registered")
        try:
            certificates.verify_request(vm.agent.certificate, headers, method, path_and_query,
                                        body)
        except certificates.CertificateError as exc:
            raise VmvaultError(AGENT_AUTH_FAILED, reason=str(exc)) from exc
    return vm_id


def notify_goal_state() -> None:
    with _goal_state_changed:
        _goal_state_changed.notify_all()


def _goal_state(ctx: Context, vm: VirtualMachine) -> dict[str, Any]:
    thumb = vm.agent.thumbprint if vm.agent else None
    extensions = []
    for ext in vm.extensions:
        handler: dict[str, Any] = {"publicSettings": ext.settings}
        if ext.protected_settings:
            handler.update(protectedSettings=ext.protected_settings,
                           protectedSettingsCertThumbprint=thumb)
        extensions.append({
            "name": ext.name, "publisher": ext.publisher, "type": ext.type,
            "version": ext.version, "state": ext.state, "sequenceNumber": ext.sequence_number,
            "packageUri": f"/vmvault/agent/packages/{ext.publisher}.{ext.type}/{ext.version}",
            "settings": {"runtimeSettings": [{"handlerSettings": handler}]},
        })
    return {"incarnation": vm.incarnation, "vmId": vm.vm_id,
            "minimumAgentVersion": ctx.guest.min_agent_version, "extensions": extensions}


def goal_state(ctx: Context, vm_id: str, incarnation: int | None, wait: float) -> dict[str, Any]:
    """The VM's goal state; with an incarnation the agent already has, wait (long poll) until
    it changes or `wait` seconds pass."""
    deadline = time.monotonic() + min(max(wait, 0.0), MAX_WAIT_SECONDS)
    first = True
    while True:
        with ctx.catalog.session() as s:
            vm = _vm_by_id(s, vm_id)
            if first:  # the agent is heard from when it asks, not while its request waits
                _heard_from(vm.agent)
                first = False
            state = _goal_state(ctx, vm)
        left = deadline - time.monotonic()
        if incarnation is None or state["incarnation"] != incarnation or left <= 0:
            if int(state["incarnation"]) > _delivered.get(vm_id, -1):
                _delivered[vm_id] = int(state["incarnation"])
                _delivered_at[vm_id] = time.monotonic()
            return state
        with _goal_state_changed:
            _goal_state_changed.wait(timeout=min(left, 2.0))


def delivered(vm_id: str) -> int:
    """The newest incarnation the VM's agent has fetched (-1: none since the server started)."""
    return _delivered.get(vm_id, -1)


def seconds_since_delivery(vm_id: str) -> float | None:
    """How long ago the newest incarnation was handed out. An answer to a long poll can go to
    an agent that died while it waited: only a heartbeat after it shows the agent has it."""
    at = _delivered_at.get(vm_id)
    return None if at is None else time.monotonic() - at


def _heard_from(agent: VmAgent | None) -> None:
    if agent is not None:
        agent.last_heartbeat = utcnow()


def report_status(ctx: Context, vm_id: str, body: dict[str, Any]) -> None:
    """A heartbeat with the agent's status and its handlers' statuses."""
    from vmvault.fabric import extensions

    with ctx.catalog.session() as s:
        vm = _vm_by_id(s, vm_id)
        agent = vm.agent
        assert agent is not None
        agent.last_heartbeat = utcnow()
        agent.version = str(body.get("agentVersion") or agent.version)
        agent.status = str(body.get("status") or "Ready")
        agent.message = str(body.get("message") or "")
        load = body.get("load")
        agent.load = load if isinstance(load, dict) else {}
        handlers = body.get("handlers")
        agent.handlers = handlers if isinstance(handlers, list) else []
        extensions.apply_handler_reports(s, vm, agent.handlers)
        shut_down = agent.status == "ShuttingDown" and vm.power_state == "running"
        vm_pk = vm.id
    if shut_down:  # row S2: stopped from inside the guest; the guest's word wins
        from vmvault.fabric import vms

        threading.Thread(target=vms.stopped_by_guest, args=(ctx, vm_pk), daemon=True).start()
    notify_goal_state()


# --- what the backup service asks --------------------------------------------------------------


def check_ready(ctx: Context, vm: VirtualMachine) -> VmAgent:
    """The agent is installed, registered, recent enough and heard from lately (B11, B6, B2)."""
    agent = vm.agent
    if agent is None:
        raise VmvaultError(AGENT_NOT_INSTALLED, name=vm.name)
    if agent.version and parse_version(agent.version) < parse_version(
            ctx.guest.min_agent_version):
        raise VmvaultError(AGENT_TOO_OLD, name=vm.name, version=agent.version,
                           minimum=ctx.guest.min_agent_version)
    if not agent.certificate:
        raise VmvaultError(AGENT_UNREACHABLE, name=vm.name,
                           reason="the agent has never registered with the server")
    age = seconds_since(agent.last_heartbeat)
    if age is None or age > ctx.guest.agent_stale_seconds:
        raise VmvaultError(AGENT_UNREACHABLE, name=vm.name,
                           reason=f"no heartbeat for {age or 0:.0f} s "
                                  f"(limit {ctx.guest.agent_stale_seconds:.0f} s)")
    return agent


def seconds_since(when: dt.datetime | None) -> float | None:
    if when is None:
        return None
    return (utcnow() - when).total_seconds()


def instance_view(ctx: Context, vm: VirtualMachine) -> dict[str, Any]:
    """The agent part of a VM's instance view, az-style."""
    agent = vm.agent
    if agent is None:
        return {"vmAgentVersion": "Unknown", "statuses": [
            {"code": "ProvisioningState/Unavailable", "level": "Warning",
             "displayStatus": "Not Installed", "message": "the VM has no VM agent"}]}
    age = seconds_since(agent.last_heartbeat)
    ready = (agent.status == "Ready" and age is not None
             and age <= ctx.guest.agent_stale_seconds)
    return {
        "vmAgentVersion": agent.version or "Unknown",
        "name": AGENT_NAME,
        "thumbprint": agent.thumbprint,
        "pid": running_pid(ctx, vm),
        "lastHeartbeat": arm.iso(agent.last_heartbeat) if agent.last_heartbeat else None,
        "load": agent.load,
        "statuses": [{
            "code": "ProvisioningState/succeeded" if ready else "ProvisioningState/Unavailable",
            "level": "Info" if ready else "Warning",
            "displayStatus": "Ready" if ready else "Not Ready",
            "message": agent.message if ready else (
                f"no heartbeat for {age:.0f} s" if age is not None else agent.message),
        }],
        "extensionHandlers": agent.handlers,
        "minimumVersion": ctx.guest.min_agent_version,
        "serverVersion": __version__,
    }


def handler_extension(s: Session, vm: VirtualMachine, handler_name: str) -> VmExtension | None:
    for ext in vm.extensions:
        if f"{ext.publisher}.{ext.type}".lower() == handler_name.lower():
            return ext
    return None


LAB_ACTIONS = ("show", "start", "stop", "restart", "install", "uninstall")


def lab_action(ctx: Context, group: str, name: str, action: str) -> dict[str, Any]:
    """Manage a lab VM's agent from outside the guest (a real VM's is managed inside it)."""
    from vmvault.fabric import vms

    if action not in LAB_ACTIONS:
        raise invalid("action", f"'{action}' is not one of {', '.join(LAB_ACTIONS)}")
    with ctx.catalog.session() as s:
        vm = vms.get(s, group, name)
        if action in ("stop", "restart", "uninstall"):
            stop(ctx, vm)
        if action == "uninstall" and vm.agent is not None:
            vm.agent = None
            s.flush()
        if action == "install" and vm.agent is None:
            install(ctx, vm)
            s.flush()
        if action in ("start", "restart", "install"):
            if vm.agent is None:
                raise VmvaultError(AGENT_NOT_INSTALLED, name=vm.name)
            if vm.power_state != "running":
                raise invalid("VM", f"'{vm.name}' is {vm.power_state}; start the VM first")
            start(ctx, vm)
        return instance_view(ctx, vm)


def wait_registered(ctx: Context, group: str, name: str) -> None:
    """A VM created or started a moment ago: give its agent up to the pickup time to register
    (so 'vm create' then 'backup-now' works), without holding a catalog transaction."""
    from vmvault.fabric import vms

    deadline = time.monotonic() + ctx.guest.pickup_seconds
    while time.monotonic() < deadline:
        with ctx.catalog.session() as s:
            vm = vms.find(s, group, name)
            if vm is None or vm.agent is None or vm.agent.certificate:
                return
            if running_pid(ctx, vm) is None:
                return
        time.sleep(0.2)
