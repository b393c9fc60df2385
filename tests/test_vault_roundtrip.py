"""Property tests: whatever the disk holds (sizes not a multiple of the chunk size, zero
regions, repeats, data ranges with garbage in the holes, random overwrites as an
incremental), restore gives back exactly what was backed up."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmvault.vault import DiskSource, Repository

CS = 64 * 1024
_counter = itertools.count()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Repository]:
    root = tmp_path_factory.mktemp("vault-prop")
    r = Repository.create(root / "vault", chunk_size=CS, pack_size=512 * 1024,
                          key_file=root / "key")
    yield r
    report = r.check(read_data=True)
    assert report.ok, report


# a disk = list of segments (kind, length); kinds: zero, random, repeat of one block, text
segment = st.tuples(
    st.sampled_from(["zero", "random", "repeat", "text"]),
    st.integers(min_value=1, max_value=3 * CS),
    st.integers(min_value=0, max_value=2**32),
)


def build(segments: list[tuple[str, int, int]], size_pad: int) -> bytes:
    out = bytearray()
    for kind, length, seed in segments:
        rng = random.Random(seed)
        if kind == "zero":
            out += bytes(length)
        elif kind == "random":
            out += rng.randbytes(length)
        elif kind == "repeat":
            out += (random.Random(seed % 3).randbytes(CS) * 4)[:length]
        else:
            words = [b"disk", b"vault", b"chunk", b"zero", b"\n", b"backup"]
            out += b" ".join(rng.choice(words) for _ in range(length // 3 + 1))[:length]
    out += bytes(size_pad)
    return bytes(out)


def restore(repo: Repository, rp: str, size: int) -> bytes:
    buf = bytearray(size)

    def write(offset: int, data: bytes) -> None:
        assert offset % CS == 0 and offset + len(data) <= size
        buf[offset : offset + len(data)] = data

    repo.restore_disk_to(rp, "osdisk", write)
    return bytes(buf)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    segments=st.lists(segment, min_size=0, max_size=8),
    pad=st.integers(min_value=0, max_value=2 * CS),
    writes=st.lists(
        st.tuples(st.floats(min_value=0, max_value=1), st.integers(1, 2 * CS),
                  st.integers(0, 2**32)),
        max_size=5,
    ),
)
def test_full_then_incremental_round_trip(
    repo: Repository,
    tmp_path_factory: pytest.TempPathFactory,
    segments: list[tuple[str, int, int]],
    pad: int,
    writes: list[tuple[float, int, int]],
) -> None:
    n = next(_counter)
    content = build(segments, pad)
    size = len(content)
    path = tmp_path_factory.mktemp("disk") / "disk.raw"
    path.write_bytes(content)
    repo.backup(f"full-{n}", [DiskSource("osdisk", size, path)])
    assert restore(repo, f"full-{n}", size) == content

    changed = []
    data = bytearray(content)
    for where, length, seed in writes:
        if size == 0:
            break
        offset = int(where * (size - 1))
        length = min(length, size - offset)
        data[offset : offset + length] = random.Random(seed).randbytes(length)
        changed.append((offset, length))
    path.write_bytes(bytes(data))
    stats = repo.backup(f"incr-{n}", [DiskSource("osdisk", size, path, changed_ranges=changed)],
                        parent=f"full-{n}")
    touched = {i for off, ln in changed for i in range(off // CS, (off + ln - 1) // CS + 1)}
    assert stats.bytes_scanned == sum(min(CS, size - i * CS) for i in touched)
    count = -(-size // CS)
    assert stats.chunks_new + stats.chunks_reused + stats.chunks_parent + stats.chunks_zero == count
    assert restore(repo, f"incr-{n}", size) == bytes(data)
    assert restore(repo, f"full-{n}", size) == content


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(min_value=0, max_value=12 * CS),
    spans=st.lists(st.tuples(st.integers(0, 12 * CS), st.integers(0, 2 * CS)), max_size=6),
    seed=st.integers(0, 2**32),
)
def test_data_ranges_round_trip(
    repo: Repository,
    tmp_path_factory: pytest.TempPathFactory,
    size: int,
    spans: list[tuple[int, int]],
    seed: int,
) -> None:
    n = next(_counter)
    garbage = random.Random(seed).randbytes(size)  # holes hold garbage that must not appear
    path = tmp_path_factory.mktemp("disk") / "disk.raw"
    path.write_bytes(garbage)
    expected = bytearray(size)
    mask = bytearray(size)
    for off, length in spans:
        end = min(off + length, size)
        expected[off:end] = garbage[off:end]
        mask[off:end] = b"\x01" * max(0, end - off)
    covered = mask.count(1)
    stats = repo.backup(f"sparse-{n}", [DiskSource("osdisk", size, path, data_ranges=spans)])
    assert stats.bytes_scanned == covered
    assert restore(repo, f"sparse-{n}", size) == bytes(expected)

