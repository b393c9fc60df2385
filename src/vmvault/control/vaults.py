"""Recovery Services vaults (Microsoft.RecoveryServices/vaults) and their repositories.

Each vault owns one backup repository (see docs/vault-format.md) in
``$VMVAULT_HOME/vaults/<vaultId>``. Its master key is opened by a key file the
server keeps (``keys/<vaultId>.key``) and, when the vault was created with a
password, by that password too (so the vault can be read without the server).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmvault import arm
from vmvault.catalog import Job, Policy, ProtectedItem, RecoveryPoint, Vault
from vmvault.context import Context
from vmvault.control import policies
from vmvault.errors import (
    KEY_NOT_AVAILABLE,
    RESOURCE_EXISTS,
    VAULT_NOT_EMPTY,
    VmvaultError,
    invalid,
    not_found,
)
from vmvault.fabric import groups
from vmvault.vault import DEFAULT_CHUNK_SIZE, Repository

CHUNK_SIZES = [2**n for n in range(16, 23)]  # 64 KiB .. 4 MiB


def get(s: Session, group: str, name: str) -> Vault:
    vault = s.scalar(select(Vault).join(Vault.group)
                     .where(Vault.name == name, groups.ResourceGroup.name == group))
    if vault is None:
        groups.get(s, group)
        raise not_found("vault", name)
    return vault


def to_arm(vault: Vault) -> dict[str, Any]:
    return {
        "id": arm.resource_id(vault.group.name, "Microsoft.RecoveryServices", "vaults", vault.name),
        "name": vault.name,
        "location": vault.location,
        "resourceGroup": vault.group.name,
        "type": "Microsoft.RecoveryServices/vaults",
        "sku": {"name": "Standard"},
        "properties": {
            "provisioningState": "Succeeded",
            "vaultId": vault.vault_id,
            "storageRedundancy": vault.storage_redundancy,
            "chunkSizeBytes": vault.chunk_size,
            "repositoryPath": vault.repo_path,
            "encryption": {"keyFile": bool(vault.key_file)},
        },
    }


def create(ctx: Context, group: str, name: str, location: str | None,
           password: str | None = None, chunk_size: int | None = None) -> dict[str, Any]:
    arm.check_name("vault", name)
    chunk = chunk_size or DEFAULT_CHUNK_SIZE
    if chunk not in CHUNK_SIZES:
        raise invalid("--chunk-size", f"{chunk} is not a power of two from 65536 (64 KiB) to "
                      "4194304 (4 MiB)")
    with ctx.catalog.session() as s:
        rg = groups.get(s, group)
        if s.scalar(select(Vault.id).where(Vault.group_id == rg.id, Vault.name == name)):
            raise VmvaultError(RESOURCE_EXISTS, kind="vault", name=name)
        vault = Vault(name=name, group=rg, location=arm.normalize_location(location or rg.location),
                      repo_path="", chunk_size=chunk)
        s.add(vault)
        s.flush()
        repo_path = ctx.paths.vaults / vault.vault_id
        key_file = ctx.paths.keys / f"{vault.vault_id}.key"
        Repository.create(repo_path, chunk_size=chunk, key_file=key_file, password=password)
        vault.repo_path = str(repo_path)
        vault.key_file = str(key_file)
        s.add(Policy(vault=vault, name=policies.DEFAULT_POLICY,
                     properties=policies.default_policy_properties()))
        return to_arm(vault)


def show(ctx: Context, group: str, name: str) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        return to_arm(get(s, group, name))


def list_all(ctx: Context, group: str | None = None) -> list[dict[str, Any]]:
    with ctx.catalog.session() as s:
        query = select(Vault).order_by(Vault.name)
        if group is not None:
            query = query.where(Vault.group_id == groups.get(s, group).id)
        return [to_arm(v) for v in s.scalars(query)]


def delete(ctx: Context, group: str, name: str) -> None:
    with ctx.catalog.session() as s:
        vault = get(s, group, name)
        items = s.scalars(select(ProtectedItem.id).where(ProtectedItem.vault_id == vault.id)).all()
        if items:
            raise VmvaultError(VAULT_NOT_EMPTY, name=name)
        for model in (Job, Policy):
            for row in s.scalars(select(model).where(model.vault_id == vault.id)):
                s.delete(row)
        s.delete(vault)
        repo_path, key_file = vault.repo_path, vault.key_file
    shutil.rmtree(repo_path, ignore_errors=True)
    if key_file:
        Path(key_file).unlink(missing_ok=True)


def open_repository(vault: Vault, password: str | None = None) -> Repository:
    """Open the vault's repository with the given password, else with the server's key file."""
    if password is not None:
        return Repository.open(Path(vault.repo_path), password=password)
    key_file = Path(vault.key_file) if vault.key_file else None
    if key_file is None or not key_file.is_file():  # row B13: the service lost its key
        raise VmvaultError(KEY_NOT_AVAILABLE, name=vault.name, path=key_file or "(none)",
                           reason="its key file is missing" if key_file else
                           "the vault has no key file for the service")
    return Repository.open(Path(vault.repo_path), key_file=key_file)


def check(ctx: Context, group: str, name: str, read_data: bool = False,
          password: str | None = None) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        vault = get(s, group, name)
        known = set(s.scalars(select(RecoveryPoint.name).join(RecoveryPoint.item)
                              .where(ProtectedItem.vault_id == vault.id)).all())
    repo = open_repository(vault, password)
    report = repo.check(read_data=read_data)
    manifests = set(repo.manifests())
    infos = list(report.infos)
    errors = list(report.errors)
    missing = sorted(known - manifests)
    if missing:
        errors.append(f"recovery points in the catalog without a manifest: {', '.join(missing)}")
    extra = sorted(manifests - known)
    if extra:
        infos.append(f"manifests the catalog does not list: {', '.join(extra)}")
    return {
        "vault": name,
        "readData": read_data,
        "ok": not errors,
        "errors": errors,
        "infos": infos,
        "counts": dict(report.counts),
    }
