"""Thin DICOM event handlers: each gets the archive and returns DICOM statuses.

C-STORE arrives as a Part 10 file that pynetdicom wrote to the receive
directory on the data volume (chunked receive); the archive stores it and the
Success status goes out only once the sealed blob is durable and the index
commit is synced.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from appliance import audit
from appliance.audit import AuditError
from appliance.dicom import query as q
from appliance.errors import ApplianceError, InvalidInstance, OutOfSpace
from appliance.metrics import ServerMetrics
from appliance.store.archive import Archive

LOG = logging.getLogger("appliance.dicom")

STATUS_NOT_AUTHORISED = 0x0124
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110


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


def outcome(status) -> str:
    """A DIMSE status as a metrics label."""
    code = status if isinstance(status, int) else getattr(status, "Status", 0xC000)
    if code == 0x0000:
        return "success"
    if (code & 0xF000) == 0xB000:
        return "warning"
    return "refused" if code == STATUS_NOT_AUTHORISED else "failure"


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def handle_echo(event) -> int:
    return 0x0000


def requestor(assoc) -> dict:
    """Who an audit record is about: the calling AE and its address."""
    return {"user": str(assoc.requestor.ae_title).strip(), "host": str(assoc.requestor.address)}


def refuse(archive: Archive, assoc, op: str, role: str) -> None:
    """Audit a request the calling AE has no role for."""
    archive.audit.record(audit.event("Security Alert", type="Use of Restricted Function", op=op, outcome=4,
                                     reason=f"calling AE has no {role} role", **requestor(assoc)))


def handle_store(event, archive: Archive, authorise, stats_of) -> Dataset | int:
    stats = stats_of(event.assoc)
    path = event.dataset_path
    try:
        if not authorise(event.assoc, "store"):
            refuse(archive, event.assoc, "c-store", "store")
            return _status(STATUS_NOT_AUTHORISED, "calling AE may not store")
        try:
            outcome = archive.store_file(path, source=str(event.assoc.requestor.ae_title).strip())
        except InvalidInstance as exc:
            stats.count("C-STORE", failed=1)
            archive.audit.record(audit.event("DICOM Instances Transferred", op="c-store", action="C", outcome=4,
                                             reason=str(exc), **requestor(event.assoc)))
            return _status(STATUS_CANNOT_UNDERSTAND, str(exc))
        except OutOfSpace as exc:
            stats.count("C-STORE", failed=1)
            LOG.error("C-STORE refused: %s", exc)
            return _status(STATUS_OUT_OF_RESOURCES, "out of storage space")
        except ApplianceError as exc:
            stats.count("C-STORE", failed=1)
            LOG.error("C-STORE failed: %s", exc)
            return _status(STATUS_PROCESSING_FAILURE, str(exc))
        info = outcome.info
        # Acknowledged only once its record is durable too: every Success has its audit record.
        archive.audit.record(audit.event(
            "DICOM Instances Transferred", op="c-store", action="C", patient=str(info.patient.get("PatientID", "")),
            study=info.study_uid, instances=1, sop=info.sop_uid, duplicate=outcome.status == "duplicate",
            **requestor(event.assoc)))
        if outcome.status == "duplicate":
            stats.count("C-STORE", duplicates=1)
        else:
            stats.count("C-STORE", stored=1, bytes=outcome.info.length)
        return 0x0000
    except AuditError as exc:
        LOG.error("C-STORE not acknowledged: %s", exc)
        return _status(STATUS_OUT_OF_RESOURCES, "audit trail cannot be written")
    finally:
        Path(path).unlink(missing_ok=True)  # the received file; its sealed copy is all we keep


def handle_find(event, archive: Archive, model_of, authorise, stats_of, ae_title: str):
    sop_class = str(event.request.AffectedSOPClassUID)
    if not authorise(event.assoc, "query"):
        refuse(archive, event.assoc, "c-find", "query")
        yield STATUS_NOT_AUTHORISED, None
        return
    try:
        query = q.parse(event.identifier, model_of(sop_class))
    except q.QueryError as exc:
        archive.audit.record(audit.event("Query", op="c-find", outcome=4, reason=str(exc), sop_class=sop_class,
                                         **requestor(event.assoc)))
        yield _status(exc.status, str(exc)), None
        return
    stats_of(event.assoc).count("C-FIND", queries=1)
    # Collect first: a transaction held while a slow peer reads responses would hold up the
    # index (a map resize waits for every reader).
    with archive.index.read() as t:
        views = list(q.find(t, query))
    keys = {keyword: value for keyword, (_, value) in query.keys.items()}
    archive.audit.record(audit.event("Query", op="c-find", patient=keys.get("PatientID", ""), level=query.level, sop_class=sop_class, keys=keys, matches=len(views),
                                     **requestor(event.assoc)))
    for view in views:
        if event.is_cancelled:
            yield 0xFE00, None
            return
        yield 0xFF00, q.response(query, view, ae_title)


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
            if record["SOPClassUID"] != str(ref.ReferencedSOPClassUID):
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


def handle_commitment(event, archive: Archive, authorise, send_report):
    """N-ACTION of Storage Commitment Push Model: accept, then report from another thread."""
    if event.action_type != 1:
        return 0x0123, None  # no such action
    if not authorise(event.assoc, "store"):
        refuse(archive, event.assoc, "storage commitment", "store")
        return STATUS_NOT_AUTHORISED, None
    request = event.action_information
    if "TransactionUID" not in request:
        return 0x0120, None  # missing attribute
    threading.Thread(target=send_report, args=(event.assoc, request), name="commitment-report",
                     daemon=True).start()
    return 0x0000, None
