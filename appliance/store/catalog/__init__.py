"""The catalog: what the archive holds and where, the only code that writes the index.

Everything else reads typed records (records.py) through `read()` and changes the index
through the named mutations below; none of them sees a database or a msgpack value. The
engine is LMDB (store/index.py: the schema, the mechanics); the contract is written so
that a second engine (PostgreSQL, for several appliance nodes sharing one catalog) could
implement it, as the tier contract is written for backends.

The contract:

- `read()` gives a `View`: a consistent snapshot (every record read through one view is
  from the same moment; nothing a mutation does meanwhile shows in it). A fresh view first
  waits until every store acknowledged so far, by this process or another live one, is in
  the catalog (`fresh=False` skips that wait: for a caller that found what it reads in a
  fresh view already). Views are cheap and short-lived; never write while holding one.
- A mutation is atomic and durable when it returns: all of it is in the catalog, synced,
  or (it raised) none of it. Mutations from concurrent threads may be committed together
  (group commit); one that raises does not spoil the others of its batch. Each raises
  OutOfSpace when the catalog's volume is full, and ValueError or NotFound when what it
  is asked contradicts the catalog (dropping the last copy of a version, releasing a hold
  that is not there); then nothing changed.
- `record_stores` is applied again after a crash for the same journal records: it keeps,
  in the same transaction, the number of the last record applied (`journal_position`),
  and changes nothing for records at or below it. Every other mutation states what it
  does when repeated.
- Iterations (`View.blobs()`, `View.studies()`...) go in key order and see one snapshot.
- C-FIND plans its own queries over the secondary keys (store/query.py): `View.txn` is the
  engine's read transaction, read only; a second engine provides the same query there.

A second engine needs: these mutations as transactions, a consistent snapshot per view,
durable commits, secondary keys for patient ID, name (case-folded), study date (ranges),
accession number and modality, and the journal position kept with the records it covers.
"""

from __future__ import annotations

import struct
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from appliance.errors import ApplianceError, NotFound
from appliance.format.p10 import InstanceInfo
from appliance.store.catalog import copies, instances
from appliance.store.catalog.records import (Alarm, Blob, Hold, Instance, Job, Pack, PackCopy, Patient, Replica,
                                             Study, copy_from_raw)
from appliance.store.index import Index, Txn


def _position_key(journal_id: bytes) -> bytes:
    return b"journal:" + journal_id.hex().encode()


class View:
    """A consistent read of the catalog (see the contract above)."""

    def __init__(self, txn: Txn):
        self.txn = txn

    # -- what is stored ---------------------------------------------------------------------

    def blob(self, ca: bytes) -> Blob | None:
        raw = self.txn.get("blobs", ca)
        return None if raw is None else Blob.from_raw(ca, raw)

    def blobs(self) -> Iterator[Blob]:
        for ca, raw in self.txn.items("blobs"):
            yield Blob.from_raw(ca, raw)

    def instance(self, sop_uid: str) -> Instance | None:
        raw = self.txn.get("instances", sop_uid)
        return None if raw is None else Instance.from_raw(sop_uid, raw)

    def instances(self) -> Iterator[Instance]:
        for key, raw in self.txn.items("instances"):
            yield Instance.from_raw(key.decode(), raw)

    def study(self, uid: str) -> Study | None:
        raw = self.txn.get("studies", uid)
        return None if raw is None else Study.from_raw(uid, raw)

    def studies(self) -> Iterator[Study]:
        for key, raw in self.txn.items("studies"):
            yield Study.from_raw(key.decode(), raw)

    def patient(self, key: str) -> Patient | None:
        raw = self.txn.get("patients", key)
        return None if raw is None else Patient.from_raw(key, raw)

    def patient_studies(self, key: str) -> list[str]:
        return self.txn.dup_values("patient_studies", key)

    def study_series(self, uid: str) -> list[str]:
        return self.txn.dup_values("study_series", uid)

    def series_instances(self, uid: str) -> list[str]:
        return self.txn.dup_values("series_instances", uid)

    def study_instances(self, uid: str) -> list[Instance]:
        """Every current instance of a study, series by series."""
        return [Instance.from_raw(sop, self.txn.get("instances", sop))
                for series in self.study_series(uid) for sop in self.series_instances(series)]

    def study_blobs(self, uid: str) -> list[Blob]:
        """Every stored version (current and previous) of every instance of a study."""
        return [Blob.from_raw(ca, raw) for ca, raw in instances.study_blobs(self.txn, uid)]

    def study_key(self, uid: str) -> bytes | None:
        return self.txn.get("study_keys", uid)

    def study_key_ids(self, uid: str) -> list[bytes]:
        """Every data key a study's versions are sealed under, and the study's own."""
        return instances.study_key_ids(self.txn, uid)

    def pack(self, pack_id: str) -> Pack | None:
        raw = self.txn.get("packs", pack_id)
        return None if raw is None else Pack.from_raw(pack_id, raw)

    def packs(self) -> Iterator[Pack]:
        for key, raw in self.txn.items("packs"):
            yield Pack.from_raw(key.decode(), raw)

    def counters(self) -> dict:
        """instances, versions, received_bytes, stored_bytes (current and previous versions)."""
        return dict(instances.read_counters(self.txn))

    def count(self, kind: str) -> int:
        """How many patients, studies or series the catalog holds."""
        if kind not in ("patients", "studies", "series"):
            raise ValueError(kind)
        return self.txn.count(kind)

    def journal_position(self, journal_id: bytes) -> int:
        return self.txn.get("meta", _position_key(journal_id)) or 0

    # -- what the jobs keep -----------------------------------------------------------------

    def job(self, study_uid: str) -> Job | None:
        raw = self.txn.get("jobs", study_uid)
        return None if raw is None else Job.from_raw(study_uid, raw)

    def jobs(self) -> list[Job]:
        return [Job.from_raw(key.decode(), raw) for key, raw in self.txn.items("jobs")]

    def hold(self, key: str) -> Hold | None:
        raw = self.txn.get("holds", key)
        return None if raw is None else Hold.from_raw(key, raw)

    def holds(self) -> list[Hold]:
        return [Hold.from_raw(key.decode(), raw) for key, raw in self.txn.items("holds")]

    def deletions(self) -> dict[str, dict]:
        """Deletion records by study: {time, rule, reason, by, patient_id, series, instances,
        unremoved: [{tier, pack, where, error}]} (what expiry removed, for the auditor)."""
        return {key.decode(): raw for key, raw in self.txn.items("deletions")}

    def alarms(self) -> list[Alarm]:
        return [Alarm.from_raw(key.decode(), raw) for key, raw in self.txn.items("alarms")]

    def scrub_run(self) -> dict | None:
        """The scrub run in progress: {id, deep, started, tiers, pending: [tier, pack id] or None}."""
        return self.txn.get("scrub", b"current")

    def scrub_done(self, tier: str, kind: str) -> float | None:
        """When the last complete fast or deep scrub over `tier` started."""
        return self.txn.get("scrub", f"done:{tier}:{kind}")

    def scrub_runs(self) -> list[dict]:
        return [run for _, run in self.txn.items("scrub_runs")]

    def replicas(self) -> list[Replica]:
        return [Replica.from_raw(key.decode(), raw) for key, raw in self.txn.items("replicas")]

    def replication_runs(self) -> list[dict]:
        return [run for _, run in self.txn.items("replication_runs")]


class Catalog:
    """The catalog over one index (see the contract in the module docstring)."""

    def __init__(self, index: Index):
        self._index = index

    @contextmanager
    def read(self, fresh: bool = True) -> Iterator[View]:
        with self._index.read(fresh=fresh) as txn:
            yield View(txn)

    def _write(self, fn: Callable[[Txn], object]):
        return self._index.write(fn)

    @contextmanager
    def snapshot(self, directory: Path) -> Iterator["Catalog"]:
        """A consistent copy of the whole catalog into an empty directory (the off-site copy),
        open for reading while the context lasts; its files stay."""
        self._index.copy_to(directory)
        copy = Index(directory, map_size=self._index.map_size)
        try:
            yield Catalog(copy)
        finally:
            copy.close()

    # -- storing ----------------------------------------------------------------------------

    def study_key_for(self, study_uid: str, new_key_id: Callable[[], bytes]) -> bytes:
        """The id of the study's data key: the one recorded, else `new_key_id()` recorded now."""
        with self.read(fresh=False) as view:
            known = view.study_key(study_uid)
        if known is not None:
            return known
        key_id = new_key_id()

        def record(t: Txn) -> bytes:
            known = t.get("study_keys", study_uid)
            if known is not None:
                return known  # another thread or process recorded one first: that one it is
            t.put("study_keys", study_uid, key_id)
            return key_id
        return self._write(record)

    def record_stores(self, journal_id: bytes, last_number: int, stores: Iterable[tuple[int, InstanceInfo, dict, str]],
                      hot_tier: str, *, keep_previous: bool, readable: Callable[[bytes], bool]) -> list[str]:
        """Index the stores of journal records up to `last_number`: (record number, what was
        stored, its blob record {name, sealed_size, xxh3, key_id, compression}, source AE).
        Records at or below the journal's position are skipped (applied before a crash); a
        version whose data key is gone (`readable(key_id)` False: its study was deleted since)
        is not indexed. A damaged version stored again is healed by the new bytes; without
        `keep_previous`, an instance's previous versions go. Returns the hot files no longer
        needed (the same bytes stored under another name first, superseded versions)."""
        def apply(t: Txn) -> list[str]:
            key = _position_key(journal_id)
            position = t.get("meta", key) or 0
            surplus: list[str] = []
            for number, info, blob, source in stores:
                if number <= position:
                    continue
                if not readable(blob["key_id"]):
                    surplus.append(blob["name"])
                    continue
                surplus += _record_one(t, info, blob, source, hot_tier, keep_previous)
            t.put("meta", key, max(position, last_number))
            return surplus
        return self._write(apply)

    def forget_journal(self, journal_id: bytes) -> None:
        """The journal is gone: drop its position (repeating it changes nothing)."""
        self._write(lambda t: t.delete("meta", _position_key(journal_id)))

    def reindex(self, info: InstanceInfo, blob: dict, tier: str) -> bool:
        """Index a version read back from its sealed bytes (fsck --rebuild-index); False when
        it was indexed already. A cold copy's entry is completed by add_pack."""
        def record(t: Txn) -> bool:
            if t.get("study_keys", info.study_uid) is None:
                t.put("study_keys", info.study_uid, blob["key_id"])
            return instances.record_instance(t, info, blob, tier) != "duplicate"
        return self._write(record)

    def touch_study(self, study_uid: str, now: int) -> None:
        """Note an access (retrieve, export): policies migrate by days without access."""
        def touch(t: Txn) -> None:
            study = t.get("studies", study_uid)
            if study is not None and study.get("last_access", 0) < now:
                study["last_access"] = now
                t.put("studies", study_uid, study)
        self._write(touch)

    def remove_study(self, study_uid: str) -> tuple[dict[bytes, dict], dict[str, Pack]]:
        """Forget a study and everything under it; return ({content address: copies by tier},
        {pack id: pack}) so that every copy can be deleted. Its keys must be destroyed first."""
        blobs, packs = self._write(lambda t: instances.remove_study(t, study_uid))
        return ({ca: {tier: copy_from_raw(copy) for tier, copy in raw.items()} for ca, raw in blobs.items()},
                {pack_id: Pack.from_raw(pack_id, raw) for pack_id, raw in packs.items()})

    # -- copies on the tiers ----------------------------------------------------------------

    def add_pack(self, pack: Pack, entries: Iterable) -> None:
        """Record a written and verified pack and the cold copies it holds (`entries`: the
        pack's trailer entries, each with ca, offset, length). Repeating it changes nothing."""
        self._write(lambda t: copies.add_pack(t, pack.id, pack.raw(), list(entries)))

    def drop_hot_copies(self, study_uid: str, hot_tier: str, required: list[str]) -> list[str]:
        """Forget the study's hot copies if every version has a copy on each `required` tier (at
        least one cold copy when none is named); return their object names. Raises
        ApplianceError (and keeps them all) otherwise."""
        def forget(t: Txn) -> list[str]:
            for _, blob in instances.study_blobs(t, study_uid):
                cold = set(blob["copies"]) - {hot_tier}
                if not cold or not set(required) <= cold:
                    raise ApplianceError(f"instance {blob['sop']} has no verified copy on "
                                         f"{', '.join(sorted(set(required) - cold)) or 'any cold tier'}; "
                                         "its hot copy stays")
            return copies.drop_tier_copies(t, study_uid, hot_tier)
        return self._write(forget)

    def record_recalled(self, study_uid: str, hot_tier: str, restored: dict[bytes, str], now: int) -> list[str]:
        """Hot copies brought back from cold tiers (content address -> object name); returns
        the names not needed (the version was deleted, or recalled by another process)."""
        def record(t: Txn) -> list[str]:
            surplus = []
            for ca, name in restored.items():
                blob = t.get("blobs", ca)
                if blob is None or hot_tier in blob["copies"]:
                    surplus.append(name)
                    continue
                blob["copies"][hot_tier] = {"name": name, "verified": now}
                t.put("blobs", ca, blob)
            study = t.get("studies", study_uid)
            if study is not None:
                study["recalled"] = now
                t.put("studies", study_uid, study)
            return surplus
        return self._write(record)

    def forget_pack(self, pack_id: str) -> Pack | None:
        """Drop a pack from the catalog (its copies must be gone already); the pack, or None
        when it was not there."""
        def forget(t: Txn) -> dict | None:
            record = t.get("packs", pack_id)
            if record is None:
                return None
            t.delete("packs", pack_id)
            study = t.get("studies", record["study"])
            if study is not None and pack_id in study.get("packs", {}).get(record["tier"], []):
                study["packs"][record["tier"]].remove(pack_id)
                t.put("studies", record["study"], study)
            return record
        raw = self._write(forget)
        return None if raw is None else Pack.from_raw(pack_id, raw)

    def forget_pack_copies(self, pack_id: str, tier: str, cas: list[bytes]) -> Pack | None:
        """Forget the copies of `cas` that pack `pack_id` holds on `tier` (found bad); return
        the pack as it is now (None: not in the catalog)."""
        def forget(t: Txn) -> dict | None:
            for ca in cas:
                blob = t.get("blobs", ca)
                if blob is not None and blob["copies"].get(tier, {}).get("pack") == pack_id:
                    del blob["copies"][tier]
                    t.put("blobs", ca, blob)
            record = t.get("packs", pack_id)
            if record is not None:
                record["blobs"] = [ca for ca in record["blobs"] if ca not in cas]
                t.put("packs", pack_id, record)
            return record
        raw = self._write(forget)
        return None if raw is None else Pack.from_raw(pack_id, raw)

    def mark_verified(self, marks: list[tuple[str, str, str, list[bytes], float]], deep: bool) -> None:
        """Verification times: (tier, "blob" or "pack", object, content addresses found good,
        when). A copy that moved elsewhere meanwhile is left alone; a version marked damaged
        is not any more (a good copy was found after all)."""
        def mark(t: Txn) -> None:
            for tier, kind, where, good, now in marks:
                for ca in good:
                    blob = t.get("blobs", ca)
                    copy = blob["copies"].get(tier) if blob is not None else None
                    if copy is None or copy.get("pack", copy.get("name")) != where:
                        continue
                    copy["verified"] = now
                    if deep:
                        copy["deep"] = now
                    blob.pop("damaged", None)
                    t.put("blobs", ca, blob)
                if kind == "pack" and (record := t.get("packs", where)) is not None:
                    record["verified"] = now
                    if deep:
                        record["deep"] = now
                    t.put("packs", where, record)
        self._write(mark)

    def mark_damaged(self, ca: bytes, reason: str, now: int) -> None:
        """No good copy of the version is left (it stays listed; storing it again heals it)."""
        def mark(t: Txn) -> None:
            blob = t.get("blobs", ca)
            if blob is not None:
                blob["damaged"] = {"since": now, "reason": reason}
                t.put("blobs", ca, blob)
        self._write(mark)

    def replace_hot_copy(self, ca: bytes, hot_tier: str, name: str, now: int, deep: bool) -> None:
        """A new, verified hot copy of a version in place of a bad one (scrub repair)."""
        def swap(t: Txn) -> None:
            blob = t.get("blobs", ca)
            if blob is None:
                raise NotFound("the version was deleted meanwhile")
            blob["copies"][hot_tier] = {"name": name, "verified": now, **({"deep": now} if deep else {})}
            blob.pop("damaged", None)
            t.put("blobs", ca, blob)
        self._write(swap)

    def adopt_restored(self, hot_tier: str, present_hot: set[str], cold_tier: str,
                       present_packs: set[str]) -> tuple[int, list[str]]:
        """After a restore: point the snapshot's catalog at what came back (hot files on
        `hot_tier`, packs on `cold_tier`) and forget jobs, alarms, replica records and the scrub
        state of the lost home. Returns (versions with a hot copy, problems)."""
        def adopt(t: Txn) -> tuple[int, list[str]]:
            for key, record in list(t.items("packs")):
                if key.decode() in present_packs:
                    record.update(tier=cold_tier, where="")
                    t.put("packs", key, record)
                else:
                    t.delete("packs", key)
            objects, problems = 0, []
            for ca, blob in list(t.items("blobs")):
                kept = {}
                hot = blob["copies"].get(hot_tier)
                if hot is not None and hot["name"] in present_hot:
                    kept[hot_tier] = hot
                    objects += 1
                for copy in blob["copies"].values():
                    if copy.get("pack") in present_packs and cold_tier not in kept:
                        kept[cold_tier] = copy
                if not kept:
                    problems.append(f"version {ca.hex()[:16]} of instance {blob['sop']}: no copy off-site")
                blob["copies"] = kept
                t.put("blobs", ca, blob)
            for key, study in list(t.items("studies")):
                ids = [p for ids in study.get("packs", {}).values() for p in ids if p in present_packs]
                study["packs"] = {cold_tier: ids} if ids else {}
                t.put("studies", key, study)
            for db in ("jobs", "alarms", "replicas", "scrub"):
                for key, _ in list(t.items(db)):
                    t.delete(db, key)
            return objects, problems
        return self._write(adopt)

    # -- lifecycle: jobs, holds, deletions --------------------------------------------------

    def enqueue_jobs(self, jobs: list[Job]) -> None:
        """Queue jobs; a study that has one already keeps it."""
        def enqueue(t: Txn) -> None:
            for job in jobs:
                if t.get("jobs", job.study) is None:
                    t.put("jobs", job.study, job.raw())
        self._write(enqueue)

    def note_pending_pack(self, study_uid: str, tier: str, pack_id: str | None) -> None:
        """The pack a job is about to write on `tier` (None: written and recorded, or cleaned up)."""
        def note(t: Txn) -> None:
            job = t.get("jobs", study_uid)
            if job is None:
                return
            if pack_id is None:
                job["pending"].pop(tier, None)
            else:
                job["pending"][tier] = pack_id
            t.put("jobs", study_uid, job)
        self._write(note)

    def postpone_job(self, study_uid: str, next_try: int, error: str) -> Job | None:
        """A job that failed: one more attempt counted, tried again from `next_try`."""
        def postpone(t: Txn) -> dict | None:
            job = t.get("jobs", study_uid)
            if job is not None:
                job.update(attempts=job["attempts"] + 1, next_try=next_try, error=error)
                t.put("jobs", study_uid, job)
            return job
        raw = self._write(postpone)
        return None if raw is None else Job.from_raw(study_uid, raw)

    def finish_job(self, study_uid: str) -> None:
        self._write(lambda t: t.delete("jobs", study_uid) if t.get("jobs", study_uid) is not None else None)

    def set_hold(self, hold: Hold) -> None:
        """Set (or renew) a legal hold."""
        self._write(lambda t: t.put("holds", hold.key, hold.raw()))

    def release_hold(self, key: str) -> Hold:
        """Lift a hold; raises NotFound when there is none."""
        def release(t: Txn) -> dict:
            raw = t.get("holds", key)
            if raw is None:
                raise NotFound(f"no hold on {key.replace(':', ' ', 1)}")
            t.delete("holds", key)
            return raw
        return Hold.from_raw(key, self._write(release))

    def record_deletion(self, study_uid: str, record: dict) -> None:
        """What expiry removed (View.deletions), kept for good."""
        self._write(lambda t: t.put("deletions", study_uid, record))

    def set_unremoved(self, study_uid: str, unremoved: list[dict]) -> None:
        """Copies of a deleted study still on a tier (unreadable: their keys are gone)."""
        def update(t: Txn) -> None:
            record = t.get("deletions", study_uid)
            if record is not None:
                record["unremoved"] = unremoved
                t.put("deletions", study_uid, record)
        self._write(update)

    # -- alarms -----------------------------------------------------------------------------

    def raise_alarm(self, key: str, message: str, action: str) -> None:
        """Raise (or restate) an alarm; it keeps the time it was first raised."""
        def put(t: Txn) -> None:
            old = t.get("alarms", key)
            t.put("alarms", key, {"message": message, "action": action,
                                  "since": old["since"] if old else int(time.time())})
        self._write(put)

    def clear_alarm(self, key: str) -> None:
        self._write(lambda t: t.delete("alarms", key) if t.get("alarms", key) is not None else None)

    # -- scrub ------------------------------------------------------------------------------

    def begin_scrub_run(self, run: dict) -> None:
        """The scrub run now in progress (View.scrub_run)."""
        self._write(lambda t: t.put("scrub", b"current", run))

    def note_scrub_pending(self, tier: str, pack_id: str | None) -> None:
        """The pack a scrub repair is about to write (None: done)."""
        def note(t: Txn) -> None:
            current = t.get("scrub", b"current")
            if current is not None:
                current["pending"] = [tier, pack_id] if pack_id else None
                t.put("scrub", b"current", current)
        self._write(note)

    def finish_scrub_run(self, run_id: int, summary: dict, started: float, done: list[tuple[str, str]]) -> None:
        """Keep a finished run's summary; each (tier, "fast" or "deep") in `done` was scrubbed
        whole by the run that started at `started`; no run is in progress any more."""
        def finish(t: Txn) -> None:
            t.put("scrub_runs", struct.pack(">Q", run_id), summary)
            for tier, kind in done:
                t.put("scrub", f"done:{tier}:{kind}", started)
            t.delete("scrub", b"current")
        self._write(finish)

    # -- off-site copies --------------------------------------------------------------------

    def record_replicas(self, replicas: list[Replica]) -> None:
        """Objects verified on the off-site target."""
        def record(t: Txn) -> None:
            for replica in replicas:
                t.put("replicas", replica.path, replica.raw())
        self._write(record)

    def forget_replicas(self, paths: list[str]) -> None:
        """Objects removed from the off-site target (repeating it changes nothing)."""
        def forget(t: Txn) -> None:
            for path in paths:
                if t.get("replicas", path) is not None:
                    t.delete("replicas", path)
        self._write(forget)

    def record_replication_run(self, run_id: int, summary: dict) -> None:
        self._write(lambda t: t.put("replication_runs", struct.pack(">Q", run_id), summary))


def _record_one(t: Txn, info: InstanceInfo, blob: dict, source: str, hot_tier: str, keep_previous: bool) -> list[str]:
    """One stored instance into the catalog; the hot files it makes surplus."""
    known = t.get("blobs", info.content_address)
    if known is not None and known.get("damaged"):
        # Its copies failed verification: the bytes just received replace them all.
        old = known["copies"].get(hot_tier)
        known.update(sealed_size=blob["sealed_size"], xxh3=blob["xxh3"], key_id=blob["key_id"],
                     compression=blob["compression"])
        known["copies"] = {hot_tier: {"name": blob["name"], "verified": int(time.time())}}
        del known["damaged"]
        t.put("blobs", info.content_address, known)
        return [old["name"]] if old and old["name"] != blob["name"] else []
    previous = t.get("instances", info.sop_uid)
    status = instances.record_instance(t, info, blob, hot_tier, source)
    surplus = []
    if status == "duplicate":
        if t.get("blobs", info.content_address)["copies"].get(hot_tier, {}).get("name") != blob["name"]:
            surplus.append(blob["name"])  # the same bytes were stored under another name first
    elif status == "new_version" and not keep_previous:
        for ca in previous["versions"]:
            dropped = instances.drop_version(t, info.sop_uid, ca)
            if hot_tier in dropped:  # copies on cold tiers stay in their packs until the study goes
                surplus.append(dropped[hot_tier]["name"])
    return surplus


__all__ = ["Catalog", "View", "Alarm", "Blob", "Hold", "Instance", "Job", "Pack", "PackCopy", "Patient", "Replica",
           "Study"]
