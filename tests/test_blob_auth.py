"""Shared Key and SAS verification: the strings we rebuild match what the SDK signs, and a
client that signs per the REST documentation (Range header, Date header) is accepted."""

from __future__ import annotations

import urllib.parse
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from azure.storage.blob import generate_blob_sas as sdk_generate_blob_sas

from conftest_storage import BlobServer, blob_server  # noqa: F401
from vmvault.storage import auth
from vmvault.storage.auth import AuthRequest, blob_url, generate_blob_sas, sas_string_to_sign

KEY = "a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5" \
      "a2V5a2V5a2V5a2V5"


@pytest.mark.parametrize("snapshot", [None, "2026-11-23T11:15:00.1234567Z"])
def test_sas_string_to_sign_matches_sdk(snapshot: str | None) -> None:
    seen: list[str] = []
    token = sdk_generate_blob_sas("acct", "cont", "dir/a b.vhd", snapshot=snapshot,
                                  account_key=KEY, permission="rw",
                                  expiry=datetime(2030, 1, 1, tzinfo=UTC),
                                  start=datetime(2020, 1, 1, tzinfo=UTC), ip="127.0.0.1",
                                  protocol="https,http", cache_control="no-cache",
                                  sts_hook=seen.append)
    q = dict(urllib.parse.parse_qsl(token))
    ours = sas_string_to_sign(q, "/blob/acct/cont/dir/a b.vhd", snapshot or "")
    assert ours == seen[0]
    assert auth.sign(KEY, ours) == q["sig"]


def _request(query: str, blob: str | None = "d.vhd", **headers: str) -> AuthRequest:
    return AuthRequest("GET", f"/acct/cont/{blob}", query, headers, "acct", "cont", blob,
                       "127.0.0.1", "http")


def test_sas_checks() -> None:
    now = datetime.now(UTC)

    def token(**kw: object) -> str:
        args: dict[str, object] = dict(permission="r", expiry=now + timedelta(hours=1))
        args.update(kw)
        return str(sdk_generate_blob_sas("acct", "cont", "d.vhd", account_key=KEY, **args))

    assert auth.authenticate(_request(token()), [KEY]).kind == "sas"
    cases = {
        "AuthorizationProtocolMismatch": token(protocol="https"),
        "AuthorizationSourceIPMismatch": token(ip="10.0.0.1-10.0.0.9"),
    }
    for code, query in cases.items():
        with pytest.raises(auth.AzureError) as exc:
            auth.authenticate(_request(query), [KEY])
        assert (exc.value.status, exc.value.code) == (403, code)
    assert auth.authenticate(_request(token(ip="127.0.0.0-127.0.0.9")), [KEY]).kind == "sas"
    with pytest.raises(auth.AzureError) as exc:  # se before st
        auth.authenticate(_request(token(start=now + timedelta(hours=2))), [KEY])
    assert "must be after signed start time" in exc.value.details["AuthenticationErrorDetail"]
    with pytest.raises(auth.AzureError) as exc:  # tampered permissions
        auth.authenticate(_request(token().replace("sp=r", "sp=rwd")), [KEY])
    assert exc.value.code == "AuthenticationFailed"
    assert exc.value.details["AuthenticationErrorDetail"].startswith("Signature did not match")
    with pytest.raises(auth.AzureError) as exc:
        auth.authenticate(_request(""), [KEY])
    assert (exc.value.status, exc.value.code) == (401, "NoAuthenticationInformation")
    result = auth.authenticate(_request(token(permission="rw")), [KEY])
    auth.require_permission(result, "w")
    with pytest.raises(auth.AzureError) as exc:
        auth.require_permission(result, "d")
    assert exc.value.code == "AuthorizationPermissionMismatch"
    assert auth.parse_sas_time("2026-01-02") == datetime(2026, 1, 2, tzinfo=UTC)
    assert auth.parse_sas_time("2026-01-02T03:04:05.1234567Z").microsecond == 123456


def test_generate_blob_sas_and_url() -> None:
    expiry = datetime(2030, 1, 1, tzinfo=UTC)
    sas = generate_blob_sas("acct", KEY, "cont", "d.vhd", "r", expiry)
    q = dict(urllib.parse.parse_qsl(sas))
    assert (q["sp"], q["sr"], q["se"]) == ("r", "b", "2030-01-01T00:00:00Z")
    assert blob_url("http://h:1/", "acct", "cont", "a b/c.vhd", sas).startswith(
        "http://h:1/acct/cont/a%20b/c.vhd?se=")
    assert blob_url("http://h:1", "acct", "c", "b", snapshot="2026-01-01T00:00:00.0000000Z") \
        == "http://h:1/acct/c/b?snapshot=2026-01-01T00%3A00%3A00.0000000Z"


def test_shared_key_by_the_documentation(blob_server: BlobServer) -> None:  # noqa: F811
    """A hand-made Shared Key request, signed as the REST docs say: Date header, Range."""
    store = blob_server.store
    name = blob_server.account.name
    store.create_container(name, "docsigned", exist_ok=True)
    store.create_page_blob(name, "docsigned", "x.vhd", 4096)
    store.write_pages(name, "docsigned", "x.vhd", 0, b"q" * 4096)
    date = format_datetime(datetime.now(UTC), usegmt=True)
    headers = {"Date": date, "Range": "bytes=0-9", "x-ms-version": "2021-08-06",
               "x-ms-client-request-id": "abc"}
    path = f"/{name}/docsigned/x.vhd"
    string_to_sign = ("GET\n\n\n\n\n\n" + date + "\n\n\n\n\nbytes=0-9\n"
                      "x-ms-client-request-id:abc\nx-ms-version:2021-08-06\n"
                      f"/{name}{path}")
    signature = auth.sign(blob_server.account.key1, string_to_sign)
    headers["Authorization"] = f"SharedKey {name}:{signature}"
    r = httpx.get(blob_server.url + path, headers=headers)
    assert r.status_code == 206, r.text
    assert r.content == b"q" * 10 and r.headers["x-ms-client-request-id"] == "abc"
    headers["Date"] = format_datetime(datetime.now(UTC) - timedelta(hours=1), usegmt=True)
    r = httpx.get(blob_server.url + path, headers=headers)
    assert r.status_code == 403 and r.headers["x-ms-error-code"] == "AuthenticationFailed"
    assert blob_url(blob_server.url, name, "docsigned", "x.vhd").endswith(path)
