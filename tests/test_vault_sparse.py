"""A 64 GiB sparse disk with data_ranges backs up and restores fast, in little memory
(peak RSS of the process measured with getrusage(RUSAGE_CHILDREN) around it)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from vmvault.vault import Repository

GIB = 1024**3
SIZE = 64 * GIB
MAX_RSS_MIB = 300

CHILD = """
import json, sys, time
from pathlib import Path
from vmvault.vault import DiskSource, Repository
vault, key, disk, target, ranges, SIZE = sys.argv[1:7]
SIZE = int(SIZE)
ranges = [tuple(r) for r in json.loads(ranges)]
repo = Repository.open(Path(vault), key_file=Path(key))
t0 = time.monotonic()
stats = repo.backup("rp", [DiskSource("osdisk", SIZE, Path(disk), data_ranges=ranges)])
t1 = time.monotonic()
written = repo.restore_disk("rp", "osdisk", Path(target))
t2 = time.monotonic()
print(json.dumps({"scanned": stats.bytes_scanned, "new": stats.chunks_new,
                  "zero": stats.chunks_zero, "written": written,
                  "backup_s": t1 - t0, "restore_s": t2 - t1}))
"""

# runs CHILD and reports the peak RSS of its children (only CHILD) in KiB
WRAPPER = """
import resource, subprocess, sys
out = subprocess.run([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], check=True,
                     capture_output=True, text=True).stdout
print(out.strip())
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_64_gib_sparse_disk(tmp_path: Path) -> None:
    vault, key = tmp_path / "vault", tmp_path / "key"
    repo = Repository.create(vault, key_file=key)  # default 256 KiB chunks, 32 MiB packs
    disk, target = tmp_path / "disk.raw", tmp_path / "restored.raw"
    rng = random.Random(64)
    ranges: list[tuple[int, int]] = []
    blobs: list[tuple[int, bytes]] = []
    with open(disk, "wb") as f:
        f.truncate(SIZE)
        for i in range(24):  # 24 MiB of data spread over the disk, some not chunk-aligned
            offset = i * (SIZE // 24) + rng.randrange(0, 1 << 20)
            data = rng.randbytes(1 << 20)
            f.seek(offset)
            f.write(data)
            ranges.append((offset, len(data)))
            blobs.append((offset, data))
        f.seek(SIZE - 1000)
        tail = rng.randbytes(1000)
        f.write(tail)
        blobs.append((SIZE - 1000, tail))
    ranges += [(SIZE - 4096, 4096), (GIB, 8 << 20)]  # a listed range that holds zeros
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, CHILD, str(vault), str(key), str(disk), str(target),
         json.dumps(ranges), str(SIZE)],
        check=True, capture_output=True, text=True, env=env, timeout=120,
    )
    elapsed = time.monotonic() - started
    result_line, rss_line = proc.stdout.strip().splitlines()[-2:]
    result = json.loads(result_line)
    rss_mib = int(rss_line) / 1024
    print(f"64 GiB sparse: {result}, peak RSS {rss_mib:.0f} MiB, {elapsed:.1f}s")
    assert rss_mib < MAX_RSS_MIB
    assert elapsed < 30
    # the listed range at 1 GiB is a hole of the file: not read either
    assert result["scanned"] == 24 * (1 << 20) + 4096
    assert result["new"] >= 24 * 4
    assert result["new"] + result["zero"] == SIZE // repo.chunk_size

    assert target.stat().st_size == SIZE
    assert target.stat().st_blocks * 512 < 64 << 20  # sparse: only the data was written
    with open(target, "rb") as f:
        for offset, data in blobs:
            f.seek(offset)
            assert f.read(len(data)) == data
        f.seek(GIB)
        assert f.read(8 << 20) == bytes(8 << 20)
    m = Repository.open(vault, key_file=key).manifest("rp")
    assert len(m.disks[0].chunks) == SIZE // repo.chunk_size
    assert repo.check().ok
