"""The CLI as a user runs it: help, output formats, exit codes, the fabric commands."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import IS_ROOT, Stack, make_stack, make_vm, needs_root


def test_help_on_groups_and_commands(stack: Stack) -> None:
    top = stack.run("--help").out
    for group in ("backup", "vm", "storage", "group", "up", "down", "status"):
        assert group in top
    now = stack.run("backup", "protection", "backup-now", "--help").out
    for flag in ("--resource-group", "--vault-name", "--container-name", "--item-name",
                 "--retain-until", "--output", "--query"):
        assert flag in now
    assert "--data-disk-sizes-gb" in stack.run("vm", "create", "--help").out


def test_missing_resource_exits_3_with_code_message_action(stack: Stack) -> None:
    stack.run("group", "create", "-n", "rg-missing", "-l", "eastus")
    r = stack.run("vm", "show", "-g", "rg-missing", "-n", "nope", ok=False)
    assert r.code == 3
    assert "(ResourceNotFound) The VM 'nope' was not found." in r.err
    assert "Recommended action:" in r.err
    assert "Traceback" not in r.err


def test_bad_input_is_named(stack: Stack) -> None:
    r = stack.run("storage", "account", "create", "-g", "rg-missing", "-n", "Bad_Name!",
                  ok=False)
    assert r.code == 1
    assert "InvalidArgumentValue" in r.err and "storage account name" in r.err
    r = stack.run("storage", "account", "create", "-g", "x", "-n", "abc", "--sku", "Gold",
                  ok=False)
    assert r.code == 2  # argument parsing, as az
    assert "Gold" in r.err
    r = stack.run("group", "create", "-n", "rg-x", "-l", "eastus", "--bogus", ok=False)
    assert r.code == 2


def test_server_down_says_what_to_do(tmp_path: Path) -> None:
    env = dict(os.environ, VMVAULT_HOME=str(tmp_path), VMVAULT_API_URL="http://127.0.0.1:9")
    s = Stack(tmp_path, env)
    r = s.run("group", "list", ok=False)
    assert r.code == 1
    assert "ServerUnreachable" in r.err and "vmvault up" in r.err


def test_up_is_idempotent_and_status_says_where(stack: Stack) -> None:
    before = stack.status()
    again = stack.json("up")
    assert again["changed"] is False
    assert again["server"]["pid"] == before["server"]["pid"]
    assert before["running"] is True
    assert before["server"]["url"].startswith("http://127.0.0.1:")
    assert before["blobEndpoint"]["url"].startswith("http://127.0.0.1:")
    if IS_ROOT:
        assert before["pool"]["reflink"] is True


def test_output_formats_and_query(stack: Stack, names: dict[str, str]) -> None:
    stack.run("group", "create", "-n", names["rg"], "-l", "East US")
    table = stack.run("group", "show", "-n", names["rg"], "-o", "table").out
    assert "Name" in table.splitlines()[0] and names["rg"] in table and "eastus" in table
    assert stack.run("group", "show", "-n", names["rg"], "--query", "location", "-o",
                     "tsv").out.strip() == "eastus"
    assert f"name: {names['rg']}" in stack.run("group", "show", "-n", names["rg"], "-o",
                                                "yaml").out
    assert stack.run("group", "show", "-n", names["rg"], "-o", "none").out == ""
    listed = stack.json("group", "list", "--query", f"[?name=='{names['rg']}'].location")
    assert listed == ["eastus"]


def test_storage_account_skus_status_capacity(stack: Stack, names: dict[str, str]) -> None:
    stack.run("group", "create", "-n", names["rg"], "-l", "westeurope")
    for i, sku in enumerate(("Standard_LRS", "Standard_GRS", "Standard_ZRS", "Premium_LRS")):
        acct = stack.json("storage", "account", "create", "-g", names["rg"], "-n",
                          f"{names['sa']}{i}", "--sku", sku)
        assert acct["sku"]["name"] == sku and acct["location"] == "westeurope"
        assert acct["statusOfPrimary"] == "available" and acct["capacityBytes"] > 0
    off = stack.json("storage", "account", "update", "-g", names["rg"], "-n", f"{names['sa']}0",
                     "--status", "unavailable")
    assert off["statusOfPrimary"] == "unavailable"
    r = stack.run("storage", "account", "create", "-g", names["rg"], "-n", f"{names['sa']}0",
                  ok=False)
    assert "ResourceAlreadyExists" in r.err


def test_vm_lifecycle_and_power_states(stack: Stack, names: dict[str, str]) -> None:
    vm = make_vm(stack, names, data_disks=("1", "1"), fs=("ext4", "xfs"))
    assert vm["powerState"] == "VM running" and vm["provisioningState"] == "Succeeded"
    data = vm["storageProfile"]["dataDisks"]
    assert [d["fileSystem"] for d in data] == ["ext4", "xfs"]
    assert [d["lun"] for d in data] == [0, 1]
    if IS_ROOT:
        assert vm["disksMounted"] is True
        assert all(os.path.ismount(d["mountPoint"]) for d in data)
    stopped = stack.json("vm", "stop", "-g", names["rg"], "-n", names["vm"])
    assert stopped["powerState"] == "VM stopped" and stopped["disksMounted"] is False
    assert not any(os.path.ismount(d["mountPoint"]) for d in data if d["mountPoint"])
    dealloc = stack.json("vm", "deallocate", "-g", names["rg"], "-n", names["vm"])
    assert dealloc["powerState"] == "VM deallocated"
    started = stack.json("vm", "start", "-g", names["rg"], "-n", names["vm"])
    assert started["powerState"] == "VM running"
    table = stack.run("vm", "list", "-g", names["rg"], "-o", "table").out
    assert "PowerState" in table and "VM running" in table
    stack.run("vm", "delete", "-g", names["rg"], "-n", names["vm"], "--yes")
    assert stack.run("vm", "show", "-g", names["rg"], "-n", names["vm"], ok=False).code == 3


@needs_root()
def test_lab_vm_file_systems_are_real(stack: Stack, names: dict[str, str]) -> None:
    vm = make_vm(stack, names, data_disks=("1",), fs=("xfs",))
    mount = Path(vm["storageProfile"]["dataDisks"][0]["mountPoint"])
    (mount / "f.txt").write_text("hello")
    with open("/proc/mounts") as f:
        line = next(x for x in f if f" {mount} " in x)
    assert line.split()[2] == "xfs" and line.split()[0].startswith("/dev/loop")


@needs_root()
def test_down_unmounts_and_up_remounts_running_vms(tmp_path: Path, names: dict[str, str]) -> None:
    s = make_stack(tmp_path / "home")
    try:
        vm = make_vm(s, names, data_disks=("1",), fs=("ext4",))
        mount = Path(vm["storageProfile"]["dataDisks"][0]["mountPoint"])
        (mount / "keep.txt").write_text("still here")
        pool = Path(s.status()["pool"]["path"])
        assert os.path.ismount(pool)
        s.run("down")
        assert not os.path.ismount(mount) and not os.path.ismount(pool)
        assert s.status()["running"] is False
        s.run("up")
        assert os.path.ismount(mount)
        assert (mount / "keep.txt").read_text() == "still here"
    finally:
        s.run("down", ok=False)
