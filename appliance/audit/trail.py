"""The trail on disk (`HOME/audit/`): appends from any number of threads and processes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.audit.chain import GENESIS, canonical, chain, link, parse_time
from appliance.audit.events import AuditError, EventID, EventType, event
from appliance.audit.signing import generate_key, load_key, public_hex, sign_checkpoint
from appliance.audit.verify import Verification, verify
from appliance.fsutil import flocked, fsync_dir, write_file_atomic
from appliance.security import access

SEGMENT_BYTES = 64 << 20
RESERVE_BYTES = 1 << 20
_HEAD_BYTES = 512
CHECKPOINT_EVERY = 1000
CHECKPOINT_INTERVAL_S = 3600


class AuditTrail:
    """The trail of one home. Thread-safe; any number of processes may append at once."""

    def __init__(self, directory: Path, key_file: Path, *, enabled: bool = True, user: str = ""):
        self.directory = Path(directory)
        self.key_file = Path(key_file)
        self.enabled = enabled
        self.user = user or access.person(self.directory.parent)
        self.host = socket.gethostname()
        self._key: Ed25519PrivateKey | None = None
        self._cond = threading.Condition()
        self._pending: list[tuple[int, dict]] = []
        self._tickets = 0  # last ticket handed out
        self._durable = 0  # every ticket up to this one is written (or failed)
        self._failed: dict[int, BaseException] = {}
        self._flushing = False
        self._reserve_tried = 0.0
        self._known: tuple[Path, int, int, str] | None = None  # (segment, size, seq, hash) after our last append
        self._checkpointed: dict | None = None  # the last checkpoint this process wrote or read
        self._unsynced: set[Path] = set()  # segments appended to without a sync (journaled records)

    @property
    def segments_dir(self) -> Path:
        return self.directory / "trail"

    @classmethod
    def create(cls, directory: Path, key_file: Path, *, reason: str = "appliance init") -> "AuditTrail":
        """A new key (unless the file exists) and the record announcing it: on a new home, or on
        a restored trail (which continues under the key of this home)."""
        (Path(directory) / "trail").mkdir(parents=True, exist_ok=True)
        public = public_hex(load_key(key_file)) if Path(key_file).exists() else generate_key(Path(key_file))
        trail = cls(directory, key_file)
        trail.make_reserve()
        trail.record(trail._started(reason, public))
        return trail

    def _started(self, reason: str, public_key: str) -> dict:
        """The record that announces a signing key: the first of a trail, and the first after a restore."""
        return event(EventID.SECURITY_ALERT, type=EventType.AUDIT_RECORDING_STARTED, op="audit", user=self.user,
                     host=self.host, reason=reason, audit_key=public_key)

    # -- appending ----------------------------------------------------------------------

    def record(self, entry: dict, *, force: bool = False) -> None:
        """Append one event and return once it is durable; raises AuditError when it cannot be.
        `force`: even when the trail is turned off (the changes that turn it off)."""
        if not (self.enabled or force):
            return
        entry.setdefault("user", self.user)
        entry.setdefault("host", self.host)
        with self._cond:
            self._tickets += 1
            ticket = self._tickets
            self._pending.append((ticket, entry))
            while self._durable < ticket:
                if self._flushing:
                    self._cond.wait()
                    continue
                self._flushing = True
                batch, self._pending = self._pending, []
                self._cond.release()
                error = None
                try:
                    self._append([e for _, e in batch])
                except BaseException as exc:  # noqa: BLE001 - every waiter of the batch gets it
                    error = exc
                finally:
                    self._cond.acquire()
                    self._flushing = False
                    if error is not None:
                        for number, _ in batch:
                            self._failed[number] = error
                    self._durable = max(self._durable, batch[-1][0])
                    self._cond.notify_all()
            error = self._failed.pop(ticket, None)
        if error is not None:
            if isinstance(error, AuditError) or not isinstance(error, Exception):  # KeyboardInterrupt too
                raise error
            raise AuditError(f"the audit trail cannot be written ({error}): the operation is refused")

    def _signing_key(self) -> Ed25519PrivateKey:
        if self._key is None:
            self._key = load_key(self.key_file)
        return self._key

    def append_journaled(self, entries: list[dict]) -> None:
        """Append records that are durable already in the ingest journal (store/journal.py),
        without waiting for the disk; `sync()` makes them durable here. Each carries its
        journal place (`detail.jrn`), so a replay appends only those the trail lacks."""
        if entries:
            self._append(entries, durable=False)

    def sync(self) -> None:
        """Make every record appended so far durable (after append_journaled)."""
        with self._locked():
            unsynced, self._unsynced = self._unsynced, set()
            for segment in sorted(unsynced):
                fd = os.open(segment, os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            if unsynced:
                fsync_dir(self.segments_dir)

    def journal_places(self, journal_hex: str, since: float) -> set[str]:
        """The journal places (`detail.jrn`) of one journal's records in the trail, looked for
        in the segments written since the journal was started."""
        marker = f'"jrn":"{journal_hex}:'.encode()
        places: set[str] = set()
        for segment in reversed(self.segment_paths()):
            with open(segment, "rb") as fp:
                first = fp.readline()
                fp.seek(0)
                for line in fp:
                    if marker in line:
                        places.add(json.loads(line)["detail"]["jrn"])
            try:  # a minute of margin for a clock that was set back
                if parse_time(json.loads(first)["time"]) < since - 60:
                    break
            except (ValueError, KeyError):
                continue
        return places

    def _append(self, entries: list[dict], durable: bool = True) -> None:
        with self._locked():
            if self._key is None and not self.key_file.exists() and not self.segment_paths():
                # A home from before the trail existed: start it, and say so in its first record.
                entries = [self._started("trail started in an existing home", generate_key(self.key_file))] + entries
            key = self._signing_key()
            segment, seq, prev, dropped = self._tail_cached()
            now = time.time()
            if dropped:
                entries = [event(EventID.SECURITY_ALERT, op="audit", action="E", outcome=4, user=self.user,
                                 host=self.host, reason=f"{dropped} bytes of a record cut off by a writer that "
                                                        "died mid-write were dropped (never acknowledged)")] + entries
            if segment is None or segment.stat().st_size >= SEGMENT_BYTES:
                segment = self.segments_dir / f"{seq + 1:012d}.log"
            new = not segment.exists()
            for attempt in (1, 2):
                lines, last, digest = chain(entries, seq, prev, now)
                try:
                    _append_durably(segment, b"".join(lines), sync=durable)
                    break
                except OSError as exc:
                    if attempt == 2 or exc.errno != errno.ENOSPC or not self._use_reserve():
                        raise
                    entries = entries + [event(
                        EventID.SECURITY_ALERT, op="audit", outcome=8, user=self.user, host=self.host,
                        reason="the volume of the audit trail is full: writing into its reserve; free space now")]
            seq, prev = last, digest
            self._known = (segment, segment.stat().st_size, seq, prev)
            if not durable:
                self._unsynced.add(segment)
            elif new:
                fsync_dir(self.segments_dir)
            head = sign_checkpoint(key, seq, prev, now)
            # Rewritten in place, padded to one fixed block: no new file per append.
            fd = os.open(self.directory / "head", os.O_WRONLY | os.O_CREAT, 0o640)
            try:
                os.pwrite(fd, canonical(head).ljust(_HEAD_BYTES), 0)
            finally:
                os.close(fd)
            if self._checkpointed is None:
                self._checkpointed = self._last_checkpoint()
            latest = self._checkpointed  # another process's checkpoints may be newer: one too many is harmless
            if latest is None or seq // CHECKPOINT_EVERY > latest["seq"] // CHECKPOINT_EVERY \
                    or now - parse_time(latest["time"]) >= CHECKPOINT_INTERVAL_S:
                self._write_checkpoint(head)
            if now - self._reserve_tried >= 60:
                self._reserve_tried = now
                self.make_reserve()

    def make_reserve(self) -> None:
        """Keep RESERVE_BYTES aside on the trail's volume (when there is room): a full disk stops
        the stores (answered 0xA700) before it stops their audit records."""
        reserve = self.directory / "reserve"
        if reserve.exists():
            return
        tmp = self.directory / f".reserve.{os.getpid()}"
        try:
            _append_durably(tmp, bytes(RESERVE_BYTES))
            os.replace(tmp, reserve)
        except OSError:
            tmp.unlink(missing_ok=True)

    def _use_reserve(self) -> bool:
        try:
            (self.directory / "reserve").unlink()
            return True
        except FileNotFoundError:
            return False

    def checkpoint(self) -> dict:
        """Sign the current end of the trail into checkpoints.log now (before an off-site copy)."""
        with self._locked():
            key = self._signing_key()
            _, seq, prev, _ = self._tail()
            head = sign_checkpoint(key, seq, prev, time.time())
            last = self._last_checkpoint()
            if last is None or last["seq"] != seq:
                self._write_checkpoint(head)
            return head

    def copy_to(self, directory: Path) -> None:
        """A consistent copy of the trail, its checkpoints and head (for the off-site copy),
        signed up to its last record."""
        self.checkpoint()
        head, checkpoints, sizes = self._snapshot()
        (directory / "trail").mkdir(parents=True)
        for segment, size in sizes.items():
            with open(directory / "trail" / segment.name, "wb") as out:
                out.writelines(line for _, line in self.lines({segment: size}))
        if head is not None:
            (directory / "head").write_bytes(canonical(head))
        (directory / "checkpoints.log").write_bytes(b"".join(line + b"\n" for line in checkpoints))

    def _write_checkpoint(self, checkpoint: dict) -> None:
        _append_durably(self.directory / "checkpoints.log", canonical(checkpoint) + b"\n")
        self._checkpointed = checkpoint

    def _tail_cached(self) -> tuple[Path | None, int, str, int]:
        """_tail, without reading the file when it is as this process left it: another writer
        would have made it longer (a new segment starts only once the current one is full)."""
        if self._known is not None:
            segment, size, seq, prev = self._known
            try:
                if size < SEGMENT_BYTES and segment.stat().st_size == size:
                    return segment, seq, prev, 0
            except FileNotFoundError:
                pass
        return self._tail()

    def _locked(self):
        # A trail not started yet: its directories are made on first use.
        return flocked(self.directory / "lock", make_parent=self.segments_dir)

    def _tail(self) -> tuple[Path | None, int, str, int]:
        """(current segment, seq and hash of the last record). A record cut off by a writer that
        died mid-write was never durable: it is dropped (and the drop recorded)."""
        segments = self.segment_paths()
        dropped = 0
        for segment in reversed(segments):
            with open(segment, "r+b") as fp:
                size = fp.seek(0, os.SEEK_END)
                line, end = _last_line(fp, size)
                if end < size:
                    fp.truncate(end)
                    os.fsync(fp.fileno())
                    dropped += size - end
                if line:
                    try:
                        return segments[-1], int(json.loads(line)["seq"]), link(line), dropped
                    except (ValueError, KeyError, TypeError):
                        raise AuditError(f"the last record of the audit trail ({segment.name}) is damaged: "
                                         "run `appliance audit verify`") from None
        return (segments[-1] if segments else None), 0, GENESIS, dropped

    def _last_checkpoint(self) -> dict | None:
        """The last checkpoint (under the lock); a line cut off by a crash is dropped."""
        path = self.directory / "checkpoints.log"
        if not path.exists():
            return None
        with open(path, "r+b") as fp:
            size = fp.seek(0, os.SEEK_END)
            line, end = _last_line(fp, size)
            if end < size:
                fp.truncate(end)
        try:
            return json.loads(line) if line else None
        except ValueError:
            return None  # verify reports the damaged line; a new checkpoint follows

    # -- reading ------------------------------------------------------------------------

    def segment_paths(self) -> list[Path]:
        if not self.segments_dir.is_dir():
            return []
        return sorted(p for p in self.segments_dir.iterdir() if p.suffix == ".log" and p.stem.isdigit())

    def lines(self, sizes: dict[Path, int] | None = None) -> Iterator[tuple[str, bytes]]:
        """Every line, or with `sizes` only the first `sizes[segment]` bytes of each segment."""
        for segment in (sizes or self.segment_paths()):
            limit = sizes[segment] if sizes else None
            read = 0
            with open(segment, "rb") as fp:
                for number, line in enumerate(fp, 1):
                    if limit is not None:
                        if read >= limit:
                            break
                        line = line[:limit - read]
                    read += len(line)
                    yield f"{segment.name} line {number}", line

    def _snapshot(self) -> tuple[dict | None, list[bytes], dict[Path, int]]:
        """Head, checkpoints and segment sizes at one instant: appends only add after those sizes,
        so the trail can then be read without the lock (stores are not held up by a long read)."""
        with self._locked():
            return (self.head(), self.checkpoint_lines(),
                    {segment: segment.stat().st_size for segment in self.segment_paths()})

    def records(self) -> Iterator[dict]:
        for where, line in self.lines():
            try:
                yield json.loads(line)
            except ValueError:
                raise AuditError(f"audit trail {where} is not a record: run `appliance audit verify`") from None

    def head(self) -> dict | None:
        try:
            return json.loads((self.directory / "head").read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            return {}

    def checkpoint_lines(self) -> list[bytes]:
        path = self.directory / "checkpoints.log"
        return path.read_bytes().splitlines() if path.exists() else []

    def verify(self, pinned: Iterable[str] = (), offsite: dict | None = None) -> Verification:
        head, checkpoints, sizes = self._snapshot()
        return verify(self.lines(sizes), head, checkpoints, pinned, offsite)

    def public_key(self) -> str:
        return public_hex(self._signing_key())

    # -- configuration changes ------------------------------------------------------------

    def note_config_changes(self, files: list[Path], *, by_command: str = "") -> None:
        """Record which configuration files changed since the last look (`by_command`: changed
        by this command; otherwise changed outside the appliance's commands, noticed now)."""
        digest_file = self.directory / "config.digest"
        with self._locked():
            try:
                before = json.loads(digest_file.read_bytes())
            except (FileNotFoundError, ValueError):
                before = None
            now = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}
            if before == now:
                return
            if before is not None:
                changed = sorted(set(before.items()) ^ set(now.items()))
                names = sorted({Path(name).name for name, _ in changed})
                entry = event(EventID.SECURITY_ALERT, type=EventType.SOFTWARE_CONFIGURATION, op="config", action="U",
                              user=self.user, host=self.host, changed=names,
                              noticed="" if by_command else "changed outside appliance commands",
                              command=by_command)
            write_file_atomic(digest_file, canonical(now), mode=0o640)
        if before is not None:
            self.record(entry, force=True)


def _append_durably(path: Path, data: bytes, sync: bool = True) -> None:
    """Append and fsync (unless told not to); on failure (a full disk) cut the file back:
    never half a record."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o640)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if sync:
                os.fdatasync(fd)
        except OSError:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def _last_line(fp, size: int) -> tuple[bytes, int]:
    """(the last whole line, the offset just after it) of a file of `size` bytes."""
    window = 4096
    while True:
        start = max(0, size - window)
        fp.seek(start)
        data = fp.read(size - start)
        end = data.rfind(b"\n")
        if end < 0:
            if start == 0:
                return b"", 0
            window *= 4
            continue
        begin = data.rfind(b"\n", 0, end)
        if begin < 0 and start > 0:
            window *= 4
            continue
        return data[begin + 1:end + 1], start + end + 1
