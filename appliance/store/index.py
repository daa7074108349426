"""The LMDB index: what the archive holds, where, and everything C-FIND needs.

One LMDB environment (`HOME/index`), values in msgpack, keys in UTF-8 unless
said otherwise. Every commit is synced (data then meta page) before it returns;
writes from concurrent threads are batched into one transaction by a committer
thread (group commit), each in a nested transaction so one failing write does
not spoil the others. The map grows on its own when full.

    db "meta"              b"schema" -> 1;  b"counters" -> {"instances", "versions",
                           "received_bytes", "stored_bytes"} (current + previous versions)
    db "patients"          patient key -> {PatientID, PatientName, PatientBirthDate, PatientSex,
                           IssuerOfPatientID, "studies": n}
                           patient key = PatientID "\\0" IssuerOfPatientID
    db "studies"           StudyInstanceUID -> {StudyDate, StudyTime, AccessionNumber, StudyID,
                           StudyDescription, ReferringPhysicianName, PatientAge, "patient": key,
                           "series": n, "instances": n, "modalities": [..], "sop_classes": [..],
                           InstitutionName, "received_bytes", "stored_bytes", "first_stored", "last_stored",
                           "last_access": unix s of the last retrieve/export (absent: never),
                           "source_aes": [calling AE titles that sent it, "import" for imports],
                           "packs": {tier: [pack ids]}}
    db "series"            SeriesInstanceUID -> {Modality, SeriesNumber, SeriesDescription, SeriesDate,
                           SeriesTime, BodyPartExamined, "study": uid, "instances": n}
    db "instances"         SOPInstanceUID -> {SOPClassUID, InstanceNumber, Rows, Columns,
                           NumberOfFrames, ContentDate, ContentTime, "study", "series",
                           "transfer_syntax", "charset", "current": content address,
                           "versions": [content addresses, oldest first, current last]}
    db "blobs"             content address (32 raw bytes) -> {"sop", "size", "sealed_size",
                           "xxh3" (16 raw bytes), "key_id" (16 raw bytes), "compression",
                           "stored": unix s, "copies": {tier: copy}}
                           hot copy = {"name": object name, "verified": unix s, "deep": unix s}
                           cold copy = {"pack": pack id, "offset", "length", "verified", "deep"}
                           ("verified": last key-less check or write; "deep": last decrypt and
                           re-hash; "damaged": {"since", "reason"} when no good copy is left)
    db "packs"             pack id (hex) -> {"tier", "study", "size", "xxh3" (16 raw bytes, whole pack),
                           "where": cartridge label or "", "written", "verified", "deep": unix s,
                           "blobs": [ca]}
    db "study_keys"        StudyInstanceUID -> key id (16 raw bytes) of the study's data key
    db "holds"             "study:" UID or "patient:" PatientID -> {"reason", "by", "since": unix s}
    db "jobs"              StudyInstanceUID -> the one lifecycle job of a study (lifecycle.py):
                           {"kind": migrate|evict|expire, "targets", "drop_hot", "rule", "created",
                           "attempts", "next_try", "error", "pending": {tier: pack id being written}}
    db "deletions"         StudyInstanceUID -> deletion record {"time", "rule", "by", "patient_id",
                           "series": [uids], "instances": [uids], "unremoved": [{tier, pack, where}]}
    db "alarms"            alarm key -> {"message", "action", "since": unix s}
    db "scrub"             b"current" -> the scrub run in progress {"id", "deep", "started", "tiers"};
                           "done:<tier>:fast|deep" -> start time of the last complete run over the tier
    db "scrub_runs"        run id (8-byte big-endian start time) -> the run's summary (scrub.py)
    db "replicas"          off-site path ("objects/ab/cd/<name>", "packs/ab/cd/<id>") -> {"size", "xxh3",
                           "verified": unix s, "run", "target"}: what the off-site target holds, verified
    db "replication_runs"  run id (8-byte big-endian, microseconds) -> the run's summary (replicate.py)
    dupsort dbs            key -> StudyInstanceUID unless said otherwise:
      "patient_studies"    patient key
      "study_series"       StudyInstanceUID -> SeriesInstanceUID
      "series_instances"   SeriesInstanceUID -> SOPInstanceUID
      "by_patient_id"      PatientID
      "by_patient_name"    PatientName as p10.person_name_key gives it: upper-cased, trailing empty
                           components dropped (pacs-vault matches names ignoring case)
      "by_study_date"      StudyDate (YYYYMMDD, sorts as a date)
      "by_accession"       AccessionNumber
      "by_modality"        Modality of every series of the study
    The study UID itself is the primary key of "studies".
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import lmdb
import msgpack

from appliance.errors import OutOfSpace
from appliance.format.p10 import person_name_key

SCHEMA_VERSION = 1
_KEY_LIMIT = 480  # LMDB keys and dupsort values stop at 511 bytes
_PLAIN_DBS = ("meta", "patients", "studies", "series", "instances", "blobs", "study_keys", "packs", "holds",
              "jobs", "deletions", "alarms", "scrub", "scrub_runs", "replicas", "replication_runs")
_DUP_DBS = ("patient_studies", "study_series", "series_instances", "by_patient_id", "by_patient_name",
            "by_study_date", "by_accession", "by_modality")
SECONDARY = {"PatientID": "by_patient_id", "PatientName": "by_patient_name", "StudyDate": "by_study_date",
             "AccessionNumber": "by_accession", "Modality": "by_modality"}


def _k(text: str) -> bytes:
    return text.encode("utf-8")[:_KEY_LIMIT]


def patient_key(patient: dict) -> str:
    return f"{patient.get('PatientID', '')}\0{patient.get('IssuerOfPatientID', '')}"


class _RWLock:
    """Many readers or one resizer: LMDB's map may only be resized with no transaction open."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def shared(self):
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class Txn:
    """A transaction with msgpack values and named databases."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict):
        self.raw, self._dbs = txn, dbs

    def get(self, db: str, key: bytes | str) -> Any:
        raw = self.raw.get(key if isinstance(key, bytes) else _k(key), db=self._dbs[db])
        return None if raw is None else msgpack.unpackb(raw)

    def put(self, db: str, key: bytes | str, value: Any) -> None:
        self.raw.put(key if isinstance(key, bytes) else _k(key), msgpack.packb(value), db=self._dbs[db])

    def delete(self, db: str, key: bytes | str) -> None:
        self.raw.delete(key if isinstance(key, bytes) else _k(key), db=self._dbs[db])

    def items(self, db: str) -> Iterator[tuple[bytes, Any]]:
        for key, raw in self.raw.cursor(db=self._dbs[db]).iternext():
            yield bytes(key), msgpack.unpackb(raw)

    def count(self, db: str) -> int:
        return self.raw.stat(self._dbs[db])["entries"]

    def dup_add(self, db: str, key: str, value: str) -> None:
        self.raw.put(_k(key), _k(value), db=self._dbs[db], dupdata=True)

    def dup_remove(self, db: str, key: str, value: str) -> None:
        self.raw.delete(_k(key), _k(value), db=self._dbs[db])

    def dup_values(self, db: str, key: str) -> list[str]:
        cursor = self.raw.cursor(db=self._dbs[db])
        if not cursor.set_key(_k(key)):
            return []
        return [bytes(v).decode("utf-8") for v in cursor.iternext_dup()]

    def dup_clear(self, db: str, key: str) -> None:
        self.raw.delete(_k(key), db=self._dbs[db])

    def dup_range(self, db: str, low: str, high: str | None) -> Iterator[tuple[str, str]]:
        """(key, value) pairs with low <= key <= high (high None: to the end)."""
        cursor = self.raw.cursor(db=self._dbs[db])
        if not cursor.set_range(_k(low)):
            return
        for key, value in cursor.iternext():
            key_text = bytes(key).decode("utf-8")
            if high is not None and key_text > high:
                return
            yield key_text, bytes(value).decode("utf-8")


def data_file(directory: Path) -> Path:
    """The one file that holds an LMDB environment's data (an index or a keyring, or a copy of
    either): what an off-site snapshot seals and a restore puts back."""
    return Path(directory) / "data.mdb"


class Index:
    def __init__(self, path: Path, *, map_size: int = 256 << 20, create: bool = False):
        path = Path(path)
        if not create and not data_file(path).exists():
            raise FileNotFoundError(f"index {path} is missing")
        path.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(str(path), map_size=map_size, max_dbs=len(_PLAIN_DBS) + len(_DUP_DBS) + 1,
                              sync=True, metasync=True, max_readers=256)
        self._dbs = {name: self._env.open_db(name.encode()) for name in _PLAIN_DBS}
        self._dbs.update({name: self._env.open_db(name.encode(), dupsort=True) for name in _DUP_DBS})
        self._rw = _RWLock()
        self.barrier: Callable[[], None] | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._committer = threading.Thread(target=self._commit_loop, name="index-committer", daemon=True)
        self._committer.start()
        if create:
            self.write(lambda t: t.get("meta", b"schema") or t.put("meta", b"schema", SCHEMA_VERSION))

    def close(self) -> None:
        self._queue.put(None)
        self._committer.join()
        self._env.close()

    def copy_to(self, directory: Path) -> None:
        """A consistent snapshot of the whole index into an empty directory (LMDB copy)."""
        with self._rw.shared():
            self._env.copy(str(directory), compact=True)

    @property
    def map_size(self) -> int:
        return self._env.info()["map_size"]

    # -- reading -------------------------------------------------------------------------

    @contextmanager
    def read(self, fresh: bool = True) -> Iterator[Txn]:
        """A read transaction. `fresh`: first wait until every store this process has
        acknowledged is in the index (`barrier`, set while an ingest journal applies)."""
        barrier = self.barrier
        if fresh and barrier is not None:
            barrier()
        while True:
            with self._rw.shared():
                try:
                    txn = self._begin(write=False)
                except _Resized:
                    txn = None
                if txn is not None:
                    try:
                        yield Txn(txn, self._dbs)
                    finally:
                        txn.abort()
                    return
            self._grow()

    def _begin(self, write: bool, parent=None) -> lmdb.Transaction:
        try:
            return self._env.begin(write=write, parent=parent)
        except lmdb.MapResizedError:
            # Another process grew the map. Adopting its size needs every transaction of this
            # process closed, so the caller drops its shared lock and calls _grow().
            raise _Resized() from None

    # -- writing (group commit) ----------------------------------------------------------

    def write(self, fn: Callable[[Txn], Any]) -> Any:
        """Run fn in a write transaction, wait until it is durably committed, return its result."""
        future: Future = Future()
        self._queue.put((fn, future))
        return future.result()

    def _commit_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            self._commit_batch(batch)

    def _commit_batch(self, batch: list) -> None:
        while True:
            try:
                outcomes = self._try_batch(batch)
            except (lmdb.MapFullError, _Resized):
                self._grow()
                continue
            except lmdb.Error as exc:
                error: Exception = exc
                if "No space left" in str(exc) or "quota" in str(exc).lower():
                    error = OutOfSpace("out of space on the index volume; nothing was committed")
                for _, future in batch:
                    future.set_exception(error)
                return
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting writer
                for _, future in batch:
                    future.set_exception(exc)
                return
            for future, ok, value in outcomes:
                (future.set_result if ok else future.set_exception)(value)
            return

    def _try_batch(self, batch: list) -> list:
        outcomes = []
        with self._rw.shared():
            parent = self._begin(write=True)
            try:
                for fn, future in batch:
                    child = self._begin(write=True, parent=parent)
                    try:
                        value = fn(Txn(child, self._dbs))
                    except lmdb.MapFullError:
                        child.abort()
                        raise
                    except Exception as exc:  # noqa: BLE001 - this writer's own failure
                        child.abort()
                        outcomes.append((future, False, exc))
                        continue
                    child.commit()
                    outcomes.append((future, True, value))
                parent.commit()
            except BaseException:
                parent.abort()
                raise
        return outcomes

    def _grow(self) -> None:
        with self._rw.exclusive():
            current = self._env.info()["map_size"]
            try:
                self._env.set_mapsize(0)  # adopt a size another process set
            except lmdb.Error:
                pass
            if self._env.info()["map_size"] <= current:
                self._env.set_mapsize(current * 2)


class _Resized(Exception):
    pass


# -- keys of the secondary indexes ----------------------------------------------------------

def secondary_key(field: str, value: str) -> str:
    return person_name_key(value) if field == "PatientName" else value
