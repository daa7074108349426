"""The ingest journal: one durable write for a batch of stores, shared across associations.

A C-STORE is answered Success once its sealed instance, index entry and audit record
are durable. Writing each where it finally lives costs five syncs (the blob, its
directory, LMDB's data and meta pages, the trail). Here the three go into one record
of an append-only journal, a batch of concurrent records is written with one
`fdatasync`, and that is the acknowledgement; a thread then applies the records to the
hot tier, LMDB and the trail (without waiting for the disk), and a checkpoint makes
what was applied durable before the journal file that holds it is deleted. A process
that starts after a crash (kill -9, power cut) replays every journal whose writer is
gone (journal_recovery.py). A large blob is not copied into the journal: it is written (and synced) into its
hot file while it arrives, and its record only points at it.

Files: `HOME/journal/<journal id>-<n>.wal`, one journal per writing process (the id is
random, made when it starts), flock'ed by it while it lives (taken under a temporary name,
before the file is renamed into place: a replaying process never sees a live file
unlocked). Each file is made whole at
once (SEGMENT_BYTES of zeros, less on a small volume; synced), so that a commit overwrites blocks that exist
already and its fdatasync flushes data only, no file system metadata. Records fill a
file from its header on; once a checkpoint has made every record of a file durable
elsewhere, the file is written again from its start. The files go when the journal
closes.

    (the files' layout, byte by byte: format/journal.py)

Other processes read what this one acknowledged: `HOME/journal/<journal id>.state`,
flock'ed like the files, holds the numbers of the last record acknowledged and the last
applied (and whether applying fails); a process that reads the index first waits until
every live journal has applied what it had acknowledged when the read began
(journal_recovery.wait_for_other_writers). So `appliance export` run the moment storescu is told
Success finds the instance.

    state file: acknowledged (u64), applied (u64), applying fails (u8), big-endian

Replay is exact: LMDB keeps, in the same transaction as the index entries, the number
of the last record applied (`meta` "journal:<id>"), so no index mutation is done twice;
audit entries carry their record's place (`detail.jrn`) and go in only if the trail
lacks them; inline blobs are rewritten when their hot file is missing or short.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import os
import queue
import struct
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

from appliance.errors import OutOfSpace
from appliance.format.journal import (FILE_HEADER, FILE_MAGIC, MAX_RECORD_BYTES, VERSION, JournalError, Record,
                                      encode_record, journal_aead)
from appliance.fsutil import free_bytes, fsync_dir, make_dirs

SUFFIX = ".wal"
STATE_SUFFIX = ".state"
STATE_FORMAT = struct.Struct(">QQB")  # the state file: acknowledged, applied, applying fails
SEGMENT_BYTES = MAX_RECORD_BYTES  # a journal file holds the largest record
_MIN_SEGMENT_BYTES = 2 << 20  # an inline blob (1 MiB at most) and its record always fit
# A checkpoint follows this long after the first record not yet made durable elsewhere
# (sooner when a file fills): long enough that the kernel has written most of it back.
CHECKPOINT_INTERVAL_S = 5.0
_SPARE_FILES = 2  # free files kept for reuse
_SPARE_ROOM_AFTER = 8  # a spare file is made ahead only while this many times its size stays free
# Records acknowledged within this long are applied together (one index commit), unless a
# reader of this process waits for them.
APPLY_DELAY_S = 0.05

LOG = logging.getLogger("appliance.journal")


class Applier(Protocol):
    """What a journal's records are applied to (the archive).

    `publish(staged)` makes what a batch's records point at durable (the staged hot files
    of `commit(body, staged)`), before the batch is written. `apply(records, replaying)`
    redoes them on the hot tier, the index and the trail; it may be called again for
    records it has applied (after a crash) and must then change nothing more.
    `checkpoint()` makes everything applied so far durable. `forget(id)`: the journal is
    gone, drop what apply kept about it (its position)."""

    def publish(self, staged: list) -> None: ...

    def apply(self, records: list[Record], replaying: bool) -> None: ...

    def checkpoint(self) -> None: ...

    def forget(self, journal_id: bytes) -> None: ...


def _write_at(fd: int, buffers: list, offset: int) -> int:
    """Write every byte of `buffers` at `offset`; return how many."""
    views = [memoryview(b) for b in buffers if len(b)]
    total = 0
    while views:
        written = os.pwritev(fd, views[:1024], offset + total)
        total += written
        while written:
            if written >= len(views[0]):
                written -= len(views.pop(0))
            else:
                views[0] = views[0][written:]
                written = 0
    return total


def segment_bytes(directory: Path) -> int:
    """The size of the journal's files: SEGMENT_BYTES, or a sixteenth of what is free."""
    return max(_MIN_SEGMENT_BYTES, min(SEGMENT_BYTES, free_bytes(directory) // 16 // 4096 * 4096))


def _locked_new_file(path: Path) -> tuple[int, Path]:
    """A new file, flock'ed before anyone can see it under `path`: made under a temporary
    name (rename it into place once it is whole). Returns its descriptor and that name."""
    making = path.with_name(path.name + ".new")
    fd = os.open(making, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd, making


class _File:
    """One journal file, made whole at once (exclusive flock held while it is open)."""

    def __init__(self, path: Path, header: bytes, size: int):
        self.path = path
        self.size = size
        self.fd, making = _locked_new_file(path)
        self.start = len(header)
        self.offset = self.start
        self.last = 0  # number of the last record written since the file was (re)started
        try:
            zeros = bytes(1 << 20)
            written = _write_at(self.fd, [header], 0)
            while written < size:
                written += _write_at(self.fd, [zeros[:size - written]], written)
            os.fdatasync(self.fd)
            os.rename(making, path)
            fsync_dir(path.parent)
        except BaseException as exc:
            self.close()
            making.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfSpace(f"out of space on the data volume ({free_bytes(path.parent) >> 20} MB free)") \
                    from None
            raise

    @property
    def room(self) -> int:
        return self.size - self.offset

    def append(self, buffers: list, last: int) -> None:
        """Write a batch and sync it; on failure nothing counts (the next batch overwrites it)."""
        written = _write_at(self.fd, buffers, self.offset)
        os.fdatasync(self.fd)
        self.offset += written
        self.last = last

    def restart(self) -> None:
        """Everything in it is durable elsewhere: write it again from the start."""
        self.offset, self.last = self.start, 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Commit:
    """A record handed to commit(): its outcome, once written, is its Record or an exception."""

    __slots__ = ("body", "staged", "outcome")

    def __init__(self, body: dict, staged):
        self.body = body
        self.staged = staged
        self.outcome: Record | BaseException | None = None


class Journal:
    """The journal of this process: `commit(body)` returns once the record is durable; a
    thread applies records after that; `wait_applied(n)` waits until record n is in the
    index (read-your-writes for this process); `close()` applies and checkpoints all,
    and removes the journal."""

    def __init__(self, directory: Path, kek_id: bytes, journal_key: Callable[[bytes], bytes], applier: Applier,
                 *, checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S):
        self.directory = Path(directory)
        make_dirs(self.directory)  # its name durable too: a power cut must not take the journal with it
        os.chmod(self.directory, 0o700)
        self.journal_id = os.urandom(16)
        self.started = int(time.time())
        self._kek_id = kek_id
        self._aead = journal_aead(journal_key, self.journal_id)
        self._applier = applier
        self._interval = checkpoint_interval_s
        self._header = FILE_HEADER.pack(FILE_MAGIC, VERSION, b"", kek_id, self.journal_id, self.started, b"")
        self._segment = segment_bytes(self.directory)
        self._max_batch = self._segment - FILE_HEADER.size
        self._file_lock = threading.Lock()  # the committer appends, the checkpoint restarts files
        self._files: list[_File] = []  # the first is being written
        self._file_numbers = itertools.count(1)
        self._number = 0  # last record number handed out
        self._checkpointed = 0  # every record up to this one is durable elsewhere
        self._wants_checkpoint = False
        self._applying: queue.SimpleQueue = queue.SimpleQueue()
        self._commit_cond = threading.Condition()
        self._waiting: list[_Commit] = []  # records handed in, not yet written
        self._writing = False
        self._closed = False
        self._cond = threading.Condition()  # acknowledged / applied positions
        self._acked = 0
        self._applied = 0
        self._reader_waiting = threading.Event()
        self._broken: Exception | None = None
        self._apply_error: Exception | None = None
        self._unapplied = False  # closing gave up applying: the journal files stay
        self._files.append(self._new_file())
        self._state_path = self.directory / f"{self.journal_id.hex()}{STATE_SUFFIX}"
        self._state_fd, making = _locked_new_file(self._state_path)
        os.rename(making, self._state_path)  # not synced: after a crash nobody needs it
        self._publish()
        self._apply_thread = threading.Thread(target=self._apply_loop, name="journal-apply", daemon=True)
        self._apply_thread.start()

    def _publish(self) -> None:
        """What other processes wait on (under self._cond, or before the threads start)."""
        os.pwrite(self._state_fd, STATE_FORMAT.pack(self._acked, self._applied, self._apply_error is not None), 0)

    # -- committing ----------------------------------------------------------------------

    def commit(self, body: dict, staged=None) -> Record:
        """Append one record and return once it is durable, with what it points at (`staged`,
        published first); raises OutOfSpace, JournalError or the OSError of the publish."""
        return self.wait(self.submit(body, staged))

    def submit(self, body: dict, staged=None) -> "_Commit":
        """Queue a record for the next batch; `wait(entry)` for it (a caller with more work
        meanwhile, like an import, so has several records in each batch)."""
        entry = _Commit(body, staged)
        with self._commit_cond:
            if self._closed:
                raise JournalError("the journal is closed: not stored")
            self._waiting.append(entry)
        return entry

    def wait(self, entry: "_Commit") -> Record:
        """Return once the record is durable (or raise why it is not).

        Group commit without a thread of its own: the first caller that finds no write in
        progress writes the records of every caller waiting, with one fdatasync."""
        with self._commit_cond:
            while entry.outcome is None:
                if self._writing:
                    self._commit_cond.wait()
                    continue
                self._writing = True
                batch, self._waiting = self._waiting, []
                self._commit_cond.release()
                try:
                    self._commit_batch(list(batch))
                except BaseException as exc:  # every caller of the batch hears it, none waits forever
                    for waiting in batch:
                        if waiting.outcome is None:
                            waiting.outcome = exc
                finally:
                    self._commit_cond.acquire()
                    self._writing = False
                    self._commit_cond.notify_all()
        if isinstance(entry.outcome, BaseException):
            raise entry.outcome
        return entry.outcome

    def _new_file(self, room_after: int = 1) -> _File:
        """A new file, if `room_after` times its size stays free beside it: the journal must not
        take the space that applying its records to the hot tier needs."""
        free = free_bytes(self.directory)
        if free < (1 + room_after) * self._segment:
            raise OutOfSpace(f"out of space on the data volume ({free >> 20} MB free)")
        number = next(self._file_numbers)  # atomic: the committer and the applier both make files
        return _File(self.directory / f"{self.journal_id.hex()}-{number:06d}{SUFFIX}", self._header, self._segment)

    def _file_for(self, size: int) -> _File:
        """The file the next batch goes into (under the file lock): the current one while it
        has room, else a free one (every record durable elsewhere) or a new one."""
        current = self._files[0]
        if current.room >= size:
            return current
        free = next((f for f in self._files[1:] if f.last <= self._checkpointed), None)
        if free is None:
            free = self._new_file()
        else:
            self._files.remove(free)
        free.restart()
        self._files.insert(0, free)
        self._wants_checkpoint = True  # so that the file just left is free again soon
        self._applying.put([])
        return free

    def _commit_batch(self, batch: list["_Commit"]) -> None:
        """Publish what the batch points at, write it (in pieces that fit a file), sync it;
        every entry gets its outcome."""
        staged = [entry for entry in batch if entry.staged is not None]
        if staged:
            try:
                self._applier.publish([entry.staged for entry in staged])
            except OSError as exc:
                error = OutOfSpace("out of space on the data volume (write)") \
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc
                for entry in staged:
                    entry.outcome = error
                batch = [entry for entry in batch if entry.outcome is None]
        while batch:
            if self._broken is not None:
                error = JournalError(f"the journal cannot be written ({self._broken}): restart the server")
                for entry in batch:
                    entry.outcome = error
                return
            buffers, written, size = [], [], 0
            number = self._number
            while batch:
                entry = batch[0]
                try:
                    encoded = encode_record(self._aead, number + 1, entry.body)
                except (ValueError, TypeError) as exc:
                    entry.outcome = exc
                    batch.pop(0)
                    continue
                length = sum(len(b) for b in encoded)
                if length > self._max_batch:
                    entry.outcome = ValueError("journal record too large")
                    batch.pop(0)
                    continue
                if written and size + length > self._max_batch:
                    break  # the rest in the next piece
                batch.pop(0)
                number += 1
                size += length
                buffers.extend(encoded)
                written.append((entry, Record(self.journal_id, number, entry.body, self.started)))
            if written:
                self._write(buffers, size, number, written)

    def _write(self, buffers: list, size: int, number: int, written: list) -> None:
        try:
            with self._file_lock:
                self._file_for(size).append(buffers, number)
        except OutOfSpace as exc:  # no room for another journal file
            for entry, _ in written:
                entry.outcome = exc
            return
        except OSError as exc:
            error: Exception = OutOfSpace("out of space on the data volume: journal not written")
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                self._broken = exc  # fsyncgate: after a failed sync nothing is known; stop
                error = JournalError(f"the journal cannot be written ({exc}): restart the server")
            for entry, _ in written:
                entry.outcome = error
            return
        self._number = number
        with self._cond:
            self._acked = number
            self._publish()
        self._applying.put([record for _, record in written])
        for entry, record in written:
            entry.outcome = record

    # -- applying ------------------------------------------------------------------------

    def _apply_loop(self) -> None:
        pending_since = None
        while True:
            try:
                records = self._applying.get(timeout=0.5 if pending_since is not None else None)
            except queue.Empty:
                records = []
            if records is None:
                return
            if records and not self._reader_waiting.is_set():
                # Let a few more come (fewer, larger index commits), unless a reader waits for them.
                self._reader_waiting.wait(APPLY_DELAY_S)
            while True:
                try:
                    more = self._applying.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._applying.put(None)
                    break
                records += more
            if records:
                if not self._apply(records):
                    return  # closing with records that cannot be applied: close() keeps the journal
                pending_since = pending_since or time.monotonic()
            if pending_since is not None and (not records or self._wants_checkpoint
                                              or time.monotonic() - pending_since >= self._interval):
                self._checkpoint()
                pending_since = None
                self._ensure_spare()

    def _apply(self, records: list[Record]) -> bool:
        """Apply records, retrying while they fail (a full disk, say), until they are applied
        (True) or the journal is closing (False: they stay in the journal files)."""
        while True:
            try:
                self._applier.apply(records, replaying=False)
                break
            except Exception as exc:  # noqa: BLE001 - durable in the journal: retried, and said
                LOG.error("journal records %d-%d not applied yet, retrying: %s", records[0].number,
                          records[-1].number, exc)
                with self._cond:
                    self._apply_error = exc
                    self._publish()
                    self._cond.notify_all()
                if self._closed:
                    self._unapplied = True
                    return False
                time.sleep(1.0)
        with self._cond:
            self._apply_error = None
            self._applied = records[-1].number
            self._publish()
            if self._applied >= self._acked:
                self._reader_waiting.clear()
            self._cond.notify_all()
        return True

    def _checkpoint(self) -> None:
        """Make what was applied durable; the files whose records all are then become free
        (written again from their start; more than a couple of spare ones are deleted)."""
        applied = self._applied
        try:
            self._applier.checkpoint()
        except Exception as exc:  # noqa: BLE001 - nothing is dropped; the next checkpoint tries again
            LOG.error("journal checkpoint failed, the journal keeps its records: %s", exc)
            return
        with self._file_lock:
            self._checkpointed = applied
            self._wants_checkpoint = False
            spare = [f for f in self._files[1:] if f.last <= applied]
            for old in spare[_SPARE_FILES:]:
                old.close()
                os.unlink(old.path)
                self._files.remove(old)
            if spare[_SPARE_FILES:]:
                fsync_dir(self.directory)
            current = self._files[0]
            if current.last and current.last <= applied:
                current.restart()

    def _ensure_spare(self) -> None:
        """A free file ready for when the current one fills: made here, off the commit path."""
        with self._file_lock:
            if any(f.last <= self._checkpointed for f in self._files[1:]):
                return
        try:
            spare = self._new_file(room_after=_SPARE_ROOM_AFTER)
        except (OSError, OutOfSpace) as exc:  # the commit that needs it makes one, or says why not
            LOG.warning("no spare journal file made ahead: %s", exc)
            return
        with self._file_lock:
            self._files.append(spare)

    def wait_applied(self, number: int | None = None, timeout: float = 30.0) -> bool:
        """Wait until record `number` (default: every acknowledged record) is in the index;
        False (and logged) if that takes longer than `timeout` (applying keeps failing)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._acked if number is None else number
            if self._applied < target:
                self._reader_waiting.set()
            while self._applied < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    LOG.error("reading the index before acknowledged stores are in it (%s)",
                              self._apply_error or "still applying")
                    return False
                self._cond.wait(left)
        return True

    @property
    def apply_error(self) -> Exception | None:
        return self._apply_error

    def close(self) -> None:
        """Stop committing, apply and checkpoint everything, remove the journal files."""
        with self._commit_cond:
            self._closed = True  # later commits are refused, not lost
            while self._writing or self._waiting:
                self._commit_cond.wait()
        self._applying.put(None)
        self._apply_thread.join()
        leftover: list[Record] = []
        while True:
            try:
                more = self._applying.get_nowait()
            except queue.Empty:
                break
            if more:
                leftover += more
        if self._unapplied or (leftover and not self._apply(leftover)):
            # Durable in the journal files: left for the next writer to replay.
            LOG.error("journal %s kept with records not applied yet: the next start replays it",
                      self.journal_id.hex())
            for old in self._files:
                old.close()
            self._files = []
            os.close(self._state_fd)
            return
        self._applier.checkpoint()
        for old in self._files:
            old.close()
            os.unlink(old.path)
        self._files = []
        os.unlink(self._state_path)
        os.close(self._state_fd)
        fsync_dir(self.directory)
        self._applier.forget(self.journal_id)
