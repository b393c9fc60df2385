"""Pack files: data/<2 hex>/<pack id>.

    offset 0        8 bytes   magic "VMVPACK1"
    offset 8        blobs, back to back (nonce || ciphertext || tag each)
    offset T        sealed trailer: nonce (12) || AES-256-GCM(trailer) || tag (16),
                    AAD = "VMVPACK1/trailer"
    offset size-4   u32 LE: length of the sealed trailer

trailer = u32 LE entry count, then one 48-byte entry per blob (see ENTRY).
The pack id is the unkeyed BLAKE3-256 of the whole file, in lowercase hex.
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import blake3

from .chunks import ChunkError, Crypto
from .format import (
    DATA_DIR,
    ID_LEN,
    KNOWN_FLAGS,
    PACK_MAGIC,
    PACK_TRAILER_AAD,
    SEAL_OVERHEAD,
    fsync_dir,
    pread_exact,
    tmp_name,
    write_all,
)

# id (32) | offset u32 | length u32 | raw length u32 | flags u8 | 3 reserved zero bytes
ENTRY = struct.Struct("<32sIIIB3x")
U32 = struct.Struct("<I")
FOOTER_LEN = 4
HEADER_LEN = len(PACK_MAGIC)


class PackError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class PackEntry:
    id: bytes  # chunk id (32 bytes)
    offset: int  # of the blob in the pack
    length: int  # of the blob (nonce + ciphertext + tag)
    raw_length: int  # of the chunk's plaintext
    flags: int


def pack_path(root: Path, pack_id: str) -> Path:
    return root / DATA_DIR / pack_id[:2] / pack_id


def encode_entries(entries: list[PackEntry]) -> bytes:
    out = bytearray(U32.pack(len(entries)))
    for e in entries:
        out += ENTRY.pack(e.id, e.offset, e.length, e.raw_length, e.flags)
    return bytes(out)


def decode_entries(data: bytes | memoryview, pos: int = 0) -> tuple[list[PackEntry], int]:
    """Parse a count-prefixed entry list at `pos`; returns (entries, end position)."""
    if len(data) < pos + 4:
        raise PackError("entry list truncated")
    (count,) = U32.unpack_from(data, pos)
    pos += 4
    end = pos + count * ENTRY.size
    if len(data) < end:
        raise PackError(f"entry list of {count} entries truncated")
    entries = [
        PackEntry(*ENTRY.unpack_from(data, pos + i * ENTRY.size)) for i in range(count)
    ]
    return entries, end


class PackWriter:
    """Appends blobs to a temp file; finish() writes the trailer and returns the pack id."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_path = tmp_name(root, "pack")
        self.fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._hasher = blake3.blake3()
        self.entries: list[PackEntry] = []
        self.size = 0
        self._write(PACK_MAGIC)

    def _write(self, data: bytes | bytearray) -> None:
        write_all(self.fd, data)
        self._hasher.update(data)
        self.size += len(data)

    def add(self, chunk_id: bytes, blob: bytes | bytearray, flags: int, raw_length: int) -> None:
        self.entries.append(PackEntry(chunk_id, self.size, len(blob), raw_length, flags))
        self._write(blob)

    def finish(self, crypto: Crypto) -> str:
        """Write trailer and footer; the file is then complete but not yet durable or named."""
        sealed = crypto.seal(encode_entries(self.entries), PACK_TRAILER_AAD)
        self._write(sealed + U32.pack(len(sealed)))
        return self._hasher.hexdigest()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(OSError):
            os.unlink(self.tmp_path)


def commit_pack(root: Path, fd: int, tmp_path: Path, pack_id: str) -> None:
    """fsync, close and rename a finished pack to its final name, then fsync its folder."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    dest = pack_path(root, pack_id)
    os.rename(tmp_path, dest)
    fsync_dir(dest.parent)


def read_trailer(fd: int, size: int, crypto: Crypto, name: str) -> list[PackEntry]:
    """The entries of a pack from its trailer; PackError when the pack is malformed."""
    if size < HEADER_LEN + SEAL_OVERHEAD + 4 + FOOTER_LEN:
        raise PackError(f"pack {name}: {size} bytes is too short")
    magic = pread_exact(fd, HEADER_LEN, 0, f"pack {name}")
    if magic != PACK_MAGIC:
        raise PackError(f"pack {name}: bad magic {magic!r}")
    (sealed_len,) = U32.unpack(pread_exact(fd, FOOTER_LEN, size - FOOTER_LEN, f"pack {name}"))
    start = size - FOOTER_LEN - sealed_len
    if sealed_len < SEAL_OVERHEAD + 4 or start < HEADER_LEN:
        raise PackError(f"pack {name}: bad trailer length {sealed_len}")
    sealed = pread_exact(fd, sealed_len, start, f"pack {name}")
    try:
        plain = crypto.unseal(sealed, PACK_TRAILER_AAD)
    except ChunkError as exc:
        raise PackError(f"pack {name}: trailer {exc}") from None
    entries, end = decode_entries(plain)
    if end != len(plain):
        raise PackError(f"pack {name}: trailer has {len(plain) - end} trailing bytes")
    for e in entries:
        if (
            len(e.id) != ID_LEN
            or e.offset < HEADER_LEN
            or e.offset + e.length > start
            or e.length < SEAL_OVERHEAD
            or e.flags & ~KNOWN_FLAGS
        ):
            raise PackError(f"pack {name}: trailer entry for chunk {e.id.hex()} is out of bounds")
    return entries


def blobs_end(fd: int, size: int) -> int:
    """Offset where the blobs end (start of the sealed trailer), from the footer."""
    (sealed_len,) = U32.unpack(os.pread(fd, FOOTER_LEN, size - FOOTER_LEN))
    return size - FOOTER_LEN - sealed_len
