"""`appliance replicate`: sealed objects, packs and a sealed snapshot of the index, keyring and
trail to the off-site target, each counted only once verified there; the RPO it keeps."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import msgpack
import xxhash

from appliance.admin.home import audit_trail
from appliance.audit.events import EventID, event
from appliance.backends.filesystem import fanout_path
from appliance.errors import ApplianceError
from appliance.format import sealed
from appliance.human import local_time
from appliance.jobs.offsite.snapshot import seal_file
from appliance.jobs.offsite.target import (
    ReplicationError,
    Target,
    configured_target,
    files_from,
    list_names,
    pull,
    push,
    remove_names,
    run_rsync,
)
from appliance.store import tiering
from appliance.store.archive import Archive
from appliance.store.catalog import Catalog, Replica, View
from appliance.store.catalog.records import PackCopy
from appliance.store.index import data_file


@dataclass
class ReplicationReport:
    run: int
    target: str
    started: float
    finished: float = 0.0
    objects_sent: int = 0
    bytes_sent: int = 0
    objects_verified: int = 0
    objects_deleted: int = 0
    resent: int = 0
    verified: bool = False
    failure: str = ""
    rpo_lag_s: float | None = None

    def as_dict(self) -> dict:
        return asdict(self) | {"line": self.line()}

    def line(self) -> str:
        state = "verified" if self.verified else f"FAILED: {self.failure}"
        when = local_time(self.finished or self.started)
        return (f"replicate to {self.target}: {self.objects_sent} objects, {self.bytes_sent / 1e6:,.1f} MB sent, "
                f"{self.objects_deleted} deleted, {state}, {when}")


class _Wanted(NamedTuple):
    """An object the off-site copy must hold: where it is read from, what it must read as."""

    tier: str
    name: str
    size: int
    xxh3: bytes


def _wanted(snapshot: Catalog, archive: Archive) -> dict[str, _Wanted]:
    """Off-site path -> what it holds, for every stored version: its hot file, or for a version
    with no hot copy one pack that holds it (quickest tier first)."""
    hot_name = archive.hot.name
    wanted = {}
    with snapshot.read(fresh=False) as view:
        packs = {pack.id: pack for pack in view.packs()}
        for blob in view.blobs():
            hot = blob.hot(hot_name)
            if hot is not None:
                wanted[f"objects/{fanout_path(hot.name)}"] = _Wanted(hot_name, hot.name, blob.sealed_size, blob.xxh3)
                continue
            for tier in tiering.by_read_preference(archive.config, blob.copies):
                pack = packs.get(blob.copies[tier].where)
                if pack is not None:
                    wanted[f"packs/{fanout_path(pack.id)}"] = _Wanted(tier, pack.id, pack.size, pack.xxh3)
                    break
    return wanted


def replicate(archive: Archive, target: Target | None = None, *, verify_all: bool = False,
              on_event=lambda kind, data: None) -> ReplicationReport:
    config = archive.config
    target = target or configured_target(config)
    started = time.time()
    report = ReplicationReport(int(started * 1e6), str(target), started)
    for stale in config.home.glob(".replicate-*"):  # left by a run that was killed (callers hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".replicate-", dir=config.home))
    try:
        _replicate(archive, target, staging, report, verify_all, on_event)
        report.verified = True
    except ApplianceError as exc:
        report.failure = str(exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        report.finished = time.time()
        report.rpo_lag_s = rpo_lag(archive, report.finished)
        archive.catalog.record_replication_run(report.run, report.as_dict())
        _rpo_alarm(archive, report)
        archive.audit.record(event(
            EventID.APPLICATION_ACTIVITY, op="replicate", action="E", outcome=0 if report.verified else 8,
            dest=str(target), line=report.line(), reason=report.failure))
    return report


def _replicate(archive: Archive, target: Target, staging: Path, report: ReplicationReport, verify_all: bool,
               on_event) -> None:
    kek_id, key = archive.keyring.snapshot_key()
    run = f"{report.run:016x}"
    # 1. A consistent snapshot of the index and keyring; what it lists is what this run sends.
    (staging / "index").mkdir()
    (staging / "keyring").mkdir()
    with archive.catalog.snapshot(staging / "index") as snapshot:
        wanted = _wanted(snapshot, archive)
    archive.keyring.copy_to(staging / "keyring")
    audit_trail(archive.config).copy_to(staging / "audit")
    with archive.catalog.read() as view:
        legacy = _legacy_target(view)
        known = {r.path: r for r in view.replicas() if _on(r, target, legacy)}
    todo = {path: w for path, w in wanted.items() if path not in known}
    check = {path: w for path, w in wanted.items() if verify_all or path not in known}
    on_event("replicate.start", {"objects": len(todo), "target": str(target)})
    # The keyring goes first: it holds the key of every object this run sends, so objects that
    # arrive off-site from a run that fails later can still be restored.
    sealed_dir = staging / "sealed"
    (sealed_dir / "snapshots").mkdir(parents=True)
    (sealed_dir / "manifests").mkdir()
    seal_file(data_file(staging / "keyring"), sealed_dir / "snapshots" / f"{run}.keyring", kek_id, key)
    push(target, sealed_dir, [f"snapshots/{run}.keyring"], "")

    # 2. Objects: hot files straight from the hot tier; packs staged as sealed bytes.
    for path in check:
        tier, pack_id = check[path].tier, check[path].name
        if path.startswith("packs/"):
            dest = staging / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            with archive.tier(tier).open(pack_id) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    _send(target, archive, staging, list(todo))
    report.objects_sent = len(todo)
    report.bytes_sent = sum(w.size for w in todo.values())

    # 3. Verify before anything counts (with --verify, everything off-site); what is missing or
    # differs is sent again, once.
    expected = {path: (w.size, w.xxh3) for path, w in check.items()}
    sources = {"objects/": archive.hot.root, "packs/": staging / "packs",
               "snapshots/": staging / "sealed" / "snapshots"}
    bad = _verify(target, expected, staging, sources)
    if bad:
        report.resent = len(bad)
        on_event("replicate.resend", {"objects": len(bad)})
        _send(target, archive, staging, bad, again=True)
        still = _verify(target, {p: expected[p] for p in bad}, staging, sources)
        if still:
            raise ReplicationError(f"{len(still)} objects do not verify off-site after being sent again")
    report.objects_verified = len(expected)
    now = time.time()
    archive.catalog.record_replicas([Replica(path, size, digest, now, report.run, str(target))
                                     for path, (size, digest) in expected.items()])
    on_event("replicate.verified", {"objects": len(expected)})

    # 4. The index snapshot, then the manifest: the commit point of the run.
    seal_file(data_file(staging / "index"), sealed_dir / "snapshots" / f"{run}.index", kek_id, key)
    with tarfile.open(staging / "audit.tar", "w") as tar:
        tar.add(staging / "audit", arcname="audit")
    seal_file(staging / "audit.tar", sealed_dir / "snapshots" / f"{run}.audit", kek_id, key)
    manifest = {"version": 1, "run": report.run, "time": report.started, "kek_id": kek_id,
                "snapshot": f"snapshots/{run}.index", "keyring": f"snapshots/{run}.keyring",
                "audit": f"snapshots/{run}.audit",
                "objects": {path: [w.size, w.xxh3] for path, w in wanted.items()}}
    with open(sealed_dir / "manifests" / f"{run}.manifest", "wb") as out:
        sealed.seal_bytes(msgpack.packb(manifest), out, data_key=key, key_id=kek_id)
    snapshot_files = [f"snapshots/{run}.index", f"snapshots/{run}.keyring", f"snapshots/{run}.audit"]
    push(target, sealed_dir, snapshot_files, "")
    checks = {p: (os.path.getsize(sealed_dir / p), xxhash.xxh3_128((sealed_dir / p).read_bytes()).digest())
              for p in snapshot_files}
    if _verify(target, checks, staging, sources):
        raise ReplicationError("the index snapshot does not verify off-site")
    push(target, sealed_dir, [f"manifests/{run}.manifest"], "")

    # 5. What was deleted at home goes off-site too; old manifests beyond the count go.
    gone = sorted(set(known) - set(wanted))
    remove_names(target, gone)
    archive.catalog.forget_replicas(gone)
    report.objects_deleted = len(gone)
    manifests = list_names(target, "manifests")
    old = manifests[:-archive.config.appliance.replication.keep_manifests]
    stale = [f"manifests/{m}" for m in old] + [f"snapshots/{m.split('.')[0]}.{kind}" for m in old
                                               for kind in ("index", "keyring", "audit")]
    remove_names(target, stale)


def _send(target: Target, archive: Archive, staging: Path, paths: list[str], again: bool = False) -> None:
    push(target, archive.hot.root, [p[len("objects/"):] for p in paths if p.startswith("objects/")], "objects",
         again=again)
    push(target, staging / "packs", [p[len("packs/"):] for p in paths if p.startswith("packs/")], "packs",
         again=again)


def _verify(target: Target, expected: dict[str, tuple[int, bytes]], staging: Path,
            sources: dict[str, Path]) -> list[str]:
    """Paths whose off-site copy is missing or differs: read back and hashed (local, daemon),
    or compared with the local source by rsync's checksums (ssh)."""
    if not expected:
        return []
    if target.kind == "ssh":
        return _verify_by_checksum(target, expected, sources)
    if target.kind == "local":
        root = Path(target.location)
    else:
        readback = root = staging / "readback"
        try:
            root = pull(target, sorted(expected), "", readback)
        except ReplicationError:
            pass  # what did not come back is counted below
    bad = []
    for path, (size, digest) in expected.items():
        try:
            with open(root / path, "rb") as fp:
                found = sealed.sealed_digest(fp)
        except OSError:
            bad.append(path)
            continue
        if found != (size, digest):
            bad.append(path)
    if target.kind == "daemon":
        shutil.rmtree(readback, ignore_errors=True)
    return bad


def _verify_by_checksum(target: Target, expected: dict[str, tuple[int, bytes]],
                        sources: dict[str, Path]) -> list[str]:
    bad = []
    for prefix, source in sources.items():
        files = [path[len(prefix):] for path in expected if path.startswith(prefix)]
        if not files:
            continue
        with files_from(files) as listing:
            out = run_rsync(target, "-a", "--dry-run", "--checksum", "--itemize-changes", listing, f"{source}/",
                            target.url(prefix.rstrip("/")))
        for line in out.splitlines():
            if len(line) > 12 and line[1] == "f":
                bad.append(prefix + line[12:].strip())
    return bad


def _on(replica: Replica, target: Target, legacy: str) -> bool:
    """Whether a replica record is about this target. Records from before targets were noted
    belong to `legacy`: the target of the last run that did not note targets."""
    return (replica.target or legacy) == str(target)


def _legacy_target(view: View) -> str:
    runs = view.replication_runs()
    return runs[-1]["target"] if runs else ""


def rpo_lag(archive: Archive, now: float) -> float | None:
    """Age in seconds of the oldest stored version not yet verified on the configured off-site
    target (None: none). After a change of target, everything counts as not yet sent."""
    oldest = None
    target = configured_target(archive.config)
    with archive.catalog.read() as view:
        legacy = _legacy_target(view)
        replicas = {r.path for r in view.replicas() if _on(r, target, legacy)}
        packs_on = {p.split("/")[-1] for p in replicas if p.startswith("packs/")}
        for blob in view.blobs():
            hot = blob.hot(archive.hot.name)
            covered = (hot is not None and f"objects/{fanout_path(hot.name)}" in replicas) or any(
                isinstance(copy, PackCopy) and copy.pack in packs_on for copy in blob.copies.values())
            if not covered and (oldest is None or blob.stored < oldest):
                oldest = blob.stored
    return None if oldest is None else max(0.0, now - oldest)


def _rpo_alarm(archive: Archive, report: ReplicationReport) -> None:
    rpo = archive.config.appliance.replication.rpo_hours * 3600
    if report.rpo_lag_s is not None and report.rpo_lag_s > rpo:
        archive.catalog.raise_alarm("replication-rpo",
                                    f"the off-site copy is {report.rpo_lag_s / 3600:.1f} h behind (RPO {rpo // 3600} h)"
                                    + (f"; last run failed: {report.failure}" if report.failure else ""),
                                    "check the target and run `appliance replicate`")
    else:
        archive.catalog.clear_alarm("replication-rpo")
    if report.failure:
        archive.catalog.raise_alarm("replication-failed", f"replication to {report.target} failed: {report.failure}",
                                    "check the target; the next run sends what is missing")
    else:
        archive.catalog.clear_alarm("replication-failed")


def history(archive: Archive) -> list[dict]:
    with archive.catalog.read() as view:
        return view.replication_runs()
