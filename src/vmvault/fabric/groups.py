"""Resource groups (Microsoft.Resources/resourceGroups)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmvault import arm
from vmvault.catalog import ResourceGroup, StorageAccount, Vault, VirtualMachine
from vmvault.context import Context
from vmvault.errors import RESOURCE_EXISTS, RESOURCE_IN_USE, VmvaultError, not_found


def get(s: Session, name: str) -> ResourceGroup:
    group = s.scalar(select(ResourceGroup).where(ResourceGroup.name == name))
    if group is None:
        raise not_found("resource group", name)
    return group


def to_arm(group: ResourceGroup) -> dict[str, Any]:
    return {
        "id": arm.group_id(group.name),
        "location": group.location,
        "managedBy": None,
        "name": group.name,
        "properties": {"provisioningState": "Succeeded"},
        "tags": group.tags or None,
        "type": "Microsoft.Resources/resourceGroups",
    }


def create(ctx: Context, name: str, location: str) -> dict[str, Any]:
    """Create a resource group; like az, creating an existing one with the same location is
    a no-op that returns it."""
    arm.check_name("resource group", name)
    location = arm.normalize_location(location)
    with ctx.catalog.session() as s:
        group = s.scalar(select(ResourceGroup).where(ResourceGroup.name == name))
        if group is not None:
            if group.location != location:
                raise VmvaultError(RESOURCE_EXISTS, kind="resource group", name=name)
            return to_arm(group)
        group = ResourceGroup(name=name, location=location)
        s.add(group)
        s.flush()
        return to_arm(group)


def show(ctx: Context, name: str) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        return to_arm(get(s, name))


def list_all(ctx: Context) -> list[dict[str, Any]]:
    with ctx.catalog.session() as s:
        return [to_arm(g) for g in s.scalars(select(ResourceGroup).order_by(ResourceGroup.name))]


def delete(ctx: Context, name: str) -> None:
    with ctx.catalog.session() as s:
        group = get(s, name)
        for model, kind in ((VirtualMachine, "VM"), (StorageAccount, "storage account"),
                            (Vault, "vault")):
            held = s.scalars(select(model.name).where(model.group_id == group.id)).all()
            if held:
                raise VmvaultError(RESOURCE_IN_USE, kind="resource group", name=name,
                                   reason=f"it holds {kind} {', '.join(held)}")
        s.delete(group)
