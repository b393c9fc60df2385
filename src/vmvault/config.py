"""Where vmvault keeps its state, and on which ports it listens.

Everything lives under one folder, ``$VMVAULT_HOME`` (default ``~/.vmvault``)::

    vmvault.db        the catalog (SQLite)
    stack.json        ports and pids of the running stack (written by 'vmvault up')
    pool/             the local disk store (an XFS loop mount when root on ext4)
    pool.img          the XFS image behind pool/, when one was made
    vaults/<id>/      vault repositories (the local vault backend)
    keys/<vault>.key  key files that open the vaults' master keys
    vms/<rg>/<vm>/    lab guests: mount points of their disks
    logs/             server, worker and Blob endpoint logs
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SUBSCRIPTION_ID = "00000000-0000-0000-0000-000000000000"
DEFAULT_API_PORT = 47080
DEFAULT_BLOB_PORT = 47081


def home() -> Path:
    value = os.environ.get("VMVAULT_HOME")
    path = Path(value) if value else Path.home() / ".vmvault"
    return path.expanduser().resolve()


@dataclass
class Paths:
    root: Path

    @property
    def db(self) -> Path:
        return self.root / "vmvault.db"

    @property
    def stack_file(self) -> Path:
        return self.root / "stack.json"

    @property
    def pool(self) -> Path:
        return self.root / "pool"

    @property
    def pool_image(self) -> Path:
        return self.root / "pool.img"

    @property
    def vaults(self) -> Path:
        return self.root / "vaults"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def vms(self) -> Path:
        return self.root / "vms"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def ensure(self) -> Paths:
        for p in (self.root, self.pool, self.vaults, self.keys, self.vms, self.logs):
            p.mkdir(parents=True, exist_ok=True)
        os.chmod(self.keys, 0o700)
        return self


def paths() -> Paths:
    return Paths(home())


@dataclass
class StackInfo:
    """What 'vmvault up' started: read by the CLI to find the server."""

    api_url: str
    blob_url: str
    server_pid: int = 0
    blob_pid: int = 0
    pool: dict[str, object] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> StackInfo | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return cls(**data)


def api_url() -> str:
    """The server's URL: $VMVAULT_API_URL, else what 'vmvault up' recorded, else the default."""
    env = os.environ.get("VMVAULT_API_URL")
    if env:
        return env.rstrip("/")
    info = StackInfo.load(paths().stack_file)
    if info:
        return info.api_url
    return f"http://127.0.0.1:{DEFAULT_API_PORT}"


def is_root() -> bool:
    return os.geteuid() == 0


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    try:
        return float(value) if value else default
    except ValueError:
        return default


@dataclass(frozen=True)
class GuestSettings:
    """How the server deals with VM agents; each can be set by an environment variable of the
    server ('vmvault up' passes its own environment on)."""

    min_agent_version: str = "0.1.0"  # VMVAULT_MIN_AGENT_VERSION
    agent_stale_seconds: float = 60.0  # VMVAULT_AGENT_STALE_SECONDS: no heartbeat -> B2
    pickup_seconds: float = 120.0  # VMVAULT_AGENT_PICKUP_SECONDS: goal state not taken -> B5
    snapshot_seconds: float = 900.0  # VMVAULT_SNAPSHOT_SECONDS: the extension's whole run
    sas_ttl_seconds: float = 7200.0  # VMVAULT_SAS_TTL_SECONDS: life of the disks' SAS URIs
    load_limit_percent: float = 90.0  # VMVAULT_GUEST_LOAD_LIMIT: above it, snapshots wait (S4)
    heartbeat_seconds: float = 2.0  # VMVAULT_AGENT_HEARTBEAT_SECONDS, told to lab agents
    agent_stop_seconds: float = 20.0  # VMVAULT_AGENT_STOP_SECONDS: SIGTERM, then SIGKILL
    # VMVAULT_VMSNAPSHOT_PACKAGE: a handler package (zip, or a folder holding
    # HandlerManifest.json) delivered as Microsoft.RecoveryServices.VMSnapshot instead of
    # vmvault's own, e.g. Azure's VMBackup extension (docs/agent-protocol.md, section 9).
    vmsnapshot_package: str | None = None

    @classmethod
    def from_env(cls) -> GuestSettings:
        d = cls()
        return cls(
            min_agent_version=os.environ.get("VMVAULT_MIN_AGENT_VERSION") or d.min_agent_version,
            agent_stale_seconds=_env_float("VMVAULT_AGENT_STALE_SECONDS", d.agent_stale_seconds),
            pickup_seconds=_env_float("VMVAULT_AGENT_PICKUP_SECONDS", d.pickup_seconds),
            snapshot_seconds=_env_float("VMVAULT_SNAPSHOT_SECONDS", d.snapshot_seconds),
            sas_ttl_seconds=_env_float("VMVAULT_SAS_TTL_SECONDS", d.sas_ttl_seconds),
            load_limit_percent=_env_float("VMVAULT_GUEST_LOAD_LIMIT", d.load_limit_percent),
            heartbeat_seconds=_env_float("VMVAULT_AGENT_HEARTBEAT_SECONDS", d.heartbeat_seconds),
            agent_stop_seconds=_env_float("VMVAULT_AGENT_STOP_SECONDS", d.agent_stop_seconds),
            vmsnapshot_package=os.environ.get("VMVAULT_VMSNAPSHOT_PACKAGE") or None,
        )


def _setting(default: float, env: str, doc: str) -> Any:
    return field(default=default, metadata={"env": env, "doc": doc})


@dataclass(frozen=True)
class ServiceSettings:
    """The scheduler's and the jobs' limits, each set by an environment variable of the server
    (listed in docs/errors.md, which is generated from these fields)."""

    transfer_retries: float = _setting(
        3, "VMVAULT_TRANSFER_RETRIES", "retries of a transient transfer failure (B9, B10)")
    retry_backoff_seconds: float = _setting(
        30, "VMVAULT_RETRY_BACKOFF_SECONDS", "first wait before a retry; doubles each time")
    transfer_timeout_seconds: float = _setting(
        86400, "VMVAULT_TRANSFER_TIMEOUT_SECONDS", "one transfer attempt's limit (B9)")
    backup_warn_seconds: float = _setting(
        43200, "VMVAULT_BACKUP_WARN_SECONDS", "a backup running longer gets a warning")
    restore_warn_seconds: float = _setting(
        21600, "VMVAULT_RESTORE_WARN_SECONDS", "a restore running longer gets a warning")
    cancel_wait_seconds: float = _setting(
        30, "VMVAULT_CANCEL_WAIT_SECONDS", "how long 'job stop' waits for a checkpoint (J4)")
    schedule_policies: float = _setting(
        1, "VMVAULT_SCHEDULE_POLICIES", "1: policies fire at their times; 0: on-demand only")
    scheduler_tick_seconds: float = _setting(
        1, "VMVAULT_SCHEDULER_TICK_SECONDS", "how often the scheduler looks at the clock")
    late_seconds: float = _setting(
        600, "VMVAULT_SCHEDULER_LATE_SECONDS",
        "a slot found later than this after its time is a missed slot (catch-up run)")
    group_concurrency: float = _setting(
        5, "VMVAULT_GROUP_CONCURRENCY", "scheduled backups of one resource group at once (S3)")
    retention_interval_seconds: float = _setting(
        60, "VMVAULT_RETENTION_SECONDS", "how often expired recovery points are removed")

    @classmethod
    def from_env(cls) -> ServiceSettings:
        return cls(**{f.name: _env_float(f.metadata["env"], float(f.default))  # type: ignore[arg-type]
                      for f in fields(cls)})
