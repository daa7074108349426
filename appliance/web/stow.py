"""STOW-RS (PS3.18 10.5): POST /studies and /studies/{study}, multipart/related application/dicom.

The body is read as it arrives and parsed by multipart.py; each part's bytes go straight
into the archive's ingest (`Archive.begin_store`: inspected and sealed on the way, the
path a C-STORE takes), so neither the body nor a part is ever whole in memory and no
plaintext reaches a disk. A part is committed (`Ingest.finish`: sealed instance, index
entry and audit record durable, deduplicated, versioned) only once the whole body has
arrived well-formed: a truncated body, a wrong boundary or a client that goes away
stores nothing. The parts of one request are committed side by side, so they share the
journal's syncs. (A body past COMMIT_AHEAD_BYTES of instances commits what it holds so far
before it reads on: the memory of parts waiting for their commit stays bounded; should
such a body fail later, what was committed stays, as a retry would store it again.)

The response (application/dicom+json) lists ReferencedSOPSequence and FailedSOPSequence
with a FailureReason per part: 0xC000 not a DICOM instance (not application/dicom, not
parsable, truncated), 0xC409 an instance of another study than the URL's, 0xA700 out of
space (or the audit trail cannot be written), 0x0110 any other failure. HTTP status: 200
all stored, 202 some failed, 409 none stored, 507 none stored for lack of space; 400 a
body that is not multipart as its Content-Type says, 413 a body over
dicomweb.max_request_mb, 415 a request that is not multipart/related application/dicom.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from pydicom.dataset import Dataset
from starlette.requests import Request
from starlette.responses import Response

from appliance.audit.events import AuditError, EventID, event
from appliance.errors import ApplianceError, InvalidInstance, OutOfSpace
from appliance.format import p10
from appliance.store.archive import Archive
from appliance.store.ingest import Ingest
from appliance.web import media
from appliance.web.app import BASE, SOURCE, Caller, HttpError, WebFront
from appliance.web.multipart import MultipartError, MultipartReader, Part, PartEnd

LOG = logging.getLogger("appliance.web")

NOT_DICOM, OTHER_STUDY, OUT_OF_RESOURCES, PROCESSING_FAILURE = 0xC000, 0xC409, 0xA700, 0x0110
COMMIT_AHEAD_BYTES = 64 << 20  # instance bytes sealed and waiting for their commit, at most
MAX_WAITING = 16  # parts sealed and waiting for their commit (a thread each), at most
BATCH_BYTES = 1 << 20  # body bytes parsed before the writer thread writes them into the ingest


@dataclass
class _Received:
    """One part: its ingest while it is written, then what became of it."""

    ingest: Ingest | None
    failure: int | None = None
    reason: str = ""
    info: p10.InstanceInfo | None = None
    duplicate: bool = False


class _Abandoned(Exception):
    """The body did not arrive whole: the parts waiting for it are not stored."""


class _Gate:
    """Where parts sealed whole wait for the verdict on the body (each in `Ingest.finish`, in
    the audit-entry callback: sealed, not yet committed; raising there stores nothing)."""

    def __init__(self):
        self._event = threading.Event()
        self._commit = False

    def open(self, commit: bool) -> None:
        self._commit = commit
        self._event.set()

    def wait(self) -> None:
        self._event.wait()
        if not self._commit:
            raise _Abandoned()


class Transaction:
    """The parts of one STOW-RS request.

    Their bytes are written and sealed by one thread of the request's own (`writer`), with
    that thread's zstd compressor (a compressor holds a few MB: one per request, not one per
    part waiting). A sealed part is committed by a thread of `_finishers`, which waits at the
    gate; the gate opens (commit) once the body has ended well-formed, or once MAX_WAITING
    parts or COMMIT_AHEAD_BYTES wait, and closes (abandon) when it does not. A settled part
    keeps only what the response needs."""

    def __init__(self, archive: Archive, caller: Caller, study_uid: str | None):
        self.archive, self.caller, self.study_uid = archive, caller, study_uid
        self.parts: list[_Received] = []
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stow-write")
        self._finishers = ThreadPoolExecutor(max_workers=MAX_WAITING, thread_name_prefix="stow-commit")
        self._gate = _Gate()
        self._waiting: list[tuple[_Received, Future]] = []
        self._waiting_bytes = 0
        self._open: _Received | None = None  # the part being written
        self._written = 0  # its bytes so far

    def apply(self, events: list) -> None:
        for event in events:
            if isinstance(event, Part):
                self._begin(event.headers)
            elif isinstance(event, PartEnd):
                self._end()
            else:
                self._write(event)

    def _begin(self, headers: dict[str, str]) -> None:
        kind = media.parse(headers.get("content-type", media.DICOM)).kind
        self._written = 0
        if kind != media.DICOM:
            self.parts.append(_Received(None, NOT_DICOM, f"a part of type {kind} is not application/dicom"))
            return
        self._open = _Received(self.archive.begin_store(SOURCE))
        self.parts.append(self._open)

    def _write(self, data: bytes) -> None:
        part = self.parts[-1]
        ingest = part.ingest
        if part.failure is not None or ingest is None:
            return
        try:
            ingest.write(data)
        except ApplianceError as exc:
            self._fail(part, _failure_reason(exc), str(exc))
            return
        self._written += len(data)
        if self.study_uid and ingest.inspector.ready and ingest.inspector.study_uid not in ("", self.study_uid):
            self._fail(part, OTHER_STUDY, "the instance belongs to another study than the URL's")

    def _end(self) -> None:
        part, self._open = self.parts[-1], None
        ingest = part.ingest
        if part.failure is not None or ingest is None:
            return
        if self.study_uid and ingest.inspector.study_uid != self.study_uid:
            self._fail(part, OTHER_STUDY, "the instance belongs to another study than the URL's")
            return
        try:
            ingest.seal()  # here: this thread's compressor sealed the part (one per request, not per part)
        except ApplianceError as exc:
            self._refused(part, exc)
            return
        self._waiting.append((part, self._finishers.submit(ingest.finish, self._entry_at(self._gate))))
        self._waiting_bytes += self._written
        if len(self._waiting) >= MAX_WAITING or self._waiting_bytes > COMMIT_AHEAD_BYTES:
            self._settle(commit=True)

    def _fail(self, part: _Received, reason: int, text: str) -> None:
        self._open = None
        if part.ingest is not None:
            part.ingest.abort()
        part.ingest = None
        part.failure, part.reason = reason, text

    def _refused(self, part: _Received, exc: ApplianceError) -> None:
        if isinstance(exc, InvalidInstance):
            part.failure, part.reason = NOT_DICOM, str(exc)
            self.archive.commit_audit(event(EventID.INSTANCES_TRANSFERRED, op="stow-rs", action="C",
                                            outcome=4, reason=str(exc), **self.caller.who()))
        else:
            part.failure, part.reason = _failure_reason(exc), str(exc)
            LOG.error(json.dumps({"event": "stow.failed", "error": str(exc)}))
        part.ingest = None

    def _entry_at(self, gate: _Gate):
        def entry(info: p10.InstanceInfo, status: str) -> dict:
            record = self._audit_entry(info, status)
            gate.wait()
            return record
        return entry

    def commit(self) -> None:
        """The body arrived whole: every part waiting is committed (their records share syncs)."""
        self._settle(commit=True)
        self._close()

    def abandon(self) -> None:
        """The body did not arrive whole: nothing of what waits is stored."""
        if self._open is not None:
            self._fail(self._open, PROCESSING_FAILURE, "abandoned: the body did not arrive whole")
        self._settle(commit=False)
        self._close()

    def _close(self) -> None:
        self._finishers.shutdown(wait=True)

    def _settle(self, commit: bool) -> None:
        self._gate.open(commit)
        for part, future in self._waiting:
            try:
                outcome = future.result()
            except _Abandoned:
                part.failure, part.reason = PROCESSING_FAILURE, "abandoned: the body did not arrive whole"
            except ApplianceError as exc:
                self._refused(part, exc)
            else:
                part.info, part.duplicate = outcome.info, outcome.status == "duplicate"
            part.ingest = None  # settled: its sealed bytes go (a body of many parts stays small)
        self._gate, self._waiting, self._waiting_bytes = _Gate(), [], 0

    def _audit_entry(self, info: p10.InstanceInfo, status: str) -> dict:
        return event(EventID.INSTANCES_TRANSFERRED, op="stow-rs", action="C",
                     patient=info.patient.get("PatientID", ""), study=info.study_uid, instances=1,
                     sop=info.sop_uid, duplicate=status == "duplicate", **self.caller.who())

    def response(self, base_url: str) -> tuple[int, Dataset]:
        """(HTTP status, the Store Instances Response data set)."""
        ds = Dataset()
        stored = [part.info for part in self.parts if part.info is not None]
        failed = [part for part in self.parts if part.info is None]
        studies = {info.study_uid for info in stored} | ({self.study_uid} if self.study_uid else set())
        if len(studies) == 1:
            ds.RetrieveURL = f"{base_url}/studies/{next(iter(studies))}"
        if stored:
            ds.ReferencedSOPSequence = [_referenced(info, base_url) for info in stored]
        if failed:
            ds.FailedSOPSequence = [_failed(part) for part in failed]
        if not failed:
            return 200, ds
        if stored:
            return 202, ds
        return (507 if all(part.failure == OUT_OF_RESOURCES for part in failed) else 409), ds


def _failure_reason(exc: ApplianceError) -> int:
    if isinstance(exc, (OutOfSpace, AuditError)):
        return OUT_OF_RESOURCES
    if isinstance(exc, InvalidInstance):
        return NOT_DICOM
    return PROCESSING_FAILURE


def _referenced(info: p10.InstanceInfo, base_url: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = info.instance.get("SOPClassUID", "")
    item.ReferencedSOPInstanceUID = info.sop_uid
    item.RetrieveURL = (f"{base_url}/studies/{info.study_uid}/series/{info.series_uid}"
                        f"/instances/{info.sop_uid}")
    return item


def _failed(part: _Received) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ""
    item.ReferencedSOPInstanceUID = ""
    item.FailureReason = part.failure
    return item


async def store(front: WebFront, request: Request, caller: Caller) -> Response:
    boundary = _boundary(request.headers.get("content-type", ""))
    limit = front.settings.max_request_mb << 20
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"the body is larger than {front.settings.max_request_mb} MB")
    study_uid = request.path_params.get("study")
    try:
        reader = MultipartReader(boundary)
    except MultipartError as exc:
        raise HttpError(400, str(exc)) from None
    transaction = Transaction(front.archive, caller, study_uid)
    try:
        try:
            await _receive(request, reader, transaction, limit)
            reader.close()
        except MultipartError as exc:
            await _on_writer(transaction, transaction.abandon)
            raise HttpError(400, f"not a multipart body: {exc}") from None
        except BaseException:
            await _on_writer(transaction, transaction.abandon)
            raise
        await _on_writer(transaction, transaction.commit)
    finally:
        transaction.writer.shutdown(wait=False)
    status, ds = transaction.response(media.base_url(request, BASE))
    for part in transaction.parts:
        if part.info is not None:
            front.metrics.add("duplicate_instances_total" if part.duplicate else "stored_instances_total")
            front.metrics.add("received_bytes_total", 0 if part.duplicate else part.info.length)
    return media.dicom_json(ds.to_json_dict(), status)


async def _receive(request: Request, reader: MultipartReader, transaction: Transaction, limit: int) -> None:
    """Parse the body as it comes; its parts' bytes are written by a worker thread, a batch at a time."""
    received, batch, batch_bytes = 0, [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise HttpError(413, "the body is larger than dicomweb.max_request_mb")
        events = reader.feed(chunk)
        batch += events
        batch_bytes += len(chunk)
        if batch_bytes >= BATCH_BYTES:
            await _on_writer(transaction, transaction.apply, batch)
            batch, batch_bytes = [], 0
    if batch:
        await _on_writer(transaction, transaction.apply, batch)


def _on_writer(transaction: Transaction, fn, *args):
    """`fn(*args)` on the transaction's writer thread."""
    return asyncio.wrap_future(transaction.writer.submit(fn, *args))


def _boundary(content_type: str) -> str:
    kind = media.parse(content_type)
    if kind.kind != "multipart/related":
        raise HttpError(415, "STOW-RS takes multipart/related; type=\"application/dicom\"")
    if kind.params.get("type", media.DICOM).lower() != media.DICOM:
        raise HttpError(415, f"parts of type {kind.params['type']} are not supported: application/dicom only")
    boundary = kind.params.get("boundary", "")
    if not boundary:
        raise HttpError(400, "the Content-Type has no boundary")
    return boundary
