"""vmvault backup job: jobs (az backup job), with a progress display for `wait`."""

from __future__ import annotations

import sys
import time
from typing import Any

from knack.arguments import ArgumentsContext
from knack.commands import CommandGroup
from knack.help_files import helps
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from vmvault.cli.client import call, vault_path
from vmvault.cli.commands._common import resource_group, table, vault_name
from vmvault.errors import invalid

helps["backup job"] = """
type: group
short-summary: Follow backup and restore jobs.
"""
helps["backup job stop"] = """
type: command
short-summary: Cancel a Backup or Restore job in progress; a cancelled backup leaves no recovery point.
long-summary: |
    The job stops at its next checkpoint (between steps, or during a transfer) and undoes what
    it started. Refused for other job types (J1), for a job committing its result (J2) and for
    a job not in progress (J3); a job that reaches no checkpoint in time goes on (J4).
examples:
  - name: Cancel a job.
    text: vmvault backup job stop -g MyResourceGroup -v MyVault -n 00000000-0000-0000-0000-000000000000
"""
helps["backup job wait"] = """
type: command
short-summary: Wait until a job ends, showing its progress; prints the job.
examples:
  - name: Wait for a job.
    text: vmvault backup job wait -g MyResourceGroup -v MyVault -n 00000000-0000-0000-0000-000000000000
"""


def list_jobs(resource_group_name: str, vault_name: str, status: str | None = None,
              operation: str | None = None, start_date: str | None = None,
              end_date: str | None = None) -> Any:
    """List the vault's jobs, newest first."""
    return call("GET", vault_path(resource_group_name, vault_name, "backupJobs"),
                params={"status": status, "operation": operation, "startDate": start_date,
                        "endDate": end_date})


def show_job(resource_group_name: str, vault_name: str, name: str) -> Any:
    """Show a job."""
    return call("GET", vault_path(resource_group_name, vault_name, "backupJobs", name))


def wait_job(resource_group_name: str, vault_name: str, name: str,
             timeout: int | None = None) -> Any:
    """Wait until a job is no longer in progress."""
    if timeout is not None and timeout <= 0:
        raise invalid("--timeout", "must be a positive number of seconds")
    deadline = time.monotonic() + timeout if timeout else None
    console = Console(stderr=True)
    job = show_job(resource_group_name, vault_name, name)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True,
                  disable=not console.is_terminal) as progress:
        bar = progress.add_task(job["properties"]["operation"], total=100)
        while job["properties"]["status"] == "InProgress":
            if deadline and time.monotonic() > deadline:
                print(f"WARNING: job {name} is still in progress after {timeout} s",
                      file=sys.stderr)
                return job
            info = job["properties"]["extendedInfo"]
            running = [t["taskId"] for t in info["tasksList"] if t["status"] == "InProgress"]
            label = f"{job['properties']['operation']} {job['properties']['entityFriendlyName']}"
            progress.update(bar, completed=info["progressPercentage"],
                            description=f"{label}: {running[0] if running else 'starting'}")
            time.sleep(0.5)
            job = show_job(resource_group_name, vault_name, name)
    props = job["properties"]
    if props["status"] not in ("Completed", "CompletedWithWarnings"):
        for err in props.get("errorDetails") or []:
            print(f"WARNING: job {props['status']}: ({err['errorCode']}) {err['errorString']} "
                  f"{' '.join(err['recommendations'])}", file=sys.stderr)
    return job


def stop_job(resource_group_name: str, vault_name: str, name: str) -> Any:
    """Cancel a running Backup or Restore job; returns the job once it has stopped."""
    return call("POST", vault_path(resource_group_name, vault_name, "backupJobs", name,
                                   "cancel"))


def job_table(rows: Any) -> Any:
    return table(rows, [("Name", "name"), ("Operation", "properties.operation"),
                        ("Status", "properties.status"),
                        ("Item Name", "properties.entityFriendlyName"),
                        ("Backup Management Type", "properties.backupManagementType"),
                        ("Start Time UTC", "properties.startTime"),
                        ("Duration", "properties.duration")])


def load_commands(loader: Any) -> None:
    with CommandGroup(loader, "backup job", "vmvault.cli.commands.backup_job#{}") as g:
        g.command("list", "list_jobs", table_transformer=job_table)
        g.command("show", "show_job", table_transformer=job_table)
        g.command("wait", "wait_job", table_transformer=job_table)
        g.command("stop", "stop_job", table_transformer=job_table)


def load_arguments(loader: Any) -> None:
    with ArgumentsContext(loader, "backup job") as ac:
        ac.argument("resource_group_name", resource_group)
        ac.argument("vault_name", vault_name)
        ac.argument("name", options_list=["--name", "-n"], help="Name (id) of the job.")
        ac.argument("status", choices=["InProgress", "Completed", "CompletedWithWarnings",
                                       "Failed", "Cancelled"], help="Only jobs in this status.")
        ac.argument("operation", choices=["Backup", "Restore", "ConfigureBackup",
                                          "DisableBackup", "DeleteBackupData"],
                    help="Only jobs of this operation.")
        ac.argument("start_date", help="Jobs started on or after this date (dd-mm-yyyy, UTC).")
        ac.argument("end_date", help="Jobs started on or before this date (dd-mm-yyyy, UTC).")
        ac.argument("timeout", type=int, help="Seconds to wait at most.")
