"""vmvault backup policy: backup policies (az backup policy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from knack.arguments import ArgumentsContext
from knack.commands import CommandGroup
from knack.help_files import helps

from vmvault.cli.client import call, vault_path
from vmvault.cli.commands._common import resource_group, table, vault_name
from vmvault.errors import invalid

helps["backup policy"] = """
type: group
short-summary: Create, change and remove backup policies (when a VM is backed up, how long
    its recovery points are kept).
long-summary: |
    A policy has Azure's AzureIaasVM shape: schedulePolicy (SimpleSchedulePolicy: Daily or
    Weekly, one run time on the hour or half hour, run days for Weekly), timeZone (a Windows
    time zone id such as "W. Europe Standard Time"), instantRpRetentionRangeInDays (1-5) and
    retentionPolicy (LongTermRetentionPolicy: daily, weekly, monthly, yearly schedules).
    Start from 'vmvault backup policy get-default-for-vm' or 'backup policy show -o json'.
"""
helps["backup policy create"] = """
type: command
short-summary: Create a policy from its JSON (refused if the name exists; use 'set' to change one).
examples:
  - name: Create a weekly policy from a file.
    text: vmvault backup policy create -g MyResourceGroup -v MyVault -n Weekly --policy weekly.json --backup-management-type AzureIaasVM
"""
helps["backup policy set"] = """
type: command
short-summary: Change an existing policy; its retention applies to existing scheduled recovery points too.
examples:
  - name: Move a policy to 22:00 in its time zone.
    text: vmvault backup policy show -g MyResourceGroup -v MyVault -n MyPolicy -o json > p.json; (edit scheduleRunTimes); vmvault backup policy set -g MyResourceGroup -v MyVault -n MyPolicy --policy p.json
"""
helps["backup policy delete"] = """
type: command
short-summary: Delete a policy no protected item uses.
"""
helps["backup policy get-default-for-vm"] = """
type: command
short-summary: The vault's default policy for VMs (a starting point for 'create').
"""


def list_policies(resource_group_name: str, vault_name: str) -> Any:
    """List the vault's policies."""
    return call("GET", vault_path(resource_group_name, vault_name, "backupPolicies"))


def show_policy(resource_group_name: str, vault_name: str, name: str) -> Any:
    """Show a policy."""
    return call("GET", vault_path(resource_group_name, vault_name, "backupPolicies", name))


def _policy_body(policy: str) -> dict[str, Any]:
    """--policy takes JSON, a file holding it, or @file; a whole policy (as 'show' prints it)
    or only its properties."""
    text = policy
    path = Path(policy[1:] if policy.startswith("@") else policy)
    if not policy.lstrip().startswith("{"):
        try:
            text = path.read_text()
        except OSError as exc:
            raise invalid("--policy", f"'{policy}' is neither JSON nor a readable file "
                          f"({exc.strerror})") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise invalid("--policy", f"not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise invalid("--policy", "must be a JSON object")
    props = data.get("properties", data)
    if not isinstance(props, dict):
        raise invalid("--policy", "'properties' must be a JSON object")
    return {"properties": props}


def create_policy(resource_group_name: str, vault_name: str, name: str, policy: str,
                  backup_management_type: str = "AzureIaasVM") -> Any:
    """Create a backup policy."""
    body = _policy_body(policy)
    body["properties"].setdefault("backupManagementType", backup_management_type)
    return call("PUT", vault_path(resource_group_name, vault_name, "backupPolicies", name),
                body, headers={"If-None-Match": "*"})


def set_policy(resource_group_name: str, vault_name: str, name: str, policy: str) -> Any:
    """Change a backup policy."""
    return call("PUT", vault_path(resource_group_name, vault_name, "backupPolicies", name),
                _policy_body(policy), headers={"If-Match": "*"})


def delete_policy(resource_group_name: str, vault_name: str, name: str) -> Any:
    """Delete a backup policy."""
    return call("DELETE", vault_path(resource_group_name, vault_name, "backupPolicies", name))


def default_policy(resource_group_name: str, vault_name: str) -> Any:
    """The default policy for VMs."""
    return call("GET", vault_path(resource_group_name, vault_name, "defaultBackupPolicy"))


def _table(rows: Any) -> Any:
    from vmvault.control.policies import summary

    out = table(rows, [("Name", "name"), ("ResourceGroup", "resourceGroup"),
                       ("ProtectedItems", "properties.protectedItemsCount")])
    for row, policy in zip(out, rows if isinstance(rows, list) else [rows], strict=True):
        try:
            row["Schedule and retention"] = summary(policy["properties"])
        except Exception:  # noqa: BLE001 - a table never fails on an odd policy
            row["Schedule and retention"] = "(see -o json)"
    return out


def load_commands(loader: Any) -> None:
    with CommandGroup(loader, "backup policy", "vmvault.cli.commands.backup_policy#{}") as g:
        g.command("list", "list_policies", table_transformer=_table)
        g.command("show", "show_policy", table_transformer=_table)
        g.command("create", "create_policy", table_transformer=_table)
        g.command("set", "set_policy", table_transformer=_table)
        g.command("delete", "delete_policy")
        g.command("get-default-for-vm", "default_policy", table_transformer=_table)


def load_arguments(loader: Any) -> None:
    with ArgumentsContext(loader, "backup policy") as ac:
        ac.argument("resource_group_name", resource_group)
        ac.argument("vault_name", vault_name)
        ac.argument("name", options_list=["--name", "-n"], help="Name of the policy.")
        ac.argument("policy", help="The policy's JSON: inline, a file name, or @file (as "
                    "'backup policy show -o json' prints it, or only its properties).")
        ac.argument("backup_management_type", choices=["AzureIaasVM"],
                    help="The kind of items the policy protects.")
