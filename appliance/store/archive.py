"""The archive facade: store, read, list and delete instances.

A store is durable before it is acknowledged, with one shared sync:

    bytes as they arrive -> inspect (framing, index attributes) and seal (SHA-256, zstd,
    AES-GCM) together -> the study's data key once the walk has seen the study
    -> journal record {index entry, sealed bytes (or the synced hot file of a large
       instance), audit record}, group-committed with one fdatasync -> acknowledged
    -> applied: the hot file, the index entry (LMDB), the audit record; checkpointed
       (made durable there) before the journal record is dropped (journal.py).

A crash before the journal commit leaves at most a temp file of a large blob (swept
when a writer opens the home); after it, the next writer to open the home replays the
journal. Never an index entry without its blob.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future
from typing import Callable, Iterator, Protocol

from appliance import backends
from appliance.audit.events import EventID, EventType, event
from appliance.backends.filesystem import FilesystemBackend, StagedFile
from appliance.config import Config
from appliance.errors import BlobMissing, HomeLocked, IntegrityError, InvalidInstance, NotFound, OutOfSpace
from appliance.format import p10, sealed
from appliance.fsutil import HomeLock
from appliance.store import journal as jr
from appliance.store import journal_recovery
from appliance.store import tiering
from appliance.store.catalog import Blob, Catalog, Instance, Study
from appliance.store.catalog.records import HotCopy
from appliance.store.index import Index
from appliance.store.ingest import FREE_MARGIN, IMPORT_INLINE_LIMIT, INLINE_LIMIT, Ingest, PendingStore, StoreOutcome
from appliance.store.keys import Keyring

LOG = logging.getLogger(__name__)

_NAME_PREFIX_S = 5.0


class AuditSink(Protocol):
    """Where the archive's audit records go (the trail, audit/trail.py): what the store needs of
    it, so that the store does not depend on how a trail is kept.

    `record(entry)` returns once the record is durable (raises AuditError when it cannot be);
    `append_journaled(entries)` appends records already durable in the ingest journal without
    waiting, `sync()` makes those durable; `journal_places(journal_hex, since)` says which
    journal records are in already (a replay appends only the others)."""

    enabled: bool

    def record(self, entry: dict, *, force: bool = False) -> None: ...

    def append_journaled(self, entries: list[dict]) -> None: ...

    def sync(self) -> None: ...

    def journal_places(self, journal_hex: str, since: float) -> set[str]: ...


class Archive:
    """Open with `Archive.open(config, audit=trail, writer=...)` (admin.home.open_archive makes the
    trail); use as a context manager."""

    def __init__(self, config: Config, *, audit: AuditSink, lock: HomeLock | None, create: bool = False):
        self.config = config
        self.audit = audit
        self._lock = lock
        settings = config.appliance
        self.keyring = Keyring(config.keyring_path, config.key_file, create=create)
        try:
            self._index = Index(config.index_path, map_size=settings.index.initial_map_size_mb << 20,
                                create=create)
        except FileNotFoundError:
            self.keyring.close()
            raise NotFound(f"index {config.index_path} is missing: run `appliance fsck --rebuild-index`") from None
        self.hot = hot_backend(config, create=create)
        self._key_lock = threading.Lock()
        self._tiers: dict = {}
        self._tiers_lock = threading.Lock()
        self._recalls: dict[str, Future] = {}
        self._recall_lock = threading.Lock()
        self._journal: jr.Journal | None = None
        self._journal_lock = threading.Lock()
        self._index.barrier = self._read_barrier
        self.catalog = Catalog(self._index)
        # Stores journaled but not yet in the index: content address / SOP Instance UID -> count.
        self._in_flight: dict[bytes, int] = {}
        self._in_flight_sops: dict[str, int] = {}
        self._in_flight_inline = 0  # sealed bytes journaled, not yet written to their hot files
        self._in_flight_lock = threading.Lock()
        self._unsynced_names: set[str] = set()  # hot files written by apply since the last checkpoint
        self._name_lock = threading.Lock()
        self._name_prefix = ("", -_NAME_PREFIX_S)
        if self.hot.root.is_dir():
            if lock is not None:
                self.hot.sweep_incoming()
                self.replay_journals()
            elif journal_recovery.orphans(config.journal_dir):
                self._replay_for_reader()

    @classmethod
    def open(cls, config: Config, *, audit: AuditSink, writer: bool = False, exclusive: bool = False) -> "Archive":
        lock = HomeLock(config.home, exclusive=exclusive).__enter__() if writer or exclusive else None
        try:
            return cls(config, audit=audit, lock=lock)
        except BaseException:
            if lock is not None:
                lock.__exit__(None, None, None)
            raise

    def close(self) -> None:
        self._index.barrier = None
        if self._journal is not None:
            journal, self._journal = self._journal, None
            journal.close()
        self._index.close()
        self.keyring.close()
        if self._lock is not None:
            self._lock.__exit__(None, None, None)

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- storing -------------------------------------------------------------------------

    def study_key(self, study_uid: str) -> bytes:
        """The study's data key id, created (durably) on the study's first instance."""
        with self._key_lock:
            return self.catalog.study_key_for(study_uid, self.keyring.new_data_key)

    def tier(self, name: str):
        """The backend of a cold tier (opened on first use)."""
        with self._tiers_lock:
            if name not in self._tiers:
                self._tiers[name] = backends.open_tier(self.config, self.config.tiers[name])
            return self._tiers[name]

    def new_blob_name(self) -> str:
        """A random 128-bit name. Names made within the same few seconds share their first 16
        bits, so their files share a fan-out directory: a checkpoint syncs one directory for
        them, not one each."""
        with self._name_lock:
            now = time.monotonic()
            if now - self._name_prefix[1] >= _NAME_PREFIX_S:
                self._name_prefix = (os.urandom(2).hex(), now)
            return self._name_prefix[0] + os.urandom(14).hex()

    def begin_store(self, source: str = "import", inline_limit: int = INLINE_LIMIT) -> Ingest:
        """An instance to store as its bytes arrive. `source`: the calling AE title, or "import".
        Sealed, it goes into its journal record up to `inline_limit` bytes, else into its own
        hot file (synced with the commit)."""
        return Ingest(self, source, inline_limit)

    def store_file(self, path: str | os.PathLike, source: str = "import") -> StoreOutcome:
        """Store one P10 file byte-exact. Returns once it is durable; raises InvalidInstance,
        OutOfSpace or another ApplianceError and then nothing of it is stored."""
        return self.store_file_later(path, source).result()

    def store_file_later(self, path: str | os.PathLike, source: str = "import") -> PendingStore:
        """`store_file`, returning once its commit is queued (`result()` waits until durable)."""
        try:
            fp = open(path, "rb")
        except OSError as exc:
            raise InvalidInstance(f"cannot read: {exc.strerror}") from None
        ingest = self.begin_store(source, IMPORT_INLINE_LIMIT)
        head = b""
        try:
            with fp:
                while True:
                    try:
                        chunk = fp.read(p10.READ_SIZE)
                    except OSError as exc:
                        raise InvalidInstance(f"cannot read: {exc.strerror}") from None
                    if not chunk:
                        break
                    head = head or chunk[:132]
                    ingest.write(chunk)
            return ingest.finish_later()
        except InvalidInstance as exc:
            ingest.abort()
            if head[128:132] != b"DICM" and str(exc).startswith(("truncated", "malformed")):
                raise InvalidInstance("not a DICOM file") from None
            raise
        except BaseException:
            ingest.abort()
            raise

    def known_status(self, info: p10.InstanceInfo) -> str:
        """What storing `info` would be: "duplicate" (the same bytes are stored or on their
        way), "new_version" (another version of the instance is) or "stored"."""
        with self._in_flight_lock:
            if info.content_address in self._in_flight:
                return "duplicate"
            pending_sop = info.sop_uid in self._in_flight_sops
        with self.catalog.read(fresh=False) as view:
            known = view.blob(info.content_address)
            if known is not None and not known.damaged:
                return "duplicate"  # a damaged version sent again is stored anew
            return "new_version" if pending_sop or view.instance(info.sop_uid) is not None else "stored"

    def check_space(self, sealed_size: int) -> None:
        free = self.hot.free_bytes()
        with self._in_flight_lock:
            owed = self._in_flight_inline  # hot files that records already acknowledged still need
        if free < 2 * sealed_size + FREE_MARGIN + owed:
            raise OutOfSpace(f"out of space on the data volume ({free >> 20} MB free)")

    def open_journal(self) -> None:
        """Make the journal now rather than on the first store (the server: its files are
        written whole before the first acknowledgement has to wait for them)."""
        self._journal_for_writing()

    def _journal_for_writing(self) -> jr.Journal:
        with self._journal_lock:
            if self._journal is None:
                self._journal = jr.Journal(self.config.journal_dir, self.keyring.kek_id, self.keyring.journal_key,
                                           self)
            return self._journal

    def _read_barrier(self) -> None:
        """Before a fresh read: every store acknowledged until now, by this process or any
        other live one, is in the index."""
        journal = self._journal
        if journal is not None:
            journal.wait_applied()
        journal_recovery.wait_for_other_writers(self.config.journal_dir, journal.journal_id if journal else None)

    def submit_store(self, info: p10.InstanceInfo, blob: dict, inline: bytes | None, staged: StagedFile | None,
                     source: str, audit_entry: dict | None, stored_ns: int) -> Callable[[], None]:
        """Journal one stored instance; returns what waits until it is durable (in the index
        just after)."""
        journal = self._journal_for_writing()
        body = {"op": "store", "info": vars(info), "blob": blob, "inline": inline,
                "source": source, "audit": audit_entry if self.audit.enabled else None, "stored_ns": stored_ns}
        with self._in_flight_lock:
            self._in_flight[info.content_address] = self._in_flight.get(info.content_address, 0) + 1
            self._in_flight_sops[info.sop_uid] = self._in_flight_sops.get(info.sop_uid, 0) + 1
            self._in_flight_inline += len(inline) if inline is not None else 0
        try:
            queued = journal.submit(body, staged)
        except BaseException:
            self._done_in_flight([body])
            raise

        def wait() -> None:
            try:
                journal.wait(queued)
            except BaseException:
                self._done_in_flight([body])
                raise
        return wait

    def commit_audit(self, entry: dict | None) -> None:
        """Journal an audit record of the store path (a refusal): durable on return."""
        self.submit_audit(entry)()

    def submit_audit(self, entry: dict | None) -> Callable[[], None]:
        """Journal an audit record of the store path (a duplicate); returns what waits until
        it is durable."""
        if entry is None or not self.audit.enabled:
            return lambda: None
        journal = self._journal_for_writing()
        queued = journal.submit({"op": "audit", "audit": entry})
        return lambda: journal.wait(queued) and None

    def _done_in_flight(self, bodies: list[dict]) -> None:
        with self._in_flight_lock:
            for body in bodies:
                self._in_flight_inline -= len(body["inline"]) if body["inline"] is not None else 0
                for table, key in ((self._in_flight, body["info"]["content_address"]),
                                   (self._in_flight_sops, body["info"]["instance"]["SOPInstanceUID"])):
                    left = table.get(key, 0) - 1
                    if left > 0:
                        table[key] = left
                    else:
                        table.pop(key, None)

    # -- applying the journal (journal.Applier) ---------------------------------------------

    def replay_journals(self) -> int:
        """Apply what the journals of processes that are gone hold (after a crash)."""
        return journal_recovery.replay(self.config.journal_dir, self.keyring.kek_id, self.keyring.journal_key, self)

    def _replay_for_reader(self) -> None:
        """A reader that finds what a crash left in a journal replays it first (as a writer, for
        that moment): every acknowledged store is in what it reads."""
        try:
            with HomeLock(self.config.home, exclusive=False):
                self.replay_journals()
        except HomeLocked:
            pass  # a maintenance command holds the home: it replayed them when it opened
        except (OSError, OutOfSpace) as exc:  # a full disk: `status` must still work
            LOG.warning("stores acknowledged before a crash are not applied yet (%s): what is read "
                        "lacks them until a writer can replay the journal", exc)

    def apply(self, records: list[jr.Record], replaying: bool) -> None:
        """Redo journal records on the hot tier, the index and the trail (see journal.py)."""
        stores = [r for r in records if r.body["op"] == "store"]
        journal_id = records[0].journal_id
        with self.catalog.read(fresh=False) as view:
            position = view.journal_position(journal_id)
        for record in stores:
            blob, inline = record.body["blob"], record.body["inline"]
            if inline is not None and (record.number > position
                                       or self._needs_rewrite(record.body["info"]["content_address"], blob)):
                self.hot.write_unsynced(blob["name"], inline, record.body["stored_ns"])
                self._unsynced_names.add(blob["name"])
        surplus = self.catalog.record_stores(
            journal_id, records[-1].number,
            [(r.number, p10.InstanceInfo(**r.body["info"]), r.body["blob"], r.body["source"]) for r in stores],
            self.hot.name, keep_previous=self.config.appliance.store.keep_previous_versions,
            readable=(lambda key_id: self.keyring.has(key_id)) if replaying else (lambda key_id: True))
        for name in surplus:
            self.hot.delete(name)
        if not replaying:
            self._done_in_flight([r.body for r in stores])
        done = self.audit.journal_places(journal_id.hex(), records[0].started) if replaying else set()
        self.audit.append_journaled([{**entry, "detail": {**entry.get("detail", {}), "jrn": record.place}}
                                     for record in records
                                     if (entry := record.body.get("audit")) and record.place not in done])

    def _needs_rewrite(self, ca: bytes, blob: dict) -> bool:
        """A replayed inline blob that the index names, whose hot file a crash left short or lost."""
        with self.catalog.read(fresh=False) as view:
            known = view.blob(ca)
        copy = known.hot(self.hot.name) if known is not None else None
        if copy is None or copy.name != blob["name"]:
            return False
        try:
            return self.hot.size(blob["name"]) != blob["sealed_size"]
        except BlobMissing:
            return True

    def publish(self, staged: list[StagedFile]) -> None:
        """Make the staged hot files of a batch durable before the batch is (journal.Applier)."""
        self.hot.publish(staged)

    def checkpoint(self) -> None:
        """Make durable what apply wrote without waiting: hot files and the trail."""
        names = set(self._unsynced_names)
        self.hot.make_durable(names)
        self.audit.sync()
        self._unsynced_names -= names

    def forget(self, journal_id: bytes) -> None:
        self.catalog.forget_journal(journal_id)

    # -- reading -------------------------------------------------------------------------

    def instance(self, sop_uid: str) -> Instance:
        with self.catalog.read() as view:
            record = view.instance(sop_uid)
        if record is None:
            raise NotFound(f"no instance {sop_uid}")
        return record

    def open_blob(self, ca: bytes, chunk_size: int = sealed.READ_SIZE) -> Iterator[bytes]:
        """The original bytes of a stored version, verified as they stream (see sealed.open_sealed).

        A version with no hot copy is recalled first, with the rest of its study."""
        return self._stream(self._open_hot_copy(ca), ca, chunk_size)

    def read_blob(self, ca: bytes) -> bytes | memoryview:
        """The original bytes of a stored version, whole and verified before they are returned
        (for instances small enough to hold in memory: one pass, half the CPU of a stream)."""
        with self._open_hot_copy(ca) as fp:
            data = fp.read()
        return sealed.unseal_whole(data, key_for=self.keyring.data_key, content_address=ca)

    def _open_hot_copy(self, ca: bytes):
        """The hot copy of a stored version, open for reading; recalled first when it has none."""
        for attempt in range(3):
            # Not a fresh read: the caller found `ca` in one, and a recall writes the catalog directly.
            with self.catalog.read(fresh=False) as view:
                blob = view.blob(ca)
                instance = view.instance(blob.sop) if blob is not None else None
            if blob is None or instance is None:
                raise NotFound("no such stored version")
            if blob.damaged:
                raise IntegrityError(f"instance {blob.sop} is damaged (no good copy left: {blob.damaged.reason})")
            copy = blob.hot(self.hot.name)
            if copy is None:
                self.recall_study(instance.study)
                continue
            try:
                return self.hot.open(copy.name)
            except BlobMissing:
                if attempt < 2:  # evicted between the index read and the open: look again
                    continue
                raise
        raise IntegrityError("the instance could not be brought back to the hot tier")

    def recall_study(self, study_uid: str, on_wait=None) -> int:
        """Recall a study's cold-only versions to the hot tier; concurrent callers share one recall."""
        return self.recall_in_background(study_uid, on_wait).result()

    def recall_in_background(self, study_uid: str, on_wait=None) -> Future:
        with self._recall_lock:
            running = self._recalls.get(study_uid)
            if running is not None:
                return running
            future: Future = Future()
            self._recalls[study_uid] = future

        def run():
            try:
                count = tiering.recall(self, study_uid, on_wait=on_wait)
                if count:
                    self.audit.record(event(EventID.INSTANCES_ACCESSED, op="recall", action="U",
                                            study=study_uid, patient=self.patient_id_of(study_uid),
                                            instances=count))
                future.set_result(count)
            except BaseException as exc:  # noqa: BLE001 - handed to every waiter
                future.set_exception(exc)
            finally:
                with self._recall_lock:
                    self._recalls.pop(study_uid, None)

        threading.Thread(target=run, name="recall", daemon=True).start()
        return future

    def needs_recall(self, study_uid: str) -> bool:
        with self.catalog.read() as view:
            return any(blob.hot(self.hot.name) is None for blob in view.study_blobs(study_uid))

    def touch_study(self, study_uid: str) -> None:
        """Note an access (retrieve, export): policies migrate by days without access."""
        self.catalog.touch_study(study_uid, int(time.time()))

    def _stream(self, fp, ca: bytes, chunk_size: int) -> Iterator[bytes]:
        with fp:
            yield from sealed.unseal(fp, key_for=self.keyring.data_key, content_address=ca,
                                     chunk_size=chunk_size)

    def verify_current_copy(self, instance: Instance) -> None:
        """Key-less check of an instance's current hot copy; raises IntegrityError or NotFound."""
        with self.catalog.read() as view:
            blob = view.blob(instance.current)
        if blob is None or not blob.copies:
            raise NotFound("the instance has no stored copy")
        copy = blob.hot(self.hot.name)
        if copy is not None:
            verify_blob_file(self.hot, copy.name, blob)
        # else: only on cold tiers, where each pack was read back and verified before it counted

    def open_instance(self, sop_uid: str) -> Iterator[bytes]:
        return self.open_blob(self.instance(sop_uid).current)

    def rotate_kek(self) -> tuple[bytes, bytes, int]:
        """A new key-encryption key: every data key re-wrapped under it (no blob touched), audited.
        Returns (old KEK id, new KEK id, data keys re-wrapped). Needs the home to itself."""
        old, new, count = self.keyring.rotate()
        self.audit.record(event(EventID.SECURITY_ALERT, type=EventType.SECURITY_CONFIGURATION, op="keys rotate",
                                action="U", old_kek=old.hex(), new_kek=new.hex(), data_keys=count))
        return old, new, count

    def study(self, study_uid: str) -> Study:
        with self.catalog.read() as view:
            record = view.study(study_uid)
        if record is None:
            raise NotFound(f"no study {study_uid}")
        return record

    def patient_id_of(self, study_uid: str) -> str:
        """The PatientID of a study ("" when unknown): for audit records."""
        with self.catalog.read() as view:
            study = view.study(study_uid) if study_uid else None
            patient = view.patient(study.patient) if study else None
        return patient.attributes.get("PatientID", "") if patient else ""

    def study_uids(self) -> list[str]:
        with self.catalog.read() as view:
            return [study.uid for study in view.studies()]

    def instances_of_study(self, study_uid: str) -> list[Instance]:
        with self.catalog.read() as view:
            if view.study(study_uid) is None:
                raise NotFound(f"no study {study_uid}")
            return view.study_instances(study_uid)

    def counters(self) -> dict:
        with self.catalog.read() as view:
            counters = view.counters()
            counters.update({kind: view.count(kind) for kind in ("patients", "studies", "series")})
        return counters

    # -- deleting ------------------------------------------------------------------------

    def delete_study(self, study_uid: str) -> tuple[int, list[dict]]:
        """Remove a study from the index, destroy its data keys, delete every copy on every tier.

        The internal primitive behind expiry; callers check retention and holds. Returns
        (versions removed, cold copies that could not be removed now: unreadable all the same)."""
        with self.catalog.read() as view:
            if view.study(study_uid) is None:
                raise NotFound(f"no study {study_uid}")
            key_ids = view.study_key_ids(study_uid)
        # Shred first, durably: from here on no copy anywhere can be read, whatever happens next
        # (a crash before the index is updated leaves a study that fails to read; deleting again
        # finishes the job).
        self.keyring.destroy(key_ids)
        blobs, packs = self.catalog.remove_study(study_uid)
        for copies in blobs.values():
            copy = copies.get(self.hot.name)
            if isinstance(copy, HotCopy):
                self.hot.delete(copy.name)
        return len(blobs), tiering.delete_packs(self, {pack_id: (pack.tier, pack.where)
                                                       for pack_id, pack in packs.items()})


def hot_backend(config: Config, create: bool = False) -> FilesystemBackend:
    """The hot tier. Made only with the home: a hot directory that is gone later is a disk that
    is not mounted, and writing into the empty mount point would fill the root file system."""
    return FilesystemBackend(config.hot_tier.name, config.resolve(config.hot_tier.path), create=create)


def verify_blob_file(backend: FilesystemBackend, name: str, blob: Blob) -> None:
    """Key-less check of one copy: size and xxh3-128 of the sealed bytes."""
    with backend.open(name) as fp:
        size, digest = sealed.sealed_digest(fp)
    if size != blob.sealed_size:
        raise IntegrityError(f"copy {name} on {backend.name} has {size} bytes, expected {blob.sealed_size}")
    if digest != blob.xxh3:
        raise IntegrityError(f"copy {name} on {backend.name} does not match its sealed-bytes hash")
