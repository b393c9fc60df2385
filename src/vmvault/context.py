"""What every service function needs: the catalog, the disk store, where things are."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vmvault.catalog import Catalog, database_url
from vmvault.config import GuestSettings, Paths, ServiceSettings
from vmvault.storage.diskstore import DiskStore
from vmvault.storage.pool import PoolInfo, ensure_pool


@dataclass
class Context:
    paths: Paths
    catalog: Catalog
    store: DiskStore
    pool: PoolInfo
    blob_url: str  # base URL of the Blob endpoint, e.g. http://127.0.0.1:47081
    api_url: str = ""  # the server's own URL, told to the VM agents
    guest: GuestSettings = field(default_factory=GuestSettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)

    @classmethod
    def open(cls, paths: Paths, blob_url: str, pool: PoolInfo | None = None,
             api_url: str = "") -> Context:
        paths.ensure()
        pool = pool or ensure_pool(paths)
        catalog = Catalog(database_url(paths.db))
        return cls(paths, catalog, DiskStore(pool.path), pool, blob_url.rstrip("/"),
                   api_url.rstrip("/"), GuestSettings.from_env(), ServiceSettings.from_env())

    def vm_folder(self, group: str, vm: str) -> Path:
        return self.paths.vms / group / vm
