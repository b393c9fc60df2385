"""ARM template deployments (az deployment group create), for what vmvault's fabric holds:
VM extensions, declared at the top level (type Microsoft.Compute/virtualMachines/extensions,
name "<vm>/<extension>") or nested in a VM resource (type "extensions", name "<extension>"),
as the seed's VMSnapshot resource is written. The VMs themselves must exist.

Template language: parameters with defaultValue, and the expressions [parameters('x')],
[variables('x')] and [resourceGroup().location] in string values.
"""

from __future__ import annotations

import re
from typing import Any

from vmvault import arm
from vmvault.catalog import utcnow
from vmvault.context import Context
from vmvault.errors import invalid
from vmvault.fabric import extensions, vms

_EXPR = re.compile(r"^\[\s*(parameters|variables)\(\s*'([^']+)'\s*\)\s*\]$")
_LOCATION = re.compile(r"^\[\s*resourceGroup\(\)\.location\s*\]$")
VM_TYPE = "microsoft.compute/virtualmachines"


def _resolve(value: Any, params: dict[str, Any], variables: dict[str, Any], rg_location: str,
             where: str) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, params, variables, rg_location, f"{where}.{k}")
                for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, params, variables, rg_location, f"{where}[{i}]")
                for i, v in enumerate(value)]
    if isinstance(value, str):
        if _LOCATION.match(value):
            return rg_location
        m = _EXPR.match(value)
        if m:
            source = params if m.group(1) == "parameters" else variables
            if m.group(2) not in source:
                raise invalid(where, f"{m.group(1)} '{m.group(2)}' is not defined")
            return source[m.group(2)]
        if value.startswith("[") and not value.startswith("[["):
            raise invalid(where, f"the template expression {value} is not supported (only "
                          "parameters(), variables() and resourceGroup().location)")
    return value


def _parameters(template: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    declared = template.get("parameters") or {}
    for name, spec in declared.items():
        if name in given:
            value = given[name]
            out[name] = value.get("value") if isinstance(value, dict) else value
        elif isinstance(spec, dict) and "defaultValue" in spec:
            out[name] = spec["defaultValue"]
        else:
            raise invalid(f"parameters.{name}", "no value given and no defaultValue")
    unknown = set(given) - set(declared)
    if unknown:
        raise invalid("--parameters", f"not declared by the template: {', '.join(sorted(unknown))}")
    return out


def _extension_resources(resources: list[Any]) -> list[tuple[str, dict[str, Any], str]]:
    """(vm name, extension resource, where) for every extension in the template."""
    found = []
    for i, res in enumerate(resources):
        where = f"resources[{i}]"
        if not isinstance(res, dict):
            raise invalid(where, "must be an object")
        rtype = str(res.get("type", "")).lower()
        if rtype == f"{VM_TYPE}/extensions":
            vm_name, _, ext_name = str(res.get("name", "")).partition("/")
            if not ext_name:
                raise invalid(f"{where}.name", "must be '<vm name>/<extension name>'")
            found.append((vm_name, {**res, "name": ext_name}, where))
        elif rtype == VM_TYPE:
            for j, child in enumerate(res.get("resources") or []):
                cwhere = f"{where}.resources[{j}]"
                if not isinstance(child, dict) or str(child.get("type", "")).lower() not in (
                        "extensions", f"{VM_TYPE}/extensions"):
                    raise invalid(cwhere, "only extensions can be nested in a VM")
                name = str(child.get("name", ""))
                found.append((str(res.get("name", "")), {**child, "name": name.split("/")[-1]},
                              cwhere))
        else:
            raise invalid(f"{where}.type", f"'{res.get('type')}' cannot be deployed by vmvault "
                          "(VM extensions only)")
    return found


def create(ctx: Context, group: str, name: str, template: Any,
           parameters: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(template, dict):
        raise invalid("--template-file", "the template must be a JSON object")
    resources = template.get("resources")
    if not isinstance(resources, list) or not resources:
        raise invalid("resources", "the template declares no resources")
    started = utcnow()
    outputs: list[dict[str, Any]] = []
    with ctx.catalog.session() as s:
        rg_location = vms.groups.get(s, group).location
        params = _parameters(template, parameters)
        variables = _resolve(template.get("variables") or {}, params, {}, rg_location,
                             "variables")
        resolved = _resolve(resources, params, variables, rg_location, "resources")
        todo = _extension_resources(resolved)
        for vm_name, res, where in todo:
            vm = vms.get(s, group, str(vm_name))
            props = res.get("properties")
            if not isinstance(props, dict):
                raise invalid(f"{where}.properties", "must be an object")
            for key in ("publisher", "type"):
                if not props.get(key):
                    raise invalid(f"{where}.properties.{key}", "is required")
            ext = extensions.put(ctx, s, vm, str(res["name"]), str(props["publisher"]),
                                 str(props["type"]), props.get("typeHandlerVersion"),
                                 props.get("settings"), props.get("protectedSettings"),
                                 bool(props.get("autoUpgradeMinorVersion", True)))
            outputs.append({"id": extensions.to_arm(vm, ext)["id"]})
    extensions.agents.notify_goal_state()
    return {
        "id": arm.resource_id(group, "Microsoft.Resources", "deployments", name),
        "name": name, "resourceGroup": group,
        "properties": {"provisioningState": "Succeeded", "timestamp": arm.iso(started),
                       "outputResources": outputs, "mode": "Incremental",
                       "parameters": {k: {"value": v} for k, v in params.items()}},
    }
