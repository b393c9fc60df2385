"""``python -m vmvault.extensions.vmsnapshot <install|enable|disable|update|uninstall>``, run
by the VM agent from the handler folder (see handle.py for the environment it reads)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    sys.dont_write_bytecode = True  # never write .pyc files, least of all while frozen
    args = sys.argv[1:] if argv is None else argv
    from vmvault.extensions.vmsnapshot.handle import COMMANDS, run

    if len(args) != 1 or args[0].lstrip("-").lower() not in COMMANDS:
        print(f"usage: python -m vmvault.extensions.vmsnapshot {{{'|'.join(COMMANDS)}}}",
              file=sys.stderr)
        return 2
    return run(args[0].lstrip("-").lower(), Path.cwd(), os.environ)


if __name__ == "__main__":
    sys.exit(main())
