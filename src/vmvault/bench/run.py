"""``vmvault-bench``: vmvault vs restic vs borg on one generated disk image.

Full backup, incremental backup after a 1% scattered rewrite, restore; a
memory check on a sparse 64 GiB disk; optionally a chunk-size sweep of
vmvault alone. Prints a rich table and writes docs/benchmarks.md.
See docs/benchmarks.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from vmvault.bench import gen
from vmvault.bench.measure import RunResult, drop_caches, tree_size
from vmvault.bench.peers import Borg, Peer, Restic, tool_version
from vmvault.bench.report import (
    PEERS,
    PHASES,
    Measurement,
    Results,
    SparseResult,
    SweepRow,
    combine,
    fmt_chunk,
    human,
    render_markdown,
    render_rich,
)
from vmvault.bench.vmv import (
    Image,
    Pool,
    Vmvault,
    describe_exception,
    open_pool,
    store_problem,
    vault_problem,
)

DROP_CMD = "sync; echo 3 > /proc/sys/vm/drop_caches"


def parse_size(text: str) -> int:
    """'64K', '1M', '4M', '1G', '65536' -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    value = int(float(t) * mult)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return value


def parse_sizes(text: str) -> list[int]:
    try:
        return [parse_size(p) for p in text.split(",") if p.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmvault-bench",
        description="Benchmark vmvault against restic and borg on one generated disk image.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--size-gib", type=float, default=4.0, help="image size (default 4)")
    size.add_argument("--size-mib", type=int, help="image size in MiB (overrides --size-gib)")
    p.add_argument("--seed", type=int, default=1, help="generator seed (default 1)")
    p.add_argument(
        "--zeros",
        choices=("holes", "written"),
        default="holes",
        help="leave the 30%% zero regions as holes (default) or write them",
    )
    p.add_argument("--workdir", type=Path, default=Path("bench-work"))
    p.add_argument("--keep", action="store_true", help="keep the work dir afterwards")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every measurement, fresh repositories each round; the report gives "
        "the median (default 1)",
    )
    p.add_argument(
        "--report",
        default="docs/benchmarks.md",
        help="Markdown report to write ('' for none; default docs/benchmarks.md)",
    )
    p.add_argument("--json", default="", help="also write the results as JSON here")
    p.add_argument(
        "--peers", default="restic,borg", help="peers to run, comma-separated (default both)"
    )
    p.add_argument("--chunk-size", type=parse_size, default=None, help="vmvault chunk size")
    p.add_argument(
        "--chunk-sizes",
        type=parse_sizes,
        default=[],
        help="also sweep vmvault over these chunk sizes, e.g. 64K,128K,256K,1M,4M",
    )
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument("--sweep-size-gib", type=float, help="sweep image size (default: --size)")
    sweep.add_argument("--sweep-size-mib", type=int)
    p.add_argument("--sparse-gib", type=float, default=64.0, help="memory check disk (64)")
    p.add_argument(
        "--sparse-data-mib", type=int, default=256, help="data in the sparse disk (256 MiB)"
    )
    p.add_argument("--no-sparse", action="store_true", help="skip the memory check")
    p.add_argument("--freeze-backups", type=int, default=50,
                   help="backups of a lab VM for the freeze-window check (default 50; 0 skips "
                        "it; needs root)")
    p.add_argument("--freeze-disks", type=int, default=4,
                   help="data disks of that VM (default 4)")
    p.add_argument(
        "--no-drop-caches", action="store_true", help=f"do not run '{DROP_CMD}' between runs"
    )
    return p


def _mib_size(gib: float | None, mib: int | None, default: int) -> int:
    if mib is not None:
        n = mib * gen.MiB
    elif gib is not None:
        n = int(gib * gen.GiB)
    else:
        n = default
    n -= n % gen.REGION
    if n < 8 * gen.MiB:
        raise SystemExit("vmvault-bench: the image must be at least 8 MiB")
    return n


# --- the machine --------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def machine_info(pool: Pool, drop_note: str, self_load: str) -> dict[str, str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read("/proc/cpuinfo").splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    mem = next(
        (
            int(line.split()[1]) * 1024
            for line in _read("/proc/meminfo").splitlines()
            if line.startswith("MemTotal:")
        ),
        0,
    )
    osname = next(
        (
            line.split("=", 1)[1].strip().strip('"')
            for line in _read("/etc/os-release").splitlines()
            if line.startswith("PRETTY_NAME=")
        ),
        platform.system(),
    )
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    from vmvault import __version__ as vmv_version  # type: ignore[attr-defined,unused-ignore]

    return {
        "CPUs (nproc)": str(len(os.sched_getaffinity(0))),
        "CPU model": cpu,
        "Memory": human(mem),
        "Kernel": platform.release(),
        "OS": osname,
        "Python": platform.python_version(),
        "restic": tool_version("restic"),
        "borg": tool_version("borg"),
        "vmvault": f"{vmv_version}" + (f" (commit {rev})" if rev else ""),
        "Load average (1/5/15 min)": self_load,
        "Work file system": pool.fs,
        "Page cache": drop_note,
    }


# --- the run ------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, argv: list[str], console: Console) -> None:
        self.args = args
        self.console = console
        self.size = _mib_size(args.size_gib, args.size_mib, 4 * gen.GiB)
        if args.sweep_size_gib is None and args.sweep_size_mib is None:
            self.sweep_size = self.size
        else:
            self.sweep_size = _mib_size(args.sweep_size_gib, args.sweep_size_mib, self.size)
        self.workdir: Path = args.workdir.resolve()
        self.results = Results(
            command="vmvault-bench " + shlex.join(argv),
            started=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        )
        self.drop_problem: str | None = None
        self.pool: Pool | None = None
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.vmvault_problem: str | None = vault_problem() or store_problem()
        self._sweep_image: tuple[Image, str, str] | None = None
        self.load_at_start = " ".join(_read("/proc/loadavg").split()[:3]) or "unknown"

    # -- helpers

    def log(self, text: str) -> None:
        self.progress.console.print(text)

    @contextlib.contextmanager
    def step(self, description: str, total: int | None = None) -> Iterator[TaskID]:
        task = self.progress.add_task(description, total=total)
        try:
            yield task
        finally:
            self.progress.update(task, completed=total or 1, total=total or 1)
            self.progress.stop_task(task)

    def drop(self) -> None:
        if self.args.no_drop_caches:
            return
        problem = drop_caches()
        if problem and not self.drop_problem:
            self.drop_problem = problem
            self.log(f"[yellow]could not drop the page cache: {problem}[/]")

    def timed(
        self, tool: str, phase: str, logical: int, fn: Callable[[], RunResult], repo: Path | None
    ) -> Measurement:
        m = Measurement(tool, phase, logical_bytes=logical)
        before = tree_size(repo) if repo is not None and repo.exists() else 0
        self.drop()
        with self.step(f"{phase:<11} {tool}"):
            try:
                res = fn()
            except Exception as e:
                m.note = f"failed: {describe_exception(e)}"[:300]
                self.log(f"[red]{tool} {phase} failed:[/] {describe_exception(e)}")
                return m
        m.seconds = res.seconds
        m.cpu_s = res.cpu_seconds
        m.peak_rss = res.peak_rss
        if repo is not None:
            m.added = tree_size(repo) - before
        self.log(
            f"  {phase:<11} {tool:<8} {m.seconds:8.2f} s {m.mbps or 0:9.1f} MB/s"
            f" (CPU {m.cpu_s:.1f} s)"
            + (f"  +{human(m.added)}" if m.added is not None else "")
            + f"  peak RSS {human(m.peak_rss)}"
        )
        return m

    def make_image(self, name: str, size: int) -> Image:
        assert self.pool is not None
        image = Image(self.pool, name, size)
        spec = gen.ImageSpec(size, self.args.seed)
        with self.step(f"generate {human(size)} image {name}", total=size) as task:
            gen.write_image(
                image.path,
                spec,
                zeros=self.args.zeros,
                progress=lambda n: self.progress.advance(task, n),
            )
        fd = os.open(image.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return image

    def rewrite(self, image: Image) -> tuple[int, int]:
        offsets = gen.rewrite_plan(image.size, self.args.seed)
        with self.step(f"rewrite {len(offsets)} x 64 KiB in {image.name}"):
            written = gen.apply_rewrites(image.path, offsets, self.args.seed)
        return len(offsets), written

    def verify(self, restored: Path, expected: str, size: int) -> str | None:
        if not restored.is_file():
            return f"restored file not found at {restored}"
        if restored.stat().st_size != size:
            return f"restored file has {restored.stat().st_size} bytes, not {size}"
        with self.step(f"verify {restored.name}"):
            digest = gen.file_digest(restored)
        if digest != expected:
            return "restored data differ from the image"
        return None

    # -- the phases

    def run(self) -> Results:
        t_start = time.perf_counter()
        r = self.results
        with self.progress:
            self.log(f"[bold]vmvault-bench[/]: {human(self.size)} image, work dir {self.workdir}")
            self.workdir.mkdir(parents=True, exist_ok=True)
            with self.step("set up the pool"):
                self.pool = open_pool(self.workdir)
            pool = self.pool
            self.log(f"  work file system: {pool.fs} ({pool.note})")
            if pool.base.exists():
                shutil.rmtree(pool.base)
            pool.base.mkdir(parents=True)
            if self.vmvault_problem:
                self.log(f"[yellow]vmvault is NOT measured: {self.vmvault_problem}[/]")
            self.main_comparison(pool)
            if not self.args.no_sparse:
                self.sparse_check(pool)
            if self.args.chunk_sizes:
                self.chunk_sweep(pool)
            if self.args.freeze_backups > 0:
                self.freeze_check()
        if self.args.no_drop_caches:
            drop_note = "not dropped (--no-drop-caches)"
        elif self.drop_problem:
            drop_note = f"could not be dropped ({self.drop_problem})"
        else:
            drop_note = f"dropped before every timed run (`{DROP_CMD}`, as root)"
        load_end = " ".join(_read("/proc/loadavg").split()[:3]) or "unknown"
        r.machine = machine_info(
            pool, drop_note, f"{self.load_at_start} at the start, {load_end} at the end"
        )
        r.elapsed_s = time.perf_counter() - t_start
        r.complete = True
        return r

    def main_comparison(self, pool: Pool) -> None:
        r = self.results
        size = self.size
        peer_classes: list[tuple[str, Callable[[Path], Peer]]] = []
        for name in [p.strip() for p in self.args.peers.split(",") if p.strip()]:
            cls: Callable[[Path], Peer] | None = {"restic": Restic, "borg": Borg}.get(name)
            if cls is None:
                raise SystemExit(f"vmvault-bench: unknown peer {name!r}")
            if not cls(pool.base / name).available():
                r.notes.append(f"{name} is not installed: not measured.")
                continue
            peer_classes.append((name, cls))

        # The image, its snapshot before the first backup, the 1% rewrite, the snapshot after.
        image = self.make_image("disk0.img", size)
        composition = self.describe_image(image)
        snap1 = image.snapshot()
        n_writes, written = self.rewrite(image)
        snap2 = image.snapshot()
        with self.step("hash the image"):
            expected = gen.file_digest(image.snapshot_path(snap2))

        runs: dict[tuple[str, str], list[Measurement]] = {}
        for rep in range(self.args.repeat):
            if self.args.repeat > 1:
                self.log(f"[bold]round {rep + 1} of {self.args.repeat}[/]")
            self._round(pool, image, snap1, snap2, expected, peer_classes, runs)
        for phase in PHASES:
            for tool in ["vmvault"] + [name for name, _ in peer_classes]:
                if (tool, phase) in runs:
                    r.measurements.append(combine(runs[(tool, phase)]))

        pct = 100 * written / size
        r.workload["description"] = [
            *composition,
            f"Incremental: {n_writes} writes of 64 KiB of new random data at random 4 KiB-aligned, "
            f"non-overlapping offsets ({human(written)}, {pct:.2f}% of the image), done in "
            "place with os.pwrite so the rest of the file keeps its extents.",
            self._layout_text(pool, image.store is not None),
            "Commands: `restic init --repository-version 2`, `restic --compression auto backup "
            "--host vmvault-bench FILE`, `restic restore latest --target DIR` then `sync FILE` "
            "(RESTIC_PASSWORD set); `borg init --encryption=repokey-blake2`, `borg create "
            "--compression zstd,3 REPO::NAME FILE`, `borg extract --sparse` then `sync FILE` "
            "(BORG_PASSPHRASE set); vmvault: "
            "`python -m vmvault.bench.worker backup|restore ...` (Repository.backup / "
            "restore_disk, password-protected repository"
            + (
                f", chunk size {fmt_chunk(self.args.chunk_size)}"
                if self.args.chunk_size
                else f", default chunk size{self._default_chunk()}"
            )
            + ").",
            "Restore: each tool restores its latest (the incremental) backup to a new file on the "
            "same file system; the file is then compared with the image (BLAKE3) outside the "
            "timing. restic 0.14 has no sparse restore, so it writes the zero regions out. "
            "Every restore is timed until its data are durable: vmvault's restore_disk fsyncs "
            "the restored file before it returns, and `restic restore` and `borg extract` are "
            "each followed by `sync FILE` (an fsync of the restored file), timed with the "
            "command (seconds and CPU added up).",
        ]
        r.workload.update(
            {
                "size": size,
                "seed": self.args.seed,
                "repeat": self.args.repeat,
                "zeros": self.args.zeros,
                "rewrites": n_writes,
                "rewritten_bytes": written,
            }
        )
        if self.sweep_size == size and self.args.chunk_sizes:
            self._sweep_image = (image, snap1, snap2)
        else:
            image.delete()

    def _round(
        self,
        pool: Pool,
        image: Image,
        snap1: str,
        snap2: str,
        expected: str,
        peer_classes: list[tuple[str, Callable[[Path], Peer]]],
        runs: dict[tuple[str, str], list[Measurement]],
    ) -> None:
        """Fresh repositories; full, incremental, restore with each tool; repositories deleted."""
        size = self.size
        p1, p2 = image.snapshot_path(snap1), image.snapshot_path(snap2)

        def add(m: Measurement) -> None:
            runs.setdefault((m.tool, m.phase), []).append(m)

        vmv: Vmvault | None = None
        if self.vmvault_problem is None and pool.store_root is not None:
            vmv = Vmvault(pool.base / "vmvault", pool.store_root, self.args.chunk_size)
        peers = [cls(pool.base / name) for name, cls in peer_classes]
        homes = [p.home for p in peers] + ([vmv.home] if vmv else [])
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)
        with self.step("initialise repositories"):
            for peer in peers:
                peer.init()
            if vmv is not None:
                try:
                    vmv.init()
                except Exception as e:
                    self.vmvault_problem = f"vmvault init failed: {describe_exception(e)}"
                    self.log(f"[red]{self.vmvault_problem}[/]")
                    vmv = None
        if vmv is None:
            for phase in PHASES:
                add(
                    Measurement(
                        "vmvault", phase, size, note=f"not yet measured: {self.vmvault_problem}"
                    )
                )

        # full backup of the first snapshot
        if vmv is not None:
            m = self.timed(
                "vmvault",
                "full",
                size,
                partial(vmv.backup, "rp-full", image, snap1, None, None),
                vmv.repo,
            )
            self._vmv_details(m, vmv.last_info, incremental=False)
            add(m)
        for peer in peers:
            add(self.timed(peer.name, "full", size, partial(peer.backup, p1), peer.repo))

        # incremental: the second snapshot (vmvault reads the changed ranges only)
        if vmv is not None:
            m = self.timed(
                "vmvault",
                "incremental",
                size,
                partial(vmv.backup, "rp-incr", image, snap2, snap1, "rp-full"),
                vmv.repo,
            )
            self._vmv_details(m, vmv.last_info, incremental=True)
            add(m)
        for peer in peers:
            add(self.timed(peer.name, "incremental", size, partial(peer.backup, p2), peer.repo))

        # restore of the latest backup (the incremental), checked outside the timing
        restore_root = pool.base / "restore"
        if vmv is not None:
            target = restore_root / "vmvault" / "disk0.img"
            m = self.timed(
                "vmvault", "restore", size, partial(vmv.restore, "rp-incr", target), None
            )
            if m.measured and vmv.last_info.get("restore_s") is not None:
                m.note = f"in process: restore_disk {vmv.last_info['restore_s']:.2f} s"
            add(self._checked(m, target, expected, size))
            shutil.rmtree(restore_root / "vmvault", ignore_errors=True)
        for peer in peers:
            where: list[Path] = []

            def do_restore(p: Peer = peer, where: list[Path] = where) -> RunResult:
                res, path = p.restore(restore_root / p.name, p2)
                where.append(path)
                return res

            m = self.timed(peer.name, "restore", size, do_restore, None)
            if where:
                m = self._checked(m, where[0], expected, size)
            add(m)
            shutil.rmtree(restore_root / peer.name, ignore_errors=True)
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)

    def _default_chunk(self) -> str:
        try:
            from vmvault.vault import DEFAULT_CHUNK_SIZE

            return f" ({fmt_chunk(int(DEFAULT_CHUNK_SIZE))})"
        except Exception:
            return ""

    def _layout_text(self, pool: Pool, blob: bool) -> str:
        if blob:
            return (
                f"The image is a page blob in vmvault's disk store on {pool.fs}; it is "
                "snapshotted (a reflink copy) before the first backup and again after the "
                "writes. vmvault backs up the snapshots, reading only the store's data ranges "
                "and, for the incremental, the ranges changed between the two snapshots, as the "
                "product does. restic and borg back up the same snapshot files (the first for "
                "the full backup, the second for the incremental); a changed file is read and "
                "chunked whole by both, whatever its path. All repositories, caches and restore "
                "targets are on the same file system."
            )
        return (
            f"The image is a plain file on {pool.fs} (vmvault's disk store was not available), "
            "copied before the first backup and after the writes; the tools back up the copies. "
            "All repositories, caches and restore targets are on the same file system."
        )

    def _vmv_details(self, m: Measurement, info: dict[str, Any], incremental: bool) -> None:
        if not m.measured:
            return
        m.note = self._vmv_note(info, incremental)
        m.scanned = (info.get("stats") or {}).get("bytes_scanned")

    def _vmv_note(self, info: dict[str, Any], incremental: bool) -> str:
        stats = info.get("stats") or {}
        parts = []
        if incremental and info.get("changed_bytes") is not None:
            parts.append(
                f"changed ranges {human(info['changed_bytes'])} in {info.get('changed_extents')} "
                "extents"
            )
        elif info.get("data_bytes") is not None:
            parts.append(f"data ranges {human(info['data_bytes'])}")
        if info.get("backup_s") is not None:
            parts.append(
                f"in process: ranges {info.get('ranges_s', 0):.2f} s, "
                f"Repository.backup {info['backup_s']:.2f} s"
            )
        if stats.get("bytes_scanned") is not None:
            parts.append(f"read {human(stats['bytes_scanned'])}")
        if "chunks_new" in stats:
            parts.append(
                f"{stats['chunks_new']} new / {stats.get('chunks_reused', 0)} reused chunks"
            )
        return "; ".join(parts)

    def _checked(self, m: Measurement, path: Path, expected: str, size: int) -> Measurement:
        if not m.measured:
            return m
        problem = self.verify(path, expected, size)
        if problem:
            self.log(f"[red]{m.tool} restore is wrong: {problem}[/]")
            return Measurement(
                m.tool,
                m.phase,
                m.logical_bytes,
                note=f"INVALID ({problem}); took {m.seconds:.2f} s",
            )
        m.note = (m.note + "; " if m.note else "") + "verified"
        return m

    def describe_image(self, image: Image) -> list[str]:
        import zstandard

        spec = gen.ImageSpec(image.size, self.args.seed)
        kinds = spec.kinds()
        n = len(kinds)
        frac = {k: kinds.count(k) / n for k in (gen.RANDOM, gen.TEXT, gen.ZERO)}
        cctx = zstandard.ZstdCompressor(level=3)
        ratios = {}
        for kind in (gen.RANDOM, gen.TEXT):
            idx = [i for i, k in enumerate(kinds) if k == kind][:16]
            raw = sum(gen.REGION for _ in idx)
            packed = sum(len(cctx.compress(spec.region(i, kind) or b"")) for i in idx)
            ratios[kind] = packed / raw if raw else 0.0
        zero_how = "left as holes (a thin page blob)" if self.args.zeros == "holes" else "written"
        return [
            f"Image: {human(image.size)} ({n} regions of 1 MiB) generated from seed "
            f"{self.args.seed}, regions shuffled: {frac[gen.RANDOM]:.0%} incompressible "
            f"(BLAKE3 output; zstd -3 leaves {ratios[gen.RANDOM]:.0%}), {frac[gen.TEXT]:.0%} "
            f"text (zstd -3 leaves {ratios[gen.TEXT]:.0%}), {frac[gen.ZERO]:.0%} zeros, "
            f"{zero_how}. Every region is unique (no cross-region deduplication).",
        ]

    def sparse_check(self, pool: Pool) -> None:
        size = _mib_size(self.args.sparse_gib, None, 64 * gen.GiB)
        data = self.args.sparse_data_mib * gen.MiB
        result = SparseResult(size=size, data_bytes=data)
        self.results.sparse = result
        if self.vmvault_problem or pool.store_root is None:
            result.note = self.vmvault_problem or "no disk store"
            return
        image = Image(pool, "sparse.img", size)
        try:
            with self.step(f"write {human(data)} into a {human(size)} sparse blob"):
                result.data_bytes = gen.write_sparse(image.path, size, data, self.args.seed)
            snap = image.snapshot()
            assert snap
            vmv = Vmvault(pool.base / "vmvault-sparse", pool.store_root, self.args.chunk_size)
            vmv.init()
            m = self.timed(
                "vmvault",
                f"{human(size)} sparse",
                size,
                lambda: vmv.backup("rp-sparse", image, snap, None, None),
                vmv.repo,
            )
            result.seconds, result.peak_rss, result.added = m.seconds, m.peak_rss, m.added
            if not m.measured:
                result.note = m.note
            shutil.rmtree(vmv.home, ignore_errors=True)
        except Exception as e:
            result.note = f"failed: {describe_exception(e)}"
            self.log(f"[red]sparse check failed: {result.note}[/]")
        finally:
            image.delete()

    def freeze_check(self) -> None:
        """The VMSnapshot extension's freeze window over many backups (bench/freeze.py)."""
        from vmvault.bench.freeze import run_freeze

        n = self.args.freeze_backups
        home = self.workdir / "freeze-home"
        if home.exists():
            shutil.rmtree(home, ignore_errors=True)
        with self.step(f"freeze window: {n} backups", total=n) as task:
            result = run_freeze(home, n, self.args.freeze_disks,
                                lambda i, _n: self.progress.update(task, completed=i))
        self.results.freeze = result
        if result.error:
            self.log(f"  freeze window not measured: {result.error}")
        else:
            self.log(f"  freeze window p50 {result.percentile(50):.0f} ms, "
                     f"p99 {result.percentile(99):.0f} ms over {len(result.windows_ms)} backups")
        shutil.rmtree(home, ignore_errors=True)

    def chunk_sweep(self, pool: Pool) -> None:
        r = self.results
        size = self.sweep_size
        r.sweep_size = size
        if self.vmvault_problem or pool.store_root is None:
            note = f"not yet measured: {self.vmvault_problem or 'no disk store'}"
            for cs in self.args.chunk_sizes:
                empty = [Measurement("vmvault", ph, size, note=note) for ph in ("f", "i", "r")]
                r.sweep.append(SweepRow(cs, *empty))
            return
        own_image = self._sweep_image is None
        if self._sweep_image is not None:
            image, snap1, snap2 = self._sweep_image
        else:
            image = self.make_image("sweep.img", size)
            snap1 = image.snapshot()
            self.rewrite(image)
            snap2 = image.snapshot()
        with self.step("hash the sweep image"):
            expected = gen.file_digest(image.snapshot_path(snap2))
        got: dict[int, list[list[Measurement]]] = {cs: [[], [], []] for cs in self.args.chunk_sizes}
        try:
            for rep in range(self.args.repeat):
                if self.args.repeat > 1:
                    self.log(f"[bold]sweep round {rep + 1} of {self.args.repeat}[/]")
                for cs in self.args.chunk_sizes:
                    for lst, m in zip(
                        got[cs],
                        self._sweep_one(pool, image, snap1, snap2, cs, expected),
                        strict=True,
                    ):
                        lst.append(m)
        finally:
            if own_image:
                image.delete()
        for cs in self.args.chunk_sizes:
            full, incr, rest = (combine(ms) for ms in got[cs])
            r.sweep.append(SweepRow(cs, full, incr, rest))
        measured = [row for row in r.sweep if row.full.measured and row.incremental.measured]
        if measured:
            fastest = max(measured, key=lambda row: row.full.mbps or 0)
            smallest = min(measured, key=lambda row: row.incremental.added or 0)
            r.notes.append(
                f"Sweep: fastest full backup at {fmt_chunk(fastest.chunk_size)} "
                f"({fastest.full.mbps or 0:.1f} MB/s); smallest incremental at "
                f"{fmt_chunk(smallest.chunk_size)} ({human(smallest.incremental.added)})."
            )

    def _sweep_one(
        self, pool: Pool, image: Image, snap1: str, snap2: str, cs: int, expected: str
    ) -> tuple[Measurement, Measurement, Measurement]:
        size = self.sweep_size
        assert pool.store_root is not None
        vmv = Vmvault(pool.base / f"sweep-{fmt_chunk(cs)}", pool.store_root, cs)
        shutil.rmtree(vmv.home, ignore_errors=True)
        label = f"vmvault {fmt_chunk(cs)}"
        try:
            vmv.init()
        except Exception as e:
            note = f"init failed: {describe_exception(e)}"
            f, i, r = (Measurement(label, ph, size, note=note) for ph in PHASES)
            return f, i, r
        full = self.timed(
            label, "full", size, partial(vmv.backup, "rp-full", image, snap1, None, None), vmv.repo
        )
        incr = self.timed(
            label,
            "incremental",
            size,
            partial(vmv.backup, "rp-incr", image, snap2, snap1, "rp-full"),
            vmv.repo,
        )
        self._vmv_details(incr, vmv.last_info, incremental=True)
        target = vmv.home / "restore.img"
        rest = self.timed(label, "restore", size, partial(vmv.restore, "rp-incr", target), None)
        rest = self._checked(rest, target, expected, size)
        shutil.rmtree(vmv.home, ignore_errors=True)
        return full, incr, rest

    # -- cleanup

    def cleanup(self) -> None:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if self.pool is not None:
                problem = self.pool.release()
                if problem:
                    self.console.print(f"[red]{problem}[/]")
            if self.args.keep:
                self.console.print(f"work dir kept: {self.workdir}")
                return
            mounted = _mounts_under(self.workdir)
            if mounted:
                self.console.print(
                    f"[red]not removing {self.workdir}: still mounted: {', '.join(mounted)}[/]"
                )
                return
            shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, previous)


def _mounts_under(path: Path) -> list[str]:
    real = os.path.realpath(path).rstrip("/") + "/"
    out = []
    for line in _read("/proc/self/mounts").splitlines():
        parts = line.split()
        if len(parts) > 1 and (parts[1] + "/").startswith(real):
            out.append(parts[1])
    return out


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    console = Console() if sys.stdout.isatty() else Console(width=120)
    bench = Bench(args, argv, console)
    old_term = signal.signal(signal.SIGTERM, _sigterm)
    try:
        results = bench.run()
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 130
    except Exception:
        console.print_exception()
        return 2
    finally:
        bench.cleanup()
        signal.signal(signal.SIGTERM, old_term)
    render_rich(results, console)
    if args.report:
        path = Path(args.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_markdown(results))
        console.print(f"report written to {path}")
    if args.json:
        Path(args.json).write_text(results.to_json())
    if any(t.status == "FAIL" for t in _targets(results)):
        console.print("[yellow]some targets were missed (see above)[/]")
    return 0


def _targets(results: Results) -> list[Any]:
    from vmvault.bench.report import targets

    return targets(results)


__all__ = ["main", "PEERS"]
