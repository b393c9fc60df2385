"""Flags shared by the command groups, named as az names them."""

from __future__ import annotations

from typing import Any

from knack.arguments import ArgumentsContext, CLIArgumentType

resource_group = CLIArgumentType(options_list=["--resource-group", "-g"],
                                 help="Name of the resource group.")
vault_name = CLIArgumentType(options_list=["--vault-name", "-v"],
                             help="Name of the Recovery Services vault.")
container_name = CLIArgumentType(options_list=["--container-name", "-c"],
                                 help="Name of the backup container (the VM's name, or "
                                      "IaasVMContainer;iaasvmcontainerv2;<rg>;<vm>).")
item_name = CLIArgumentType(options_list=["--item-name", "-i"],
                            help="Name of the backed up item (the VM's name, or "
                                 "VM;iaasvmcontainerv2;<rg>;<vm>).")


def backup_flags(loader: Any, scope: str) -> None:
    with ArgumentsContext(loader, scope) as ac:
        ac.argument("resource_group_name", resource_group)
        ac.argument("vault_name", vault_name)
        ac.argument("container_name", container_name)
        ac.argument("item_name", item_name)


def table(rows: Any, columns: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Pick columns for -o table: (heading, dotted path into each row)."""
    def dig(row: Any, path: str) -> Any:
        for part in path.split("."):
            if isinstance(row, list) and part.isdigit():
                row = row[int(part)] if int(part) < len(row) else None
            else:
                row = row.get(part) if isinstance(row, dict) else None
        return row

    items = rows if isinstance(rows, list) else [rows]
    return [{head: dig(r, path) for head, path in columns} for r in items]
