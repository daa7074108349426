"""The audit trail: who did what to which images, append-only, hash-chained, signed.

Layout (`HOME/audit/`):

    trail/<first seq, 12 digits>.log   JSON lines, one record each; a new segment past 64 MB
    head                               the latest signed checkpoint (rewritten by every append)
    checkpoints.log                    signed checkpoints kept for good: every 1,000 records,
                                       every hour, and before every off-site copy
    config.digest                      SHA-256 of each configuration file, to notice changes
    reserve                            1 MB set aside: released when the volume fills, so the
                                       records of the last stores still fit

A record is one line of canonical JSON (sorted keys, no spaces): `seq` (1, 2, ...), `time`
(UTC), `prev` (SHA-256 of the previous record's line, newline included), then the event
in the DICOM audit vocabulary (PS3.15 A.5: `event`, `type`, `action` C/R/U/D/E,
`outcome` 0/4/8/12) and who (`user`, `host`), what (`op`, `patient`, `study`,
`instances`, `dest`) and the rest (`detail`). Changing, removing, inserting or reordering
any byte breaks a link; removing records from the end is caught by the head and the
checkpoints, which an Ed25519 key signs (`audit.key_file`: kept apart from the KEK, never
replicated). A key is trusted when a record of the trail announces it (`audit_key`: the
first record, and a restore) or when `audit verify --public-key` pins it.

Writers are several processes (the server, every CLI command): each append takes an
exclusive flock on `audit/lock`, continues the chain from the last line on disk, fsyncs
and signs a new head. Inside a process, concurrent records are group-committed: one
thread writes a batch while the others wait for it, so a C-STORE is answered only once
its record is durable.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance import access
from appliance.errors import ApplianceError, KeyFileError
from appliance.fsutil import fsync_dir, write_file_atomic

SEGMENT_BYTES = 64 << 20
RESERVE_BYTES = 1 << 20
_HEAD_BYTES = 512
CHECKPOINT_EVERY = 1000
CHECKPOINT_INTERVAL_S = 3600
GENESIS = "0" * 64
_SIGNED_LABEL = b"pacs-vault audit checkpoint v1\n"

# DICOM PS3.16 CID 400 (event IDs) and CID 401/403 (event types), code system DCM.
EVENT_IDS = {
    "Application Activity": "110100", "Audit Log Used": "110101",
    "Begin Transferring DICOM Instances": "110102", "DICOM Instances Accessed": "110103",
    "DICOM Instances Transferred": "110104", "DICOM Study Deleted": "110105", "Export": "110106",
    "Import": "110107", "Query": "110112", "Security Alert": "110113", "User Authentication": "110114",
}
EVENT_TYPES = {
    "Application Start": "110120", "Application Stop": "110121", "Login": "110122", "Logout": "110123",
    "Node Authentication": "110126", "Network Configuration": "110128", "Security Configuration": "110129",
    "Software Configuration": "110131", "Use of Restricted Function": "110132",
    "Audit Recording Stopped": "110133", "Audit Recording Started": "110134",
    "Object Security Attributes Changed": "110135",
}
OUTCOMES = {0: "success", 4: "minor failure", 8: "serious failure", 12: "major failure"}


class AuditError(ApplianceError):
    """The trail cannot be written: the operation that needed the record does not happen."""

    exit_code = 74


# -- records (pure) --------------------------------------------------------------------------

def canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def link(line: bytes) -> str:
    """The hash the next record carries as `prev`: SHA-256 of the line, newline included."""
    return hashlib.sha256(line).hexdigest()


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event(event_id: str, *, op: str, action: str = "E", outcome: int = 0, type: str = "",
          user: str = "", host: str = "", dest: str = "", patient: str = "", study: str = "",
          instances: int | None = None, **detail) -> dict:
    """One audit event (without its place in the chain). Empty fields are left out."""
    if event_id not in EVENT_IDS or (type and type not in EVENT_TYPES) or action not in "CRUDE" \
            or outcome not in OUTCOMES:
        raise ValueError(f"not an audit event: {event_id!r} {type!r} {action!r} {outcome!r}")
    record = {"event": event_id, "type": type, "op": op, "action": action, "outcome": outcome, "user": user,
              "host": host, "dest": dest, "patient": patient, "study": study, "instances": instances,
              "detail": {k: v for k, v in detail.items() if v not in (None, "", [], {})}}
    return {k: v for k, v in record.items() if v not in (None, "", {}) or k == "outcome"}


def chain(entries: Iterable[dict], seq: int, prev: str, now: float) -> tuple[list[bytes], int, str]:
    """Lines for `entries` continuing a chain whose last record is (seq, hash prev)."""
    lines = []
    for entry in entries:
        seq += 1
        line = canonical({"seq": seq, "time": utc(now), "prev": prev} | entry) + b"\n"
        prev = link(line)
        lines.append(line)
    return lines, seq, prev


# -- signed checkpoints ----------------------------------------------------------------------

def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def sign_checkpoint(key: Ed25519PrivateKey, seq: int, digest: str, now: float) -> dict:
    body = {"seq": seq, "hash": digest, "time": utc(now), "key": public_hex(key)}
    return body | {"sig": key.sign(_SIGNED_LABEL + canonical(body)).hex()}


def checkpoint_signed(checkpoint: dict) -> bool:
    try:
        body = {k: checkpoint[k] for k in ("seq", "hash", "time", "key")}
        signature = bytes.fromhex(checkpoint["sig"])
        if signature.hex() != checkpoint["sig"]:  # only the canonical spelling: any edited byte shows
            return False
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(checkpoint["key"])).verify(
            signature, _SIGNED_LABEL + canonical(body))
        return True
    except (KeyError, ValueError, TypeError, InvalidSignature):
        return False


def generate_key(path: Path) -> str:
    """Write a new Ed25519 signing key (PEM, mode 0640: every operator's command signs its
    records); return its public key in hex."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, pem, mode=0o640)
    return public_hex(key)


def load_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise KeyFileError(f"audit key {path} is missing: nothing can be recorded, so nothing is done; "
                           "put it back from the key backup") from None
    except (OSError, ValueError, TypeError):
        raise KeyFileError(f"audit key {path} is not an Ed25519 private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"audit key {path} is not an Ed25519 private key")
    return key


# -- verification (pure) ---------------------------------------------------------------------

@dataclass
class Verification:
    records: int = 0
    last_seq: int = 0
    checkpoints: int = 0
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"intact": self.intact, "records": self.records, "last_seq": self.last_seq,
                "checkpoints": self.checkpoints, "keys": self.keys, "problems": self.problems}


def verify(lines: Iterable[tuple[str, bytes]], head: dict | None, checkpoints: Iterable[bytes],
           pinned: Iterable[str] = (), offsite: dict | None = None) -> Verification:
    """Check a trail: `lines` = (where, line bytes incl. newline) in order; `head` the signed
    head; `checkpoints` the lines of checkpoints.log; `pinned` public keys the auditor trusts;
    `offsite` the signed head of the trail in the latest off-site copy (the local trail must
    still hold what it signed). Every problem names the record (seq) or line it is about."""
    result = Verification()
    wanted: dict[int, list[dict]] = {}
    parsed_checkpoints = []
    for number, raw in enumerate(checkpoints, 1):
        try:
            cp = json.loads(raw)
            wanted.setdefault(int(cp["seq"]), []).append(cp)
            parsed_checkpoints.append(cp)
        except (ValueError, KeyError, TypeError):
            result.problems.append(f"checkpoint line {number}: not a checkpoint (edited or damaged)")
    if head is not None:
        try:
            wanted.setdefault(int(head["seq"]), []).append(head)
        except (KeyError, ValueError, TypeError):
            result.problems.append("the signed head is not a checkpoint (edited or damaged)")
            head = None
    if offsite is not None:
        wanted.setdefault(int(offsite["seq"]), []).append(offsite)
    hashes: dict[int, str] = {}
    expected, prev = 1, GENESIS
    for where, line in lines:
        result.records += 1
        try:
            record = json.loads(line)
            seq, record_prev = int(record["seq"]), record["prev"]
            if not line.endswith(b"\n"):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            result.problems.append(f"{where}: not a whole record (edited, damaged or cut off) after record "
                                   f"{expected - 1}")
            prev, expected = link(line), expected + 1
            continue
        if seq > expected:
            result.problems.append(f"records {expected} to {seq - 1} are missing (deleted) before record {seq}")
        elif seq < expected:
            result.problems.append(f"record {seq} appears after record {expected - 1}: reordered or inserted")
        elif record_prev != prev:
            result.problems.append(f"record {seq} does not link to record {seq - 1}: one of them was edited, "
                                   "or a record was inserted")
        announced = record.get("detail", {}).get("audit_key") if isinstance(record, dict) else None
        if announced and announced not in result.keys:
            result.keys.append(announced)
        prev, expected = link(line), seq + 1
        result.last_seq = seq
        if seq in wanted:
            hashes[seq] = prev
    # Pinned keys, when given, are the only ones trusted (after a restore, pin the old and the new key);
    # otherwise every key a record announces.
    pins = set(pinned)
    trusted = pins or set(result.keys)
    if pins and not pins & set(result.keys):
        result.problems.append("no record announces the pinned public key: the trail was signed by another key")
    named = [(f"the checkpoint at record {cp['seq']}", cp) for cp in parsed_checkpoints]
    named += [("the signed head", head)] if head is not None else []
    named += [(f"the off-site copy's head (record {offsite['seq']})", offsite)] if offsite is not None else []
    for name, cp in named:
        if not checkpoint_signed(cp):
            result.problems.append(f"{name}: bad signature (edited or forged)")
        elif cp["key"] not in trusted:
            result.problems.append(f"{name}: signed by a key {'not pinned' if pins else 'no record announces'}")
        elif cp["seq"] > result.last_seq:
            result.problems.append(f"{name} covers records up to {cp['seq']} but the trail ends at "
                                   f"{result.last_seq}: records {result.last_seq + 1} to {cp['seq']} were removed")
        elif hashes.get(cp["seq"]) != cp["hash"]:
            result.problems.append(f"{name}: record {cp['seq']} is not the record that was signed (edited)")
    result.checkpoints = len(parsed_checkpoints)
    if head is None:
        result.problems.append("the signed head is missing: the end of the trail cannot be checked")
    elif isinstance(head.get("seq"), int) and head["seq"] < result.last_seq:
        result.problems.append(f"records {head['seq'] + 1} to {result.last_seq} come after the signed head: "
                               "added without the audit key (or by a writer killed before signing)")
    seqs = [cp["seq"] for cp in parsed_checkpoints if isinstance(cp.get("seq"), int)]
    if seqs != sorted(seqs):
        result.problems.append("the checkpoints are out of order")
    return result


# -- export formats (pure) -------------------------------------------------------------------

def _sd_escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def to_syslog(record: dict, hostname: str) -> str:
    """An RFC 5424 line: facility 13 (log audit); severity notice, warning for failures and
    security alerts; the record's fields as structured data."""
    severity = 4 if record.get("outcome") or record["event"] == "Security Alert" else 5
    order = ("seq", "event", "type", "op", "action", "outcome", "user", "host", "dest", "patient", "study",
             "instances")
    fields = {k: record[k] for k in order if k in record}
    fields["detail"] = json.dumps(record.get("detail", {}), sort_keys=True, separators=(",", ":"))
    data = " ".join(f'{k}="{_sd_escape(v)}"' for k, v in fields.items())
    message = f"{record['event']}: {record['op']} by {record.get('user', '-')}"
    msgid = "".join(c if "!" <= c <= "~" else "_" for c in record["op"])[:32] or "-"
    return (f"<{13 * 8 + severity}>1 {record['time']} {hostname or '-'} pacs-vault - {msgid} "
            f"[audit@32473 {data}] {message}")


def _code(parent: ET.Element, tag: str, code: str, meaning: str, system: str = "DCM") -> None:
    ET.SubElement(parent, tag, {"csd-code": code, "codeSystemName": system, "originalText": meaning})


def to_atna_xml(record: dict, source_id: str) -> str:
    """A DICOM PS3.15 A.5 AuditMessage."""
    message = ET.Element("AuditMessage")
    ident = ET.SubElement(message, "EventIdentification", {
        "EventActionCode": record["action"], "EventDateTime": record["time"],
        "EventOutcomeIndicator": str(record["outcome"])})
    _code(ident, "EventID", EVENT_IDS[record["event"]], record["event"])
    if record.get("type"):
        _code(ident, "EventTypeCode", EVENT_TYPES[record["type"]], record["type"])
    if record["outcome"] and record.get("detail", {}).get("reason"):
        ET.SubElement(ident, "EventOutcomeDescription").text = str(record["detail"]["reason"])
    requestor = ET.SubElement(message, "ActiveParticipant", {"UserID": record.get("user", "") or "-",
                                                             "UserIsRequestor": "true"})
    if record.get("host"):
        requestor.set("NetworkAccessPointID", record["host"])
        requestor.set("NetworkAccessPointTypeCode", "2" if record["host"][:1].isdigit() or ":" in record["host"]
                      else "1")
    if record["op"] in ("c-store", "import"):
        _code(requestor, "RoleIDCode", "110153", "Source Role ID")
    if record.get("dest"):
        destination = ET.SubElement(message, "ActiveParticipant", {"UserID": record["dest"],
                                                                   "UserIsRequestor": "false"})
        _code(destination, "RoleIDCode", "110152", "Destination Role ID")
    archive = ET.SubElement(message, "ActiveParticipant", {"UserID": source_id, "UserIsRequestor": "false"})
    _code(archive, "RoleIDCode", "110150", "Application")
    ET.SubElement(message, "AuditSourceIdentification", {"AuditSourceID": source_id})
    if record.get("study"):
        study = ET.SubElement(message, "ParticipantObjectIdentification", {
            "ParticipantObjectID": record["study"], "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "3"})
        _code(study, "ParticipantObjectIDTypeCode", "110180", "Study Instance UID")
        if record.get("instances") is not None:
            ET.SubElement(study, "ParticipantObjectDetail", {"type": "NumberOfInstances",
                                                             "value": str(record["instances"])})
    if record.get("patient"):
        patient = ET.SubElement(message, "ParticipantObjectIdentification", {
            "ParticipantObjectID": record["patient"], "ParticipantObjectTypeCode": "1",
            "ParticipantObjectTypeCodeRole": "1"})
        _code(patient, "ParticipantObjectIDTypeCode", "2", "Patient Number", "RFC-3881")
    if record["event"] == "Query" and record.get("detail", {}).get("keys"):
        query = ET.SubElement(message, "ParticipantObjectIdentification", {
            "ParticipantObjectID": str(record["detail"].get("sop_class", "")), "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "24"})
        _code(query, "ParticipantObjectIDTypeCode", "110181", "SOP Class UID")
        ET.SubElement(query, "ParticipantObjectQuery").text = base64.b64encode(
            canonical(record["detail"]["keys"])).decode()
    return ET.tostring(message, encoding="unicode")


# -- reports (pure) --------------------------------------------------------------------------

def matches(record: dict, *, patient: str = "", study: str = "", ae: str = "", since: str = "") -> bool:
    """Whether a record is about this patient / study / AE (any that are given), at or after `since`."""
    if since and record["time"] < since:
        return False
    keys = record.get("detail", {}).get("keys", {})
    if patient and patient not in (record.get("patient"), keys.get("PatientID")):
        return False
    if study and study != record.get("study") and study not in str(keys.get("StudyInstanceUID", "")).split("\\"):
        return False
    if ae and ae not in (record.get("user"), record.get("dest", "").split("@")[0]):
        return False
    return True


def access_summary(records: list[dict]) -> list[dict]:
    """Who did what: one row per (user, host, event, op) with counts and first/last time."""
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (r.get("user", ""), r.get("host", ""), r["event"], r["op"])
        row = rows.setdefault(key, {"user": key[0], "host": key[1], "event": key[2], "op": key[3], "records": 0,
                                    "instances": 0, "failures": 0, "first": r["time"], "last": r["time"]})
        row["records"] += 1
        row["instances"] += r.get("instances") or 0
        row["failures"] += bool(r.get("outcome"))
        row["last"] = r["time"]
    return sorted(rows.values(), key=lambda row: (row["user"], row["event"], row["op"]))


def describe(record: dict) -> str:
    """One line for people."""
    parts = [record["op"]]
    if record.get("instances") is not None:
        parts.append(f"{record['instances']} instances")
    if record.get("dest"):
        parts.append(f"to {record['dest']}")
    detail = record.get("detail", {})
    for name in ("reason", "line", "command", "keys", "matches", "changed"):
        if name in detail:
            parts.append(f"{name}: {detail[name] if isinstance(detail[name], (str, int)) else json.dumps(detail[name])}")
    return ", ".join(parts)


# -- the trail on disk -----------------------------------------------------------------------

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
        self._failed: dict[int, Exception] = {}
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
        return event("Security Alert", type="Audit Recording Started", op="audit", user=self.user, host=self.host,
                     reason=reason, audit_key=public_key)

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
                if _parse_time(json.loads(first)["time"]) < since - 60:
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
                entries = [event("Security Alert", op="audit", action="E", outcome=4, user=self.user,
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
                        "Security Alert", op="audit", outcome=8, user=self.user, host=self.host,
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
            last = self._checkpointed  # another process's checkpoints may be newer: one too many is harmless
            if last is None or seq // CHECKPOINT_EVERY > last["seq"] // CHECKPOINT_EVERY \
                    or now - _parse_time(last["time"]) >= CHECKPOINT_INTERVAL_S:
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
        return _FileLock(self.directory / "lock")

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
                entry = event("Security Alert", type="Software Configuration", op="config", action="U",
                              user=self.user, host=self.host, changed=names,
                              noticed="" if by_command else "changed outside appliance commands",
                              command=by_command)
            write_file_atomic(digest_file, canonical(now), mode=0o640)
        if before is not None:
            self.record(entry, force=True)


class _FileLock:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o660)
        except FileNotFoundError:  # a trail not started yet: its directories are made on first use
            (self.path.parent / "trail").mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o660)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


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


def _parse_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
