"""Scrub: verify every copy on every tier, least recently verified first, and mend what is bad.

- fast: the sealed bytes of each copy against the size and xxh3-128 the index keeps
  (no key needed: works on tape, S3 and anywhere the key is not);
- deep: decrypt, decompress and re-hash every copy to its SHA-256 content address,
  and read each pack's sealed trailer.

Work comes in units: one hot blob file, or one pack on a cold tier (read once,
sequentially, as tape wants). Each unit's verification time is committed as soon
as it is checked, and the run in progress is recorded in the index ("scrub" db):
a scrub that is killed or stopped resumes where it was, re-checking nothing that
this run recorded and missing nothing.

A bad copy with a good copy elsewhere is rewritten (hot: atomically from a pack;
cold: the bad blobs go into a new pack, read back and verified like any pack) and
the new copy verified again. A version with no good copy left is marked damaged
and raises an alarm; retrieval answers a failure for it, never its bytes. Reads
are paid for from a token bucket (`--rate`), so ingest and retrieval keep their
speed, and the process asks the kernel for idle I/O priority.
"""

from __future__ import annotations

import io
import os
import subprocess
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

import xxhash

from appliance.audit.events import EventID, event
from appliance.backends.wrappers import Throttled, TokenBucket
from appliance.errors import ApplianceError, BlobMissing, IntegrityError, KeyMissing, TierUnavailable
from appliance.format import pack, sealed
from appliance.human import human_bytes, local_time
from appliance.store import tiering
from appliance.store.archive import Archive
from appliance.store.catalog import Blob

_DAY = 86400
_READ = 1 << 20
_MARK_BATCH, _MARK_EVERY_S = 256, 1.0


@dataclass(frozen=True)
class Unit:
    kind: str  # "blob" (a hot file) or "pack"
    tier: str
    id: str  # object name on the tier
    size: int
    last: float  # last verification of the depth asked for
    blobs: tuple[bytes, ...]  # content addresses whose copies it holds


def units(archive: Archive, deep: bool, tiers: Iterable[str] | None = None) -> list[Unit]:
    """Every copy on the given tiers, least recently verified first."""
    wanted = set(tiers) if tiers is not None else set(archive.config.tiers)
    hot = archive.hot.name
    out = []
    with archive.catalog.read() as view:
        if hot in wanted:
            for blob in view.blobs():
                copy = blob.hot(hot)
                if copy is not None:
                    out.append(Unit("blob", hot, copy.name, blob.sealed_size, copy.deep if deep else copy.verified,
                                    (blob.ca,)))
        for record in view.packs():
            if record.tier in wanted:
                out.append(Unit("pack", record.tier, record.id, record.size,
                                record.deep if deep else record.verified, record.blobs))
    out.sort(key=lambda u: (u.last, u.tier, u.id))
    return out


class _Hashing(io.RawIOBase):
    """Counts and hashes (xxh3-128) every byte read through it."""

    def __init__(self, raw):
        self._raw, self.size, self.xxh = raw, 0, xxhash.xxh3_128()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._raw.readinto(buffer)
        if count:
            self.xxh.update(memoryview(buffer)[:count])
            self.size += count
        return count


@dataclass
class Finding:
    study: str
    instance: str
    tier: str
    copy: str
    problem: str
    action: str = ""

    def as_dict(self) -> dict:
        return vars(self)


@dataclass
class ScrubReport:
    id: int  # start time in microseconds
    deep: bool
    started: float
    finished: int = 0
    resumed: bool = False
    copies_checked: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)
    coverage: dict = field(default_factory=dict)
    complete: bool = False

    @property
    def repaired(self) -> int:
        return sum(1 for f in self.findings if f.action.startswith("repaired"))

    @property
    def unrecoverable(self) -> int:
        return sum(1 for f in self.findings if f.action.startswith("unrecoverable"))

    def line(self) -> str:
        """One line in the spirit of `zpool status`."""
        kind = "deep scrub" if self.deep else "scrub"
        state = "finished" if self.complete else "stopped"
        when = local_time(self.finished or self.started)
        minutes = self.seconds / 60
        duration = f"{minutes:.0f} min" if minutes >= 1 else f"{self.seconds:.0f} s"
        text = (f"{kind} repaired {self.repaired} copies, {self.unrecoverable} unrecoverable, "
                f"{human_bytes(self.bytes_read)} in {duration}, {state} {when}")
        if self.unreachable:
            text += f"; {len(self.unreachable)} copies not reachable"
        return text

    def as_dict(self) -> dict:
        out = {k: v for k, v in vars(self).items() if k != "findings"}
        out.update(findings=[f.as_dict() for f in self.findings], repaired=self.repaired,
                   unrecoverable=self.unrecoverable, line=self.line())
        return out


def lower_io_priority() -> None:
    """Be polite: lowest CPU priority and idle I/O class, where the OS allows it."""
    try:
        os.nice(10)
    except OSError:
        pass
    try:
        subprocess.run(["ionice", "-c", "3", "-p", str(os.getpid())], capture_output=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        pass


class Scrubber:
    def __init__(self, archive: Archive, *, deep: bool, rate: float = 0, tiers: list[str] | None = None,
                 clock: Callable[[], float] = time.time, bucket: TokenBucket | None = None,
                 workers: int = 3, on_event: Callable[[str, dict], None] = lambda kind, data: None):
        self.archive, self.deep, self.tiers, self.workers = archive, deep, tiers, workers
        self.clock, self.on_event = clock, on_event
        self.bucket = bucket or (TokenBucket(rate) if rate else None)

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> ScrubReport:
        # Verification times are kept to the microsecond: a run knows its own marks from those of
        # a run that ended the same second.
        now = self.clock()
        tiers = sorted(self.tiers or self.archive.config.tiers)
        current = self._current()
        if current:
            self._clean_pending(current)
        resumed = bool(current and current["deep"] == self.deep and current["tiers"] == tiers)
        if not resumed:
            current = {"id": int(now * 1e6), "deep": self.deep, "started": now, "tiers": tiers}
            self.archive.catalog.begin_scrub_run(current)
        report = ScrubReport(current["id"], self.deep, current["started"], resumed=resumed)
        todo = units(self.archive, self.deep, tiers)
        if resumed:  # what this run verified before it was stopped is done
            todo = [u for u in todo if u.last < current["started"]]
        self.on_event("scrub.start", {"units": len(todo), "bytes": sum(u.size for u in todo),
                                      "deep": self.deep, "resumed": resumed})
        start = time.monotonic()
        self._marks, self._marked_at = [], start
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="scrub") as pool:
                window: deque = deque()
                for unit in todo:  # a few units ahead, in order: bounded memory, both cores busy
                    window.append((unit, pool.submit(self._check, unit)))
                    if len(window) > 2 * self.workers:
                        done, future = window.popleft()
                        self._record(done, future.result(), report)
                while window:
                    done, future = window.popleft()
                    self._record(done, future.result(), report)
        finally:
            self._commit_marks()  # also when stopped (Ctrl-C, SIGTERM): what was checked counts
        report.seconds = round(time.monotonic() - start, 3)
        report.finished = int(self.clock())
        report.complete = True
        report.coverage = coverage(self.archive, report.finished)
        self._finish(report, tiers)
        self.archive.audit.record(event(
            EventID.APPLICATION_ACTIVITY, op="deep scrub" if self.deep else "scrub", action="E",
            outcome=4 if report.unrecoverable else 0, line=report.line(), repaired=report.repaired,
            unrecoverable=report.unrecoverable))
        return report

    def _current(self) -> dict | None:
        with self.archive.catalog.read() as view:
            return view.scrub_run()

    def _finish(self, report: ScrubReport, tiers: list[str]) -> None:
        unreachable_tiers = {line.split(" ", 2)[1] for line in report.unreachable}
        done = [(tier, kind) for tier in tiers if tier not in unreachable_tiers
                for kind in (("fast", "deep") if report.deep else ("fast",))]
        self.archive.catalog.finish_scrub_run(report.id, report.as_dict(), report.started, done)

    # -- one unit ------------------------------------------------------------------------------

    def _reader(self, fp):
        return io.BufferedReader(Throttled(fp, self.bucket), _READ) if self.bucket else fp

    def _check(self, unit: Unit) -> dict[bytes, str] | TierUnavailable:
        """Runs on a worker thread: hashing, decryption and decompression release the GIL."""
        try:
            return self._check_blob(unit) if unit.kind == "blob" else self._check_pack(unit)
        except TierUnavailable as exc:
            return exc

    def _record(self, unit: Unit, bad: dict[bytes, str] | TierUnavailable, report: ScrubReport) -> None:
        """Runs on the scrub's own thread, in order: verification marks and repairs."""
        if isinstance(bad, TierUnavailable):
            exc = bad
            report.unreachable.append(f"tier {unit.tier} {unit.kind} {unit.id}: {exc}")
            self.on_event("scrub.unreachable", {"tier": unit.tier, "kind": unit.kind, "id": unit.id,
                                                "bytes": unit.size})
            return
        report.copies_checked += len(unit.blobs)
        report.bytes_read += unit.size
        now = self.clock()
        good = [ca for ca in unit.blobs if ca not in bad]
        self._marks.append((unit, good, now))
        if bad or len(self._marks) >= _MARK_BATCH or time.monotonic() - self._marked_at > _MARK_EVERY_S:
            self._commit_marks()
        if bad:
            report.findings += self._repair(unit, bad)

    def _commit_marks(self) -> None:
        """Record verification times in one commit for many units: a synced commit per small file
        would cost more than reading it. A kill loses at most these marks (re-checked, not missed)."""
        marks, self._marks = self._marks, []
        self._marked_at = time.monotonic()
        if marks:
            self.archive.catalog.mark_verified([(unit.tier, unit.kind, unit.id, good, now)
                                                for unit, good, now in marks], self.deep)
        for unit, _, _ in marks:  # reported once recorded: what a resumed run will not re-check
            self.on_event("scrub.unit", {"tier": unit.tier, "kind": unit.kind, "id": unit.id, "bytes": unit.size})

    def _check_blob(self, unit: Unit) -> dict[bytes, str]:
        [ca] = unit.blobs
        blob = self._listed(unit, ca)
        if blob is None:
            return {}  # deleted, or its hot copy dropped or replaced meanwhile (a migration, a repair)
        problem = self._check_hot_file(unit.id, ca, blob)
        if problem == "missing" and self._listed(unit, ca) is None:
            return {}  # dropped between the look at the catalog and the open: not a loss
        return {ca: problem} if problem else {}

    def _listed(self, unit: Unit, ca: bytes) -> Blob | None:
        """The version, while its hot copy is still the file the unit names."""
        with self.archive.catalog.read() as view:
            blob = view.blob(ca)
        copy = blob.hot(unit.tier) if blob is not None else None
        return blob if copy is not None and copy.name == unit.id else None

    def _check_hot_file(self, name: str, ca: bytes, blob: Blob) -> str:
        try:
            with self.archive.hot.open(name) as raw:
                return self._check_copy(self._reader(raw), ca, blob)
        except BlobMissing:
            return "missing"

    def _check_pack(self, unit: Unit) -> dict[bytes, str]:
        backend = self.archive.tier(unit.tier)
        with self.archive.catalog.read() as view:
            record = view.pack(unit.id)
            found = [view.blob(ca) for ca in unit.blobs]
        if record is None:
            return {}
        blobs = {b.ca: b for b in found if b is not None and b.in_pack(unit.tier, unit.id)}
        try:
            raw = backend.open(unit.id)
        except BlobMissing:
            return {ca: "pack missing" for ca in blobs}
        with raw:
            fp = self._reader(raw)
            try:
                size, digest = pack.verify_keyless(fp)
                whole_ok = (size, digest) == (record.size, record.xxh3)
            except IntegrityError:
                whole_ok = False
            bad = {}
            if self.deep or not whole_ok:
                for ca, blob in blobs.items():
                    copy = blob.in_pack(unit.tier, unit.id)
                    problem = self._check_copy(pack.Slice(fp, copy.offset, copy.length), ca, blob)
                    if problem:
                        bad[ca] = problem
            trailer = ""
            if self.deep and whole_ok and not bad:
                try:
                    pack.read_trailer(fp, self.archive.keyring.data_key)
                except (IntegrityError, KeyMissing) as exc:
                    trailer = f": {exc}"
            if not bad and (not whole_ok or trailer):
                # The blobs are intact but the pack no longer describes itself (footer or trailer):
                # rewrite it whole so it stays readable on its own.
                return {ca: f"pack footer or trailer damaged{trailer}" for ca in blobs}
            return bad

    def _check_copy(self, raw, ca: bytes, blob: Blob) -> str:
        """One copy of a version, read once: its sealed bytes against the index (size, xxh3-128)
        and, when deep, unsealed to its content address. Returns the problem, or ""."""
        reader = _Hashing(raw)
        buffered = io.BufferedReader(reader, _READ)
        try:
            if self.deep:
                for _ in sealed.unseal(buffered, key_for=self.archive.keyring.data_key, content_address=ca):
                    pass
            while buffered.read(_READ):
                pass
        except (IntegrityError, KeyMissing) as exc:
            return str(exc)
        if (reader.size, reader.xxh.digest()) != (blob.sealed_size, blob.xxh3):
            return f"sealed bytes differ from the index ({reader.size} bytes)"
        return ""

    # -- repair --------------------------------------------------------------------------------

    def _repair(self, unit: Unit, bad: dict[bytes, str]) -> list[Finding]:
        findings, recoverable = [], {}
        with self.archive.catalog.read() as view:
            for ca, problem in bad.items():
                blob = view.blob(ca)
                if blob is None:
                    continue  # deleted meanwhile
                instance = view.instance(blob.sop)
                finding = Finding(instance.study if instance else "", blob.sop, unit.tier, unit.id, problem)
                findings.append(finding)
                if any(tier != unit.tier for tier in blob.copies):
                    recoverable[ca] = (blob, finding)
                else:
                    self._damaged(ca, finding, "unrecoverable: no other copy; marked damaged")
        if unit.kind == "blob":
            for ca, (blob, finding) in recoverable.items():
                try:
                    source = self._rewrite_hot(ca, blob, unit)
                    finding.action = f"repaired from {source}"
                except (ApplianceError, OSError) as exc:
                    self._damaged(ca, finding, f"unrecoverable: no other copy reads back ({exc}); marked damaged")
        elif recoverable:
            study = next(iter(recoverable.values()))[1].study
            # The pack's bytes are damaged: its good blobs move to the new pack too (those with a
            # copy elsewhere to pack from), so the old pack can go.
            with self.archive.catalog.read() as view:
                movable = [ca for ca in unit.blobs if ca not in bad and (blob := view.blob(ca))
                           and blob.in_pack(unit.tier, unit.id) and any(tier != unit.tier for tier in blob.copies)]
            try:
                self._rewrite_in_new_pack(list(recoverable) + movable, unit, study)
                action = "repaired: written to a new pack on " + unit.tier
            except (ApplianceError, OSError) as exc:
                # The bad copy is forgotten; the other copies stay, and the next `policy apply`
                # writes this tier's copy again.
                action = f"bad copy dropped; a new one could not be written now ({exc})"
            for _, finding in recoverable.values():
                finding.action = action
        for finding in findings:
            self.on_event("scrub.finding", finding.as_dict())
        return findings

    def _damaged(self, ca: bytes, finding: Finding, action: str) -> None:
        finding.action = action
        self.archive.catalog.mark_damaged(ca, f"{finding.tier}: {finding.problem}", int(self.clock()))

    def _rewrite_hot(self, ca: bytes, blob: Blob, unit: Unit) -> str:
        """A new hot copy from a good cold copy, written atomically, checked again, then swapped in.
        Returns the tier it came from."""
        hot = self.archive.hot
        last_error: Exception | None = None
        for tier in sorted(t for t in blob.copies if t != hot.name):
            try:
                with self.archive.tier(tier).open(blob.copies[tier].where) as fp:
                    name = tiering.restore_blob(self.archive, fp, blob, tier)
            except (ApplianceError, OSError) as exc:
                last_error = exc
                continue
            if self._check_hot_file(name, ca, blob):
                hot.delete(name)
                last_error = IntegrityError(f"the copy rewritten from {tier} does not verify")
                continue
            self.archive.catalog.replace_hot_copy(ca, hot.name, name, int(self.clock()), self.deep)
            hot.delete(unit.id)
            return tier
        raise last_error or IntegrityError("no other copy could be read")

    def _rewrite_in_new_pack(self, cas: list[bytes], unit: Unit, study_uid: str) -> None:
        """Forget the bad copies on this tier and pack those versions anew (from hot, or recalled
        from another tier); the new pack is read back and verified before it counts."""
        tier = unit.tier
        record = self.archive.catalog.forget_pack_copies(unit.id, tier, cas)
        if record is not None and not record.blobs:  # nothing in the old pack is used any more
            tiering.forget_pack(self.archive, unit.id)
        tiering.pack_study(self.archive, study_uid, tier,
                           remember_pending=lambda pack_id: self._remember_pending(tier, pack_id))

    def _remember_pending(self, tier: str, pack_id: str | None) -> None:
        self.archive.catalog.note_scrub_pending(tier, pack_id)

    def _clean_pending(self, current: dict) -> None:
        """A pack a killed run was writing for a repair, never recorded: remove it."""
        if current.get("pending"):
            tier, pack_id = current["pending"]
            tiering.discard_if_unrecorded(self.archive, tier, pack_id)
            self._remember_pending(tier, None)


def damaged_count(archive: Archive) -> int:
    with archive.catalog.read() as view:
        return sum(1 for blob in view.blobs() if blob.damaged)


# -- coverage, deadlines, history ----------------------------------------------------------------

def coverage(archive: Archive, now: int) -> dict:
    """Per tier: copies, and the share verified within the tier's fast and deep intervals."""
    out: dict[str, dict] = {}
    with archive.catalog.read() as view:
        for blob in view.blobs():
            for tier, copy in blob.copies.items():
                settings = archive.config.tiers.get(tier)
                if settings is None:
                    continue
                row = out.setdefault(tier, {"copies": 0, "fast_ok": 0, "deep_ok": 0,
                                            "fast_days": settings.scrub_fast_days,
                                            "deep_days": settings.scrub_deep_days})
                row["copies"] += 1
                if not settings.scrub_fast_days or now - copy.verified <= settings.scrub_fast_days * _DAY:
                    row["fast_ok"] += 1
                # A copy's deadline runs from its last deep check, or from when its version was stored.
                deep = copy.deep or blob.stored
                if not settings.scrub_deep_days or now - deep <= settings.scrub_deep_days * _DAY:
                    row["deep_ok"] += 1
    for row in out.values():
        row["fast_share"] = round(row["fast_ok"] / row["copies"], 4) if row["copies"] else 1.0
        row["deep_share"] = round(row["deep_ok"] / row["copies"], 4) if row["copies"] else 1.0
    return out


def overdue(archive: Archive, cover: dict) -> list[dict]:
    """Tiers whose copies are past their scrub deadline (`cover`: coverage() at the moment asked):
    the last complete run over the tier (or, before any, the oldest copy on it) is older than the interval."""
    late = []
    with archive.catalog.read() as view:
        for name, tier in archive.config.tiers.items():
            if name not in cover:
                continue
            for kind, days in (("fast", tier.scrub_fast_days), ("deep", tier.scrub_deep_days)):
                if days and cover[name][f"{kind}_ok"] < cover[name]["copies"]:
                    since = view.scrub_done(name, kind)
                    late.append({"tier": name, "kind": kind, "days": days,
                                 "copies": cover[name]["copies"] - cover[name][f"{kind}_ok"],
                                 "last_complete_run": since})
    return late


def computed_alarms(archive: Archive, now: float, damaged: int, cover: dict) -> list[dict]:
    """Alarms read off the index when asked, never stored: copies past their scrub deadline
    (time alone raises them, a scrub clears them) and `damaged` versions (damaged_count: a
    scrub finds them, the sender storing them again heals them)."""
    alarms = [{"key": "damaged", "message": f"{damaged} stored versions have no good copy left",
               "action": "store them again from the sender or a backup; `appliance scrub --json` lists them",
               "since": now}] if damaged else []
    return alarms + [{"key": f"scrub-overdue:{row['tier']}:{row['kind']}",
                      "message": f"{row['copies']} copies on {row['tier']} are past their {row['kind']} scrub interval "
                      f"({row['days']} days)",
                      "action": f"run `appliance scrub{' --deep' if row['kind'] == 'deep' else ''}` (or check its timer)",
                      "since": row["last_complete_run"] or now} for row in overdue(archive, cover)]


def history(archive: Archive) -> list[dict]:
    with archive.catalog.read() as view:
        return view.scrub_runs()
