"""An instance stored as its bytes arrive: inspected and sealed on the way, journaled, durable.

    bytes as they arrive -> inspect (framing, index attributes) and seal (SHA-256, zstd,
    AES-GCM) together -> the study's data key once the walk has seen the study
    -> journal record {index entry, sealed bytes (or the staged hot file of a large
       instance), audit record}, group-committed with one fdatasync -> acknowledged.

What an ingest needs of the archive it stores into is `IngestTarget` (store/archive.py's
Archive is it): plaintext only ever in memory, what reaches a disk is sealed.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

from appliance.backends.filesystem import FilesystemBackend, StagedFile
from appliance.config import Config
from appliance.errors import InvalidInstance
from appliance.format import p10, sealed
from appliance.fsutil import raise_if_out_of_space
from appliance.store.keys import Keyring

# Sealed bytes of one instance held in memory and written into its journal record; a
# larger instance streams into its hot file as it arrives (synced with the commit). An
# acknowledgement waits for one sync that way; an import, which wants throughput rather,
# writes each byte once from a smaller size on (a second sync costs less than a second write).
INLINE_LIMIT = 1 << 20
IMPORT_INLINE_LIMIT = 64 << 10
# Plaintext held while the walk has not yet seen the study (its key seals the bytes).
BEFORE_KEY_LIMIT = 64 << 20
# A store is refused (0xA700) unless this much more than twice its sealed size is free:
# it is written twice (journal, hot file) and the index and trail must still fit, beyond
# what the hot files of stores already acknowledged (still in the journal) will take.
FREE_MARGIN = 2 << 20


@dataclass(frozen=True)
class StoreOutcome:
    status: str  # "stored", "new_version" or "duplicate"
    info: p10.InstanceInfo


class _SealedSink:
    """Where an instance's sealed bytes go while it arrives: memory up to `inline_limit`, then
    a staged hot file (sealed bytes only), made durable by the journal commit that records it."""

    def __init__(self, hot: FilesystemBackend, name: str, inline_limit: int):
        self._hot, self._name, self._limit = hot, name, inline_limit
        self._memory = bytearray()
        self.staged: StagedFile | None = None

    def write(self, data) -> None:
        if self.staged is None:
            self._memory += data
            if len(self._memory) > self._limit:
                self.staged = self._hot.stage(self._name)
                self.staged.write(self._memory)
                self._memory = bytearray()
            return
        self.staged.write(data)

    def inline(self) -> bytes | None:
        """The sealed bytes when they are small enough for the journal record, else None
        (they are in `staged`)."""
        return bytes(self._memory) if self.staged is None else None

    def discard(self) -> None:
        """Forget what was written (a staged file is removed)."""
        self._memory = bytearray()
        if self.staged is not None:
            staged, self.staged = self.staged, None
            staged.discard()


class IngestTarget(Protocol):
    """Where an ingest stores (the archive): its hot tier and keys, the study's data key, what
    storing would be (stored, new version, duplicate), room on the disk, and the journal."""

    config: Config
    hot: FilesystemBackend
    keyring: Keyring

    def new_blob_name(self) -> str: ...

    def study_key(self, study_uid: str) -> bytes: ...

    def known_status(self, info: p10.InstanceInfo) -> str: ...

    def check_space(self, sealed_size: int) -> None: ...

    def submit_store(self, info: p10.InstanceInfo, blob: dict, inline: bytes | None, staged: StagedFile | None,
                     source: str, audit_entry: dict | None, stored_ns: int) -> Callable[[], None]: ...

    def submit_audit(self, entry: dict | None) -> Callable[[], None]: ...


class Ingest:
    """One instance being stored as its bytes arrive (a C-STORE's PDVs, a file's chunks):
    `write()` them, then `finish()` (durable when it returns) or `abort()`. Plaintext is
    only ever in memory; what reaches a disk is sealed."""

    def __init__(self, archive: IngestTarget, source: str, inline_limit: int):
        self._archive = archive
        self.source = source
        self.inspector = p10.Inspector()
        self.name = archive.new_blob_name()
        self._sink = _SealedSink(archive.hot, self.name, inline_limit)
        settings = archive.config.appliance.store
        self._sealer = sealed.Sealer(self._sink, level=settings.compression_level,
                                     segment_size=settings.segment_size_kb << 10)
        self._key_id: bytes | None = None
        self._unsealable = False  # no study in the data set: refused at the end, nothing sealed
        self._sealed: tuple[p10.InstanceInfo, sealed.SealResult] | None = None

    def write(self, data) -> None:
        self.inspector.feed(data)
        if self._unsealable:
            return
        try:
            self._sealer.write(data)
            if not self._sealer.started and self.inspector.ready:
                self._start()
        except OSError as exc:
            raise_if_out_of_space(exc)
            raise
        if not self._sealer.started and self._sealer.buffered > BEFORE_KEY_LIMIT:
            raise InvalidInstance("no Study Instance UID in the first 64 MB of the data set")

    def _start(self) -> None:
        study_uid = self.inspector.study_uid
        if not study_uid:
            self._unsealable = True  # finish() says what is missing
            return
        self._key_id = self._archive.study_key(study_uid)
        self._sealer.start(data_key=self._archive.keyring.data_key(self._key_id), key_id=self._key_id,
                           try_compression=self.inspector.compressible,
                           shuffled=self.inspector.bits_allocated == 16)

    def abort(self) -> None:
        self._sink.discard()

    @contextmanager
    def _discarded_on_failure(self) -> Iterator[None]:
        """What was sealed goes when the block fails (a full disk said as OutOfSpace)."""
        try:
            yield
        except OSError as exc:
            self._sink.discard()
            raise_if_out_of_space(exc)
            raise
        except BaseException:
            self._sink.discard()
            raise

    def finish(self, audit_entry: Callable[[p10.InstanceInfo, str], dict | None] | None = None) -> StoreOutcome:
        """Complete the instance and commit it with its audit record (`audit_entry(info,
        status)`); returns once durable. Raises InvalidInstance or OutOfSpace, and then
        nothing of it is stored (the refusal's audit record is the caller's)."""
        return self.finish_later(audit_entry).result()

    def seal(self) -> None:
        """Complete the sealing now, on this thread (whose compressor sealed what was written);
        `finish` then only commits. Raises as `finish` does, and then nothing of it is kept."""
        self._sealed_instance()

    def _sealed_instance(self) -> tuple[p10.InstanceInfo, sealed.SealResult]:
        if self._sealed is not None:
            return self._sealed
        with self._discarded_on_failure():
            info = self.inspector.finish()
            if not self._sealer.started:
                self._start()
            result = self._sealer.finish()
        info.content_address = result.content_address
        self._sealed = (info, result)
        return self._sealed

    def finish_later(self, audit_entry: Callable[[p10.InstanceInfo, str], dict | None] | None = None
                     ) -> "PendingStore":
        """`finish`, except that it returns once the commit is queued: the result says when
        it is durable (an importer seals the next file meanwhile)."""
        info, result = self._sealed_instance()
        with self._discarded_on_failure():
            status = self._archive.known_status(info)
            entry = audit_entry(info, status) if audit_entry else None
            if status == "duplicate":
                self._sink.discard()
                return PendingStore(StoreOutcome(status, info), self._archive.submit_audit(entry), lambda: None)
            self._archive.check_space(result.sealed_size)
            inline, staged = self._sink.inline(), self._sink.staged
        blob = {"name": self.name, "sealed_size": result.sealed_size, "xxh3": result.sealed_xxh3,
                "key_id": self._key_id, "compression": result.compression}
        stored_ns = time.time_ns()
        try:
            if staged is not None:
                staged.set_stored_time(stored_ns)
            wait = self._archive.submit_store(info, blob, inline, staged, self.source, entry, stored_ns)
        except BaseException:
            self._sink.discard()
            raise
        return PendingStore(StoreOutcome(status, info), wait, self._sink.discard)


class PendingStore:
    """A store whose journal record is queued: `result()` returns once it is durable."""

    def __init__(self, outcome: StoreOutcome, wait: Callable[[], None], discard: Callable[[], None]):
        self._outcome, self._wait, self._discard = outcome, wait, discard

    def result(self) -> StoreOutcome:
        try:
            self._wait()
        except BaseException:
            self._discard()
            raise
        return self._outcome
