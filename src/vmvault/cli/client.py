"""The CLI's HTTP client: every command is a thin call to the server's REST API."""

from __future__ import annotations

import os
from typing import Any

import httpx

from vmvault.config import SUBSCRIPTION_ID, api_url
from vmvault.errors import SERVER_UNREACHABLE, VmvaultError

TIMEOUT = float(os.environ.get("VMVAULT_HTTP_TIMEOUT", "600"))
SUB = f"/subscriptions/{SUBSCRIPTION_ID}"


def rg_path(group: str) -> str:
    return f"{SUB}/resourceGroups/{group}"


def provider_path(group: str, provider: str, *parts: str) -> str:
    return f"{rg_path(group)}/providers/{provider}/" + "/".join(parts)


def vault_path(group: str, vault: str, *parts: str) -> str:
    return provider_path(group, "Microsoft.RecoveryServices", "vaults", vault, *parts)


def item_path(group: str, vault: str, container: str, item: str, *parts: str) -> str:
    return vault_path(group, vault, "backupFabrics", "Azure", "protectionContainers", container,
                      "protectedItems", item, *parts)


def call(method: str, path: str, body: dict[str, Any] | None = None,
         params: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> Any:
    """One request; a catalog error from the server is raised as the same VmvaultError."""
    base = api_url()
    clean = {k: v for k, v in (params or {}).items() if v is not None}
    try:
        response = httpx.request(method, base + path, json=body, params=clean, timeout=TIMEOUT,
                                 headers=headers)
    except httpx.HTTPError as exc:
        raise VmvaultError(SERVER_UNREACHABLE, url=base) from exc
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            error = {"code": "InternalError", "message": response.text[:500]}
        raise VmvaultError.from_dict(error, response.status_code)
    if not response.content:
        return None
    data = response.json()
    if isinstance(data, dict) and set(data) == {"value"}:
        return data["value"]
    return data
