"""The vault: an encrypted, deduplicating store of VM disk images (see docs/vault-format.md).

    from vmvault.vault import Repository, DiskSource
    repo = Repository.create(path, key_file=key)
    repo.backup("rp-1", [DiskSource("osdisk", size, snapshot_path)])
    repo.restore_disk("rp-1", "osdisk", target)

Operations lock the vault (shared or exclusive, see lock.py), so backups, restores and
prune may run at the same time from any threads and processes of one host.
"""

from .backup import BackupStats, DiskSource
from .check import CheckReport
from .format import DEFAULT_CHUNK_SIZE, DEFAULT_PACK_SIZE, FORMAT_VERSION
from .keys import KdfParams
from .lock import LockInfo, VaultLock
from .manifest import DiskEntry, Manifest
from .prune import PruneStats
from .repository import Repository

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_PACK_SIZE",
    "FORMAT_VERSION",
    "BackupStats",
    "CheckReport",
    "DiskEntry",
    "DiskSource",
    "KdfParams",
    "LockInfo",
    "Manifest",
    "PruneStats",
    "Repository",
    "VaultLock",
]
