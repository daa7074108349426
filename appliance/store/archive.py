"""The archive facade: store, read, list and delete instances.

It ties the pieces together in the order that makes a store durable before it
is acknowledged:

    inspect (hash, check framing, read attributes) -> study data key
    -> seal into the hot tier (temp, fsync, rename, fsync dir)
    -> index commit (synced, group commit) -> acknowledged

A crash before the commit leaves at most an unreferenced sealed file (removed by
`fsck`) or a temp file (swept when a writer opens the home); never an index
entry without its blob.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from appliance import audit, backends
from appliance.audit import AuditTrail
from appliance.backends.filesystem import FilesystemBackend
from appliance.config import Config
from appliance.errors import ApplianceError, BlobMissing, IntegrityError, NotFound
from appliance.fsutil import HomeLock, raise_if_out_of_space
from appliance.store import index as ix
from appliance.store import p10, sealed, tiering
from appliance.store.index import Index
from appliance.store.keys import Keyring


@dataclass(frozen=True)
class StoreOutcome:
    status: str  # "stored", "new_version" or "duplicate"
    info: p10.InstanceInfo


class Archive:
    """Open with `Archive.open(config, writer=...)`; use as a context manager."""

    def __init__(self, config: Config, *, lock: HomeLock | None, create: bool = False):
        self.config = config
        self._lock = lock
        settings = config.appliance
        self.keyring = Keyring(config.keyring_path, config.key_file, create=create)
        try:
            self.index = Index(config.index_path, map_size=settings.index.initial_map_size_mb << 20,
                               create=create)
        except FileNotFoundError:
            self.keyring.close()
            raise NotFound(f"index {config.index_path} is missing: run `appliance fsck --rebuild-index`") from None
        self.hot = hot_backend(config, create=create)
        self.audit = AuditTrail(config.audit_dir, config.audit_key_file, enabled=settings.audit.enabled)
        self._key_lock = threading.Lock()
        self._tiers: dict = {}
        self._tiers_lock = threading.Lock()
        self._recalls: dict[str, Future] = {}
        self._recall_lock = threading.Lock()
        if lock is not None and self.hot.root.is_dir():
            self.hot.sweep_incoming()

    @classmethod
    def open(cls, config: Config, *, writer: bool = False, exclusive: bool = False) -> "Archive":
        lock = HomeLock(config.home, exclusive=exclusive).__enter__() if writer or exclusive else None
        try:
            return cls(config, lock=lock)
        except BaseException:
            if lock is not None:
                lock.__exit__(None, None, None)
            raise

    def close(self) -> None:
        self.index.close()
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
            with self.index.read() as t:
                key_id = t.get("study_keys", study_uid)
            if key_id is not None:
                return key_id
            new_id = self.keyring.new_data_key()
            return self.index.write(lambda t: t.get("study_keys", study_uid)
                                    or t.put("study_keys", study_uid, new_id) or new_id)

    def tier(self, name: str):
        """The backend of a cold tier (opened on first use)."""
        with self._tiers_lock:
            if name not in self._tiers:
                self._tiers[name] = backends.open_tier(self.config, self.config.tiers[name])
            return self._tiers[name]

    def store_file(self, path: str | os.PathLike, source: str = "import") -> StoreOutcome:
        """Store one P10 file byte-exact. Returns once it is durable; raises InvalidInstance,
        OutOfSpace or another ApplianceError and then nothing of it is stored.
        `source`: the calling AE title, or "import"."""
        info = p10.inspect(path)
        with self.index.read() as t:
            known = t.get("blobs", info.content_address)
            if known is not None and not known.get("damaged"):
                return StoreOutcome("duplicate", info)
            # A damaged version sent again (by the PACS, or imported from a backup) is stored anew.
        key_id = self.study_key(info.study_uid)
        settings = self.config.appliance.store
        name = os.urandom(16).hex()
        with open(path, "rb") as src, self.hot.create(name) as dst:
            try:
                result = sealed.seal(src, info.length, dst, data_key=self.keyring.data_key(key_id),
                                     key_id=key_id, content_address=info.content_address,
                                     level=settings.compression_level, try_compression=info.compressible,
                                     shuffled=info.bits_allocated == 16,
                                     segment_size=settings.segment_size_kb << 10)
            except OSError as exc:
                raise_if_out_of_space(exc)
                raise
        blob = {"name": name, "sealed_size": result.sealed_size, "xxh3": result.sealed_xxh3,
                "key_id": key_id, "compression": result.compression}
        try:
            status, superseded = self.index.write(lambda t: self._record(t, info, blob, source))
        except BaseException:
            self.hot.delete(name)
            raise
        if status == "duplicate":
            self.hot.delete(name)
        # Previous versions the config does not keep go once the new one is committed;
        # should this fail, fsck reclaims the unreferenced files.
        for old_name in superseded:
            self.hot.delete(old_name)
        return StoreOutcome(status, info)

    def _record(self, t: ix.Txn, info: p10.InstanceInfo, blob: dict, source: str) -> tuple[str, list[str]]:
        known = t.get("blobs", info.content_address)
        if known is not None and known.get("damaged"):
            # Its copies failed verification: the bytes just received replace them all.
            old = known["copies"].get(self.hot.name)
            known.update(sealed_size=blob["sealed_size"], xxh3=blob["xxh3"], key_id=blob["key_id"],
                         compression=blob["compression"])
            known["copies"] = {self.hot.name: {"name": blob["name"], "verified": int(time.time())}}
            del known["damaged"]
            t.put("blobs", info.content_address, known)
            return "stored", [old["name"]] if old else []
        previous = t.get("instances", info.sop_uid)
        status = ix.record_instance(t, info, blob, self.hot.name, source)
        superseded = []
        if status == "new_version" and not self.config.appliance.store.keep_previous_versions:
            for ca in previous["versions"]:
                copies = ix.drop_version(t, info.sop_uid, ca)
                if self.hot.name in copies:  # copies on cold tiers stay in their packs until the study goes
                    superseded.append(copies[self.hot.name]["name"])
        return status, superseded

    # -- reading -------------------------------------------------------------------------

    def instance(self, sop_uid: str) -> dict:
        with self.index.read() as t:
            record = t.get("instances", sop_uid)
        if record is None:
            raise NotFound(f"no instance {sop_uid}")
        return record

    def open_blob(self, ca: bytes, chunk_size: int = sealed.READ_SIZE) -> Iterator[bytes]:
        """The original bytes of a stored version, verified as they stream (see sealed.open_sealed).

        A version with no hot copy is recalled first, with the rest of its study."""
        for attempt in range(3):
            with self.index.read() as t:
                blob = t.get("blobs", ca)
                study_uid = blob and t.get("instances", blob["sop"])["study"]
            if blob is None:
                raise NotFound("no such stored version")
            if blob.get("damaged"):
                raise IntegrityError(f"instance {blob['sop']} is damaged (no good copy left: "
                                     f"{blob['damaged']['reason']})")
            copy = blob["copies"].get(self.hot.name)
            if copy is None:
                self.recall_study(study_uid)
                continue
            try:
                fp = self.hot.open(copy["name"])
            except BlobMissing:
                if attempt < 2:  # evicted between the index read and the open: look again
                    continue
                raise
            return self._stream(fp, ca, chunk_size)
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
                    self.audit.record(audit.event("DICOM Instances Accessed", op="recall", action="U",
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
        with self.index.read() as t:
            return any(self.hot.name not in blob["copies"] for _, blob in ix.study_blobs(t, study_uid))

    def touch_study(self, study_uid: str) -> None:
        """Note an access (retrieve, export): policies migrate by days without access."""
        now = int(time.time())

        def touch(t: ix.Txn) -> None:
            study = t.get("studies", study_uid)
            if study is not None and study.get("last_access", 0) < now:
                study["last_access"] = now
                t.put("studies", study_uid, study)
        self.index.write(touch)

    def _stream(self, fp, ca: bytes, chunk_size: int) -> Iterator[bytes]:
        with fp:
            yield from sealed.unseal(fp, key_for=self.keyring.data_key, content_address=ca,
                                     chunk_size=chunk_size)

    def verify_current_copy(self, record: dict) -> None:
        """Key-less check of an instance's current hot copy; raises IntegrityError or NotFound."""
        with self.index.read() as t:
            blob = t.get("blobs", record["current"])
        if blob is None or not blob["copies"]:
            raise NotFound("the instance has no stored copy")
        if self.hot.name in blob["copies"]:
            verify_blob_file(self.hot, blob["copies"][self.hot.name]["name"], blob)
        # else: only on cold tiers, where each pack was read back and verified before it counted

    def open_instance(self, sop_uid: str) -> Iterator[bytes]:
        return self.open_blob(self.instance(sop_uid)["current"])

    def study(self, study_uid: str) -> dict:
        with self.index.read() as t:
            record = t.get("studies", study_uid)
        if record is None:
            raise NotFound(f"no study {study_uid}")
        return record

    def patient_id_of(self, study_uid: str) -> str:
        """The PatientID of a study ("" when unknown): for audit records."""
        with self.index.read() as t:
            study = t.get("studies", study_uid) if study_uid else None
            patient = t.get("patients", study["patient"]) if study else None
        return (patient or {}).get("PatientID", "")

    def study_uids(self) -> list[str]:
        with self.index.read() as t:
            return [key.decode() for key, _ in t.items("studies")]

    def instances_of_study(self, study_uid: str) -> list[tuple[str, dict]]:
        with self.index.read() as t:
            if t.get("studies", study_uid) is None:
                raise NotFound(f"no study {study_uid}")
            return [(sop, t.get("instances", sop))
                    for series in t.dup_values("study_series", study_uid)
                    for sop in t.dup_values("series_instances", series)]

    def counters(self) -> dict:
        with self.index.read() as t:
            counters = ix._counters(t)
            counters.update(patients=t.count("patients"), studies=t.count("studies"),
                            series=t.count("series"))
        return counters

    def export_study(self, study_uid: str, dest: Path) -> tuple[list[Path], list[tuple[str, str]]]:
        """Write every current instance of a study byte-exact as DEST/<SOPInstanceUID>.dcm.

        A file appears only after all of its bytes verified. Returns (written, failures)."""
        dest.mkdir(parents=True, exist_ok=True)
        written, failures = [], []
        instances = self.instances_of_study(study_uid)
        self.touch_study(study_uid)
        if self.needs_recall(study_uid):
            self.recall_study(study_uid)
        for sop_uid, record in instances:
            target = dest / f"{sop_uid}.dcm"
            tmp = dest / f".{sop_uid}.dcm.partial"
            try:
                with open(tmp, "wb") as out:
                    for chunk in self.open_blob(record["current"]):
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, target)
                written.append(target)
            except ApplianceError as exc:
                tmp.unlink(missing_ok=True)
                failures.append((sop_uid, str(exc)))
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise_if_out_of_space(exc)
                raise
        return written, failures

    # -- deleting ------------------------------------------------------------------------

    def delete_study(self, study_uid: str) -> tuple[int, list[dict]]:
        """Remove a study from the index, destroy its data keys, delete every copy on every tier.

        The internal primitive behind expiry; callers check retention and holds. Returns
        (versions removed, cold copies that could not be removed now: unreadable all the same)."""
        with self.index.read() as t:
            if t.get("studies", study_uid) is None:
                raise NotFound(f"no study {study_uid}")
            key_ids = ix.study_key_ids(t, study_uid)
        # Shred first, durably: from here on no copy anywhere can be read, whatever happens next
        # (a crash before the index is updated leaves a study that fails to read; deleting again
        # finishes the job).
        self.keyring.destroy(key_ids)
        blobs, packs = self.index.write(lambda t: ix.remove_study(t, study_uid))
        for copies in blobs.values():
            if self.hot.name in copies:
                self.hot.delete(copies[self.hot.name]["name"])
        return len(blobs), tiering.delete_packs(self, packs)


def hot_backend(config: Config, create: bool = False) -> FilesystemBackend:
    """The hot tier. Made only with the home: a hot directory that is gone later is a disk that
    is not mounted, and writing into the empty mount point would fill the root file system."""
    return FilesystemBackend(config.hot_tier.name, config.resolve(config.hot_tier.path), create=create)


def verify_blob_file(backend: FilesystemBackend, name: str, blob: dict) -> None:
    """Key-less check of one copy: size and xxh3-128 of the sealed bytes."""
    with backend.open(name) as fp:
        size, digest = sealed.sealed_digest(fp)
    if size != blob["sealed_size"]:
        raise IntegrityError(f"copy {name} on {backend.name} has {size} bytes, expected {blob['sealed_size']}")
    if digest != blob["xxh3"]:
        raise IntegrityError(f"copy {name} on {backend.name} does not match its sealed-bytes hash")
