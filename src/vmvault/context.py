"""What every service function needs: the catalog, the disk store, where things are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmvault.catalog import Catalog, database_url
from vmvault.config import Paths
from vmvault.storage.diskstore import DiskStore
from vmvault.storage.pool import PoolInfo, ensure_pool


@dataclass
class Context:
    paths: Paths
    catalog: Catalog
    store: DiskStore
    pool: PoolInfo
    blob_url: str  # base URL of the Blob endpoint, e.g. http://127.0.0.1:47081

    @classmethod
    def open(cls, paths: Paths, blob_url: str, pool: PoolInfo | None = None) -> Context:
        paths.ensure()
        pool = pool or ensure_pool(paths)
        catalog = Catalog(database_url(paths.db))
        return cls(paths, catalog, DiskStore(pool.path), pool, blob_url.rstrip("/"))

    def vm_folder(self, group: str, vm: str) -> Path:
        return self.paths.vms / group / vm
