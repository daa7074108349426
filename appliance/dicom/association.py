"""One accepted association, served on its own thread: DIMSE messages in, responses out.

After the server has accepted the association (server.py), everything on it is ours:
P-DATA-TF PDUs are cut into PDVs (pdu.py), command sets decoded (dimse.py), a C-STORE's
data set streamed into the archive as it arrives, responses written with one system
call. A message's command and data set may share a PDU or be fragmented over many;
fragments of another message, or of a context not accepted, abort the association. A
C-CANCEL is looked for between the responses of a C-FIND, C-GET or C-MOVE. The
association ends with the peer's A-RELEASE or A-ABORT, a closed connection, a protocol
error (A-ABORT sent), or when it has been idle for `idle_timeout_s` (released).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

from pydicom.dataset import Dataset

from appliance.audit.events import AuditError
from appliance.dicom import dimse, handlers, pdu
from appliance.dicom.handlers import AssociationStats, Peer, StoreSink
from appliance.dicom.link import Aborted, Buffer, Link, Message, Released
from appliance.dicom.negotiation import Accepted
from appliance.dicom.wire import Connection, ConnectionClosed
from appliance.observe.metrics import ServerMetrics
from appliance.store.archive import Archive

LOG = logging.getLogger("appliance.dicom")
_RELEASE_WAIT_S = 5.0


@dataclass
class Front:
    """What every association of one server shares."""

    archive: Archive
    ae_title: str
    authorise: Callable[[Peer, str], bool]
    model_of: Callable[[str, int], str | None]  # (Q/R SOP class, service) -> model, None if not for it
    metrics: ServerMetrics
    retrieve: Any  # retrieve.RetrieveService
    deliver_report: Callable[[Peer, int, Dataset], None]  # commitment report to the registered address
    idle_timeout_s: float


class Association(Link):
    """The acceptor's side of one association: serves the peer's requests."""

    def __init__(self, conn: Connection, peer: Peer, contexts: dict[int, Accepted], peer_max_pdu: int,
                 front: Front, stats: AssociationStats):
        super().__init__(conn, contexts, peer_max_pdu)
        self.peer, self.front, self.stats = peer, front, stats
        self._report: tuple[int, int, Dataset] | None = None  # (message id, event type, info) not yet confirmed

    def sending_contexts(self, sop_class: str) -> list[Accepted]:
        """The accepted contexts on which the peer takes C-STOREs of `sop_class` (C-GET)."""
        return [cx for cx in self.contexts.values() if cx.abstract_syntax == sop_class and cx.requestor_scp]

    # -- serving -------------------------------------------------------------------------

    def serve(self) -> str:
        """Serve until the association ends; how it ended: released, aborted, closed, idle."""
        try:
            while True:
                self._dispatch(self.read_message(self._sink_for))
        except Released:
            self.conn.send([pdu.release_rp()])
            return "released"
        except Aborted:
            return "aborted"
        except pdu.ProtocolError as exc:
            LOG.warning(json.dumps({"event": "association.protocol_error", "calling_ae": self.peer.ae_title,
                                    "address": self.peer.address, "error": str(exc)}))
            self._send_quietly([pdu.abort(pdu.ABORT_PROVIDER, exc.reason)])
            return "aborted"
        except (socket.timeout, TimeoutError):
            self._release()
            return "idle"
        except ConnectionClosed:
            return "closed"
        finally:
            self.discard_partial()
            if self._report is not None:  # never confirmed on this association: to its address
                _, event_type, info = self._report
                self.front.deliver_report(self.peer, event_type, info)

    def _send_quietly(self, buffers: list) -> None:
        try:
            self.conn.send(buffers)
        except ConnectionClosed:
            pass

    def _release(self) -> None:
        """Idle too long: release it (and wait a little for the peer's answer)."""
        try:
            self.conn.send([pdu.release_rq()])
            self.conn.sock.settimeout(_RELEASE_WAIT_S)
            while True:
                pdu_type, _ = self.conn.read_pdu()
                if pdu_type in (pdu.RELEASE_RP, pdu.ABORT):
                    return
        except (ConnectionClosed, OSError, pdu.ProtocolError):
            return

    def _sink_for(self, command: dict, context: Accepted):
        if command["CommandField"] == dimse.C_STORE_RQ:
            return StoreSink(self.front.archive, self.peer, self.stats, command, context.transfer_syntax,
                             allowed=self.front.authorise(self.peer, "store"))
        return Buffer()

    def _dispatch(self, message: Message) -> None:
        handler = _SERVICES.get(message.field)
        if handler is None:
            if message.field & 0x8000:  # a response we do not wait for: nothing to answer
                return
            if message.field != dimse.C_CANCEL_RQ:  # a cancel for a request already answered
                self.respond(message, handlers.STATUS_UNRECOGNISED_OPERATION)
            return
        started = time.perf_counter()
        status = 0xC000
        try:
            status = handler(self, message)
        except AuditError as exc:
            LOG.error("request refused, the audit trail cannot be written: %s", exc)
            status = handlers.STATUS_OUT_OF_RESOURCES
            self.respond(message, status, "audit trail cannot be written")
        finally:
            self.front.metrics.observe(_SERVICE_NAMES[message.field], time.perf_counter() - started,
                                       handlers.outcome(status))

    def respond(self, message: Message, status: int, comment: str = "", dataset: bytes | None = None,
                **elements) -> None:
        self.send_message(message.context.context_id,
                          dimse.response(message.command, message.field | 0x8000, status, ErrorComment=comment,
                                         **elements), dataset)

    # -- services ------------------------------------------------------------------------

    def _echo(self, message: Message) -> int:
        self.respond(message, 0x0000)
        return 0x0000

    def _store(self, message: Message) -> int:
        status, comment = message.payload
        self.respond(message, status, comment)
        return status

    def _find(self, message: Message) -> int:
        model = self.front.model_of(message.context.abstract_syntax, message.field)
        if model is None or message.payload is None:
            status = handlers.STATUS_SOP_CLASS_NOT_SUPPORTED if model is None else 0xA700
            self.respond(message, status, "not a query model" if model is None else "identifier too long")
            return status
        if not self.front.authorise(self.peer, "query"):
            handlers.refuse(self.front.archive, self.peer, "c-find", "query")
            self.respond(message, handlers.STATUS_NOT_AUTHORISED, "calling AE may not query")
            return handlers.STATUS_NOT_AUTHORISED
        syntax = message.context.transfer_syntax
        try:
            identifier = handlers.decode_dataset(message.payload, syntax)
        except Exception as exc:  # noqa: BLE001 - an identifier pydicom cannot read
            self.respond(message, 0xC000, f"identifier cannot be decoded: {exc}")
            return 0xC000
        message_id = message.command.get("MessageID", 0)
        status = 0x0000
        for status, comment, response in handlers.find(
                self.front.archive, self.peer, identifier, model, message.context.abstract_syntax,
                self.front.ae_title, self.stats, lambda: self.cancelled(message_id)):
            self.respond(message, status, comment,
                         None if response is None else handlers.encode_dataset(response, syntax))
        return status

    def _get_or_move(self, message: Message) -> int:
        return self.front.retrieve.serve(self, message)

    def _commitment(self, message: Message) -> int:
        if not self.front.authorise(self.peer, "store"):
            handlers.refuse(self.front.archive, self.peer, "storage commitment", "store")
            self.respond(message, handlers.STATUS_NOT_AUTHORISED)
            return handlers.STATUS_NOT_AUTHORISED
        try:
            information = handlers.decode_dataset(message.payload or b"", message.context.transfer_syntax)
        except Exception:  # noqa: BLE001 - unreadable action information
            self.respond(message, 0xC000, "action information cannot be decoded")
            return 0xC000
        status = handlers.commitment_request(message.command.get("ActionTypeID", 0), information)
        self.respond(message, status, ActionTypeID=message.command.get("ActionTypeID"))
        if status != 0x0000:
            return status
        event_type, report = handlers.commitment_result(self.front.archive, information)
        message_id = self.next_message_id()
        self._report = (message_id, event_type, report)
        self.send_message(message.context.context_id, {
            "CommandField": dimse.N_EVENT_REPORT_RQ, "MessageID": message_id,
            "AffectedSOPClassUID": message.context.abstract_syntax,
            "AffectedSOPInstanceUID": handlers.COMMITMENT_INSTANCE, "EventTypeID": event_type},
            handlers.encode_dataset(report, message.context.transfer_syntax))
        return status

    def _report_confirmed(self, message: Message) -> int:
        status = message.command.get("Status", 0xC000)
        if self._report is not None and message.command.get("MessageIDBeingRespondedTo") == self._report[0]:
            if status == 0x0000:
                self._report = None
            else:  # refused on this association: try its registered address
                _, event_type, info = self._report
                self._report = None
                self.front.deliver_report(self.peer, event_type, info)
        return status


_SERVICES: dict[int, Callable[[Association, Message], int]] = {
    dimse.C_ECHO_RQ: Association._echo,
    dimse.C_STORE_RQ: Association._store,
    dimse.C_FIND_RQ: Association._find,
    dimse.C_GET_RQ: Association._get_or_move,
    dimse.C_MOVE_RQ: Association._get_or_move,
    dimse.N_ACTION_RQ: Association._commitment,
    dimse.N_EVENT_REPORT_RSP: Association._report_confirmed,
}
_SERVICE_NAMES = {dimse.C_ECHO_RQ: "c-echo", dimse.C_STORE_RQ: "c-store", dimse.C_FIND_RQ: "c-find",
                  dimse.C_GET_RQ: "c-get", dimse.C_MOVE_RQ: "c-move", dimse.N_ACTION_RQ: "n-action",
                  dimse.N_EVENT_REPORT_RSP: "n-event-report"}
