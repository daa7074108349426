"""Event-driven waits for pynetdicom's two reactor threads.

pynetdicom polls: the DUL thread sleeps 1 ms whenever a loop found nothing to do, and the
association thread sleeps 1 ms before every look at its DIMSE queue. Two threads per
association waking 1000 times a second each, all wanting the GIL, took a third of the
server's samples with four associations storing at once (py-spy). Here both threads wait
for a reason instead, with a bounded timeout so that timers (ARTIM, network timeout) are
still looked at:

- the DUL waits in poll() on its socket and on an eventfd written whenever a PDU is
  queued for sending (while it waits) or the thread is told to stop;
- the association waits on an event the DUL sets when it has something for it (a whole
  DIMSE message, a release or abort request) or has ended.

The DUL's loop is pynetdicom's own (only its poll point waits); the association's acceptor
loop is restated below with the wait in place of the sleep (pynetdicom 3.0.x, pinned).
"""

from __future__ import annotations

import logging
import os
import select
import ssl
import threading
import time

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

LOG = logging.getLogger("pynetdicom.association")

# Longest wait without a wake-up: timers and flags set by code that does not wake us are
# noticed within this.
MAX_WAIT = 0.05
# Twice the largest maximum PDU the configuration allows (dicom.max_pdu_kb <= 65536).
MAX_PDU_BYTES = 2 * (64 << 20)


class EventDrivenDUL(DULServiceProvider):
    """The DUL, waiting on its socket and an eventfd instead of sleeping in a loop."""

    _wake_fd: int
    activity: threading.Event

    def adopt(self) -> None:
        """Set up a DUL made by pynetdicom (its class was just changed to this one)."""
        # The eventfd is made when the thread starts and closed when it ends; a late wake-up
        # must not write to a reused descriptor.
        self._wake_fd = -1
        self._wake_lock = threading.Lock()
        self._waiting = False
        self.activity = threading.Event()
        self._stop_requested = self.__dict__.pop("_kill_thread", False)
        # pynetdicom sleeps this long after every loop that found nothing to do (between the
        # PDUs of a message being sent, too); here the wait below does the idling.
        self._run_loop_delay = 0

    # pynetdicom stops the thread by setting this flag (kill_dul, stop_dul): wake it to see it.
    @property
    def _kill_thread(self) -> bool:
        return self._stop_requested

    @_kill_thread.setter
    def _kill_thread(self, value: bool) -> None:
        self._stop_requested = value
        if value:
            self.wake()

    def wake(self) -> None:
        if not self._waiting:  # it looks at its queues before it waits: nothing to write
            return
        with self._wake_lock:
            if self._wake_fd >= 0:
                os.eventfd_write(self._wake_fd, 1)

    def run(self) -> None:
        # Thread.run, not run_reactor: pynetdicom bound its thread's target at construction.
        with self._wake_lock:
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            super().run()
        finally:
            self.activity.set()
            with self._wake_lock:
                os.close(self._wake_fd)
                self._wake_fd = -1

    def _process_recv_primitive(self) -> bool:
        # Called at the top of every loop: tell the association what is waiting for it, and
        # when there is nothing to do at all, wait here for the socket or a wake-up.
        if not self.assoc.dimse.msg_queue.empty() or not self.to_user_queue.empty():
            self.activity.set()
        # Waiting is announced before the queues are looked at: a PDU queued after the look
        # finds the flag set and writes the wake-up, one queued before it is seen.
        self._waiting = True
        try:
            if self.to_provider_queue.empty() and self.event_queue.empty() and not self._stop_requested:
                self._wait()
        finally:
            self._waiting = False
        return super()._process_recv_primitive()

    def _wait(self) -> None:
        sock = self.socket.socket if self.socket is not None else None
        if sock is None or sock.fileno() < 0:  # closed, the association not yet told: as pynetdicom
            time.sleep(0.001)
            return
        if self.socket.ready:
            return
        timeout = MAX_WAIT
        artim = self.artim_timer
        if artim._start_time is not None and artim._end_time is None:  # running (a stopped one is frozen)
            timeout = max(0.0, min(timeout, artim.remaining))
        # poll, not select: select cannot wait on a descriptor numbered 1024 or more.
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(self._wake_fd, select.POLLIN)
        try:
            ready = poller.poll(timeout * 1000)
        except OSError:  # the socket closed under us: the loop notices
            return
        if any(fd == self._wake_fd for fd, _ in ready):
            try:
                os.eventfd_read(self._wake_fd)
            except BlockingIOError:
                pass


class EventDrivenAssociation(Association):
    """An acceptor whose reactor waits for its DUL's word instead of sleeping 1 ms a loop."""

    def _run_reactor(self) -> None:
        activity = self.dul.activity
        self._is_paused = False
        while not self._kill:
            if self.dimse.msg_queue.empty():
                activity.wait(MAX_WAIT)
                activity.clear()
            # Paused while another thread of ours sends on this association (pynetdicom's rule).
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, context_id)
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOG.info("Association Released")
                self.is_released, self.is_established = True, False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                LOG.info("Association Aborted" + (" (A-P-ABORT)" if self.acse.is_aborted("a-p-abort") else ""))
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
                self.is_aborted, self.is_established = True, False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                LOG.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class BulkSocket(AssociationSocket):
    """pynetdicom's socket, reading a PDU with as few recv_into() calls as the kernel allows
    (pynetdicom reads 4 KB per recv(): 256 calls and copies for a 1 MB PDU) and sending
    with sendall() (pynetdicom re-slices the rest of the PDU after every partial send)."""

    def recv(self, nr_bytes: int) -> bytearray:
        # The length comes from the peer: refused past any PDU size this server negotiates
        # (pynetdicom then closes the connection), and the buffer grows with what arrives.
        if nr_bytes > MAX_PDU_BYTES:
            raise OSError(f"the peer announced a PDU of {nr_bytes} bytes")
        buffer = bytearray(min(nr_bytes, 1 << 20))
        nr_read = 0
        while nr_read < nr_bytes:
            if nr_read == len(buffer):
                buffer += bytearray(min(nr_bytes - nr_read, len(buffer)))
            with memoryview(buffer) as view:
                count = self.socket.recv_into(view[nr_read:])
            if not count:  # the peer closed: what was read so far, as pynetdicom does
                break
            nr_read += count
        del buffer[nr_read:]
        return buffer

    @property
    def ready(self) -> bool:
        """pynetdicom's readiness test with poll() (its select() takes a descriptor numbered 1024
        or more for a closed connection)."""
        if self.socket is None or self._is_connected is False:
            return False
        poller = select.poll()
        try:
            poller.register(self.socket, select.POLLIN)
            readable = bool(poller.poll(0))
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        # An SSLSocket may hold decrypted data that poll does not see.
        return readable or (isinstance(self.socket, ssl.SSLSocket) and bool(self.socket.pending()))

    def send(self, bytestream: bytes) -> None:
        try:
            self.socket.sendall(bytestream)
            evt.trigger(self.assoc, evt.EVT_DATA_SENT, {"data": bytestream})
        except Exception:  # noqa: BLE001 - pynetdicom's contract: Evt17, transport closed
            self.event_queue.put("Evt17")


def use_bulk_socket(assoc: Association) -> None:
    if type(assoc.dul.socket) is AssociationSocket:
        assoc.dul.socket.__class__ = BulkSocket


def make_event_driven(assoc: EventDrivenAssociation) -> None:
    """Switch the DUL of a not yet started acceptor association to event-driven waits."""
    assoc.dul.__class__ = EventDrivenDUL
    assoc.dul.adopt()
    use_bulk_socket(assoc)
