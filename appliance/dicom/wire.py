"""PDUs on a socket: read with few system calls, send many per call.

Reading: the bytes that arrive are staged in one buffer (256 KB per `recv_into`), PDUs
are cut out of it; a PDU larger than what is staged gets a buffer of its own, which the
rest of it is received into directly (one copy of the data, by the kernel). Every
length comes from the peer, so it is checked (pdu.check_header) before anything of
that size is allocated. Sending: a list of buffers (headers and views of the data)
goes out with `sendmsg`, as many PDUs per call as fit in a megabyte.
"""

from __future__ import annotations

import select
import socket
import ssl

from appliance.dicom import pdu

STAGING = 256 << 10
_SEND_BATCH_BYTES = 1 << 20
_SEND_BATCH_BUFFERS = 512


class ConnectionClosed(Exception):
    """The peer closed the connection (or it broke)."""


def nodelay(sock: socket.socket) -> None:
    """Without TCP_NODELAY every DIMSE exchange waits ~40 ms for a delayed ACK."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Connection:
    """One peer's socket, PDU by PDU. `max_data`: the largest P-DATA-TF body accepted
    (our maximum PDU length, as negotiated)."""

    def __init__(self, sock: socket.socket, *, max_data: int = pdu.MAX_ASSOCIATE_RQ, staged: bytes = b""):
        self.sock = sock
        self.max_data = max_data
        self._staging = bytearray(STAGING)
        self._view = memoryview(self._staging)
        self._start = 0
        self._end = 0
        self._tls = isinstance(sock, ssl.SSLSocket)
        if staged:
            self._view[:len(staged)] = staged
            self._end = len(staged)

    # -- reading -------------------------------------------------------------------------

    def _fill(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == STAGING:
            rest = bytes(self._view[self._start:self._end])
            self._view[:len(rest)] = rest
            self._start, self._end = 0, len(rest)
        try:
            count = self.sock.recv_into(self._view[self._end:])
        except (ConnectionError, ssl.SSLError) as exc:
            raise ConnectionClosed(str(exc)) from None
        if not count:
            raise ConnectionClosed("the peer closed the connection")
        self._end += count

    def read_pdu(self) -> tuple[int, bytes | bytearray]:
        """(type, body) of the next PDU: raises ConnectionClosed, TimeoutError (the socket's
        timeout) or ProtocolError (a PDU that cannot be right)."""
        while self._end - self._start < pdu.HEADER_SIZE:
            self._fill()
        pdu_type, _, length = pdu.HEADER.unpack_from(self._staging, self._start)
        pdu.check_header(pdu_type, length, self.max_data)
        self._start += pdu.HEADER_SIZE
        staged = self._end - self._start
        if length <= staged or length <= STAGING // 4:
            while self._end - self._start < length:
                self._fill()
            body = bytes(self._view[self._start:self._start + length])
            self._start += length
            return pdu_type, body
        body = bytearray(length)
        body[:staged] = self._view[self._start:self._end]
        self._start = self._end = 0
        got = staged
        with memoryview(body) as view:
            while got < length:
                try:
                    count = self.sock.recv_into(view[got:])
                except (ConnectionError, ssl.SSLError) as exc:
                    raise ConnectionClosed(str(exc)) from None
                if not count:
                    raise ConnectionClosed("the peer closed the connection inside a PDU")
                got += count
        return pdu_type, body

    def waiting(self) -> bool:
        """Whether bytes from the peer are waiting (a C-CANCEL, most likely), without blocking."""
        if self._end > self._start or (self._tls and self.sock.pending()):
            return True
        poller = select.poll()
        try:
            poller.register(self.sock, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True  # closed: the next read says so

    # -- sending -------------------------------------------------------------------------

    def send(self, buffers: list) -> None:
        """Send every byte of `buffers`, in order."""
        try:
            if self._tls:
                self.sock.sendall(b"".join(buffers))
                return
            views = [memoryview(b) for b in buffers if len(b)]
            while views:
                sent = self.sock.sendmsg(views[:1024])
                while sent:
                    if sent >= len(views[0]):
                        sent -= len(views.pop(0))
                    else:
                        views[0] = views[0][sent:]
                        sent = 0
        except (ConnectionError, ssl.SSLError, BrokenPipeError) as exc:
            raise ConnectionClosed(str(exc)) from None

    def send_pdus(self, pdus) -> None:
        """Send PDUs (each a list of buffers), batched into few system calls."""
        batch: list = []
        size = 0
        for buffers in pdus:
            batch.extend(buffers)
            size += sum(len(b) for b in buffers)
            if size >= _SEND_BATCH_BYTES or len(batch) >= _SEND_BATCH_BUFFERS:
                self.send(batch)
                batch, size = [], 0
        if batch:
            self.send(batch)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
