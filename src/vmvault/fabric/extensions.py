"""VM extensions (Microsoft.Compute/virtualMachines/extensions) and the VM's goal state.

Setting an extension gives it a new sequence number and bumps the VM's incarnation; the VM
agent picks the change up (a long poll), runs the handler and reports its status, which
becomes the extension's provisioning state. A failed extension puts the VM in the Failed
provisioning state, as Azure does (row B3), until it is removed or succeeds again.
"""

from __future__ import annotations

import functools
import hashlib
import zipfile
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from vmvault import arm
from vmvault.catalog import VirtualMachine, VmExtension
from vmvault.context import Context
from vmvault.errors import (
    AGENT_NOT_INSTALLED,
    AGENT_UNREACHABLE,
    RESOURCE_NOT_FOUND,
    VmvaultError,
    invalid,
    not_found,
)
from vmvault.fabric import agents, vms
from vmvault.guest import certificates

EXTENSION_TYPE = "Microsoft.Compute/virtualMachines/extensions"


def _packages() -> dict[tuple[str, str], str]:
    """The handler packages this server can deliver: (publisher.type lower, major version)."""
    from vmvault.extensions import vmsnapshot

    return {(f"{vmsnapshot.PUBLISHER}.{vmsnapshot.TYPE}".lower(),
             vmsnapshot.VERSION.split(".")[0]): vmsnapshot.VERSION}


def resolve_version(publisher: str, type_: str, version: str | None) -> str:
    """The handler version to install for what the user asked (1.9, 1, or nothing)."""
    known = _packages()
    name = f"{publisher}.{type_}".lower()
    majors = {major: full for (n, major), full in known.items() if n == name}
    if not majors:
        available = ", ".join(sorted(n for n, _ in known))
        raise invalid("--publisher/--name",
                      f"no extension handler {publisher}.{type_} is available "
                      f"(this server delivers: {available})")
    if not version:
        return max(majors.values())
    full = majors.get(version.split(".")[0])
    if full is None or (version.count(".") and not full.startswith(version)):
        raise invalid("--version", f"{publisher}.{type_} has no version {version} "
                      f"(available: {', '.join(sorted(majors.values()))})")
    return full


def package_path(ctx: Context, name: str, version: str) -> Path:
    """The zip of a handler package (built once per server process into
    $VMVAULT_HOME/packages, so it always matches the code that serves it)."""
    for (pkg, _major), full in _packages().items():
        if pkg == name.lower() and full == version:
            if ctx.guest.vmsnapshot_package:
                return _given_package(ctx.guest.vmsnapshot_package,
                                      str(ctx.paths.root / "packages"))
            return _built_package(str(ctx.paths.root / "packages"))
    raise not_found("extension handler package", f"{name}/{version}")


@functools.cache
def _given_package(source: str, folder: str) -> Path:
    """VMVAULT_VMSNAPSHOT_PACKAGE: a zip as it is, or a folder zipped once (its files at the
    zip's top, HandlerManifest.json among them)."""
    path = Path(source)
    if path.is_file() and zipfile.is_zipfile(path):
        return path
    if not (path / "HandlerManifest.json").is_file():
        raise invalid("VMVAULT_VMSNAPSHOT_PACKAGE",
                      f"'{source}' is neither a zip nor a folder holding HandlerManifest.json")
    from vmvault.extensions.vmsnapshot.package import zip_folder

    Path(folder).mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    return zip_folder(path, Path(folder) / f"given-{digest}.zip")


@functools.cache
def _built_package(folder: str) -> Path:
    from vmvault.extensions.vmsnapshot.package import build_package

    Path(folder).mkdir(parents=True, exist_ok=True)
    return build_package(Path(folder))


def to_arm(vm: VirtualMachine, ext: VmExtension) -> dict[str, Any]:
    view = ext.instance_view or {}
    statuses = []
    if view:
        statuses.append({"code": f"ProvisioningState/{view.get('status', 'unknown')}",
                         "level": "Error" if view.get("status") == "error" else "Info",
                         "displayStatus": _display(view.get("status")),
                         "message": view.get("message", "")})
    return {
        "id": arm.resource_id(vm.group.name, "Microsoft.Compute", "virtualMachines",
                              vm.name) + f"/extensions/{ext.name}",
        "name": ext.name,
        "type": EXTENSION_TYPE,
        "location": vm.location,
        "resourceGroup": vm.group.name,
        "publisher": ext.publisher,
        "typePropertiesType": ext.type,
        "typeHandlerVersion": ext.version,
        "autoUpgradeMinorVersion": ext.auto_upgrade_minor_version,
        "settings": ext.settings,
        "protectedSettings": None,  # never returned, as Azure
        "provisioningState": ext.provisioning_state,
        "instanceView": {"name": ext.name, "type": f"{ext.publisher}.{ext.type}",
                         "typeHandlerVersion": ext.version,
                         "sequenceNumber": ext.sequence_number,
                         "substatuses": view.get("substatus") or [], "statuses": statuses},
    }


def _display(status: Any) -> str:
    return {"success": "Provisioning succeeded", "error": "Provisioning failed",
            "transitioning": "Transitioning"}.get(str(status), "Unknown")


def _get(vm: VirtualMachine, name: str) -> VmExtension:
    for ext in vm.extensions:
        if ext.name.lower() == name.lower():
            return ext
    raise VmvaultError(RESOURCE_NOT_FOUND, kind="extension", name=name)


def encrypt_for(vm: VirtualMachine, protected: dict[str, Any]) -> str:
    """Protected settings encrypted to the VM's certificate (the agent must have registered)."""
    if vm.agent is None:
        raise VmvaultError(AGENT_NOT_INSTALLED, name=vm.name)
    if not vm.agent.certificate:
        raise VmvaultError(AGENT_UNREACHABLE, name=vm.name,
                           reason="the agent has not registered, so there is no certificate "
                                  "to encrypt protected settings to")
    return certificates.encrypt_settings(protected, vm.agent.certificate)


def put(ctx: Context, s: Session, vm: VirtualMachine, name: str, publisher: str, type_: str,
        version: str | None, settings: dict[str, Any] | None,
        protected: dict[str, Any] | None, auto_upgrade: bool = True) -> VmExtension:
    """Create or update an extension: a new sequence number in the VM's goal state."""
    if not isinstance(settings or {}, dict):
        raise invalid("--settings", "must be a JSON object")
    if protected is not None and not isinstance(protected, dict):
        raise invalid("--protected-settings", "must be a JSON object")
    arm.check_name("extension", name)
    full = resolve_version(publisher, type_, version)
    if vm.agent is None:
        raise VmvaultError(AGENT_NOT_INSTALLED, name=vm.name)
    cipher = encrypt_for(vm, protected) if protected else None
    try:
        ext = _get(vm, name)
        ext.provisioning_state = "Updating"
    except VmvaultError:
        ext = VmExtension(name=name, provisioning_state="Creating", sequence_number=-1)
        vm.extensions.append(ext)
    ext.publisher, ext.type, ext.version = publisher, type_, full
    ext.auto_upgrade_minor_version = auto_upgrade
    ext.settings = settings or {}
    ext.protected_settings = cipher
    ext.state = "enabled"
    ext.sequence_number += 1
    ext.instance_view = {}
    vm.incarnation += 1
    s.flush()
    return ext


def set_extension(ctx: Context, group: str, vm_name: str, name: str, publisher: str,
                  version: str | None, settings: dict[str, Any] | None,
                  protected: dict[str, Any] | None, auto_upgrade: bool = True,
                  type_: str | None = None) -> dict[str, Any]:
    """az vm extension set: the extension's type is its name unless given."""
    with ctx.catalog.session() as s:
        vm = vms.get(s, group, vm_name)
        ext = put(ctx, s, vm, name, publisher, type_ or name, version, settings, protected,
                  auto_upgrade)
        result = to_arm(vm, ext)
    agents.notify_goal_state()
    return result


def show(ctx: Context, group: str, vm_name: str, name: str) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        vm = vms.get(s, group, vm_name)
        return to_arm(vm, _get(vm, name))


def list_all(ctx: Context, group: str, vm_name: str) -> list[dict[str, Any]]:
    with ctx.catalog.session() as s:
        vm = vms.get(s, group, vm_name)
        return [to_arm(vm, ext) for ext in vm.extensions]


def delete(ctx: Context, group: str, vm_name: str, name: str) -> None:
    """Remove an extension: the agent uninstalls its handler; a VM whose agent is not running
    loses it at once."""
    with ctx.catalog.session() as s:
        vm = vms.get(s, group, vm_name)
        ext = _get(vm, name)
        if agents.running_pid(ctx, vm) is None:
            vm.extensions.remove(ext)
        else:
            ext.state = "uninstall"
            ext.provisioning_state = "Deleting"
        vm.incarnation += 1
        _settle_vm(vm)
    agents.notify_goal_state()


def _settle_vm(vm: VirtualMachine) -> None:
    """The VM's provisioning state follows its extensions: Failed while one has failed."""
    if vm.provisioning_state not in ("Succeeded", "Failed"):
        return
    failed = any(e.provisioning_state == "Failed" and e.state != "uninstall"
                 for e in vm.extensions)
    vm.provisioning_state = "Failed" if failed else "Succeeded"


def apply_handler_reports(s: Session, vm: VirtualMachine, handlers: list[Any]) -> None:
    """What the agent said of each handler becomes the extension's state."""
    reported: set[str] = set()
    for h in handlers:
        if not isinstance(h, dict):
            continue
        name = str(h.get("name", ""))
        reported.add(name.lower())
        ext = agents.handler_extension(s, vm, name)
        if ext is None or h.get("sequenceNumber") != ext.sequence_number:
            continue
        status = str(h.get("status", ""))
        ext.instance_view = {k: h.get(k) for k in ("status", "code", "message",
                                                   "sequenceNumber", "statusFile")}
        if ext.state == "uninstall":
            continue
        if status == "success":
            ext.provisioning_state = "Succeeded"
        elif status == "error":
            ext.provisioning_state = "Failed"
    for ext in list(vm.extensions):
        if ext.state == "uninstall" and f"{ext.publisher}.{ext.type}".lower() not in reported:
            vm.extensions.remove(ext)
    _settle_vm(vm)


def handler_report(vm: VirtualMachine, ext: VmExtension) -> dict[str, Any] | None:
    """The agent's last report on this extension's current sequence number, if any."""
    view = ext.instance_view or {}
    if view.get("sequenceNumber") == ext.sequence_number:
        return view
    return None
