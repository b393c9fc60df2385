"""kill -9 in the middle of a backup: no manifest, check is clean (leftovers are infos),
the next backup succeeds and restores right, prune removes the leftovers."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmvault.vault import DiskSource, Repository

CS = 64 * 1024

# the backup in a child process, slowed down (each blob added to a pack sleeps) so that it
# can be killed at a chosen point
CHILD = """
import sys, time
from pathlib import Path

from vmvault.vault import pack

_add = pack.PackWriter.add
def slow_add(self, *args):
    _add(self, *args)
    time.sleep(0.01)
pack.PackWriter.add = slow_add

from vmvault.vault import DiskSource, Repository
vault, key, disk = map(Path, sys.argv[1:4])
repo = Repository.open(vault, key_file=key)
repo.index_flush_packs = 3
repo.backup("rp-crash", [DiskSource("osdisk", disk.stat().st_size, disk)])
print("finished")
"""


def count_packs(vault: Path) -> int:
    return sum(1 for p in (vault / "data").glob("*/*") if p.is_file())


def restore(repo: Repository, rp: str, tmp_path: Path) -> bytes:
    target = tmp_path / f"{rp}.out"
    repo.restore_disk(rp, "osdisk", target)
    return target.read_bytes()


def young_tmp_pack(vault: Path) -> bool:
    """A pack temp file that has just begun (it cannot be renamed within the next ms)."""
    for p in (vault / "tmp").glob("pack-*"):
        try:
            if p.stat().st_size < 160 * 1024:  # at most 2 of the 4 blobs a pack takes
                return True
        except FileNotFoundError:
            continue
    return False


@pytest.mark.parametrize(("kill_after_packs", "in_tmp"), [(2, False), (12, False), (1, True)])
def test_kill_9_during_backup(tmp_path: Path, kill_after_packs: int, in_tmp: bool) -> None:
    vault, key = tmp_path / "vault", tmp_path / "key"
    repo = Repository.create(vault, chunk_size=CS, pack_size=256 * 1024, key_file=key)
    early = tmp_path / "early.raw"
    early.write_bytes(random.Random(1).randbytes(8 * CS))
    repo.backup("rp-before", [DiskSource("osdisk", 8 * CS, early)])
    disk = tmp_path / "disk.raw"
    content = random.Random(2).randbytes(16 * 1024 * 1024)  # 256 chunks, ~64 packs
    disk.write_bytes(content)
    packs_before = count_packs(vault)
    index_before = len(list((vault / "index").iterdir()))

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(vault), str(key), str(disk)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 30
    while count_packs(vault) - packs_before < kill_after_packs or (
        in_tmp and not young_tmp_pack(vault)
    ):
        assert child.poll() is None, f"backup ended before the kill: {child.communicate()}"
        assert time.monotonic() < deadline, "no packs appeared"
        time.sleep(0.002)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert child.returncode == -signal.SIGKILL

    repo = Repository.open(vault, key_file=key)
    assert repo.manifests() == ["rp-before"]
    report = repo.check()
    assert report.ok, report
    assert any("removed by prune" in i for i in report.infos), report
    if in_tmp:
        assert report.counts["tmp_files"] >= 1
        assert any("temp file tmp/pack-" in i for i in report.infos)
    if kill_after_packs >= 12:  # an index file of the interrupted backup was already written
        assert len(list((vault / "index").iterdir())) > index_before
        assert report.counts["chunks_unreferenced"] > 0

    stats = repo.backup("rp-crash", [DiskSource("osdisk", len(content), disk)])
    if kill_after_packs >= 12:
        assert stats.chunks_reused > 0  # indexed chunks of the killed run are reused
    assert restore(repo, "rp-crash", tmp_path) == content
    assert repo.check(read_data=True).ok

    pruned = repo.prune()
    assert pruned.packs_deleted + pruned.tmp_files_removed > 0
    report = repo.check(read_data=True)
    assert report.ok and report.infos == [], report
    assert restore(repo, "rp-crash", tmp_path) == content
    assert restore(repo, "rp-before", tmp_path) == early.read_bytes()
