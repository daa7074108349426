"""C-GET and C-MOVE: send stored instances byte-exact, in bounded memory.

pynetdicom's own retrieve service wants a pydicom Dataset per sub-operation and
re-encodes it in memory; an archive must send the bytes it stored, and a 2 GB
multi-frame instance must not become 2 GB of process memory. So the retrieve
service lives here: every sub-operation decrypts and verifies the instance into
an anonymous in-memory file (memfd: decrypted bytes never touch a persistent
disk) and hands its path to pynetdicom's chunked C-STORE sender, which reads it
a PDU at a time; the next instance (up to 64 MB) is decrypted while the current
one is sent. An instance is sent in the transfer syntax it was stored in
(no transcoding); C-MOVE proposes exactly those, C-GET needs the requestor to
have offered them.

A study that lives only on cold tiers is recalled first (one recall per study,
shared by concurrent requests); while it comes back the requestor gets a Pending
response every few seconds, and a study that cannot be recalled (cartridge not
loaded in time, tier down) fails its sub-operations with the reason in the final
response's Error Comment. Responses follow PS3.4 C.4.2/C.4.3: a Pending response after every
sub-operation with the remaining/completed/failed/warning counts; the final
response is Success, Warning (0xB000) or Failure (0xA702) with the Failed SOP
Instance UID List; a C-CANCEL stops before the next sub-operation (0xFE00).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from io import BytesIO
from typing import Callable

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pynetdicom import build_context
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import decode, encode

from appliance import audit
from appliance.audit import AuditError
from appliance.dicom import query as q
from appliance.dicom.handlers import refuse, requestor
from appliance.errors import ApplianceError
from appliance.store.archive import Archive

LOG = logging.getLogger("appliance.dicom")
_PENDING, _CANCEL, _WARNING, _SUBOP_FAILURE = 0xFF00, 0xFE00, 0xB000, 0xA702
_MAX_CONTEXTS = 128
_PENDING_INTERVAL_S = 2.0


@dataclass
class SubOperations:
    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)

    def record(self, sop_uid: str, status: int | None) -> None:
        self.remaining -= 1
        if status == 0x0000:
            self.completed += 1
        elif status is not None and (status & 0xF000) == 0xB000:
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(sop_uid)

    def fill(self, rsp) -> None:
        rsp.NumberOfRemainingSuboperations = self.remaining
        rsp.NumberOfCompletedSuboperations = self.completed
        rsp.NumberOfFailedSuboperations = self.failed
        rsp.NumberOfWarningSuboperations = self.warning


def instances_for(archive: Archive, ident: q.Query) -> list[tuple[str, dict]]:
    """Every current instance under what the identifier names, at any level."""
    image_level = q.Query("IMAGE", ident.keys, [])
    with archive.index.read() as t:
        return [(view["SOPInstanceUID"], t.get("instances", view["SOPInstanceUID"]))
                for view in q.find(t, image_level)]


def plaintext_file(archive: Archive, record: dict, sop_uid: str) -> int:
    """An anonymous in-memory file (memfd) holding the verified original bytes as a Part 10
    file; the caller closes it."""
    fd = os.memfd_create("pacs-vault-retrieve", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            chunks = archive.open_blob(record["current"])
            first = next(chunks, b"")
            if first[128:132] != b"DICM":
                # Stored without file meta (imported raw dataset): add one, the dataset bytes stay as stored.
                meta = FileMetaDataset()
                meta.MediaStorageSOPClassUID = record["SOPClassUID"]
                meta.MediaStorageSOPInstanceUID = sop_uid
                meta.TransferSyntaxUID = record["transfer_syntax"]
                out.write(b"\x00" * 128 + b"DICM")
                write_file_meta_info(out, meta, enforce_standard=True)
            out.write(first)
            for chunk in chunks:
                out.write(chunk)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Plaintexts:
    """The plaintext of each instance to send, the next one decrypted in a worker thread while
    the current one is on the wire (the requestor's answer is awaited meanwhile). Memory stays
    bounded: only an instance of at most PREFETCH_MAX_BYTES is prepared ahead."""

    PREFETCH_MAX_BYTES = 64 << 20

    def __init__(self, archive: Archive, instances: list[tuple[str, dict]], skip: Callable[[dict], bool]):
        self._archive, self._instances, self._skip = archive, instances, skip
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieve-prefetch")
        self._ahead: dict[int, Future] = {}

    def __enter__(self) -> "_Plaintexts":
        return self

    def __exit__(self, *exc) -> None:
        for future in self._ahead.values():
            if not future.cancel() and future.exception() is None:
                os.close(future.result())
        self._worker.shutdown(wait=True)

    def _prefetch(self, number: int) -> None:
        if number >= len(self._instances):
            return
        sop_uid, record = self._instances[number]
        try:
            if self._skip(record):
                return
            with self._archive.index.read() as t:
                blob = t.get("blobs", record["current"])
            if blob is None or blob.get("size", self.PREFETCH_MAX_BYTES + 1) > self.PREFETCH_MAX_BYTES:
                return
            self._ahead[number] = self._worker.submit(plaintext_file, self._archive, record, sop_uid)
        except Exception as exc:  # noqa: BLE001 - prefetching is an optimisation: that instance is read when due
            LOG.warning("retrieve prefetch skipped: %s", exc)

    def take(self, number: int) -> int:
        """The memfd of instance `number` (the caller closes it); raises what preparing raised."""
        future = self._ahead.pop(number, None)
        try:
            if future is not None:
                return future.result()
            sop_uid, record = self._instances[number]
            return plaintext_file(self._archive, record, sop_uid)
        finally:
            self._prefetch(number + 1)


def _send_one(assoc, plaintexts: _Plaintexts, number: int, msg_id: int,
              originator: tuple[str, int] | None = None) -> int | None:
    try:
        fd = plaintexts.take(number)
        try:
            kwargs = {}
            if originator:
                kwargs = {"originator_aet": originator[0], "originator_id": originator[1]}
            status = assoc.send_c_store(f"/proc/self/fd/{fd}", msg_id=msg_id, **kwargs)
        finally:
            os.close(fd)
    except (ApplianceError, ValueError, AttributeError) as exc:
        LOG.warning("retrieve sub-operation failed: %s", exc)
        return None
    return getattr(status, "Status", None)


def _identifier(req, context) -> Dataset:
    ts = context.transfer_syntax[0]
    return decode(req.Identifier, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)


def _encode(ds: Dataset, context) -> BytesIO:
    ts = context.transfer_syntax[0]
    return BytesIO(encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated))


def _failed_list(subops: SubOperations, context) -> BytesIO:
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = subops.failed_uids
    return _encode(ds, context)


class RetrieveService:
    """Serves C-GET and C-MOVE for one archive; called by the association for those requests."""

    def __init__(self, archive: Archive, model_of: Callable[[str], str], authorise: Callable,
                 move_destination: Callable[[str], tuple[str, int] | None], open_association: Callable,
                 stats_of: Callable):
        self._archive = archive
        self._stats_of = stats_of  # assoc -> handlers.AssociationStats
        self._model_of = model_of
        self._authorise = authorise  # (assoc, role) -> bool
        self._destination = move_destination  # AE title -> (host, port) or None
        self._open_association = open_association  # (host, port, ae_title, contexts) -> Association

    def serve(self, assoc, req, context) -> int:
        """Serve one C-GET or C-MOVE; return its final status."""
        rsp = C_GET() if isinstance(req, C_GET) else C_MOVE()
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        cx_id = context.context_id

        def finish(status: int, subops: SubOperations | None = None, comment: str = "") -> int:
            rsp.Status = status
            if subops is not None:
                subops.fill(rsp)
                if status != 0x0000:
                    rsp.Identifier = _failed_list(subops, context)
                if status != _CANCEL:
                    rsp.NumberOfRemainingSuboperations = None
            if comment:
                rsp.ErrorComment = comment[:64]
            assoc.dimse.send_msg(rsp, cx_id)
            return status

        op = "c-get" if isinstance(req, C_GET) else "c-move"
        if not self._authorise(assoc, "retrieve"):
            try:
                refuse(self._archive, assoc, op, "retrieve")
            except AuditError as exc:
                LOG.error("retrieve refusal not recorded: %s", exc)
            return finish(0x0124, comment="calling AE may not retrieve")
        try:
            ident = q.parse(_identifier(req, context), self._model_of(context.abstract_syntax))
        except q.QueryError as exc:
            return finish(exc.status, comment=str(exc))
        except Exception as exc:  # noqa: BLE001 - an undecodable identifier
            return finish(0xC000, comment=f"identifier cannot be decoded: {exc}")
        instances = instances_for(self._archive, ident)
        subops = SubOperations(len(instances))
        if not instances:
            return finish(0x0000, subops)
        if len(instances) > 65535:
            return finish(0xC000, comment="more than 65535 instances match")

        studies = sorted({record["study"] for _, record in instances})
        for study_uid in studies:
            self._archive.touch_study(study_uid)
        unavailable = self._recall(assoc, req, rsp, cx_id, studies, subops)
        if unavailable is None:  # cancelled while waiting
            subops.failed_uids.extend(uid for uid, _ in instances)
            return finish(_CANCEL, subops)

        target = assoc
        originator = None
        who = requestor(assoc)
        dest = f"{who['user']}@{who['host']}"
        if isinstance(req, C_MOVE):
            dest = str(req.MoveDestination).strip()
            destination = self._destination(dest)
            if destination is None:
                try:
                    self._archive.audit.record(audit.event(
                        "Security Alert", type="Use of Restricted Function", op=op, outcome=4, dest=dest,
                        reason="move destination unknown or without the move-destination role", **who))
                except AuditError as exc:
                    LOG.error("retrieve refusal not recorded: %s", exc)
                return finish(0xA801, comment="move destination unknown or not allowed")
            dest = f"{dest}@{destination[0]}:{destination[1]}"
            pairs = sorted({(rec["SOPClassUID"], rec["transfer_syntax"]) for _, rec in instances})
            if len(pairs) > _MAX_CONTEXTS:
                return finish(0xA701, comment="too many SOP class / transfer syntax pairs for one association")
            target = self._open_association(destination[0], destination[1], str(req.MoveDestination).strip(),
                                            [build_context(sop, [ts]) for sop, ts in pairs])
            if target is None or not target.is_established:
                return finish(0xA801, comment="move destination refused the association")
            originator = (assoc.requestor.ae_title, req.MessageID)
        per_study = {uid: [0, 0] for uid in studies}  # instances sent, failed
        try:
            for study_uid in studies:
                self._archive.audit.record(audit.event(
                    "Begin Transferring DICOM Instances", op=op, action="E", dest=dest, study=study_uid,
                    patient=self._archive.patient_id_of(study_uid),
                    instances=sum(1 for _, rec in instances if rec["study"] == study_uid), **who))
        except AuditError as exc:  # nothing leaves unaudited
            LOG.error("retrieve refused: %s", exc)
            if target is not assoc:
                target.release()
            return finish(0xA701, comment="audit trail cannot be written")
        try:
            with _Plaintexts(self._archive, instances, lambda record: record["study"] in unavailable) as plaintexts:
                for number, (sop_uid, record) in enumerate(instances):
                    if req.MessageID in assoc.dimse.cancel_req:
                        del assoc.dimse.cancel_req[req.MessageID]
                        subops.failed_uids.extend(uid for uid, _ in instances[number:])
                        return finish(_CANCEL, subops)
                    msg_id = (req.MessageID + number + 1) % 65536 or 1
                    status = None
                    if record["study"] not in unavailable:
                        status = _send_one(target, plaintexts, number, msg_id, originator)
                    subops.record(sop_uid, status)
                    delivered = status is not None and (status == 0x0000 or (status & 0xF000) == 0xB000)
                    per_study[record["study"]][0 if delivered else 1] += 1
                    rsp.Status = _PENDING
                    subops.fill(rsp)
                    rsp.Identifier = None
                    assoc.dimse.send_msg(rsp, cx_id)
        finally:
            if target is not assoc:
                target.release()
            for study_uid, (sent, failed) in per_study.items():
                try:
                    self._archive.audit.record(audit.event(
                        "DICOM Instances Transferred", op=op, action="R", outcome=4 if failed else 0, dest=dest,
                        study=study_uid, patient=self._archive.patient_id_of(study_uid), instances=sent,
                        failed=failed, reason=unavailable.get(study_uid, ""), **who))
                except AuditError as exc:  # sent already: the Begin record stands; say so loudly
                    LOG.error("retrieve of a study sent but its end not recorded: %s", exc)
        self._stats_of(assoc).count("C-GET" if isinstance(req, C_GET) else "C-MOVE", retrieved=subops.completed)
        comment = next(iter(unavailable.values()), "")
        if subops.failed == len(instances):
            return finish(_SUBOP_FAILURE, subops, comment)
        return finish(_WARNING if subops.failed or subops.warning else 0x0000, subops, comment)

    def _recall(self, assoc, req, rsp, cx_id, studies: list[str], subops: SubOperations) -> dict[str, str] | None:
        """Recall the studies that are on cold tiers only, sending Pending responses meanwhile.

        Returns {study: why it could not be recalled}, or None when the requestor cancelled."""
        waiting = {uid: self._archive.recall_in_background(uid) for uid in studies
                   if self._archive.needs_recall(uid)}
        unavailable = {}
        for study_uid, future in waiting.items():
            while True:
                try:
                    future.result(timeout=_PENDING_INTERVAL_S)
                    break
                except FutureTimeout:
                    if req.MessageID in assoc.dimse.cancel_req:
                        del assoc.dimse.cancel_req[req.MessageID]
                        return None
                    rsp.Status = _PENDING
                    subops.fill(rsp)
                    rsp.Identifier = None
                    assoc.dimse.send_msg(rsp, cx_id)
                except ApplianceError as exc:
                    LOG.warning("recall for a retrieve failed: %s", exc)
                    unavailable[study_uid] = str(exc)
                    break
        return unavailable
