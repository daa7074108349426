"""Off-site replication with rsync, its verification, and the restore from it.

Layout of an off-site target (every name opaque: no UID, name or plaintext hash):

    objects/ab/cd/<name>      sealed blobs, as on the hot tier
    packs/ab/cd/<id>          packs, for versions that have no hot copy
    snapshots/<run>.index     the index (LMDB copy), sealed
    snapshots/<run>.keyring   the keyring (wrapped data keys only), sealed
    snapshots/<run>.audit     the audit trail with a checkpoint signed at the run (tar), sealed
    manifests/<run>.manifest  sealed: every object of the run with its size and xxh3-128

Snapshots and manifests are sealed with a key derived from the KEK (keys.snapshot_key):
the off-site copy is useless without the key file, which never goes with it. A run
copies objects first, snapshots next and its manifest last (the manifest is the
commit point); rsync writes under a partial directory and moves files in place at
the end (`--partial-dir --delay-updates`); exit codes other than 0 (23 and 24
included) fail the run. An object counts as replicated only once verified: read
back and hashed for local and rsync-daemon targets, `rsync --dry-run --checksum
--itemize-changes` showing no difference for ssh. Objects of studies deleted at home
are deleted off-site by the next run; manifests beyond `keep_manifests` go with their
snapshots.

Restore builds a new home from the latest manifest's snapshot plus every object
off-site (objects newer than the snapshot are indexed from their bytes), with the
packs on the home's `cold` tier.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import msgpack
import sh
import xxhash

from appliance import audit
from appliance import config as cfg
from appliance import home as home_mod
from appliance.backends.filesystem import fanout_path
from appliance.errors import ApplianceError, IntegrityError, KeyFileError, KeyMissing, NotFound
from appliance.fsutil import fsync_dir, fsync_file, make_dirs, write_file_atomic
from appliance.store import index as ix
from appliance.store import sealed, tiering
from appliance.store.alarms import clear_alarm, raise_alarm
from appliance.store.archive import Archive
from appliance.store.index import Index
from appliance.store.keys import read_key_file, snapshot_key

_PARTIAL = ".rsync-partial"


class ReplicationError(ApplianceError):
    """The off-site target failed or refused; nothing that was not verified counts."""

    exit_code = 75


# -- targets ---------------------------------------------------------------------------------

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


def _rsync(target: Target, *args: str) -> str:
    try:
        return str(sh.rsync(*target.rsync_options(), *args, _env={**os.environ, "LC_ALL": "C"}))
    except sh.ErrorReturnCode as exc:
        detail = [line for line in exc.stderr.decode("utf-8", "replace").strip().splitlines() if line.strip()]
        raise ReplicationError(f"rsync to {target} failed (exit {exc.exit_code}): "
                               f"{' / '.join(detail[:1] + detail[-1:]) if detail else 'no message'}") from None
    except sh.CommandNotFound:
        raise ReplicationError("rsync is not installed") from None


@contextmanager
def _files_from(names: list[str]) -> Iterator[str]:
    """rsync's --files-from option for `names` (paths relative to the source), cleaned up after."""
    with tempfile.NamedTemporaryFile("w", suffix=".list") as listing:
        listing.write("\n".join(names) + "\n")
        listing.flush()
        yield f"--files-from={listing.name}"


def _push(target: Target, source: Path, files: list[str], dest: str, *, again: bool = False) -> None:
    """Copy `files` (relative to `source`) to `dest` on the target; they appear whole at the end.
    `again`: send even where size and time match (a copy that rotted in place)."""
    if not files:
        return
    with _files_from(files) as listing:
        _rsync(target, "-a", "--mkpath", f"--partial-dir={_PARTIAL}", "--delay-updates",
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


def _pull(target: Target, files: list[str], source: str, dest: Path) -> Path:
    """Copy `files` (relative to `source` on the target) into `dest`; returns the directory
    under which they now have those relative paths."""
    dest.mkdir(parents=True, exist_ok=True)
    base, prefix = target.url(source), ""
    if target.kind == "daemon":
        # A daemon reads a files-from list relative to its module, not to the URL's path.
        parts = target.url(source).split("/", 4)  # rsync:, "", host:port, module, path
        base = "/".join(parts[:4]) + "/"
        prefix = parts[4] if len(parts) > 4 else ""
    with _files_from([prefix + name for name in files]) as listing:
        _rsync(target, "-a", listing, base, f"{dest}/")
    return dest / prefix if prefix else dest


def _remove(target: Target, files: list[str]) -> None:
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
        with _files_from(files) as listing:
            _rsync(target, "-r", "--delete-missing-args", "--omit-dir-times", listing, f"{empty}/", target.url())
    finally:
        shutil.rmtree(empty, ignore_errors=True)


def _list(target: Target, sub: str) -> list[str]:
    """File names directly under `sub` on the target ([] when it does not exist yet)."""
    if target.kind == "local":
        path = Path(target.location, sub)
        return sorted(p.name for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    try:
        out = _rsync(target, "--list-only", target.url(sub + "/"))
    except ReplicationError as exc:
        if "No such file" in str(exc) or "exit 23" in str(exc):
            return []
        raise
    return sorted(line.split()[-1] for line in out.splitlines() if line.startswith("-"))


# -- sealing what is not a blob ----------------------------------------------------------------

def _seal_file(src: Path, dst: Path, key_id: bytes, key: bytes) -> None:
    digest = hashlib.sha256()
    with open(src, "rb") as fp:
        while chunk := fp.read(1 << 20):
            digest.update(chunk)
    with open(src, "rb") as fp, open(dst, "wb") as out:
        sealed.seal(fp, src.stat().st_size, out, data_key=key, key_id=key_id, content_address=digest.digest())


def _unseal_file(src: Path, dst: Path, kek_id: bytes, key: bytes) -> None:
    with open(src, "rb") as fp, open(dst, "wb") as out:
        header_id = sealed.read_header(fp).key_id
        if header_id != kek_id:
            raise KeyFileError(f"this off-site copy is sealed under KEK {header_id.hex()[:8]}, "
                               f"the key file holds KEK {kek_id.hex()[:8]}: wrong key file")
        fp.seek(0)
        try:
            _, _, chunks = sealed.open_sealed(fp, lambda _: key)
            for chunk in chunks:
                out.write(chunk)
        except IntegrityError as exc:
            raise KeyFileError(f"the key file does not open this off-site copy ({exc})") from None


# -- replicate -------------------------------------------------------------------------------

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
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.finished or self.started))
        return (f"replicate to {self.target}: {self.objects_sent} objects, {self.bytes_sent / 1e6:,.1f} MB sent, "
                f"{self.objects_deleted} deleted, {state}, {when}")


def _wanted(snapshot: Index, archive: Archive) -> dict[str, tuple[str, str, dict]]:
    """Off-site path -> (source tier, object name, record) for every stored version: its hot
    file, or for a version with no hot copy one pack that holds it (quickest tier first)."""
    hot_name = archive.hot.name
    wanted = {}
    with snapshot.read() as t:
        packs = {key.decode(): rec for key, rec in t.items("packs")}
        for _, blob in t.items("blobs"):
            hot = blob["copies"].get(hot_name)
            if hot is not None:
                wanted[f"objects/{fanout_path(hot['name'])}"] = (hot_name, hot["name"], blob)
                continue
            for tier in tiering.by_read_preference(archive.config, blob["copies"]):
                pack_id = blob["copies"][tier].get("pack")
                if pack_id in packs:
                    wanted[f"packs/{fanout_path(pack_id)}"] = (tier, pack_id, packs[pack_id])
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
        archive.index.write(lambda t: t.put("replication_runs", struct.pack(">Q", report.run), report.as_dict()))
        _rpo_alarm(archive, report)
        archive.audit.record(audit.event(
            "Application Activity", op="replicate", action="E", outcome=0 if report.verified else 8,
            dest=str(target), line=report.line(), reason=report.failure))
    return report


def _replicate(archive: Archive, target: Target, staging: Path, report: ReplicationReport, verify_all: bool,
               on_event) -> None:
    kek_id, key = archive.keyring.snapshot_key()
    run = f"{report.run:016x}"
    # 1. A consistent snapshot of the index and keyring; what it lists is what this run sends.
    (staging / "index").mkdir()
    (staging / "keyring").mkdir()
    archive.index.copy_to(staging / "index")
    archive.keyring.copy_to(staging / "keyring")
    archive.audit.copy_to(staging / "audit")
    snapshot = Index(staging / "index", map_size=archive.index.map_size)
    try:
        wanted = _wanted(snapshot, archive)
    finally:
        snapshot.close()
    with archive.index.read() as t:
        legacy = _legacy_target(t)
        known = {key.decode(): rec for key, rec in t.items("replicas") if _on(rec, target, legacy)}
    todo = {path: w for path, w in wanted.items() if path not in known}
    check = {path: w for path, w in wanted.items() if verify_all or path not in known}
    on_event("replicate.start", {"objects": len(todo), "target": str(target)})
    # The keyring goes first: it holds the key of every object this run sends, so objects that
    # arrive off-site from a run that fails later can still be restored.
    sealed_dir = staging / "sealed"
    (sealed_dir / "snapshots").mkdir(parents=True)
    (sealed_dir / "manifests").mkdir()
    _seal_file(staging / "keyring" / "data.mdb", sealed_dir / "snapshots" / f"{run}.keyring", kek_id, key)
    _push(target, sealed_dir, [f"snapshots/{run}.keyring"], "")

    # 2. Objects: hot files straight from the hot tier; packs staged as sealed bytes.
    for path in check:
        tier, pack_id, _ = check[path]
        if path.startswith("packs/"):
            dest = staging / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            with archive.tier(tier).open(pack_id) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    _send(target, archive, staging, list(todo))
    report.objects_sent = len(todo)
    report.bytes_sent = sum(_size(w) for w in todo.values())

    # 3. Verify before anything counts (with --verify, everything off-site); what is missing or
    # differs is sent again, once.
    expected = {path: (_size(w), _xxh3(w)) for path, w in check.items()}
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
    archive.index.write(lambda t: [t.put("replicas", path, {"size": size, "xxh3": digest, "verified": now,
                                                            "run": report.run, "target": str(target)})
                                   for path, (size, digest) in expected.items()])
    on_event("replicate.verified", {"objects": len(expected)})

    # 4. The index snapshot, then the manifest: the commit point of the run.
    _seal_file(staging / "index" / "data.mdb", sealed_dir / "snapshots" / f"{run}.index", kek_id, key)
    with tarfile.open(staging / "audit.tar", "w") as tar:
        tar.add(staging / "audit", arcname="audit")
    _seal_file(staging / "audit.tar", sealed_dir / "snapshots" / f"{run}.audit", kek_id, key)
    manifest = {"version": 1, "run": report.run, "time": report.started, "kek_id": kek_id,
                "snapshot": f"snapshots/{run}.index", "keyring": f"snapshots/{run}.keyring",
                "audit": f"snapshots/{run}.audit",
                "objects": {path: [_size(w), _xxh3(w)] for path, w in wanted.items()}}
    with open(sealed_dir / "manifests" / f"{run}.manifest", "wb") as out:
        sealed.seal_bytes(msgpack.packb(manifest), out, data_key=key, key_id=kek_id)
    snapshot_files = [f"snapshots/{run}.index", f"snapshots/{run}.keyring", f"snapshots/{run}.audit"]
    _push(target, sealed_dir, snapshot_files, "")
    checks = {p: (os.path.getsize(sealed_dir / p), xxhash.xxh3_128((sealed_dir / p).read_bytes()).digest())
              for p in snapshot_files}
    if _verify(target, checks, staging, sources):
        raise ReplicationError("the index snapshot does not verify off-site")
    _push(target, sealed_dir, [f"manifests/{run}.manifest"], "")

    # 5. What was deleted at home goes off-site too; old manifests beyond the count go.
    gone = sorted(set(known) - set(wanted))
    _remove(target, gone)
    archive.index.write(lambda t: [t.delete("replicas", path) for path in gone])
    report.objects_deleted = len(gone)
    manifests = _list(target, "manifests")
    old = manifests[:-archive.config.appliance.replication.keep_manifests]
    stale = [f"manifests/{m}" for m in old] + [f"snapshots/{m.split('.')[0]}.{kind}" for m in old
                                                for kind in ("index", "keyring", "audit")]
    _remove(target, stale)


def _send(target: Target, archive: Archive, staging: Path, paths: list[str], again: bool = False) -> None:
    _push(target, archive.hot.root, [p[len("objects/"):] for p in paths if p.startswith("objects/")], "objects",
          again=again)
    _push(target, staging / "packs", [p[len("packs/"):] for p in paths if p.startswith("packs/")], "packs",
          again=again)


def _size(wanted: tuple[str, str, dict]) -> int:
    tier, _, record = wanted
    return record["sealed_size"] if "sealed_size" in record else record["size"]


def _xxh3(wanted: tuple[str, str, dict]) -> bytes:
    return wanted[2]["xxh3"]


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
            root = _pull(target, sorted(expected), "", readback)
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
        with _files_from(files) as listing:
            out = _rsync(target, "-a", "--dry-run", "--checksum", "--itemize-changes", listing, f"{source}/",
                         target.url(prefix.rstrip("/")))
        for line in out.splitlines():
            if len(line) > 12 and line[1] == "f":
                bad.append(prefix + line[12:].strip())
    return bad


# -- RPO -------------------------------------------------------------------------------------

def configured_target(config: cfg.Config) -> Target:
    settings = config.appliance.replication
    return Target.parse(settings.target, settings, config.home)


def _on(replica: dict, target: Target, legacy: str) -> bool:
    """Whether a replica record is about this target. Records from before targets were noted
    belong to `legacy`: the target of the last run that did not note targets."""
    return replica.get("target", legacy) == str(target)


def _legacy_target(t: ix.Txn) -> str:
    runs = [run for _, run in t.items("replication_runs")]
    return runs[-1]["target"] if runs else ""


def rpo_lag(archive: Archive, now: float) -> float | None:
    """Age in seconds of the oldest stored version not yet verified on the configured off-site
    target (None: none). After a change of target, everything counts as not yet sent."""
    oldest = None
    target = configured_target(archive.config)
    with archive.index.read() as t:
        legacy = _legacy_target(t)
        replicas = {key.decode() for key, rec in t.items("replicas") if _on(rec, target, legacy)}
        packs_on = {p.split("/")[-1] for p in replicas if p.startswith("packs/")}
        for _, blob in t.items("blobs"):
            hot = blob["copies"].get(archive.hot.name)
            covered = (hot is not None and f"objects/{fanout_path(hot['name'])}" in replicas) or any(
                copy.get("pack") in packs_on for copy in blob["copies"].values())
            if not covered and (oldest is None or blob["stored"] < oldest):
                oldest = blob["stored"]
    return None if oldest is None else max(0.0, now - oldest)


def _rpo_alarm(archive: Archive, report: ReplicationReport) -> None:
    rpo = archive.config.appliance.replication.rpo_hours * 3600
    if report.rpo_lag_s is not None and report.rpo_lag_s > rpo:
        raise_alarm(archive.index, "replication-rpo",
                    f"the off-site copy is {report.rpo_lag_s / 3600:.1f} h behind (RPO {rpo // 3600} h)"
                    + (f"; last run failed: {report.failure}" if report.failure else ""),
                    "check the target and run `appliance replicate`")
    else:
        clear_alarm(archive.index, "replication-rpo")
    if report.failure:
        raise_alarm(archive.index, "replication-failed", f"replication to {report.target} failed: {report.failure}",
                    "check the target; the next run sends what is missing")
    else:
        clear_alarm(archive.index, "replication-failed")


def history(archive: Archive) -> list[dict]:
    with archive.index.read() as t:
        return [run for _, run in t.items("replication_runs")]


# -- restore ---------------------------------------------------------------------------------

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
    manifests = _list(target, "manifests")
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
        keyrings = [f"snapshots/{n}" for n in _list(target, "snapshots") if n.endswith(".keyring")]
        newest_keyring = max(keyrings + [manifest["keyring"]])
        fetched = _pull(target, [manifest["snapshot"], newest_keyring] + ([manifest["audit"]] if "audit" in manifest
                                                                          else []), "", staging / "fetched")
        for part, name in (("index", manifest["snapshot"]), ("keyring", newest_keyring)):
            (staging / part).mkdir()
            _unseal_file(fetched / name, staging / part / "data.mdb", kek.key_id, key)
        audit_dir = _unpack_audit(fetched / manifest["audit"], kek.key_id, key, staging) if "audit" in manifest \
            else None
        on_event("restore.snapshot", {"manifest": report.manifest, "objects": len(manifest["objects"])})
        # Every object off-site, including any sent after the snapshot by a run that did not finish.
        for sub in ("objects", "packs"):
            (staging / sub).mkdir()
            if _list_tree(target, sub):
                _rsync(target, "-a", target.url(sub + "/"), f"{staging / sub}/")
        for path, (size, digest) in manifest["objects"].items():
            try:
                with open(staging / path, "rb") as fp:
                    if sealed.sealed_digest(fp) != (size, digest):
                        report.errors.append(f"{path}: differs from the manifest")
            except OSError:
                report.errors.append(f"{path}: missing off-site")
        config = home_mod.init(new_home, (Path(key_file).read_bytes(), staging / "keyring", staging / "index",
                                          audit_dir))
        _place(staging / "objects", config.resolve(config.hot_tier.path))
        _place(staging / "packs", config.resolve(config.tiers["cold"].path))
        with Archive.open(config, writer=True) as archive:
            report.objects, report.packs = _adopt(archive, report)
            report.newer_than_snapshot = _index_newer(archive, report)
            archive.audit.record(audit.event(
                "Application Activity", op="restore", action="C", outcome=4 if report.errors else 0,
                source=str(target), manifest=report.manifest, snapshot_time=audit.utc(report.snapshot_time),
                objects=report.objects, packs=report.packs, errors=len(report.errors)))
        marker.unlink()
        fsync_dir(new_home)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _fetch_manifest(target: Target, name: str, kek_id: bytes, key: bytes, staging: Path) -> dict:
    fetched = _pull(target, [f"manifests/{name}"], "", staging / "fetched")
    plain = staging / "manifest.plain"
    _unseal_file(fetched / "manifests" / name, plain, kek_id, key)
    return msgpack.unpackb(plain.read_bytes())


def _unpack_audit(sealed_tar: Path, kek_id: bytes, key: bytes, staging: Path) -> Path:
    """The audit directory of an off-site copy, unsealed under `staging`."""
    _unseal_file(sealed_tar, staging / "audit.tar", kek_id, key)
    with tarfile.open(staging / "audit.tar") as tar:
        tar.extractall(staging / "unpacked", filter="data")
    return staging / "unpacked" / "audit"


def offsite_audit_head(config: cfg.Config) -> dict | None:
    """The signed head of the audit trail in the latest off-site copy (None: no copy yet).
    The local trail must still hold what it signed: a trail cut short at home is caught."""
    target = configured_target(config)
    manifests = _list(target, "manifests")
    if not manifests:
        return None
    kek = read_key_file(config.key_file)
    key = snapshot_key(kek)
    staging = Path(tempfile.mkdtemp(prefix=".audit-check-", dir=config.home))
    try:
        manifest = _fetch_manifest(target, manifests[-1], kek.key_id, key, staging)
        if "audit" not in manifest:
            return None
        fetched = _pull(target, [manifest["audit"]], "", staging / "fetched")
        head = _unpack_audit(fetched / manifest["audit"], kek.key_id, key, staging) / "head"
        return json.loads(head.read_bytes())
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _list_tree(target: Target, sub: str) -> bool:
    if target.kind == "local":
        return Path(target.location, sub).is_dir()
    try:
        _rsync(target, "--list-only", target.url(sub + "/"))
        return True
    except ReplicationError:
        return False


def _place(source: Path, tier_root: Path) -> None:
    """Move restored files into a filesystem tier's fan-out directories, durably."""
    for path in source.rglob("*"):
        # Hidden names are rsync's temporary files left by a transfer that was killed.
        if path.is_file() and _PARTIAL not in path.parts and not path.name.startswith("."):
            dest = tier_root / fanout_path(path.name)
            make_dirs(dest.parent)
            fsync_file(path)  # rsync wrote it without a sync
            os.replace(path, dest)
            fsync_dir(dest.parent)


def _adopt(archive: Archive, report: RestoreReport) -> tuple[int, int]:
    """Point the snapshot's index at what was restored: hot files on the hot tier, packs on the
    `cold` tier; forget jobs, alarms and replica records of the lost home."""
    hot, cold = archive.hot, archive.tier("cold")
    present_hot = set(hot.list())
    present_packs = set(cold.list())

    def adopt(t: ix.Txn) -> tuple[int, int]:
        for key, record in list(t.items("packs")):
            pack_id = key.decode()
            if pack_id in present_packs:
                record.update(tier="cold", where="")
                t.put("packs", pack_id, record)
            else:
                t.delete("packs", pack_id)
        objects = 0
        for ca, blob in list(t.items("blobs")):
            copies = {}
            hot_copy = blob["copies"].get(hot.name)
            if hot_copy is not None and hot_copy["name"] in present_hot:
                copies[hot.name] = hot_copy
                objects += 1
            for tier, copy in blob["copies"].items():
                if copy.get("pack") in present_packs and "cold" not in copies:
                    copies["cold"] = copy
            if not copies:
                report.errors.append(f"version {ca.hex()[:16]} of instance {blob['sop']}: no copy off-site")
            blob["copies"] = copies
            t.put("blobs", ca, blob)
        for key, study in list(t.items("studies")):
            ids = [p for ids in study.get("packs", {}).values() for p in ids if p in present_packs]
            study["packs"] = {"cold": ids} if ids else {}
            t.put("studies", key, study)
        for db in ("jobs", "alarms", "replicas", "scrub"):
            for key, _ in list(t.items(db)):
                t.delete(db, key)
        return objects, len(present_packs)
    return archive.index.write(adopt)


def _index_newer(archive: Archive, report: RestoreReport) -> int:
    """Hot objects the snapshot does not know: stored after it; indexed from their own bytes."""
    from appliance import fsck

    with archive.index.read() as t:
        known = {b["copies"][archive.hot.name]["name"] for _, b in t.items("blobs") if archive.hot.name in b["copies"]}
    added = 0
    for name in sorted(set(archive.hot.list()) - known):
        try:
            if fsck._reindex_blob(lambda name=name: archive.hot.open(name), name, archive.hot.name,
                                  archive.keyring, archive.index):
                added += 1
        except KeyMissing:
            archive.hot.delete(name)  # its study was deleted (key destroyed) before the last run
        except ApplianceError as exc:
            report.errors.append(f"object {name}: {exc}")
    return added
