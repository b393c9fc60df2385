"""The Blob endpoint: Azure Blob REST over the disk store, for the official SDKs and tools.

Path-style URLs, as Azurite serves them (the SDKs use path style for IP hosts)::

    http://127.0.0.1:PORT/<account>                      service: list containers, account info
    http://127.0.0.1:PORT/<account>/<container>          container operations, List Blobs
    http://127.0.0.1:PORT/<account>/<container>/<blob>   blob operations

Every request is authorized with Shared Key or a service SAS (:mod:`.auth`). What is
supported, and how it differs from Azure: docs/blob-endpoint.md.

Run: ``python -m vmvault.storage.blob_endpoint --root DIR --host 127.0.0.1 --port N``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import importlib
import logging
import os
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from vmvault.errors import VmvaultError
from vmvault.storage import auth
from vmvault.storage.auth import AuthRequest, AuthResult, AzureError
from vmvault.storage.diskstore import (
    BLOCK_BLOB,
    CONTENT_FIELDS,
    PAGE_BLOB,
    BlobProperties,
    DiskStore,
)

log = logging.getLogger("vmvault.blob")

SERVER = "vmvault-blob/0.1 (Azure Blob REST compatible)"
DEFAULT_TIER = "Hot"  # block blobs: the account's default tier, inferred (StorageV2)
MAX_PAGE_WRITE = 4 * 1024 * 1024
MAX_RANGE_MD5 = 4 * 1024 * 1024
READ_CHUNK = 1 << 20
DEFAULT_MAX_RESULTS = 5000
_VERSION_RE = re.compile(r"^\d{4}-\d\d-\d\d$")
_METADATA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")
CONTAINER_NAME_LENGTH = (3, 63)
# Without the native CRC64 the pure-Python one (~6 MB/s) computes x-ms-content-crc64 only
# for bodies up to this size; larger ones get no CRC64 header.
CRC64_PY_MAX = 16 * 1024

# Content settings: sidecar field -> request header of Put Blob / Set Blob Properties.
CONTENT_HEADERS = {
    "content_type": "x-ms-blob-content-type",
    "content_encoding": "x-ms-blob-content-encoding",
    "content_language": "x-ms-blob-content-language",
    "content_md5": "x-ms-blob-content-md5",
    "cache_control": "x-ms-blob-cache-control",
    "content_disposition": "x-ms-blob-content-disposition",
}
# ... and the response header that shows each.
CONTENT_RESPONSE = {
    "content_type": "Content-Type",
    "content_encoding": "Content-Encoding",
    "content_language": "Content-Language",
    "content_md5": "Content-MD5",
    "cache_control": "Cache-Control",
    "content_disposition": "Content-Disposition",
}


def http_date(dt: datetime) -> str:
    return format_datetime(dt.astimezone(UTC).replace(microsecond=0), usegmt=True)


def _iso_now() -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond:06d}0Z"


# --- CRC64 ----------------------------------------------------------------------------

# Azure Storage's CRC64 (x-ms-content-crc64): the reflected polynomial 0x9A6C9329AC4BC9B5,
# initial value and final XOR all ones, sent as the 8 bytes of the value, little-endian,
# base64 (512 bytes of b"a" -> u661BimQ84c=), as the SDKs and Microsoft's native
# azure-storage-extensions compute it.
_CRC64_POLY = 0x9A6C9329AC4BC9B5
_CRC64_MASK = (1 << 64) - 1


def _crc64_table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC64_POLY if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC64_TABLE = _crc64_table()


def _load_native_crc64() -> Any:
    """Microsoft's native Storage CRC64 (azure-storage-extensions, azure-storage-blob's
    [ext-checksums] extra; ~1 GB/s), or None when it is not installed."""
    try:
        return importlib.import_module("azure.storage.extensions.checksums.crc64")
    except ImportError:  # pragma: no cover - depends on what is installed
        return None


_native_crc64 = _load_native_crc64()


def crc64_py(data: bytes, crc: int = 0) -> int:
    """The pure-Python CRC64 (slow: for small bodies); ``crc`` continues an earlier one."""
    table = _CRC64_TABLE
    crc ^= _CRC64_MASK
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ _CRC64_MASK


class Crc64:
    """Azure Storage's CRC64 of a body received in pieces. ``header()`` is the
    x-ms-content-crc64 value, or None where it was not computed: the body outgrew
    CRC64_PY_MAX and the native implementation is not installed."""

    def __init__(self) -> None:
        self.crc = 0
        self.size = 0
        self.native = _native_crc64 is not None

    def update(self, data: bytes) -> None:
        self.size += len(data)
        if self.native:
            self.crc = _native_crc64.compute(bytes(data), self.crc)
        elif self.size <= CRC64_PY_MAX:
            self.crc = crc64_py(data, self.crc)

    def update_many(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.update(chunk)

    def header(self) -> str | None:
        if not self.native and self.size > CRC64_PY_MAX:
            return None
        return base64.b64encode(self.crc.to_bytes(8, "little")).decode()


# --- errors ---------------------------------------------------------------------------


def _error(status: int, code: str, message: str, **details: str) -> AzureError:
    return AzureError(status, code, message, details)


def invalid_header(name: str, value: str | None, reason: str = "") -> AzureError:
    details = {"HeaderName": name, "HeaderValue": value or ""}
    if reason:
        details["Reason"] = reason
    return AzureError(400, "InvalidHeaderValue",
                      "The value for one of the HTTP headers is not in the correct format.",
                      details)


def missing_header(name: str) -> AzureError:
    return _error(400, "MissingRequiredHeader",
                  "An HTTP header that's mandatory for this request is not specified.",
                  HeaderName=name)


def invalid_query(name: str, value: str | None, reason: str = "") -> AzureError:
    details = {"QueryParameterName": name, "QueryParameterValue": value or ""}
    if reason:
        details["Reason"] = reason
    return AzureError(400, "InvalidQueryParameterValue",
                      "Value for one of the query parameters specified in the request URI is "
                      "invalid.", details)


def condition_not_met() -> AzureError:
    return _error(412, "ConditionNotMet",
                  "The condition specified using HTTP conditional header(s) is not met.")


def from_vmvault(exc: VmvaultError) -> AzureError:
    """Map a disk-store (catalog) error to the Blob service's error."""
    code = exc.code
    kind = str(exc.fields.get("kind", ""))
    if code == "ResourceNotFound":
        if kind == "container":
            return _error(404, "ContainerNotFound", "The specified container does not exist.")
        if kind in ("blob", "snapshot"):
            return _error(404, "BlobNotFound", "The specified blob does not exist.")
        return _error(404, "ResourceNotFound", "The specified resource does not exist.")
    if code == "ResourceAlreadyExists":
        if kind == "container":
            return _error(409, "ContainerAlreadyExists", "The specified container already exists.")
        return _error(409, "BlobAlreadyExists", "The specified blob already exists.")
    if code == "SnapshotsPresent":
        return _error(409, "SnapshotsPresent",
                      "This operation is not permitted because the blob has snapshots.")
    if code == "InvalidBlobType":
        return _error(409, "InvalidBlobType", "The blob type is invalid for this operation.")
    if code == "InvalidPageRange":
        return _error(416, "InvalidPageRange", "The page range specified is invalid.")
    if code == "InvalidBlockList":
        return _error(400, "InvalidBlockList", "The specified block list is invalid.")
    if code == "UserErrorStorageAccountNotOnline":
        return account_disabled()
    if code == "InvalidArgumentValue":
        field = str(exc.fields.get("field", ""))
        reason = str(exc.fields.get("reason", ""))
        if field.startswith("x-ms-") or field.lower().startswith("content-"):
            return invalid_header(field, None, reason)
        if field in ("snapshot", "prevsnapshot", "blockid"):
            return invalid_query(field, None, reason)
        if field in ("container name", "blob name"):
            return _error(400, "InvalidResourceName",
                          "The specified resource name contains invalid characters.")
        return _error(400, "InvalidInput", f"One of the request inputs is not valid. {reason}")
    return _error(500, "InternalError",
                  "Server encountered an internal error. Please try again after some time.")


def account_disabled() -> AzureError:
    # An account taken offline is what Azure calls a disabled account.
    return _error(403, "AccountIsDisabled", "The specified account is disabled.")


def error_response(exc: AzureError, request_id: str, version: str, method: str) -> Response:
    headers = {
        "x-ms-error-code": exc.code,
        "x-ms-request-id": request_id,
        "x-ms-version": version,
        "Server": SERVER,
        **exc.headers,
    }
    if method == "HEAD":
        return Response(status_code=exc.status, headers=headers)
    message = f"{exc.message}\nRequestId:{request_id}\nTime:{_iso_now()}"
    extra = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in exc.details.items())
    body = (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{exc.code}</Code>'
            f"<Message>{escape(message)}</Message>{extra}</Error>")
    return Response(body.encode(), status_code=exc.status, headers=headers,
                    media_type="application/xml")


# --- request helpers ------------------------------------------------------------------


def _metadata(headers: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    size = 0
    for name, value in headers.items():
        if name.lower().startswith("x-ms-meta-"):
            key = name[len("x-ms-meta-"):]
            if not _METADATA_NAME.match(key):
                raise _error(400, "InvalidMetadata",
                             "The metadata specified is invalid. It has characters that are "
                             "not permitted.")
            out[key] = value
            size += len(key) + len(value)
    if size > 8 * 1024:
        raise _error(400, "MetadataTooLarge",
                     "The size of the request body exceeds the maximum size permitted.")
    return out


def _meta_headers(metadata: dict[str, str]) -> dict[str, str]:
    return {f"x-ms-meta-{k}": v for k, v in metadata.items()}


def _content_from(headers: Any, fallback_standard: bool) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for field, header in CONTENT_HEADERS.items():
        out[field] = headers.get(header) or None
    if fallback_standard:
        for field, header in (("content_encoding", "content-encoding"),
                              ("content_language", "content-language")):
            if not out[field]:
                out[field] = headers.get(header) or None
        if not out["content_type"] and headers.get("content-type") not in (
                None, "", "application/octet-stream"):
            out["content_type"] = headers.get("content-type")
    return out


def _parse_range(value: str | None, header: str) -> tuple[int, int | None] | None:
    """(start, end inclusive or None) of 'bytes=start-[end]'."""
    if not value:
        return None
    m = _RANGE_RE.match(value.strip())
    if not m:
        raise invalid_header(header, value)
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else None
    if end is not None and end < start:
        raise invalid_header(header, value)
    return start, end


def _request_range(headers: Any) -> tuple[tuple[int, int | None] | None, str]:
    if headers.get("x-ms-range"):
        return _parse_range(headers["x-ms-range"], "x-ms-range"), "x-ms-range"
    return _parse_range(headers.get("range"), "Range"), "Range"


def _int_header(headers: Any, name: str, default: int | None = None) -> int | None:
    value = headers.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise invalid_header(name, value) from None
    if number < 0:
        raise invalid_header(name, value)
    return number


def _etag_match(condition: str, etag: str) -> bool:
    wanted = {c.strip() for c in condition.split(",")}
    if "*" in wanted:
        return True
    bare = etag.strip('"')
    return any(w.strip('"').removeprefix("W/").strip('"') == bare for w in wanted)


def _parse_http_date(value: str, header: str) -> datetime:
    try:
        dt = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        raise invalid_header(header, value) from None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def check_conditions(headers: Any, props: BlobProperties | None, *, write: bool,
                     create: bool = False) -> int | None:
    """Evaluate If-Match & co. Returns 304 for a read that need not send the blob, raises
    412 (or 409 BlobAlreadyExists for If-None-Match: * on a create), else None."""
    if_match = headers.get("if-match")
    if_none = headers.get("if-none-match")
    since = headers.get("if-modified-since")
    unmod = headers.get("if-unmodified-since")
    if not (if_match or if_none or since or unmod):
        return None
    modified = props.last_modified.replace(microsecond=0) if props else None
    if if_match and (props is None or not _etag_match(if_match, props.etag)):
        raise condition_not_met()
    if unmod and modified and modified > _parse_http_date(unmod, "If-Unmodified-Since"):
        raise condition_not_met()
    if if_none and props is not None and _etag_match(if_none, props.etag):
        if if_none.strip() == "*" and create:
            raise _error(409, "BlobAlreadyExists", "The specified blob already exists.")
        if write:
            raise condition_not_met()
        return 304
    if since and modified and modified <= _parse_http_date(since, "If-Modified-Since"):
        if write:
            raise condition_not_met()
        return 304
    return None


def check_sequence_number(headers: Any, props: BlobProperties) -> None:
    seq = props.sequence_number
    checks = (("x-ms-if-sequence-number-le", lambda v: seq <= v),
              ("x-ms-if-sequence-number-lt", lambda v: seq < v),
              ("x-ms-if-sequence-number-eq", lambda v: seq == v))
    for name, ok in checks:
        value = _int_header(headers, name)
        if value is not None and not ok(value):
            raise _error(412, "SequenceNumberConditionNotMet",
                         "The sequence number condition specified was not met.")


def blob_headers(props: BlobProperties, *, content: bool = True) -> dict[str, str]:
    """The headers that describe a blob (Get Blob, Get Blob Properties)."""
    h = {
        "ETag": props.etag,
        "Last-Modified": http_date(props.last_modified),
        "x-ms-creation-time": http_date(props.created),
        "x-ms-blob-type": props.blob_type,
        "x-ms-lease-state": "available",
        "x-ms-lease-status": "unlocked",
        "x-ms-server-encrypted": "false",
        "Accept-Ranges": "bytes",
        **_meta_headers(props.metadata),
    }
    if props.blob_type == PAGE_BLOB:
        h["x-ms-blob-sequence-number"] = str(props.sequence_number)
    if content:
        for field in CONTENT_FIELDS:
            value = getattr(props, field)
            if value:
                h[CONTENT_RESPONSE[field]] = value
        h.setdefault("Content-Type", "application/octet-stream")
    return h


# --- XML ------------------------------------------------------------------------------


def _x(tag: str, value: Any) -> str:
    if value is None or value == "":
        return f"<{tag} />"
    return f"<{tag}>{escape(str(value))}</{tag}>"


def _blob_xml(p: BlobProperties, with_metadata: bool) -> str:
    props = [
        _x("Creation-Time", http_date(p.created)),
        _x("Last-Modified", http_date(p.last_modified)),
        _x("Etag", p.etag.strip('"')),  # bare in List Blobs (quoted in headers)
        _x("Content-Length", p.size),
        _x("Content-Type", p.content_type or "application/octet-stream"),
        _x("Content-Encoding", p.content_encoding),
        _x("Content-Language", p.content_language),
        _x("Content-MD5", p.content_md5),
        _x("Cache-Control", p.cache_control),
        _x("Content-Disposition", p.content_disposition),
    ]
    if p.blob_type == PAGE_BLOB:
        props.append(_x("x-ms-blob-sequence-number", p.sequence_number))
    props.append(_x("BlobType", p.blob_type))
    if p.blob_type == BLOCK_BLOB:
        props += [_x("AccessTier", DEFAULT_TIER), _x("AccessTierInferred", "true")]
    props += [_x("LeaseStatus", "unlocked"), _x("LeaseState", "available"),
              _x("ServerEncrypted", "false")]
    parts = ["<Blob>", _x("Name", p.name)]
    if p.snapshot:
        parts.append(_x("Snapshot", p.snapshot))
    parts.append("<Properties>" + "".join(props) + "</Properties>")
    if with_metadata:  # <Metadata /> for a blob without metadata, as Azure sends it
        items = "".join(_x(k, v) for k, v in p.metadata.items())
        parts.append(f"<Metadata>{items}</Metadata>" if items else "<Metadata />")
    parts.append("</Blob>")
    return "".join(parts)


def _marker_encode(values: list[str]) -> str:
    return base64.urlsafe_b64encode("\n".join(values).encode()).decode().rstrip("=")


def _marker_decode(marker: str) -> list[str]:
    try:
        raw = base64.urlsafe_b64decode(marker + "=" * (-len(marker) % 4))
        return raw.decode().split("\n")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise invalid_query("marker", marker) from None


def _xml_response(body: str, headers: dict[str, str], status: int = 200) -> Response:
    return Response(('<?xml version="1.0" encoding="utf-8"?>' + body).encode(),
                    status_code=status, headers=headers, media_type="application/xml")


# --- the service ----------------------------------------------------------------------


def _file_chunks(fd: int, start: int, length: int) -> Iterator[bytes]:
    try:
        pos, end = start, start + length
        while pos < end:
            want = min(READ_CHUNK, end - pos)
            data = os.pread(fd, want, pos)
            if not data:  # the blob shrank while we read: keep the promised length
                data = bytes(want)
            pos += len(data)
            yield data
    finally:
        os.close(fd)


async def _receive_into(request: Request, sink: Any, batch_size: int = 4 << 20) -> None:
    """Stream the request body to sink(list of chunks) in a worker thread, a batch at a time,
    receiving the next batch while the previous one is written (hashing and writing release
    the GIL, so both run at once)."""
    pending: asyncio.Future[Any] | None = None
    batch: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            if not chunk:
                continue
            batch.append(chunk)
            size += len(chunk)
            if size >= batch_size:
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(run_in_threadpool(sink, batch))
                batch, size = [], 0
        if pending is not None:
            await pending
            pending = None
        if batch:
            await run_in_threadpool(sink, batch)
    finally:
        if pending is not None and not pending.done():
            with contextlib.suppress(BaseException):
                await pending


def _tee(sink: Any, crc: Crc64 | None) -> Any:
    """sink, also feeding crc (when there is one) with the chunks."""
    if crc is None:
        return sink

    def both(chunks: list[bytes]) -> None:
        crc.update_many(chunks)
        sink(chunks)

    return both


def _crc64_of(data: bytes) -> Crc64:
    crc = Crc64()
    crc.update(data)
    return crc


def _add_crc64(headers: dict[str, str], crc: Crc64 | None) -> None:
    value = crc.header() if crc is not None else None
    if value is not None:
        headers["x-ms-content-crc64"] = value


class BlobService:
    def __init__(self, store: DiskStore) -> None:
        self.store = store

    async def handle(self, request: Request) -> Response:
        request_id = str(uuid.uuid4())
        headers = request.headers
        method = request.method.upper()
        version = headers.get("x-ms-version") or auth.DEFAULT_VERSION
        try:
            if not _VERSION_RE.match(version):
                raise invalid_header("x-ms-version", version)
            raw_path = request.scope.get("raw_path", b"").decode("latin-1") or request.url.path
            raw_query = request.scope.get("query_string", b"").decode("latin-1")
            parts = request.url.path.lstrip("/").split("/", 2)
            account = parts[0]
            container = parts[1] if len(parts) > 1 and parts[1] else None
            blob = parts[2] if len(parts) > 2 and parts[2] else None
            if not account:
                raise _error(400, "InvalidUri",
                             "The requested URI does not represent any resource on the server.")
            try:
                info = await run_in_threadpool(self.store.get_account, account)
            except VmvaultError:
                raise _error(404, "ResourceNotFound",
                             "The specified resource does not exist.") from None
            areq = AuthRequest(method, raw_path, raw_query, headers, account, container, blob,
                               request.client.host if request.client else None,
                               request.url.scheme)
            result = auth.authenticate(areq, info.keys())
            if not headers.get("x-ms-version") and result.version:
                version = result.version
            if not info.online:
                raise account_disabled()
            op = Operation(self, request, result, account, container, blob, version)
            response = await op.run()
        except AzureError as exc:
            response = error_response(exc, request_id, version, method)
        except VmvaultError as exc:
            response = error_response(from_vmvault(exc), request_id, version, method)
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception:  # pragma: no cover - logged, answered as Azure does
            log.exception("request %s %s failed", method, request.url.path)
            response = error_response(
                _error(500, "InternalError", "Server encountered an internal error. Please "
                       "try again after some time."), request_id, version, method)
        response.headers["x-ms-request-id"] = request_id
        response.headers["x-ms-version"] = version
        response.headers["Server"] = SERVER
        client_id = headers.get("x-ms-client-request-id")
        if client_id:
            response.headers["x-ms-client-request-id"] = client_id
        return response


class Operation:
    """One request, routed to its Blob REST operation."""

    def __init__(self, service: BlobService, request: Request, result: AuthResult,
                 account: str, container: str | None, blob: str | None, version: str) -> None:
        self.store = service.store
        self.request = request
        self.headers = request.headers
        self.query = request.query_params
        self.auth = result
        self.account = account
        self.container = container
        self.blob = blob
        self.version = version
        self.method = request.method.upper()

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await run_in_threadpool(fn, *args, **kwargs)

    async def run(self) -> Response:
        comp = self.query.get("comp")
        restype = self.query.get("restype")
        m = self.method
        if restype == "account" and comp == "properties" and m in ("GET", "HEAD"):
            return await self.account_info()
        if self.container is None:
            if comp == "list" and m == "GET":
                return await self.list_containers()
            raise invalid_query("comp", comp,
                                "Not supported by this endpoint at the account level.")
        if self.blob is None:
            return await self.container_op(restype, comp)
        if restype:
            raise invalid_query("restype", restype)
        return await self.blob_op(comp)

    # --- account ----------------------------------------------------------------------

    async def account_info(self) -> Response:
        info = await self.call(self.store.get_account, self.account)
        return Response(status_code=200, headers={
            "x-ms-sku-name": info.sku, "x-ms-account-kind": "StorageV2",
            "x-ms-is-hns-enabled": "false"})

    async def list_containers(self) -> Response:
        auth.require_shared_key(self.auth)
        prefix = self.query.get("prefix") or ""
        include = (self.query.get("include") or "").split(",")
        max_results = self._max_results()
        marker = self.query.get("marker")
        containers = await self.call(self.store.list_containers, self.account)
        items = [c for c in containers if c.name.startswith(prefix)]
        if marker:
            start = _marker_decode(marker)[0]
            items = [c for c in items if c.name >= start]
        page, rest = items[:max_results], items[max_results:]
        parts = []
        for c in page:
            props = (_x("Last-Modified", http_date(c.last_modified)) + _x("Etag", c.etag)
                     + _x("LeaseStatus", "unlocked") + _x("LeaseState", "available")
                     + _x("HasImmutabilityPolicy", "false") + _x("HasLegalHold", "false"))
            meta = ""
            if "metadata" in include:
                pairs = "".join(_x(k, v) for k, v in c.metadata.items())
                meta = f"<Metadata>{pairs}</Metadata>" if pairs else "<Metadata />"
            parts.append(f"<Container>{_x('Name', c.name)}<Properties>{props}</Properties>"
                         f"{meta}</Container>")
        endpoint = str(self.request.base_url).rstrip("/") + f"/{self.account}/"
        body = (f'<EnumerationResults ServiceEndpoint="{escape(endpoint)}">'
                f"{_x('Prefix', prefix)}{_x('Marker', marker)}{_x('MaxResults', max_results)}"
                f"<Containers>{''.join(parts)}</Containers>"
                f"{_x('NextMarker', _marker_encode([rest[0].name]) if rest else None)}"
                "</EnumerationResults>")
        return _xml_response(body, {})

    def _max_results(self) -> int:
        value = self.query.get("maxresults")
        if value is None:
            return DEFAULT_MAX_RESULTS
        try:
            n = int(value)
        except ValueError:
            raise invalid_query("maxresults", value) from None
        if n <= 0:
            raise invalid_query("maxresults", value)
        return min(n, DEFAULT_MAX_RESULTS)

    # --- containers -------------------------------------------------------------------

    async def container_op(self, restype: str | None, comp: str | None) -> Response:
        m = self.method
        assert self.container is not None
        if restype != "container":
            raise invalid_query("restype", restype)
        if comp is None:
            if m == "PUT":
                auth.require_shared_key(self.auth)
                if self.headers.get("x-ms-blob-public-access"):
                    raise _error(409, "PublicAccessNotPermitted",
                                 "Public access is not permitted on this storage account.")
                low, high = CONTAINER_NAME_LENGTH
                if not low <= len(self.container) <= high:  # before the characters
                    raise _error(400, "OutOfRangeInput", "The specified resource name length "
                                 "is not within the permissible limits.")
                info = await self.call(self.store.create_container, self.account,
                                       self.container, metadata=_metadata(self.headers))
                return Response(status_code=201, headers={
                    "ETag": info.etag, "Last-Modified": http_date(info.last_modified)})
            if m == "DELETE":
                auth.require_shared_key(self.auth)
                await self.call(self.store.delete_container, self.account, self.container)
                return Response(status_code=202)
            if m in ("GET", "HEAD"):
                return await self.container_properties()
        elif comp == "metadata":
            if m in ("GET", "HEAD"):
                return await self.container_properties()
            if m == "PUT":
                auth.require_shared_key(self.auth)
                info = await self.call(self.store.set_container_metadata, self.account,
                                       self.container, _metadata(self.headers))
                return Response(status_code=200, headers={
                    "ETag": info.etag, "Last-Modified": http_date(info.last_modified)})
        elif comp == "list" and m == "GET":
            return await self.list_blobs()
        raise invalid_query("comp", comp, "Not supported by this endpoint.")

    async def container_properties(self) -> Response:
        auth.require_container_sas(self.auth)
        auth.require_permission(self.auth, "r")
        info = await self.call(self.store.get_container, self.account, self.container)
        return Response(status_code=200, headers={
            "ETag": info.etag, "Last-Modified": http_date(info.last_modified),
            "x-ms-lease-state": "available", "x-ms-lease-status": "unlocked",
            "x-ms-has-immutability-policy": "false", "x-ms-has-legal-hold": "false",
            **_meta_headers(info.metadata)})

    async def list_blobs(self) -> Response:
        auth.require_container_sas(self.auth)
        auth.require_permission(self.auth, "l")
        prefix = self.query.get("prefix") or ""
        delimiter = self.query.get("delimiter") or ""
        include = {i.strip() for i in (self.query.get("include") or "").split(",") if i}
        max_results = self._max_results()
        marker = self.query.get("marker")
        blobs: list[BlobProperties] = await self.call(
            self.store.list_blobs, self.account, self.container,
            include_snapshots="snapshots" in include, prefix=prefix or None)

        def order(p: BlobProperties) -> tuple[str, int, str]:
            return (p.name, 0, p.snapshot) if p.snapshot else (p.name, 1, "")

        start_key: tuple[str, int, str] | None = None
        if marker:
            name, kind, snap = (_marker_decode(marker) + ["", "1", ""])[:3]
            start_key = (name, int(kind or 1), snap)
        entries: list[tuple[tuple[str, int, str], str]] = []
        seen_prefixes: set[str] = set()
        for p in blobs:
            key = order(p)
            if start_key and key < start_key:
                continue
            if delimiter:
                cut = p.name.find(delimiter, len(prefix))
                if cut >= 0:
                    bp = p.name[: cut + len(delimiter)]
                    if bp not in seen_prefixes:
                        seen_prefixes.add(bp)
                        entries.append((key, f"<BlobPrefix>{_x('Name', bp)}</BlobPrefix>"))
                    continue
            entries.append((key, _blob_xml(p, "metadata" in include)))
        page, rest = entries[:max_results], entries[max_results:]
        next_marker = None
        if rest:
            k = rest[0][0]
            next_marker = _marker_encode([k[0], str(k[1]), k[2]])
        endpoint = str(self.request.base_url).rstrip("/") + f"/{self.account}/"
        body = (f'<EnumerationResults ServiceEndpoint="{escape(endpoint)}" '
                f'ContainerName="{escape(self.container or "")}">'
                f"{_x('Prefix', prefix)}{_x('Marker', marker)}"
                f"{_x('MaxResults', self.query.get('maxresults'))}"
                f"{_x('Delimiter', delimiter) if delimiter else ''}"
                f"<Blobs>{''.join(x for _, x in page)}</Blobs>"
                f"{_x('NextMarker', next_marker)}</EnumerationResults>")
        return _xml_response(body, {})

    # --- blobs ------------------------------------------------------------------------

    async def blob_op(self, comp: str | None) -> Response:
        m = self.method
        snapshot = self.query.get("snapshot")
        if m == "PUT" and snapshot:
            raise invalid_query("snapshot", snapshot, "Snapshots are read only.")
        if m == "PUT" and self.headers.get("x-ms-copy-source"):
            raise _error(400, "UnsupportedHeader",
                         "One of the headers specified in the request is not supported.",
                         HeaderName="x-ms-copy-source")
        routes: dict[tuple[str, str | None], Any] = {
            ("GET", None): self.get_blob,
            ("HEAD", None): self.get_properties,
            ("PUT", None): self.put_blob,
            ("DELETE", None): self.delete_blob,
            ("GET", "metadata"): self.get_metadata,
            ("HEAD", "metadata"): self.get_metadata,
            ("PUT", "metadata"): self.set_metadata,
            ("PUT", "properties"): self.set_properties,
            ("PUT", "snapshot"): self.snapshot,
            ("PUT", "page"): self.put_page,
            ("GET", "pagelist"): self.page_ranges,
            ("PUT", "block"): self.put_block,
            ("PUT", "blocklist"): self.put_block_list,
            ("GET", "blocklist"): self.get_block_list,
        }
        handler = routes.get((m, comp))
        if handler is None:
            raise invalid_query("comp", comp, f"{m} with comp={comp} is not supported by "
                                              "this endpoint.")
        result: Response = await handler()
        return result

    async def _props(self, snapshot: str | None = None) -> BlobProperties:
        props: BlobProperties = await self.call(self.store.get_properties, self.account,
                                                self.container, self.blob, snapshot)
        return props

    async def _props_or_none(self) -> BlobProperties | None:
        try:
            return await self._props()
        except VmvaultError as exc:
            if exc.code == "ResourceNotFound" and exc.fields.get("kind") in ("blob",
                                                                             "snapshot"):
                return None
            raise

    def _write_headers(self, props: BlobProperties) -> dict[str, str]:
        h = {"ETag": props.etag, "Last-Modified": http_date(props.last_modified),
             "x-ms-request-server-encrypted": "false"}
        if props.blob_type == PAGE_BLOB:
            h["x-ms-blob-sequence-number"] = str(props.sequence_number)
        return h

    async def get_properties(self) -> Response:
        auth.require_permission(self.auth, "r")
        props = await self._props(self.query.get("snapshot"))
        status = check_conditions(self.headers, props, write=False)
        headers = blob_headers(props)
        if props.blob_type == BLOCK_BLOB:  # Get Blob Properties only (not Get Blob)
            headers["x-ms-access-tier"] = DEFAULT_TIER
            headers["x-ms-access-tier-inferred"] = "true"
        headers.update(self.auth.overrides())
        headers["Content-Length"] = str(props.size)
        return Response(status_code=status or 200, headers=headers)

    async def get_metadata(self) -> Response:
        auth.require_permission(self.auth, "r")
        props = await self._props(self.query.get("snapshot"))
        check_conditions(self.headers, props, write=False)
        return Response(status_code=200, headers={
            "ETag": props.etag, "Last-Modified": http_date(props.last_modified),
            **_meta_headers(props.metadata)})

    async def get_blob(self) -> Response:
        auth.require_permission(self.auth, "r")
        snapshot = self.query.get("snapshot")
        fd, props = await self.call(self.store.open_blob, self.account, self.container,
                                    self.blob, snapshot)
        try:
            status = check_conditions(self.headers, props, write=False)
            if status == 304:
                os.close(fd)
                return Response(status_code=304, headers={"ETag": props.etag})
            rng, rng_header = _request_range(self.headers)
            headers = blob_headers(props)
            size = props.size
            if rng is None:
                start, length, code = 0, size, 200
            else:
                start, end = rng
                if start >= size:
                    raise AzureError(416, "InvalidRange", "The range specified is invalid for "
                                     "the current size of the resource.",
                                     headers={"Content-Range": f"bytes */{size}"})
                end = size - 1 if end is None else min(end, size - 1)
                length = end - start + 1
                code = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                md5 = headers.pop("Content-MD5", None)
                if md5:
                    headers["x-ms-blob-content-md5"] = md5
                if self.headers.get("x-ms-range-get-content-md5", "").lower() == "true":
                    if length > MAX_RANGE_MD5:
                        raise _error(400, "OutOfRangeInput",
                                     "One of the request inputs is out of range.")
                    data = os.pread(fd, length, start)
                    data += bytes(length - len(data))
                    headers["Content-MD5"] = base64.b64encode(hashlib.md5(data).digest()).decode()
            headers.update(self.auth.overrides())
            headers["Content-Length"] = str(length)
            if snapshot:
                headers["x-ms-snapshot"] = snapshot
        except BaseException:
            os.close(fd)
            raise
        if length == 0:
            os.close(fd)
            return Response(status_code=code, headers=headers)
        return StreamingResponse(_file_chunks(fd, start, length), status_code=code,
                                 headers=headers)

    async def put_blob(self) -> Response:
        blob_type = self.headers.get("x-ms-blob-type")
        if not blob_type:
            raise missing_header("x-ms-blob-type")
        if blob_type not in (PAGE_BLOB, BLOCK_BLOB):
            raise invalid_header("x-ms-blob-type", blob_type,
                                 "Only PageBlob and BlockBlob are supported by this endpoint.")
        existing = await self._props_or_none()
        auth.require_permission(self.auth, "w" if existing else "cw")
        check_conditions(self.headers, existing, write=True, create=True)
        metadata = _metadata(self.headers)
        if blob_type == PAGE_BLOB:
            size = _int_header(self.headers, "x-ms-blob-content-length")
            if size is None:
                raise missing_header("x-ms-blob-content-length")
            if size % 512:
                raise invalid_header("x-ms-blob-content-length", str(size),
                                     "A page blob's size must be a multiple of 512.")
            if _int_header(self.headers, "content-length", 0):
                raise invalid_header("Content-Length", self.headers.get("content-length"),
                                     "Put Blob of a page blob takes no body.")
            seq = _int_header(self.headers, "x-ms-blob-sequence-number", 0) or 0
            props = await self.call(self.store.create_page_blob, self.account, self.container,
                                    self.blob, size, metadata,
                                    content=_content_from(self.headers, False),
                                    sequence_number=seq)
            return Response(status_code=201, headers=self._write_headers(props))
        content = _content_from(self.headers, True)
        declared_md5 = self.headers.get("content-md5")
        if declared_md5 and not content.get("content_md5"):
            content["content_md5"] = declared_md5
        writer = await self.call(self.store.block_blob_writer, self.account, self.container,
                                 self.blob, metadata=metadata, content=content)
        crc = await self._receive_body(writer, declared_md5)
        props = await self.call(writer.commit)
        headers = self._write_headers(props)
        if props.content_md5:
            headers["Content-MD5"] = props.content_md5
        _add_crc64(headers, crc)
        return Response(status_code=201, headers=headers)

    async def put_page(self) -> Response:
        auth.require_permission(self.auth, "w")
        action = self.headers.get("x-ms-page-write")
        if not action:
            raise missing_header("x-ms-page-write")
        action = action.lower()
        if action not in ("update", "clear"):
            raise invalid_header("x-ms-page-write", action)
        rng, rng_header = _request_range(self.headers)
        if rng is None:
            raise missing_header("x-ms-range")
        start, end = rng
        if end is None:
            raise invalid_header(rng_header, self.headers.get(rng_header.lower()))
        length = end - start + 1
        if start % 512 or length % 512:
            raise _error(416, "InvalidPageRange", "The page range specified is invalid.")
        declared = _int_header(self.headers, "content-length", 0) or 0
        props = await self._props()
        if props.blob_type != PAGE_BLOB:
            raise _error(409, "InvalidBlobType", "The blob type is invalid for this operation.")
        check_conditions(self.headers, props, write=True)
        check_sequence_number(self.headers, props)
        headers: dict[str, str] = {}
        if action == "clear":
            if declared:
                raise invalid_header("Content-Length", str(declared),
                                     "Clearing pages takes no body.")
            props = await self.call(self.store.clear_pages, self.account, self.container,
                                    self.blob, start, length)
        else:
            if declared > MAX_PAGE_WRITE or length > MAX_PAGE_WRITE:
                raise _error(413, "RequestBodyTooLarge",
                             "The request body is too large and exceeds the maximum "
                             "permissible limit.", MaxLimit=str(MAX_PAGE_WRITE))
            body = await self.request.body()
            if len(body) != length:
                raise invalid_header("Content-Length", str(len(body)),
                                     f"The body must hold the {length} bytes of the range.")
            declared_md5 = self.headers.get("content-md5")
            if declared_md5:
                actual = base64.b64encode(hashlib.md5(body).digest()).decode()
                if actual != declared_md5:
                    raise _error(400, "Md5Mismatch",
                                 "The MD5 value specified in the request did not match with the "
                                 "MD5 value calculated by the server.",
                                 UserSpecifiedMd5=declared_md5, ServerCalculatedMd5=actual)
                headers["Content-MD5"] = actual
            else:  # Azure answers the CRC64 of the data when it was sent no MD5
                _add_crc64(headers, await self.call(_crc64_of, body))
            props = await self.call(self.store.write_pages, self.account, self.container,
                                    self.blob, start, body)
        headers.update(self._write_headers(props))
        return Response(status_code=201, headers=headers)

    async def set_metadata(self) -> Response:
        auth.require_permission(self.auth, "w")
        check_conditions(self.headers, await self._props(), write=True)
        props = await self.call(self.store.set_metadata, self.account, self.container,
                                self.blob, _metadata(self.headers))
        return Response(status_code=200, headers=self._write_headers(props))

    async def set_properties(self) -> Response:
        auth.require_permission(self.auth, "w")
        current = await self._props()
        check_conditions(self.headers, current, write=True)
        size = _int_header(self.headers, "x-ms-blob-content-length")
        action = self.headers.get("x-ms-sequence-number-action")
        seq = _int_header(self.headers, "x-ms-blob-sequence-number")
        content = None
        if any(h in self.headers for h in CONTENT_HEADERS.values()):
            content = _content_from(self.headers, False)
        if size is not None and size % 512:
            raise invalid_header("x-ms-blob-content-length", str(size),
                                 "A page blob's size must be a multiple of 512.")
        props = await self.call(self.store.set_properties, self.account, self.container,
                                self.blob, content=content, size=size,
                                sequence_number_action=action.lower() if action else None,
                                sequence_number=seq)
        return Response(status_code=200, headers=self._write_headers(props))

    async def snapshot(self) -> Response:
        auth.require_permission(self.auth, "cw")
        metadata = _metadata(self.headers) or None
        headers = self.headers
        snap, props = await self.call(  # one trip to a thread: the guest may be frozen
            self.store.take_snapshot, self.account, self.container, self.blob, metadata,
            lambda current: check_conditions(headers, current, write=True))
        return Response(status_code=201, headers={
            "x-ms-snapshot": snap, "ETag": props.etag,
            "Last-Modified": http_date(props.last_modified)})

    async def delete_blob(self) -> Response:
        auth.require_permission(self.auth, "d")
        snapshot = self.query.get("snapshot")
        which = self.headers.get("x-ms-delete-snapshots")
        if which is not None and which not in ("include", "only"):
            raise invalid_header("x-ms-delete-snapshots", which)
        if snapshot and which:
            raise invalid_header("x-ms-delete-snapshots", which,
                                 "Not allowed when deleting a single snapshot.")
        if not snapshot:
            check_conditions(self.headers, await self._props(), write=True)
        await self.call(self.store.delete_blob, self.account, self.container, self.blob,
                        snapshot, which)
        return Response(status_code=202, headers={"x-ms-delete-type-permanent": "true"})

    async def page_ranges(self) -> Response:
        auth.require_permission(self.auth, "r")
        snapshot = self.query.get("snapshot")
        prev = self.query.get("prevsnapshot")
        if self.query.get("prevsnapshoturl") or self.headers.get("x-ms-previous-snapshot-url"):
            raise invalid_query("prevsnapshoturl", self.query.get("prevsnapshoturl"),
                                "Managed disk diffs are not supported by this endpoint.")
        props = await self._props(snapshot)
        check_conditions(self.headers, props, write=False)
        rng, _ = _request_range(self.headers)
        offset = length = None
        if rng is not None:
            offset = rng[0]
            if rng[1] is not None:
                length = rng[1] - rng[0] + 1
        pages, clears = await self.call(self.store.page_ranges, self.account, self.container,
                                        self.blob, snapshot, prev, offset, length)
        items = sorted([(s, e, "PageRange") for s, e in pages]
                       + [(s, e, "ClearRange") for s, e in clears])
        marker = self.query.get("marker")
        if marker:
            try:
                resume = int(_marker_decode(marker)[0])
            except ValueError:
                raise invalid_query("marker", marker) from None
            items = [i for i in items if i[0] >= resume]
        next_marker = None
        if self.query.get("maxresults") is not None:
            n = self._max_results()
            if len(items) > n:
                next_marker = _marker_encode([str(items[n][0])])
                items = items[:n]
        body = ("<PageList>"
                + "".join(f"<{k}><Start>{s}</Start><End>{e - 1}</End></{k}>" for s, e, k in items)
                + (_x("NextMarker", next_marker) if next_marker else "")
                + "</PageList>")
        return _xml_response(body, {"ETag": props.etag,
                                    "Last-Modified": http_date(props.last_modified),
                                    "x-ms-blob-content-length": str(props.size)})

    async def _receive_body(self, sink: Any, declared_md5: str | None) -> Crc64 | None:
        """Stream the request body into a block blob writer or block stager, checking the
        declared Content-MD5; the CRC64 to answer with when no MD5 was declared. The sink is
        aborted on any failure."""
        crc = None if declared_md5 else Crc64()
        try:
            await _receive_into(self.request, _tee(sink.write_many, crc))
            actual = base64.b64encode(sink.md5.digest()).decode()
            if declared_md5 and declared_md5 != actual:
                raise _error(400, "Md5Mismatch",
                             "The MD5 value specified in the request did not match with the "
                             "MD5 value calculated by the server.",
                             UserSpecifiedMd5=declared_md5, ServerCalculatedMd5=actual)
        except BaseException:
            sink.abort()
            raise
        return crc

    # --- blocks -----------------------------------------------------------------------

    async def put_block(self) -> Response:
        auth.require_permission(self.auth, "cw")
        block_id = self.query.get("blockid")
        if not block_id:
            raise invalid_query("blockid", block_id, "A block id is required.")
        stager = await self.call(self.store.block_stager, self.account, self.container,
                                 self.blob, block_id)
        declared_md5 = self.headers.get("content-md5")
        crc = await self._receive_body(stager, declared_md5)
        await self.call(stager.commit)
        headers = {"x-ms-request-server-encrypted": "false"}
        if declared_md5:
            headers["Content-MD5"] = declared_md5  # checked equal to the body's MD5
        _add_crc64(headers, crc)
        return Response(status_code=201, headers=headers)

    async def put_block_list(self) -> Response:
        existing = await self._props_or_none()
        auth.require_permission(self.auth, "w" if existing else "cw")
        check_conditions(self.headers, existing, write=True, create=True)
        body = await self.request.body()
        try:
            root = ElementTree.fromstring(body)
        except ElementTree.ParseError:
            raise _error(400, "InvalidXmlDocument",
                         "XML specified is not syntactically valid.") from None
        blocks = [(el.tag, (el.text or "").strip()) for el in root
                  if el.tag in ("Committed", "Uncommitted", "Latest")]
        props = await self.call(self.store.commit_block_list, self.account, self.container,
                                self.blob, blocks, metadata=_metadata(self.headers),
                                content=_content_from(self.headers, False))
        headers = self._write_headers(props)
        # The MD5 of the request body (the block list), not of the blob, as Azure sends it.
        headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()
        return Response(status_code=201, headers=headers)

    async def get_block_list(self) -> Response:
        auth.require_permission(self.auth, "r")
        which = (self.query.get("blocklisttype") or "committed").lower()
        committed, uncommitted = await self.call(self.store.get_block_list, self.account,
                                                 self.container, self.blob)

        def blocks(items: list[Any]) -> str:
            return "".join(f"<Block>{_x('Name', b.block_id)}{_x('Size', b.size)}</Block>"
                           for b in items)

        parts = ""
        if which in ("committed", "all"):
            parts += f"<CommittedBlocks>{blocks(committed)}</CommittedBlocks>"
        if which in ("uncommitted", "all"):
            parts += f"<UncommittedBlocks>{blocks(uncommitted)}</UncommittedBlocks>"
        headers: dict[str, str] = {}
        props = await self._props_or_none()
        if props is not None:
            headers = {"ETag": props.etag, "Last-Modified": http_date(props.last_modified),
                       "x-ms-blob-content-length": str(props.size)}
        return _xml_response(f"<BlockList>{parts}</BlockList>", headers)


# --- the app and its entry point --------------------------------------------------------


def create_app(store: DiskStore) -> FastAPI:
    """The Blob endpoint as an ASGI app over store."""
    app = FastAPI(title="vmvault Blob endpoint", docs_url=None, redoc_url=None,
                  openapi_url=None)
    service = BlobService(store)
    app.state.store = store

    @app.api_route("/{path:path}", methods=["GET", "HEAD", "PUT", "DELETE", "POST"],
                   include_in_schema=False)
    async def dispatch(request: Request) -> Response:
        return await service.handle(request)

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m vmvault.storage.blob_endpoint",
                                     description="Serve the disk store as Azure Blob REST.")
    parser.add_argument("--root", required=True, type=Path, help="the pool (disk store root)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=47081)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--access-log", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    uvicorn.run(create_app(DiskStore(args.root)), host=args.host, port=args.port,
                log_level=args.log_level, access_log=args.access_log, server_header=False)


if __name__ == "__main__":
    main()
