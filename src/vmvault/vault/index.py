"""Index files (index/<file id>): which pack holds which chunk.

Sealed file, magic "VMVINDX1" (see chunks.Crypto.seal_file); the zstd-compressed
payload is

    u32 LE pack count
    per pack: pack id (32 raw bytes), then the pack's entry list exactly as in
              its trailer (u32 LE count, 48-byte entries)

The file id is the unkeyed BLAKE3-256 of the file, in lowercase hex.
"""

from __future__ import annotations

import threading
from pathlib import Path

import blake3

from vmvault.errors import VAULT_CORRUPT, VmvaultError

from .chunks import ChunkError, Crypto
from .format import ID_LEN, INDEX_DIR, INDEX_MAGIC, atomic_write, is_hex_id, list_dir
from .pack import PackEntry, PackError, decode_entries, encode_entries

U32_LEN = 4

# (pack id hex, offset, length, raw length, flags)
Location = tuple[str, int, int, int, int]
PackList = list[tuple[str, list[PackEntry]]]


def encode_index(packs: PackList) -> bytes:
    out = bytearray(len(packs).to_bytes(4, "little"))
    for pack_id, entries in packs:
        out += bytes.fromhex(pack_id)
        out += encode_entries(entries)
    return bytes(out)


def decode_index(payload: bytes) -> PackList:
    if len(payload) < U32_LEN:
        raise PackError("truncated")
    count = int.from_bytes(payload[:4], "little")
    pos = 4
    packs: PackList = []
    for _ in range(count):
        if len(payload) < pos + ID_LEN:
            raise PackError("truncated")
        pack_id = payload[pos : pos + ID_LEN].hex()
        entries, pos = decode_entries(payload, pos + ID_LEN)
        packs.append((pack_id, entries))
    if pos != len(payload):
        raise PackError(f"{len(payload) - pos} trailing bytes")
    return packs


def write_index_file(root: Path, crypto: Crypto, packs: PackList) -> str:
    data = crypto.seal_file(INDEX_MAGIC, encode_index(packs))
    file_id = blake3.blake3(data).hexdigest()
    atomic_write(root, root / INDEX_DIR / file_id, data, kind="index")
    return file_id


def read_index_file(root: Path, crypto: Crypto, file_id: str) -> PackList:
    """Raises VAULT_CORRUPT when the file does not decrypt or parse."""
    try:
        data = (root / INDEX_DIR / file_id).read_bytes()
        if blake3.blake3(data).hexdigest() != file_id:
            raise PackError("content does not hash to the file name")
        return decode_index(crypto.open_file(INDEX_MAGIC, data))
    except (ChunkError, PackError) as exc:
        raise VmvaultError(VAULT_CORRUPT, reason=f"index file {file_id}: {exc}") from None


def list_index_files(root: Path) -> list[str]:
    return sorted(e.name for e in list_dir(root / INDEX_DIR) if is_hex_id(e.name))


class Index:
    """The in-memory map chunk id -> location, loaded from all index files.

    When two index files name the same chunk, the first one loaded wins (both
    copies are valid until prune removes one of them).
    """

    def __init__(self) -> None:
        self.entries: dict[bytes, Location] = {}
        self.files: set[str] = set()
        self.lock = threading.Lock()

    def __contains__(self, chunk_id: object) -> bool:
        return chunk_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, chunk_id: bytes) -> Location | None:
        return self.entries.get(chunk_id)

    def add_pack(self, pack_id: str, entries: list[PackEntry]) -> None:
        pack_id = str(pack_id)
        setdefault = self.entries.setdefault
        for e in entries:
            setdefault(e.id, (pack_id, e.offset, e.length, e.raw_length, e.flags))

    def refresh(self, root: Path, crypto: Crypto) -> None:
        """Bring the map up to date with index/: load new files, reload all if one went away."""
        with self.lock:
            names = list_index_files(root)
            if not self.files.issubset(names):
                self.entries = {}
                self.files = set()
            for name in names:
                if name in self.files:
                    continue
                for pack_id, entries in read_index_file(root, crypto, name):
                    self.add_pack(pack_id, entries)
                self.files.add(name)
