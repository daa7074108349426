"""DIMSE messages over an established association, either side of it.

A message's command set and data set may share a PDU or be fragmented over many; a
fragment of another message, or on a context that was not accepted, is a protocol
error (the association is aborted). A data set is written into a sink as it arrives:
memory for an identifier, the archive for a C-STORE (association.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from appliance.dicom import dimse, pdu
from appliance.dicom.negotiation import Accepted
from appliance.dicom.wire import Connection

LOG = logging.getLogger("appliance.dicom")
_MAX_DATASET_BUFFERED = 4 << 20  # identifiers and action information: a few KB in practice


class Released(Exception):
    """The peer asked for a release."""


class Aborted(Exception):
    """The peer aborted."""


@dataclass
class Message:
    command: dict
    context: Accepted
    payload: Any  # the data set (bytes; None if too long), a sink's result, or None

    @property
    def field(self) -> int:
        return self.command["CommandField"]


class Buffer:
    """A data set kept whole in memory (identifiers, commitment requests), bounded."""

    def __init__(self):
        self._data = bytearray()
        self.too_long = False

    def write(self, data) -> None:
        if len(self._data) + len(data) > _MAX_DATASET_BUFFERED:
            self.too_long = True
        elif not self.too_long:
            self._data += data

    def discard(self) -> None:
        self._data = bytearray()

    def result(self) -> bytes | None:
        return None if self.too_long else bytes(self._data)


def _buffer(command: dict, context: Accepted) -> Buffer:
    return Buffer()


class Link:
    """Messages over `conn` on the accepted `contexts`; `peer_max_pdu` bounds what we send."""

    def __init__(self, conn: Connection, contexts: dict[int, Accepted], peer_max_pdu: int):
        self.conn, self.contexts, self.peer_max_pdu = conn, contexts, peer_max_pdu
        self._command = bytearray()
        self._receiving: tuple[dict, Accepted, Any] | None = None
        self._queued: list[Message] = []
        self._message_id = 0

    def sending_contexts(self, sop_class: str) -> list[Accepted]:
        """The accepted contexts on which we may send a C-STORE of `sop_class`."""
        return [cx for cx in self.contexts.values() if cx.abstract_syntax == sop_class]

    def next_message_id(self) -> int:
        self._message_id = self._message_id % 65535 + 1
        return self._message_id

    def send_message(self, context_id: int, command: dict, dataset: bytes | None = None) -> None:
        if dataset is not None:
            command = {**command, "CommandDataSetType": 0x0001}
        if LOG.isEnabledFor(logging.DEBUG):
            LOG.debug("Sent %s on context %d", dimse.describe(command), context_id)
        self.conn.send_pdus(pdu.message_pdus(context_id, dimse.encode(command), dataset, self.peer_max_pdu))

    def read_message(self, sink_for: Callable[[dict, Accepted], Any] = _buffer) -> Message:
        """The next whole message. `sink_for(command, context)` gives what a data set is
        written into as it arrives (default: kept in memory)."""
        while not self._queued:
            self._pump(sink_for)
        message = self._queued.pop(0)
        if LOG.isEnabledFor(logging.DEBUG):
            LOG.debug("Received %s on context %d", dimse.describe(message.command), message.context.context_id)
        return message

    def _pump(self, sink_for: Callable[[dict, Accepted], Any] = _buffer) -> None:
        """Read one PDU; the messages it completes are queued."""
        pdu_type, body = self.conn.read_pdu()
        if pdu_type == pdu.P_DATA:
            self._queued.extend(self._assemble(body, sink_for))
        elif pdu_type == pdu.RELEASE_RQ:
            raise Released()
        elif pdu_type == pdu.ABORT:
            raise Aborted()
        else:
            raise pdu.ProtocolError(f"unexpected PDU type 0x{pdu_type:02x}", pdu.ABORT_UNEXPECTED_PDU)

    def _assemble(self, body, sink_for) -> list[Message]:
        done = []
        with memoryview(body) as view:
            for item in pdu.pdvs(view):
                context = self.contexts.get(item.context_id)
                if context is None:
                    raise pdu.ProtocolError("a PDV on a presentation context that was not accepted")
                if item.is_command:
                    if self._receiving is not None:
                        raise pdu.ProtocolError("a command set arrived while a data set was due")
                    self._command += item.data
                    if item.is_last:
                        command, self._command = dimse.decode(self._command), bytearray()
                        if dimse.has_data_set(command):
                            self._receiving = (command, context, sink_for(command, context))
                        else:
                            done.append(Message(command, context, None))
                    elif len(self._command) > 1 << 16:
                        raise pdu.ProtocolError("command set too long")
                else:
                    if self._receiving is None or self._receiving[1].context_id != item.context_id:
                        raise pdu.ProtocolError("a data set fragment without its command")
                    self._receiving[2].write(item.data)
                    if item.is_last:
                        command, context, sink = self._receiving
                        self._receiving = None
                        done.append(Message(command, context, sink.result()))
        return done

    def discard_partial(self) -> None:
        """The association is over: a data set cut off in the middle is dropped."""
        if self._receiving is not None:
            self._receiving[2].discard()
            self._receiving = None

    def cancelled(self, message_id: int) -> bool:
        """Whether the peer has sent a C-CANCEL for request `message_id`, looked for without
        waiting; other messages that arrive meanwhile are kept for later."""
        while self.conn.waiting():
            self._pump()
        for message in self._queued:
            if message.field == dimse.C_CANCEL_RQ and message.command.get("MessageIDBeingRespondedTo") == message_id:
                self._queued.remove(message)
                return True
        return False

    def response_to(self, message_id: int, field: int, on_cancel: Callable[[int], None] | None = None) -> Message:
        """Wait for the response to our request `message_id`; C-CANCELs of the peer's requests
        that come meanwhile go to `on_cancel(their message id)`, other messages are kept."""
        waiting: list[Message] = []
        try:
            while True:
                message = self.read_message()
                if message.field == field and message.command.get("MessageIDBeingRespondedTo") == message_id:
                    return message
                if message.field == dimse.C_CANCEL_RQ and on_cancel is not None:
                    on_cancel(message.command.get("MessageIDBeingRespondedTo", 0))
                else:
                    waiting.append(message)
        finally:
            self._queued[:0] = waiting
