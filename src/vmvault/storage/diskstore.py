"""The local disk store: storage accounts, containers and blobs as sparse files in the pool.

Layout under the root folder (the pool, see :mod:`vmvault.storage.pool`)::

    <account>/account.json                  name, location, sku, capacity_bytes, status
                                            (online|offline), key1, key2 (base64 of 64
                                            random bytes), created
    <account>/<container>/.container.json   created, metadata, etag
    <account>/<container>/<key>             the blob's content: a sparse file, its size is
                                            the blob's size, holes are never-written or
                                            cleared pages
    <account>/<container>/.meta/<key>.json  sidecar: name, blob type (PageBlob|BlockBlob),
                                            created, content settings (type, encoding,
                                            language, md5, cache control, disposition),
                                            metadata, sequence number, block list
    <account>/<container>/.meta/.lock       flock'ed while a blob's sidecar changes
    <account>/<container>/.snapshots/<key>/<snapshot id>        the snapshot's content: a
                                            reflinked (FICLONE) copy of the blob, or a
                                            sparse copy where reflink is unavailable
    <account>/<container>/.snapshots/<key>/<snapshot id>.json   its sidecar, with the
                                            base blob's ETag and Last-Modified frozen
    <account>/<container>/.blocks/<key>/<block id>              staged (uncommitted) blocks

``<key>`` is the blob name percent-encoded into one file name (``/`` becomes ``%2F``; a
leading dot ``%2E``); plain names such as ``vm1-osdisk.vhd`` are unchanged. Names too
long for a file name are cut and given a hash suffix. The sidecar holds the real name.

The blob's content length is its file's size, its ETag and Last-Modified come from
the file's stat (mtime, size, inode) and the sidecar's generation, so writing the file
directly (:meth:`DiskStore.blob_path`, the control plane's fast path) is seen as a change.

Snapshot ids have Azure's format (``2026-11-23T11:15:00.1234567Z``, 100 ns ticks) and
are unique per blob (claimed with O_EXCL). Errors are catalog errors:
``not_found(kind, name)`` with kind "storage account", "container", "blob", "snapshot";
``RESOURCE_EXISTS``; ``BLOB_SNAPSHOTS_PRESENT``; ``BLOB_INVALID_TYPE``;
``BLOB_INVALID_PAGE_RANGE``; ``invalid(...)``.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmvault.errors import (
    BLOB_INVALID_BLOCK_LIST,
    BLOB_INVALID_PAGE_RANGE,
    BLOB_INVALID_TYPE,
    BLOB_SNAPSHOTS_PRESENT,
    RESOURCE_EXISTS,
    STORAGE_ACCOUNT_NOT_ONLINE,
    VmvaultError,
    invalid,
    not_found,
)
from vmvault.storage import extents as ext
from vmvault.storage.pool import probe_reflink

PAGE = 512
PAGE_BLOB = "PageBlob"
BLOCK_BLOB = "BlockBlob"
MAX_PAGE_BLOB_SIZE = 8 * 1024**4  # 8 TiB, Azure's limit
_CMP_BLOCK = 4096  # granularity of the content comparison (non-reflink fallback)
_CMP_CHUNK = 1 << 20

_ACCOUNT_RE = re.compile(r"^[a-z0-9]{3,24}$")
_CONTAINER_RE = re.compile(r"^(?=.{3,63}$)[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9]))*$")
_SNAPSHOT_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z$")

CONTENT_FIELDS = (
    "content_type",
    "content_encoding",
    "content_language",
    "content_md5",
    "cache_control",
    "content_disposition",
)


# --- small helpers -----------------------------------------------------------------------


def utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat()


def _from_iso(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _snapshot_id(ticks: int) -> str:
    """Azure's snapshot id for a time in 100 ns ticks since the epoch."""
    seconds, frac = divmod(ticks, 10_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{frac:07d}Z"


def snapshot_time(snapshot: str) -> datetime:
    """The time a snapshot id stands for."""
    return datetime.strptime(snapshot[:19], "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=UTC, microsecond=int(snapshot[20:26])
    )


def blob_key(name: str) -> str:
    """The file name that stands for blob name (injective, see the module doc)."""
    key = urllib.parse.quote(name, safe="-_.")
    if key.startswith("."):
        key = "%2E" + key[1:]
    if len(key) > 200:
        key = key[:120] + "~" + hashlib.sha256(name.encode()).hexdigest()[:40]
    return key


def _write_json(path: Path, data: dict[str, Any], mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        data: dict[str, Any] = json.load(f)
    return data


# --- data classes ------------------------------------------------------------------------


@dataclass
class AccountInfo:
    name: str
    location: str
    sku: str
    capacity_bytes: int
    status: str  # online | offline
    key1: str
    key2: str
    created: str  # ISO 8601, UTC

    @property
    def online(self) -> bool:
        return self.status == "online"

    def keys(self) -> list[str]:
        return [self.key1, self.key2]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ContainerInfo:
    account: str
    name: str
    created: datetime
    last_modified: datetime
    etag: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class BlobProperties:
    account: str
    container: str
    name: str
    blob_type: str  # PageBlob | BlockBlob
    size: int
    etag: str  # quoted, as in the ETag header: "0x8DC..."
    last_modified: datetime
    created: datetime
    metadata: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None
    content_encoding: str | None = None
    content_language: str | None = None
    content_md5: str | None = None  # base64
    cache_control: str | None = None
    content_disposition: str | None = None
    sequence_number: int = 0
    snapshot: str | None = None

    @property
    def content_length(self) -> int:
        return self.size


@dataclass
class BlockInfo:
    block_id: str  # base64, as on the wire
    size: int


# --- the store -------------------------------------------------------------------------


class DiskStore:
    """Accounts, containers and blobs under root (see the module doc for the layout)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.reflink: bool = probe_reflink(self.root)

    # --- paths ---------------------------------------------------------------------------

    def _account_dir(self, account: str) -> Path:
        if not _ACCOUNT_RE.match(account or ""):
            raise not_found("storage account", account)
        return self.root / account

    def _container_dir(self, account: str, container: str) -> Path:
        if not _CONTAINER_RE.match(container or ""):
            raise not_found("container", container)
        return self._account_dir(account) / container

    def _existing_container(self, account: str, container: str) -> Path:
        self.get_account(account)
        cdir = self._container_dir(account, container)
        if not (cdir / ".container.json").is_file():
            raise not_found("container", container)
        return cdir

    @staticmethod
    def _check_blob_name(blob: str) -> None:
        if not blob or len(blob) > 1024:
            raise invalid("blob name", "must have 1 to 1024 characters")

    def _paths(self, account: str, container: str, blob: str) -> tuple[Path, Path]:
        """(data file, sidecar) of a blob; the container must exist."""
        self._check_blob_name(blob)
        cdir = self._existing_container(account, container)
        key = blob_key(blob)
        return cdir / key, cdir / ".meta" / f"{key}.json"

    def _snap_paths(self, account: str, container: str, blob: str, snapshot: str
                    ) -> tuple[Path, Path]:
        if not _SNAPSHOT_RE.match(snapshot or ""):
            raise invalid("snapshot", f"'{snapshot}' is not a snapshot id "
                          "(like 2026-11-23T11:15:00.1234567Z)")
        self._check_blob_name(blob)
        cdir = self._existing_container(account, container)
        sdir = cdir / ".snapshots" / blob_key(blob)
        return sdir / snapshot, sdir / f"{snapshot}.json"

    @contextlib.contextmanager
    def _locked(self, account: str, container: str, blob: str | None = None,
                shared: bool = False) -> Iterator[None]:
        """flock a blob (or, blob None, the container's metadata): exclusive for changes of
        the sidecar, snapshots and deletes; shared for page writes, so that a snapshot that
        has to copy (no reflink) never sees a write half done. Works across threads and
        processes (the Blob endpoint and the control plane share the pool)."""
        cdir = self._existing_container(account, container)
        meta = cdir / ".meta"
        meta.mkdir(exist_ok=True)
        name = f"{blob_key(blob)}.lock" if blob is not None else ".lock"
        fd = os.open(meta / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # --- accounts ------------------------------------------------------------------------

    def create_account(self, name: str, *, location: str, sku: str, capacity_bytes: int
                       ) -> AccountInfo:
        if not _ACCOUNT_RE.match(name or ""):
            raise invalid("storage account name",
                          "use 3 to 24 characters, lowercase letters and digits only")
        adir = self.root / name
        try:
            adir.mkdir()
        except FileExistsError:
            if (adir / "account.json").exists():
                raise VmvaultError(RESOURCE_EXISTS, kind="storage account", name=name) from None
        info = AccountInfo(
            name=name,
            location=location,
            sku=sku,
            capacity_bytes=int(capacity_bytes),
            status="online",
            key1=base64.b64encode(secrets.token_bytes(64)).decode(),
            key2=base64.b64encode(secrets.token_bytes(64)).decode(),
            created=_iso(utcnow()),
        )
        _write_json(adir / "account.json", info.to_dict(), 0o600)
        return info

    def get_account(self, name: str) -> AccountInfo:
        try:
            data = _read_json(self._account_dir(name) / "account.json")
        except (FileNotFoundError, NotADirectoryError):
            raise not_found("storage account", name) from None
        return AccountInfo(**data)

    def list_accounts(self) -> list[AccountInfo]:
        out = []
        for path in sorted(self.root.glob("*/account.json")):
            with contextlib.suppress(OSError, ValueError, TypeError):
                out.append(AccountInfo(**_read_json(path)))
        return out

    def delete_account(self, name: str) -> None:
        """Delete the account with all its containers, blobs and snapshots (no error if gone)."""
        try:
            adir = self._account_dir(name)
        except VmvaultError:
            return
        if not adir.exists():
            return
        # account.json first: from then on, the account is gone for everyone.
        with contextlib.suppress(FileNotFoundError):
            (adir / "account.json").unlink()
        shutil.rmtree(adir, ignore_errors=True)

    def set_account_status(self, name: str, online: bool) -> AccountInfo:
        info = self.get_account(name)
        info.status = "online" if online else "offline"
        _write_json(self.root / name / "account.json", info.to_dict(), 0o600)
        return info

    def update_account(self, name: str, **changes: Any) -> AccountInfo:
        """Change location, sku or capacity_bytes (the control plane keeps them in step)."""
        info = self.get_account(name)
        for key, value in changes.items():
            if key not in ("location", "sku", "capacity_bytes"):
                raise invalid(key, "cannot be changed")
            setattr(info, key, value)
        _write_json(self.root / name / "account.json", info.to_dict(), 0o600)
        return info

    def regenerate_key(self, name: str, key_name: str) -> AccountInfo:
        info = self.get_account(name)
        if key_name not in ("key1", "key2"):
            raise invalid("key name", "must be key1 or key2")
        setattr(info, key_name, base64.b64encode(secrets.token_bytes(64)).decode())
        _write_json(self.root / name / "account.json", info.to_dict(), 0o600)
        return info

    def require_online(self, name: str) -> AccountInfo:
        info = self.get_account(name)
        if not info.online:
            raise VmvaultError(STORAGE_ACCOUNT_NOT_ONLINE, name=name)
        return info

    def used_bytes(self, account: str) -> int:
        """Bytes allocated by the account's blobs and snapshots; blocks shared by reflinked
        snapshots count once (union of physical extents). Approximate on non-reflink
        file systems (sum of allocated blocks per file)."""
        adir = self._account_dir(account)
        if not adir.is_dir():
            raise not_found("storage account", account)
        files: list[Path] = []
        for cdir in adir.iterdir():
            if not (cdir / ".container.json").is_file():
                continue
            files += [p for p in cdir.iterdir() if not p.name.startswith(".") and p.is_file()]
            files += [p for p in cdir.glob(".snapshots/*/*")
                      if _SNAPSHOT_RE.match(p.name) and p.is_file()]
            files += [p for p in cdir.glob(".blocks/*/*")
                      if not p.name.startswith(".") and p.is_file()]
        if not self.reflink:
            return sum(p.stat().st_blocks * 512 for p in files)
        total = 0
        physical: list[tuple[int, int]] = []
        for p in files:
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            try:
                mapped = 0
                for e in ext.fiemap(fd, sync=False):
                    if e.flags & (ext.FIEMAP_EXTENT_DELALLOC | ext.FIEMAP_EXTENT_UNKNOWN):
                        continue
                    physical.append((e.physical, e.physical + e.length))
                    mapped += e.length
                # Blocks not mapped yet (delayed allocation, copy-on-write in flight) are
                # in st_blocks but not in the extent map: count them as this file's own.
                total += max(0, os.fstat(fd).st_blocks * 512 - mapped)
            except OSError:
                total += os.fstat(fd).st_blocks * 512
            finally:
                os.close(fd)
        return total + sum(e - s for s, e in ext.merge_ranges(physical))

    # --- containers ----------------------------------------------------------------------

    def create_container(self, account: str, container: str, *, exist_ok: bool = False,
                         metadata: dict[str, str] | None = None) -> ContainerInfo:
        self.get_account(account)
        if not _CONTAINER_RE.match(container or ""):
            raise invalid("container name",
                          "use 3 to 63 characters: lowercase letters, digits and single "
                          "hyphens, starting and ending with a letter or digit")
        cdir = self._container_dir(account, container)
        cdir.mkdir(exist_ok=True)
        marker = cdir / ".container.json"
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if exist_ok:
                return self.get_container(account, container)
            raise VmvaultError(RESOURCE_EXISTS, kind="container", name=container) from None
        now = utcnow()
        data = {"created": _iso(now), "metadata": dict(metadata or {}),
                "etag": _make_etag(now.timestamp(), container)}
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        for sub in (".meta", ".snapshots", ".blocks"):
            (cdir / sub).mkdir(exist_ok=True)
        return self.get_container(account, container)

    def get_container(self, account: str, container: str) -> ContainerInfo:
        cdir = self._existing_container(account, container)
        path = cdir / ".container.json"
        data = _read_json(path)
        return ContainerInfo(account, container, _from_iso(data["created"]),
                             datetime.fromtimestamp(path.stat().st_mtime, UTC),
                             data["etag"], dict(data.get("metadata") or {}))

    def set_container_metadata(self, account: str, container: str, metadata: dict[str, str]
                               ) -> ContainerInfo:
        with self._locked(account, container):  # the container's own lock
            path = self._existing_container(account, container) / ".container.json"
            data = _read_json(path)
            data["metadata"] = dict(metadata)
            data["etag"] = _make_etag(time.time(), container, secrets.token_hex(4))
            _write_json(path, data)
        return self.get_container(account, container)

    def list_containers(self, account: str) -> list[ContainerInfo]:
        adir = self._account_dir(account)
        self.get_account(account)
        out = []
        for marker in sorted(adir.glob("*/.container.json")):
            with contextlib.suppress(VmvaultError, OSError, ValueError):
                out.append(self.get_container(account, marker.parent.name))
        return out

    def delete_container(self, account: str, container: str) -> None:
        cdir = self._existing_container(account, container)
        # Rename first so that the name is free at once and readers see it gone.
        trash = cdir.with_name(f".deleting-{container}-{secrets.token_hex(4)}")
        os.rename(cdir, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # --- blob metadata -------------------------------------------------------------------

    def _load_sidecar(self, account: str, container: str, blob: str) -> tuple[Path, dict]:
        data_path, meta_path = self._paths(account, container, blob)
        try:
            meta = _read_json(meta_path)
        except FileNotFoundError:
            raise not_found("blob", blob) from None
        return data_path, meta

    def _props(self, account: str, container: str, blob: str, data_path: Path,
               meta: dict[str, Any]) -> BlobProperties:
        try:
            st = data_path.stat()
        except FileNotFoundError:
            raise not_found("blob", blob) from None
        etag = _make_etag(st.st_mtime_ns, st.st_size, st.st_ino, meta.get("gen", 0))
        return self._props_from(account, container, blob, meta, st.st_size, etag,
                                datetime.fromtimestamp(st.st_mtime, UTC), None)

    @staticmethod
    def _props_from(account: str, container: str, blob: str, meta: dict[str, Any], size: int,
                    etag: str, last_modified: datetime, snapshot: str | None
                    ) -> BlobProperties:
        content = meta.get("content") or {}
        return BlobProperties(
            account=account,
            container=container,
            name=meta.get("name", blob),
            blob_type=meta["blob_type"],
            size=size,
            etag=etag,
            last_modified=last_modified,
            created=_from_iso(meta["created"]),
            metadata=dict(meta.get("metadata") or {}),
            sequence_number=int(meta.get("sequence_number", 0)),
            snapshot=snapshot,
            **{k: content.get(k) for k in CONTENT_FIELDS},
        )

    def get_properties(self, account: str, container: str, blob: str,
                       snapshot: str | None = None) -> BlobProperties:
        if snapshot:
            spath, smeta_path = self._snap_paths(account, container, blob, snapshot)
            try:
                meta = _read_json(smeta_path)
                size = spath.stat().st_size
            except FileNotFoundError:
                raise not_found("snapshot", f"{blob}@{snapshot}") from None
            return self._props_from(account, container, blob, meta, size, meta["etag"],
                                    _from_iso(meta["last_modified"]), snapshot)
        data_path, meta = self._load_sidecar(account, container, blob)
        return self._props(account, container, blob, data_path, meta)

    def exists(self, account: str, container: str, blob: str, snapshot: str | None = None
               ) -> bool:
        try:
            self.get_properties(account, container, blob, snapshot)
        except VmvaultError as exc:
            if exc.http_status == 404:
                return False
            raise
        return True

    def _touch(self, data_path: Path) -> None:
        os.utime(data_path)

    def set_metadata(self, account: str, container: str, blob: str,
                     metadata: dict[str, str]) -> BlobProperties:
        with self._locked(account, container, blob):
            data_path, meta = self._load_sidecar(account, container, blob)
            meta["metadata"] = dict(metadata)
            meta["gen"] = meta.get("gen", 0) + 1
            _write_json(self._paths(account, container, blob)[1], meta)
            self._touch(data_path)
            return self._props(account, container, blob, data_path, meta)

    def set_properties(self, account: str, container: str, blob: str, *,
                       content: dict[str, str | None] | None = None,
                       size: int | None = None,
                       sequence_number_action: str | None = None,
                       sequence_number: int | None = None) -> BlobProperties:
        """Set Blob Properties: content settings (replaced as a whole when given), the size
        of a page blob (resize), the sequence number (action max|update|increment)."""
        with self._locked(account, container, blob):
            data_path, meta = self._load_sidecar(account, container, blob)
            if size is not None:
                if meta["blob_type"] != PAGE_BLOB:
                    raise VmvaultError(BLOB_INVALID_TYPE, name=blob, blob_type=meta["blob_type"])
                _check_page_blob_size(size)
                os.truncate(data_path, size)
            if content is not None:
                meta["content"] = {k: content.get(k) for k in CONTENT_FIELDS}
            if sequence_number_action:
                if meta["blob_type"] != PAGE_BLOB:
                    raise VmvaultError(BLOB_INVALID_TYPE, name=blob, blob_type=meta["blob_type"])
                current = int(meta.get("sequence_number", 0))
                if sequence_number_action == "increment":
                    meta["sequence_number"] = current + 1
                elif sequence_number_action == "max":
                    meta["sequence_number"] = max(current, int(sequence_number or 0))
                elif sequence_number_action == "update":
                    meta["sequence_number"] = int(sequence_number or 0)
                else:
                    raise invalid("x-ms-sequence-number-action",
                                  "must be max, update or increment")
            meta["gen"] = meta.get("gen", 0) + 1
            _write_json(self._paths(account, container, blob)[1], meta)
            self._touch(data_path)
            return self._props(account, container, blob, data_path, meta)

    def resize(self, account: str, container: str, blob: str, size: int) -> BlobProperties:
        return self.set_properties(account, container, blob, size=size)

    # --- creating blobs ------------------------------------------------------------------

    def _new_blob(self, account: str, container: str, blob: str, blob_type: str,
                  fill: Any, **kwargs: Any) -> BlobProperties:
        """Write a whole new blob: fill(fd) writes the content into a temporary file that
        then replaces the blob (its snapshots stay)."""
        data_path, _ = self._paths(account, container, blob)
        tmp = data_path.with_name(f".new-{data_path.name[:100]}-{secrets.token_hex(6)}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                fill(fd)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return self._publish(account, container, blob, blob_type, tmp, **kwargs)

    def _publish(self, account: str, container: str, blob: str, blob_type: str, tmp: Path, *,
                 metadata: dict[str, str] | None, content: dict[str, Any],
                 sequence_number: int = 0, overwrite: bool = True,
                 blocks: list[list[Any]] | None = None) -> BlobProperties:
        """Make the finished file tmp the blob's content, with a new sidecar."""
        data_path, meta_path = self._paths(account, container, blob)
        meta_path.parent.mkdir(exist_ok=True)
        try:
            with self._locked(account, container, blob):
                old_meta: dict[str, Any] = {}
                if meta_path.exists():
                    if not overwrite:
                        raise VmvaultError(RESOURCE_EXISTS, kind="blob", name=blob)
                    with contextlib.suppress(OSError, ValueError):
                        old_meta = _read_json(meta_path)
                meta = {
                    "name": blob,
                    "blob_type": blob_type,
                    "created": old_meta.get("created") or _iso(utcnow()),
                    "content": {k: content.get(k) for k in CONTENT_FIELDS},
                    "metadata": dict(metadata or {}),
                    "sequence_number": int(sequence_number),
                    "gen": int(old_meta.get("gen", 0)) + 1,
                }
                if blocks is not None:
                    meta["blocks"] = blocks
                os.replace(tmp, data_path)
                _write_json(meta_path, meta)
                return self._props(account, container, blob, data_path, meta)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def create_page_blob(self, account: str, container: str, blob: str, size: int,
                         metadata: dict[str, str] | None = None, *,
                         content: dict[str, Any] | None = None, sequence_number: int = 0,
                         overwrite: bool = True) -> BlobProperties:
        """A new, all-zero page blob of size bytes (a sparse file; multiple of 512)."""
        _check_page_blob_size(size)

        def fill(fd: int) -> None:
            os.ftruncate(fd, size)

        return self._new_blob(account, container, blob, PAGE_BLOB, fill, metadata=metadata,
                              content=content or {}, sequence_number=sequence_number,
                              overwrite=overwrite)

    def put_block_blob(self, account: str, container: str, blob: str, data: bytes, *,
                       content_type: str | None = None, metadata: dict[str, str] | None = None,
                       content: dict[str, Any] | None = None, overwrite: bool = True
                       ) -> BlobProperties:
        writer = self.block_blob_writer(account, container, blob, content_type=content_type,
                                        metadata=metadata, content=content, overwrite=overwrite)
        try:
            writer.write(data)
        except BaseException:
            writer.abort()
            raise
        return writer.commit()

    def block_blob_writer(self, account: str, container: str, blob: str, *,
                          content_type: str | None = None,
                          metadata: dict[str, str] | None = None,
                          content: dict[str, Any] | None = None,
                          overwrite: bool = True) -> BlockBlobWriter:
        """Stream a block blob's content in; commit() makes it the blob (Put Blob)."""
        data_path, _ = self._paths(account, container, blob)
        content = dict(content or {})
        if content_type is not None:
            content["content_type"] = content_type
        if not overwrite and self.exists(account, container, blob):
            raise VmvaultError(RESOURCE_EXISTS, kind="blob", name=blob)
        return BlockBlobWriter(self, account, container, blob, data_path, content,
                               metadata, overwrite)

    # --- blocks (Put Block / Put Block List) ---------------------------------------------

    def _block_dir(self, account: str, container: str, blob: str) -> Path:
        data_path, _ = self._paths(account, container, blob)
        return data_path.parent / ".blocks" / data_path.name

    @staticmethod
    def _block_file(block_id: str) -> str:
        try:
            raw = base64.b64decode(block_id, validate=True)
        except ValueError:
            raise invalid("blockid", "must be base64") from None
        if not raw or len(raw) > 64:
            raise invalid("blockid", "must be 1 to 64 bytes before encoding")
        return base64.urlsafe_b64encode(raw).decode()

    def stage_block(self, account: str, container: str, blob: str, block_id: str,
                    chunks: Any) -> int:
        """Store an uncommitted block; chunks: bytes or an iterable of bytes. Its size."""
        writer = self.block_stager(account, container, blob, block_id)
        try:
            if isinstance(chunks, bytes | bytearray | memoryview):
                writer.write(chunks)
            else:
                writer.write_many(list(chunks))
        except BaseException:
            writer.abort()
            raise
        return writer.commit()

    def block_stager(self, account: str, container: str, blob: str, block_id: str
                     ) -> BlockStager:
        """Stream one uncommitted block (Put Block) to disk; commit() stores it."""
        bdir = self._block_dir(account, container, blob)
        bdir.mkdir(parents=True, exist_ok=True)
        return BlockStager(bdir / self._block_file(block_id))

    def get_block_list(self, account: str, container: str, blob: str
                       ) -> tuple[list[BlockInfo], list[BlockInfo]]:
        """(committed, uncommitted) blocks."""
        committed: list[BlockInfo] = []
        _, meta_path = self._paths(account, container, blob)
        if meta_path.exists():
            meta = _read_json(meta_path)
            committed = [BlockInfo(b, n) for b, n in meta.get("blocks") or []]
        uncommitted = []
        bdir = self._block_dir(account, container, blob)
        if bdir.is_dir():
            for p in sorted(bdir.iterdir()):
                if not p.name.startswith("."):
                    raw = base64.urlsafe_b64decode(p.name)
                    uncommitted.append(BlockInfo(base64.b64encode(raw).decode(), p.stat().st_size))
        if not committed and not uncommitted and not meta_path.exists():
            raise not_found("blob", blob)
        return committed, uncommitted

    def commit_block_list(self, account: str, container: str, blob: str,
                          blocks: list[tuple[str, str]], *,
                          metadata: dict[str, str] | None = None,
                          content: dict[str, Any] | None = None) -> BlobProperties:
        """Put Block List: blocks = [(kind, block id)], kind Committed|Uncommitted|Latest."""
        data_path, meta_path = self._paths(account, container, blob)
        bdir = self._block_dir(account, container, blob)
        committed: dict[str, tuple[int, int]] = {}  # id -> (offset in current blob, size)
        if meta_path.exists():
            offset = 0
            for bid, n in _read_json(meta_path).get("blocks") or []:
                committed[bid] = (offset, n)
                offset += n
        sources: list[tuple[Path, int, int]] = []
        for kind, bid in blocks:
            name = self._block_file(bid)
            staged = bdir / name
            kind = kind.lower()
            if kind in ("uncommitted", "latest") and staged.is_file():
                sources.append((staged, 0, staged.stat().st_size))
            elif kind in ("committed", "latest") and bid in committed:
                off, n = committed[bid]
                sources.append((data_path, off, n))
            else:
                raise VmvaultError(BLOB_INVALID_BLOCK_LIST)

        def fill(fd: int) -> None:
            pos = 0
            for path, off, n in sources:
                with open(path, "rb") as src:
                    done = 0
                    while done < n:
                        k = os.copy_file_range(src.fileno(), fd, n - done, off + done, pos + done)
                        if k <= 0:
                            raise OSError("copy_file_range made no progress")
                        done += k
                pos += n

        props = self._new_blob(account, container, blob, BLOCK_BLOB, fill, metadata=metadata,
                               content=content or {},
                               blocks=[[bid, src[2]] for (_, bid), src in zip(blocks, sources,
                                                                                strict=True)])
        shutil.rmtree(bdir, ignore_errors=True)
        return props

    # --- page operations -----------------------------------------------------------------

    def _page_target(self, account: str, container: str, blob: str, offset: int, length: int
                     ) -> Path:
        data_path, meta = self._load_sidecar(account, container, blob)
        if meta["blob_type"] != PAGE_BLOB:
            raise VmvaultError(BLOB_INVALID_TYPE, name=blob, blob_type=meta["blob_type"])
        if offset % PAGE or length % PAGE or offset < 0 or length <= 0:
            raise VmvaultError(BLOB_INVALID_PAGE_RANGE,
                               reason=f"offset {offset} and length {length} must be "
                                      "multiples of 512")
        size = data_path.stat().st_size
        if offset + length > size:
            raise VmvaultError(BLOB_INVALID_PAGE_RANGE,
                               reason=f"bytes {offset}-{offset + length - 1} end past the "
                                      f"blob's size ({size})")
        return data_path

    def write_pages(self, account: str, container: str, blob: str, offset: int,
                    data: bytes | memoryview) -> BlobProperties:
        with self._locked(account, container, blob, shared=True):
            path = self._page_target(account, container, blob, offset, len(data))
            fd = os.open(path, os.O_WRONLY)
            try:
                view = memoryview(data)
                done = 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], offset + done)
            finally:
                os.close(fd)
        return self.get_properties(account, container, blob)

    def clear_pages(self, account: str, container: str, blob: str, offset: int, length: int
                    ) -> BlobProperties:
        with self._locked(account, container, blob, shared=True):
            path = self._page_target(account, container, blob, offset, length)
            fd = os.open(path, os.O_WRONLY)
            try:
                ext.punch_hole(fd, offset, length)
                os.utime(fd)  # some file systems leave mtime alone on a punch
            finally:
                os.close(fd)
        return self.get_properties(account, container, blob)

    # --- reading -------------------------------------------------------------------------

    def blob_path(self, account: str, container: str, blob: str, snapshot: str | None = None
                  ) -> Path:
        """The file that holds the blob's (or snapshot's) content. Snapshots: read only."""
        if snapshot:
            path, meta_path = self._snap_paths(account, container, blob, snapshot)
            if not meta_path.exists():
                raise not_found("snapshot", f"{blob}@{snapshot}")
            return path
        data_path, meta_path = self._paths(account, container, blob)
        if not meta_path.exists() or not data_path.exists():
            raise not_found("blob", blob)
        return data_path

    def open_blob(self, account: str, container: str, blob: str, snapshot: str | None = None
                  ) -> tuple[int, BlobProperties]:
        """(read-only fd, properties); the caller closes the fd. The fd keeps reading the same
        content even if the blob is replaced meanwhile."""
        props = self.get_properties(account, container, blob, snapshot)
        path = self.blob_path(account, container, blob, snapshot)
        return os.open(path, os.O_RDONLY), props

    def read(self, account: str, container: str, blob: str, offset: int = 0,
             length: int | None = None, snapshot: str | None = None) -> bytes:
        fd, props = self.open_blob(account, container, blob, snapshot)
        try:
            if length is None:
                length = max(0, props.size - offset)
            length = max(0, min(length, props.size - offset))
            parts = []
            pos, end = offset, offset + length
            while pos < end:
                chunk = os.pread(fd, min(end - pos, 16 << 20), pos)
                if not chunk:
                    break
                parts.append(chunk)
                pos += len(chunk)
            return b"".join(parts)
        finally:
            os.close(fd)

    # --- snapshots -----------------------------------------------------------------------

    def snapshot_blob(self, account: str, container: str, blob: str,
                      metadata: dict[str, str] | None = None) -> str:
        """Snapshot the blob (reflink, else sparse copy). metadata None: the blob's own.
        Returns the snapshot id."""
        return self.take_snapshot(account, container, blob, metadata)[0]

    def take_snapshot(self, account: str, container: str, blob: str,
                      metadata: dict[str, str] | None = None,
                      check: Callable[[BlobProperties], None] | None = None
                      ) -> tuple[str, BlobProperties]:
        """snapshot_blob, with `check` called on the blob's properties under the blob's
        lock first (conditional headers), and the snapshot's properties returned with its
        id: the Blob endpoint's Snapshot Blob in one call (it runs inside a freeze window)."""
        with self._locked(account, container, blob):
            data_path, meta = self._load_sidecar(account, container, blob)
            props = self._props(account, container, blob, data_path, meta)
            if check is not None:
                check(props)
            sdir = data_path.parent / ".snapshots" / data_path.name
            sdir.mkdir(parents=True, exist_ok=True)
            ticks = time.time_ns() // 100
            while True:
                snap = _snapshot_id(ticks)
                try:
                    dst = os.open(sdir / snap, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                    break
                except FileExistsError:
                    ticks += 1
            try:
                src = os.open(data_path, os.O_RDONLY)
                try:
                    reflinked = False
                    if self.reflink:
                        try:
                            ext.reflink(src, dst)
                            reflinked = True
                        except OSError as exc:
                            if not ext.reflink_unsupported(exc):
                                raise
                    if not reflinked:
                        ext.sparse_copy(src, dst)
                finally:
                    os.close(src)
            except BaseException:
                os.close(dst)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(sdir / snap)
                raise
            os.close(dst)
            smeta = {
                "name": blob,
                "blob_type": meta["blob_type"],
                "created": meta["created"],
                "content": meta.get("content") or {},
                "metadata": dict(meta.get("metadata") or {}) if metadata is None
                else dict(metadata),
                "sequence_number": meta.get("sequence_number", 0),
                "etag": props.etag,
                "last_modified": _iso(props.last_modified),
                "reflinked": reflinked,
                "snapshot": snap,
            }
            if meta.get("blocks"):
                smeta["blocks"] = meta["blocks"]
            _write_json(sdir / f"{snap}.json", smeta)
            return snap, self._props_from(account, container, blob, smeta, props.size,
                                          props.etag, props.last_modified, snap)

    def list_snapshots(self, account: str, container: str, blob: str) -> list[str]:
        data_path, _ = self._paths(account, container, blob)
        sdir = data_path.parent / ".snapshots" / data_path.name
        if not sdir.is_dir():
            return []
        return sorted(p.name[:-5] for p in sdir.glob("*.json") if _SNAPSHOT_RE.match(p.name[:-5]))

    def _snapshot_reflinked(self, account: str, container: str, blob: str, snapshot: str
                            ) -> bool:
        _, meta_path = self._snap_paths(account, container, blob, snapshot)
        try:
            return bool(_read_json(meta_path).get("reflinked"))
        except FileNotFoundError:
            raise not_found("snapshot", f"{blob}@{snapshot}") from None

    # --- deleting ------------------------------------------------------------------------

    def delete_blob(self, account: str, container: str, blob: str,
                    snapshot: str | None = None, delete_snapshots: str | None = None) -> None:
        """Delete a blob, or one snapshot (snapshot=...). A blob with snapshots needs
        delete_snapshots: "include" (blob and snapshots) or "only" (its snapshots only)."""
        if delete_snapshots not in (None, "include", "only"):
            raise invalid("x-ms-delete-snapshots", "must be include or only")
        if snapshot and delete_snapshots:
            raise invalid("x-ms-delete-snapshots",
                          "must not be given when deleting a single snapshot")
        with self._locked(account, container, blob):
            if snapshot:
                spath, smeta = self._snap_paths(account, container, blob, snapshot)
                if not smeta.exists():
                    raise not_found("snapshot", f"{blob}@{snapshot}")
                smeta.unlink()
                with contextlib.suppress(FileNotFoundError):
                    spath.unlink()
                return
            data_path, meta_path = self._paths(account, container, blob)
            if not meta_path.exists():
                raise not_found("blob", blob)
            snaps = self.list_snapshots(account, container, blob)
            if snaps and delete_snapshots is None:
                raise VmvaultError(BLOB_SNAPSHOTS_PRESENT, name=blob)
            sdir = data_path.parent / ".snapshots" / data_path.name
            if delete_snapshots in ("include", "only"):
                for snap in snaps:
                    with contextlib.suppress(FileNotFoundError):
                        (sdir / f"{snap}.json").unlink()
                    with contextlib.suppress(FileNotFoundError):
                        (sdir / snap).unlink()
                with contextlib.suppress(OSError):
                    sdir.rmdir()
            if delete_snapshots == "only":
                return
            meta_path.unlink()
            with contextlib.suppress(FileNotFoundError):
                data_path.unlink()
            shutil.rmtree(data_path.parent / ".blocks" / data_path.name, ignore_errors=True)

    # --- listing -------------------------------------------------------------------------

    def list_blobs(self, account: str, container: str, include_snapshots: bool = False,
                   prefix: str | None = None) -> list[BlobProperties]:
        """Blobs in name order; with include_snapshots, each blob's snapshots (oldest first)
        come before the blob itself, as Azure lists them."""
        cdir = self._existing_container(account, container)
        names: list[str] = []
        for meta_path in (cdir / ".meta").glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                name = _read_json(meta_path)["name"]
                if prefix is None or name.startswith(prefix):
                    names.append(name)
        out: list[BlobProperties] = []
        for name in sorted(names):
            if include_snapshots:
                for snap in self.list_snapshots(account, container, name):
                    with contextlib.suppress(VmvaultError):
                        out.append(self.get_properties(account, container, name, snap))
            with contextlib.suppress(VmvaultError):
                out.append(self.get_properties(account, container, name))
        return out

    # --- ranges --------------------------------------------------------------------------

    def _open_version(self, account: str, container: str, blob: str, snapshot: str | None
                      ) -> int:
        return os.open(self.blob_path(account, container, blob, snapshot), os.O_RDONLY)

    def data_ranges(self, account: str, container: str, blob: str,
                    snapshot: str | None = None) -> list[tuple[int, int]]:
        """[(offset, length)] of the ranges that hold data (the rest reads as zeros)."""
        fd = self._open_version(account, container, blob, snapshot)
        try:
            return ext.data_segments(fd)
        finally:
            os.close(fd)

    def _diff_pieces(self, account: str, container: str, blob: str, snapshot: str | None,
                     prev_snapshot: str) -> tuple[list[tuple[int, int, bool]], int]:
        """([(start, end, new_has_data)] pieces that may differ, size of the newer version)."""
        old_fd = self._open_version(account, container, blob, prev_snapshot)
        try:
            new_fd = self._open_version(account, container, blob, snapshot)
            try:
                size = os.fstat(new_fd).st_size
                use_extents = self.reflink and self._snapshot_reflinked(
                    account, container, blob, prev_snapshot) and (
                    snapshot is None
                    or self._snapshot_reflinked(account, container, blob, snapshot))
                if use_extents:
                    old_map = ext.data_mapping(ext.fiemap(old_fd, sync=True))
                    new_map = ext.data_mapping(ext.fiemap(new_fd, sync=True))
                    pieces = [(s, e, nd) for s, e, _od, nd in
                              ext.diff_extent_maps(old_map, new_map, size)]
                else:
                    pieces = _content_diff(old_fd, new_fd, size)
                return pieces, size
            finally:
                os.close(new_fd)
        finally:
            os.close(old_fd)

    def changed_ranges(self, account: str, container: str, blob: str, snapshot: str | None,
                       prev_snapshot: str) -> list[tuple[int, int]]:
        """[(offset, length)] that may differ between prev_snapshot and snapshot (None: the
        blob itself), within the newer version's size; a superset of what changed, merged.
        Reflink: from the extent maps (no data read). Otherwise: by comparing contents."""
        pieces, size = self._diff_pieces(account, container, blob, snapshot, prev_snapshot)
        merged = ext.merge_ranges(ext.align_out(s, e) for s, e, _ in pieces)
        return [(s, min(e, size) - s) for s, e in merged if s < size]

    def page_ranges(self, account: str, container: str, blob: str,
                    snapshot: str | None = None, prev_snapshot: str | None = None,
                    offset: int | None = None, length: int | None = None
                    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(page ranges, clear ranges) as [start, end) byte pairs, 512-aligned. Without
        prev_snapshot: the ranges holding data, no clear ranges. With it: the ranges changed
        since prev_snapshot, split into written (page) and cleared (clear) ones."""
        props = self.get_properties(account, container, blob, snapshot)
        if props.blob_type != PAGE_BLOB:
            raise VmvaultError(BLOB_INVALID_TYPE, name=blob, blob_type=props.blob_type)
        size = props.size
        lo = 0 if offset is None else offset
        hi = size if length is None else min(size, lo + length)
        if prev_snapshot is None:
            pages = [ext.align_out(o, o + n) for o, n in
                     self.data_ranges(account, container, blob, snapshot)]
            return _clip(ext.merge_ranges(pages), lo, hi, size), []
        pieces, size = self._diff_pieces(account, container, blob, snapshot, prev_snapshot)
        hi = min(hi, size)
        written = ext.merge_ranges(ext.align_out(s, e) for s, e, nd in pieces if nd)
        cleared = ext.merge_ranges(ext.align_out(s, e) for s, e, nd in pieces if not nd)
        # A 512-aligned page can hold both (file system blocks are bigger): written wins.
        cleared = _subtract(cleared, written)
        return _clip(written, lo, hi, size), _clip(cleared, lo, hi, size)


# --- block blob writer -------------------------------------------------------------------


class _TempSink:
    """Bytes streamed into a new temporary file (size and MD5 kept); subclasses publish it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.size = 0
        self.md5 = hashlib.md5()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.write(self.fd, view[done:])
        self.md5.update(view)
        self.size += len(view)

    def write_many(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        self._close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class BlockBlobWriter(_TempSink):
    """Streams a block blob's content to a temporary file; commit() publishes it."""

    def __init__(self, store: DiskStore, account: str, container: str, blob: str,
                 data_path: Path, content: dict[str, Any], metadata: dict[str, str] | None,
                 overwrite: bool) -> None:
        self.store, self.account, self.container, self.blob = store, account, container, blob
        self.content, self.metadata, self.overwrite = content, metadata, overwrite
        super().__init__(data_path.with_name(f".up-{data_path.name[:100]}-{secrets.token_hex(6)}"))

    def commit(self) -> BlobProperties:
        self._close()
        content = dict(self.content)
        if not content.get("content_md5"):
            content["content_md5"] = base64.b64encode(self.md5.digest()).decode()
        return self.store._publish(self.account, self.container, self.blob, BLOCK_BLOB,
                                   self.tmp, metadata=self.metadata, content=content,
                                   overwrite=self.overwrite, blocks=[])


class BlockStager(_TempSink):
    """A staged block being received: a temporary file renamed into place by commit()."""

    def __init__(self, final: Path) -> None:
        self.final = final
        super().__init__(final.with_name(f".{final.name}.{secrets.token_hex(4)}"))

    def commit(self) -> int:
        self._close()
        os.replace(self.tmp, self.final)
        return self.size


# --- helpers -------------------------------------------------------------------------------

def _make_etag(*parts: Any) -> str:
    digest = hashlib.sha1(repr(parts).encode()).hexdigest().upper()
    return f'"0x8D{digest[:13]}"'


def _check_page_blob_size(size: int) -> None:
    if size < 0 or size % PAGE:
        raise invalid("x-ms-blob-content-length", f"{size} is not a multiple of 512")
    if size > MAX_PAGE_BLOB_SIZE:
        raise invalid("x-ms-blob-content-length", f"{size} is larger than 8 TiB")


def _clip(ranges: list[tuple[int, int]], lo: int, hi: int, size: int) -> list[tuple[int, int]]:
    out = []
    for s, e in ranges:
        s, e = max(s, lo), min(e, hi, size)
        if s < e:
            out.append((s, e))
    return out


def _subtract(ranges: list[tuple[int, int]], minus: list[tuple[int, int]]
              ) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    j = 0
    for s, e in ranges:
        cur = s
        while j < len(minus) and minus[j][1] <= cur:
            j += 1
        k = j
        while k < len(minus) and minus[k][0] < e:
            ms, me = minus[k]
            if ms > cur:
                out.append((cur, ms))
            cur = max(cur, me)
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def _content_diff(old_fd: int, new_fd: int, size: int) -> list[tuple[int, int, bool]]:
    """Compare contents over the union of both files' data (holes read as zeros)."""
    old_size = os.fstat(old_fd).st_size
    new_data = ext.data_segments(new_fd, 0, size)
    segs = ext.merge_ranges(
        [(o, o + n) for o, n in ext.data_segments(old_fd, 0, min(size, old_size))]
        + [(o, o + n) for o, n in new_data]
    )
    changed: list[tuple[int, int]] = []
    for s, e in segs:
        s -= s % _CMP_BLOCK
        pos = s
        while pos < e:
            n = min(_CMP_CHUNK, e - pos)
            a = os.pread(old_fd, n, pos) if pos < old_size else b""
            b = os.pread(new_fd, n, pos)
            if len(a) < n:
                a = a + bytes(n - len(a))
            if len(b) < n:
                b = b + bytes(n - len(b))
            if a != b:
                ma, mb = memoryview(a), memoryview(b)
                for off in range(0, n, _CMP_BLOCK):
                    if ma[off : off + _CMP_BLOCK] != mb[off : off + _CMP_BLOCK]:
                        changed.append((pos + off, min(pos + off + _CMP_BLOCK, size)))
            pos += n
    changed = ext.merge_ranges(changed)
    # Split each changed range by whether the new version holds data there.
    data_ranges = ext.merge_ranges((o, o + n) for o, n in new_data)
    pieces: list[tuple[int, int, bool]] = []
    for s, e in changed:
        cur = s
        for ds, de in data_ranges:
            if de <= cur or ds >= e:
                continue
            if ds > cur:
                pieces.append((cur, ds, False))
            pieces.append((max(ds, cur), min(de, e), True))
            cur = min(de, e)
        if cur < e:
            pieces.append((cur, e, False))
    return pieces
