"""vmvault up | down | status: the local stack (server, job workers, Blob endpoint)."""

from __future__ import annotations

from typing import Any

from knack.commands import CommandGroup
from knack.help_files import helps

helps["up"] = """
type: command
short-summary: Start the local stack in the background (idempotent).
long-summary: |
    Prepares the disk pool (as root on a file system without reflink, an XFS file system in a
    loop-mounted image under $VMVAULT_HOME), then starts the Blob endpoint and the server (REST
    API and job workers) on 127.0.0.1. Ports: $VMVAULT_API_PORT (47080) and
    $VMVAULT_BLOB_PORT (47081); a busy port is replaced by a free one.
examples:
  - name: Start vmvault with its state in /srv/vmvault.
    text: VMVAULT_HOME=/srv/vmvault vmvault up
"""
helps["down"] = """
type: command
short-summary: Stop the local stack, unmount the lab VMs' disks and the pool.
"""
helps["status"] = """
type: command
short-summary: Say what runs where (server, Blob endpoint, pool, catalog).
"""


def up_cmd() -> dict[str, Any]:
    import sys

    from vmvault import stack

    result = stack.up()
    warning = (result.get("pool") or {}).get("warning")
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr)
    return result


def down_cmd() -> dict[str, Any]:
    from vmvault import stack

    return stack.down()


def status_cmd() -> dict[str, Any]:
    from vmvault import stack

    return stack.status()


def load_commands(loader: Any) -> None:
    with CommandGroup(loader, "", "vmvault.cli.commands.stack#{}") as g:
        g.command("up", "up_cmd")
        g.command("down", "down_cmd")
        g.command("status", "status_cmd")
