"""The handler package the server hands to VM agents: a zip with HandlerManifest.json and
bin/vmsnapshot.sh, which runs this handler with the agent's ``VMVAULT_PYTHON``."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from vmvault.extensions.vmsnapshot import HANDLER_NAME, VERSION

SCRIPT = "bin/vmsnapshot.sh"
ENABLE_TIMEOUT = 300
SCRIPT_TEXT = """#!/bin/sh
# vmvault's VMSnapshot handler (Microsoft.RecoveryServices.VMSnapshot 1.9).
# The VM agent runs it from the handler folder:
#   vmsnapshot.sh install|enable|disable|update|uninstall
exec "${VMVAULT_PYTHON:-python3}" -m vmvault.extensions.vmsnapshot "$@"
"""


def package_name() -> str:
    return f"{HANDLER_NAME}-{VERSION}.zip"


def handler_manifest() -> list[dict[str, Any]]:
    commands = {f"{cmd}Command": f"{SCRIPT} {cmd}"
                for cmd in ("install", "uninstall", "update", "enable", "disable")}
    return [{"name": HANDLER_NAME, "version": VERSION,
             "handlerManifest": {**commands, "rebootAfterInstall": False,
                                 "reportHeartbeat": False,
                                 "enableTimeoutInSeconds": ENABLE_TIMEOUT}}]


def _add(zf: zipfile.ZipFile, name: str, data: str, mode: int) -> None:
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = (0o100000 | mode) << 16
    info.create_system = 3  # Unix, so that the mode bits count
    zf.writestr(info, data)


def build_package(dest_dir: Path) -> Path:
    """Write Microsoft.RecoveryServices.VMSnapshot-1.9.zip into dest_dir; its path."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / package_name()
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w") as zf:
        _add(zf, "HandlerManifest.json", json.dumps(handler_manifest(), indent=2) + "\n", 0o644)
        _add(zf, SCRIPT, SCRIPT_TEXT, 0o755)
    tmp.replace(path)
    return path


def zip_folder(folder: Path, dest: Path) -> Path:
    """Zip a handler folder as it is (its files at the zip's top, mode bits kept) into dest."""
    tmp = dest.with_name(dest.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(folder.rglob("*")):
            if file.is_file() and "__pycache__" not in file.parts:
                zf.write(file, file.relative_to(folder).as_posix())
    tmp.replace(dest)
    return dest
