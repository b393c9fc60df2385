"""Disk snapshots through the disks' SAS URIs: ``PUT <sas>&comp=snapshot`` (wire spec 3.3).

Unlike Azure's extension, a failed call is retried (3 tries, backoff 0.2 s then 0.5 s) on
connection errors, timeouts and HTTP 408/500/503, never on 403/404; the disks are snapshot
in parallel threads to keep the freeze window short, and no call runs past the deadline the
freeze bound leaves. Proxies come from http_proxy/https_proxy (httpx's trust_env).
"""

from __future__ import annotations

import contextlib
import re
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

import httpx

from vmvault.extensions.vmsnapshot import codes

X_MS_VERSION = "2020-10-02"
TIMEOUT = 10.0
TRIES = 3
BACKOFF = (0.2, 0.5, 1.0)
RETRY_STATUSES = frozenset({408, 500, 503})
MAX_PARALLEL = 16
RATE_EXCEEDED = "The rate of snapshot blob calls is exceeded"
LIMIT_REACHED = "snapshot count against this blob has been exceeded"
_ERROR_CODE = re.compile(r"<Code>([^<]+)</Code>")


@dataclass
class DiskSnapshot:
    blob_uri: str
    is_successful: bool = False
    snapshot_uri: str | None = None
    error_message: str = ""
    status_code: int | None = None
    attempts: int = 0

    def to_status(self) -> dict[str, Any]:
        """The snapshotInfo entry of the status document."""
        return {"isSuccessful": self.is_successful, "snapshotUri": self.snapshot_uri,
                "errorMessage": self.error_message, "statusCode": self.status_code,
                "blobUri": self.blob_uri, "directDriveSnapshotIdentifier": None}

    def describe(self) -> str:
        if self.status_code is None:
            return self.error_message or "no response"
        match = _ERROR_CODE.search(self.error_message)
        return f"HTTP {self.status_code}" + (f" {match.group(1)}" if match else "")


def blob_base(sas_uri: str) -> str:
    """The blob URL without its query (no SAS)."""
    parts = urllib.parse.urlsplit(sas_uri)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def with_query(sas_uri: str, extra: str) -> str:
    """The SAS URI with ``extra`` (e.g. ``comp=snapshot``) added to its query."""
    return sas_uri + ("&" if "?" in sas_uri else "?") + extra


def snapshot_headers(metadata: Sequence[tuple[str, str]]) -> dict[str, str]:
    headers = {"Content-Length": "0", "x-ms-version": X_MS_VERSION,
               "x-ms-date": formatdate(usegmt=True)}
    for key, value in metadata:
        headers[f"x-ms-meta-{key}"] = value
    return headers


def _budget(deadline: float | None) -> float:
    if deadline is None:
        return TIMEOUT
    return min(TIMEOUT, deadline - time.monotonic())


def snapshot_disk(client: httpx.Client, sas_uri: str, metadata: Sequence[tuple[str, str]],
                  deadline: float | None = None) -> DiskSnapshot:
    """Snapshot one disk blob, with retries; never raises."""
    result = DiskSnapshot(blob_base(sas_uri))
    url = with_query(sas_uri, "comp=snapshot")
    for attempt in range(TRIES):
        budget = _budget(deadline)
        if budget <= 0.05:
            note = "no time left within the freeze bound"
            result.error_message = f"{result.error_message}; {note}".lstrip("; ")
            break
        result.attempts += 1
        retry = _try_snapshot(client, url, metadata, budget, result)
        if result.is_successful or not retry or attempt == TRIES - 1:
            break
        time.sleep(min(BACKOFF[attempt], max(_budget(deadline), 0)))
    return result


def _try_snapshot(client: httpx.Client, url: str, metadata: Sequence[tuple[str, str]],
                  timeout: float, result: DiskSnapshot) -> bool:
    """One PUT; fills result; True when a failure is worth a retry."""
    try:
        response = client.put(url, headers=snapshot_headers(metadata), content=b"",
                              timeout=timeout)
    except httpx.TransportError as exc:
        result.status_code = None
        result.error_message = f"{type(exc).__name__}: {exc or 'no response'}"
        return True
    result.status_code = response.status_code
    if response.status_code in (200, 201):
        snap = response.headers.get("x-ms-snapshot")
        if snap:
            result.is_successful = True
            result.snapshot_uri = f"{result.blob_uri}?snapshot={snap}"
            result.error_message = ""
            return False
        result.error_message = "the response has no x-ms-snapshot header"
        return False
    result.error_message = response.text
    return response.status_code in RETRY_STATUSES


def snapshot_disks(sas_uris: Sequence[str], metadata: Sequence[tuple[str, str]] = (), *,
                   deadline: float | None = None, sequential: bool = False,
                   client: httpx.Client | None = None) -> list[DiskSnapshot]:
    """Snapshot every disk (in parallel unless sequential); results in sas_uris order."""
    own = client is None
    client = client or make_client()
    try:
        if sequential or len(sas_uris) < 2:
            return [snapshot_disk(client, uri, metadata, deadline) for uri in sas_uris]
        workers = min(len(sas_uris), MAX_PARALLEL)
        with ThreadPoolExecutor(workers, thread_name_prefix="snapshot") as pool:
            return list(pool.map(lambda uri: snapshot_disk(client, uri, metadata, deadline),
                                 sas_uris))
    finally:
        if own:
            client.close()


def make_client() -> httpx.Client:
    return httpx.Client(timeout=TIMEOUT, trust_env=True, follow_redirects=False)


WARM_TIMEOUT = 2.0


def warm_client(sas_uris: Sequence[str]) -> httpx.Client:
    """A client with one open connection per disk, made before the freeze so that the freeze
    window holds only the snapshot calls: one Get Blob Properties per disk, in parallel. A disk
    that does not answer is left to the snapshot call to report."""
    client = make_client()

    def head(uri: str) -> None:
        with contextlib.suppress(httpx.HTTPError):
            client.head(uri, timeout=WARM_TIMEOUT)

    if len(sas_uris) < 2:
        for uri in sas_uris:
            head(uri)
        return client
    with ThreadPoolExecutor(min(len(sas_uris), MAX_PARALLEL)) as pool:
        list(pool.map(head, sas_uris))
    return client


def classify(results: Sequence[DiskSnapshot]) -> tuple[int, int, str] | None:
    """(run result, ExtErrorCode, message) for failed snapshots; None when all succeeded."""
    failed = [r for r in results if not r.is_successful]
    if not results:
        return codes.SNAPSHOT_NO_NETWORK, codes.SNAPSHOT_NO_NETWORK, "there is no disk to snapshot"
    if not failed:
        return None
    bodies = " ".join(r.error_message for r in failed)
    detail = "; ".join(f"{r.blob_uri}: {r.describe()}" for r in failed)
    if RATE_EXCEEDED in bodies:
        code = codes.SNAPSHOT_RATE_EXCEEDED
        return code, code, f"the storage throttled the snapshot calls: {detail}"
    if LIMIT_REACHED in bodies:
        code = codes.SNAPSHOT_LIMIT_REACHED
        return code, code, f"a disk has too many snapshots: {detail}"
    if len(failed) == len(results):
        code = codes.SNAPSHOT_NO_NETWORK
        return code, code, f"no disk snapshot could be taken: {detail}"
    return (codes.SNAPSHOT_NO_NETWORK, codes.SNAPSHOT_PARTIAL,
            f"{len(failed)} of {len(results)} disk snapshots failed: {detail}")
