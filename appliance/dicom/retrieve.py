"""C-GET and C-MOVE: send stored instances byte-exact, in bounded memory.

Every sub-operation is a C-STORE the archive writes itself: the stored bytes are
decrypted and verified in memory (never on a disk), the data set after the file meta
is cut into P-DATA-TF PDUs that fit the peer's maximum PDU length, and those go out
many per system call (a 16 KB-PDU getscu takes 6,400 PDUs per 100 MB). An instance up
to PREFETCH_MAX_BYTES is verified whole before its first byte is sent, and the next one
is decrypted by a worker thread while the current one is on the wire; a larger one is
streamed, its last chunk held back until its SHA-256 checks (should it fail, the
association is aborted: the peer never has the whole of a wrong instance).

Transfer syntax: the stored one when the peer accepted it (byte-exact), else the first
of the peer's accepted ones the instance can be transcoded to (format/transcode.py: decoded or
re-encoded to explicit or implicit VR little endian, never re-encoded lossy; the stored
bytes never change). A transcoded instance is made whole in memory (an anonymous memfd
for a large one, never a disk) before its first byte goes, so a frame that does not
decode fails that sub-operation, with the reason in the final response, and nothing
else; meanwhile the requestor gets a Pending response every few seconds (decoding a
large instance outlasts a DIMSE timeout: pynetdicom's is 30 s). C-MOVE proposes, per SOP class, each stored syntax in a context of its own and
one context of the uncompressed syntaxes to fall back on; C-GET takes the requestor's
contexts, negotiated in its order of preference.

A study that lives only on cold tiers is recalled first (one recall per study,
shared by concurrent requests); while it comes back the requestor gets a Pending
response every few seconds, and a study that cannot be recalled (cartridge not
loaded in time, tier down) fails its sub-operations with the reason in the final
response's Error Comment. Responses follow PS3.4 C.4.2/C.4.3: a Pending response after
every sub-operation with the remaining/completed/failed/warning counts; the final
response is Success, Warning (0xB000) or Failure (0xA702) with the Failed SOP Instance
UID List; a C-CANCEL stops before the next sub-operation (0xFE00).
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable, Iterator

from pydicom.dataset import Dataset

from appliance.audit.events import AuditError, EventID, EventType, event
from appliance.dicom import dimse, handlers, pdu
from appliance.dicom.handlers import Peer
from appliance.dicom.link import Link, Message
from appliance.dicom.negotiation import Accepted, Proposed
from appliance.dicom.requestor import AssociationRefused, RequestedAssociation
from appliance.dicom.wire import ConnectionClosed
from appliance.errors import ApplianceError, IntegrityError, TranscodeError
from appliance.format import p10, transcode
from appliance.observe.metrics import ServerMetrics
from appliance.store import query as q
from appliance.store.archive import Archive
from appliance.store.catalog import Instance

LOG = logging.getLogger("appliance.dicom")
_PENDING, _CANCEL, _WARNING, _SUBOP_FAILURE = 0xFF00, 0xFE00, 0xB000, 0xA702
_MAX_CONTEXTS = 128
PENDING_INTERVAL_S = 2.0
PREFETCH_MAX_BYTES = 32 << 20
PREFETCH_AHEAD = 2
_MEMFD_READ = 1 << 20


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

    def counts(self, remaining: bool = True) -> dict:
        out = {"NumberOfCompletedSuboperations": self.completed, "NumberOfFailedSuboperations": self.failed,
               "NumberOfWarningSuboperations": self.warning}
        if remaining:
            out["NumberOfRemainingSuboperations"] = self.remaining
        return out


def instances_for(archive: Archive, ident: q.Query) -> list[Instance]:
    """Every current instance under what the identifier names, at any level."""
    image_level = q.Query("IMAGE", ident.keys, [])
    with archive.catalog.read() as view:
        return [view.instance(found["SOPInstanceUID"]) for found in q.find(view.txn, image_level)]


# -- the bytes of each instance, verified, one decrypted ahead ---------------------------------

@dataclass
class Plaintext:
    """One instance's data set (after its file meta): whole when small (verified), else a
    stream whose last chunk is held back until the whole instance verified."""

    chunks: Iterator[bytes]
    whole: bool

    def discard(self) -> None:
        """Free what holds the rest of the data (a memfd, a decrypting stream); after a send,
        whether it went to the end or not."""
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()


def _dataset_chunks(archive: Archive, record: Instance) -> Iterator[bytes]:
    chunks = archive.open_blob(record.current)
    first = next(chunks, b"")
    offset = p10.dataset_offset(first)
    if first[offset:]:
        yield first[offset:]
    yield from chunks


def plaintext(archive: Archive, record: Instance, size: int) -> Plaintext:
    if size <= PREFETCH_MAX_BYTES:
        whole = memoryview(archive.read_blob(record.current))
        return Plaintext(iter([whole[p10.dataset_offset(whole):]]), True)
    return Plaintext(_dataset_chunks(archive, record), False)


def transcoded(archive: Archive, record: Instance, syntax: str, counts: transcode.TranscodeCounts, *,
               abandoned: threading.Event) -> Plaintext:
    """The instance's data set in `syntax`, whole before anything is sent: in an anonymous
    in-memory file (memfd: never a disk, and not the process's resident memory). Stops, raising
    TranscodeError, once `abandoned` is set."""
    fd = os.memfd_create("pacs-vault-transcode", os.MFD_CLOEXEC)
    try:
        size = 0
        for piece in transcode.transcode(archive.open_blob(record.current), record.transfer_syntax, syntax,
                                         counts=counts):
            if abandoned.is_set():
                raise TranscodeError("abandoned: the requestor has gone")
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view):]
            size += len(piece)
    except BaseException:
        os.close(fd)
        raise
    return Plaintext(_MemfdChunks(fd, size), True)


class _MemfdChunks:
    """The chunks of a memfd, read once; the descriptor is closed at the end or by close(),
    even when no chunk was read (a generator's `finally` would not run then)."""

    def __init__(self, fd: int, size: int):
        self._fd: int | None = fd
        self._size, self._offset = size, 0

    def __iter__(self) -> "_MemfdChunks":
        return self

    def __next__(self) -> bytes:
        if self._fd is None or self._offset >= self._size:
            self.close()
            raise StopIteration
        chunk = os.pread(self._fd, _MEMFD_READ, self._offset)
        self._offset += len(chunk)
        return chunk

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _transcoded_meanwhile(archive: Archive, record: Instance, syntax: str, counts: transcode.TranscodeCounts,
                          waiting: Callable[[], None]) -> Plaintext:
    """transcoded(), in a thread of its own, calling `waiting` every PENDING_INTERVAL_S until it is
    done. Should `waiting` raise (the requestor has gone), the transcode stops at its next piece,
    and a decoded copy it finished meanwhile is discarded."""
    abandoned = threading.Event()
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieve-transcode")
    future = worker.submit(transcoded, archive, record, syntax, counts, abandoned=abandoned)
    worker.shutdown(wait=False)
    while True:
        try:
            return future.result(timeout=PENDING_INTERVAL_S)
        except FutureTimeout:
            try:
                waiting()
            except BaseException:
                abandoned.set()
                future.add_done_callback(lambda done: done.exception() is None and done.result().discard())
                raise


class _Plaintexts:
    """The plaintext of each instance to send, the next ones decrypted by worker threads (one
    per core) while the current one is on the wire. Memory stays bounded: only instances of at
    most PREFETCH_MAX_BYTES, PREFETCH_AHEAD of them, are prepared ahead."""

    def __init__(self, archive: Archive, instances: list[Instance], skip: Callable[[Instance], bool]):
        self._archive, self._instances, self._skip = archive, instances, skip
        self._worker = ThreadPoolExecutor(max_workers=PREFETCH_AHEAD, thread_name_prefix="retrieve-prefetch")
        self._ahead: dict[int, Future] = {}
        with archive.catalog.read(fresh=False) as view:  # the instances came from a fresh read
            blobs = {record.current: view.blob(record.current) for record in instances}
        self._sizes = {ca: blob.size if blob else PREFETCH_MAX_BYTES + 1 for ca, blob in blobs.items()}

    def __enter__(self) -> "_Plaintexts":
        return self

    def __exit__(self, *exc) -> None:
        for future in self._ahead.values():
            future.cancel()
        self._worker.shutdown(wait=True)

    def _size(self, record: Instance) -> int:
        return self._sizes.get(record.current, PREFETCH_MAX_BYTES + 1)

    def _prefetch(self, number: int) -> None:
        if number >= len(self._instances) or number in self._ahead:
            return
        record = self._instances[number]
        try:
            if not self._skip(record) and self._size(record) <= PREFETCH_MAX_BYTES:
                self._ahead[number] = self._worker.submit(plaintext, self._archive, record, 0)
        except Exception as exc:  # noqa: BLE001 - prefetching is an optimisation: that instance is read when due
            LOG.warning("retrieve prefetch skipped: %s", exc)

    def take(self, number: int) -> Plaintext:
        """The plaintext of instance `number`; raises what preparing it raised."""
        future = self._ahead.pop(number, None)
        try:
            if future is not None:
                return future.result()
            record = self._instances[number]
            return plaintext(self._archive, record, self._size(record))
        finally:
            for following in range(number + 1, number + 1 + PREFETCH_AHEAD):
                self._prefetch(following)


# -- one sub-operation ----------------------------------------------------------------------

def send_c_store(link: Link, context: Accepted, sop_class: str, sop_uid: str, data: Plaintext,
                 originator: tuple[str, int] | None, on_cancel: Callable[[int], None] | None) -> int:
    """One C-STORE on `link`; returns the peer's status. A stream that fails its final check
    aborts the link (IntegrityError raised)."""
    message_id = link.next_message_id()
    command = {"CommandField": dimse.C_STORE_RQ, "MessageID": message_id, "Priority": 0,
               "AffectedSOPClassUID": sop_class, "AffectedSOPInstanceUID": sop_uid, "CommandDataSetType": 0x0001}
    if originator is not None:
        command["MoveOriginatorApplicationEntityTitle"], command["MoveOriginatorMessageID"] = originator
    fragment_max = (link.peer_max_pdu or (1 << 24)) - pdu.PDV_HEADER_SIZE
    link.conn.send_pdus(pdu.message_pdus(context.context_id, dimse.encode(command), None, link.peer_max_pdu))
    try:
        link.conn.send_pdus(_data_pdus(context.context_id, data.chunks, fragment_max))
    except IntegrityError:
        link.conn.send([pdu.abort(pdu.ABORT_USER)])
        raise
    response = link.response_to(message_id, dimse.C_STORE_RSP, on_cancel)
    return response.command.get("Status", 0xC000)


def _data_pdus(context_id: int, chunks: Iterator[bytes], fragment_max: int) -> Iterator[list]:
    """The data set's PDUs, the last one flagged: each chunk is cut into fragments, the one
    after it is read before the last fragment of the current one goes."""
    current = next(chunks, b"")
    for following in chunks:
        yield from pdu.data_pdus(context_id, current, fragment_max, last=False)
        current = following
    yield from pdu.data_pdus(context_id, current, fragment_max, last=True)


# -- the service ----------------------------------------------------------------------------

def move_contexts(pairs: set[tuple[str, str]]) -> list[Proposed] | None:
    """What a C-MOVE proposes to its destination: each (SOP class, stored syntax) in a context
    of its own, then per SOP class one context of the syntaxes its instances can be transcoded
    to (the peer accepts one of each); None when even the first kind would not fit."""
    ordered = sorted(pairs)
    if len(ordered) > _MAX_CONTEXTS:
        return None
    proposals = [(sop, (ts,)) for sop, ts in ordered]
    for sop in sorted({sop for sop, _ in ordered}):
        fallback = tuple(ts for ts in transcode.UNCOMPRESSED
                         if any(transcode.can_transcode(stored, ts) and stored != ts for s, stored in ordered
                                if s == sop))
        if fallback and len(proposals) < _MAX_CONTEXTS:
            proposals.append((sop, fallback))
    return [Proposed(2 * n + 1, sop, syntaxes) for n, (sop, syntaxes) in enumerate(proposals)]


class _LinkAborted(Exception):
    """A streamed instance failed its check on the way: its association was aborted."""


class RetrieveService:
    """Serves C-GET and C-MOVE for one archive; called by the association for those requests."""

    def __init__(self, archive: Archive, *, ae_title: str, model_of: Callable[[str, int], str | None],
                 authorise: Callable[[Peer, str], bool], move_destination: Callable[[str], tuple[str, int] | None],
                 max_pdu: int, timeout_s: float, metrics: ServerMetrics):
        self._archive = archive
        self._metrics = metrics
        self._ae_title = ae_title
        self._model_of = model_of
        self._authorise = authorise
        self._destination = move_destination  # AE title -> (host, port) or None
        self._max_pdu = max_pdu
        self._timeout = timeout_s

    def serve(self, assoc, message: Message) -> int:
        """Serve one C-GET or C-MOVE (`assoc`: the association.Association); return its final status."""
        is_get = message.field == dimse.C_GET_RQ
        op = "c-get" if is_get else "c-move"
        syntax = message.context.transfer_syntax

        def respond(status: int, subops: SubOperations | None = None, comment: str = "", final: bool = True) -> int:
            elements, dataset = {}, None
            if subops is not None:
                elements = subops.counts(remaining=not final or status == _CANCEL)
                if final and status != 0x0000:
                    failed = Dataset()
                    failed.FailedSOPInstanceUIDList = subops.failed_uids
                    dataset = handlers.encode_dataset(failed, syntax)
            assoc.respond(message, status, comment, dataset, **elements)
            return status

        if not self._authorise(assoc.peer, "retrieve"):
            try:
                handlers.refuse(self._archive, assoc.peer, op, "retrieve")
            except AuditError as exc:
                LOG.error("retrieve refusal not recorded: %s", exc)
            return respond(0x0124, comment="calling AE may not retrieve")
        model = self._model_of(message.context.abstract_syntax, message.field)
        if model is None:
            return respond(handlers.STATUS_SOP_CLASS_NOT_SUPPORTED, comment="not a retrieve model")
        try:
            ident = q.parse(handlers.decode_dataset(message.payload or b"", syntax), model)
        except q.QueryError as exc:
            return respond(exc.status, comment=str(exc))
        except Exception as exc:  # noqa: BLE001 - an undecodable identifier
            return respond(0xC000, comment=f"identifier cannot be decoded: {exc}")
        instances = instances_for(self._archive, ident)
        subops = SubOperations(len(instances))
        if not instances:
            return respond(0x0000, subops)
        if len(instances) > 65535:
            return respond(0xC000, comment="more than 65535 instances match")
        message_id = message.command.get("MessageID", 0)
        studies = sorted({record.study for record in instances})
        for study_uid in studies:
            self._archive.touch_study(study_uid)
        unavailable = self._recall(assoc, message, respond, studies, subops)
        if unavailable is None:  # cancelled while waiting
            subops.failed_uids.extend(record.sop_uid for record in instances)
            return respond(_CANCEL, subops)

        who = assoc.peer.who()
        dest = f"{who['user']}@{who['host']}"
        target: Link = assoc
        originator = None
        if not is_get:
            move_to = str(message.command.get("MoveDestination", "")).strip()
            destination = self._destination(move_to)
            if destination is None:
                try:
                    self._archive.audit.record(event(
                        EventID.SECURITY_ALERT, type=EventType.USE_OF_RESTRICTED_FUNCTION, op=op, outcome=4,
                        dest=move_to, reason="move destination unknown or without the move-destination role", **who))
                except AuditError as exc:
                    LOG.error("retrieve refusal not recorded: %s", exc)
                return respond(0xA801, comment="move destination unknown or not allowed")
            dest = f"{move_to}@{destination[0]}:{destination[1]}"
            proposals = move_contexts({(rec.sop_class, rec.transfer_syntax) for rec in instances})
            if proposals is None:
                return respond(0xA701, comment="too many SOP class / transfer syntax pairs for one association")
            try:
                target = RequestedAssociation.open(
                    destination[0], destination[1], calling_ae=self._ae_title, called_ae=move_to,
                    contexts=proposals, max_pdu=self._max_pdu, timeout=self._timeout)
            except AssociationRefused as exc:
                LOG.warning("C-MOVE destination refused: %s", exc)
                return respond(0xA801, comment="move destination refused the association")
            originator = (assoc.peer.ae_title, message_id)
        per_study = {uid: [0, 0] for uid in studies}  # instances sent, failed
        try:
            for study_uid in studies:
                self._archive.audit.record(event(
                    EventID.BEGIN_TRANSFERRING, op=op, action="E", dest=dest, study=study_uid,
                    patient=self._archive.patient_id_of(study_uid),
                    instances=sum(1 for rec in instances if rec.study == study_uid), **who))
        except AuditError as exc:  # nothing leaves unaudited
            LOG.error("retrieve refused: %s", exc)
            if target is not assoc:
                target.release()
            return respond(0xA701, comment="audit trail cannot be written")
        cancel = {"asked": False}

        def on_cancel(their_id: int) -> None:
            cancel["asked"] = cancel["asked"] or their_id == message_id

        broken = False  # the destination's association was aborted: the rest fail
        failure = ""  # the first reason a sub-operation failed on our side
        counts = {uid: transcode.TranscodeCounts() for uid in studies}

        def prefetch_skips(record: Instance) -> bool:  # unavailable, or to be transcoded (not as stored)
            return record.study in unavailable or self.syntax_for(target, record) != record.transfer_syntax

        try:
            with _Plaintexts(self._archive, instances, prefetch_skips) as plaintexts:
                for number, record in enumerate(instances):
                    sop_uid = record.sop_uid
                    if cancel["asked"] or assoc.cancelled(message_id):
                        subops.failed_uids.extend(r.sop_uid for r in instances[number:])
                        return respond(_CANCEL, subops)
                    status = None
                    if record.study not in unavailable and not broken:
                        try:
                            status, why = self._send_one(target, plaintexts, number, record, sop_uid, originator,
                                                         on_cancel if is_get else None, counts[record.study],
                                                         lambda: respond(_PENDING, subops, final=False))
                            failure = failure or why
                        except _LinkAborted as exc:
                            LOG.error("retrieve aborted: %s", exc)
                            if is_get:  # the requestor's own association: nothing more can be said on it
                                raise ConnectionClosed(str(exc)) from None
                            broken = True
                    subops.record(sop_uid, status)
                    delivered = status is not None and (status == 0x0000 or (status & 0xF000) == 0xB000)
                    per_study[record.study][0 if delivered else 1] += 1
                    respond(_PENDING, subops, final=False)
        finally:
            if target is not assoc and not broken:
                target.release()
            for study_uid, (sent, failed) in per_study.items():
                try:
                    self._archive.audit.record(event(
                        EventID.INSTANCES_TRANSFERRED, op=op, action="R", outcome=4 if failed else 0, dest=dest,
                        study=study_uid, patient=self._archive.patient_id_of(study_uid), instances=sent,
                        failed=failed, reason=unavailable.get(study_uid, ""), transcoded=counts[study_uid].summary(),
                        **who))
                except AuditError as exc:  # sent already: the Begin record stands; say so loudly
                    LOG.error("retrieve of a study sent but its end not recorded: %s", exc)
        assoc.stats.count("C-GET" if is_get else "C-MOVE", retrieved=subops.completed,
                          transcoded=sum(pair["instances"] for c in counts.values() for pair in c.summary()))
        comment = next(iter(unavailable.values()), "") or failure
        if subops.failed == len(instances):
            return respond(_SUBOP_FAILURE, subops, comment)
        return respond(_WARNING if subops.failed or subops.warning else 0x0000, subops, comment)

    def _send_one(self, target: Link, plaintexts: _Plaintexts, number: int, record: Instance, sop_uid: str,
                  originator: tuple[str, int] | None, on_cancel, counts: transcode.TranscodeCounts,
                  waiting: Callable[[], None]) -> tuple[int | None, str]:
        """(the peer's status, or None when the sub-operation failed on our side; why it failed).
        `waiting` is called every few seconds while the instance is transcoded."""
        sop_class, stored = record.sop_class, record.transfer_syntax
        contexts = target.sending_contexts(sop_class)
        syntax = transcode.pick_target(stored, [cx.transfer_syntax for cx in contexts])
        if syntax is None:
            reason = "no accepted transfer syntax for the stored one"
            LOG.warning("retrieve sub-operation failed: %s (%s, %s)", reason, sop_class, stored)
            return None, reason
        context = next(cx for cx in contexts if cx.transfer_syntax == syntax)
        try:
            data = (plaintexts.take(number) if syntax == stored
                    else _transcoded_meanwhile(self._archive, record, syntax, counts, waiting))
        except (ApplianceError, ValueError) as exc:
            LOG.warning("retrieve sub-operation failed: %s", exc)
            return None, str(exc)
        if syntax != stored:
            self._metrics.add("transcoded_instances_total", **{"from": stored, "to": syntax})
        try:
            return send_c_store(target, context, sop_class, sop_uid, data, originator, on_cancel), ""
        except IntegrityError as exc:  # a streamed instance failed its final check: the link is aborted
            raise _LinkAborted(str(exc)) from None
        finally:
            data.discard()

    def syntax_for(self, target: Link, record: Instance) -> str | None:
        return transcode.pick_target(record.transfer_syntax,
                                     [cx.transfer_syntax for cx in target.sending_contexts(record.sop_class)])

    def _recall(self, assoc, message: Message, respond, studies: list[str],
                subops: SubOperations) -> dict[str, str] | None:
        """Recall the studies that are on cold tiers only, sending Pending responses meanwhile.

        Returns {study: why it could not be recalled}, or None when the requestor cancelled."""
        waiting = {uid: self._archive.recall_in_background(uid) for uid in studies
                   if self._archive.needs_recall(uid)}
        unavailable = {}
        message_id = message.command.get("MessageID", 0)
        for study_uid, future in waiting.items():
            while True:
                try:
                    future.result(timeout=PENDING_INTERVAL_S)
                    break
                except FutureTimeout:
                    if assoc.cancelled(message_id):
                        return None
                    respond(_PENDING, subops, final=False)
                except ApplianceError as exc:
                    LOG.warning("recall for a retrieve failed: %s", exc)
                    unavailable[study_uid] = str(exc)
                    break
        return unavailable
