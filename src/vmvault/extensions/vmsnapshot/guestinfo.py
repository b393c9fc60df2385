"""Facts about the guest the status reports: machine id, versions, used size of the mounts."""

from __future__ import annotations

import json
import os
import platform
import uuid
from collections.abc import Iterable
from pathlib import Path

MACHINE_ID_FILE = "etc/azure/machine_identity_FD76C85E-406F-4CFA-8EB0-CF18B123358B"
NETWORK_FS_TYPES = ("nfs", "nfs4", "cifs", "smb3", "fuse", "fuse.sshfs", "glusterfs", "ceph")


def machine_id(guest_root: Path) -> str:
    """uniqueMachineId: Azure's machine identity file under /etc/azure, created (a new UUID)
    when missing."""
    path = guest_root / MACHINE_ID_FILE
    try:
        value = path.read_text().strip()
        if value:
            return value
    except OSError:
        pass
    value = str(uuid.uuid4())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value)
    except OSError:
        return ""
    return value


def agent_version(guest_root: Path) -> str:
    for name in ("var/lib/waagent/agent-state.json", "etc/vmvault/agent.json"):
        try:
            doc = json.loads((guest_root / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("agentVersion"):
            return str(doc["agentVersion"])
    return "Unknown"


def os_version(guest_root: Path) -> str:
    """NAME-VERSION_ID of the guest's os-release (the machine's when the guest root has
    none)."""
    for path in (guest_root / "etc/os-release", Path("/etc/os-release")):
        try:
            text = path.read_text()
        except OSError:
            continue
        values = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                values[key.strip()] = value.strip().strip('"')
        return f"{values.get('NAME', 'Linux')}-{values.get('VERSION_ID', '')}"
    return "Unknown"


def kernel_version() -> str:
    return platform.release()


def used_bytes(mount_points: Iterable[str]) -> tuple[int, bool]:
    """(total used bytes, computation failed)."""
    total, failed = 0, False
    for mount_point in mount_points:
        try:
            st = os.statvfs(mount_point)
        except OSError:
            failed = True
            continue
        total += (st.f_blocks - st.f_bfree) * st.f_frsize
    return total, failed


def network_fs_present(mountinfo: str) -> bool:
    for line in mountinfo.splitlines():
        _, sep, right = line.partition(" - ")
        fs_type = right.split()[0] if sep and right.split() else ""
        if fs_type in NETWORK_FS_TYPES or fs_type.startswith("fuse."):
            return True
    return False
