"""The peers vmvault is measured against: restic and borg, run as subprocesses.

Each peer keeps its repository, cache and configuration under one folder of
the work dir (so on the same file system as vmvault's), and is told its
password through the environment.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from vmvault.bench.measure import RunResult, run_measured

PASSWORD = "vmvault-bench-password"


def synced(res: RunResult, path: Path) -> RunResult:
    """A restore command followed by ``sync FILE`` (an fsync of the restored file), timed
    as one: a restore counts as done when its data are durable, as vmvault's restore_disk
    fsyncs before it returns."""
    if not res.ok:
        return res
    return res.then(run_measured(["sync", "--", str(path)]))


def tool_version(binary: str) -> str:
    exe = shutil.which(binary)
    if not exe:
        return "not installed"
    try:
        out = subprocess.run(
            [exe, "--version"] if binary != "restic" else [exe, "version"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


@dataclass
class Peer:
    name: str
    home: Path
    archives: int = field(default=0, init=False)

    @property
    def repo(self) -> Path:
        return self.home / "repo"

    def available(self) -> bool:
        return shutil.which(self.name) is not None

    def env(self) -> dict[str, str]:
        raise NotImplementedError

    def init(self) -> RunResult:
        raise NotImplementedError

    def backup(self, file: Path) -> RunResult:
        raise NotImplementedError

    def restore(self, target_dir: Path, file: Path) -> tuple[RunResult, Path]:
        """Restore the latest backup of ``file`` under ``target_dir`` and fsync the restored
        file (``sync FILE``, timed with the restore); returns where it went."""
        raise NotImplementedError


class Restic(Peer):
    def __init__(self, home: Path) -> None:
        super().__init__("restic", home)

    def env(self) -> dict[str, str]:
        return {
            "RESTIC_PASSWORD": PASSWORD,
            "RESTIC_REPOSITORY": str(self.repo),
            "RESTIC_CACHE_DIR": str(self.home / "cache"),
            "XDG_CACHE_HOME": str(self.home / "cache"),
        }

    def init(self) -> RunResult:
        self.home.mkdir(parents=True, exist_ok=True)
        return run_measured(["restic", "init", "--repository-version", "2"], env=self.env()).check()

    def backup(self, file: Path) -> RunResult:
        self.archives += 1
        return run_measured(
            ["restic", "--compression", "auto", "backup", "--host", "vmvault-bench", str(file)],
            env=self.env(),
        ).check()

    def restore(self, target_dir: Path, file: Path) -> tuple[RunResult, Path]:
        target_dir.mkdir(parents=True, exist_ok=True)
        res = run_measured(
            ["restic", "restore", "latest", "--host", "vmvault-bench", "--target", str(target_dir)],
            env=self.env(),
        ).check()
        path = target_dir / str(file.resolve()).lstrip("/")
        return synced(res, path).check(), path


class Borg(Peer):
    def __init__(self, home: Path) -> None:
        super().__init__("borg", home)

    def env(self) -> dict[str, str]:
        return {
            "BORG_PASSPHRASE": PASSWORD,
            "BORG_BASE_DIR": str(self.home / "base"),
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        }

    def init(self) -> RunResult:
        self.home.mkdir(parents=True, exist_ok=True)
        return run_measured(
            ["borg", "init", "--encryption=repokey-blake2", str(self.repo)], env=self.env()
        ).check()

    def backup(self, file: Path) -> RunResult:
        self.archives += 1
        return run_measured(
            [
                "borg",
                "create",
                "--compression",
                "zstd,3",
                f"{self.repo}::bench-{self.archives}",
                str(file),
            ],
            env=self.env(),
        ).check()

    def restore(self, target_dir: Path, file: Path) -> tuple[RunResult, Path]:
        target_dir.mkdir(parents=True, exist_ok=True)
        res = run_measured(
            ["borg", "extract", "--sparse", f"{self.repo}::bench-{self.archives}"],
            env=self.env(),
            cwd=target_dir,
        ).check()
        path = target_dir / str(file.resolve()).lstrip("/")
        return synced(res, path).check(), path
