"""Manifests (manifests/<recovery point id>): one per recovery point.

Sealed file, magic "VMVMANI1", AAD = magic || recovery point id (UTF-8), so a
manifest cannot be renamed to another recovery point. The zstd-compressed
payload is

    u32 LE    length J of the JSON header
    J bytes   JSON header (UTF-8), see Manifest.header()
    per disk, in the header's order:
        zero bitmap: ceil(chunk_count / 8) bytes; bit (i % 8) of byte (i // 8)
                     set = chunk i is all zeros and not stored
        32-byte chunk ids of the stored (non-zero) chunks, in chunk order
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from vmvault.errors import VAULT_CORRUPT, VmvaultError

from .chunks import ChunkError, Crypto
from .format import ID_LEN, MANIFEST_MAGIC, MANIFESTS_DIR, atomic_write, parse_time

MANIFEST_VERSION = 1


@dataclass
class DiskEntry:
    name: str
    size: int
    chunk_size: int
    chunks: list[bytes | None]  # chunk ids; None = an all-zero chunk (not stored)

    @property
    def chunk_count(self) -> int:
        return len(self.chunks)

    def chunk_span(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk `index` on the disk (the last one may be short)."""
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)


@dataclass
class Manifest:
    rp_id: str
    created: str  # ISO 8601 UTC, e.g. "2024-05-01T12:00:00.000000Z"
    repository_id: str
    chunk_size: int
    parent: str | None
    metadata: dict[str, Any]
    disks: list[DiskEntry] = field(default_factory=list)

    @property
    def created_at(self) -> datetime:
        return parse_time(self.created)

    def disk(self, name: str) -> DiskEntry | None:
        for d in self.disks:
            if d.name == name:
                return d
        return None

    def header(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "id": self.rp_id,
            "created": self.created,
            "repository": self.repository_id,
            "chunk_size": self.chunk_size,
            "parent": self.parent,
            "metadata": self.metadata,
            "disks": [
                {
                    "name": d.name,
                    "size": d.size,
                    "chunk_size": d.chunk_size,
                    "chunk_count": len(d.chunks),
                    "stored_chunks": sum(1 for c in d.chunks if c is not None),
                }
                for d in self.disks
            ],
        }


def expected_chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def encode_manifest(m: Manifest) -> bytes:
    header = json.dumps(m.header(), sort_keys=True, separators=(",", ":")).encode("utf-8")
    out = bytearray(len(header).to_bytes(4, "little"))
    out += header
    for d in m.disks:
        bitmap = bytearray((len(d.chunks) + 7) // 8)
        ids = bytearray()
        for i, cid in enumerate(d.chunks):
            if cid is None:
                bitmap[i >> 3] |= 1 << (i & 7)
            else:
                ids += cid
        out += bitmap
        out += ids
    return bytes(out)


def decode_manifest(rp_id: str, payload: bytes) -> Manifest:
    """Parse a manifest payload; ValueError/KeyError/TypeError when malformed."""
    jlen = int.from_bytes(payload[:4], "little")
    header = json.loads(payload[4 : 4 + jlen].decode("utf-8"))
    if header.get("version") != MANIFEST_VERSION:
        raise ValueError(f"unknown manifest version {header.get('version')!r}")
    if header["id"] != rp_id:
        raise ValueError(f"names recovery point {header['id']!r}")
    view = memoryview(payload)
    pos = 4 + jlen
    disks = []
    for dh in header["disks"]:
        count = int(dh["chunk_count"])
        size = int(dh["size"])
        chunk_size = int(dh["chunk_size"])
        if count != expected_chunk_count(size, chunk_size):
            raise ValueError(f"disk {dh['name']!r}: {count} chunks for {size} bytes")
        nbytes = (count + 7) // 8
        bitmap = view[pos : pos + nbytes]
        if len(bitmap) != nbytes:
            raise ValueError("truncated")
        pos += nbytes
        chunks: list[bytes | None] = [None] * count
        for i in range(count):
            if not bitmap[i >> 3] & (1 << (i & 7)):
                cid = bytes(view[pos : pos + ID_LEN])
                if len(cid) != ID_LEN:
                    raise ValueError("truncated")
                chunks[i] = cid
                pos += ID_LEN
        disks.append(DiskEntry(str(dh["name"]), size, chunk_size, chunks))
    if pos != len(payload):
        raise ValueError(f"{len(payload) - pos} trailing bytes")
    metadata = header.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError("metadata is not an object")
    return Manifest(
        rp_id=rp_id,
        created=str(header["created"]),
        repository_id=str(header["repository"]),
        chunk_size=int(header["chunk_size"]),
        parent=header.get("parent"),
        metadata=metadata,
        disks=disks,
    )


def write_manifest(root: Path, crypto: Crypto, m: Manifest) -> None:
    data = crypto.seal_file(MANIFEST_MAGIC, encode_manifest(m), m.rp_id.encode("utf-8"))
    atomic_write(root, root / MANIFESTS_DIR / m.rp_id, data, kind="manifest")


def read_manifest(root: Path, crypto: Crypto, rp_id: str) -> Manifest:
    """Raises FileNotFoundError when absent, VAULT_CORRUPT when damaged."""
    data = (root / MANIFESTS_DIR / rp_id).read_bytes()
    try:
        payload = crypto.open_file(MANIFEST_MAGIC, data, rp_id.encode("utf-8"))
        return decode_manifest(rp_id, payload)
    except (ChunkError, ValueError, KeyError, TypeError) as exc:
        raise VmvaultError(VAULT_CORRUPT, reason=f"manifest {rp_id}: {exc}") from None
