"""The VM agent's endpoints (docs/agent-protocol.md, section 3): registration, the goal state
(long poll), handler packages and status reports. Every call but registration is signed by
the VM's key."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from vmvault.context import Context
from vmvault.errors import invalid
from vmvault.fabric import agents, extensions

Json = dict[str, Any]


async def _signed(ctx: Context, request: Request) -> tuple[str, bytes]:
    body = await request.body()
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    headers = {k.lower(): v for k, v in request.headers.items()}
    vm_id = await run_in_threadpool(agents.authenticate, ctx, headers, request.method, path, body)
    return vm_id, body


def _json(body: bytes) -> Json:
    try:
        value = json.loads(body or b"{}")
    except ValueError as exc:
        raise invalid("body", "not JSON") from exc
    if not isinstance(value, dict):
        raise invalid("body", "must be a JSON object")
    return value


def router(ctx: Context) -> APIRouter:
    r = APIRouter(prefix="/vmvault/agent", tags=["vm agent"])

    @r.post("/register")
    async def register(request: Request) -> Json:
        body = _json(await request.body())
        return await run_in_threadpool(agents.register, ctx, body)

    @r.get("/goalstate")
    async def goal_state(request: Request, incarnation: int | None = None,
                         wait: float = 0) -> Json:
        vm_id, _ = await _signed(ctx, request)
        return await run_in_threadpool(agents.goal_state, ctx, vm_id, incarnation, wait)

    @r.get("/packages/{name}/{version}")
    async def package(request: Request, name: str, version: str) -> FileResponse:
        await _signed(ctx, request)
        path = await run_in_threadpool(extensions.package_path, ctx, name, version)
        return FileResponse(path, media_type="application/zip", filename=path.name)

    @r.post("/status")
    async def status(request: Request) -> Json:
        vm_id, body = await _signed(ctx, request)
        await run_in_threadpool(agents.report_status, ctx, vm_id, _json(body))
        return {"ok": True}

    return r
