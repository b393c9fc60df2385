"""Chunk ids, compression and encryption; also the sealed-file envelope of index and manifest.

All functions here are safe to call from several threads at once: the zstd
contexts are per thread, and BLAKE3, zstd and AES-GCM release the GIL on large
buffers, which is what lets the backup and restore pipelines use every core.
"""

from __future__ import annotations

import os
import threading

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .format import FLAG_ZSTD, KNOWN_FLAGS, NONCE_LEN, SEAL_OVERHEAD, TAG_LEN, ZSTD_LEVEL
from .keys import MasterKey

Buffer = bytes | bytearray | memoryview


class ChunkError(Exception):
    """A blob does not decrypt, decompress or hash to its id (the caller names pack and chunk)."""


class Crypto:
    """The vault's keys in use: chunk ids, chunk blobs, sealed files."""

    def __init__(self, master: MasterKey, *, level: int = ZSTD_LEVEL) -> None:
        self._id_key = master.id_key
        self._aead = AESGCM(master.enc_key)
        self._level = level
        self._local = threading.local()

    # --- per-thread zstd contexts -------------------------------------------------
    def _cctx(self) -> zstandard.ZstdCompressor:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = zstandard.ZstdCompressor(level=self._level, write_content_size=True)
            self._local.cctx = cctx
        return cctx

    def _dctx(self) -> zstandard.ZstdDecompressor:
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = zstandard.ZstdDecompressor()
            self._local.dctx = dctx
        return dctx

    # --- chunks ---------------------------------------------------------------------
    def chunk_id(self, data: Buffer) -> bytes:
        """Keyed BLAKE3-256 of the chunk's plaintext."""
        return blake3.blake3(data, key=self._id_key).digest()

    def seal_chunk(self, chunk_id: bytes, data: Buffer) -> tuple[bytearray, int]:
        """Compress (when it pays) and encrypt a chunk: (blob, flags).

        blob = nonce (12) || AES-256-GCM(payload, AAD = chunk id) || tag (16).
        """
        raw_len = len(data)
        payload: Buffer = data
        flags = 0
        compressed = self._cctx().compress(data)
        if len(compressed) <= raw_len - (raw_len >> 5):  # saves at least 1/32
            payload = compressed
            flags = FLAG_ZSTD
        nonce = os.urandom(NONCE_LEN)
        blob = bytearray(NONCE_LEN + len(payload) + TAG_LEN)
        blob[:NONCE_LEN] = nonce
        self._aead.encrypt_into(nonce, payload, chunk_id, memoryview(blob)[NONCE_LEN:])
        return blob, flags

    def open_chunk(self, chunk_id: bytes, blob: Buffer, flags: int, raw_len: int) -> bytes:
        """Decrypt, decompress and verify one blob; ChunkError on any mismatch."""
        if flags & ~KNOWN_FLAGS:
            raise ChunkError(f"unknown flags {flags:#x}")
        if len(blob) < SEAL_OVERHEAD:
            raise ChunkError(f"blob of {len(blob)} bytes is too short")
        view = memoryview(blob)
        try:
            payload = self._aead.decrypt(view[:NONCE_LEN], view[NONCE_LEN:], chunk_id)
        except InvalidTag:
            raise ChunkError("authentication failed (damaged or swapped blob)") from None
        if flags & FLAG_ZSTD:
            try:
                data = self._dctx().decompress(payload, max_output_size=raw_len)
            except zstandard.ZstdError as exc:
                raise ChunkError(f"zstd: {exc}") from None
        else:
            data = payload
        if len(data) != raw_len:
            raise ChunkError(f"length {len(data)} differs from the recorded {raw_len}")
        if self.chunk_id(data) != chunk_id:
            raise ChunkError("content does not hash to the chunk id")
        return data

    def open_chunk_into(
        self, chunk_id: bytes, blob: Buffer, flags: int, raw_len: int, out: memoryview
    ) -> Buffer:
        """open_chunk without allocating for an uncompressed chunk: it is decrypted into
        out[:raw_len] and that view is returned. A compressed chunk's payload is decrypted
        into `out` as scratch and the chunk comes back as new bytes. `out` (at least
        raw_len bytes) holds unauthenticated bytes after a ChunkError.
        """
        if flags & ~KNOWN_FLAGS:
            raise ChunkError(f"unknown flags {flags:#x}")
        view = memoryview(blob)
        plen = len(view) - SEAL_OVERHEAD
        if plen < 0:
            raise ChunkError(f"blob of {len(view)} bytes is too short")
        if plen > len(out) or not (flags & FLAG_ZSTD or plen == raw_len):
            return self.open_chunk(chunk_id, blob, flags, raw_len)  # too big or malformed
        payload = out[:plen]
        try:
            self._aead.decrypt_into(view[:NONCE_LEN], view[NONCE_LEN:], chunk_id, payload)
        except InvalidTag:
            raise ChunkError("authentication failed (damaged or swapped blob)") from None
        data: Buffer = payload
        if flags & FLAG_ZSTD:
            try:
                data = self._dctx().decompress(payload, max_output_size=raw_len)
            except zstandard.ZstdError as exc:
                raise ChunkError(f"zstd: {exc}") from None
        if len(data) != raw_len:
            raise ChunkError(f"length {len(data)} differs from the recorded {raw_len}")
        if self.chunk_id(data) != chunk_id:
            raise ChunkError("content does not hash to the chunk id")
        return data

    # --- sealed files (index, manifest) and the pack trailer ---------------------------
    def seal(self, plaintext: Buffer, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def unseal(self, sealed: Buffer, aad: bytes) -> bytes:
        """Raises ChunkError when authentication fails."""
        if len(sealed) < SEAL_OVERHEAD:
            raise ChunkError("too short")
        view = memoryview(sealed)
        try:
            return self._aead.decrypt(view[:NONCE_LEN], view[NONCE_LEN:], aad)
        except InvalidTag:
            raise ChunkError("authentication failed") from None

    def seal_file(self, magic: bytes, payload: bytes, extra_aad: bytes = b"") -> bytes:
        """magic (8) || nonce (12) || AES-256-GCM(zstd(payload), AAD = magic || extra) || tag."""
        compressed = self._cctx().compress(payload)
        return magic + self.seal(compressed, magic + extra_aad)

    def open_file(self, magic: bytes, data: bytes, extra_aad: bytes = b"") -> bytes:
        """Inverse of seal_file; ChunkError on a wrong magic, authentication or zstd failure."""
        if data[: len(magic)] != magic:
            raise ChunkError(f"bad magic {data[:len(magic)]!r}, expected {magic!r}")
        compressed = self.unseal(memoryview(data)[len(magic) :], magic + extra_aad)
        try:
            return self._dctx().decompress(compressed)
        except zstandard.ZstdError as exc:
            raise ChunkError(f"zstd: {exc}") from None
