"""The vault: an encrypted, deduplicating store of VM disk images (see docs/vault-format.md).

    from vmvault.vault import Repository, DiskSource
    repo = Repository.create(path, key_file=key)
    repo.backup("rp-1", [DiskSource("osdisk", size, snapshot_path)])
    repo.restore_disk("rp-1", "osdisk", target)
"""

from .backup import BackupStats, DiskSource
from .check import CheckReport
from .format import DEFAULT_CHUNK_SIZE, DEFAULT_PACK_SIZE, FORMAT_VERSION
from .keys import KdfParams
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
    "Manifest",
    "PruneStats",
    "Repository",
]
