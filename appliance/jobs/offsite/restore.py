"""`appliance restore`: a new home from the latest off-site manifest's snapshot plus every
object off-site (objects newer than the snapshot are indexed from their bytes), the packs on
the new home's `cold` tier; and the off-site trail's signed head for `audit verify --offsite`."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgpack

from appliance import config as cfg
from appliance.admin import home as home_mod
from appliance.admin.home import open_archive
from appliance.audit.chain import utc
from appliance.audit.events import EventID, event
from appliance.backends.filesystem import fanout_path
from appliance.errors import ApplianceError, KeyFileError, KeyMissing, NotFound
from appliance.format import sealed
from appliance.fsutil import fsync_dir, fsync_file, make_dirs, write_file_atomic
from appliance.jobs.offsite.snapshot import unseal_file
from appliance.jobs.offsite.target import (
    PARTIAL_DIR,
    ReplicationError,
    Target,
    configured_target,
    list_names,
    pull,
    run_rsync,
)
from appliance.store.archive import Archive
from appliance.store.index import data_file
from appliance.store.keys import read_key_file, snapshot_key


@dataclass
class RestoreReport:
    manifest: str = ""
    snapshot_time: float = 0.0
    objects: int = 0
    packs: int = 0
    newer_than_snapshot: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def restore(new_home: Path, source: str, key_file: Path, settings: cfg.ReplicationConfig | None = None,
            on_event=lambda kind, data: None) -> RestoreReport:
    """Build a working appliance home from an off-site copy and the key file alone.
    `settings`: how to reach the target (ssh port and key, daemon password file)."""
    new_home = Path(new_home)
    marker = new_home / cfg.RESTORE_MARKER
    if marker.exists():  # a restore that was cut short: what it made goes, and it starts again
        for path in new_home.iterdir():
            if path != marker:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    elif new_home.exists() and any(new_home.iterdir()):
        raise ApplianceError(f"{new_home} is not empty: restore builds a new home; give an empty or new directory")
    if not Path(key_file).exists():
        raise KeyFileError(f"key file {key_file} is missing: the off-site copy cannot be opened without it")
    kek = read_key_file(Path(key_file))
    key = snapshot_key(kek)
    target = Target.parse(source, settings or cfg.ReplicationConfig())
    manifests = list_names(target, "manifests")
    if not manifests:
        raise NotFound(f"no manifest at {target}: not a pacs-vault off-site copy, or nothing was replicated yet")
    report = RestoreReport(manifest=manifests[-1])
    make_dirs(new_home)
    write_file_atomic(marker, b"")
    staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=new_home.parent))
    try:
        manifest = _fetch_manifest(target, report.manifest, kek.key_id, key, staging)
        report.snapshot_time = manifest["time"]
        # The newest keyring off-site: it also holds the keys of objects sent after the snapshot.
        keyrings = [f"snapshots/{n}" for n in list_names(target, "snapshots") if n.endswith(".keyring")]
        newest_keyring = max(keyrings + [manifest["keyring"]])
        fetched = pull(target, [manifest["snapshot"], newest_keyring] + ([manifest["audit"]] if "audit" in manifest
                                                                         else []), "", staging / "fetched")
        for part, name in (("index", manifest["snapshot"]), ("keyring", newest_keyring)):
            (staging / part).mkdir()
            unseal_file(fetched / name, data_file(staging / part), kek.key_id, key)
        audit_dir = _unpack_audit(fetched / manifest["audit"], kek.key_id, key, staging) if "audit" in manifest \
            else None
        on_event("restore.snapshot", {"manifest": report.manifest, "objects": len(manifest["objects"])})
        # Every object off-site, including any sent after the snapshot by a run that did not finish.
        for sub in ("objects", "packs"):
            (staging / sub).mkdir()
            if _list_tree(target, sub):
                run_rsync(target, "-a", target.url(sub + "/"), f"{staging / sub}/")
        for path, (size, digest) in manifest["objects"].items():
            try:
                with open(staging / path, "rb") as fp:
                    if sealed.sealed_digest(fp) != (size, digest):
                        report.errors.append(f"{path}: differs from the manifest")
            except OSError:
                report.errors.append(f"{path}: missing off-site")
        config = home_mod.init(new_home, (Path(key_file).read_bytes(), staging / "keyring", staging / "index",
                                          audit_dir))
        cold = _pack_tier(config)
        _place(staging / "objects", config.resolve(config.hot_tier.path))
        _place(staging / "packs", config.resolve(cold.path))
        with open_archive(config, writer=True) as archive:
            report.objects, report.packs = _adopt(archive, cold.name, report)
            report.newer_than_snapshot = _index_newer(archive, report)
            archive.audit.record(event(
                EventID.APPLICATION_ACTIVITY, op="restore", action="C", outcome=4 if report.errors else 0,
                source=str(target), manifest=report.manifest, snapshot_time=utc(report.snapshot_time),
                objects=report.objects, packs=report.packs, errors=len(report.errors)))
        marker.unlink()
        fsync_dir(new_home)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _fetch_manifest(target: Target, name: str, kek_id: bytes, key: bytes, staging: Path) -> dict:
    fetched = pull(target, [f"manifests/{name}"], "", staging / "fetched")
    plain = staging / "manifest.plain"
    unseal_file(fetched / "manifests" / name, plain, kek_id, key)
    return msgpack.unpackb(plain.read_bytes())


def _unpack_audit(sealed_tar: Path, kek_id: bytes, key: bytes, staging: Path) -> Path:
    """The audit directory of an off-site copy, unsealed under `staging`."""
    unseal_file(sealed_tar, staging / "audit.tar", kek_id, key)
    with tarfile.open(staging / "audit.tar") as tar:
        tar.extractall(staging / "unpacked", filter="data")
    return staging / "unpacked" / "audit"


def offsite_audit_head(config: cfg.Config) -> dict | None:
    """The signed head of the audit trail in the latest off-site copy (None: no copy yet).
    The local trail must still hold what it signed: a trail cut short at home is caught."""
    target = configured_target(config)
    manifests = list_names(target, "manifests")
    if not manifests:
        return None
    kek = read_key_file(config.key_file)
    key = snapshot_key(kek)
    staging = Path(tempfile.mkdtemp(prefix=".audit-check-", dir=config.home))
    try:
        manifest = _fetch_manifest(target, manifests[-1], kek.key_id, key, staging)
        if "audit" not in manifest:
            return None
        fetched = pull(target, [manifest["audit"]], "", staging / "fetched")
        head = _unpack_audit(fetched / manifest["audit"], kek.key_id, key, staging) / "head"
        return json.loads(head.read_bytes())
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _list_tree(target: Target, sub: str) -> bool:
    if target.kind == "local":
        return Path(target.location, sub).is_dir()
    try:
        run_rsync(target, "--list-only", target.url(sub + "/"))
        return True
    except ReplicationError:
        return False


def _place(source: Path, tier_root: Path) -> None:
    """Move restored files into a filesystem tier's fan-out directories, durably."""
    for path in source.rglob("*"):
        # Hidden names are rsync's temporary files left by a transfer that was killed.
        if path.is_file() and PARTIAL_DIR not in path.parts and not path.name.startswith("."):
            dest = tier_root / fanout_path(path.name)
            make_dirs(dest.parent)
            fsync_file(path)  # rsync wrote it without a sync
            os.replace(path, dest)
            fsync_dir(dest.parent)


def _pack_tier(config: cfg.Config) -> cfg.TierConfig:
    """Where the restored packs go: the new home's first filesystem cold tier (`cold` in the
    home `init` makes)."""
    for tier in config.cold_tiers:
        if tier.kind == "filesystem":
            return tier
    raise ApplianceError("the new home has no filesystem cold tier to put the restored packs on")


def _adopt(archive: Archive, cold: str, report: RestoreReport) -> tuple[int, int]:
    """Point the snapshot's catalog at what was restored: hot files on the hot tier, packs on the
    `cold` tier; forget jobs, alarms and replica records of the lost home."""
    hot = archive.hot
    present_hot = set(hot.list())
    present_packs = set(archive.tier(cold).list())
    objects, problems = archive.catalog.adopt_restored(hot.name, present_hot, cold, present_packs)
    report.errors.extend(problems)
    return objects, len(present_packs)


def _index_newer(archive: Archive, report: RestoreReport) -> int:
    """Hot objects the snapshot does not know: stored after it; indexed from their own bytes."""
    from appliance.jobs import fsck

    with archive.catalog.read() as view:
        known = {copy.name for blob in view.blobs() if (copy := blob.hot(archive.hot.name)) is not None}
    added = 0
    for name in sorted(set(archive.hot.list()) - known):
        try:
            if fsck.reindex_blob(lambda name=name: archive.hot.open(name), name, archive.hot.name,
                                 archive.keyring, archive.catalog):
                added += 1
        except KeyMissing:
            archive.hot.delete(name)  # its study was deleted (key destroyed) before the last run
        except ApplianceError as exc:
            report.errors.append(f"object {name}: {exc}")
    return added
