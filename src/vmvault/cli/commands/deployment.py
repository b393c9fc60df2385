"""vmvault deployment group: ARM template deployments (az deployment group)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from knack.arguments import ArgumentsContext
from knack.commands import CommandGroup
from knack.help_files import helps

from vmvault.cli.client import call, provider_path
from vmvault.cli.commands._common import resource_group
from vmvault.errors import invalid

helps["deployment"] = """
type: group
short-summary: Deploy ARM templates.
"""
helps["deployment group"] = """
type: group
short-summary: Deploy ARM templates to a resource group.
"""
helps["deployment group create"] = """
type: command
short-summary: Deploy a template (VM extensions, such as the seed's VMSnapshot resource).
examples:
  - name: Deploy the VMSnapshot extension to a VM from a template.
    text: vmvault deployment group create -g myResourceGroup --template-file vmsnapshot.json --parameters vmName=myVM
"""


def _load_json(path: str, flag: str) -> Any:
    try:
        return json.loads(Path(path).expanduser().read_text())
    except OSError as exc:
        raise invalid(flag, f"cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise invalid(flag, f"{path} is not valid JSON: {exc}") from exc


def _parameters(values: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for value in values or []:
        if value.startswith("@") or value.endswith(".json"):
            doc = _load_json(value.lstrip("@"), "--parameters")
            params = doc.get("parameters", doc) if isinstance(doc, dict) else {}
            out.update({k: (v.get("value") if isinstance(v, dict) else v)
                        for k, v in params.items()})
        elif "=" in value:
            key, _, val = value.partition("=")
            out[key] = val
        else:
            raise invalid("--parameters", f"'{value}' is neither KEY=VALUE nor a JSON file")
    return out


def create_deployment(resource_group_name: str, template_file: str, name: str | None = None,
                      parameters: list[str] | None = None) -> Any:
    """Deploy a template to a resource group."""
    template = _load_json(template_file, "--template-file")
    deployment = name or Path(template_file).stem or f"deployment{int(time.time())}"
    return call("PUT", provider_path(resource_group_name, "Microsoft.Resources", "deployments",
                                     deployment),
                {"properties": {"mode": "Incremental", "template": template,
                                "parameters": _parameters(parameters)}})


def load_commands(loader: Any) -> None:
    with CommandGroup(loader, "deployment group", "vmvault.cli.commands.deployment#{}") as g:
        g.command("create", "create_deployment")


def load_arguments(loader: Any) -> None:
    with ArgumentsContext(loader, "deployment group") as ac:
        ac.argument("resource_group_name", resource_group)
        ac.argument("template_file", options_list=["--template-file", "-f"],
                    help="The template: a JSON file.")
        ac.argument("name", options_list=["--name", "-n"], help="The deployment's name.")
        ac.argument("parameters", options_list=["--parameters", "-p"], nargs="+",
                    help="KEY=VALUE pairs or a parameters JSON file.")
