"""The Blob endpoint, driven by the official azure-storage-blob SDK (unchanged) against a
real uvicorn server: Shared Key (account key) and SAS URLs, every supported operation."""

from __future__ import annotations

import base64
import hashlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from azure.core import MatchConditions
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.storage.blob import (
    BlobClient,
    BlobServiceClient,
    BlobType,
    ContainerClient,
    ContentSettings,
)

from conftest_storage import BlobServer, blob_server  # noqa: F401
from vmvault.storage import blob_endpoint
from vmvault.storage.auth import blob_url, generate_blob_sas, generate_container_sas

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def svc(blob_server: BlobServer) -> BlobServiceClient:  # noqa: F811
    return BlobServiceClient(blob_server.account_url, credential=blob_server.credential)


@pytest.fixture
def container(svc: BlobServiceClient, request: pytest.FixtureRequest) -> Iterator[ContainerClient]:
    name = "c-" + hashlib.sha1(request.node.name.encode()).hexdigest()[:12]
    cc = svc.create_container(name)
    yield cc
    cc.delete_container()


def _sas_client(server: BlobServer, container: str, blob: str, permission: str,
                expiry: datetime | None = None, start: datetime | None = None,
                key: str | None = None, snapshot: str | None = None) -> BlobClient:
    sas = generate_blob_sas(server.account.name, key or server.account.key1, container, blob,
                            permission, expiry or datetime.now(UTC) + timedelta(hours=1),
                            start, snapshot)
    return BlobClient.from_blob_url(blob_url(server.url, server.account.name, container, blob,
                                             sas), snapshot=snapshot)


# --- containers and block blobs ---------------------------------------------------------


def test_containers(svc: BlobServiceClient) -> None:
    cc = svc.create_container("listme", metadata={"owner": "tests"})
    try:
        assert "listme" in [c.name for c in svc.list_containers()]
        props = cc.get_container_properties()
        assert props.metadata == {"owner": "tests"} and props.etag
        with pytest.raises(ResourceExistsError) as exc:
            svc.create_container("listme")
        assert exc.value.error_code == "ContainerAlreadyExists"
        assert svc.get_account_information()["sku_name"] == "Standard_LRS"
    finally:
        cc.delete_container()
    with pytest.raises(ResourceNotFoundError) as exc2:
        cc.get_container_properties()
    assert exc2.value.error_code == "ContainerNotFound"
    assert not cc.exists()


def test_block_blob(container: ContainerClient) -> None:
    bc = container.get_blob_client("dir/hello.txt")
    bc.upload_blob(b"hello world", metadata={"a": "1"},
                   content_settings=ContentSettings(content_type="text/plain"))
    props = bc.get_blob_properties()
    assert (props.size, props.blob_type, props.metadata) == (11, BlobType.BLOCKBLOB, {"a": "1"})
    assert props.content_settings.content_type == "text/plain"
    assert props.content_settings.content_md5 == hashlib.md5(b"hello world").digest()
    assert bc.download_blob().readall() == b"hello world"
    assert bc.download_blob(offset=6, length=5).readall() == b"world"
    with pytest.raises(ResourceExistsError) as exc:
        bc.upload_blob(b"again")  # overwrite=False: If-None-Match: *
    assert exc.value.error_code == "BlobAlreadyExists"
    bc.upload_blob(b"", overwrite=True)
    assert bc.download_blob().readall() == b""
    with pytest.raises(ResourceNotFoundError) as exc2:
        container.get_blob_client("missing").get_blob_properties()
    assert exc2.value.error_code == "BlobNotFound"


def test_block_blob_staged(blob_server: BlobServer, container: ContainerClient) -> None:  # noqa: F811
    """Uploads bigger than max_single_put_size go as Put Block + Put Block List."""
    svc = BlobServiceClient(blob_server.account_url, credential=blob_server.credential,
                            max_single_put_size=256 * 1024, max_block_size=100 * 1024)
    bc = svc.get_blob_client(container.container_name, "staged.bin")
    data = os.urandom(MiB + 123)
    bc.upload_blob(data, max_concurrency=3)
    assert bc.download_blob().readall() == data
    assert len(bc.get_block_list("committed")[0]) == 11


# --- page blobs -------------------------------------------------------------------------


def test_page_blob_operations(container: ContainerClient) -> None:
    bc = container.get_blob_client("vm1-osdisk.vhd")
    created = bc.create_page_blob(4 * MiB, metadata={"role": "os"})
    assert created["etag"]
    data = os.urandom(8192)
    bc.upload_page(data, offset=MiB, length=8192)
    props = bc.get_blob_properties()
    assert (props.size, props.blob_type, props.metadata) == (4 * MiB, BlobType.PAGEBLOB,
                                                             {"role": "os"})
    assert props.page_blob_sequence_number == 0 and props.etag != created["etag"]
    assert bc.download_blob(offset=MiB, length=8192).readall() == data
    whole = bc.download_blob().readall()
    assert len(whole) == 4 * MiB and whole[MiB : MiB + 8192] == data
    assert whole[: MiB] == bytes(MiB)
    assert [(r.start, r.end, r.cleared) for r in bc.list_page_ranges()] == [
        (MiB, MiB + 8191, False)]
    bc.set_blob_metadata({"role": "data", "lun": "0"})
    assert bc.get_blob_properties().metadata == {"role": "data", "lun": "0"}
    bc.resize_blob(8 * MiB)
    assert bc.get_blob_properties().size == 8 * MiB
    assert bc.download_blob(offset=MiB, length=8192).readall() == data
    with pytest.raises(HttpResponseError) as exc:
        bc.upload_page(b"x" * 512, offset=8 * MiB, length=512)
    assert exc.value.status_code == 416 and exc.value.error_code == "InvalidPageRange"
    with pytest.raises(HttpResponseError) as exc:
        bc.resize_blob(1000)
    assert exc.value.status_code == 400


def test_snapshots_and_page_range_diff(container: ContainerClient) -> None:
    bc = container.get_blob_client("disk.vhd")
    bc.create_page_blob(4 * MiB)
    bc.upload_page(b"a" * 8192, offset=0, length=8192)
    bc.upload_page(b"b" * 8192, offset=2 * MiB, length=8192)
    # conditional: checked against the blob as the snapshot is taken
    etag = bc.get_blob_properties().etag
    with pytest.raises(ResourceModifiedError) as cond:
        bc.create_snapshot(etag='"0x0"', match_condition=MatchConditions.IfNotModified)
    assert cond.value.status_code == 412
    snap = bc.create_snapshot(metadata={"rp": "1"}, etag=etag,
                              match_condition=MatchConditions.IfNotModified)
    s1 = snap["snapshot"]
    assert snap["etag"] == etag
    bc.clear_page(offset=2 * MiB, length=8192)
    bc.upload_page(b"c" * 4096, offset=3 * MiB, length=4096)
    with pytest.warns(DeprecationWarning):  # the classic Get Page Ranges call
        ranges, clears = bc.get_page_ranges(previous_snapshot_diff=s1)
    assert ranges == [{"start": 3 * MiB, "end": 3 * MiB + 4095}]
    assert clears == [{"start": 2 * MiB, "end": 2 * MiB + 8191}]
    diff = list(bc.list_page_ranges(previous_snapshot=s1))
    assert [(r.start, r.end, r.cleared) for r in diff] == [
        (2 * MiB, 2 * MiB + 8191, True), (3 * MiB, 3 * MiB + 4095, False)]
    # The snapshot: its metadata, its frozen content, its own page ranges.
    snap_client = container.get_blob_client("disk.vhd", snapshot=s1)
    assert snap_client.get_blob_properties().metadata == {"rp": "1"}
    assert snap_client.download_blob(offset=2 * MiB, length=4).readall() == b"bbbb"
    assert [(r.start, r.end) for r in snap_client.list_page_ranges()] == [
        (0, 8191), (2 * MiB, 2 * MiB + 8191)]
    paged = snap_client.list_page_ranges(results_per_page=1).by_page()
    assert [[r.start for r in page] for page in paged] == [[0], [2 * MiB]]
    listed = [(b.name, b.snapshot, b.metadata or {})
              for b in container.list_blobs(include=["snapshots", "metadata"])]
    assert listed == [("disk.vhd", s1, {"rp": "1"}), ("disk.vhd", None, {})]
    # Deleting: a blob with snapshots needs delete_snapshots.
    with pytest.raises(ResourceExistsError) as exc:
        bc.delete_blob()
    assert exc.value.status_code == 409 and exc.value.error_code == "SnapshotsPresent"
    s2 = bc.create_snapshot()["snapshot"]
    container.get_blob_client("disk.vhd", snapshot=s2).delete_blob()
    bc.delete_blob(delete_snapshots="only")
    assert [b.snapshot for b in container.list_blobs(include=["snapshots"])] == [None]
    bc.create_snapshot()
    bc.delete_blob(delete_snapshots="include")
    assert list(container.list_blobs(include=["snapshots"])) == []


def test_sparse_download_and_large_transfer(container: ContainerClient) -> None:
    """A big page blob goes up in 4 MiB pages and comes down streamed, in parallel."""
    bc = container.get_blob_client("big.vhd")
    data = bytearray(os.urandom(24 * MiB))
    data[4 * MiB : 12 * MiB] = bytes(8 * MiB)  # a zero stretch
    bc.upload_blob(bytes(data), blob_type=BlobType.PAGEBLOB, max_concurrency=4)
    got = bc.download_blob(max_concurrency=4).readall()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_list_blobs_paging_and_prefix(container: ContainerClient) -> None:
    for name in ("a/1", "a/2", "b/1", "c"):
        container.upload_blob(name, b"x")
    assert [b.name for b in container.list_blobs(name_starts_with="a/")] == ["a/1", "a/2"]
    pages = container.list_blobs(results_per_page=2).by_page()
    assert [[b.name for b in page] for page in pages] == [["a/1", "a/2"], ["b/1", "c"]]
    assert sorted(b.name for b in container.walk_blobs()) == ["a/", "b/", "c"]


# --- authorization ----------------------------------------------------------------------


def test_sas_access(blob_server: BlobServer, container: ContainerClient) -> None:  # noqa: F811
    name = container.container_name
    container.get_blob_client("disk.vhd").create_page_blob(MiB)
    rw = _sas_client(blob_server, name, "disk.vhd", "rw")
    rw.upload_page(b"s" * 512, offset=0, length=512)
    assert rw.download_blob(offset=0, length=512).readall() == b"s" * 512
    # Missing permission: authenticated, not authorized.
    ro = _sas_client(blob_server, name, "disk.vhd", "r")
    with pytest.raises(HttpResponseError) as exc:
        ro.upload_page(b"x" * 512, offset=0, length=512)
    assert exc.value.status_code == 403
    assert exc.value.error_code == "AuthorizationPermissionMismatch"
    with pytest.raises(HttpResponseError) as exc:
        ro.delete_blob()
    assert exc.value.error_code == "AuthorizationPermissionMismatch"
    # Expired, not yet valid, wrong key: authentication fails.
    cases = {
        "expired": dict(expiry=datetime.now(UTC) - timedelta(minutes=5)),
        "future": dict(start=datetime.now(UTC) + timedelta(hours=1),
                       expiry=datetime.now(UTC) + timedelta(hours=2)),
        "bad key": dict(key=blob_server.account.key2[:-8] + "AAAAAAA="),
    }
    for label, kwargs in cases.items():
        client = _sas_client(blob_server, name, "disk.vhd", "r", **kwargs)  # type: ignore[arg-type]
        with pytest.raises(ClientAuthenticationError) as auth_exc:
            client.get_blob_properties()
        assert auth_exc.value.status_code == 403, label
        assert auth_exc.value.error_code == "AuthenticationFailed", label
    # A blob SAS is for that blob only.
    container.upload_blob("other", b"x")
    other = BlobClient.from_blob_url(
        blob_url(blob_server.url, blob_server.account.name, name, "other",
                 rw.url.split("?", 1)[1]))
    with pytest.raises(ClientAuthenticationError) as auth_exc:
        other.download_blob()
    assert auth_exc.value.error_code == "AuthenticationFailed"
    # The second key works as well.
    assert _sas_client(blob_server, name, "disk.vhd", "r",
                       key=blob_server.account.key2).get_blob_properties().size == MiB


def test_sas_snapshot_and_container(blob_server: BlobServer,  # noqa: F811
                                    container: ContainerClient) -> None:
    name = container.container_name
    bc = container.get_blob_client("d.vhd")
    bc.create_page_blob(MiB)
    bc.upload_page(b"1" * 512, offset=0, length=512)
    snap = bc.create_snapshot()["snapshot"]
    bc.upload_page(b"2" * 512, offset=0, length=512)
    snap_client = _sas_client(blob_server, name, "d.vhd", "r", snapshot=snap)
    assert snap_client.download_blob(offset=0, length=512).readall() == b"1" * 512
    sas = generate_container_sas(blob_server.account.name, blob_server.account.key1, name, "rl",
                                 datetime.now(UTC) + timedelta(hours=1))
    cc = ContainerClient.from_container_url(
        f"{blob_server.account_url}/{name}?{sas}")
    assert [b.name for b in cc.list_blobs()] == ["d.vhd"]
    assert cc.get_blob_client("d.vhd").download_blob(offset=0, length=1).readall() == b"2"
    with pytest.raises(HttpResponseError) as exc:
        cc.get_blob_client("d.vhd").upload_page(b"x" * 512, offset=0, length=512)
    assert exc.value.error_code == "AuthorizationPermissionMismatch"


def test_shared_key_failures(blob_server: BlobServer, container: ContainerClient) -> None:  # noqa: F811
    wrong = BlobServiceClient(blob_server.account_url, credential={
        "account_name": blob_server.account.name,
        "account_key": blob_server.account.key1[:-8] + "AAAAAAA="})
    with pytest.raises(ClientAuthenticationError) as exc:
        wrong.get_container_client(container.container_name).get_container_properties()
    assert exc.value.status_code == 403 and exc.value.error_code == "AuthenticationFailed"
    key2 = BlobServiceClient(blob_server.account_url, credential={
        "account_name": blob_server.account.name, "account_key": blob_server.account.key2})
    assert key2.get_container_client(container.container_name).exists()
    # No credentials at all.
    container.upload_blob("public?", b"x")
    anon = BlobClient.from_blob_url(blob_url(blob_server.url, blob_server.account.name,
                                             container.container_name, "public?"))
    with pytest.raises(HttpResponseError) as exc2:
        anon.download_blob()
    assert exc2.value.status_code == 401 and exc2.value.error_code == "NoAuthenticationInformation"


def test_offline_account(blob_server: BlobServer, svc: BlobServiceClient) -> None:  # noqa: F811
    blob_server.store.set_account_status(blob_server.account.name, False)
    try:
        with pytest.raises(HttpResponseError) as exc:
            list(svc.list_containers())
        assert exc.value.status_code == 403 and exc.value.error_code == "AccountIsDisabled"
    finally:
        blob_server.store.set_account_status(blob_server.account.name, True)
    list(svc.list_containers())


# --- the wire, as Azure has it ------------------------------------------------------------


def test_wire_format(blob_server: BlobServer, container: ContainerClient) -> None:  # noqa: F811
    name = container.container_name
    container.get_blob_client("w.vhd").create_page_blob(MiB)
    sas = generate_blob_sas(blob_server.account.name, blob_server.account.key1, name, "w.vhd",
                            "r", datetime.now(UTC) + timedelta(hours=1))
    url = blob_url(blob_server.url, blob_server.account.name, name, "w.vhd", sas)
    with httpx.Client() as http:
        r = http.head(url, headers={"x-ms-version": "2021-08-06"})
        assert r.status_code == 200
        assert r.headers["x-ms-version"] == "2021-08-06" and r.headers["x-ms-request-id"]
        assert r.headers["x-ms-blob-type"] == "PageBlob"
        assert r.headers["content-length"] == str(MiB)
        assert r.headers["etag"].startswith('"0x') and r.headers["last-modified"].endswith("GMT")
        assert r.headers["x-ms-blob-sequence-number"] == "0"
        r = http.get(url, headers={"x-ms-range": "bytes=512-1023"})
        assert r.status_code == 206 and r.headers["content-range"] == f"bytes 512-1023/{MiB}"
        assert r.content == bytes(512)
        r = http.get(url, headers={"x-ms-range": f"bytes={MiB}-"})
        assert r.status_code == 416 and r.headers["x-ms-error-code"] == "InvalidRange"
        r = http.put(url + "&comp=snapshot")  # a read-only SAS
        assert r.status_code == 403
        assert r.headers["x-ms-error-code"] == "AuthorizationPermissionMismatch"
        body = ET.fromstring(r.content)
        assert body.tag == "Error" and body.findtext("Code") == r.headers["x-ms-error-code"]
        assert "RequestId:" in (body.findtext("Message") or "")
        expired = generate_blob_sas(blob_server.account.name, blob_server.account.key1, name,
                                    "w.vhd", "r", datetime.now(UTC) - timedelta(minutes=1))
        r = http.get(blob_url(blob_server.url, blob_server.account.name, name, "w.vhd",
                              expired))
        body = ET.fromstring(r.content)
        assert r.status_code == 403 and body.findtext("Code") == "AuthenticationFailed"
        assert "Signature not valid in the specified time frame" in (
            body.findtext("AuthenticationErrorDetail") or "")
        r = http.head(blob_url(blob_server.url, blob_server.account.name, name, "nope", sas))
        assert r.status_code == 403 and r.headers["x-ms-error-code"] == "AuthenticationFailed"
        assert r.content == b""
        r = http.get(url, headers={"x-ms-version": "yesterday"})
        assert r.status_code == 400 and r.headers["x-ms-error-code"] == "InvalidHeaderValue"
        r = http.get(f"{blob_server.url}/nosuchacct/c/b")
        assert r.status_code == 404 and r.headers["x-ms-error-code"] == "ResourceNotFound"


# --- Azure's answers the differential test holds us to (tests/test_blob_azurite.py) -------


def _crc64_b64(data: bytes) -> str:
    return base64.b64encode(blob_endpoint.crc64_py(data).to_bytes(8, "little")).decode()


def test_crc64() -> None:
    """Azure Storage's CRC64: the known value, pieces, and the native module agreeing."""
    assert _crc64_b64(b"a" * 512) == "u661BimQ84c="  # Azure's answer to Put Page of this
    assert blob_endpoint.crc64_py(b"") == 0
    data = os.urandom(5000)
    assert blob_endpoint.crc64_py(data[1234:], blob_endpoint.crc64_py(data[:1234])) == \
        blob_endpoint.crc64_py(data)
    crc = blob_endpoint.Crc64()
    crc.update_many([data[:10], data[10:]])
    assert crc.header() == _crc64_b64(data)
    if blob_endpoint._native_crc64 is not None:
        assert blob_endpoint._native_crc64.compute(data, 0) == blob_endpoint.crc64_py(data)


def test_crc64_without_native(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without azure-storage-extensions: pure Python up to CRC64_PY_MAX, then no header."""
    monkeypatch.setattr(blob_endpoint, "_native_crc64", None)
    crc = blob_endpoint.Crc64()
    crc.update(b"a" * 512)
    assert crc.header() == "u661BimQ84c="
    crc.update(bytes(blob_endpoint.CRC64_PY_MAX))
    assert crc.header() is None


def test_write_checksums(blob_server: BlobServer, container: ContainerClient) -> None:  # noqa: F811
    """x-ms-content-crc64 (no Content-MD5 sent) or Content-MD5 (sent) on Put Page, Put Block
    and Put Blob; Put Block List answers the MD5 of its request body."""
    seen: list[tuple[str, bytes | None, dict[str, str]]] = []

    def hook(response: Any) -> None:
        request, http_response = response.http_request, response.http_response
        body = request.body if isinstance(request.body, bytes) else None
        if isinstance(request.body, str):
            body = request.body.encode()
        seen.append((request.url, body,
                     {k.lower(): v for k, v in http_response.headers.items()}))

    svc = BlobServiceClient(blob_server.account_url, credential=blob_server.credential,
                            max_single_put_size=64 * 1024, max_block_size=64 * 1024,
                            raw_response_hook=hook)
    cc = svc.get_container_client(container.container_name)
    page = cc.get_blob_client("crc.vhd")
    page.create_page_blob(8 * MiB)
    got = page.upload_page(b"a" * 512, offset=0, length=512)
    assert base64.b64encode(got["content_crc64"]).decode() == "u661BimQ84c="
    assert got.get("content_md5") is None
    got = page.upload_page(b"a" * 512, offset=512, length=512, validate_content=True)
    assert got["content_md5"] == hashlib.md5(b"a" * 512).digest()
    assert got.get("content_crc64") is None
    big = os.urandom(4 * MiB)
    got = page.upload_page(big, offset=4 * MiB, length=4 * MiB)
    if blob_endpoint._native_crc64 is not None:
        assert got["content_crc64"] == blob_endpoint._native_crc64.compute(
            big, 0).to_bytes(8, "little")
    else:  # too big for the pure-Python CRC64
        assert got.get("content_crc64") is None

    small = cc.get_blob_client("small.txt")
    seen.clear()
    small.upload_blob(b"hello")
    headers = seen[-1][2]
    assert headers["content-md5"] == base64.b64encode(hashlib.md5(b"hello").digest()).decode()
    assert headers["x-ms-content-crc64"] == _crc64_b64(b"hello")

    staged = cc.get_blob_client("staged.bin")
    data = os.urandom(100 * 1024)
    seen.clear()
    staged.upload_blob(data)
    blocks = [(body, h) for url, body, h in seen if "comp=block&" in url]
    commits = [(body, h) for url, body, h in seen if "comp=blocklist" in url]
    assert len(blocks) == 2 and len(commits) == 1
    for body, h in blocks:
        assert body is not None and "content-md5" not in h
        if blob_endpoint._native_crc64 is not None or len(body) <= blob_endpoint.CRC64_PY_MAX:
            assert h["x-ms-content-crc64"] == _crc64_b64(body)
        else:  # too big for the pure-Python CRC64
            assert "x-ms-content-crc64" not in h
    body, h = commits[0]
    assert body is not None and b"<BlockList>" in body
    assert h["content-md5"] == base64.b64encode(hashlib.md5(body).digest()).decode()
    assert staged.download_blob().readall() == data


def test_listing_and_tiers_wire_format(blob_server: BlobServer,  # noqa: F811
                                       container: ContainerClient) -> None:
    """List Blobs as Azure writes it: a bare <Etag>, <Metadata /> for a blob without
    metadata, Hot (inferred) for block blobs; Get Blob Properties says the same tier."""
    container.get_blob_client("disk.vhd").create_page_blob(MiB)
    container.get_blob_client("doc.txt").upload_blob(b"x", metadata={"k": "v"})
    props = container.get_blob_client("doc.txt").get_blob_properties()
    assert (props.blob_tier, props.blob_tier_inferred) == ("Hot", True)
    page_props = container.get_blob_client("disk.vhd").get_blob_properties()
    assert (page_props.blob_tier, page_props.blob_tier_inferred) == (None, None)
    listed = {b.name: b for b in container.list_blobs()}
    assert listed["doc.txt"].etag == props.etag.strip('"')
    assert (listed["doc.txt"].blob_tier, listed["doc.txt"].blob_tier_inferred) == ("Hot", True)
    assert listed["disk.vhd"].blob_tier is None
    sas = generate_container_sas(blob_server.account.name, blob_server.account.key1,
                                 container.container_name, "l",
                                 datetime.now(UTC) + timedelta(hours=1))
    url = (f"{blob_server.account_url}/{container.container_name}"
           f"?restype=container&comp=list&include=metadata&{sas}")
    with httpx.Client() as http:
        root = ET.fromstring(http.get(url).content)
    blobs = {b.findtext("Name"): b for b in root.iter("Blob")}
    page_xml, doc_xml = blobs["disk.vhd"], blobs["doc.txt"]
    assert (page_xml.findtext("Properties/Etag") or "").startswith("0x")
    assert page_xml.find("Metadata") is not None and len(page_xml.find("Metadata") or []) == 0
    assert page_xml.find("Properties/AccessTier") is None
    assert doc_xml.findtext("Metadata/k") == "v"
    assert doc_xml.findtext("Properties/AccessTier") == "Hot"
    assert doc_xml.findtext("Properties/AccessTierInferred") == "true"


def test_container_name_errors(svc: BlobServiceClient) -> None:
    """A name of the wrong length is 400 OutOfRangeInput, checked before its characters;
    a name of the right length with bad characters is 400 InvalidResourceName."""
    for name, code in [("ab", "OutOfRangeInput"), ("a" * 64, "OutOfRangeInput"),
                       ("A_", "OutOfRangeInput"), ("Bad_Name", "InvalidResourceName"),
                       ("a--b", "InvalidResourceName")]:
        with pytest.raises(HttpResponseError) as exc:
            svc.create_container(name)
        assert (exc.value.status_code, exc.value.error_code) == (400, code), name
    svc.create_container("a" * 63).delete_container()
    svc.create_container("abc").delete_container()
