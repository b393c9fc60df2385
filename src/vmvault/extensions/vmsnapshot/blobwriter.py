"""Write the status and log text to SAS blobs, as Azure's BlobWriter does (wire spec 3.1):

1. ``GET <sas>``: the blob's ``x-ms-blob-type`` and ``Content-Length``;
2. a block blob must be empty, unless this process wrote it already (a second write of the
   same run); it is then written with ``PUT <sas>`` and ``x-ms-blob-type: BlockBlob``;
3. a page blob (also when the type is unknown) is cleared over its current length, the text
   (its tail, at most 10 MiB or the blob's size) is padded with spaces to a multiple of 512,
   the blob is resized (``comp=properties``) when too small, and the text written with
   ``comp=page`` updates of at most 4 MiB.

vmvault's differences: a blob that does not exist is created as a block blob; each call is
retried with backoff on connection errors, timeouts and HTTP 408/500/503.
"""

from __future__ import annotations

import re
import time
from email.utils import formatdate

import httpx

from vmvault.extensions.vmsnapshot.snapshot import (
    BACKOFF,
    RETRY_STATUSES,
    TIMEOUT,
    TRIES,
    X_MS_VERSION,
    blob_base,
    make_client,
    with_query,
)

PAGE = 512
MAX_CHUNK = 4 * 1024 * 1024
TAIL_LIMIT = 10 * 1024 * 1024
_ERROR_CODE = re.compile(r"<Code>([^<]+)</Code>")


class BlobWriteError(Exception):
    pass


def _describe(response: httpx.Response) -> str:
    match = _ERROR_CODE.search(response.text)
    return f"HTTP {response.status_code}" + (f" {match.group(1)}" if match else "")


def pad_to_pages(data: bytes) -> bytes:
    return data + b" " * (-len(data) % PAGE)


class BlobWriter:
    """Writes text to SAS blobs; remembers the block blobs it may overwrite."""

    def __init__(self, client: httpx.Client | None = None) -> None:
        self._own = client is None
        self.client = client or make_client()
        self._writable_block_blobs: set[str] = set()

    def close(self) -> None:
        if self._own:
            self.client.close()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, sas_uri: str, text: str) -> None:
        """Write text to the blob; BlobWriteError names the blob and the failed call."""
        blob_type, length = self._probe(sas_uri)
        data = text.encode("utf-8")
        if blob_type == "BlockBlob" or blob_type is None:
            if blob_type and length and sas_uri not in self._writable_block_blobs:
                raise BlobWriteError(f"{blob_base(sas_uri)} is a block blob that is not empty: "
                                     "refusing to overwrite it")
            self._request("PUT", sas_uri, {"x-ms-blob-type": "BlockBlob"}, data, "Put Blob")
            self._writable_block_blobs.add(sas_uri)
            return
        self._write_page_blob(sas_uri, length, data)

    def _probe(self, sas_uri: str) -> tuple[str | None, int]:
        """(x-ms-blob-type, Content-Length) of the blob; (None, 0) when it does not exist."""
        failure = ""
        for attempt in range(TRIES):
            try:
                with self.client.stream("GET", sas_uri, timeout=TIMEOUT) as response:
                    if response.status_code == 404:
                        return None, 0
                    if response.status_code in (200, 206):
                        return (response.headers.get("x-ms-blob-type") or "PageBlob",
                                int(response.headers.get("content-length") or 0))
                    response.read()
                    failure = _describe(response)
                    if response.status_code not in RETRY_STATUSES:
                        break
            except httpx.TransportError as exc:
                failure = f"{type(exc).__name__}: {exc}"
            if attempt < TRIES - 1:
                time.sleep(BACKOFF[attempt])
        raise BlobWriteError(f"reading {blob_base(sas_uri)} failed: {failure}")

    def _write_page_blob(self, sas_uri: str, length: int, data: bytes) -> None:
        limit = max(TAIL_LIMIT, length)
        if len(data) > limit:
            data = data[-limit:]
        data = pad_to_pages(data)
        if length > 0:
            self._request("PUT", with_query(sas_uri, "comp=page"),
                          {"x-ms-page-write": "clear", "x-ms-range": f"bytes=0-{length - 1}"},
                          b"", "Put Page (clear)")
        if length < len(data):
            self._request("PUT", with_query(sas_uri, "comp=properties"),
                          {"x-ms-blob-content-length": str(len(data))}, b"",
                          "Set Blob Properties (resize)")
        for start in range(0, len(data), MAX_CHUNK):
            chunk = data[start:start + MAX_CHUNK]
            self._request("PUT", with_query(sas_uri, "comp=page"),
                          {"x-ms-page-write": "update",
                           "x-ms-range": f"bytes={start}-{start + len(chunk) - 1}"},
                          chunk, "Put Page (update)")

    def _request(self, method: str, url: str, headers: dict[str, str], body: bytes,
                 what: str) -> httpx.Response:
        headers = {"x-ms-version": X_MS_VERSION, "x-ms-date": formatdate(usegmt=True),
                   "Content-Length": str(len(body)), **headers}
        failure = ""
        for attempt in range(TRIES):
            try:
                response = self.client.request(method, url, headers=headers, content=body,
                                               timeout=TIMEOUT)
            except httpx.TransportError as exc:
                failure = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code in (200, 201):
                    return response
                failure = _describe(response)
                if response.status_code not in RETRY_STATUSES:
                    break
            if attempt < TRIES - 1:
                time.sleep(BACKOFF[attempt])
        raise BlobWriteError(f"{what} on {blob_base(url)} failed: {failure}")
