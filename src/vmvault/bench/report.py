"""Results of a benchmark run, the ratios and targets drawn from them, and their rendering
(a rich table in the terminal, Markdown for docs/benchmarks.md, JSON)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.table import Table

from vmvault.bench.freeze import TARGET_P99_MS, FreezeResult
from vmvault.bench.freeze import markdown as freeze_markdown

TOOLS = ("vmvault", "restic", "borg")
PEERS = ("restic", "borg")
PHASES = ("full", "incremental", "restore")
PHASE_TITLES = {"full": "Full backup", "incremental": "Incremental backup", "restore": "Restore"}
MB = 1_000_000
MiB = 1 << 20
RSS_TARGET = 300 * MiB

PASS, FAIL, UNMEASURED = "PASS", "FAIL", "NOT MEASURED"


@dataclass
class Measurement:
    tool: str
    phase: str
    logical_bytes: int = 0
    seconds: float | None = None
    cpu_s: float | None = None  # user + system CPU seconds
    added: int | None = None  # bytes the repository grew by (backups only)
    peak_rss: int | None = None
    note: str = ""  # why it was not measured, or a remark
    scanned: int | None = None  # bytes the tool says it read (vmvault's bytes_scanned)
    runs: list[float] = field(default_factory=list)  # seconds of each repetition

    @property
    def measured(self) -> bool:
        return self.seconds is not None

    @property
    def mbps(self) -> float | None:
        if self.seconds is None or self.seconds <= 0:
            return None
        return self.logical_bytes / self.seconds / MB


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def combine(ms: list[Measurement]) -> Measurement:
    """One measurement from repetitions: median seconds, CPU and bytes added, largest RSS."""
    done = [m for m in ms if m.measured]
    if len(done) < len(ms):  # a failed or wrong run voids the result
        bad = next(m for m in ms if not m.measured)
        note = bad.note if len(ms) == 1 else f"{len(ms) - len(done)} of {len(ms)} runs: {bad.note}"
        return Measurement(bad.tool, bad.phase, bad.logical_bytes, note=note)
    first = done[0]
    out = Measurement(first.tool, first.phase, first.logical_bytes, note=first.note)
    out.runs = [m.seconds for m in done if m.seconds is not None]
    out.seconds = _median(out.runs)
    cpus = [m.cpu_s for m in done if m.cpu_s is not None]
    out.cpu_s = _median(cpus) if cpus else None
    added = [float(m.added) for m in done if m.added is not None]
    out.added = round(_median(added)) if added else None
    scanned = [float(m.scanned) for m in done if m.scanned is not None]
    out.scanned = round(_median(scanned)) if scanned else None
    out.peak_rss = max((m.peak_rss for m in done if m.peak_rss is not None), default=None)
    if len(out.runs) > 1:
        spread = f"{len(out.runs)} runs: {min(out.runs):.2f}-{max(out.runs):.2f} s"
        out.note = f"{spread}; {out.note}" if out.note else spread
    return out


@dataclass
class SweepRow:
    chunk_size: int
    full: Measurement
    incremental: Measurement
    restore: Measurement


@dataclass
class SparseResult:
    size: int
    data_bytes: int
    seconds: float | None = None
    peak_rss: int | None = None
    added: int | None = None
    note: str = ""


@dataclass
class Results:
    command: str = ""
    started: str = ""
    elapsed_s: float = 0.0
    machine: dict[str, str] = field(default_factory=dict)
    workload: dict[str, Any] = field(default_factory=dict)
    measurements: list[Measurement] = field(default_factory=list)
    sweep_size: int = 0
    sweep: list[SweepRow] = field(default_factory=list)
    sparse: SparseResult | None = None
    freeze: FreezeResult | None = None
    notes: list[str] = field(default_factory=list)
    complete: bool = False

    def get(self, tool: str, phase: str) -> Measurement | None:
        for m in self.measurements:
            if m.tool == tool and m.phase == phase:
                return m
        return None

    def to_json(self) -> str:
        data = asdict(self)
        data["ratios"] = [
            {"name": name, "peer": peer, "value": value}
            for name, per_peer in ratios(self)
            for peer, value in per_peer.items()
        ]
        data["targets"] = [asdict(t) for t in targets(self)]
        return json.dumps(data, indent=2)


# --- ratios and targets -------------------------------------------------------


def _div(a: float | int | None, b: float | int | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def ratio(results: Results, metric: str, phase: str, peer: str) -> float | None:
    """vmvault ÷ peer for one metric ("speed", "added" or "rss") of one phase."""
    v, p = results.get("vmvault", phase), results.get(peer, phase)
    if v is None or p is None or not v.measured or not p.measured:
        return None
    if metric == "speed":
        return _div(v.mbps, p.mbps)
    if metric == "added":
        return _div(v.added, p.added)
    if metric == "rss":
        return _div(v.peak_rss, p.peak_rss)
    raise ValueError(metric)


RATIO_ROWS = [
    ("Full backup throughput", "speed", "full"),
    ("Incremental backup speed", "speed", "incremental"),
    ("Incremental bytes added", "added", "incremental"),
    ("Full backup bytes added", "added", "full"),
    ("Restore throughput", "speed", "restore"),
    ("Peak RSS, full backup", "rss", "full"),
    ("Peak RSS, incremental", "rss", "incremental"),
    ("Peak RSS, restore", "rss", "restore"),
]


def ratios(results: Results) -> list[tuple[str, dict[str, float | None]]]:
    return [
        (name, {peer: ratio(results, metric, phase, peer) for peer in PEERS})
        for name, metric, phase in RATIO_ROWS
    ]


@dataclass
class Target:
    name: str
    status: str
    value: str
    threshold: str


def _target(name: str, value: float | None, ok: bool | None, fmt: str, threshold: str) -> Target:
    if value is None or ok is None:
        return Target(name, UNMEASURED, "n/a", threshold)
    return Target(name, PASS if ok else FAIL, fmt.format(value), threshold)


def targets(results: Results) -> list[Target]:
    out = []
    for peer in PEERS:
        r = ratio(results, "speed", "full", peer)
        out.append(
            _target(
                f"Full backup throughput >= 1.5x {peer}'s",
                r,
                None if r is None else r >= 1.5,
                "{:.2f}x",
                ">= 1.50x",
            )
        )
    r = ratio(results, "speed", "incremental", "restic")
    out.append(
        _target(
            "Incremental >= 10x faster than restic's",
            r,
            None if r is None else r >= 10,
            "{:.2f}x",
            ">= 10.00x",
        )
    )
    r = ratio(results, "added", "incremental", "restic")
    out.append(
        _target(
            "Incremental adds <= 1/3 of the bytes restic adds",
            r,
            None if r is None else r <= 1 / 3,
            "{:.3f}",
            "<= 0.333",
        )
    )
    r = ratio(results, "speed", "restore", "restic")
    out.append(
        _target(
            "Restore throughput >= 1.5x restic's",
            r,
            None if r is None else r >= 1.5,
            "{:.2f}x",
            ">= 1.50x",
        )
    )
    sp = results.sparse
    rss = sp.peak_rss if sp is not None else None
    size = f"{sp.size / (1 << 30):g} GiB" if sp is not None else "64 GiB"
    out.append(
        _target(
            f"{size} sparse disk backup peak RSS < 300 MiB",
            None if rss is None else rss / MiB,
            None if rss is None else rss < RSS_TARGET,
            "{:.0f} MiB",
            "< 300 MiB",
        )
    )
    fz = results.freeze
    if fz is not None:
        p99 = fz.percentile(99) if fz.windows_ms else None
        out.append(
            _target(
                f"Freeze window p99 over {fz.backups} backups ({fz.disks} data disks, writer "
                "running) <= 100 ms",
                p99,
                None if p99 is None else p99 <= TARGET_P99_MS,
                "{:.0f} ms",
                "<= 100 ms",
            )
        )
    return out


# --- formatting ---------------------------------------------------------------


def human(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def fmt_s(s: float | None) -> str:
    return "-" if s is None else f"{s:.2f}"


def fmt_mbps(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def fmt_ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def fmt_chunk(n: int) -> str:
    return f"{n // MiB}M" if n % MiB == 0 else f"{n // 1024}K"


def _main_rows(results: Results) -> list[list[str]]:
    rows = []
    for phase in PHASES:
        for tool in TOOLS:
            m = results.get(tool, phase)
            if m is None:
                continue
            if not m.measured:
                rows.append(
                    [PHASE_TITLES[phase], tool, "n/m", "-", "-", "-", "-", m.note or "not measured"]
                )
                continue
            rows.append(
                [
                    PHASE_TITLES[phase],
                    tool,
                    fmt_s(m.seconds),
                    fmt_mbps(m.mbps),
                    fmt_s(m.cpu_s),
                    human(m.added) if phase != "restore" else "-",
                    human(m.peak_rss),
                    m.note,
                ]
            )
    return rows


MAIN_HEADERS = ["Phase", "Tool", "Seconds", "MB/s", "CPU s", "Added to repo", "Peak RSS", "Note"]
SWEEP_HEADERS = [
    "Chunk size",
    "Full s",
    "Full MB/s",
    "Full CPU s",
    "Full added",
    "Full peak RSS",
    "Incr s",
    "Incr CPU s",
    "Incr read",
    "Incr added",
    "Restore s",
    "Restore MB/s",
]


def _sweep_rows(results: Results) -> list[list[str]]:
    rows = []
    for row in results.sweep:
        if not row.full.measured:
            rows.append([fmt_chunk(row.chunk_size)] + ["not measured"] + ["-"] * 10)
            continue
        rows.append(
            [
                fmt_chunk(row.chunk_size),
                fmt_s(row.full.seconds),
                fmt_mbps(row.full.mbps),
                fmt_s(row.full.cpu_s),
                human(row.full.added),
                human(row.full.peak_rss),
                fmt_s(row.incremental.seconds),
                fmt_s(row.incremental.cpu_s),
                human(row.incremental.scanned),
                human(row.incremental.added),
                fmt_s(row.restore.seconds),
                fmt_mbps(row.restore.mbps),
            ]
        )
    return rows


def _rich_table(title: str, headers: list[str], rows: list[list[str]], left: int = 2) -> Table:
    t = Table(title=title, title_justify="left")
    keep = [i for i, h in enumerate(headers) if h != "Note"]  # notes: in the Markdown only
    for i in keep:
        t.add_column(headers[i], justify="left" if i < left else "right")
    for r in rows:
        t.add_row(*(r[i] for i in keep))
    return t


def render_rich(results: Results, console: Console) -> None:
    parts: list[Any] = []
    parts.append(_rich_table("vmvault vs restic vs borg", MAIN_HEADERS, _main_rows(results)))
    rt = Table(title="Ratios (vmvault ÷ peer; > 1 is better for speed, < 1 for bytes and RSS)")
    rt.add_column("Metric")
    for peer in PEERS:
        rt.add_column(f"vmvault/{peer}", justify="right")
    for name, per_peer in ratios(results):
        rt.add_row(name, *(fmt_ratio(per_peer[p]) for p in PEERS))
    parts.append(rt)
    if results.sweep:
        parts.append(
            _rich_table(
                f"Chunk-size sweep (vmvault, {human(results.sweep_size)} image)",
                SWEEP_HEADERS,
                _sweep_rows(results),
                left=1,
            )
        )
    console.print(Group(*parts))
    for t in targets(results):
        style = {PASS: "green", FAIL: "red"}.get(t.status, "yellow")
        console.print(f"[{style}]{t.status:>12}[/]  {t.name}: {t.value} (target {t.threshold})")


def _md_table(headers: list[str], rows: list[list[str]], left: int = 2) -> list[str]:
    align = ["---" if i < left or h == "Note" else "---:" for i, h in enumerate(headers)]
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    for r in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    return out


def render_markdown(results: Results) -> str:
    L: list[str] = []
    w = results.workload
    L.append("# vmvault benchmarks")
    L.append("")
    L.append(
        "Written by `vmvault-bench` (`make bench`); regenerate it with the command below. "
        "vmvault, restic and borg back up the same generated disk image, one after another, "
        "in one run."
    )
    L.append("")
    if not results.complete:
        L.append("**This run did not complete; the figures below are partial.**")
        L.append("")
    L.append("Command:")
    L.append("")
    L.append("```")
    L.append(results.command)
    L.append("```")
    L.append("")
    L.append(f"Run started {results.started}, took {results.elapsed_s / 60:.1f} min.")
    L.append("")
    L.append("## Machine")
    L.append("")
    L += _md_table(["", ""], [[k, v] for k, v in results.machine.items()])
    L.append("")
    L.append("## Workload")
    L.append("")
    for line in w.get("description", []):
        L.append(f"- {line}")
    L.append("")
    L.append("## Results")
    L.append("")
    L.append(
        "MB/s is the image's logical size (10^6 bytes) divided by the wall-clock seconds of the "
        "whole command (process start, repository open, key derivation included, for every "
        "tool); a restore is timed until the restored file is durable (fsynced, see Workload). "
        "*CPU s* is the command's user + system CPU time (from wait4): less sensitive "
        "than wall time to other work on the machine. *Added to repo* is how much the "
        "repository folder grew (sum of file sizes). *Peak RSS* is the high-water resident "
        "set of the command's process tree (VmHWM/VmRSS sampled from /proc every 20 ms)."
    )
    L.append("")
    rounds = int(w.get("repeat", 1) or 1)
    if rounds > 1:
        L.append(
            f"Every figure is the median of {rounds} rounds (fresh repositories each round; "
            "peak RSS is the largest); the note gives the spread of the wall-clock seconds."
        )
        L.append("")
    L += _md_table(MAIN_HEADERS, _main_rows(results))
    L.append("")
    L.append("### Ratios (vmvault ÷ peer)")
    L.append("")
    L.append("Above 1 is better for speed; below 1 is better for bytes added and RSS.")
    L.append("")
    L += _md_table(
        ["Metric"] + [f"vmvault/{p}" for p in PEERS],
        [[name] + [fmt_ratio(v[p]) for p in PEERS] for name, v in ratios(results)],
        left=1,
    )
    L.append("")
    L.append("## Targets")
    L.append("")
    for t in targets(results):
        L.append(f"- **{t.status}** {t.name}: {t.value} (target {t.threshold})")
    L.append("")
    L.append("## Memory check: sparse disk")
    L.append("")
    sp = results.sparse
    if sp is None:
        L.append("Not run.")
    elif sp.seconds is None:
        L.append(f"Not measured: {sp.note}")
    else:
        L.append(
            f"vmvault backed up a {human(sp.size)} page blob holding {human(sp.data_bytes)} of "
            f"data in 1 MiB regions (the rest holes) in {sp.seconds:.2f} s, peak RSS "
            f"{human(sp.peak_rss)}, repository grew {human(sp.added)}."
            + (f" {sp.note}" if sp.note else "")
        )
    L.append("")
    if results.freeze is not None:
        L += freeze_markdown(results.freeze)
    L.append("## Chunk-size sweep")
    L.append("")
    if results.sweep:
        L.append(
            f"vmvault alone, full then incremental backup (same 1% rewrite) then restore, of a "
            f"{human(results.sweep_size)} image from the same seed, a new repository per chunk "
            "size."
        )
        L.append("")
        L += _md_table(SWEEP_HEADERS, _sweep_rows(results), left=1)
        unmeasured = {row.full.note for row in results.sweep if not row.full.measured}
        for note in sorted(unmeasured):
            L.append("")
            L.append(f"Not measured: {note}")
    else:
        L.append("Not run (pass `--chunk-sizes 64K,128K,256K,1M,4M`).")
    L.append("")
    if results.notes:
        L.append("## Notes")
        L.append("")
        for n in results.notes:
            L.append(f"- {n}")
        L.append("")
    return "\n".join(L)
