"""`check`: verify the vault's structure and, with read_data, every stored byte."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from vmvault.errors import VmvaultError

from .chunks import ChunkError
from .format import (
    CONFIG_NAME,
    DATA_DIR,
    FORMAT_VERSION,
    MANIFESTS_DIR,
    TMP_DIR,
    is_hex_id,
    list_dir,
    validate_rp_id,
)
from .index import list_index_files, read_index_file
from .keys import load_slots
from .manifest import expected_chunk_count, read_manifest
from .pack import FOOTER_LEN, HEADER_LEN, PackEntry, PackError, pack_path, read_trailer

if TYPE_CHECKING:
    from .repository import Repository

MAX_ERRORS_PER_ITEM = 10
LEFTOVER = "leftover from an interrupted backup, removed by prune"


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def __str__(self) -> str:
        lines = [f"ok: {self.ok}"]
        lines += [f"error: {e}" for e in self.errors]
        lines += [f"info: {i}" for i in self.infos]
        lines += [f"{k}: {v}" for k, v in sorted(self.counts.items())]
        return "\n".join(lines)


def scan_packs(root: Path) -> tuple[dict[str, int], list[str]]:
    """Pack files on disk -> {pack id: size}, plus names of unexpected files under data/."""
    packs: dict[str, int] = {}
    strays: list[str] = []
    for sub in list_dir(root / DATA_DIR):
        if not sub.is_dir():
            strays.append(f"{DATA_DIR}/{sub.name}")
            continue
        for entry in list_dir(Path(sub.path)):
            if is_hex_id(entry.name) and entry.name[:2] == sub.name and entry.is_file():
                packs[entry.name] = entry.stat().st_size
            else:
                strays.append(f"{DATA_DIR}/{sub.name}/{entry.name}")
    return packs, strays


def tmp_files(root: Path) -> list[str]:
    return sorted(e.name for e in list_dir(root / TMP_DIR))


def manifest_names(root: Path) -> list[str]:
    out = []
    for e in list_dir(root / MANIFESTS_DIR):
        try:
            validate_rp_id(e.name)
        except VmvaultError:
            continue
        out.append(e.name)
    return sorted(out)


class _Checker:
    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.report = CheckReport()

    def error(self, text: str) -> None:
        self.report.errors.append(text)

    def info(self, text: str) -> None:
        self.report.infos.append(text)

    def check_config(self) -> None:
        root = self.repo.path
        try:
            config = json.loads((root / CONFIG_NAME).read_bytes())
            if config.get("version") != FORMAT_VERSION:
                self.error(f"config: format version {config.get('version')!r}")
            if config.get("id") != self.repo.id:
                self.error("config: repository id changed since the vault was opened")
            if config.get("chunk_size") != self.repo.chunk_size:
                self.error("config: chunk size changed since the vault was opened")
        except (OSError, ValueError, AttributeError) as exc:
            self.error(f"config: {exc}")
        slots = load_slots(root)
        if not slots:
            self.error("keys: no key slots")
        for slot_id, slot, problem in slots:
            if slot is None:
                self.error(f"key slot {slot_id}: {problem}")
            elif slot.get("type") not in ("password", "key_file") or "wrapped_key" not in slot:
                self.error(f"key slot {slot_id}: not a vmvault key slot")
        self.report.counts["key_slots"] = len(slots)

    def run(self, read_data: bool) -> CheckReport:
        repo = self.repo
        root = repo.path
        crypto = repo._crypto
        counts = self.report.counts
        self.check_config()

        # Listed in the reverse of the order a backup writes them in (packs, then index files,
        # then the manifest), so that a backup running alongside (both hold shared locks) never
        # shows as a manifest without its index entries or an index entry without its pack.
        manifests = manifest_names(root)
        index_files = list_index_files(root)
        packs_on_disk, strays = scan_packs(root)
        for stray in strays:
            self.info(f"unexpected file {stray} (not a pack; ignored)")
        counts["packs"] = len(packs_on_disk)
        counts["bytes_stored"] = sum(packs_on_disk.values())

        # index files: pack id -> entries (all files; duplicates kept)
        indexed: dict[str, dict[tuple[bytes, int], PackEntry]] = {}
        chunk_bytes: dict[bytes, int] = {}
        counts["index_files"] = len(index_files)
        for file_id in index_files:
            try:
                packs = read_index_file(root, crypto, file_id)
            except VmvaultError as exc:
                self.error(exc.message)
                continue
            for pack_id, entries in packs:
                slot = indexed.setdefault(pack_id, {})
                for e in entries:
                    slot[(e.id, e.offset)] = e
                    chunk_bytes.setdefault(e.id, e.length)
        counts["index_entries"] = sum(len(v) for v in indexed.values())
        counts["chunks"] = len(chunk_bytes)

        for pack_id, by_key in sorted(indexed.items()):
            size = packs_on_disk.get(pack_id)
            if size is None:
                self.error(
                    f"pack {pack_id} is missing; it holds {len(by_key)} chunks named by the index"
                )
                continue
            self.check_pack_against_index(pack_id, size, by_key)

        leftover_packs = sorted(set(packs_on_disk) - set(indexed))
        for pack_id in leftover_packs:
            self.info(f"pack {pack_id} is not in the index: {LEFTOVER}")
        counts["leftover_packs"] = len(leftover_packs)
        temps = tmp_files(root)
        for name in temps:
            self.info(f"temp file {TMP_DIR}/{name}: {LEFTOVER}")
        counts["tmp_files"] = len(temps)

        referenced = self.check_manifests(manifests, set(chunk_bytes))
        unreferenced = set(chunk_bytes) - referenced
        counts["chunks_referenced"] = len(referenced & set(chunk_bytes))
        counts["chunks_unreferenced"] = len(unreferenced)
        if unreferenced:
            size = sum(chunk_bytes[c] for c in unreferenced)
            self.info(
                f"{len(unreferenced)} chunks ({size} bytes) are not used by any recovery point "
                f"(deleted recovery points or {LEFTOVER})"
            )

        if read_data:
            self.read_all(sorted(p for p in indexed if p in packs_on_disk), packs_on_disk)
        return self.report

    def check_pack_against_index(
        self, pack_id: str, size: int, entries: dict[tuple[bytes, int], PackEntry]
    ) -> None:
        try:
            fd = os.open(pack_path(self.repo.path, pack_id), os.O_RDONLY)
        except OSError as exc:
            self.error(f"pack {pack_id}: {exc.strerror}")
            return
        try:
            trailer = read_trailer(fd, size, self.repo._crypto, pack_id)
        except (PackError, VmvaultError) as exc:
            self.error(str(exc.message if isinstance(exc, VmvaultError) else exc))
            return
        finally:
            os.close(fd)
        in_pack = {(e.id, e.offset): e for e in trailer}
        bad = 0
        for key, e in entries.items():
            if e.offset < HEADER_LEN or e.offset + e.length > size - FOOTER_LEN:
                bad += 1
                if bad <= MAX_ERRORS_PER_ITEM:
                    self.error(
                        f"index entry for chunk {e.id.hex()} points outside pack {pack_id} "
                        f"(offset {e.offset}, length {e.length}, pack size {size})"
                    )
                continue
            if in_pack.get(key) != e:
                bad += 1
                if bad <= MAX_ERRORS_PER_ITEM:
                    self.error(
                        f"pack {pack_id}: its header does not list chunk {e.id.hex()} at offset "
                        f"{e.offset} as the index does"
                    )
        extra = set(in_pack) - set(entries)
        if extra:
            self.error(f"pack {pack_id}: its header lists {len(extra)} chunks the index does not")
        if bad > MAX_ERRORS_PER_ITEM:
            self.error(f"pack {pack_id}: {bad - MAX_ERRORS_PER_ITEM} more index mismatches")

    def check_manifests(self, names: list[str], known: set[bytes]) -> set[bytes]:
        root = self.repo.path
        referenced: set[bytes] = set()
        self.report.counts["manifests"] = len(names)
        for entry in list_dir(root / MANIFESTS_DIR):
            if entry.name not in names:
                self.info(f"unexpected file {MANIFESTS_DIR}/{entry.name} (ignored)")
        for rp_id in names:
            try:
                m = read_manifest(root, self.repo._crypto, rp_id)
            except FileNotFoundError:
                self.info(f"recovery point {rp_id} was deleted while check ran")
                continue
            except VmvaultError as exc:
                self.error(exc.message)
                continue
            if m.repository_id != self.repo.id:
                self.error(f"manifest {rp_id}: belongs to repository {m.repository_id}")
            missing = 0
            for disk in m.disks:
                if disk.chunk_count != expected_chunk_count(disk.size, disk.chunk_size):
                    self.error(f"manifest {rp_id}, disk {disk.name}: wrong chunk count")
                for i, cid in enumerate(disk.chunks):
                    if cid is None:
                        continue
                    referenced.add(cid)
                    if cid not in known:
                        missing += 1
                        if missing <= MAX_ERRORS_PER_ITEM:
                            self.error(
                                f"recovery point {rp_id}, disk {disk.name}, chunk {i}: chunk "
                                f"{cid.hex()} is not in the index"
                            )
            if missing > MAX_ERRORS_PER_ITEM:
                self.error(
                    f"recovery point {rp_id}: {missing - MAX_ERRORS_PER_ITEM} more chunks "
                    "missing from the index"
                )
        return referenced

    def read_all(self, pack_ids: list[str], sizes: dict[str, int]) -> None:
        crypto = self.repo._crypto
        root = self.repo.path

        def verify(pack_id: str) -> tuple[int, list[str]]:
            problems: list[str] = []
            try:
                data = pack_path(root, pack_id).read_bytes()
            except OSError as exc:
                return 0, [f"pack {pack_id}: {exc.strerror}"]
            if blake3.blake3(data, max_threads=1).hexdigest() != pack_id:
                problems.append(f"pack {pack_id}: content does not hash to the pack id")
            fd = os.open(pack_path(root, pack_id), os.O_RDONLY)
            try:
                trailer = read_trailer(fd, len(data), crypto, pack_id)
            except PackError as exc:
                return 0, [*problems, str(exc)]
            finally:
                os.close(fd)
            view = memoryview(data)
            for e in trailer:
                try:
                    crypto.open_chunk(e.id, view[e.offset : e.offset + e.length], e.flags,
                                      e.raw_length)
                except ChunkError as exc:
                    problems.append(f"pack {pack_id}, chunk {e.id.hex()}: {exc}")
            return len(trailer), problems

        chunks_read = 0
        workers = max(1, min(self.repo.threads, 4))
        with ThreadPoolExecutor(workers, thread_name_prefix="vmvault-check") as pool:
            for n, problems in pool.map(verify, pack_ids):
                chunks_read += n
                self.report.errors.extend(problems)
        self.report.counts["chunks_read"] = chunks_read
        self.report.counts["bytes_read"] = sum(sizes[p] for p in pack_ids)


def run_check(repo: Repository, read_data: bool) -> CheckReport:
    return _Checker(repo).run(read_data)
