"""The vmvault server process: the REST API and the job workers.

Started in the background by 'vmvault up'; run in the foreground with
``python -m vmvault.server --port N --blob-url URL``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from vmvault.api.app import create_app
from vmvault.config import paths
from vmvault.context import Context
from vmvault.control import backup, jobs, scheduler
from vmvault.fabric import vms

log = logging.getLogger("vmvault.server")


def build(blob_url: str, api_url: str = "") -> tuple[FastAPI, jobs.JobRunner, Context]:
    ctx = Context.open(paths(), blob_url, api_url=api_url)
    failed = jobs.fail_orphans(ctx, lambda s, job: backup.cleanup_orphan(ctx, s, job),
                               keep=lambda job: job.slot is not None and not scheduler.started(job))
    for job_id in failed:
        log.warning("job %s was left in progress by a stopped server: marked Failed", job_id)
    vms.reattach_running(ctx)
    runner = jobs.JobRunner(ctx)
    sched = scheduler.Scheduler(ctx, runner)
    app = create_app(ctx, runner, sched)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        sched.start()
        yield
        sched.stop()
        runner.shutdown()
        vms.detach_all(ctx)

    app.router.lifespan_context = lifespan
    return app, runner, ctx


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vmvault-server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--blob-url", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app, _runner, _ctx = build(args.blob_url, f"http://{args.host}:{args.port}")
    # Agents hold long polls open (up to 30 s): do not wait for them to stop.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=2)


if __name__ == "__main__":
    main()
