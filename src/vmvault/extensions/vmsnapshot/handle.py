"""The handler's commands (docs/agent-protocol.md section 4; wire spec 1.6 for the flow).

``install``, ``disable``, ``update`` and ``uninstall`` write a success status. ``enable`` runs
the whole backup synchronously (the agent enforces the timeout): read and check the settings,
dedupe the taskId, report "transitioning", upload the partial log, run the pre-scripts, freeze
(the watchdog guarding), snapshot every disk, thaw, run the post-scripts, then write the
status blob, ``status/<N>.status`` and the log blob. Bad input becomes a status with its code
and a message naming the field, never a traceback; the exit code is 0, as Azure's, unless the
handler environment itself is unusable (1).

Environment: ``ConfigSequenceNumber`` (else the newest ``config/*.settings``),
``VMVAULT_GUEST_ROOT`` (default ``/``), ``VMVAULT_MOUNT_ROOT`` (default ``/``),
``http_proxy``/``https_proxy``. Test-only hooks, never set in production:
``VMVAULT_TEST_FROZEN_MARKER`` (a file created once everything is frozen) and
``VMVAULT_TEST_HOLD_FROZEN_SECONDS`` (stay frozen that long before the snapshots).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as dt
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx

from vmvault.extensions.vmsnapshot import VERSION, codes, guestinfo, scripts
from vmvault.extensions.vmsnapshot.blobwriter import BlobWriteError, BlobWriter
from vmvault.extensions.vmsnapshot.freeze import (
    FreezeError,
    Freezer,
    Mount,
    ThawReport,
    VmBackupConfig,
    read_vmbackup_conf,
    select_mounts,
)
from vmvault.extensions.vmsnapshot.log import HandlerLog, log_blob_text
from vmvault.extensions.vmsnapshot.rcu import Expedite
from vmvault.extensions.vmsnapshot.settings import (
    HandlerEnvironment,
    Settings,
    SettingsError,
    find_sequence,
    load_handler_environment,
    read_settings,
    strip_protected_settings,
)
from vmvault.extensions.vmsnapshot.snapshot import (
    DiskSnapshot,
    classify,
    snapshot_disks,
    warm_client,
)
from vmvault.extensions.vmsnapshot.status import (
    Report,
    StorageDetails,
    blob_document,
    file_document,
    write_status_file,
)
from vmvault.extensions.vmsnapshot.watchdog import Watchdog, WatchdogError

COMMANDS = ("install", "enable", "disable", "update", "uninstall")
TASK_IDENTITY_FILE = "task_identity_FD76C85E-406F-4CFA-8EB0-CF18B123365C"
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
SNAPSHOT_MARGIN = 1.0  # seconds kept between the last snapshot call and the freeze bound
HOLD_FROZEN_ENV = "VMVAULT_TEST_HOLD_FROZEN_SECONDS"
FROZEN_MARKER_ENV = "VMVAULT_TEST_FROZEN_MARKER"


class Terminated(BaseException):
    """SIGTERM, SIGINT or SIGHUP: unwind (thawing on the way) and report."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signal.Signals(signum).name)


@dataclass
class Context:
    handler_dir: Path
    env: HandlerEnvironment
    environ: Mapping[str, str]
    log: HandlerLog

    @property
    def guest_root(self) -> Path:
        return Path(self.environ.get("VMVAULT_GUEST_ROOT") or "/")

    @property
    def mount_root(self) -> Path:
        return Path(self.environ.get("VMVAULT_MOUNT_ROOT") or "/")

    @property
    def lib_dir(self) -> Path:
        return self.guest_root / "var/lib/waagent"

    @property
    def etc_azure(self) -> Path:
        return self.guest_root / "etc/azure"


# --- entry point --------------------------------------------------------------------------


def run(command: str, handler_dir: Path, environ: Mapping[str, str]) -> int:
    """Run one handler command; the process exit code."""
    try:
        env = load_handler_environment(handler_dir)
    except SettingsError as exc:
        print(f"vmsnapshot {command}: {exc.message}", file=sys.stderr)
        return 1
    log = HandlerLog(env.log_folder / "extension.log", prefix=f"[{env.name}-{env.version}] ")
    ctx = Context(handler_dir, env, environ, log)
    log.info(f"{command} (vmvault VMSnapshot {VERSION}, pid {os.getpid()}, "
             f"guest root {ctx.guest_root}, mount root {ctx.mount_root})")
    if command == "enable":
        Enable(ctx).run()
    else:
        lifecycle(ctx, command)
    return 0


def lifecycle(ctx: Context, command: str) -> None:
    """install, disable, update, uninstall: nothing to do but a success status."""
    try:
        seq = find_sequence(ctx.env.config_folder, ctx.environ.get("ConfigSequenceNumber"))
    except (SettingsError, OSError):
        seq = None
    operation = command.capitalize()
    report = Report(ctx.env.name, ctx.env.version, "success", codes.SUCCESS_APP_CONSISTENT,
                    f"{operation} succeeded", operation=operation)
    ctx.log.info(f"{operation} succeeded")
    if seq is not None:
        try:
            write_status_file(ctx.env.status_folder, seq,
                              file_document(report, blob_document(report)))
        except OSError as exc:
            ctx.log.warning(f"cannot write the status file: {exc}")


# --- enable -------------------------------------------------------------------------------


@dataclass
class FreezeOutcome:
    snapshots: list[DiskSnapshot] = field(default_factory=list)
    window_ms: int = 0
    freeze_time: dt.datetime | None = None
    thaw_time: dt.datetime | None = None
    snapshot_seconds: float = 0.0
    freeze_ok: bool = False


class Enable:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.log = ctx.log
        self.outcome = codes.Outcome()
        self.settings: Settings | None = None
        self.sequence: int | None = None
        self.telemetry: dict[str, str] = {}
        self.storage = StorageDetails()
        self.machine_id = ""
        self.snapshot_info: list[dict[str, object]] | None = None
        self.freeze_window_ms: int | None = None
        self.nothing_frozen = False
        self.writer = BlobWriter()

    # -- the whole run --

    def run(self) -> None:
        handlers = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                handlers[sig] = signal.signal(sig, _on_signal)
            except ValueError:  # not the main thread: no signal handling
                break
        try:
            self._run()
        except Terminated as exc:
            self._fail_and_report(codes.ERROR, f"the handler was stopped by {exc} before it "
                                               "finished")
        except Exception as exc:  # a bug, not bad input: logged, reported, no traceback
            self.log.error("unexpected error:\n" + traceback.format_exc())
            self._fail_and_report(codes.ERROR, f"unexpected error: {type(exc).__name__}: "
                                               f"{exc}")
        finally:
            self.writer.close()
            for sig, old in handlers.items():
                signal.signal(sig, old)

    def _fail_and_report(self, code: int, message: str) -> None:
        self.outcome.fail(code, message)
        try:
            self.finish()
        except Exception:
            self.log.error("reporting failed:\n" + traceback.format_exc())

    def _run(self) -> None:
        ctx = self.ctx
        try:
            self.sequence = find_sequence(ctx.env.config_folder,
                                          ctx.environ.get("ConfigSequenceNumber"))
        except SettingsError as exc:
            self.log.error(exc.message)
            return
        if self.sequence is None:
            self.log.info(f"no settings file in {ctx.env.config_folder}: nothing to do")
            return
        settings = self.settings = read_settings(ctx.env.config_folder, self.sequence,
                                                 ctx.lib_dir)
        if settings.had_protected and strip_protected_settings(settings.path):
            self.log.info(f"removed protectedSettings from {settings.path.name}")
        self.machine_id = guestinfo.machine_id(ctx.guest_root)
        self._base_telemetry()
        if settings.task_id and settings.task_id == self._last_task_id():
            self._already_processed(settings.task_id)
            return
        if settings.error is not None:
            self.outcome.fail(settings.error.code, "; ".join(e.message for e in settings.errors))
            self.log.error(f"settings refused: {self.outcome.message}")
            self.finish()
            return
        if settings.command == "install":
            self.outcome.messages.append("the install command has nothing to do")
            self.finish()
            return
        self._save_task_id(settings.task_id or "")
        self.report_transitioning()
        self.upload_log()  # the partial log, before anything is frozen
        self.backup()
        self.finish()

    # -- taskId dedupe --

    @property
    def _task_file(self) -> Path:
        return self.ctx.handler_dir / TASK_IDENTITY_FILE

    def _last_task_id(self) -> str | None:
        try:
            return self._task_file.read_text().strip() or None
        except OSError:
            return None

    def _save_task_id(self, task_id: str) -> None:
        try:
            self._task_file.write_text(task_id)
        except OSError as exc:
            self.log.warning(f"cannot record the taskId in {self._task_file}: {exc}")

    def _already_processed(self, task_id: str) -> None:
        """A taskId seen before: no new snapshots; the status blob keeps the first run's
        result, and status/<N>.status is written only if this sequence has none yet."""
        self.outcome.code = self.outcome.ext_error = codes.ALREADY_PROCESSED
        self.outcome.messages.append(f"task {task_id} was processed already: no new snapshot")
        self.log.info(self.outcome.message)
        assert self.sequence is not None
        if not (self.ctx.env.status_folder / f"{self.sequence}.status").exists():
            self.write_status_file(self.make_report("success"), blob_text=None)

    # -- the backup --

    def backup(self) -> None:
        assert self.settings is not None
        conf = read_vmbackup_conf(self.ctx.etc_azure / "vmbackup.conf")
        for warning in conf.warnings:
            self.log.warning(warning)
        mountinfo = Path("/proc/self/mountinfo").read_text()
        mounts = select_mounts(self.ctx.mount_root, conf.mounts_to_skip, mountinfo)
        self._describe_mounts(mounts, mountinfo)
        host = self._load_plugin_host()
        pre = scripts.run_phase(host, "pre", self.log.info) if host else []
        go, freeze = self._continue_after(host, pre)
        if go:
            self.freeze_and_snapshot(mounts if freeze else [], conf)
        else:
            first = next(r for r in pre if not r.ok)
            self.outcome.fail(first.code, f"backup skipped: {first.message}")
        if host:
            ran = [r.plugin for r in pre if r.ran]
            post = scripts.run_phase(host, "post", self.log.info, ran)
            self._settle_scripts(host, pre, post, go)
        elif not self.outcome.failed:
            self.outcome.code = codes.SUCCESS

    def _describe_mounts(self, mounts: list[Mount], mountinfo: str) -> None:
        used, failed = guestinfo.used_bytes(m.mount_point for m in mounts)
        self.storage = StorageDetails(len(mounts), used, failed)
        self.telemetry["networkFSTypePresentInMount"] = str(
            guestinfo.network_fs_present(mountinfo))
        names = ", ".join(f"{m.mount_point} ({m.fs_type})" for m in mounts) or "none"
        self.log.info(f"file systems to freeze, in order: {names}")

    def _load_plugin_host(self) -> scripts.PluginHost | None:
        try:
            host = scripts.load_plugin_host(self.ctx.guest_root)
        except scripts.ScriptsError as exc:
            self.outcome.note_ext_error(exc.code)
            self.outcome.messages.append(f"no pre/post scripts: {exc.message}")
            self.log.warning(exc.message)
            host = None
        enabled = bool(host and host.plugins)
        self.telemetry["prePostEnabled"] = self.telemetry["isPrePostEnabled"] = str(enabled)
        if host and host.plugins:
            self.telemetry["appName"] = ",".join(p.app_name for p in host.plugins if p.app_name)
        return host if enabled else None

    @staticmethod
    def _continue_after(host: scripts.PluginHost | None,
                        pre: list[scripts.ScriptResult]) -> tuple[bool, bool]:
        """(take the snapshots, freeze the file systems) after the pre-scripts."""
        if host is None:
            return True, True
        failed = [r for r in pre if not r.ok]
        go = all(r.plugin.continue_on_failure for r in failed)
        freeze = all(p.fs_freeze for p in host.plugins)
        if not freeze and failed:
            go = False
        return go, freeze

    def _settle_scripts(self, host: scripts.PluginHost, pre: list[scripts.ScriptResult],
                        post: list[scripts.ScriptResult], went: bool) -> None:
        failures = [r for r in pre + post if not r.ok]
        for result in failures:
            self.outcome.note_ext_error(result.code)
            if went:
                self.outcome.messages.append(result.message)
        if self.outcome.failed:
            return
        self.outcome.code = codes.SUCCESS if failures else codes.SUCCESS_APP_CONSISTENT

    # -- freeze, snapshot, thaw --

    def freeze_and_snapshot(self, mounts: list[Mount], conf: VmBackupConfig) -> None:
        assert self.settings is not None
        watchdog = None
        if mounts:
            try:
                watchdog = Watchdog.start(conf.freeze_bound,
                                          self.ctx.env.log_folder / "extension.log")
            except WatchdogError as exc:
                self.outcome.fail(codes.FREEZE_FAILED, f"not freezing: {exc}")
                return
        freezer = Freezer(mounts, watchdog, self.log.info)
        result = FreezeOutcome()
        # Nothing to freeze (no root in the lab, or every mount skipped): the snapshots are
        # crash-consistent, and the status says so rather than claiming file-system consistency.
        self.nothing_frozen = not mounts
        # Outside the freeze window: flush what is dirty (FIFREEZE then has little left to
        # write) and open the connections the snapshot calls will use.
        client = warm_client(self.settings.blob_sas_uris)
        _sync_mounts(mounts)
        _sync_mounts(mounts)  # again: only what was written during the first pass is left
        expedite = self._expedite(conf, watchdog) if mounts else None
        self.log.freeze_start()
        try:
            self._frozen_phase(freezer, conf, result, client)
        finally:
            client.close()
            with _signals_blocked():  # a SIGTERM now waits until everything is thawed
                thaw = freezer.thaw()
                restored = expedite.restore() if expedite else ""
                events = watchdog.finish() if watchdog else []
                self.log.freeze_end()
                if restored:
                    self.log.info(restored)
        self._record_freeze(freezer, thaw, events, result)

    def _expedite(self, conf: VmBackupConfig, watchdog: Watchdog | None) -> Expedite | None:
        """Expedited RCU grace periods for the freeze window (rcu.py), the watchdog told."""
        if not conf.expedite_freeze:
            self.log.info("expediteFreeze = 0 in vmbackup.conf: RCU grace periods left as "
                          "they are")
            return None
        expedite = Expedite.enable()
        self.log.info(expedite.note)
        if expedite.enabled and watchdog is not None:
            with contextlib.suppress(WatchdogError):  # its absence fails the freeze anyway
                watchdog.expedited(expedite.path)
        return expedite

    def _frozen_phase(self, freezer: Freezer, conf: VmBackupConfig, result: FreezeOutcome,
                      client: httpx.Client) -> None:
        assert self.settings is not None
        try:
            freezer.freeze()
        except FreezeError as exc:
            self.outcome.fail(exc.code, exc.message)
            return
        result.freeze_ok = True
        _test_hooks(self.ctx.environ)
        deadline = None
        if freezer.started is not None:
            deadline = freezer.started + conf.freeze_bound - SNAPSHOT_MARGIN
        started = time.monotonic()
        result.snapshots = snapshot_disks(self.settings.blob_sas_uris,
                                          self.settings.backup_metadata, deadline=deadline,
                                          sequential=conf.sequential_snapshots, client=client)
        result.snapshot_seconds = time.monotonic() - started

    def _record_freeze(self, freezer: Freezer, thaw: ThawReport, events: list[dict[str, object]],
                       result: FreezeOutcome) -> None:
        self.freeze_window_ms = freezer.window_ms
        self.telemetry["FreezeTime"] = _telemetry_time(freezer.freeze_time)
        self.telemetry["ThawTime"] = _telemetry_time(freezer.thaw_time)
        self.telemetry["FreezeWindowMs"] = str(freezer.window_ms)
        self.log.info(f"freeze window {freezer.window_ms} ms")
        for event in events:
            self.log.warning(f"watchdog: {event}")
        if not result.freeze_ok:
            return
        self.telemetry["snapshotCreator"] = "guestExtension"
        self.telemetry["snapshotTimeTaken"] = str(dt.timedelta(seconds=result.snapshot_seconds))
        self.snapshot_info = [s.to_status() for s in result.snapshots]
        for snap in result.snapshots:
            self.log.info(f"snapshot of {snap.blob_uri}: "
                          f"{snap.snapshot_uri if snap.is_successful else snap.describe()}")
        failure = classify(result.snapshots)
        if failure:
            run_result, ext_error, message = failure
            self.outcome.fail(run_result, message, ext_error)
        if not thaw.consistent:
            self.outcome.fail(codes.ERROR, _inconsistency(thaw))

    # -- reporting --

    def _base_telemetry(self) -> None:
        root = self.ctx.guest_root
        self.telemetry.update({
            "guestAgentVersion": guestinfo.agent_version(root),
            "extensionVersion": VERSION,
            "osVersion": guestinfo.os_version(root),
            "kernelVersion": guestinfo.kernel_version(),
            "pythonVersion": platform.python_version(),
            "platformArchitecture": platform.machine(),
            "workloads": "",
        })

    def make_report(self, status: str | None = None, code: int | None = None,
                    message: str | None = None) -> Report:
        settings = self.settings
        final_code = self.outcome.code if code is None else code
        if status is None:
            status = "success" if codes.is_success(final_code) else "error"
        return Report(
            name=self.ctx.env.name, version=self.ctx.env.version, status=status,
            code=final_code, message=message if message is not None else self._message(),
            ext_error=self.outcome.ext_error,
            task_id=settings.task_id if settings else None,
            command_start_ticks=settings.start_ticks_text if settings else None,
            vm_type=settings.vm_type if settings else None,
            telemetry=dict(self.telemetry), snapshot_info=self.snapshot_info,
            storage=self.storage, unique_machine_id=self.machine_id,
            freeze_window_ms=self.freeze_window_ms,
            crash_consistent=self.nothing_frozen
            and final_code == codes.SUCCESS)

    def _message(self) -> str:
        if self.outcome.failed or self.outcome.code == codes.ALREADY_PROCESSED:
            return self.outcome.message or codes.name(self.outcome.code)
        if self.snapshot_info is None:
            base = "done"
        elif self.outcome.code == codes.SUCCESS_APP_CONSISTENT:
            base = "the snapshots are application consistent (pre/post scripts and freeze)"
        else:
            base = "the snapshots are file-system consistent"
        return "; ".join([base, *self.outcome.messages])

    def report_transitioning(self) -> None:
        report = self.make_report("transitioning", codes.TRANSITIONING,
                                  "Transitioning state in extension")
        blob_text = blob_document(report)
        self.upload_status(blob_text)
        self.write_status_file(report, blob_text)

    def finish(self) -> None:
        """The final status blob, status/<N>.status and the log blob."""
        report = self.make_report()
        self.log.info(f"result: code {report.code} ({codes.name(report.code)}), ExtErrorCode "
                      f"{report.ext_error}: {report.message}")
        blob_text = blob_document(report)
        if not self.upload_status(blob_text):
            self.telemetry["statusBlobUploadError"] = "true"
            report = self.make_report()
        self.write_status_file(report, blob_text)
        self.upload_log()
        with contextlib.suppress(OSError):
            print(f"enable: code {report.code} ({codes.name(report.code)}): {report.message}")

    def upload_status(self, blob_text: str) -> bool:
        uri = self.settings.status_blob_uri if self.settings else None
        if not uri:
            return True
        try:
            self.writer.write(uri, blob_text)
            return True
        except BlobWriteError as exc:
            self.log.error(f"status blob upload failed: {exc}")
            return False

    def upload_log(self) -> None:
        uri = self.settings.logs_blob_uri if self.settings else None
        if not uri:
            return
        text = log_blob_text(self.telemetry.get("guestAgentVersion", "Unknown"),
                             self.telemetry.get("osVersion", "Unknown"), self.log,
                             self.ctx.env.log_folder / "shell.log")
        try:
            self.writer.write(uri, text)
        except BlobWriteError as exc:
            self.log.error(f"log blob upload failed: {exc}")

    def write_status_file(self, report: Report, blob_text: str | None) -> None:
        if self.sequence is None:
            return
        text = file_document(report, blob_text if blob_text is not None else
                             blob_document(report))
        try:
            write_status_file(self.ctx.env.status_folder, self.sequence, text)
        except OSError as exc:
            self.log.error(f"cannot write the status file: {exc}")


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    stopping = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _inconsistency(thaw: ThawReport) -> str:
    parts = []
    if thaw.not_frozen:
        parts.append(f"{', '.join(thaw.not_frozen)} thawed before the snapshots ended (the "
                     "watchdog's freeze bound elapsed, or another tool thawed it)")
    parts += thaw.problems
    return "the snapshots are not consistent: " + "; ".join(parts)


def _telemetry_time(when: dt.datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S.%f") if when else ""


def _sync_mounts(mounts: list[Mount]) -> None:
    """syncfs() the file systems about to be frozen, together (errors are left to the
    freeze)."""
    def sync(mount: Mount) -> None:
        try:
            fd = os.open(mount.mount_point, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            _libc.syncfs(fd)
        finally:
            os.close(fd)

    if len(mounts) < 2:
        for mount in mounts:
            sync(mount)
        return
    with ThreadPoolExecutor(len(mounts), thread_name_prefix="syncfs") as pool:
        list(pool.map(sync, mounts))


def _test_hooks(environ: Mapping[str, str]) -> None:
    """Test-only: mark that everything is frozen, and stay frozen a while."""
    marker = environ.get(FROZEN_MARKER_ENV)
    if marker:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT, 0o644)
        os.close(fd)
    hold = environ.get(HOLD_FROZEN_ENV)
    if hold:
        with contextlib.suppress(ValueError):
            time.sleep(max(float(hold), 0.0))
