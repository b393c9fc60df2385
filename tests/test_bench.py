"""vmvault-bench: the image generator, the rewrite, the measurements, and a tiny full run."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import zstandard

from vmvault.bench import gen
from vmvault.bench.measure import run_measured, tree_size
from vmvault.bench.peers import synced
from vmvault.bench.report import (
    FAIL,
    PASS,
    PEERS,
    PHASE_TITLES,
    PHASES,
    TOOLS,
    Measurement,
    Results,
    SparseResult,
    combine,
    ratio,
    targets,
)

MiB = gen.MiB


def _regions(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[i : i + MiB] for i in range(0, len(data), MiB)]


def _data_bytes(path: Path) -> int:
    """Bytes in data segments (SEEK_DATA/SEEK_HOLE)."""
    total = 0
    size = path.stat().st_size
    with open(path, "rb") as f:
        fd = f.fileno()
        off = 0
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            total += end - start
            off = end
    return total


# --- the generator ----------------------------------------------------------------


def test_generator_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    spec = gen.ImageSpec(16 * MiB, seed=7)
    a, b, c = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "c.img"
    gen.write_image(a, spec)
    gen.write_image(b, gen.ImageSpec(16 * MiB, seed=7))
    gen.write_image(c, gen.ImageSpec(16 * MiB, seed=8))
    assert a.stat().st_size == 16 * MiB
    assert gen.file_digest(a) == gen.file_digest(b)
    assert gen.file_digest(a) != gen.file_digest(c)
    assert gen.region_kinds(100, 7) == gen.region_kinds(100, 7)
    assert gen.region_kinds(100, 7) != gen.region_kinds(100, 8)


def test_generator_composition_measured(tmp_path: Path) -> None:
    path = tmp_path / "img"
    gen.write_image(path, gen.ImageSpec(40 * MiB, seed=3))
    cctx = zstandard.ZstdCompressor(level=3)
    zero = incompressible = text = 0
    text_ratios = []
    regions = _regions(path)
    assert len(regions) == 40
    for region in regions:
        if region.count(0) == len(region):
            zero += 1
            continue
        r = len(cctx.compress(region)) / len(region)
        if r > 0.99:
            incompressible += 1
        else:
            text += 1
            text_ratios.append(r)
            assert region.isascii()
    assert (incompressible, text, zero) == (16, 12, 12)  # 40% / 30% / 30%
    assert all(0.15 < r < 0.5 for r in text_ratios), text_ratios
    # all text regions differ: nothing to deduplicate between regions
    assert len({r for r in regions if r.count(0) != len(r)}) == 28
    whole = len(cctx.compress(path.read_bytes())) / (40 * MiB)
    assert 0.45 < whole < 0.6
    # the zeros are holes by default, written with zeros="written", same content
    assert _data_bytes(path) == 28 * MiB
    written = tmp_path / "written"
    gen.write_image(written, gen.ImageSpec(40 * MiB, seed=3), zeros="written")
    assert gen.file_digest(written) == gen.file_digest(path)
    assert _data_bytes(written) == 40 * MiB


# --- the 1% rewrite -------------------------------------------------------------


def test_rewrite_count_scales_with_size() -> None:
    assert gen.rewrite_count(4 * gen.GiB) == 640
    assert gen.rewrite_count(1 * gen.GiB) == 160
    assert gen.rewrite_count(64 * MiB) == 10
    size = 4 * gen.GiB
    plan = gen.rewrite_plan(size, seed=1)
    assert len(plan) == 640
    assert plan == gen.rewrite_plan(size, seed=1)
    assert all(off % gen.WRITE_ALIGN == 0 and off + gen.WRITE_SIZE <= size for off in plan)
    assert all(b - a >= gen.WRITE_SIZE for a, b in zip(plan, plan[1:], strict=False))


def test_rewrite_touches_the_asked_bytes(tmp_path: Path) -> None:
    size = 64 * MiB
    path = tmp_path / "img"
    gen.write_image(path, gen.ImageSpec(size, seed=5), zeros="written")
    before = path.read_bytes()
    inode = path.stat().st_ino
    plan = gen.rewrite_plan(size, seed=5)
    written = gen.apply_rewrites(path, plan, seed=5)
    after = path.read_bytes()
    assert path.stat().st_ino == inode and len(after) == size  # in place
    expected = gen.rewrite_count(size) * gen.WRITE_SIZE
    assert written == expected == len(plan) * 64 * 1024
    # outside the writes nothing changed; inside, (nearly) every byte did
    edges = [0] + [x for off in plan for x in (off, off + gen.WRITE_SIZE)] + [size]
    outside = list(zip(edges[::2], edges[1::2], strict=True))
    assert all(before[a:b] == after[a:b] for a, b in outside)
    inside = sum(
        x != y
        for off in plan
        for x, y in zip(
            before[off : off + gen.WRITE_SIZE], after[off : off + gen.WRITE_SIZE], strict=True
        )
    )
    assert 0.98 * expected < inside <= expected
    block = gen.WRITE_ALIGN
    changed_blocks = sum(
        before[i : i + block] != after[i : i + block] for i in range(0, size, block)
    )
    assert changed_blocks * block == expected


# --- measurement and report -------------------------------------------------------


def test_peak_rss_is_per_run() -> None:
    spike = (
        "import time; b = bytearray(200 << 20); b[::4096] = b'x' * 51200; del b; time.sleep(0.3)"
    )
    big = run_measured([sys.executable, "-c", spike])  # freed before most samples: VmHWM
    small = run_measured([sys.executable, "-c", "pass"])
    assert big.ok and small.ok
    assert big.peak_rss > 200 << 20
    assert small.peak_rss < 100 << 20  # not the maximum over every child so far
    assert small.seconds < big.seconds + 5


def test_peer_restores_are_timed_until_the_file_is_durable(tmp_path: Path) -> None:
    restored = tmp_path / "restored.img"
    restored.write_bytes(b"x" * 4096)
    restore = run_measured([sys.executable, "-c", "import time; time.sleep(0.2)"])
    both = synced(restore, restored)
    assert both.ok and both.argv[-4:] == ["&&", "sync", "--", str(restored)]
    assert both.seconds > restore.seconds >= 0.2
    assert both.cpu_seconds >= restore.cpu_seconds
    assert both.peak_rss >= restore.peak_rss
    assert not synced(restore, tmp_path / "missing.img").ok  # no file: the measurement fails
    with pytest.raises(RuntimeError, match="sync"):
        synced(restore, tmp_path / "missing.img").check()


def _results(v_full: float, r_full: float, v_added: int, r_added: int, rss: int) -> Results:
    size = 1000 * 1_000_000
    r = Results()
    for tool, full, added in (("vmvault", v_full, v_added), ("restic", r_full, r_added)):
        r.measurements += [
            Measurement(tool, "full", size, seconds=full, added=added * 10, peak_rss=50 << 20),
            Measurement(tool, "incremental", size, seconds=full / 20, added=added, peak_rss=1),
            Measurement(tool, "restore", size, seconds=full, peak_rss=50 << 20),
        ]
    r.measurements.append(
        Measurement("borg", "full", size, seconds=r_full * 2, added=1, peak_rss=10 << 20)
    )
    r.sparse = SparseResult(64 << 30, 1 << 28, 10.0, rss, 1 << 28)
    return r


def test_ratios_and_targets_come_from_the_measurements() -> None:
    good = _results(v_full=10.0, r_full=20.0, v_added=10, r_added=100, rss=100 << 20)
    assert ratio(good, "speed", "full", "restic") == pytest.approx(2.0)
    assert ratio(good, "speed", "full", "borg") == pytest.approx(4.0)
    assert ratio(good, "added", "incremental", "restic") == pytest.approx(0.1)
    assert ratio(good, "rss", "full", "borg") == pytest.approx(5.0)
    assert ratio(good, "speed", "incremental", "borg") is None  # borg's incremental missing
    status = {t.name: t.status for t in targets(good)}
    assert status["Full backup throughput >= 1.5x restic's"] == PASS
    assert status["Incremental >= 10x faster than restic's"] == FAIL  # 2x only
    assert status["Incremental adds <= 1/3 of the bytes restic adds"] == PASS
    assert status["64 GiB sparse disk backup peak RSS < 300 MiB"] == PASS

    bad = _results(v_full=20.0, r_full=20.0, v_added=50, r_added=100, rss=400 << 20)
    status = {t.name: t.status for t in targets(bad)}
    assert status["Full backup throughput >= 1.5x restic's"] == FAIL
    assert status["Incremental adds <= 1/3 of the bytes restic adds"] == FAIL
    assert status["64 GiB sparse disk backup peak RSS < 300 MiB"] == FAIL


def test_repetitions_combine_to_the_median() -> None:
    runs = [
        Measurement("restic", "full", 100, seconds=s, cpu_s=s / 2, added=a, peak_rss=r)
        for s, a, r in ((3.0, 10, 5), (1.0, 30, 7), (2.0, 20, 6))
    ]
    m = combine(runs)
    assert (m.seconds, m.cpu_s, m.added, m.peak_rss) == (2.0, 1.0, 20, 7)
    assert m.runs == [3.0, 1.0, 2.0] and "3 runs: 1.00-3.00 s" in m.note
    wrong = Measurement("restic", "full", 100, note="INVALID (restored data differ)")
    voided = combine([*runs, wrong])
    assert not voided.measured and "INVALID" in voided.note


# --- a tiny end-to-end run ----------------------------------------------------------


def _md_rows(md: str, first: str) -> list[list[str]]:
    rows = []
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first:
            rows.append(cells)
    return rows


@pytest.mark.root
@pytest.mark.slow
def test_tiny_end_to_end_run(tmp_path: Path) -> None:
    from vmvault.bench.run import main

    assert os.geteuid() == 0, "the benchmark needs root (pool, drop_caches); CI runs as root"
    for tool in ("restic", "borg"):
        assert shutil.which(tool), f"{tool} is not installed (make setup installs it)"
    work = tmp_path / "work"
    report = tmp_path / "bench.md"
    js = tmp_path / "bench.json"
    rc = main(
        [
            "--size-mib", "64",
            "--workdir", str(work),
            "--report", str(report),
            "--json", str(js),
            "--chunk-sizes", "1M",
            "--sparse-gib", "1",
            "--sparse-data-mib", "8",
            "--freeze-backups", "3",
            "--freeze-disks", "2",
        ]
    )  # fmt: skip
    assert rc == 0
    assert not work.exists()  # cleaned up, pool released
    assert not [m for m in Path("/proc/self/mounts").read_text().split() if str(tmp_path) in m]

    md = report.read_text()
    data = json.loads(js.read_text())
    assert data["complete"]
    ms = {(m["tool"], m["phase"]): m for m in data["measurements"]}
    size = 64 * MiB
    for phase in PHASES:
        rows = {r[1]: r for r in _md_rows(md, PHASE_TITLES[phase])}
        for tool in TOOLS:
            m = ms[(tool, phase)]
            assert m["seconds"] is not None and m["seconds"] > 0, (tool, phase, m["note"])
            assert m["logical_bytes"] == size
            assert m["peak_rss"] > 1 << 20
            assert rows[tool][2] == f"{m['seconds']:.2f}"
            assert rows[tool][3] == f"{size / m['seconds'] / 1e6:.1f}"
            if phase == "restore":
                assert "verified" in m["note"]
            else:
                assert m["added"] > 0
    # vmvault's incremental added little, restic's full added most of the data
    assert ms[("vmvault", "incremental")]["added"] < ms[("vmvault", "full")]["added"]
    assert ms[("restic", "full")]["added"] > 20 * MiB

    # ratios in the report are recomputed from the measured numbers
    def speed(tool: str, phase: str) -> float:
        return float(size / ms[(tool, phase)]["seconds"])

    expected = {
        "Full backup throughput": [speed("vmvault", "full") / speed(p, "full") for p in PEERS],
        "Incremental backup speed": [
            speed("vmvault", "incremental") / speed(p, "incremental") for p in PEERS
        ],
        "Incremental bytes added": [
            ms[("vmvault", "incremental")]["added"] / ms[(p, "incremental")]["added"] for p in PEERS
        ],
        "Restore throughput": [speed("vmvault", "restore") / speed(p, "restore") for p in PEERS],
    }
    for name, values in expected.items():
        (row,) = _md_rows(md, name)
        assert row[1:] == [f"{v:.2f}x" for v in values], (name, row)

    statuses = re.findall(r"^- \*\*(PASS|FAIL|NOT MEASURED)\*\* (.*)$", md, re.M)
    assert len(statuses) == 7
    assert all(s in (PASS, FAIL) for s, _ in statuses), statuses
    for key in ("CPUs (nproc)", "Memory", "Kernel", "restic", "borg", "Python"):
        assert _md_rows(md, key), key
    assert "vmvault-bench --size-mib 64" in md
    sweep = _md_rows(md, "1M")
    assert len(sweep) == 1 and sweep[0][1] != "not measured"
    assert data["sparse"]["peak_rss"] > 0
    # the freeze window: three real backups through the VM agent and the VMSnapshot handler
    windows = data["freeze"]["windows_ms"]
    assert data["freeze"]["error"] is None and len(windows) == 3 and all(w > 0 for w in windows)
    (row,) = _md_rows(md, "3")
    assert row[3] == f"{sorted(windows)[-1]:.0f} ms"  # p99 of three is the largest
    assert tree_size(tmp_path) == report.stat().st_size + js.stat().st_size
