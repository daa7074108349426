"""An off-site target and rsync to and from it: a local path, an rsync daemon, or ssh.

Exit codes other than 0 (23 and 24 included) fail; rsync writes under a partial directory
and moves files in place at the end (`--partial-dir --delay-updates`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import sh

from appliance import config as cfg
from appliance.errors import ApplianceError
from appliance.fsutil import fsync_dir, fsync_file

PARTIAL_DIR = ".rsync-partial"  # where rsync writes until a run moves its files in place


class ReplicationError(ApplianceError):
    """The off-site target failed or refused; nothing that was not verified counts."""

    exit_code = 75


@dataclass(frozen=True)
class Target:
    kind: str  # local, daemon, ssh
    location: str  # path, rsync://..., or host:path, without a trailing slash
    settings: cfg.ReplicationConfig

    @classmethod
    def parse(cls, text: str, settings: cfg.ReplicationConfig, home: Path | None = None) -> "Target":
        text = text.rstrip("/") or "/"
        if text.startswith("rsync://"):
            return cls("daemon", text, settings)
        head = text.split("/", 1)[0]
        if ":" in head and not text.startswith("/"):
            return cls("ssh", text, settings)
        path = Path(text)
        if not path.is_absolute() and home is not None:
            path = home / path
        return cls("local", str(path), settings)

    def url(self, sub: str = "") -> str:
        return f"{self.location}/{sub}" if sub else f"{self.location}/"

    def rsync_options(self) -> list[str]:
        options = ["--timeout", str(self.settings.timeout_s)]
        if self.settings.bwlimit_kbps:
            options += ["--bwlimit", str(self.settings.bwlimit_kbps)]
        if self.kind == "daemon" and self.settings.password_file:
            options += ["--password-file", self.settings.password_file]
        if self.kind == "ssh":
            ssh = ["ssh", "-p", str(self.settings.ssh_port), "-o", "BatchMode=yes"]
            if self.settings.ssh_key:
                ssh += ["-i", self.settings.ssh_key]
            if self.settings.ssh_known_hosts:
                ssh += ["-o", f"UserKnownHostsFile={self.settings.ssh_known_hosts}", "-o", "StrictHostKeyChecking=yes"]
            options += ["-e", " ".join(ssh)]
        return options

    def __str__(self) -> str:
        return self.location


def run_rsync(target: Target, *args: str) -> str:
    try:
        return str(sh.rsync(*target.rsync_options(), *args, _env={**os.environ, "LC_ALL": "C"}))
    except sh.ErrorReturnCode as exc:
        detail = [line for line in exc.stderr.decode("utf-8", "replace").strip().splitlines() if line.strip()]
        raise ReplicationError(f"rsync to {target} failed (exit {exc.exit_code}): "
                               f"{' / '.join(detail[:1] + detail[-1:]) if detail else 'no message'}") from None
    except sh.CommandNotFound:
        raise ReplicationError("rsync is not installed") from None


@contextmanager
def files_from(names: list[str]) -> Iterator[str]:
    """rsync's --files-from option for `names` (paths relative to the source), cleaned up after."""
    with tempfile.NamedTemporaryFile("w", suffix=".list") as listing:
        listing.write("\n".join(names) + "\n")
        listing.flush()
        yield f"--files-from={listing.name}"


def push(target: Target, source: Path, files: list[str], dest: str, *, again: bool = False) -> None:
    """Copy `files` (relative to `source`) to `dest` on the target; they appear whole at the end.
    `again`: send even where size and time match (a copy that rotted in place)."""
    if not files:
        return
    with files_from(files) as listing:
        run_rsync(target, "-a", "--mkpath", f"--partial-dir={PARTIAL_DIR}", "--delay-updates",
                  *(["--ignore-times"] if again else []), listing, f"{source}/", target.url(dest))
    if target.kind == "local":
        _sync_pushed(Path(target.location), dest, files)


def _sync_pushed(root: Path, dest: str, files: list[str]) -> None:
    """rsync syncs nothing: on a local target (a disk of this machine) the files just pushed,
    and every directory from theirs up to the target's parent, are synced before they are
    verified and counted (a power cut would otherwise lose a copy that verified)."""
    directories = {root.parent}
    for name in files:
        path = root / dest / name
        fsync_file(path)
        directories.update(parent for parent in path.parents if parent == root or root in parent.parents)
    for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(directory)


def pull(target: Target, files: list[str], source: str, dest: Path) -> Path:
    """Copy `files` (relative to `source` on the target) into `dest`; returns the directory
    under which they now have those relative paths."""
    dest.mkdir(parents=True, exist_ok=True)
    base, prefix = target.url(source), ""
    if target.kind == "daemon":
        # A daemon reads a files-from list relative to its module, not to the URL's path.
        parts = target.url(source).split("/", 4)  # rsync:, "", host:port, module, path
        base = "/".join(parts[:4]) + "/"
        prefix = parts[4] if len(parts) > 4 else ""
    with files_from([prefix + name for name in files]) as listing:
        run_rsync(target, "-a", listing, base, f"{dest}/")
    return dest / prefix if prefix else dest


def remove_names(target: Target, files: list[str]) -> None:
    """Delete paths on the target (rsync deletes what the empty source lacks)."""
    if not files:
        return
    if target.kind == "local":
        for name in files:
            Path(target.location, name).unlink(missing_ok=True)
        return
    empty = Path(tempfile.mkdtemp())
    for name in files:  # the parents must exist for rsync to see only the files as missing
        (empty / name).parent.mkdir(parents=True, exist_ok=True)
    try:
        with files_from(files) as listing:
            run_rsync(target, "-r", "--delete-missing-args", "--omit-dir-times", listing, f"{empty}/", target.url())
    finally:
        shutil.rmtree(empty, ignore_errors=True)


def list_names(target: Target, sub: str) -> list[str]:
    """File names directly under `sub` on the target ([] when it does not exist yet)."""
    if target.kind == "local":
        path = Path(target.location, sub)
        return sorted(p.name for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    try:
        out = run_rsync(target, "--list-only", target.url(sub + "/"))
    except ReplicationError as exc:
        if "No such file" in str(exc) or "exit 23" in str(exc):
            return []
        raise
    return sorted(line.split()[-1] for line in out.splitlines() if line.startswith("-"))


def configured_target(config: cfg.Config) -> Target:
    settings = config.appliance.replication
    return Target.parse(settings.target, settings, config.home)
