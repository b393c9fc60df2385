"""The REST API: ARM-shaped paths and JSON over the service functions.

Paths follow Azure Resource Manager (``/subscriptions/{sub}/resourceGroups/{rg}/
providers/{namespace}/...``); bodies follow Azure's where a request has an Azure
counterpart. Errors are ``{"error": {"code", "message", "action"}}`` with the
catalog's HTTP status. The OpenAPI document is at /openapi.json.
"""

from __future__ import annotations

from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from vmvault import __version__, arm, clock
from vmvault.api import agent as agent_api
from vmvault.config import SUBSCRIPTION_ID
from vmvault.context import Context
from vmvault.control import backup, jobs, policies, protection, restore, vaults
from vmvault.control.scheduler import Scheduler
from vmvault.errors import VmvaultError, invalid
from vmvault.fabric import agents, deployments, extensions, groups, storage_accounts, vms

Json = dict[str, Any]
SUB = "/subscriptions/{subscription}"
RG = SUB + "/resourceGroups/{group}"
STORAGE = RG + "/providers/Microsoft.Storage/storageAccounts"
COMPUTE = RG + "/providers/Microsoft.Compute/virtualMachines"
VAULT = RG + "/providers/Microsoft.RecoveryServices/vaults/{vault}"
ITEM = VAULT + "/backupFabrics/Azure/protectionContainers/{container}/protectedItems/{item}"


def _props(body: Json) -> Json:
    props = body.get("properties") or {}
    if not isinstance(props, dict):
        raise invalid("properties", "must be a JSON object")
    return props


def _last_segment(value: str | None) -> str | None:
    return value.rstrip("/").split("/")[-1] if value else None


def create_app(ctx: Context, runner: jobs.JobRunner, scheduler: Scheduler) -> FastAPI:
    app = FastAPI(title="vmvault", version=__version__,
                  description="Self-hosted Azure Backup for Linux VMs: ARM-shaped REST API.")

    @app.exception_handler(VmvaultError)
    async def _catalog_error(_request: Request, exc: VmvaultError) -> JSONResponse:
        return JSONResponse({"error": exc.to_dict()}, status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        err = invalid(where or "request", first.get("msg", "malformed request"))
        return JSONResponse({"error": err.to_dict()}, status_code=400)

    # --- service --------------------------------------------------------------------------------
    @app.get("/vmvault/status")
    def status() -> Json:
        return {"version": __version__, "subscriptionId": SUBSCRIPTION_ID,
                "blobEndpoint": ctx.blob_url, "home": str(ctx.paths.root),
                "pool": {"path": str(ctx.pool.path), "fsType": ctx.pool.fs_type,
                         "reflink": ctx.pool.reflink, "warning": ctx.pool.warning},
                "catalog": ctx.catalog.url.split("://")[0]}

    @app.get("/vmvault/clock")
    def get_clock() -> Json:
        return clock_view()

    @app.put("/vmvault/clock")
    def set_clock(body: Json = Body(default={})) -> Json:
        if not clock.simulated():
            raise invalid("clock", "the server keeps the system's time; start the stack with "
                          f"{clock.ENV}=1 to simulate time")
        if body.get("reset"):
            clock.set_offset(0.0)
        elif body.get("now"):
            target = arm.parse_date(str(body["now"]), "--time")
            clock.set_offset((target - clock.real_utcnow()).total_seconds())
        elif body.get("advanceSeconds") is not None:
            step = body["advanceSeconds"]
            if isinstance(step, bool) or not isinstance(step, int | float):
                raise invalid("advanceSeconds", "give a number of seconds")
            clock.set_offset(clock.offset_seconds() + float(step))
        else:
            raise invalid("clock", "give now, advanceSeconds or reset")
        scheduler.wake()
        return clock_view()

    def clock_view() -> Json:
        return {"now": arm.iso(clock.utcnow()), "simulated": clock.simulated(),
                "offsetSeconds": clock.offset_seconds()}

    # --- resource groups ------------------------------------------------------------------------
    @app.put(RG)
    def put_group(subscription: str, group: str, body: Json = Body(default={})) -> Json:
        return groups.create(ctx, group, str(body.get("location", "")))

    @app.get(RG)
    def get_group(subscription: str, group: str) -> Json:
        return groups.show(ctx, group)

    @app.get(SUB + "/resourceGroups")
    def list_groups(subscription: str) -> Json:
        return {"value": groups.list_all(ctx)}

    @app.delete(RG, status_code=200)
    def delete_group(subscription: str, group: str) -> Response:
        groups.delete(ctx, group)
        return Response(status_code=200)

    # --- storage accounts -----------------------------------------------------------------------
    @app.put(STORAGE + "/{name}")
    def put_account(subscription: str, group: str, name: str,
                    body: Json = Body(default={})) -> Json:
        sku = (body.get("sku") or {}).get("name", "Standard_LRS")
        capacity = _props(body).get("capacityGb", storage_accounts.DEFAULT_CAPACITY_GB)
        return storage_accounts.create(ctx, group, name, body.get("location"), sku, int(capacity))

    @app.patch(STORAGE + "/{name}")
    def patch_account(subscription: str, group: str, name: str,
                      body: Json = Body(default={})) -> Json:
        props = _props(body)
        cap = props.get("capacityGb")
        return storage_accounts.update(ctx, group, name, int(cap) if cap is not None else None,
                                       props.get("statusOfPrimary"))

    @app.get(STORAGE + "/{name}")
    def get_account(subscription: str, group: str, name: str) -> Json:
        return storage_accounts.show(ctx, group, name)

    @app.get(STORAGE)
    def list_accounts(subscription: str, group: str) -> Json:
        return {"value": storage_accounts.list_all(ctx, group)}

    @app.get(SUB + "/providers/Microsoft.Storage/storageAccounts")
    def list_all_accounts(subscription: str) -> Json:
        return {"value": storage_accounts.list_all(ctx)}

    @app.post(STORAGE + "/{name}/listKeys")
    def list_keys(subscription: str, group: str, name: str) -> Json:
        return {"keys": storage_accounts.list_keys(ctx, group, name)}

    @app.delete(STORAGE + "/{name}")
    def delete_account(subscription: str, group: str, name: str) -> Response:
        storage_accounts.delete(ctx, group, name)
        return Response(status_code=200)

    # --- virtual machines -----------------------------------------------------------------------
    @app.put(COMPUTE + "/{name}")
    def put_vm(subscription: str, group: str, name: str, body: Json = Body(default={})) -> Json:
        p = _props(body)
        return vms.create(
            ctx, group, name, str(p.get("storageAccount", "")),
            os_disk_size_gb=int(p.get("osDiskSizeGb", 4)),
            data_disk_sizes_gb=[int(x) for x in p.get("dataDiskSizesGb") or []],
            os_disk_fs_type=str(p.get("osDiskFsType", "ext4")),
            data_disk_fs_types=[str(x) for x in p.get("dataDiskFsTypes") or []],
            location=body.get("location"), size=str(p.get("vmSize", "Standard_B2s")),
            enable_agent=bool(p.get("provisionVMAgent", True)),
        )

    @app.get(COMPUTE + "/{name}")
    def get_vm(subscription: str, group: str, name: str) -> Json:
        return vms.show(ctx, group, name)

    @app.get(COMPUTE)
    def list_vms(subscription: str, group: str) -> Json:
        return {"value": vms.list_all(ctx, group)}

    @app.get(SUB + "/providers/Microsoft.Compute/virtualMachines")
    def list_all_vms(subscription: str) -> Json:
        return {"value": vms.list_all(ctx)}

    @app.post(COMPUTE + "/{name}/start")
    def start_vm(subscription: str, group: str, name: str) -> Json:
        return vms.start(ctx, group, name)

    @app.post(COMPUTE + "/{name}/powerOff")
    def power_off_vm(subscription: str, group: str, name: str, noWait: bool = False) -> Json:  # noqa: N803
        return vms.power_off(ctx, group, name, no_wait=noWait)

    @app.post(COMPUTE + "/{name}/deallocate")
    def deallocate_vm(subscription: str, group: str, name: str, noWait: bool = False) -> Json:  # noqa: N803
        return vms.power_off(ctx, group, name, deallocate=True, no_wait=noWait)

    @app.get(COMPUTE + "/{name}/instanceView")
    def vm_instance_view(subscription: str, group: str, name: str) -> Json:
        with ctx.catalog.session() as s:
            vm = vms.get(s, group, name)
            return {"vmAgent": agents.instance_view(ctx, vm),
                    "extensions": [extensions.to_arm(vm, e)["instanceView"]
                                   for e in vm.extensions],
                    "statuses": [{"code": f"ProvisioningState/{vm.provisioning_state.lower()}"},
                                 {"code": f"PowerState/{vm.power_state}",
                                  "displayStatus": f"VM {vm.power_state}"}]}

    # The lab's VM agent (a real VM's would be managed inside the guest).
    @app.patch(COMPUTE + "/{name}/vmAgent")
    def vm_agent_configure(subscription: str, group: str, name: str,
                           body: Json = Body(default={})) -> Json:
        proxy = body.get("httpProxy")
        if proxy is not None and not isinstance(proxy, str):
            raise invalid("httpProxy", "give a proxy URL, or \"\" to remove the proxy")
        return agents.configure(ctx, group, name, proxy)

    @app.post(COMPUTE + "/{name}/vmAgent/{action}")
    def vm_agent_action(subscription: str, group: str, name: str, action: str) -> Json:
        return agents.lab_action(ctx, group, name, action)

    # --- VM extensions ----------------------------------------------------------------------------
    @app.put(COMPUTE + "/{name}/extensions/{ext}")
    def put_extension(subscription: str, group: str, name: str, ext: str,
                      body: Json = Body(default={})) -> Json:
        p = _props(body)
        return extensions.set_extension(
            ctx, group, name, ext, str(p.get("publisher", "")),
            p.get("typeHandlerVersion"), p.get("settings"), p.get("protectedSettings"),
            bool(p.get("autoUpgradeMinorVersion", True)), p.get("type"))

    @app.get(COMPUTE + "/{name}/extensions/{ext}")
    def get_extension(subscription: str, group: str, name: str, ext: str) -> Json:
        return extensions.show(ctx, group, name, ext)

    @app.get(COMPUTE + "/{name}/extensions")
    def list_extensions(subscription: str, group: str, name: str) -> Json:
        return {"value": extensions.list_all(ctx, group, name)}

    @app.delete(COMPUTE + "/{name}/extensions/{ext}")
    def delete_extension(subscription: str, group: str, name: str, ext: str) -> Response:
        extensions.delete(ctx, group, name, ext)
        return Response(status_code=200)

    # --- deployments (ARM templates) ------------------------------------------------------------
    @app.put(RG + "/providers/Microsoft.Resources/deployments/{deployment}")
    def put_deployment(subscription: str, group: str, deployment: str,
                       body: Json = Body(default={})) -> Json:
        p = _props(body)
        return deployments.create(ctx, group, deployment, p.get("template"),
                                  p.get("parameters") or {})

    @app.delete(COMPUTE + "/{name}")
    def delete_vm(subscription: str, group: str, name: str) -> Response:
        vms.delete(ctx, group, name)
        return Response(status_code=200)

    # --- vaults and policies --------------------------------------------------------------------
    @app.put(VAULT)
    def put_vault(subscription: str, group: str, vault: str, body: Json = Body(default={})) -> Json:
        p = _props(body)
        chunk = p.get("chunkSizeBytes")
        return vaults.create(ctx, group, vault, body.get("location"), p.get("password"),
                             int(chunk) if chunk else None)

    @app.get(VAULT)
    def get_vault(subscription: str, group: str, vault: str) -> Json:
        return vaults.show(ctx, group, vault)

    @app.get(RG + "/providers/Microsoft.RecoveryServices/vaults")
    def list_vaults(subscription: str, group: str) -> Json:
        return {"value": vaults.list_all(ctx, group)}

    @app.get(SUB + "/providers/Microsoft.RecoveryServices/vaults")
    def list_all_vaults(subscription: str) -> Json:
        return {"value": vaults.list_all(ctx)}

    @app.delete(VAULT)
    def delete_vault(subscription: str, group: str, vault: str) -> Response:
        vaults.delete(ctx, group, vault)
        return Response(status_code=200)

    @app.post(VAULT + "/check")
    def check_vault(subscription: str, group: str, vault: str,
                    body: Json = Body(default={})) -> Json:
        return vaults.check(ctx, group, vault, bool(body.get("readData")), body.get("password"))

    @app.get(VAULT + "/backupPolicies")
    def list_policies(subscription: str, group: str, vault: str) -> Json:
        with ctx.catalog.session() as s:
            v = vaults.get(s, group, vault)
            return {"value": [policies.to_arm(s, p) for p in policies.list_for(s, v)]}

    @app.get(VAULT + "/backupPolicies/{policy}")
    def get_policy(subscription: str, group: str, vault: str, policy: str) -> Json:
        with ctx.catalog.session() as s:
            return policies.to_arm(s, policies.get(s, vaults.get(s, group, vault), policy))

    @app.put(VAULT + "/backupPolicies/{policy}")
    def put_policy(request: Request, subscription: str, group: str, vault: str, policy: str,
                   body: Json = Body(default={})) -> Json:
        result = policies.put(ctx, group, vault, policy, _props(body),
                              must_exist=request.headers.get("if-match") == "*",
                              must_not_exist=request.headers.get("if-none-match") == "*")
        scheduler.wake()
        return result

    @app.delete(VAULT + "/backupPolicies/{policy}")
    def delete_policy(subscription: str, group: str, vault: str, policy: str) -> Response:
        policies.delete(ctx, group, vault, policy)
        return Response(status_code=200)

    @app.get(VAULT + "/defaultBackupPolicy")
    def default_policy(subscription: str, group: str, vault: str) -> Json:
        return policies.default_for_vm(ctx, group, vault)

    # --- protection ------------------------------------------------------------------------------
    @app.put(ITEM)
    def enable_protection(request: Request, subscription: str, group: str, vault: str,
                          container: str, item: str, body: Json = Body(default={})) -> Json:
        p = _props(body)
        policy_id = _last_segment(p.get("policyId"))
        create_only = request.headers.get("if-none-match") == "*"
        if not create_only and protection.exists(ctx, group, vault, container, item):
            result = protection.update_item(ctx, group, vault, container, item,
                                            p.get("protectionState"), policy_id)
        else:
            vm = str(p.get("sourceResourceId") or protection.friendly(item))
            result = protection.enable_for_vm(ctx, group, vault, vm,
                                              policy_id or policies.DEFAULT_POLICY)
        scheduler.wake()
        return result

    @app.delete(ITEM, status_code=202)
    def delete_item(subscription: str, group: str, vault: str, container: str,
                    item: str) -> Json:
        return protection.delete_backup_data(ctx, group, vault, container, item, runner)

    @app.get(ITEM)
    def get_item(subscription: str, group: str, vault: str, container: str, item: str) -> Json:
        return protection.show_item(ctx, group, vault, container, item)

    @app.get(VAULT + "/backupProtectedItems")
    def list_items(subscription: str, group: str, vault: str) -> Json:
        return {"value": protection.list_items(ctx, group, vault)}

    @app.get(VAULT + "/backupProtectionContainers")
    def list_containers(subscription: str, group: str, vault: str) -> Json:
        return {"value": protection.list_containers(ctx, group, vault)}

    @app.post(ITEM + "/backup", status_code=202)
    def backup_now(subscription: str, group: str, vault: str, container: str, item: str,
                   body: Json = Body(default={})) -> Json:
        expiry = _props(body).get("recoveryPointExpiryTimeInUTC")
        return backup.backup_now(ctx, group, vault, container, item, expiry, runner)

    @app.get(ITEM + "/recoveryPoints")
    def list_rps(subscription: str, group: str, vault: str, container: str, item: str,
                 startDate: str | None = None, endDate: str | None = None) -> Json:  # noqa: N803
        start = arm.parse_date(startDate, "--start-date") if startDate else None
        end = arm.parse_date(endDate, "--end-date") if endDate else None
        return {"value": protection.list_rps(ctx, group, vault, container, item, start, end)}

    @app.get(ITEM + "/recoveryPoints/{rp}")
    def get_rp(subscription: str, group: str, vault: str, container: str, item: str,
               rp: str) -> Json:
        return protection.show_rp(ctx, group, vault, container, item, rp)

    @app.post(ITEM + "/recoveryPoints/{rp}/restore", status_code=202)
    def restore_rp(subscription: str, group: str, vault: str, container: str, item: str,
                   rp: str, body: Json = Body(default={})) -> Json:
        p = _props(body)
        recovery_type = p.get("recoveryType", "RestoreDisks")
        if recovery_type != "RestoreDisks":
            raise invalid("recoveryType", f"'{recovery_type}' is not supported yet; use "
                          "RestoreDisks")
        account = _last_segment(p.get("storageAccountId"))
        if not account:
            raise invalid("storageAccountId", "the target storage account is required")
        return restore.restore_disks(ctx, group, vault, container, item, rp, account,
                                     _last_segment(p.get("targetResourceGroupId")), runner,
                                     str(p.get("restoreFrom", "Auto")))

    # --- jobs -----------------------------------------------------------------------------------
    @app.get(VAULT + "/backupJobs")
    def list_jobs(subscription: str, group: str, vault: str, status: str | None = None,
                  operation: str | None = None, startDate: str | None = None,  # noqa: N803
                  endDate: str | None = None) -> Json:  # noqa: N803
        start = arm.parse_date(startDate, "--start-date") if startDate else None
        end = arm.parse_date(endDate, "--end-date") if endDate else None
        with ctx.catalog.session() as s:
            v = vaults.get(s, group, vault)
            return {"value": [jobs.to_arm(j) for j in jobs.list_jobs(s, v, status, operation,
                                                                      start, end)]}

    @app.get(VAULT + "/backupJobs/{job}")
    def get_job(subscription: str, group: str, vault: str, job: str) -> Json:
        with ctx.catalog.session() as s:
            return jobs.to_arm(jobs.get(s, vaults.get(s, group, vault), job))

    @app.post(VAULT + "/backupJobs/{job}/cancel")
    def cancel_job(subscription: str, group: str, vault: str, job: str) -> Json:
        with ctx.catalog.session() as s:
            jobs.get(s, vaults.get(s, group, vault), job)
        runner.stop(job, ctx.service.cancel_wait_seconds)
        with ctx.catalog.session() as s:
            return jobs.to_arm(jobs.get(s, vaults.get(s, group, vault), job))

    app.include_router(agent_api.router(ctx))
    return app
