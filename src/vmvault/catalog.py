"""The catalog: vmvault's database of Azure resources and backup state.

SQLAlchemy 2 models, one per Azure concept, migrated with Alembic. SQLite by
default (a file in $VMVAULT_HOME); any SQLAlchemy URL through $VMVAULT_DB_URL.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
)
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from vmvault import clock


def utcnow() -> dt.datetime:
    """The service's now (vmvault.clock), in UTC, naive: the catalog stores UTC times
    without a zone."""
    return clock.utcnow()


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ResourceGroup(Base):
    __tablename__ = "resource_groups"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(90), unique=True)
    location: Mapped[str] = mapped_column(String(64))
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)


class StorageAccount(Base):
    __tablename__ = "storage_accounts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(24), unique=True)  # globally unique, as in Azure
    group_id: Mapped[int] = mapped_column(ForeignKey("resource_groups.id"))
    location: Mapped[str] = mapped_column(String(64))
    sku: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(32), default="StorageV2")
    capacity_bytes: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    group: Mapped[ResourceGroup] = relationship()


class VirtualMachine(Base):
    __tablename__ = "virtual_machines"
    __table_args__ = (UniqueConstraint("group_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[str] = mapped_column(String(36), default=new_id)  # Azure's vmId
    name: Mapped[str] = mapped_column(String(64))
    group_id: Mapped[int] = mapped_column(ForeignKey("resource_groups.id"))
    location: Mapped[str] = mapped_column(String(64))
    storage_account_id: Mapped[int] = mapped_column(ForeignKey("storage_accounts.id"))
    size: Mapped[str] = mapped_column(String(32), default="Standard_B2s")
    power_state: Mapped[str] = mapped_column(String(32), default="running")
    provisioning_state: Mapped[str] = mapped_column(String(32), default="Succeeded")
    runtime: Mapped[str] = mapped_column(String(16), default="lab")
    mounted: Mapped[bool] = mapped_column(default=False)
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # The goal state's incarnation: bumped whenever the VM's extensions change.
    incarnation: Mapped[int] = mapped_column(Integer, default=0)
    group: Mapped[ResourceGroup] = relationship()
    storage_account: Mapped[StorageAccount] = relationship()
    disks: Mapped[list[Disk]] = relationship(
        back_populates="vm", order_by="Disk.lun", cascade="all, delete-orphan"
    )
    agent: Mapped[VmAgent | None] = relationship(
        back_populates="vm", cascade="all, delete-orphan", uselist=False
    )
    extensions: Mapped[list[VmExtension]] = relationship(
        back_populates="vm", order_by="VmExtension.name", cascade="all, delete-orphan"
    )


class VmAgent(Base):
    """The VM agent (vmvault-agent) of one VM: its registration and what it last reported."""

    __tablename__ = "vm_agents"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("virtual_machines.id"), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64))  # SHA-256 of the registration token
    certificate: Mapped[str | None] = mapped_column(Text, default=None)  # PEM
    thumbprint: Mapped[str | None] = mapped_column(String(40), default=None)
    version: Mapped[str | None] = mapped_column(String(32), default=None)
    status: Mapped[str] = mapped_column(String(32), default="NotReady")
    message: Mapped[str] = mapped_column(Text, default="")
    registered: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    last_heartbeat: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    load: Mapped[dict[str, Any]] = mapped_column(default=dict)
    handlers: Mapped[list[Any]] = mapped_column(default=list)  # last reported handler statuses
    vm: Mapped[VirtualMachine] = relationship(back_populates="agent")


class VmExtension(Base):
    """An extension in a VM's goal state (Microsoft.Compute/virtualMachines/extensions)."""

    __tablename__ = "vm_extensions"
    __table_args__ = (UniqueConstraint("vm_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("virtual_machines.id"))
    name: Mapped[str] = mapped_column(String(64))
    publisher: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(32))  # typeHandlerVersion
    auto_upgrade_minor_version: Mapped[bool] = mapped_column(default=True)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)  # public settings
    # Protected settings, as base64 CMS encrypted to the VM's certificate: only the guest
    # can read them.
    protected_settings: Mapped[str | None] = mapped_column(Text, default=None)
    sequence_number: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default="enabled")  # enabled|disabled|uninstall
    provisioning_state: Mapped[str] = mapped_column(String(32), default="Creating")
    # The handler's last status for this sequence number, as the agent reported it.
    instance_view: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    vm: Mapped[VirtualMachine] = relationship(back_populates="extensions")


class Disk(Base):
    __tablename__ = "disks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("virtual_machines.id"))
    name: Mapped[str] = mapped_column(String(80))  # "osdisk" or "datadisk-<lun>"
    lun: Mapped[int] = mapped_column(Integer)  # -1 for the OS disk
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    fs_type: Mapped[str] = mapped_column(String(16))
    container: Mapped[str] = mapped_column(String(63), default="vhds")
    blob: Mapped[str] = mapped_column(String(255))
    loop_device: Mapped[str | None] = mapped_column(String(32), default=None)
    mount_point: Mapped[str | None] = mapped_column(String(512), default=None)
    vm: Mapped[VirtualMachine] = relationship(back_populates="disks")


class Vault(Base):
    __tablename__ = "vaults"
    __table_args__ = (UniqueConstraint("group_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vault_id: Mapped[str] = mapped_column(String(36), default=new_id)
    name: Mapped[str] = mapped_column(String(50))
    group_id: Mapped[int] = mapped_column(ForeignKey("resource_groups.id"))
    location: Mapped[str] = mapped_column(String(64))
    repo_path: Mapped[str] = mapped_column(String(1024))
    key_file: Mapped[str | None] = mapped_column(String(1024), default=None)
    chunk_size: Mapped[int] = mapped_column(Integer)
    storage_redundancy: Mapped[str] = mapped_column(String(32), default="LocallyRedundant")
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    group: Mapped[ResourceGroup] = relationship()


class Policy(Base):
    __tablename__ = "policies"
    __table_args__ = (UniqueConstraint("vault_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vault_id: Mapped[int] = mapped_column(ForeignKey("vaults.id"))
    name: Mapped[str] = mapped_column(String(150))
    properties: Mapped[dict[str, Any]] = mapped_column()  # Azure's AzureIaasVM policy JSON
    vault: Mapped[Vault] = relationship()


class ProtectedItem(Base):
    __tablename__ = "protected_items"
    __table_args__ = (UniqueConstraint("vault_id", "vm_group", "vm_name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vault_id: Mapped[int] = mapped_column(ForeignKey("vaults.id"))
    policy_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id"), default=None)
    # The VM is named, not linked: the item outlives a deleted VM (rows B1, B7).
    vm_group: Mapped[str] = mapped_column(String(90))
    vm_name: Mapped[str] = mapped_column(String(64))
    source_vm_id: Mapped[str] = mapped_column(String(36))
    protection_state: Mapped[str] = mapped_column(String(32), default="IRPending")
    protection_status: Mapped[str] = mapped_column(String(32), default="Healthy")
    last_backup_status: Mapped[str | None] = mapped_column(String(32), default=None)
    last_backup_time: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    # Snapshot ids (per disk) of the last snapshot backed up: the base of the next incremental.
    last_snapshots: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The scheduler's cursor: slots at or before it are handled (a job exists, or the item
    # was not protected then). Set when protection starts or resumes.
    schedule_cursor: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    vault: Mapped[Vault] = relationship()
    policy: Mapped[Policy | None] = relationship()


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("item_id", "slot", name="uq_jobs_item_slot"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(36), default=new_id, unique=True)
    vault_id: Mapped[int] = mapped_column(ForeignKey("vaults.id"))
    item_id: Mapped[int | None] = mapped_column(ForeignKey("protected_items.id"), default=None)
    operation: Mapped[str] = mapped_column(String(32))  # Backup, Restore, ConfigureBackup, ...
    status: Mapped[str] = mapped_column(String(32), default="InProgress")
    entity_friendly_name: Mapped[str] = mapped_column(String(128), default="")
    start_time: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    end_time: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    # The job's input (retain-until, recovery point, target...) and what it produced.
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    sub_tasks: Mapped[list[Any]] = mapped_column(default=list)
    error_details: Mapped[list[Any]] = mapped_column(default=list)
    progress_percent: Mapped[int] = mapped_column(Integer, default=0)
    # A scheduled backup's slot ("Policy@2026-11-23T20:30:00Z"): one job per item and slot.
    slot: Mapped[str | None] = mapped_column(String(200), default=None)
    vault: Mapped[Vault] = relationship()
    item: Mapped[ProtectedItem | None] = relationship()


class RecoveryPoint(Base):
    __tablename__ = "recovery_points"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)  # the RP id (also its manifest name)
    item_id: Mapped[int] = mapped_column(ForeignKey("protected_items.id"))
    job_id: Mapped[str] = mapped_column(String(36))
    time: Mapped[dt.datetime] = mapped_column(DateTime)
    consistency: Mapped[str] = mapped_column(String(32))  # CrashConsistent, AppConsistent, ...
    tier: Mapped[str] = mapped_column(String(32), default="Vault")
    kind: Mapped[str] = mapped_column(String(16), default="OnDemand")  # or Scheduled
    # The retention schedules that keep a scheduled point (Daily, Weekly, Monthly, Yearly).
    retention_tags: Mapped[list[Any]] = mapped_column(default=list)
    expiry: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    # Per disk: name, lun, size, snapshot id (while the snapshot tier holds it).
    disks: Mapped[list[Any]] = mapped_column(default=list)
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    item: Mapped[ProtectedItem] = relationship()


# --- engine and sessions -------------------------------------------------------------------------


def database_url(db_path: Path) -> str:
    return os.environ.get("VMVAULT_DB_URL") or f"sqlite:///{db_path}"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @sa_event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def migrate(url: str) -> None:
    """Bring the schema to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, "head")


class Catalog:
    """The database, opened and migrated."""

    def __init__(self, url: str) -> None:
        self.url = url
        migrate(url)
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s
