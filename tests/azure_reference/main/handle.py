"""A reference VMSnapshot extension, written from /work/shared/spec/vmsnapshot-wire.md alone,
that behaves on the wire as Azure's own Linux extension (VMBackup) does: the test double
that stands in for the real one, whose code cannot be fetched on the build machine.

What it does as Azure's does: HandlerEnvironment.json from the current folder, the newest
N.settings when the sequence number is -1, mrseq, the protected settings decrypted with
``base64 -d | openssl cms -decrypt`` against /var/lib/waagent/<thumbprint>.crt and .prv
(``openssl smime`` as the fallback), N.settings rewritten without protectedSettings, the taskId
dedupe after a random 0.5-5 s wait, enable writing a transitioning status (code 4) and forking
``main/handle.sh daemon``, the public and protected objectStr decoded, one
``PUT <sas>&comp=snapshot`` per disk without x-ms-version, the status and log blobs written
with GET, page clear, properties resize and page update (or a block blob PUT), the status
file with the blob document inside substatus[0].name.

What it leaves out: the freeze (safefreeze) and the pre/post scripts. Its snapshots are
crash-consistent and its status says so (snapshotConsistency 3). Standard library only;
Python 3.
"""

from __future__ import annotations

import base64
import datetime as dt
import glob
import http.client
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.parse

LIB_DIR = "/var/lib/waagent"
TASK_IDENTITY = "task_identity_FD76C85E-406F-4CFA-8EB0-CF18B123365C"
TICKS_AT_EPOCH = 621355968000000000
STALE_TICKS = 140 * 60 * 10**7
LOG: list[str] = []


def log(text: str) -> None:
    LOG.append(f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S} {text}")


# --- context and settings ---------------------------------------------------------------


def context() -> dict:
    with open("HandlerEnvironment.json") as f:
        env = json.load(f)
    env = env[0] if isinstance(env, list) else env
    return {"name": env["name"], "version": env["version"], **env["handlerEnvironment"]}


def sequence(ctx: dict, seq: int) -> int:
    if seq >= 0:
        return seq
    files = glob.glob(os.path.join(ctx["configFolder"], "*.settings"))
    if not files:
        sys.exit(0)
    newest = max(files, key=os.path.getmtime)
    return int(os.path.basename(newest).split(".")[0])


def decrypt(protected: str, thumb: str) -> dict:
    crt, prv = os.path.join(LIB_DIR, f"{thumb}.crt"), os.path.join(LIB_DIR, f"{thumb}.prv")
    with tempfile.NamedTemporaryFile("w", delete=False) as tmp:
        tmp.write(protected)
    try:
        for tool in ("cms", "smime"):
            pipe = (f"/usr/bin/base64 -d {tmp.name} | /usr/bin/openssl {tool} -inform DER "
                    f"-decrypt -recip {crt} -inkey {prv}")
            out = subprocess.run(pipe, shell=True, capture_output=True)
            if out.returncode == 0 and out.stdout.strip():
                log(f"protected settings decrypted with openssl {tool} ({crt})")
                return json.loads(out.stdout)
            log(f"openssl {tool} failed: {out.stderr.decode(errors='replace').strip()}")
    finally:
        os.unlink(tmp.name)
    return {}


def settings(ctx: dict, seq: int) -> tuple[dict, dict]:
    path = os.path.join(ctx["configFolder"], f"{seq}.settings")
    with open(path) as f:
        doc = json.load(f)
    handler = doc["runtimeSettings"][0]["handlerSettings"]
    public = handler.get("publicSettings") or {}
    protected, thumb = handler.get("protectedSettings"), handler.get(
        "protectedSettingsCertThumbprint")
    private = decrypt(protected, thumb) if protected and thumb else {}
    handler.pop("protectedSettings", None)  # update_settings_file
    with open(path, "w") as f:
        json.dump(doc, f)
    return public, private


def object_str(value: str) -> dict:
    text = base64.b64decode(value).decode("ascii").strip().replace("'", "")
    return json.loads(text)


# --- blobs (section 3.1) ----------------------------------------------------------------------


def request(method: str, url: str, query: str = "", headers: dict | None = None,
            body: bytes = b"") -> tuple[int, dict, bytes]:
    parts = urllib.parse.urlsplit(url)
    conn_type = (http.client.HTTPSConnection if parts.scheme == "https"
                 else http.client.HTTPConnection)
    conn = conn_type(parts.netloc, timeout=10)
    target = parts.path + "?" + parts.query + query
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def tried(method: str, url: str, query: str = "", headers: dict | None = None,
          body: bytes = b"") -> bool:
    for _ in range(3):  # three tries, no sleep, as Azure's writer
        try:
            status, _, text = request(method, url, query, headers, body)
        except OSError as exc:
            log(f"{method} {query or 'blob'} failed: {exc}")
            continue
        if status in (200, 201):
            return True
        log(f"{method} {query or 'blob'}: HTTP {status} {text[:200]!r}")
    return False


def write_blob(url: str, text: str) -> bool:
    status, headers, _ = request("GET", url)
    kind = headers.get("x-ms-blob-type", "PageBlob") if status == 200 else "PageBlob"
    size = int(headers.get("content-length") or 0) if status == 200 else 0
    data = text.encode()
    if kind == "BlockBlob":
        if size:
            log("block blob not empty: not written")
            return False
        return tried("PUT", url, headers={"x-ms-blob-type": "BlockBlob"}, body=data)
    if size and not tried("PUT", url, "&comp=page", {"x-ms-page-write": "clear",
                                                       "x-ms-range": f"bytes=0-{size - 1}",
                                                       "Content-Length": "0"}):
        return False
    data = data[-max(10 * 2**20, size):]
    data += b" " * (-len(data) % 512)
    if len(data) > size and not tried("PUT", url, "&comp=properties",
                                      {"x-ms-blob-content-length": str(len(data))}):
        return False
    for start in range(0, len(data), 4 * 2**20):
        chunk = data[start:start + 4 * 2**20]
        if not tried("PUT", url, "&comp=page", {"x-ms-page-write": "update",
                                                 "x-ms-range": f"bytes={start}-"
                                                               f"{start + len(chunk) - 1}"},
                     chunk):
            return False
    return True


# --- status (sections 1.7 and 3.1) -----------------------------------------------------------


def status_object(ctx: dict, public: dict, status: str, code: int, message: str,
                  consistency: int, snapshots: list | None, telemetry: dict) -> dict:
    text = json.dumps({"messageStr": message, "snapshotConsistency": consistency,
                       "jobMessage": "", "isSizeComputationFailed": False})
    return {"name": ctx["name"], "operation": "Enable", "status": status, "substatus": [],
            "code": str(code), "taskId": public.get("taskId"),
            "formattedMessage": {"lang": "en-US", "message": text},
            "storageDetails": {"partitionCount": 0, "totalUsedSizeInBytes": 0,
                               "isStoragespacePresent": False, "isSizeComputationFailed": True},
            "commandStartTimeUTCTicks": public.get("commandStartTimeUTCTicks"),
            "telemetryData": [{"Value": v, "Key": k} for k, v in telemetry.items()],
            "uniqueMachineId": "", "snapshotInfo": snapshots,
            "vmHealthInfo": {"vmHealthState": 0 if code in (0, 1, 4) else 256,
                             "vmHealthStatusCode": code}}


def report(ctx: dict, seq: int, public: dict, private: dict, status: str, code: int,
           message: str, consistency: int = 0, snapshots: list | None = None,
           file_only: bool = False) -> None:
    telemetry = {"extensionVersion": ctx["version"], "snapshotCreator": "guestExtension",
                 "extErrorCode": str(code)}
    inner = status_object(ctx, public, status, code, message, consistency, snapshots, telemetry)
    ms = int(time.time() * 1000)
    blob_doc = json.dumps([{"version": ctx["version"], "timestampUTC": f"\\/Date({ms})\\/",
                            "status": inner}])
    status_uri = public.get("statusBlobUri") or private.get("statusBlobUri")
    if status_uri and not file_only and not write_blob(status_uri, blob_doc):
        log("status blob upload failed")
    path = os.path.join(ctx["statusFolder"], f"{seq}.status")
    if file_only or os.path.exists(path):
        top = "success" if status in ("success", "error") and str(public.get(
            "vmType", "")).lower() == "microsoft.compute/virtualmachines" else status
        file_inner = {**inner, "status": top, "telemetryData": None, "snapshotInfo": None,
                      "vmHealthInfo": None,
                      "substatus": [{"code": "0", "name": blob_doc, "status": "success",
                                     "formattedMessage": None}]}
        tmp = os.path.join(ctx["statusFolder"], "tempStatusFile.status")
        with open(tmp, "w") as f:
            json.dump([{"version": ctx["version"], "timestampUTC":
                        dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "status": file_inner}], f)
        os.replace(tmp, path)


def upload_log(ctx: dict, public: dict, private: dict) -> None:
    uri = public.get("logsBlobUri") or private.get("logsBlobUri")
    text = "Guest Agent Version is :reference\nDistro Info:reference\n" + "\n".join(LOG) + \
        "\nTail of shell script log:\n"
    try:
        with open(os.path.join(ctx["logFolder"], "shell.log")) as f:
            text += "".join(f.readlines()[-10:])
    except OSError:
        pass
    if uri:
        write_blob(uri, text)
    with open(os.path.join(ctx["logFolder"], "extension.log"), "a") as f:
        f.write("\n".join(LOG) + "\n")


# --- enable and daemon (section 1.6) --------------------------------------------------------


def read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None



def enable(ctx: dict, seq: int) -> None:
    mrseq = "mrseq"
    if read_text(mrseq) == str(seq):
        sys.exit(0)
    with open(mrseq, "w") as f:
        f.write(str(seq))
    with open(os.path.join(ctx["configFolder"], f"{seq}.settings")) as f:
        public = json.load(f)["runtimeSettings"][0]["handlerSettings"].get("publicSettings") or {}
    time.sleep(random.randint(500, 5000) / 1000)
    task = public.get("taskId")
    if read_text(TASK_IDENTITY) == task:
        sys.exit(0)  # 3: SuccessAlreadyProcessedInput, no status
    with open(TASK_IDENTITY, "w") as f:
        f.write(str(task))
    report(ctx, seq, public, {}, "success", 4, "Transitioning state in extension",
           file_only=True)
    subprocess.Popen(["main/handle.sh", "daemon"], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                     start_new_session=True)


def daemon(ctx: dict, seq: int) -> None:
    public, private = settings(ctx, seq)
    if not public and not private:
        report(ctx, seq, public, private, "error", 16, "unable to load certificate")
        return
    ticks = public.get("commandStartTimeUTCTicks")
    now = TICKS_AT_EPOCH + int(time.time() * 10**7)
    if ticks and now - int(ticks) > STALE_TICKS:
        report(ctx, seq, public, private, "error", 402, "command invoked too late")
        return
    if "snapshot" not in str(public.get("commandToExecute", "")).lower():
        report(ctx, seq, public, private, "error", 11, "command is not correct")
        return
    metadata = object_str(public["objectStr"])["backupMetadata"]
    uris = object_str(private["objectStr"])["blobSASUri"]
    report(ctx, seq, public, private, "transitioning", 4, "Transitioning state in extension")
    upload_log(ctx, public, private)
    snapshots = [snapshot(uri, metadata) for uri in uris]
    failed = [s for s in snapshots if not s["isSuccessful"]]
    if failed:
        report(ctx, seq, public, private, "error", 76, "snapshot failed", 0, snapshots)
    else:
        report(ctx, seq, public, private, "success", 1, "Enable Succeeded", 3, snapshots)
    upload_log(ctx, public, private)


def snapshot(uri: str, metadata: list) -> dict:
    base = uri.split("?", 1)[0]
    headers = {"Content-Length": "0"}
    headers.update({f"x-ms-meta-{m['Key']}": str(m["Value"]) for m in metadata})
    try:
        status, resp_headers, body = request("PUT", uri, "&comp=snapshot", headers)
    except OSError as exc:
        status, resp_headers, body = 0, {}, str(exc).encode()
    ok = status in (200, 201)
    log(f"snapshot of {base}: HTTP {status}")
    return {"isSuccessful": ok,
            "snapshotUri": f"{base}?snapshot={resp_headers['x-ms-snapshot']}" if ok else None,
            "errorMessage": "" if ok else body.decode(errors="replace"), "blobUri": base,
            "directDriveSnapshotIdentifier": None}


def main() -> None:
    seq = next((int(a.split(":", 1)[1]) for a in sys.argv[1:] if a.startswith("-seqNo:")), -1)
    ctx = context()
    seq = sequence(ctx, seq)
    if "-enable" in sys.argv:
        enable(ctx, seq)
    elif "-daemon" in sys.argv:
        try:
            daemon(ctx, seq)
        except Exception as exc:  # the generic path: error 2
            log(f"daemon failed: {type(exc).__name__}: {exc}")
            report(ctx, seq, {}, {}, "error", 2, str(exc))
            upload_log(ctx, {}, {})
    sys.exit(0)


if __name__ == "__main__":
    main()
