"""The handler's inputs: HandlerEnvironment.json and config/<N>.settings, read and validated.

Validation follows the seed's schema (vmsnapshot-extension.md) and Azure's parameter parser
(wire spec sections 1.3-1.5 and 2). Every problem becomes a :class:`SettingsError` with the
status code Azure uses and a message naming the field; :func:`read_settings` never raises for
bad input, it collects the problems in ``Settings.errors`` (the first one decides the code)
and keeps whatever it could read, so that the status can still go to the status blob.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import json
import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from vmvault.extensions.vmsnapshot import codes
from vmvault.guest.certificates import CertificateError, Identity, decrypt_settings

VM_TYPES = ("microsoft.compute/virtualmachines", "microsoft.classiccompute/virtualmachines")
COMMAND_MAX_AGE = dt.timedelta(minutes=140)
TICKS_EPOCH = dt.datetime(1, 1, 1, tzinfo=dt.UTC)
MAX_TICKS = 3_155_378_975_999_999_999  # DateTime.MaxValue.Ticks
_LOCALE = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$")
_THUMBPRINT = re.compile(r"^[0-9A-Fa-f]{40}$")
_METADATA_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER_VALUE = re.compile(r"^[\x20-\x7e]*$")
SAS_PARAMS = ("sig", "se", "sp")


class SettingsError(Exception):
    """A setting that cannot be used: the status code to report and a message naming it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _param(message: str) -> SettingsError:
    return SettingsError(codes.ERROR_PARAMETER, message)


# --- HandlerEnvironment.json ----------------------------------------------------------------


@dataclass(frozen=True)
class HandlerEnvironment:
    name: str
    version: str
    log_folder: Path
    config_folder: Path
    status_folder: Path
    heartbeat_file: Path | None = None
    events_folder: Path | None = None


def load_handler_environment(handler_dir: Path) -> HandlerEnvironment:
    """Read ``<handler_dir>/HandlerEnvironment.json`` (a list, of which element 0 is used, or
    an object). SettingsError (code 2) when it is missing or incomplete."""
    path = handler_dir / "HandlerEnvironment.json"
    try:
        doc: Any = json.loads(path.read_text())
    except OSError as exc:
        raise SettingsError(codes.ERROR, f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise SettingsError(codes.ERROR, f"{path} is not JSON: {exc}") from None
    if isinstance(doc, list) and doc:
        doc = doc[0]
    env = doc.get("handlerEnvironment") if isinstance(doc, dict) else None
    if not isinstance(env, dict):
        raise SettingsError(codes.ERROR, f"{path} has no handlerEnvironment object")

    def folder(key: str, required: bool = True) -> Path | None:
        value = env.get(key)
        if isinstance(value, str) and value:
            return Path(value)
        if required:
            raise SettingsError(codes.ERROR, f"{path}: handlerEnvironment.{key} is missing")
        return None

    log_folder, config_folder = folder("logFolder"), folder("configFolder")
    status_folder = folder("statusFolder")
    assert log_folder and config_folder and status_folder
    return HandlerEnvironment(str(doc.get("name") or "Microsoft.RecoveryServices.VMSnapshot"),
                              str(doc.get("version") or ""), log_folder, config_folder,
                              status_folder, folder("heartbeatFile", False),
                              folder("eventsFolder", False))


def find_sequence(config_folder: Path, env_value: str | None) -> int | None:
    """The sequence number: ``ConfigSequenceNumber`` if set, else the number of the newest
    ``*.settings`` file; None when there is none."""
    if env_value is not None and env_value.strip() not in ("", "-1"):
        try:
            seq = int(env_value.strip())
        except ValueError:
            raise SettingsError(codes.ERROR, f"ConfigSequenceNumber {env_value!r} is not a "
                                             "number") from None
        if seq < 0:
            raise SettingsError(codes.ERROR, f"ConfigSequenceNumber {seq} is negative")
        return seq
    newest: tuple[float, int] | None = None
    for path in config_folder.glob("*.settings"):
        if not path.stem.isdigit():
            continue
        key = (path.stat().st_mtime, int(path.stem))
        if newest is None or key > newest:
            newest = key
    return newest[1] if newest else None


# --- config/<N>.settings ------------------------------------------------------------------


@dataclass
class Settings:
    sequence: int
    path: Path
    task_id: str | None = None
    command: str | None = None  # "install" or "snapshot"
    locale: str | None = None
    start_ticks: int | None = None
    start_ticks_text: str | None = None
    vm_type: str | None = None
    backup_metadata: list[tuple[str, str]] = field(default_factory=list)
    included_disks: dict[str, Any] = field(default_factory=dict)
    blob_sas_uris: list[str] = field(default_factory=list)
    logs_blob_uri: str | None = None
    status_blob_uri: str | None = None
    had_protected: bool = False
    errors: list[SettingsError] = field(default_factory=list)

    @property
    def error(self) -> SettingsError | None:
        return self.errors[0] if self.errors else None

    @property
    def start_time(self) -> dt.datetime | None:
        return ticks_to_datetime(self.start_ticks) if self.start_ticks is not None else None

    def check(self, fn: Callable[[], None]) -> None:
        """Run one validation step; a SettingsError is recorded, not raised."""
        try:
            fn()
        except SettingsError as exc:
            self.errors.append(exc)


def read_settings(config_folder: Path, sequence: int, lib_dir: Path,
                  now: dt.datetime | None = None) -> Settings:
    """Read and validate ``<config_folder>/<sequence>.settings``; decrypt the protected
    settings with ``<lib_dir>/<THUMBPRINT>.crt|.prv``."""
    path = config_folder / f"{sequence}.settings"
    settings = Settings(sequence, path)
    try:
        handler = _handler_settings(path)
    except SettingsError as exc:
        settings.errors.append(exc)
        return settings
    public = handler.get("publicSettings")
    if not isinstance(public, dict):
        settings.errors.append(_param("publicSettings is missing or not a JSON object"))
        public = {}
    settings.had_protected = handler.get("protectedSettings") is not None
    settings.check(lambda: _apply_protected(settings, handler, public, lib_dir))
    _apply_public(settings, public)
    if not settings.errors:
        settings.check(lambda: check_not_too_late(settings, now))
    return settings


def _handler_settings(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError(codes.ERROR, f"the settings file {path} does not exist") from None
    except OSError as exc:
        raise SettingsError(codes.ERROR, f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise _param(f"{path.name} is not JSON: {exc}") from None
    runtime = doc.get("runtimeSettings") if isinstance(doc, dict) else None
    if not isinstance(runtime, list) or not runtime or not isinstance(runtime[0], dict):
        raise _param(f"{path.name}: runtimeSettings must be a non-empty list")
    handler = runtime[0].get("handlerSettings")
    if not isinstance(handler, dict):
        raise _param(f"{path.name}: runtimeSettings[0].handlerSettings must be an object")
    return handler


def strip_protected_settings(path: Path) -> bool:
    """Rewrite the settings file without ``protectedSettings``, as Azure's extension does
    once it has read them. True when the file changed."""
    try:
        doc = json.loads(path.read_text())
        handler = doc["runtimeSettings"][0]["handlerSettings"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return False
    if not isinstance(handler, dict) or "protectedSettings" not in handler:
        return False
    del handler["protectedSettings"]
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, path.stat().st_mode & 0o777)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)
    return True


# --- protected settings -------------------------------------------------------------------


def _apply_protected(settings: Settings, handler: dict[str, Any], public: dict[str, Any],
                     lib_dir: Path) -> None:
    protected = decrypt_protected(handler, lib_dir)
    settings.check(lambda: _set_sas_uris(settings, protected))
    for key in ("statusBlobUri", "logsBlobUri"):
        settings.check(functools.partial(_set_blob_uri, settings, key, public, protected))


def decrypt_protected(handler: dict[str, Any], lib_dir: Path) -> dict[str, Any]:
    """Decrypt ``protectedSettings`` with the certificate named by
    ``protectedSettingsCertThumbprint``; plain JSON objects and missing thumbprints are
    refused."""
    value = handler.get("protectedSettings")
    if value is None:
        raise _param("protectedSettings is missing: the backup needs the disks' SAS URIs "
                     "(objectStr), logsBlobUri and statusBlobUri, encrypted to the VM's "
                     "certificate")
    if isinstance(value, dict):
        raise _param("protectedSettings is a plain JSON object: refused, protected settings "
                     "must be encrypted to the VM's certificate (base64 CMS)")
    if not isinstance(value, str) or not value.strip():
        raise _param("protectedSettings must be a base64 CMS string")
    text = "".join(value.split())
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _param("protectedSettings is not base64: refused, protected settings must be "
                     "encrypted to the VM's certificate (base64 CMS)") from None
    thumb = handler.get("protectedSettingsCertThumbprint")
    if not isinstance(thumb, str) or not thumb.strip():
        raise SettingsError(codes.CERTIFICATE_NOT_FOUND,
                            "protectedSettingsCertThumbprint is missing: protectedSettings "
                            "cannot be decrypted")
    identity = _load_identity(lib_dir, thumb.strip())
    try:
        return decrypt_settings(text, identity)
    except CertificateError as exc:
        text = str(exc)
        raise SettingsError(codes.CERTIFICATE_NOT_FOUND, text if "protectedSettings" in text
                            else f"protectedSettings refused: {text}") from None


def _load_identity(lib_dir: Path, thumb: str) -> Identity:
    if not _THUMBPRINT.match(thumb):
        raise _param(f"protectedSettingsCertThumbprint {thumb!r} is not a SHA-1 thumbprint "
                     "(40 hex digits)")
    errors = []
    for candidate in dict.fromkeys([thumb, thumb.upper()]):
        try:
            return Identity.load(lib_dir, candidate)
        except CertificateError as exc:
            errors.append(str(exc))
    raise SettingsError(codes.CERTIFICATE_NOT_FOUND,
                        f"protectedSettings cannot be decrypted: {errors[-1]}")


def _set_sas_uris(settings: Settings, protected: dict[str, Any]) -> None:
    obj = decode_object_str(protected.get("objectStr"), "protectedSettings.objectStr")
    uris = obj.get("blobSASUri")
    if not isinstance(uris, list) or not uris:
        raise _param("protectedSettings.objectStr.blobSASUri must be a non-empty list of "
                     "the disks' SAS URLs")
    for i, uri in enumerate(uris):
        check_sas_url(uri, f"protectedSettings.objectStr.blobSASUri[{i}]")
    settings.blob_sas_uris = list(uris)


def _set_blob_uri(settings: Settings, key: str, public: dict[str, Any],
                  protected: dict[str, Any]) -> None:
    where, value = "publicSettings", public.get(key)
    if not value:
        where, value = "protectedSettings", protected.get(key)
    if not value:
        raise _param(f"protectedSettings.{key} is missing")
    check_url(value, f"{where}.{key}")
    if key == "statusBlobUri":
        settings.status_blob_uri = value
    else:
        settings.logs_blob_uri = value


def decode_object_str(value: Any, name: str) -> dict[str, Any]:
    """objectStr as Azure decodes it: base64, ASCII, strip whitespace, drop ``'``, JSON."""
    if not isinstance(value, str) or not value.strip():
        raise _param(f"{name} is missing or not a string")
    try:
        text = base64.b64decode("".join(value.split()), validate=True).decode("ascii")
        doc = json.loads(text.strip().replace("'", ""))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise _param(f"{name} is not base64 of a JSON object: {exc}") from None
    if not isinstance(doc, dict):
        raise _param(f"{name} is not base64 of a JSON object")
    return doc


def check_url(value: Any, name: str) -> urllib.parse.SplitResult:
    if not isinstance(value, str):
        raise _param(f"{name} must be a URL string")
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise _param(f"{name} is not a valid URL: {exc}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _param(f"{name} must be an http(s) URL, not {_redact(value)!r}")
    return parts


def check_sas_url(value: Any, name: str) -> None:
    parts = check_url(value, name)
    query = urllib.parse.parse_qs(parts.query)
    missing = [p for p in SAS_PARAMS if not query.get(p)]
    if missing:
        raise _param(f"{name} is not a SAS URL: query parameter(s) {', '.join(missing)} "
                     "missing")


def _redact(url: str) -> str:
    """A URL without its query (SAS signatures stay out of messages)."""
    return url.split("?", 1)[0]


# --- public settings ----------------------------------------------------------------------


def _apply_public(settings: Settings, public: dict[str, Any]) -> None:
    settings.check(lambda: _set_locale(settings, public.get("locale")))
    settings.check(lambda: _set_task_id(settings, public.get("taskId")))
    settings.check(lambda: _set_command(settings, public.get("commandToExecute")))
    settings.check(lambda: _set_ticks(settings, public.get("commandStartTimeUTCTicks")))
    settings.check(lambda: _set_vm_type(settings, public.get("vmType")))
    if public.get("objectStr") is not None:
        settings.check(lambda: _set_public_object(settings, public["objectStr"]))


def _set_locale(settings: Settings, value: Any) -> None:
    if value is None:
        return  # unused by the handler, as in Azure's
    if not isinstance(value, str) or not _LOCALE.match(value):
        raise _param(f"publicSettings.locale {value!r} is not a locale such as 'en-us'")
    settings.locale = value


def _set_task_id(settings: Settings, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise _param("publicSettings.taskId must be a non-empty string")
    if len(value) > 256 or not value.isprintable():
        raise _param("publicSettings.taskId must be printable and at most 256 characters")
    settings.task_id = value.strip()


def _set_command(settings: Settings, value: Any) -> None:
    if not isinstance(value, str):
        raise _param("publicSettings.commandToExecute must be a string such as 'snapshot'")
    lowered = value.lower()
    if "install" in lowered:
        settings.command = "install"
    elif "snapshot" in lowered:
        settings.command = "snapshot"
    else:
        raise _param(f"publicSettings.commandToExecute {value!r} is not a known command "
                     "(expected 'snapshot')")


def parse_ticks(value: Any, name: str = "publicSettings.commandStartTimeUTCTicks") -> int:
    """.NET ticks from a decimal string ("636458000000000000"), the seed's "6.36458E+17"
    form, or a JSON integer."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _param(f"{name} must be .NET ticks as a decimal string")
    text = str(value).strip()
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise _param(f"{name} {text!r} is not a number of .NET ticks") from None
    if not number.is_finite() or number != number.to_integral_value():
        raise _param(f"{name} {text!r} is not a whole number of .NET ticks")
    ticks = int(number)
    if not 0 <= ticks <= MAX_TICKS:
        raise _param(f"{name} {text!r} is out of the range of .NET ticks")
    return ticks


def ticks_to_datetime(ticks: int) -> dt.datetime:
    return TICKS_EPOCH + dt.timedelta(microseconds=ticks // 10)


def datetime_to_ticks(when: dt.datetime) -> int:
    delta = when - TICKS_EPOCH
    return (delta.days * 86_400 + delta.seconds) * 10_000_000 + delta.microseconds * 10


def _set_ticks(settings: Settings, value: Any) -> None:
    if value is None:
        raise _param("publicSettings.commandStartTimeUTCTicks is missing")
    settings.start_ticks = parse_ticks(value)
    settings.start_ticks_text = str(value)


def check_not_too_late(settings: Settings, now: dt.datetime | None = None) -> None:
    start = settings.start_time
    if start is None:
        return
    now = now or dt.datetime.now(dt.UTC)
    if now - start > COMMAND_MAX_AGE:
        raise SettingsError(codes.COMMAND_TOO_LATE,
                            f"the command was issued at {start:%Y-%m-%d %H:%M:%S} UTC "
                            "(publicSettings.commandStartTimeUTCTicks), more than 140 minutes "
                            "ago: too late to take the snapshot")


def _set_vm_type(settings: Settings, value: Any) -> None:
    if not isinstance(value, str) or value.lower() not in VM_TYPES:
        raise _param(f"publicSettings.vmType {value!r} is not one of {', '.join(VM_TYPES)}")
    settings.vm_type = value


def _set_public_object(settings: Settings, value: Any) -> None:
    obj = decode_object_str(value, "publicSettings.objectStr")
    settings.backup_metadata = _backup_metadata(obj.get("backupMetadata"))
    disks = obj.get("includedDisks")
    if disks is not None:
        settings.included_disks = _included_disks(disks)


def _backup_metadata(value: Any) -> list[tuple[str, str]]:
    name = "publicSettings.objectStr.backupMetadata"
    if value is None:
        return []
    if not isinstance(value, list):
        raise _param(f"{name} must be a list of {{Key, Value}} objects")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise _param(f"{name}[{i}] must be a {{Key, Value}} object")
        key, val = item.get("Key"), item.get("Value")
        if not isinstance(key, str) or not _METADATA_KEY.match(key):
            raise _param(f"{name}[{i}].Key {key!r} is not a valid metadata name "
                         "(letters, digits and _, not starting with a digit)")
        if isinstance(val, bool | int | float):
            val = str(val)
        if not isinstance(val, str) or not _HEADER_VALUE.match(val):
            raise _param(f"{name}[{i}].Value must be printable ASCII text")
        out.append((key, val))
    return out


def _included_disks(value: Any) -> dict[str, Any]:
    name = "publicSettings.objectStr.includedDisks"
    if not isinstance(value, dict):
        raise _param(f"{name} must be an object")
    luns = value.get("dataDiskLunList")
    if luns is not None and (not isinstance(luns, list)
                             or not all(isinstance(n, int) and not isinstance(n, bool)
                                        for n in luns)):
        raise _param(f"{name}.dataDiskLunList must be a list of integers")
    for key in ("isOSDiskIncluded", "isAnyDiskExcluded"):
        if key in value and not isinstance(value[key], bool):
            raise _param(f"{name}.{key} must be true or false")
    return dict(value)
