"""vmvault backup troubleshoot: the error catalog, offline (docs/errors.md is made from it)."""

from __future__ import annotations

from typing import Any

from knack.arguments import ArgumentsContext
from knack.commands import CommandGroup
from knack.help_files import helps

from vmvault.errors import CATALOG, ErrorEntry, NotApplicable, lookup, not_found

helps["backup troubleshoot"] = """
type: command
short-summary: Explain an error code or a troubleshooting row: its message and what to do.
long-summary: |
    Every error vmvault reports has a code (Azure's where Azure's is known), a message and a
    recommended action. Give a code from a job's error details (e.g.
    UserErrorGuestAgentStatusUnavailable) or a row of the troubleshooting guide (B1-B14,
    S1-S4, J1-J4, R1-R11); without --code, every entry is listed.
examples:
  - name: What does a failed job's code mean?
    text: vmvault backup troubleshoot --code UserErrorFsFreezeFailed
  - name: The entry of row J2.
    text: vmvault backup troubleshoot --code J2 -o json
"""


def _row(entry: ErrorEntry | NotApplicable) -> dict[str, Any]:
    if isinstance(entry, NotApplicable):
        return {"code": None, "row": entry.row, "applies": False,
                "message": entry.situation, "action": entry.reason}
    return {"code": entry.code, "row": entry.row or None, "applies": True,
            "message": entry.message, "action": entry.action, "httpStatus": entry.http_status}


def troubleshoot(code: str | None = None) -> Any:
    """Show catalog entries."""
    if code is None:
        return [_row(e) for e in sorted(CATALOG.values(), key=lambda e: e.code)]
    found = lookup(code)
    if not found:
        raise not_found("error code or troubleshooting row", code)
    return [_row(e) for e in found]


def _table(rows: Any) -> Any:
    return [{"Row": r["row"] or "", "Code": r["code"] or "(does not apply)",
             "Message": r["message"], "Recommended action": r["action"]} for r in rows]


def load_commands(loader: Any) -> None:
    with CommandGroup(loader, "backup", "vmvault.cli.commands.backup_troubleshoot#{}") as g:
        g.command("troubleshoot", "troubleshoot", table_transformer=_table)


def load_arguments(loader: Any) -> None:
    with ArgumentsContext(loader, "backup troubleshoot") as ac:
        ac.argument("code", options_list=["--code", "-c"],
                    help="An error code, or a troubleshooting row such as B8.")
