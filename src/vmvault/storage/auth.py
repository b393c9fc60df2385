"""Authorization of Blob requests as Azure does it: Shared Key and service SAS.

* Shared Key (``Authorization: SharedKey <account>:<signature>``): the HMAC-SHA256, with
  either account key, of the string-to-sign of version 2015-02-21 and later (verb, the
  eleven standard headers with ``Content-Length`` empty when 0, the canonicalized
  ``x-ms-*`` headers, the canonicalized resource with its query parameters). For path-style
  URLs (``http://127.0.0.1:port/<account>/<container>/<blob>``) the canonicalized resource
  is ``/<account>`` followed by the URL path as sent (which starts with the account again),
  as the Azure SDKs sign it; the form without the repeated account is accepted too.
* Service SAS (``sv``, ``sr`` = b|bs|c, ``sp``, ``st``, ``se``, ``sig``, optional ``sip``,
  ``spr``, ``si``, ``ses``, ``rscc``..``rsct``): the string-to-sign of the signed version
  (2015-04-05 up to 2018-11-09, from 2018-11-09 with the snapshot time, from 2020-12-06
  with the encryption scope), then the time window, protocol, IP, and the permission
  the operation needs.

Failures are :class:`AzureError` with Azure's status, code and message; authentication
failures carry ``AuthenticationErrorDetail``. Stored access policies (``si``), user
delegation SAS and account SAS are not supported (403 AuthenticationFailed).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

_HeaderSort = Callable[[list[tuple[str, str]]], list[tuple[str, str]]]
_storage_header_sort: _HeaderSort | None
try:  # the order the service (and the SDKs) sort x-ms-* headers in
    from azure.storage.blob._shared.authentication import _storage_header_sort
except Exception:  # pragma: no cover - SDK layout changed: plain ordinal order
    _storage_header_sort = None

DEFAULT_VERSION = "2025-11-05"
MAX_CLOCK_SKEW = timedelta(minutes=15)
AUTH_FAILED_MESSAGE = (
    "Server failed to authenticate the request. Make sure the value of Authorization header "
    "is formed correctly including the signature."
)


class AzureError(Exception):
    """An error response as the Blob service sends it."""

    def __init__(self, status: int, code: str, message: str,
                 details: Mapping[str, str] | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details: dict[str, str] = dict(details or {})
        self.headers: dict[str, str] = dict(headers or {})


def authentication_failed(detail: str) -> AzureError:
    return AzureError(403, "AuthenticationFailed", AUTH_FAILED_MESSAGE,
                      {"AuthenticationErrorDetail": detail})


def permission_mismatch() -> AzureError:
    return AzureError(403, "AuthorizationPermissionMismatch",
                      "This request is not authorized to perform this operation using this "
                      "permission.")


def authorization_failure() -> AzureError:
    return AzureError(403, "AuthorizationFailure",
                      "This request is not authorized to perform this operation.")


def no_authentication() -> AzureError:
    return AzureError(401, "NoAuthenticationInformation",
                      "Server failed to authenticate the request. Please refer to the "
                      "information in the www-authenticate header.",
                      headers={"WWW-Authenticate": "SharedKey"})


# --- the request as auth sees it --------------------------------------------------------


@dataclass
class AuthRequest:
    method: str
    raw_path: str  # percent-encoded, as received: /<account>/<container>/<blob>
    raw_query: str  # as received, without '?'
    headers: Mapping[str, str]  # lowercase names
    account: str
    container: str | None
    blob: str | None
    client_ip: str | None = None
    scheme: str = "http"

    def query_pairs(self) -> list[tuple[str, str]]:
        """(name, decoded value) pairs, the way the SDKs read them for signing."""
        out = []
        for part in self.raw_query.split("&"):
            if not part:
                continue
            name, _, value = part.partition("=")
            out.append((urllib.parse.unquote(name), urllib.parse.unquote(value)))
        return out

    def query(self) -> dict[str, str]:
        return {k: v for k, v in self.query_pairs()}


@dataclass
class AuthResult:
    kind: str  # "sharedkey" | "sas"
    sas: dict[str, str] = field(default_factory=dict)

    @property
    def version(self) -> str | None:
        return self.sas.get("sv")

    def overrides(self) -> dict[str, str]:
        """Response headers a SAS overrides (rscc, rscd, rsce, rscl, rsct)."""
        names = {"rscc": "Cache-Control", "rscd": "Content-Disposition",
                 "rsce": "Content-Encoding", "rscl": "Content-Language",
                 "rsct": "Content-Type"}
        return {h: self.sas[q] for q, h in names.items() if self.sas.get(q)}


def sign(key_b64: str, string_to_sign: str) -> str:
    key = base64.b64decode(key_b64)
    digest = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def _matches(keys: Sequence[str], string_to_sign: str, signature: str) -> bool:
    ok = False
    for key in keys:
        try:
            expected = sign(key, string_to_sign)
        except (ValueError, TypeError):
            continue
        ok |= hmac.compare_digest(expected.encode(), signature.encode())
    return ok


def authenticate(req: AuthRequest, keys: Sequence[str], now: datetime | None = None
                 ) -> AuthResult:
    """Check the request's Shared Key or SAS signature and its time limits."""
    now = now or datetime.now(UTC)
    auth = req.headers.get("authorization")
    query = req.query()
    if auth:
        return _shared_key(req, auth, keys, now)
    if "sig" in query:
        return _service_sas(req, query, keys, now)
    raise no_authentication()


# --- Shared Key ------------------------------------------------------------------------

_STANDARD_HEADERS = (
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
)


def _canonical_headers(headers: Mapping[str, str], service_order: bool) -> str:
    pairs = [(k.lower(), v) for k, v in headers.items() if k.lower().startswith("x-ms-")]
    if service_order and _storage_header_sort is not None:
        try:
            pairs = _storage_header_sort(pairs)
        except (ValueError, IndexError):
            pairs.sort()
    else:
        pairs.sort()
    return "".join(f"{k}:{v.strip()}\n" for k, v in pairs)


def _canonical_query(req: AuthRequest) -> str:
    grouped: dict[str, list[str]] = {}
    for name, value in req.query_pairs():
        grouped.setdefault(name.lower(), []).append(value)
    return "".join(f"\n{name}:{','.join(sorted(vals))}" for name, vals in sorted(grouped.items()))


def shared_key_strings(req: AuthRequest) -> list[str]:
    """The string-to-sign candidates for the request (see the module doc)."""
    version = req.headers.get("x-ms-version", DEFAULT_VERSION)
    values = []
    for name in _STANDARD_HEADERS:
        value = req.headers.get(name, "")
        if name == "content-length" and value == "0" and version >= "2015-02-21":
            value = ""
        values.append(value)
    heads = [req.method.upper() + "\n" + "\n".join(values) + "\n"]
    if values[-1]:  # some clients leave Range out of the string they sign
        heads.append(req.method.upper() + "\n" + "\n".join(values[:-1] + [""]) + "\n")
    query = _canonical_query(req)
    path = req.raw_path or "/"
    resources = ["/" + req.account + path]
    prefix = "/" + req.account
    if path.startswith(prefix + "/") or path == prefix:
        resources.append("/" + req.account + (path[len(prefix):] or "/"))
    out = []
    for head in heads:
        for service_order in (True, False):
            canon = _canonical_headers(req.headers, service_order)
            for resource in resources:
                s = head + canon + resource + query
                if s not in out:
                    out.append(s)
    return out


def _shared_key(req: AuthRequest, auth: str, keys: Sequence[str], now: datetime
                ) -> AuthResult:
    scheme, _, cred = auth.strip().partition(" ")
    if scheme != "SharedKey":
        raise authentication_failed(f"The authentication scheme {scheme} is not supported.")
    account, _, signature = cred.strip().partition(":")
    if account != req.account or not signature:
        raise authentication_failed(
            f"The account being accessed ({req.account}) does not match the account of the "
            f"Authorization header ({account}).")
    stamp = req.headers.get("x-ms-date") or req.headers.get("date")
    if not stamp:
        raise authentication_failed("Request date header not specified.")
    try:
        when = parsedate_to_datetime(stamp)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    except (TypeError, ValueError):
        raise authentication_failed(f"The date header '{stamp}' is not valid.") from None
    if abs(now - when) > MAX_CLOCK_SKEW:
        raise authentication_failed(f"Request date header too old: '{stamp}'")
    candidates = shared_key_strings(req)
    if any(_matches(keys, s, signature) for s in candidates):
        return AuthResult("sharedkey")
    shown = candidates[0].replace("\n", "\\n")
    raise authentication_failed(
        f"The MAC signature found in the HTTP request '{signature}' is not the same as any "
        f"computed signature. Server used following string to sign: '{shown}'.")


# --- service SAS -----------------------------------------------------------------------

_SAS_TIME = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)(?:T(\d\d):(\d\d)(?::(\d\d)(?:\.(\d{1,7}))?)?Z?)?$")


def parse_sas_time(text: str) -> datetime:
    m = _SAS_TIME.match(text.strip())
    if not m:
        raise ValueError(text)
    y, mo, d, h, mi, s, frac = m.groups()
    return datetime(int(y), int(mo), int(d), int(h or 0), int(mi or 0), int(s or 0),
                    int((frac or "0").ljust(6, "0")[:6]), tzinfo=UTC)


def _http_date(dt: datetime) -> str:
    return dt.strftime("%a, %d %b %Y %H:%M:%S GMT")


def sas_string_to_sign(q: Mapping[str, str], canonical_resource: str,
                       snapshot_time: str = "") -> str:
    sv = q.get("sv", "")
    g = q.get
    head = [g("sp", ""), g("st", ""), g("se", ""), canonical_resource, g("si", ""),
            g("sip", ""), g("spr", ""), sv]
    tail = [g("rscc", ""), g("rscd", ""), g("rsce", ""), g("rscl", ""), g("rsct", "")]
    if sv >= "2020-12-06":
        return "\n".join(head + [g("sr", ""), snapshot_time, g("ses", "")] + tail)
    if sv >= "2018-11-09":
        return "\n".join(head + [g("sr", ""), snapshot_time] + tail)
    return "\n".join(head + tail)


def _ip_allowed(spec: str, client: str | None) -> bool:
    if client is None:
        return False
    try:
        ip = ipaddress.ip_address(client)
        lo, _, hi = spec.partition("-")
        low = ipaddress.ip_address(lo.strip())
        high = ipaddress.ip_address(hi.strip()) if hi else low
        return low <= ip <= high  # type: ignore[operator]
    except (ValueError, TypeError):
        return False


def _service_sas(req: AuthRequest, q: dict[str, str], keys: Sequence[str], now: datetime
                 ) -> AuthResult:
    sv, sr, sig = q.get("sv", ""), q.get("sr", ""), q.get("sig", "")
    if "ss" in q or "srt" in q:
        raise authentication_failed("Account SAS is not supported by this endpoint.")
    if "skoid" in q:
        raise authentication_failed("User delegation SAS is not supported by this endpoint.")
    if not sv or sv < "2015-04-05":
        raise authentication_failed(f"The signed version '{sv}' is not supported.")
    if sr not in ("b", "bs", "c"):
        raise authentication_failed(
            f"The specified signed resource '{sr}' is not allowed for this resource level")
    if sr in ("b", "bs") and not req.blob:
        raise AzureError(403, "AuthorizationResourceTypeMismatch",
                         "This request is not authorized to perform this operation using "
                         "this resource type.")
    resource = f"/blob/{req.account}/{req.container or ''}"
    if sr in ("b", "bs"):
        resource += f"/{req.blob}"
    snapshot_time = q.get("snapshot", "") if sr == "bs" else ""
    string_to_sign = sas_string_to_sign(q, resource, snapshot_time)
    if not _matches(keys, string_to_sign, sig):
        shown = string_to_sign.replace("\n", "\\n")
        raise authentication_failed(
            f"Signature did not match. String to sign used was {shown}")
    if q.get("si"):
        raise authentication_failed(
            f"Stored access policy '{q['si']}' is not supported by this endpoint.")
    try:
        start = parse_sas_time(q["st"]) if q.get("st") else None
        expiry = parse_sas_time(q["se"]) if q.get("se") else None
    except ValueError:
        raise authentication_failed("Signature fields not well formed.") from None
    if expiry is None or not q.get("sp"):
        raise authentication_failed("Signature fields not well formed.")
    if start is not None and expiry <= start:
        raise authentication_failed(
            f"Signed expiry time [{_http_date(expiry)}] must be after signed start time "
            f"[{_http_date(start)}]")
    if now > expiry or (start is not None and now < start):
        shown_start = _http_date(start) if start else ""
        raise authentication_failed(
            f"Signature not valid in the specified time frame: Start [{shown_start}] - "
            f"Expiry [{_http_date(expiry)}] - Current [{_http_date(now)}]")
    if q.get("spr") and req.scheme not in [p.strip() for p in q["spr"].split(",")]:
        raise AzureError(403, "AuthorizationProtocolMismatch",
                         "This request is not authorized to perform this operation using "
                         "this protocol.")
    if q.get("sip") and not _ip_allowed(q["sip"], req.client_ip):
        raise AzureError(403, "AuthorizationSourceIPMismatch",
                         "This request is not authorized to perform this operation using "
                         f"this source IP {req.client_ip}.")
    return AuthResult("sas", dict(q))


def require_permission(result: AuthResult, any_of: str) -> None:
    """For SAS requests: the signed permissions must hold one of the letters in any_of."""
    if result.kind != "sas":
        return
    if not any_of or not set(any_of) & set(result.sas.get("sp", "")):
        raise permission_mismatch()


def require_container_sas(result: AuthResult) -> None:
    """Container-level operations (List Blobs, container properties) need sr=c."""
    if result.kind == "sas" and result.sas.get("sr") != "c":
        raise AzureError(403, "AuthorizationResourceTypeMismatch",
                         "This request is not authorized to perform this operation using "
                         "this resource type.")


def require_shared_key(result: AuthResult) -> None:
    """Operations a service SAS cannot do (create or delete a container, list containers)."""
    if result.kind != "sharedkey":
        raise authorization_failure()


# --- helpers for callers ------------------------------------------------------------------


def generate_blob_sas(account: str, key: str, container: str, blob: str, permission: str,
                      expiry: datetime, start: datetime | None = None,
                      snapshot: str | None = None, *, ip: str | None = None,
                      protocol: str | None = None) -> str:
    """A service SAS query string (no leading '?') for one blob (or one of its snapshots)."""
    from azure.storage.blob import generate_blob_sas as _generate

    return str(_generate(account_name=account, container_name=container, blob_name=blob,
                         snapshot=snapshot, account_key=key, permission=permission,
                         expiry=expiry, start=start, ip=ip, protocol=protocol))


def generate_container_sas(account: str, key: str, container: str, permission: str,
                           expiry: datetime, start: datetime | None = None) -> str:
    """A service SAS query string (no leading '?') for a container."""
    from azure.storage.blob import generate_container_sas as _generate

    return str(_generate(account_name=account, container_name=container, account_key=key,
                         permission=permission, expiry=expiry, start=start))


def blob_url(base_url: str, account: str, container: str, blob: str,
             sas: str | None = None, snapshot: str | None = None) -> str:
    """Path-style URL of a blob: <base_url>/<account>/<container>/<blob>[?snapshot=..&sas]."""
    url = (f"{base_url.rstrip('/')}/{account}/{container}/"
           f"{urllib.parse.quote(blob, safe='~/')}")
    query = []
    if snapshot:
        query.append(f"snapshot={urllib.parse.quote(snapshot, safe='')}")
    if sas:
        query.append(sas.lstrip("?"))
    return url + ("?" + "&".join(query) if query else "")
