"""Constants of the on-disk format (see docs/vault-format.md) and small file helpers.

Everything the vault writes goes through :func:`atomic_write` or the same
temp-file-then-rename rule: a file under its final name is always complete.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from vmvault.errors import VAULT_CORRUPT, VmvaultError, invalid

FORMAT_VERSION = 1

KIB = 1024
MIB = 1024 * KIB
DEFAULT_CHUNK_SIZE = 256 * KIB
MIN_CHUNK_SIZE = 64 * KIB
MAX_CHUNK_SIZE = 4 * MIB
DEFAULT_PACK_SIZE = 32 * MIB
MIN_PACK_SIZE = 64 * KIB  # tests use small packs; production keeps the default
ZSTD_LEVEL = 1  # level 3 costs 1.6x the CPU on mixed text for the same ratio (benchmarks.md)

ID_LEN = 32  # chunk ids, pack ids, index file ids: 32 bytes, 64 hex digits in names
NONCE_LEN = 12
TAG_LEN = 16
SEAL_OVERHEAD = NONCE_LEN + TAG_LEN

# magic numbers: 8 bytes at the start of every binary file
PACK_MAGIC = b"VMVPACK1"
INDEX_MAGIC = b"VMVINDX1"
MANIFEST_MAGIC = b"VMVMANI1"
# associated data of a pack's trailer
PACK_TRAILER_AAD = b"VMVPACK1/trailer"
# associated data prefix of a key slot's wrapped master key (followed by the repository id)
KEYSLOT_AAD_PREFIX = b"VMVKEYS1/"

FLAG_ZSTD = 0x01  # the blob's plaintext is one zstd frame
KNOWN_FLAGS = FLAG_ZSTD

# folders of a vault
CONFIG_NAME = "config"
KEYS_DIR = "keys"
DATA_DIR = "data"
INDEX_DIR = "index"
MANIFESTS_DIR = "manifests"
LOCKS_DIR = "locks"
TMP_DIR = "tmp"

_RP_ID = re.compile(r"[A-Za-z0-9._-]+")
_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_NAME_LEN = 200


def validate_rp_id(rp_id: str) -> str:
    """A recovery point id names a file under manifests/: [A-Za-z0-9._-]+, not '.' or '..'."""
    if (
        not isinstance(rp_id, str)
        or not _RP_ID.fullmatch(rp_id)
        or rp_id in (".", "..")
        or len(rp_id) > MAX_NAME_LEN
    ):
        raise invalid(
            "recovery point id",
            f"{rp_id!r} must be 1-{MAX_NAME_LEN} characters of A-Z a-z 0-9 . _ - "
            "and not '.' or '..'",
        )
    return rp_id


def is_hex_id(name: str) -> bool:
    return bool(_HEX64.fullmatch(name))


def validate_chunk_size(chunk_size: int) -> int:
    if (
        not isinstance(chunk_size, int)
        or chunk_size < MIN_CHUNK_SIZE
        or chunk_size > MAX_CHUNK_SIZE
        or chunk_size & (chunk_size - 1)
    ):
        raise invalid(
            "chunk_size",
            f"{chunk_size!r} must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}",
        )
    return chunk_size


def utc_now() -> str:
    """ISO 8601 UTC time with microseconds and a 'Z' suffix, as stored in the format."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(root: Path, kind: str) -> Path:
    """A fresh temp file name under <vault>/tmp/ (same file system as the final name)."""
    return root / TMP_DIR / f"{kind}-{os.getpid()}-{secrets.token_hex(8)}.tmp"


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def atomic_write(root: Path, dest: Path, data: bytes, *, kind: str, mode: int = 0o644) -> None:
    """Write `data` to `dest` whole or not at all: temp file, fsync, rename, fsync dir."""
    tmp = tmp_name(root, kind)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(dest.parent)


def pread_exact(fd: int, length: int, offset: int, what: str) -> bytes:
    """Read exactly `length` bytes at `offset` or raise VAULT_CORRUPT naming `what`."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            raise VmvaultError(
                VAULT_CORRUPT, reason=f"{what}: file ends at {offset + got}, expected {length} "
                f"bytes at offset {offset}"
            )
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def list_dir(path: Path) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            yield from it
    except FileNotFoundError:
        return
