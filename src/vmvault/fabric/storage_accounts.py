"""Storage accounts (Microsoft.Storage/storageAccounts), held by the disk store."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmvault import arm
from vmvault.catalog import StorageAccount, VirtualMachine
from vmvault.context import Context
from vmvault.errors import RESOURCE_EXISTS, RESOURCE_IN_USE, VmvaultError, invalid, not_found
from vmvault.fabric import groups

SKUS = ("Standard_LRS", "Standard_GRS", "Standard_ZRS", "Premium_LRS")
DEFAULT_CAPACITY_GB = 1024


def get(s: Session, name: str, group: str | None = None) -> StorageAccount:
    account = s.scalar(select(StorageAccount).where(StorageAccount.name == name))
    if account is None or (group is not None and account.group.name != group):
        raise not_found("storage account", name)
    return account


def to_arm(ctx: Context, account: StorageAccount) -> dict[str, Any]:
    info = ctx.store.get_account(account.name)
    online = info.status == "online"
    endpoint = f"{ctx.blob_url}/{account.name}/"
    return {
        "id": arm.resource_id(account.group.name, "Microsoft.Storage", "storageAccounts",
                              account.name),
        "name": account.name,
        "location": account.location,
        "resourceGroup": account.group.name,
        "type": "Microsoft.Storage/storageAccounts",
        "kind": account.kind,
        "sku": {"name": account.sku, "tier": account.sku.split("_")[0]},
        "creationTime": arm.iso(account.created),
        "provisioningState": "Succeeded",
        "primaryEndpoints": {"blob": endpoint},
        "primaryLocation": account.location,
        "statusOfPrimary": "available" if online else "unavailable",
        "capacityBytes": account.capacity_bytes,
        "usedBytes": ctx.store.used_bytes(account.name),
    }


def create(ctx: Context, group: str, name: str, location: str | None, sku: str,
           capacity_gb: int = DEFAULT_CAPACITY_GB) -> dict[str, Any]:
    arm.check_name("storage account", name)
    if sku not in SKUS:
        raise invalid("--sku", f"'{sku}' is not one of {', '.join(SKUS)}")
    if capacity_gb <= 0:
        raise invalid("--capacity-gb", "must be a positive number of GiB")
    with ctx.catalog.session() as s:
        rg = groups.get(s, group)
        if s.scalar(select(StorageAccount).where(StorageAccount.name == name)) is not None:
            raise VmvaultError(RESOURCE_EXISTS, kind="storage account", name=name)
        account = StorageAccount(name=name, group=rg, sku=sku,
                                 location=arm.normalize_location(location or rg.location),
                                 capacity_bytes=capacity_gb * 1024**3)
        s.add(account)
        s.flush()
        ctx.store.create_account(name, location=account.location, sku=sku,
                                 capacity_bytes=account.capacity_bytes)
        return to_arm(ctx, account)


def show(ctx: Context, group: str | None, name: str) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        return to_arm(ctx, get(s, name, group))


def list_all(ctx: Context, group: str | None = None) -> list[dict[str, Any]]:
    with ctx.catalog.session() as s:
        query = select(StorageAccount).order_by(StorageAccount.name)
        if group is not None:
            query = query.where(StorageAccount.group_id == groups.get(s, group).id)
        return [to_arm(ctx, a) for a in s.scalars(query)]


def update(ctx: Context, group: str | None, name: str, capacity_gb: int | None = None,
           status: str | None = None) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        account = get(s, name, group)
        if capacity_gb is not None:
            if capacity_gb <= 0:
                raise invalid("--capacity-gb", "must be a positive number of GiB")
            account.capacity_bytes = capacity_gb * 1024**3
        if status is not None:
            if status not in ("available", "unavailable"):
                raise invalid("--status", f"'{status}' is not 'available' or 'unavailable'")
            ctx.store.set_account_status(name, status == "available")
        return to_arm(ctx, account)


def list_keys(ctx: Context, group: str | None, name: str) -> list[dict[str, str]]:
    with ctx.catalog.session() as s:
        get(s, name, group)
    info = ctx.store.get_account(name)
    return [{"keyName": "key1", "permissions": "FULL", "value": info.key1},
            {"keyName": "key2", "permissions": "FULL", "value": info.key2}]


def delete(ctx: Context, group: str | None, name: str) -> None:
    with ctx.catalog.session() as s:
        account = get(s, name, group)
        users = s.scalars(select(VirtualMachine.name)
                          .where(VirtualMachine.storage_account_id == account.id)).all()
        if users:
            raise VmvaultError(RESOURCE_IN_USE, kind="storage account", name=name,
                               reason=f"VM {', '.join(users)} keeps its disks there")
        s.delete(account)
        ctx.store.delete_account(name)
