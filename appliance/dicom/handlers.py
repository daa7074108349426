"""What the DICOM services do with the archive: thin, each returns DICOM statuses.

The association (association.py) reads and writes the wire and calls these; they know
nothing of sockets. A C-STORE's data set streams into the archive as its PDVs arrive
(StoreSink): sealed on the way, committed with its audit record before Success is sent.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO
from typing import Callable, Iterator

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from appliance.audit.events import AuditError, EventID, EventType, event
from appliance.dicom.negotiation import EXPLICIT_BE, IMPLICIT_LE
from appliance.errors import ApplianceError, InvalidInstance, OutOfSpace
from appliance.format import p10
from appliance.observe.metrics import ServerMetrics
from appliance.store import query as q
from appliance.store.archive import Archive

LOG = logging.getLogger("appliance.dicom")

STATUS_NOT_AUTHORISED = 0x0124
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_UNRECOGNISED_OPERATION = 0x0211


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of an association."""

    ae_title: str
    address: str

    def who(self) -> dict:
        """Who an audit record is about: the calling AE and its address."""
        return {"user": self.ae_title, "host": self.address}


@dataclass
class AssociationStats:
    """Per-association summary for the log line written when it ends."""

    calling_ae: str
    address: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    bytes: int = 0
    queries: int = 0
    retrieved: int = 0
    transcoded: int = 0
    services: set = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    totals: ServerMetrics | None = None  # the server's counters, kept live

    _TOTALS = {"stored": "stored_instances_total", "duplicates": "duplicate_instances_total",
               "bytes": "received_bytes_total", "retrieved": "sent_instances_total"}

    def count(self, service: str, **increments: int) -> None:
        with self.lock:
            self.services.add(service)
            for name, value in increments.items():
                setattr(self, name, getattr(self, name) + value)
        if self.totals is not None:
            for name, value in increments.items():
                if name in self._TOTALS:
                    self.totals.add(self._TOTALS[name], value)


def outcome(status: int) -> str:
    """A DIMSE status as a metrics label."""
    if status == 0x0000:
        return "success"
    if (status & 0xF000) == 0xB000:
        return "warning"
    return "refused" if status == STATUS_NOT_AUTHORISED else "failure"


def refuse(archive: Archive, peer: Peer, op: str, role: str) -> None:
    """Audit a request the calling AE has no role for."""
    archive.audit.record(event(EventID.SECURITY_ALERT, type=EventType.USE_OF_RESTRICTED_FUNCTION, op=op, outcome=4,
                               reason=f"calling AE has no {role} role", **peer.who()))


# -- data sets in a presentation context's transfer syntax ---------------------------------

def decode_dataset(data: bytes, transfer_syntax: str) -> Dataset:
    """A small data set (an identifier, an action's information) as pydicom reads it."""
    ds = read_dataset(BytesIO(data), transfer_syntax == IMPLICIT_LE, transfer_syntax != EXPLICIT_BE)
    ds.set_original_encoding(transfer_syntax == IMPLICIT_LE, transfer_syntax != EXPLICIT_BE)
    return ds


def encode_dataset(ds: Dataset, transfer_syntax: str) -> bytes:
    out = DicomBytesIO()
    out.is_implicit_VR = transfer_syntax == IMPLICIT_LE
    out.is_little_endian = transfer_syntax != EXPLICIT_BE
    write_dataset(out, ds)
    return out.getvalue()


# -- C-STORE ---------------------------------------------------------------------------------

class StoreSink:
    """A C-STORE data set arriving PDV by PDV: the file meta the archive stores with it
    (SOP class and instance from the command, transfer syntax from the context), then
    every fragment, straight into the archive's ingest. `result()`: the status to send."""

    def __init__(self, archive: Archive, peer: Peer, stats: AssociationStats, command: dict, transfer_syntax: str,
                 allowed: bool):
        self._archive, self._peer, self._stats = archive, peer, stats
        self._error: ApplianceError | None = None
        self._ingest = None
        self.allowed = allowed
        if allowed:
            self._ingest = archive.begin_store(source=peer.ae_title)
            self._write(p10.file_meta(str(command.get("AffectedSOPClassUID", "")),
                                      str(command.get("AffectedSOPInstanceUID", "")), transfer_syntax))

    def _write(self, data) -> None:
        try:
            self._ingest.write(data)
        except ApplianceError as exc:
            self._error = exc
            self._ingest.abort()

    def write(self, data) -> None:
        if self._ingest is not None and self._error is None:
            self._write(data)

    def discard(self) -> None:
        """The association ended inside the data set: nothing of it is kept."""
        if self._ingest is not None:
            self._ingest.abort()

    def result(self) -> tuple[int, str]:
        """Commit (durable with its audit record before this returns) and say how it went."""
        if not self.allowed:
            refuse(self._archive, self._peer, "c-store", "store")
            return STATUS_NOT_AUTHORISED, "calling AE may not store"
        try:
            if self._error is not None:
                raise self._error
            stored = self._ingest.finish(self._audit_entry)
        except InvalidInstance as exc:
            self._stats.count("C-STORE", failed=1)
            self._archive.commit_audit(event(EventID.INSTANCES_TRANSFERRED, op="c-store", action="C",
                                             outcome=4, reason=str(exc), **self._peer.who()))
            return STATUS_CANNOT_UNDERSTAND, str(exc)
        except OutOfSpace as exc:
            self._stats.count("C-STORE", failed=1)
            LOG.error("C-STORE refused: %s", exc)
            return STATUS_OUT_OF_RESOURCES, "out of storage space"
        except AuditError as exc:
            LOG.error("C-STORE not acknowledged: %s", exc)
            return STATUS_OUT_OF_RESOURCES, "audit trail cannot be written"
        except ApplianceError as exc:
            self._stats.count("C-STORE", failed=1)
            LOG.error("C-STORE failed: %s", exc)
            return exc.dicom_status if exc.dicom_status != 0xC000 else STATUS_PROCESSING_FAILURE, str(exc)
        if stored.status == "duplicate":
            self._stats.count("C-STORE", duplicates=1)
        else:
            self._stats.count("C-STORE", stored=1, bytes=stored.info.length)
        return 0x0000, ""

    def _audit_entry(self, info: p10.InstanceInfo, status: str) -> dict:
        # Acknowledged only once its record is durable too: every Success has its audit record.
        return event(EventID.INSTANCES_TRANSFERRED, op="c-store", action="C",
                     patient=info.patient.get("PatientID", ""), study=info.study_uid, instances=1,
                     sop=info.sop_uid, duplicate=status == "duplicate", **self._peer.who())


# -- C-FIND ----------------------------------------------------------------------------------

def find(archive: Archive, peer: Peer, identifier: Dataset, model: str, sop_class: str, ae_title: str,
         stats: AssociationStats, cancelled: Callable[[], bool]) -> Iterator[tuple[int, str, Dataset | None]]:
    """(status, error comment, identifier) of every C-FIND response."""
    try:
        query = q.parse(identifier, model)
    except q.QueryError as exc:
        archive.audit.record(event(EventID.QUERY, op="c-find", outcome=4, reason=str(exc), sop_class=sop_class,
                                   **peer.who()))
        yield exc.status, str(exc), None
        return
    stats.count("C-FIND", queries=1)
    # Collect first: a transaction held while a slow peer reads responses would hold up the
    # index (a map resize waits for every reader).
    with archive.catalog.read() as view:
        views = list(q.find(view.txn, query))
    keys = {keyword: value for keyword, (_, value) in query.keys.items()}
    archive.audit.record(event(EventID.QUERY, op="c-find", patient=keys.get("PatientID", ""), level=query.level,
                               sop_class=sop_class, keys=keys, matches=len(views), **peer.who()))
    for view in views:
        if cancelled():
            yield 0xFE00, "", None
            return
        yield 0xFF00, "", q.response(query, view, ae_title)
    yield 0x0000, "", None


# -- Storage Commitment ----------------------------------------------------------------------

COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known Storage Commitment SOP Instance
_NO_SUCH_INSTANCE, _CLASS_MISMATCH = 0x0112, 0x0119


def commitment_result(archive: Archive, request: Dataset) -> tuple[int, Dataset]:
    """(event type, event information) for a commitment request: 1 all committed, 2 some failed.

    An instance is committed only when it is indexed, of the class the requester
    names, and its hot copy verifies against the index (size and sealed-bytes hash)."""
    report = Dataset()
    report.TransactionUID = request.TransactionUID
    committed, failed = [], []
    for item in request.get("ReferencedSOPSequence", []):
        ref = Dataset()
        ref.ReferencedSOPClassUID = item.get("ReferencedSOPClassUID", "")
        ref.ReferencedSOPInstanceUID = item.get("ReferencedSOPInstanceUID", "")
        try:
            record = archive.instance(str(ref.ReferencedSOPInstanceUID))
            if record.sop_class != str(ref.ReferencedSOPClassUID):
                ref.FailureReason = _CLASS_MISMATCH
            else:
                archive.verify_current_copy(record)
        except ApplianceError as exc:
            LOG.warning("storage commitment refused for an instance: %s", exc)
            ref.FailureReason = _NO_SUCH_INSTANCE
        (failed if "FailureReason" in ref else committed).append(ref)
    if committed:
        report.ReferencedSOPSequence = committed
    if failed:
        report.FailedSOPSequence = failed
    return (2 if failed else 1), report


def commitment_request(action_type: int, information: Dataset) -> int:
    """The N-ACTION-RSP status for a commitment request (0 when it is accepted)."""
    if action_type != 1:
        return 0x0123  # no such action
    if "TransactionUID" not in information:
        return 0x0120  # missing attribute
    return 0x0000
