"""The VM's certificate: its identity towards the server, and the key protected settings
are encrypted to (docs/agent-protocol.md, section 2).

Files and formats are Azure's, so that Azure's own extension can open what vmvault sends:
``<THUMBPRINT>.crt`` (PEM certificate) and ``<THUMBPRINT>.prv`` (PEM PKCS#8 key) in the
agent's library folder; protected settings are base64 of a CMS EnvelopedData (DER).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

CLOCK_SKEW = dt.timedelta(minutes=5)
SIGNED_HEADERS = ("x-vmvault-vm-id", "x-vmvault-thumbprint", "x-vmvault-date",
                  "x-vmvault-signature")


class CertificateError(Exception):
    """A certificate, key, signature or CMS message that cannot be used."""


@dataclass(frozen=True)
class Identity:
    certificate_pem: bytes
    key_pem: bytes

    @property
    def thumbprint(self) -> str:
        return thumbprint(self.certificate_pem)

    def save(self, lib_dir: Path) -> tuple[Path, Path]:
        """Write <THUMB>.crt and <THUMB>.prv (mode 600) into the agent's library folder."""
        lib_dir.mkdir(parents=True, exist_ok=True)
        crt, prv = lib_dir / f"{self.thumbprint}.crt", lib_dir / f"{self.thumbprint}.prv"
        fd = os.open(prv, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem)
        crt.write_bytes(self.certificate_pem)
        return crt, prv

    @classmethod
    def load(cls, lib_dir: Path, thumb: str) -> Identity:
        try:
            return cls((lib_dir / f"{thumb}.crt").read_bytes(),
                       (lib_dir / f"{thumb}.prv").read_bytes())
        except OSError as exc:
            raise CertificateError(f"certificate {thumb} not found in {lib_dir}: {exc}") from exc


def make_identity(common_name: str, years: int = 10) -> Identity:
    """A new RSA-2048 key and a self-signed certificate for it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365 * years))
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return Identity(cert.public_bytes(serialization.Encoding.PEM),
                    key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))


def load_certificate(pem: bytes | str) -> x509.Certificate:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate: {exc}") from exc


def thumbprint(pem: bytes | str) -> str:
    """Azure's certificate thumbprint: SHA-1 of the DER, upper-case hex."""
    der = load_certificate(pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha1(der).hexdigest().upper()  # noqa: S324 - Azure's definition


# --- protected settings (CMS EnvelopedData) -----------------------------------------------------


def encrypt_settings(settings: dict[str, Any], certificate_pem: bytes | str) -> str:
    """base64 of a CMS EnvelopedData (DER, AES-256-CBC) holding the settings' JSON."""
    cert = load_certificate(certificate_pem)
    der = (pkcs7.PKCS7EnvelopeBuilder()
           .set_data(json.dumps(settings, separators=(",", ":")).encode())
           .add_recipient(cert)
           .set_content_encryption_algorithm(algorithms_aes256())
           .encrypt(serialization.Encoding.DER, []))
    return base64.b64encode(der).decode()


def algorithms_aes256() -> Any:
    from cryptography.hazmat.primitives.ciphers import algorithms

    return algorithms.AES256


def decrypt_settings(protected: str, identity: Identity) -> dict[str, Any]:
    """Open protected settings encrypted to this identity; CertificateError when they are not
    a CMS message, not addressed to this certificate, or not a JSON object."""
    try:
        der = base64.b64decode(protected, validate=True)
    except (ValueError, TypeError) as exc:
        raise CertificateError("protectedSettings is not base64 (not encrypted?)") from exc
    cert = load_certificate(identity.certificate_pem)
    key = serialization.load_pem_private_key(identity.key_pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CertificateError("the VM's key is not an RSA key")
    try:
        plain = pkcs7.pkcs7_decrypt_der(der, cert, key, [])
    except ValueError as exc:
        raise CertificateError(
            f"protectedSettings cannot be decrypted with certificate {identity.thumbprint}: "
            f"{exc}") from exc
    try:
        value = json.loads(plain)
    except ValueError as exc:
        raise CertificateError("decrypted protectedSettings are not JSON") from exc
    if not isinstance(value, dict):
        raise CertificateError("decrypted protectedSettings are not a JSON object")
    return value


# --- signed agent requests ------------------------------------------------------------------


def string_to_sign(method: str, path_and_query: str, date: str, body: bytes) -> bytes:
    return "\n".join([method.upper(), path_and_query, date,
                      hashlib.sha256(body).hexdigest()]).encode()


def sign_request(identity: Identity, vm_id: str, method: str, path_and_query: str,
                 body: bytes, now: dt.datetime | None = None) -> dict[str, str]:
    """The headers that authenticate one agent request."""
    date = format_datetime(now or dt.datetime.now(dt.UTC), usegmt=True)
    key = serialization.load_pem_private_key(identity.key_pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    sig = key.sign(string_to_sign(method, path_and_query, date, body), padding.PKCS1v15(),
                   hashes.SHA256())
    return {"x-vmvault-vm-id": vm_id, "x-vmvault-thumbprint": identity.thumbprint,
            "x-vmvault-date": date, "x-vmvault-signature": base64.b64encode(sig).decode()}


def verify_request(certificate_pem: bytes | str, headers: dict[str, str], method: str,
                   path_and_query: str, body: bytes, now: dt.datetime | None = None) -> None:
    """Raise CertificateError unless the headers carry a fresh, valid signature by the key of
    this certificate."""
    missing = [h for h in SIGNED_HEADERS if not headers.get(h)]
    if missing:
        raise CertificateError(f"missing header(s) {', '.join(missing)}")
    if headers["x-vmvault-thumbprint"].upper() != thumbprint(certificate_pem):
        raise CertificateError("the certificate thumbprint is not the VM's registered one")
    try:
        when = parsedate_to_datetime(headers["x-vmvault-date"])
    except (TypeError, ValueError) as exc:
        raise CertificateError("x-vmvault-date is not an RFC 1123 date") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    if abs((now or dt.datetime.now(dt.UTC)) - when) > CLOCK_SKEW:
        raise CertificateError("x-vmvault-date is more than 5 minutes from the server's clock")
    public = load_certificate(certificate_pem).public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    try:
        signature = base64.b64decode(headers["x-vmvault-signature"], validate=True)
        public.verify(signature, string_to_sign(method, path_and_query,
                                                headers["x-vmvault-date"], body),
                      padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError) as exc:
        raise CertificateError("the request signature does not verify") from exc
