"""The master key and the key slots (keys/<slot id>) that wrap it.

The master key is 64 random bytes: an AES-256-GCM key for everything the vault
encrypts, then a 32-byte BLAKE3 key for chunk ids. It never touches the disk in
clear: each slot holds it wrapped (AES-256-GCM) under a key-encryption key
derived from a password (Argon2id) or from a key file's 32-byte secret
(HKDF-SHA256).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vmvault.errors import VAULT_CORRUPT, VAULT_WRONG_PASSWORD, VmvaultError, invalid

from .format import KEYS_DIR, KEYSLOT_AAD_PREFIX, NONCE_LEN, atomic_write, list_dir, utc_now

MASTER_KEY_LEN = 64
KEY_FILE_SECRET_LEN = 32
SLOT_VERSION = 1
HKDF_INFO = b"vmvault key file slot v1"
ARGON2_VERSION = 19  # 0x13


@dataclass(frozen=True)
class KdfParams:
    """Argon2id parameters of a password slot (stored in the slot)."""

    time_cost: int = 3
    memory_cost_kib: int = 64 * 1024
    parallelism: int = 2


FAST_KDF = KdfParams(time_cost=1, memory_cost_kib=8 * 1024, parallelism=1)  # tests only


@dataclass(frozen=True)
class MasterKey:
    enc_key: bytes  # AES-256-GCM key
    id_key: bytes  # BLAKE3 key for chunk ids

    @classmethod
    def generate(cls) -> MasterKey:
        return cls.from_bytes(secrets.token_bytes(MASTER_KEY_LEN))

    @classmethod
    def from_bytes(cls, raw: bytes) -> MasterKey:
        if len(raw) != MASTER_KEY_LEN:
            raise ValueError("master key must be 64 bytes")
        return cls(enc_key=bytes(raw[:32]), id_key=bytes(raw[32:]))

    def to_bytes(self) -> bytes:
        return self.enc_key + self.id_key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("expected a base64 string")
    return base64.b64decode(text.encode("ascii"), validate=True)


# --- key files ---------------------------------------------------------------


def parse_key_file(data: bytes) -> bytes | None:
    """A key file holds 64 hex digits (the 32-byte secret) and optional whitespace."""
    text = data.strip()
    if len(text) != 2 * KEY_FILE_SECRET_LEN:
        return None
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None


def ensure_key_file(path: Path) -> bytes:
    """Return the key file's secret, creating the file (mode 0600) if it does not exist."""
    secret = secrets.token_bytes(KEY_FILE_SECRET_LEN)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        existing = parse_key_file(Path(path).read_bytes())
        if existing is None:
            raise invalid(
                "key_file", f"{path} exists but is not a vmvault key file (64 hex digits)"
            ) from None
        return existing
    try:
        os.write(fd, (secret.hex() + "\n").encode("ascii"))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    return secret


def read_key_file(path: Path) -> bytes | None:
    try:
        return parse_key_file(Path(path).read_bytes())
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EISDIR, errno.EACCES):
            return None
        raise


# --- key-encryption keys -----------------------------------------------------


def _argon2_kek(password: str, salt: bytes, params: KdfParams) -> bytes:
    return hash_secret_raw(
        secret=password.encode("utf-8"),
        salt=salt,
        time_cost=params.time_cost,
        memory_cost=params.memory_cost_kib,
        parallelism=params.parallelism,
        hash_len=32,
        type=Type.ID,
        version=ARGON2_VERSION,
    )


def _hkdf_kek(secret: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=HKDF_INFO).derive(secret)


def _wrap(kek: bytes, master: MasterKey, repo_id: str) -> tuple[bytes, bytes]:
    nonce = secrets.token_bytes(NONCE_LEN)
    wrapped = AESGCM(kek).encrypt(nonce, master.to_bytes(), KEYSLOT_AAD_PREFIX + repo_id.encode())
    return nonce, wrapped


def password_slot(master: MasterKey, repo_id: str, password: str, params: KdfParams) -> dict:
    salt = secrets.token_bytes(16)
    nonce, wrapped = _wrap(_argon2_kek(password, salt, params), master, repo_id)
    return {
        "version": SLOT_VERSION,
        "type": "password",
        "created": utc_now(),
        "kdf": {
            "algorithm": "argon2id",
            "version": ARGON2_VERSION,
            "time_cost": params.time_cost,
            "memory_cost_kib": params.memory_cost_kib,
            "parallelism": params.parallelism,
            "hash_len": 32,
            "salt": _b64(salt),
        },
        "nonce": _b64(nonce),
        "wrapped_key": _b64(wrapped),
    }


def key_file_slot(master: MasterKey, repo_id: str, secret: bytes) -> dict:
    salt = secrets.token_bytes(16)
    nonce, wrapped = _wrap(_hkdf_kek(secret, salt), master, repo_id)
    return {
        "version": SLOT_VERSION,
        "type": "key_file",
        "created": utc_now(),
        "kdf": {"algorithm": "hkdf-sha256", "info": HKDF_INFO.decode(), "salt": _b64(salt)},
        "nonce": _b64(nonce),
        "wrapped_key": _b64(wrapped),
    }


def unwrap_slot(
    slot: dict, repo_id: str, *, password: str | None = None, secret: bytes | None = None
) -> MasterKey | None:
    """The master key if this slot opens with the password or key file secret, else None.

    Raises ValueError/KeyError/TypeError when the slot itself is malformed.
    """
    if slot.get("version") != SLOT_VERSION:
        raise ValueError(f"unknown key slot version {slot.get('version')!r}")
    kdf = slot["kdf"]
    salt = _unb64(kdf["salt"])
    if slot["type"] == "password":
        if password is None:
            return None
        if kdf["algorithm"] != "argon2id" or kdf.get("hash_len", 32) != 32:
            raise ValueError(f"unsupported kdf {kdf['algorithm']!r}")
        params = KdfParams(
            time_cost=int(kdf["time_cost"]),
            memory_cost_kib=int(kdf["memory_cost_kib"]),
            parallelism=int(kdf["parallelism"]),
        )
        kek = _argon2_kek(password, salt, params)
    elif slot["type"] == "key_file":
        if secret is None:
            return None
        if kdf["algorithm"] != "hkdf-sha256":
            raise ValueError(f"unsupported kdf {kdf['algorithm']!r}")
        kek = _hkdf_kek(secret, salt)
    else:
        raise ValueError(f"unknown key slot type {slot['type']!r}")
    try:
        raw = AESGCM(kek).decrypt(
            _unb64(slot["nonce"]),
            _unb64(slot["wrapped_key"]),
            KEYSLOT_AAD_PREFIX + repo_id.encode(),
        )
    except InvalidTag:
        return None
    return MasterKey.from_bytes(raw)


# --- slot files ----------------------------------------------------------------


def write_slot(root: Path, slot: dict) -> str:
    slot_id = secrets.token_hex(16)
    data = json.dumps(slot, indent=2, sort_keys=True).encode() + b"\n"
    atomic_write(root, root / KEYS_DIR / slot_id, data, kind="key")
    return slot_id


def load_slots(root: Path) -> list[tuple[str, dict | None, str | None]]:
    """All key slots as (slot id, parsed JSON or None, problem or None)."""
    slots: list[tuple[str, dict | None, str | None]] = []
    for entry in sorted(list_dir(root / KEYS_DIR), key=lambda e: e.name):
        if not entry.is_file():
            continue
        try:
            slot = json.loads(Path(entry.path).read_bytes())
            if not isinstance(slot, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            slots.append((entry.name, None, str(exc)))
            continue
        slots.append((entry.name, slot, None))
    return slots


def unlock(
    root: Path, repo_id: str, *, key_file: Path | None, password: str | None
) -> MasterKey:
    """Open the master key with a key file and/or a password; VAULT_WRONG_PASSWORD if none fits.

    Malformed slots are skipped (check reports them); if every slot is malformed the
    vault is corrupt.
    """
    if key_file is None and password is None:
        raise invalid("key_file/password", "give a key file, a password, or both")
    secret = read_key_file(key_file) if key_file is not None else None
    slots = load_slots(root)
    problems = []
    for slot_id, slot, problem in slots:
        if slot is None:
            problems.append(f"key slot {slot_id}: {problem}")
            continue
        try:
            master = unwrap_slot(slot, repo_id, password=password, secret=secret)
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"key slot {slot_id}: {exc}")
            continue
        if master is not None:
            return master
    if not slots:
        raise VmvaultError(VAULT_CORRUPT, reason=f"no key slots under {root / KEYS_DIR}")
    if len(problems) == len(slots):
        raise VmvaultError(VAULT_CORRUPT, reason="; ".join(problems))
    raise VmvaultError(VAULT_WRONG_PASSWORD, name=str(root))
