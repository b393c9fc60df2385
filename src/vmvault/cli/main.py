"""The vmvault command line: az's commands and conventions, on knack (the framework az uses).

`az backup ...` and `az vm ...` become `vmvault backup ...` and `vmvault vm ...`,
with the same flags, `-o table|json|jsonc|tsv|yaml|none`, `--query` (JMESPath),
`--help` everywhere and az's exit codes (0 ok, 1 error, 2 bad usage, 3 not found).
"""

from __future__ import annotations

import importlib
import sys
from collections import OrderedDict
from typing import Any

from knack import CLI, CLICommandsLoader
from knack.help import CLIHelp
from knack.help_files import helps

from vmvault import __version__
from vmvault.errors import VmvaultError

COMMAND_MODULES = [
    "stack", "group", "storage", "vm", "vm_extension", "deployment", "backup_vault",
    "backup_policy", "backup_protection",
    "backup_item", "backup_container", "backup_job", "backup_recoverypoint", "backup_restore",
    "backup_troubleshoot", "clock",
]

helps[""] = """
type: group
short-summary: vmvault, self-hosted Azure Backup for Linux VMs.
long-summary: |
    Start the local stack with 'vmvault up', then use the az-style groups below:
    'vmvault group|storage account|vm ...' for the fabric and 'vmvault backup ...' for
    vaults, protection, jobs, recovery points and restore.
"""


class Loader(CLICommandsLoader):
    def load_command_table(self, args: Any) -> OrderedDict[str, Any]:
        for name in COMMAND_MODULES:
            importlib.import_module(f"vmvault.cli.commands.{name}").load_commands(self)
        return super().load_command_table(args)

    def load_arguments(self, command: str) -> None:
        for name in COMMAND_MODULES:
            module = importlib.import_module(f"vmvault.cli.commands.{name}")
            if hasattr(module, "load_arguments"):
                module.load_arguments(self)
        super().load_arguments(command)


class VmvaultCLI(CLI):
    def get_cli_version(self) -> str:
        return __version__

    def exception_handler(self, ex: BaseException) -> int:
        if isinstance(ex, VmvaultError):
            print(f"ERROR: ({ex.code}) {ex.message}\nCode: {ex.code}\nMessage: {ex.message}\n"
                  f"Recommended action: {ex.action}", file=sys.stderr)
            return 3 if ex.http_status == 404 else 1
        return int(super().exception_handler(ex))


def cli() -> VmvaultCLI:
    return VmvaultCLI(cli_name="vmvault", config_env_var_prefix="VMVAULT",
                      commands_loader_cls=Loader, help_cls=CLIHelp)


def main(argv: list[str] | None = None) -> None:
    code = cli().invoke(sys.argv[1:] if argv is None else argv)
    sys.exit(code)


if __name__ == "__main__":
    main()
