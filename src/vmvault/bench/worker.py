"""vmvault's side of the benchmark, run in its own process like the peers.

    python -m vmvault.bench.worker init    --repo R [--chunk-size N]
    python -m vmvault.bench.worker backup  --repo R --rp-id ID --store S --account A
                                           --container C --blob B --snapshot SNAP
                                           [--prev-snapshot P --parent ID]
    python -m vmvault.bench.worker restore --repo R --rp-id ID --target FILE

A backup reads the blob's snapshot from the disk store and asks the store for
its data ranges, and for an incremental the ranges changed since the previous
snapshot, as the product's backup job does. The password comes from
``$VMVAULT_BENCH_PASSWORD``. The last line of stdout is a JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

DISK_NAME = "osdisk"


def _password() -> str:
    return os.environ.get("VMVAULT_BENCH_PASSWORD", "vmvault-bench-password")


def _stats_dict(stats: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return dataclasses.asdict(stats)
    if isinstance(stats, dict):
        return stats
    return {k: v for k, v in vars(stats).items() if not k.startswith("_")}


def cmd_init(args: argparse.Namespace) -> dict[str, Any]:
    from vmvault.vault import Repository

    kwargs: dict[str, Any] = {"password": _password()}
    if args.chunk_size:
        kwargs["chunk_size"] = args.chunk_size
    repo = Repository.create(Path(args.repo), **kwargs)
    close = getattr(repo, "close", None)
    if callable(close):
        close()
    return {"repo": args.repo, "chunk_size": args.chunk_size}


def _ranges(value: Any) -> list[tuple[int, int]]:
    return [(int(o), int(n)) for o, n in value]


def cmd_backup(args: argparse.Namespace) -> dict[str, Any]:
    from vmvault.storage.diskstore import DiskStore
    from vmvault.vault import DiskSource, Repository

    t0 = time.perf_counter()
    store = DiskStore(Path(args.store))
    a, c, b = args.account, args.container, args.blob
    path = store.blob_path(a, c, b, snapshot=args.snapshot)
    size = path.stat().st_size
    data = _ranges(store.data_ranges(a, c, b, snapshot=args.snapshot))
    changed = None
    if args.prev_snapshot:
        changed = _ranges(store.changed_ranges(a, c, b, args.snapshot, args.prev_snapshot))
    t_ranges = time.perf_counter() - t0
    repo = Repository.open(Path(args.repo), password=_password())
    disk = DiskSource(DISK_NAME, size, path, data_ranges=data, changed_ranges=changed)
    t1 = time.perf_counter()
    stats = repo.backup(args.rp_id, [disk], parent=args.parent or None)
    t_backup = time.perf_counter() - t1
    close = getattr(repo, "close", None)
    if callable(close):
        close()
    return {
        "stats": _stats_dict(stats),
        "ranges_s": t_ranges,
        "backup_s": t_backup,
        "data_bytes": sum(n for _, n in data),
        "changed_bytes": None if changed is None else sum(n for _, n in changed),
        "changed_extents": None if changed is None else len(changed),
    }


def cmd_restore(args: argparse.Namespace) -> dict[str, Any]:
    from vmvault.vault import Repository

    repo = Repository.open(Path(args.repo), password=_password())
    t0 = time.perf_counter()
    written = repo.restore_disk(args.rp_id, DISK_NAME, Path(args.target))
    seconds = time.perf_counter() - t0
    close = getattr(repo, "close", None)
    if callable(close):
        close()
    return {"written": written, "restore_s": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmvault.bench.worker")
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("init")
    pi.add_argument("--repo", required=True)
    pi.add_argument("--chunk-size", type=int, default=0)
    pb = sub.add_parser("backup")
    pb.add_argument("--repo", required=True)
    pb.add_argument("--rp-id", required=True)
    pb.add_argument("--store", required=True)
    pb.add_argument("--account", required=True)
    pb.add_argument("--container", required=True)
    pb.add_argument("--blob", required=True)
    pb.add_argument("--snapshot", required=True)
    pb.add_argument("--prev-snapshot", default="")
    pb.add_argument("--parent", default="")
    pr = sub.add_parser("restore")
    pr.add_argument("--repo", required=True)
    pr.add_argument("--rp-id", required=True)
    pr.add_argument("--target", required=True)
    args = p.parse_args(argv)
    handler = {"init": cmd_init, "backup": cmd_backup, "restore": cmd_restore}[args.cmd]
    result = handler(args)
    sys.stdout.write(json.dumps(result, default=str) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
