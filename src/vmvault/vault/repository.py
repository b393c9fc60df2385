"""Repository: a vault directory (config, keys/, data/, index/, manifests/, locks/, tmp/).

Every operation takes the vault lock (lock.py) before it touches the vault: shared for
backup, restore, delete_manifest, check, add_key and stats; exclusive for prune and
rebuild_index. Then it takes the object's own RLock, which guards the in-memory index.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vmvault.errors import (
    RESOURCE_EXISTS,
    VAULT_CORRUPT,
    VAULT_FORMAT_UNSUPPORTED,
    VmvaultError,
    invalid,
    not_found,
)

from .backup import BackupStats, DiskSource, run_backup
from .check import CheckReport, manifest_names, run_check, scan_packs
from .chunks import Crypto
from .format import (
    CONFIG_NAME,
    DATA_DIR,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_PACK_SIZE,
    FORMAT_VERSION,
    INDEX_DIR,
    KEYS_DIR,
    LOCKS_DIR,
    MANIFESTS_DIR,
    MIB,
    MIN_PACK_SIZE,
    TMP_DIR,
    ZSTD_LEVEL,
    atomic_write,
    fsync_dir,
    utc_now,
    validate_chunk_size,
    validate_rp_id,
)
from .index import Index, PackList, list_index_files, write_index_file
from .keys import (
    KdfParams,
    MasterKey,
    ensure_key_file,
    key_file_slot,
    password_slot,
    unlock,
    write_slot,
)
from .lock import (
    DEFAULT_EXCLUSIVE_TIMEOUT_S,
    DEFAULT_SHARED_TIMEOUT_S,
    LockInfo,
    VaultLock,
    list_locks,
    remove_stale_locks,
)
from .manifest import Manifest, read_manifest
from .pack import PackError, pack_path, read_trailer
from .prune import DEFAULT_REWRITE_THRESHOLD, PruneStats, run_prune
from .restore import restore_file, restore_to

Progress = Callable[[int, int], None]

ALGORITHMS = {
    "chunk_id": "blake3-keyed-256",
    "compression": "zstd",
    "encryption": "aes-256-gcm",
    "pack_id": "blake3-256",
    "key_slots": "argon2id, hkdf-sha256",
}
INDEX_FLUSH_PACKS = 64  # a backup writes an index file every this many packs (and at the end)


class Repository:
    """An open vault.

    Operations on one vault are coordinated by the vault lock, between Repository objects,
    threads and processes alike; operations on one object also run one at a time.
    `shared_lock_timeout` and `exclusive_lock_timeout` are how long an operation waits for
    the lock by default (each locking method also takes `lock_timeout`).
    """

    def __init__(self, path: Path, config: dict[str, Any], master: MasterKey) -> None:
        self.path = Path(path)
        self.config = config
        self.id: str = config["id"]
        self.chunk_size: int = config["chunk_size"]
        self.pack_size: int = config["pack_size"]
        self.threads = max(2, os.cpu_count() or 2)
        self.index_flush_packs = INDEX_FLUSH_PACKS
        # a regular source file's holes (SEEK_DATA/SEEK_HOLE) are zero chunks, not read
        self.skip_file_holes = True
        self._master = master
        self._crypto = Crypto(master, level=int(config["algorithms"].get("zstd_level", ZSTD_LEVEL)))
        self._index = Index()
        self._lock = threading.RLock()  # this object's state; always taken after the vault lock
        self.shared_lock_timeout = DEFAULT_SHARED_TIMEOUT_S
        self.exclusive_lock_timeout = DEFAULT_EXCLUSIVE_TIMEOUT_S

    # --- create / open -------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: Path,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        key_file: Path | None = None,
        password: str | None = None,
        pack_size: int = DEFAULT_PACK_SIZE,
        kdf: KdfParams | None = None,
    ) -> Repository:
        """Create a vault in `path` (absent or an empty folder); at least one key slot."""
        path = Path(path)
        validate_chunk_size(chunk_size)
        if not isinstance(pack_size, int) or not MIN_PACK_SIZE <= pack_size <= 1024 * MIB:
            raise invalid("pack_size", f"{pack_size!r} must be from {MIN_PACK_SIZE} to 1 GiB")
        if key_file is None and password is None:
            raise invalid("key_file/password", "give a key file, a password, or both")
        if password is not None and not password:
            raise invalid("password", "must not be empty")
        if (path / CONFIG_NAME).exists():
            raise VmvaultError(RESOURCE_EXISTS, kind="vault", name=str(path))
        if path.exists() and any(path.iterdir()):
            raise invalid("path", f"{path} is not empty")
        path.mkdir(parents=True, exist_ok=True)
        for sub in (KEYS_DIR, INDEX_DIR, MANIFESTS_DIR, LOCKS_DIR, TMP_DIR, DATA_DIR):
            (path / sub).mkdir(exist_ok=True)
        for i in range(256):
            (path / DATA_DIR / f"{i:02x}").mkdir(exist_ok=True)
        repo_id = secrets.token_hex(16)
        master = MasterKey.generate()
        if key_file is not None:
            write_slot(path, key_file_slot(master, repo_id, ensure_key_file(Path(key_file))))
        if password is not None:
            write_slot(path, password_slot(master, repo_id, password, kdf or KdfParams()))
        fsync_dir(path / KEYS_DIR)
        config = {
            "format": "vmvault-vault",
            "version": FORMAT_VERSION,
            "id": repo_id,
            "created": utc_now(),
            "chunk_size": chunk_size,
            "pack_size": pack_size,
            "algorithms": {**ALGORITHMS, "zstd_level": ZSTD_LEVEL},
        }
        data = json.dumps(config, indent=2, sort_keys=True).encode() + b"\n"
        atomic_write(path, path / CONFIG_NAME, data, kind="config")  # last: the vault exists now
        fsync_dir(path)
        return cls(path, config, master)

    @classmethod
    def open(
        cls, path: Path, *, key_file: Path | None = None, password: str | None = None
    ) -> Repository:
        path = Path(path)
        config = read_config(path)
        master = unlock(path, config["id"], key_file=key_file, password=password)
        return cls(path, config, master)

    def add_key(
        self,
        *,
        key_file: Path | None = None,
        password: str | None = None,
        kdf: KdfParams | None = None,
    ) -> list[str]:
        """Add a key file slot and/or a password slot; returns the new slot ids."""
        if key_file is None and password is None:
            raise invalid("key_file/password", "give a key file, a password, or both")
        if password is not None and not password:
            raise invalid("password", "must not be empty")
        master = self._master
        ids = []
        with self._locked("add-key"):  # prune must not remove the slot's temp file
            if key_file is not None:
                secret = ensure_key_file(Path(key_file))
                ids.append(write_slot(self.path, key_file_slot(master, self.id, secret)))
            if password is not None:
                slot = password_slot(master, self.id, password, kdf or KdfParams())
                ids.append(write_slot(self.path, slot))
        return ids

    # --- backup / restore ------------------------------------------------------------
    def backup(
        self,
        rp_id: str,
        disks: list[DiskSource],
        *,
        parent: str | None = None,
        metadata: dict[str, Any] | None = None,
        progress: Progress | None = None,
        lock_timeout: float | None = None,
    ) -> BackupStats:
        """Back up `disks` as recovery point `rp_id`; the manifest is written last.

        Holds a shared lock: waits for a running prune to end, and prune waits for it.
        The index is reloaded after the lock is taken, so deduplication never trusts a
        chunk that a prune removed while this backup waited.
        """
        validate_rp_id(rp_id)
        if metadata is not None:
            try:
                json.dumps(metadata)
            except (TypeError, ValueError) as exc:
                raise invalid("metadata", f"not JSON-serialisable: {exc}") from None
        with self._locked(f"backup {rp_id}", timeout=lock_timeout):
            return run_backup(
                self, rp_id, disks, parent=parent, metadata=metadata, progress=progress
            )

    def manifests(self) -> list[str]:
        return manifest_names(self.path)

    def manifest(self, rp_id: str) -> Manifest:
        validate_rp_id(rp_id)
        try:
            return read_manifest(self.path, self._crypto, rp_id)
        except FileNotFoundError:
            raise not_found("recovery point", rp_id) from None

    def restore_disk(
        self,
        rp_id: str,
        disk_name: str,
        target: Path,
        *,
        progress: Progress | None = None,
        lock_timeout: float | None = None,
    ) -> int:
        """Write a disk into `target` (sparse file, or an existing block device)."""
        with self._locked(f"restore {rp_id}/{disk_name}", timeout=lock_timeout):
            return restore_file(self, rp_id, disk_name, Path(target), progress=progress)

    def restore_disk_to(
        self,
        rp_id: str,
        disk_name: str,
        write: Callable[[int, bytes], None],
        *,
        progress: Progress | None = None,
        lock_timeout: float | None = None,
    ) -> int:
        """Call write(offset, data) for every stored chunk in disk order (zero chunks skipped)."""
        with self._locked(f"restore {rp_id}/{disk_name}", timeout=lock_timeout):
            return restore_to(self, rp_id, disk_name, write, progress=progress)

    # --- maintenance -----------------------------------------------------------------
    def delete_manifest(self, rp_id: str, *, lock_timeout: float | None = None) -> None:
        """Delete a recovery point's manifest (shared lock: its chunks stay until prune)."""
        validate_rp_id(rp_id)
        with self._locked(f"delete {rp_id}", timeout=lock_timeout):
            try:
                os.unlink(self.path / MANIFESTS_DIR / rp_id)
            except FileNotFoundError:
                raise not_found("recovery point", rp_id) from None
            fsync_dir(self.path / MANIFESTS_DIR)

    def prune(
        self,
        *,
        rewrite_threshold: float = DEFAULT_REWRITE_THRESHOLD,
        lock_timeout: float | None = None,
    ) -> PruneStats:
        """Remove what no recovery point references (prune.py).

        Holds the exclusive lock: waits up to `lock_timeout` (default
        `exclusive_lock_timeout`) for running backups and restores to end, and operations
        that start meanwhile wait for the prune.
        """
        with self._locked("prune", exclusive=True, timeout=lock_timeout):
            return run_prune(self, rewrite_threshold=rewrite_threshold)

    def check(self, read_data: bool = False, *, lock_timeout: float | None = None) -> CheckReport:
        """Verify the vault (check.py); other holders of the vault lock are listed as infos."""
        with self._locked("check", timeout=lock_timeout) as held:
            report = run_check(self, read_data)
            mine = held.info
            for info in self.locks():
                if mine is None or info.id != mine.id:
                    report.infos.append(
                        f"{LOCKS_DIR}/{info.id}: the vault is locked by {info.holder()} "
                        f"({info.operation}, since {info.time})"
                    )
            return report

    def rebuild_index(self, *, lock_timeout: float | None = None) -> int:
        """Rewrite the index from the pack trailers alone; returns the number of packs indexed.

        Packs whose trailer does not read are left out (check then names them as leftovers
        and the recovery points that needed them as damaged). Holds the exclusive lock.
        """
        with self._locked("rebuild-index", exclusive=True, timeout=lock_timeout):
            packs, _ = scan_packs(self.path)
            found: PackList = []
            for pack_id, size in sorted(packs.items()):
                fd = os.open(pack_path(self.path, pack_id), os.O_RDONLY)
                try:
                    found.append((pack_id, read_trailer(fd, size, self._crypto, pack_id)))
                except (PackError, VmvaultError):
                    continue
                finally:
                    os.close(fd)
            old = list_index_files(self.path)
            new = write_index_file(self.path, self._crypto, found) if found else None
            for file_id in old:
                if file_id != new:
                    os.unlink(self.path / INDEX_DIR / file_id)
            fsync_dir(self.path / INDEX_DIR)
            self._index = Index()
            self._index.refresh(self.path, self._crypto)
            return len(found)

    def stats(self) -> dict[str, int]:
        with self._locked("stats"):
            self._index.refresh(self.path, self._crypto)
            packs, _ = scan_packs(self.path)
            entries = self._index.entries
            return {
                "packs": len(packs),
                "chunks": len(entries),
                "bytes_stored": sum(packs.values()),
                "bytes_chunks_raw": sum(loc[3] for loc in entries.values()),
                "manifests": len(self.manifests()),
                "index_files": len(self._index.files),
                "chunk_size": self.chunk_size,
            }

    # --- locks ----------------------------------------------------------------------
    def lock(
        self, *, exclusive: bool = False, operation: str = "", timeout: float | None = None
    ) -> VaultLock:
        """The vault lock, not yet taken: ``with repo.lock(exclusive=True, operation="x"):``.

        `timeout` (seconds, math.inf: forever) defaults to `shared_lock_timeout` or
        `exclusive_lock_timeout`. Nested locks in one thread do not wait (lock.py).
        """
        if timeout is None:
            timeout = self.exclusive_lock_timeout if exclusive else self.shared_lock_timeout
        return VaultLock(self.path, exclusive=exclusive, operation=operation, timeout=timeout)

    def locks(self) -> list[LockInfo]:
        """Who holds the vault lock now, oldest first (stale lock files are removed first)."""
        remove_stale_locks(self.path)
        return list_locks(self.path)

    @contextlib.contextmanager
    def _locked(
        self, operation: str, *, exclusive: bool = False, timeout: float | None = None
    ) -> Iterator[VaultLock]:
        """The vault lock, then this object's RLock: always in this order (no deadlock)."""
        vault_lock = self.lock(exclusive=exclusive, operation=operation, timeout=timeout)
        with vault_lock as held, self._lock:
            yield held

    # --- internals ----------------------------------------------------------------
    def max_inflight(self) -> int:
        """How many chunks the pipelines keep in flight (bounds memory)."""
        return max(2 * self.threads + 2, min(64, (32 * MIB) // self.chunk_size))

    def __repr__(self) -> str:
        return f"Repository({str(self.path)!r}, id={self.id!r}, chunk_size={self.chunk_size})"


def read_config(path: Path) -> dict[str, Any]:
    try:
        raw = (path / CONFIG_NAME).read_bytes()
    except FileNotFoundError:
        raise not_found("vault", str(path)) from None
    try:
        config = json.loads(raw)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise VmvaultError(VAULT_CORRUPT, reason=f"{path / CONFIG_NAME}: {exc}") from None
    version = config.get("version")
    if version != FORMAT_VERSION or config.get("format") != "vmvault-vault":
        raise VmvaultError(VAULT_FORMAT_UNSUPPORTED, path=str(path), version=version)
    algorithms = config.get("algorithms")
    if not isinstance(algorithms, dict) or any(
        algorithms.get(k) != v for k, v in ALGORITHMS.items()
    ):
        raise VmvaultError(VAULT_FORMAT_UNSUPPORTED, path=str(path), version=version)
    try:
        if not isinstance(config["id"], str) or not config["id"]:
            raise ValueError("bad id")
        validate_chunk_size(config["chunk_size"])
        if not isinstance(config["pack_size"], int) or config["pack_size"] < MIN_PACK_SIZE:
            raise ValueError("bad pack_size")
    except (KeyError, ValueError, VmvaultError) as exc:
        raise VmvaultError(VAULT_CORRUPT, reason=f"{path / CONFIG_NAME}: {exc}") from None
    return config
