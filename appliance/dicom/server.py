"""`appliance serve`: the DICOM front.

- Verification; Storage for every storage SOP class pydicom knows (retired ones
  included; any SOP class when `dicom.allow_unknown_sop_classes`), each with every
  transfer syntax: stored as received, never transcoded.
- Patient Root and Study Root Query/Retrieve: FIND (handlers.py, query.py), GET and
  MOVE (retrieve.py); Storage Commitment Push Model.
- The lobby: one thread holds every connection that has not yet sent a complete
  A-ASSOCIATE-RQ, with a deadline (`association_request_timeout_s`, the TLS handshake
  included) and a limit per source address; anything else first (junk, another PDU
  type, a length that cannot be right) is dropped at once. Only an accepted association
  gets a thread and a slot (admission.py: limits in all, per calling AE, per address).
- Calling AE titles are checked against the registry (registry.py), re-read when the
  file changes; roles are checked per service. An association idle for
  `idle_timeout_s` is released. TCP_NODELAY on every socket, optional TLS.
- SIGTERM/SIGINT: stop accepting, let the associations in flight finish (every C-STORE
  answered Success is durable already), then exit.
"""

from __future__ import annotations

import json
import logging
import queue
import resource
import selectors
import signal
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from pydicom._uid_dict import UID_dictionary
from pydicom.dataset import Dataset

from appliance.admin.home import audit_trail
from appliance.audit.events import AuditError, EventID, EventType, event
from appliance.audit.refusals import Refusals
from appliance.config import Config
from appliance.dicom import dimse, handlers, negotiation, pdu, registry
from appliance.dicom.admission import Admission
from appliance.dicom.association import Association, Front
from appliance.dicom.handlers import AssociationStats, Peer
from appliance.dicom.negotiation import UNCOMPRESSED, Proposed, Support
from appliance.dicom.pynetdicom_glue import AssociateRequest, decode_associate_rq, encode_associate_ac
from appliance.dicom.requestor import AssociationRefused, RequestedAssociation
from appliance.dicom.retrieve import RetrieveService
from appliance.dicom.wire import Connection, nodelay
from appliance.errors import ConfigError, OutOfSpace, TierUnavailable
from appliance.format.p10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from appliance.observe.metrics import MetricsEndpoint, ServerMetrics
from appliance.store.archive import Archive
from appliance.store.query import PATIENT_ROOT, STUDY_ROOT

LOG = logging.getLogger("appliance.dicom")
VERIFICATION = "1.2.840.10008.1.1"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
# Query/Retrieve information models: SOP class -> (model, the one service it is for)
QUERY_RETRIEVE = {
    "1.2.840.10008.5.1.4.1.2.1.1": (PATIENT_ROOT, dimse.C_FIND_RQ), "1.2.840.10008.5.1.4.1.2.1.2": (PATIENT_ROOT,
                                                                                                    dimse.C_MOVE_RQ),
    "1.2.840.10008.5.1.4.1.2.1.3": (PATIENT_ROOT, dimse.C_GET_RQ), "1.2.840.10008.5.1.4.1.2.2.1": (STUDY_ROOT,
                                                                                                   dimse.C_FIND_RQ),
    "1.2.840.10008.5.1.4.1.2.2.2": (STUDY_ROOT, dimse.C_MOVE_RQ), "1.2.840.10008.5.1.4.1.2.2.3": (STUDY_ROOT,
                                                                                                  dimse.C_GET_RQ),
}


def model_of(sop_class: str, service: int) -> str | None:
    """The information model of a Query/Retrieve SOP class when it is for `service`, else None."""
    model, served = QUERY_RETRIEVE.get(sop_class, (None, None))
    return model if served == service else None
_NOT_DICOM_ENCODINGS = ("1.2.840.10008.1.2.6.", "1.2.840.10008.1.2.7.", "1.2.840.10008.1.20")
_PENDING_TOTAL = 4096  # connections in the lobby at once, from everyone
_LOBBY_TICK_S = 0.5
_REFUSALS_INTERVAL_S = 60.0


def storage_sop_classes() -> list[str]:
    """Every storage SOP class pydicom knows, retired ones included (real archives hold
    retired classes such as old ultrasound)."""
    return sorted(uid for uid, entry in UID_dictionary.items()
                  if entry[1] == "SOP Class" and "Storage" in entry[0] and "Commitment" not in entry[0])


def transfer_syntaxes() -> tuple[str, ...]:
    """Every transfer syntax, the uncompressed ones first (our order of preference)."""
    others = sorted(uid for uid, entry in UID_dictionary.items()
                    if entry[1] == "Transfer Syntax" and uid not in UNCOMPRESSED
                    and not uid.startswith(_NOT_DICOM_ENCODINGS))
    return UNCOMPRESSED + tuple(others)


def supported_contexts() -> dict[str, Support]:
    """What the archive accepts, per abstract syntax (negotiation.py)."""
    every_syntax = transfer_syntaxes()
    support = {sop_class: Support(every_syntax, offers_scu=True) for sop_class in storage_sop_classes()}
    support[VERIFICATION] = Support(UNCOMPRESSED)
    support[STORAGE_COMMITMENT] = Support(UNCOMPRESSED)
    support.update({sop_class: Support(UNCOMPRESSED) for sop_class in QUERY_RETRIEVE})
    return support


def _tls_context(config: Config) -> ssl.SSLContext | None:
    tls = config.appliance.dicom.tls
    if not tls.certificate:
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(config.resolve(tls.certificate), config.resolve(tls.private_key))
        if tls.ca_certificates:
            context.load_verify_locations(config.resolve(tls.ca_certificates))
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"dicom.tls: cannot load the certificate or key: {exc}") from None
    return context


@dataclass
class _Pending:
    """A connection in the lobby: not yet a complete A-ASSOCIATE-RQ."""

    sock: socket.socket
    address: str
    deadline: float
    handshaking: bool = False
    received: bytearray = field(default_factory=bytearray)


class _Dropped(Exception):
    """A connection the lobby drops (`reason`; `silent`: a peer that said nothing; `op`: what
    the audit record calls it: a failed TLS handshake is a refused association)."""

    def __init__(self, reason: str, silent: bool = False, op: str = "connection"):
        super().__init__(reason)
        self.silent, self.op = silent, op


class Sibling(Protocol):
    """A front served beside the DICOM one, started and drained with it (the DICOMweb server)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class DicomServer:
    def __init__(self, archive: Archive, *, port: int | None = None, ae_title: str | None = None,
                 health_gauges: Callable[[], str] | None = None):
        """`health_gauges()`: the health gauges the metrics endpoint serves beside the server's
        counters (observe.health, wired by the command that starts the server)."""
        self.archive = archive
        self._health_gauges = health_gauges or (lambda: "")
        self.config = archive.config
        self.settings = self.config.appliance.dicom
        self.ae_title = ae_title or self.settings.ae_title
        self.port = port if port is not None else self.settings.port
        self._registry_path = self.config.remote_aes_path
        self._registry: dict[str, registry.RemoteAE] = {}
        self._registry_mtime: int | None = None
        self._reload_registry()
        self._support = supported_contexts()
        self._any_storage = Support(transfer_syntaxes()) if self.settings.allow_unknown_sop_classes else None
        self.metrics = ServerMetrics()
        self.metrics_endpoint: MetricsEndpoint | None = None
        self._admission = Admission(self.settings.max_associations, self.settings.max_associations_per_ae,
                                    self.settings.max_associations_per_address)
        # Refusals are recorded by a thread of their own: the lobby never waits for the disk.
        self._refusal_records: queue.SimpleQueue = queue.SimpleQueue()
        self._refusals = Refusals(self._refusal_records.put, _REFUSALS_INTERVAL_S)
        self._tls = _tls_context(self.config)
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._lobby_thread: threading.Thread | None = None
        self._recorder: threading.Thread | None = None
        self._associations: dict[int, tuple[threading.Thread, Connection]] = {}
        self._associations_lock = threading.Lock()
        self.retrieve = RetrieveService(archive, ae_title=self.ae_title, model_of=model_of,
                                        authorise=self.authorise, move_destination=self.move_destination,
                                        max_pdu=self.settings.max_pdu_kb << 10,
                                        timeout_s=self.settings.association_request_timeout_s * 6,
                                        metrics=self.metrics)
        self.front = Front(archive, self.ae_title, self.authorise, model_of, self.metrics, self.retrieve,
                           self._deliver_report, self.settings.idle_timeout_s)

    # -- access control ------------------------------------------------------------------

    def _reload_registry(self) -> None:
        try:
            mtime = self._registry_path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime == self._registry_mtime and self._registry_mtime is not None:
            return
        self._registry = registry.load(self._registry_path)
        if self._registry_mtime is not None:
            audit_trail(self.config).note_config_changes(self.config.files())
        self._registry_mtime = mtime

    def authorise(self, peer: Peer, role: str) -> bool:
        remote = self._registry.get(peer.ae_title)
        if remote is None:
            return self.settings.allow_unknown_callers and role != "move-destination"
        return remote.can(role)

    def move_destination(self, ae_title: str) -> tuple[str, int] | None:
        remote = self._registry.get(ae_title)
        if remote is None or not remote.can("move-destination"):
            return None
        return remote.host, remote.port

    def _audit(self, entry: dict) -> None:
        """Record from the server's own threads (a failure is said, not raised into the lobby)."""
        try:
            self.archive.audit.record(entry)
        except AuditError as exc:
            LOG.error(json.dumps({"event": "audit.failed", "error": str(exc)}))

    # -- the lobby: connections before their A-ASSOCIATE-RQ --------------------------------

    def start(self) -> None:
        """Start serving in background threads."""
        hot = self.config.resolve(self.config.hot_tier.path)
        if not hot.is_dir():
            raise TierUnavailable(f"the hot tier {hot} is not there (disk not mounted?): not serving until it is")
        try:
            self.archive.open_journal()
        except OutOfSpace as exc:  # serve anyway: stores are answered 0xA700 until there is room
            LOG.warning(json.dumps({"event": "serve.disk_full", "error": str(exc)}))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # every connection in the lobby is a descriptor
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        family = socket.AF_INET6 if ":" in self.settings.bind_address else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.settings.bind_address, self.port))
        listener.listen(512)
        listener.setblocking(False)
        self._listener = listener
        self._lobby_thread = threading.Thread(target=self._lobby, name="dicom-listener", daemon=True)
        self._lobby_thread.start()
        self._recorder = threading.Thread(target=self._record_refusals, name="refusal-records", daemon=True)
        self._recorder.start()
        settings = self.config.appliance.metrics
        if settings.port:
            self.metrics_endpoint = MetricsEndpoint(settings.bind_address, settings.port, self.metrics,
                                                    self._health_gauges)
            self.metrics_endpoint.start()
        LOG.info(json.dumps({"event": "serve.started", "ae_title": self.ae_title, "port": self.port,
                             "tls": self._tls is not None}))
        audit_trail(self.config).note_config_changes(self.config.files())
        self.archive.audit.record(event(EventID.APPLICATION_ACTIVITY, type=EventType.APPLICATION_START, op="serve",
                                        ae_title=self.ae_title, port=self.port, tls=self._tls is not None))

    def _lobby(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ, None)
        pending: dict[int, _Pending] = {}
        per_address: dict[str, int] = {}
        last_flush = time.monotonic()
        try:
            while not self._stopping.is_set():
                for key, _ in selector.select(_LOBBY_TICK_S):
                    if key.data is None:
                        self._accept(selector, pending, per_address)
                    else:
                        self._progress(selector, pending, per_address, key.data)
                now = time.monotonic()
                for entry in [p for p in pending.values() if p.deadline <= now]:
                    self._drop(selector, pending, per_address, entry,
                               _Dropped(f"no A-ASSOCIATE-RQ within {self.settings.association_request_timeout_s} s"))
                if now - last_flush >= _LOBBY_TICK_S * 4:
                    self._refusals.flush()
                    last_flush = now
        finally:
            for entry in list(pending.values()):
                entry.sock.close()
            selector.close()
            self._listener.close()

    def _record_refusals(self) -> None:
        while (entry := self._refusal_records.get()) is not None:
            self._audit(entry)

    def _accept(self, selector, pending: dict, per_address: dict) -> None:
        while True:
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: the backlog waits
                LOG.error(json.dumps({"event": "accept.failed", "error": str(exc)}))
                return
            host = address[0]
            if len(pending) >= _PENDING_TOTAL or per_address.get(host, 0) >= self.settings.max_pending_per_address:
                sock.close()
                self.metrics.add("dropped_connections_total", reason="too many waiting")
                self._refusals.note(host, "too many connections waiting for their association", op="connection")
                continue
            nodelay(sock)
            sock.setblocking(False)
            entry = _Pending(sock, host, time.monotonic() + self.settings.association_request_timeout_s)
            if self._tls is not None:
                entry.sock = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                entry.handshaking = True
            pending[entry.sock.fileno()] = entry
            per_address[host] = per_address.get(host, 0) + 1
            selector.register(entry.sock, selectors.EVENT_READ, entry)

    def _progress(self, selector, pending: dict, per_address: dict, entry: _Pending) -> None:
        try:
            if entry.handshaking:
                try:
                    entry.sock.do_handshake()
                    entry.handshaking = False
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    return
                except (ssl.SSLEOFError, ConnectionError) as exc:
                    raise _Dropped(f"closed during the TLS handshake: {exc}", silent=True) from None
                except (ssl.SSLError, OSError) as exc:
                    raise _Dropped(f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}",
                                   op="association") from None
            request = self._read_request(entry)
            if request is None:
                return
        except _Dropped as exc:
            self._drop(selector, pending, per_address, entry, exc)
            return
        self._forget(selector, pending, per_address, entry)
        self._negotiate(entry, *request)

    def _read_request(self, entry: _Pending) -> tuple[bytes, bytes] | None:
        """(the whole A-ASSOCIATE-RQ, bytes after it) once it is there, None until then."""
        try:
            while True:
                want = pdu.HEADER_SIZE if len(entry.received) < pdu.HEADER_SIZE else \
                    pdu.HEADER_SIZE + pdu.HEADER.unpack_from(entry.received)[2] - len(entry.received)
                chunk = entry.sock.recv(max(want, 1) if want > 0 else 1)
                if not chunk:
                    raise _Dropped("closed before a complete A-ASSOCIATE-RQ", silent=not entry.received)
                entry.received += chunk
                if len(entry.received) >= pdu.HEADER_SIZE:
                    pdu_type, _, length = pdu.HEADER.unpack_from(entry.received)
                    if pdu_type != pdu.ASSOCIATE_RQ:
                        raise _Dropped("sent another PDU before an A-ASSOCIATE-RQ")
                    if not 68 <= length <= pdu.MAX_ASSOCIATE_RQ:
                        raise _Dropped("sent an A-ASSOCIATE-RQ length that cannot be right")
                    if len(entry.received) >= pdu.HEADER_SIZE + length:
                        end = pdu.HEADER_SIZE + length
                        return bytes(entry.received[:end]), bytes(entry.received[end:])
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except (ConnectionError, ssl.SSLError, OSError):
            raise _Dropped("connection broke before a complete A-ASSOCIATE-RQ", silent=not entry.received) from None

    def _forget(self, selector, pending: dict, per_address: dict, entry: _Pending) -> None:
        selector.unregister(entry.sock)
        pending.pop(entry.sock.fileno(), None)
        per_address[entry.address] -= 1
        if not per_address[entry.address]:
            del per_address[entry.address]

    def _drop(self, selector, pending: dict, per_address: dict, entry: _Pending, why: _Dropped) -> None:
        self._forget(selector, pending, per_address, entry)
        entry.sock.close()
        self.metrics.add("dropped_connections_total", reason="silent" if why.silent else "junk or slow")
        if not why.silent:
            if self._refusals.note(entry.address, str(why), op=why.op):
                LOG.warning(json.dumps({"event": "connection.dropped", "address": entry.address,
                                        "reason": str(why)}))

    # -- association negotiation ---------------------------------------------------------

    def _negotiate(self, entry: _Pending, raw: bytes, after: bytes) -> None:
        sock = entry.sock
        sock.setblocking(True)
        sock.settimeout(self.settings.association_request_timeout_s)
        try:
            request = decode_associate_rq(raw)
        except pdu.ProtocolError as exc:
            self._send_and_close(sock, pdu.abort(pdu.ABORT_PROVIDER, exc.reason))
            self.metrics.add("dropped_connections_total", reason="junk or slow")
            self._refusals.note(entry.address, "sent an A-ASSOCIATE-RQ that does not decode", op="connection")
            return
        self._reload_registry()
        refusal = self._refusal(request)
        if refusal is None:
            why = self._admission.admit(request.calling_ae, entry.address)
            if why:
                refusal = (pdu.RJ_TRANSIENT, pdu.RJ_PRESENTATION, pdu.RJ_LOCAL_LIMIT_EXCEEDED, why)
        if refusal is not None:
            result, source, reason, text = refusal
            self._send_and_close(sock, pdu.associate_rj(result, source, reason))
            self.metrics.add("associations_total", outcome="rejected")
            if self._refusals.note(entry.address, text, calling_ae=request.calling_ae):
                LOG.warning(json.dumps({"event": "association.rejected", "calling_ae": request.calling_ae,
                                        "called_ae": request.called_ae, "address": entry.address, "reason": text}))
            return
        thread = threading.Thread(target=self._serve_association, args=(sock, entry.address, request, after),
                                  name=f"association-{request.calling_ae}", daemon=True)
        thread.start()

    def _refusal(self, request: AssociateRequest) -> tuple[int, int, int, str] | None:
        """Why the request is rejected (A-ASSOCIATE-RJ result, source, reason, text), or None."""
        if not request.protocol_version & 1:
            return pdu.RJ_PERMANENT, pdu.RJ_ACSE, pdu.RJ_PROTOCOL_VERSION_NOT_SUPPORTED, "protocol version not supported"
        if request.application_context != negotiation.APPLICATION_CONTEXT:
            return pdu.RJ_PERMANENT, pdu.RJ_USER, pdu.RJ_APP_CONTEXT_NOT_SUPPORTED, "application context not supported"
        if not self.settings.allow_any_called_ae_title and request.called_ae != self.ae_title:
            return pdu.RJ_PERMANENT, pdu.RJ_USER, pdu.RJ_CALLED_AE_NOT_RECOGNISED, "called AE title is not this archive's"
        if not self.settings.allow_unknown_callers and request.calling_ae not in self._registry:
            return pdu.RJ_PERMANENT, pdu.RJ_USER, pdu.RJ_CALLING_AE_NOT_RECOGNISED, "calling AE title not registered"
        return None

    def _send_and_close(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.sendall(data)
        except OSError:
            pass
        finally:
            sock.close()

    def _serve_association(self, sock: socket.socket, address: str, request: AssociateRequest, after: bytes) -> None:
        max_data = self.settings.max_pdu_kb << 10
        conn = Connection(sock, max_data=max_data, staged=after)
        peer = Peer(request.calling_ae, address)
        ident = threading.get_ident()
        stats = AssociationStats(peer.ae_title, address, totals=self.metrics)
        ended = "closed"
        try:
            outcome = negotiation.negotiate(request.contexts, request.roles, self._support,
                                            any_storage=self._any_storage)
            conn.send([encode_associate_ac(request, outcome, max_pdu=max_data,
                                           implementation_uid=IMPLEMENTATION_CLASS_UID,
                                           implementation_version=IMPLEMENTATION_VERSION)])
            sock.settimeout(self.settings.idle_timeout_s)
            with self._associations_lock:
                self._associations[ident] = (threading.current_thread(), conn)
            self.metrics.add("associations_total", outcome="accepted")
            LOG.debug("Association accepted from %s at %s: %d of %d presentation contexts", peer.ae_title, address,
                      len(outcome.accepted), len(request.contexts))
            self._audit_login(peer, request, sock)
            ended = Association(conn, peer, outcome.accepted, request.max_pdu, self.front, stats).serve()
        except Exception as exc:  # noqa: BLE001 - one association's failure must not take the server
            LOG.exception(json.dumps({"event": "association.failed", "calling_ae": peer.ae_title,
                                      "error": str(exc)}))
            ended = "failed"
        finally:
            conn.close()
            with self._associations_lock:
                self._associations.pop(ident, None)
            self._admission.release(request.calling_ae, address)
            LOG.info(json.dumps({"event": "association.ended", "calling_ae": stats.calling_ae,
                                 "address": stats.address, "services": sorted(stats.services),
                                 "stored": stats.stored, "duplicates": stats.duplicates, "failed": stats.failed,
                                 "bytes": stats.bytes, "queries": stats.queries, "retrieved": stats.retrieved,
                                 "seconds": round(time.monotonic() - stats.started, 3), "ended": ended,
                                 "aborted": ended in ("aborted", "failed")}))

    def _audit_login(self, peer: Peer, request: AssociateRequest, sock: socket.socket) -> None:
        tls = isinstance(sock, ssl.SSLSocket)
        certificate = sock.getpeercert() if tls else None
        subject = ", ".join(f"{k}={v}" for rdn in (certificate or {}).get("subject", ()) for k, v in rdn)
        self._audit(event(EventID.USER_AUTHENTICATION, type=EventType.LOGIN, op="association", **peer.who(),
                          called_ae=request.called_ae, tls=tls, certificate=subject,
                          user_identity=request.user_identity))

    # -- storage commitment reports to an address ----------------------------------------

    def _deliver_report(self, peer: Peer, event_type: int, report: Dataset) -> None:
        """Send a commitment report on a new association to the caller's registered address
        (its own association ended before it confirmed the report)."""
        threading.Thread(target=self._send_report, args=(peer, event_type, report), name="commitment-report",
                         daemon=True).start()

    def _send_report(self, peer: Peer, event_type: int, report: Dataset) -> None:
        remote = self._registry.get(peer.ae_title)
        if remote is None:
            LOG.error(json.dumps({"event": "commitment.undeliverable", "calling_ae": peer.ae_title}))
            return
        try:
            link = RequestedAssociation.open(
                remote.host, remote.port, calling_ae=self.ae_title, called_ae=remote.ae_title,
                contexts=[Proposed(1, STORAGE_COMMITMENT, UNCOMPRESSED)], max_pdu=self.settings.max_pdu_kb << 10,
                timeout=self.settings.association_request_timeout_s * 6, roles={STORAGE_COMMITMENT: (False, True)})
        except AssociationRefused as exc:
            LOG.error(json.dumps({"event": "commitment.undeliverable", "calling_ae": peer.ae_title,
                                  "error": str(exc)}))
            return
        try:
            context = next(iter(link.contexts.values()), None)
            if context is None:
                raise AssociationRefused("storage commitment refused")
            message_id = link.next_message_id()
            link.send_message(context.context_id, {
                "CommandField": dimse.N_EVENT_REPORT_RQ, "MessageID": message_id,
                "AffectedSOPClassUID": STORAGE_COMMITMENT, "AffectedSOPInstanceUID": handlers.COMMITMENT_INSTANCE,
                "EventTypeID": event_type}, handlers.encode_dataset(report, context.transfer_syntax))
            link.response_to(message_id, dimse.N_EVENT_REPORT_RSP)
            link.release()
        except Exception as exc:  # noqa: BLE001 - said in the log; the caller may ask again
            LOG.error(json.dumps({"event": "commitment.undeliverable", "calling_ae": peer.ae_title,
                                  "error": str(exc)}))
            link.abort()

    # -- stopping ------------------------------------------------------------------------

    def serve_until_signalled(self, drain_seconds: float = 30.0, others: Sequence[Sibling] = ()) -> None:
        """Serve until SIGTERM or SIGINT, then drain. `others`: fronts beside this one (the
        DICOMweb server), started after it and drained side by side with it."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self._stopping.set())
        self.start()
        try:
            for other in others:
                other.start()
            self._stopping.wait()
        finally:
            stopping = [threading.Thread(target=other.stop, name="front-stop") for other in others]
            for thread in stopping:
                thread.start()
            self.stop(drain_seconds)
            for thread in stopping:
                thread.join()

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Stop accepting; wait for associations in flight, abort what is left after the drain time."""
        LOG.info(json.dumps({"event": "serve.stopping"}))
        self._stopping.set()
        if self._lobby_thread is not None:
            self._lobby_thread.join()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        deadline = time.monotonic() + drain_seconds
        while self._admission.active and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._associations_lock:
            left = list(self._associations.values())
        for thread, conn in left:
            try:
                conn.send([pdu.abort(pdu.ABORT_PROVIDER, 0)])
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            conn.close()
        for thread, _ in left:
            thread.join(5)
        self._refusals.flush(final=True)
        self._refusal_records.put(None)
        if self._recorder is not None:
            self._recorder.join()
        self._audit(event(EventID.APPLICATION_ACTIVITY, type=EventType.APPLICATION_STOP, op="serve",
                          ae_title=self.ae_title))
        LOG.info(json.dumps({"event": "serve.stopped"}))

