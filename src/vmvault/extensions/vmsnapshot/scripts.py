"""Pre- and post-scripts: Azure's PluginHost and ScriptRunner (wire spec section 6).

``<guest root>/etc/azure/VMSnapshotPluginHost.conf`` (INI ``[pre_post]``: timeoutInSeconds,
numberOfPlugins, pluginName<i>, pluginPath<i>, pluginConfigPath<i>) names plugin configs
(JSON: preScriptLocation, postScriptLocation, preScriptParams, postScriptParams,
preScriptNoOfRetries, postScriptNoOfRetries, timeoutInSeconds, continueBackupOnFailure,
fsFreezeEnabled, appName). Only the ScriptRunner plugin exists; nothing is imported from
pluginPath. Paths in these files are the guest's: they are taken under the guest root
(which is ``/`` in a real VM). Files must be root's and closed to group and others, or
they are refused:

* the host config: group and other digits 0 or 4, owner root (else 314);
* a plugin config: no owner execute, group and other 0 (e.g. 600), owner root (else 317);
* a script: a regular file, group and other 0 (e.g. 700), owner root (else 306/307).

vmvault's differences: a script past its timeout is killed with its process group (SIGTERM,
then SIGKILL) and reported 308/309; ``*NoOfRetries`` really re-runs a failed script.
"""

from __future__ import annotations

import configparser
import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmvault.extensions.vmsnapshot import codes

HOST_CONFIG = "etc/azure/VMSnapshotPluginHost.conf"
MAX_TIMEOUT = 1800.0
DEFAULT_SCRIPT_TIMEOUT = 10.0
KILL_GRACE = 2.0
OUTPUT_TAIL = 2000

_PHASE_CODES = {
    "pre": {"failed": codes.PRE_SCRIPT_FAILED, "not_found": codes.PRE_SCRIPT_NOT_FOUND,
            "permission": codes.PRE_SCRIPT_PERMISSION, "timeout": codes.PRE_SCRIPT_TIMEOUT,
            "host_timeout": codes.PLUGIN_HOST_PRE_TIMEOUT},
    "post": {"failed": codes.POST_SCRIPT_FAILED, "not_found": codes.POST_SCRIPT_NOT_FOUND,
             "permission": codes.POST_SCRIPT_PERMISSION, "timeout": codes.POST_SCRIPT_TIMEOUT,
             "host_timeout": codes.PLUGIN_HOST_POST_TIMEOUT},
}


class ScriptsError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Plugin:
    config_path: Path
    pre_script: Path
    post_script: Path
    pre_params: list[str] = field(default_factory=list)
    post_params: list[str] = field(default_factory=list)
    pre_retries: int = 0
    post_retries: int = 0
    timeout: float = DEFAULT_SCRIPT_TIMEOUT
    continue_on_failure: bool = True
    fs_freeze: bool = True
    app_name: str = ""

    def script(self, phase: str) -> tuple[Path, list[str], int]:
        if phase == "pre":
            return self.pre_script, self.pre_params, self.pre_retries
        return self.post_script, self.post_params, self.post_retries


@dataclass
class PluginHost:
    timeout: float
    plugins: list[Plugin]


@dataclass
class ScriptResult:
    plugin: Plugin
    phase: str
    code: int  # 0 success, else the error code
    message: str
    ran: bool = False

    @property
    def ok(self) -> bool:
        return self.code == 0


# --- permission checks ------------------------------------------------------------------


def _mode_digits(st: os.stat_result) -> tuple[int, int, int]:
    mode = stat.S_IMODE(st.st_mode)
    return (mode >> 6) & 7, (mode >> 3) & 7, mode & 7


def _check_file(path: Path, code: int, what: str,
                allowed: Callable[[int, int, int], bool], rule: str) -> None:
    st = path.stat()
    owner, group, other = _mode_digits(st)
    if st.st_uid != 0:
        raise ScriptsError(code, f"{what} {path} is refused: it is owned by uid {st.st_uid}, "
                                 "not root")
    if not allowed(owner, group, other):
        raise ScriptsError(code, f"{what} {path} is refused: mode "
                                 f"{stat.S_IMODE(st.st_mode):03o}, {rule}")


# --- configuration ------------------------------------------------------------------------


def load_plugin_host(guest_root: Path) -> PluginHost | None:
    """The plugin host config and its plugins; None when there is no host config."""
    path = guest_root / HOST_CONFIG
    if not path.exists():
        return None
    _check_file(path, codes.PLUGIN_HOST_CONFIG_PERMISSION, "the plugin host config",
                lambda o, g, t: g in (0, 4) and t in (0, 4),
                "group and others may at most read it (e.g. 644)")
    parser = configparser.RawConfigParser()
    try:
        parser.read(path)
        section = parser["pre_post"]
        timeout = min(float(section.get("timeoutInSeconds", str(MAX_TIMEOUT))), MAX_TIMEOUT)
        count = int(section.get("numberOfPlugins", "0"))
        entries = [(section.get(f"pluginName{i}", ""), section.get(f"pluginConfigPath{i}", ""))
                   for i in range(count)]
    except (configparser.Error, KeyError, ValueError, UnicodeDecodeError) as exc:
        raise ScriptsError(codes.PLUGIN_HOST_CONFIG_PARSING,
                           f"the plugin host config {path} is not valid: {exc}") from None
    if timeout <= 0 or count < 0:
        raise ScriptsError(codes.PLUGIN_HOST_CONFIG_PARSING,
                           f"the plugin host config {path}: timeoutInSeconds and "
                           "numberOfPlugins must be positive")
    plugins = [_load_plugin(guest_root, path, i, name, config, timeout)
               for i, (name, config) in enumerate(entries)]
    return PluginHost(timeout, plugins)


def guest_path(guest_root: Path, text: str) -> Path:
    """A path as the guest names it, under the guest root."""
    return guest_root / text.lstrip("/")


def _load_plugin(guest_root: Path, host_path: Path, index: int, name: str, config: str,
                 host_timeout: float) -> Plugin:
    if name != "ScriptRunner":
        raise ScriptsError(codes.PLUGIN_HOST_CONFIG_PARSING,
                           f"{host_path}: pluginName{index} {name!r} is not a known plugin "
                           "(only ScriptRunner)")
    if not config:
        raise ScriptsError(codes.PLUGIN_HOST_CONFIG_PARSING,
                           f"{host_path}: pluginConfigPath{index} is missing")
    path = guest_path(guest_root, config)
    if not path.is_file():
        raise ScriptsError(codes.PLUGIN_CONFIG_NOT_FOUND,
                           f"the plugin config {path} (pluginConfigPath{index}) does not exist")
    _check_file(path, codes.PLUGIN_CONFIG_PERMISSION, "the plugin config",
                lambda o, g, t: o % 2 == 0 and g == 0 and t == 0,
                "it must be readable by root only (e.g. 600)")
    try:
        doc = json.loads(path.read_text())
        return _plugin_from_json(guest_root, path, doc, host_timeout)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise ScriptsError(codes.PLUGIN_CONFIG_PARSING,
                           f"the plugin config {path} is not valid: {exc}") from None


def _str_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str | int | float) for v in value):
        raise ValueError(f"{name} must be a list of strings")
    return [str(v) for v in value]


def _plugin_from_json(guest_root: Path, path: Path, doc: Any, host_timeout: float
                      ) -> Plugin:
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    for key in ("preScriptLocation", "postScriptLocation"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise KeyError(key)
    timeout = float(doc.get("timeoutInSeconds", DEFAULT_SCRIPT_TIMEOUT))
    if timeout <= 0:
        raise ValueError("timeoutInSeconds must be positive")
    return Plugin(
        config_path=path,
        pre_script=guest_path(guest_root, doc["preScriptLocation"]),
        post_script=guest_path(guest_root, doc["postScriptLocation"]),
        pre_params=_str_list(doc.get("preScriptParams"), "preScriptParams"),
        post_params=_str_list(doc.get("postScriptParams"), "postScriptParams"),
        pre_retries=max(0, int(doc.get("preScriptNoOfRetries", 0))),
        post_retries=max(0, int(doc.get("postScriptNoOfRetries", 0))),
        timeout=min(timeout, host_timeout),
        continue_on_failure=bool(doc.get("continueBackupOnFailure", True)),
        fs_freeze=bool(doc.get("fsFreezeEnabled", True)),
        app_name=str(doc.get("appName", "")),
    )


# --- running ------------------------------------------------------------------------------


def run_phase(host: PluginHost, phase: str, log: Callable[[str], None],
              plugins: list[Plugin] | None = None) -> list[ScriptResult]:
    """Run the phase's script of each plugin, in order, within the host's timeout."""
    deadline = time.monotonic() + host.timeout
    results = []
    for plugin in host.plugins if plugins is None else plugins:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            results.append(ScriptResult(plugin, phase, _PHASE_CODES[phase]["host_timeout"],
                                        f"the {phase}-phase ran out of the plugin host's "
                                        f"{host.timeout:g} s before {plugin.config_path}"))
            continue
        result = run_script(plugin, phase, min(plugin.timeout, remaining))
        log(f"{phase}-script {plugin.script(phase)[0]}: {result.message}")
        results.append(result)
    return results


def run_script(plugin: Plugin, phase: str, timeout: float) -> ScriptResult:
    """Check and run one script (``sh <script> <params>``), with its retries."""
    phase_codes = _PHASE_CODES[phase]
    script, params, retries = plugin.script(phase)
    if not script.is_file():
        return ScriptResult(plugin, phase, phase_codes["not_found"],
                            f"the {phase}-script {script} does not exist")
    try:
        _check_file(script, phase_codes["permission"], f"the {phase}-script",
                    lambda o, g, t: g == 0 and t == 0,
                    "group and others must have no access (e.g. 700)")
    except ScriptsError as exc:
        return ScriptResult(plugin, phase, exc.code, exc.message)
    deadline = time.monotonic() + timeout
    for attempt in range(retries + 1):
        code, message = _run(script, params, max(deadline - time.monotonic(), 0.1), phase,
                             phase_codes)
        if code != phase_codes["failed"] or attempt == retries:
            break
    return ScriptResult(plugin, phase, code, message, ran=True)


def _run(script: Path, params: list[str], timeout: float, phase: str,
         phase_codes: dict[str, int]) -> tuple[int, str]:
    try:
        proc = subprocess.Popen(["sh", str(script), *params], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd="/")
    except OSError as exc:
        return phase_codes["failed"], f"the {phase}-script {script} cannot run: {exc}"
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return (phase_codes["timeout"],
                f"the {phase}-script {script} ran past its {_seconds(timeout)} s timeout and "
                "was killed")
    text = out.decode("utf-8", "replace")[-OUTPUT_TAIL:].strip()
    if proc.returncode == 0:
        return 0, f"succeeded{': ' + text if text else ''}"
    return (phase_codes["failed"],
            f"the {phase}-script {script} failed with exit code {proc.returncode}"
            f"{': ' + text if text else ''}")


def _seconds(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.communicate(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        proc.kill()
        proc.wait()
