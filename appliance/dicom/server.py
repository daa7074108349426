"""`appliance serve`: the DICOM front, wired from pynetdicom parts.

- Verification; Storage for every storage SOP class pydicom knows (retired ones
  included; any SOP class when `dicom.allow_unknown_sop_classes`), each with
  every transfer syntax: stored as received, never transcoded.
- Patient Root and Study Root Query/Retrieve: FIND (handlers.py, query.py),
  GET and MOVE (retrieve.py, served by the association subclass below).
- Calling AE titles checked against the registry (registry.py) at association
  time, re-read when the file changes; roles checked per service.
- Received datasets are written by pynetdicom straight to a directory on the
  data volume (`HOME/hot/.receive-<pid>`), large PDUs, TCP_NODELAY on every
  socket, optional TLS.
- SIGTERM/SIGINT: stop accepting, let the associations in flight finish (every
  C-STORE that was answered Success is durable already), then exit.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from pydicom._uid_dict import UID_dictionary
from pynetdicom import AE, _config, build_context, evt, register_uid
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelFind,
                                  PatientRootQueryRetrieveInformationModelGet,
                                  PatientRootQueryRetrieveInformationModelMove,
                                  StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove, StorageCommitmentPushModel,
                                  Verification)
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from appliance import audit, health, registry
from appliance.audit import AuditError
from appliance.config import Config
from appliance.dicom import handlers
from appliance.dicom.query import PATIENT_ROOT, STUDY_ROOT
from appliance.dicom.reactor import EventDrivenAssociation, EventDrivenDUL, make_event_driven, use_bulk_socket
from appliance.dicom.retrieve import RetrieveService
from appliance.errors import ConfigError, TierUnavailable
from appliance.metrics import MetricsEndpoint, ServerMetrics
from appliance.store.archive import Archive

LOG = logging.getLogger("appliance.dicom")
_NOT_DICOM_ENCODINGS = ("1.2.840.10008.1.2.6.", "1.2.840.10008.1.2.7.", "1.2.840.10008.1.20")
FIRST_TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"]
_MODELS = {
    PatientRootQueryRetrieveInformationModelFind: PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelGet: PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelMove: PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind: STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelGet: STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelMove: STUDY_ROOT,
}
# pynetdicom treats an empty list as "anyone": with nobody registered, require a title nobody can guess.
_NOBODY = secrets.token_hex(8).upper()


def storage_sop_classes() -> list[str]:
    """Every storage SOP class pydicom knows, retired ones included; pynetdicom is told about
    those it does not know itself (real archives hold retired classes such as old ultrasound)."""
    uids = sorted(uid for uid, entry in UID_dictionary.items()
                  if entry[1] == "SOP Class" and "Storage" in entry[0] and "Commitment" not in entry[0])
    for uid in uids:
        if uid_to_service_class(uid) is not StorageServiceClass:
            register_uid(uid, UID_dictionary[uid][4] or f"Storage{uid.replace('.', '_')}", StorageServiceClass)
    return uids


def transfer_syntaxes() -> list[str]:
    """Every transfer syntax, the uncompressed ones first (the acceptor picks in this order)."""
    others = sorted(uid for uid, entry in UID_dictionary.items()
                    if entry[1] == "Transfer Syntax" and uid not in FIRST_TRANSFER_SYNTAXES
                    and not uid.startswith(_NOT_DICOM_ENCODINGS))
    return FIRST_TRANSFER_SYNTAXES + others


class _SendWindow(queue.Queue):
    """The DUL's outgoing PDU queue, bounded: pynetdicom queues every PDU of a message at once,
    so sending a 2 GB instance to a slow peer would hold it all in memory. With a window the
    sender waits for the wire instead. Should the DUL die, it stops waiting."""

    def __init__(self, dul, pdus: int = 32):
        super().__init__(maxsize=pdus)
        self._dul = dul

    def put(self, item, block=True, timeout=None) -> None:
        while True:
            try:
                super().put(item, timeout=0.5)
                if isinstance(self._dul, EventDrivenDUL):
                    self._dul.wake()
                return
            except queue.Full:
                if not self._dul.is_alive() or self._dul._kill_thread:
                    with self.mutex:  # nobody drains it any more: do not block forever
                        self._put(item)
                        self.unfinished_tasks += 1
                        self.not_empty.notify()
                    return


def bound_send_queue(assoc: Association) -> None:
    """Install the send window; only while nothing is queued (before start, or between messages)."""
    if assoc.dul.to_provider_queue.empty():
        assoc.dul.to_provider_queue = _SendWindow(assoc.dul)


class _SupportedContexts(list):
    """The server's supported presentation contexts. pynetdicom deep-copies them for every
    association; with every storage SOP class times every transfer syntax that took ~110 ms
    of CPU (holding the GIL) per association. The contexts' only mutable part is their
    transfer syntax list (UIDs are immutable strings): copying that is enough."""

    def __deepcopy__(self, memo) -> list:
        copies = []
        for context in self:
            twin = copy.copy(context)
            twin._transfer_syntax = list(context._transfer_syntax)
            copies.append(twin)
        return copies


class _ArchiveAssociation(EventDrivenAssociation):
    """An acceptor association that serves C-GET and C-MOVE with the archive's retrieve service."""

    retrieve_service: RetrieveService
    server_metrics: ServerMetrics

    def _serve_request(self, msg, context_id: int) -> None:
        context = self._accepted_cx.get(context_id)
        if not isinstance(msg, (C_GET, C_MOVE)) or context is None or self._sent_release:
            super()._serve_request(msg, context_id)
            return
        # Same bookkeeping pynetdicom does around its own service classes.
        self.dimse.cancel_req = {}
        self._is_paused = True
        started, status = time.perf_counter(), None
        try:
            status = self.retrieve_service.serve(self, msg, context)
        finally:
            self._is_paused = False
            self.dimse.cancel_req = {}
            self.server_metrics.observe("c-get" if isinstance(msg, C_GET) else "c-move",
                                        time.perf_counter() - started,
                                        "failure" if status is None else handlers.outcome(status))


class _RequestHandler(RequestHandler):
    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # pynetdicom builds the acceptor itself; only its class changes (no new state), so that
        # C-GET/C-MOVE reach RetrieveService instead of pynetdicom's Dataset-based service.
        assoc.__class__ = _ArchiveAssociation
        assoc.retrieve_service = self.server.retrieve_service
        assoc.server_metrics = self.server.server_metrics
        make_event_driven(assoc)
        bound_send_queue(assoc)
        return assoc


def _nodelay(sock: socket.socket | None) -> None:
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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


class _AuditedServer(ThreadedAssociationServer):
    """pynetdicom's server, with failed TLS handshakes reported (pynetdicom drops them silently)."""

    on_handshake_failure: Callable[[tuple, Exception], None]

    def get_request(self):
        client, address = self.socket.accept()
        if self.ssl_context:
            try:
                client = self.ssl_context.wrap_socket(client, server_side=True)
            except OSError as exc:  # ssl.SSLError included; socketserver drops the connection
                client.close()
                # A peer that hangs up without a word (a port probe) attempted nothing to audit.
                if not isinstance(exc, (ssl.SSLEOFError, ConnectionError)):
                    self.on_handshake_failure(address, exc)
                raise
        return client, address


class DicomServer:
    def __init__(self, archive: Archive, *, port: int | None = None, ae_title: str | None = None):
        self.archive = archive
        self.config = archive.config
        settings = self.config.appliance.dicom
        self.ae_title = ae_title or settings.ae_title
        self.port = port if port is not None else settings.port
        self._registry_path = self.config.remote_aes_path
        self._registry: dict[str, registry.RemoteAE] = {}
        self._registry_mtime = None
        self._stats: dict[int, handlers.AssociationStats] = {}
        self._stats_lock = threading.Lock()
        self._stopping = threading.Event()
        self.metrics = ServerMetrics()
        self.metrics_endpoint: MetricsEndpoint | None = None
        self.ae = self._build_ae()
        self._reload_registry()
        self.server: ThreadedAssociationServer | None = None
        self.receive_dir = self.config.resolve(self.config.hot_tier.path) / f".receive-{os.getpid()}"

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
            self.archive.audit.note_config_changes(self.config.files())
        self._registry_mtime = mtime
        allow_unknown = self.config.appliance.dicom.allow_unknown_callers
        self.ae.require_calling_aet = [] if allow_unknown else (sorted(self._registry) or [_NOBODY])

    def authorise(self, assoc, role: str) -> bool:
        remote = self._registry.get(assoc.requestor.ae_title.strip())
        if remote is None:
            return self.config.appliance.dicom.allow_unknown_callers and role != "move-destination"
        return remote.can(role)

    def move_destination(self, ae_title: str) -> tuple[str, int] | None:
        remote = self._registry.get(ae_title)
        if remote is None or not remote.can("move-destination"):
            return None
        return remote.host, remote.port

    def open_association(self, host: str, port: int, ae_title: str, contexts) -> Association | None:
        assoc = self.ae.associate(host, port, contexts=contexts, ae_title=ae_title,
                                  max_pdu=self.config.appliance.dicom.max_pdu_kb << 10)
        if assoc.is_established:
            _nodelay(assoc.dul.socket.socket if assoc.dul.socket else None)
            use_bulk_socket(assoc)
            bound_send_queue(assoc)
        return assoc

    def model_of(self, sop_class_uid: str) -> str:
        return _MODELS[str(sop_class_uid)]

    def stats_of(self, assoc) -> handlers.AssociationStats:
        with self._stats_lock:
            stats = self._stats.get(id(assoc))
            if stats is None:
                stats = self._stats[id(assoc)] = handlers.AssociationStats(
                    assoc.requestor.ae_title.strip(), str(assoc.requestor.address), totals=self.metrics)
            return stats

    # -- wiring --------------------------------------------------------------------------

    def _build_ae(self) -> AE:
        settings = self.config.appliance.dicom
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = settings.max_pdu_kb << 10
        ae.maximum_associations = settings.max_associations
        ae.require_called_aet = not settings.allow_any_called_ae_title
        ae.network_timeout = 60
        ae.dimse_timeout = 120
        syntaxes = transfer_syntaxes()
        ae.add_supported_context(Verification)
        for sop_class in storage_sop_classes():
            # SCU and SCP roles: SCP for C-STORE to us, SCU for C-GET sub-operations to the caller.
            ae.add_supported_context(sop_class, syntaxes, scu_role=True, scp_role=True)
        for sop_class in _MODELS:
            ae.add_supported_context(sop_class, FIRST_TRANSFER_SYNTAXES)
        ae.add_supported_context(StorageCommitmentPushModel, FIRST_TRANSFER_SYNTAXES, scu_role=True,
                                 scp_role=True)
        ae.add_requested_context(Verification)
        return ae

    def _handlers(self) -> list:
        return [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_C_ECHO, self.metrics.timed("c-echo", handlers.handle_echo, handlers.outcome)),
            (evt.EVT_C_STORE, self.metrics.timed("c-store", handlers.handle_store, handlers.outcome),
             [self.archive, self.authorise, self.stats_of]),
            (evt.EVT_C_FIND, self._timed_find, [self.archive, self.model_of, self.authorise,
                                                self.stats_of, self.ae_title]),
            (evt.EVT_N_ACTION, self.metrics.timed("n-action", handlers.handle_commitment,
                                                  lambda result: handlers.outcome(result[0])),
             [self.archive, self.authorise, self.send_commitment_report]),
        ]

    def _timed_find(self, event, *args):
        """handle_find (a generator), timed until its last response."""
        started, result = time.perf_counter(), "success"
        try:
            for status, identifier in handlers.handle_find(event, *args):
                if (status if isinstance(status, int) else status.Status) not in (0xFF00, 0xFF01):
                    result = handlers.outcome(status)
                yield status, identifier
        except Exception:
            result = "failure"
            raise
        finally:
            self.metrics.observe("c-find", time.perf_counter() - started, result)

    def send_commitment_report(self, assoc, request) -> None:
        """Send the N-EVENT-REPORT: on the requester's association while it is open, else to its
        registered address (a new association where we take the SCP role)."""
        event_type, report = handlers.commitment_result(self.archive, request)
        # Wait until pynetdicom has sent the N-ACTION response and left the service.
        deadline = time.monotonic() + 10
        while assoc.is_established and assoc._is_paused and time.monotonic() < deadline:
            time.sleep(0.001)
        if assoc.is_established:
            status, _ = assoc.send_n_event_report(report, event_type, StorageCommitmentPushModel,
                                                  handlers.COMMITMENT_INSTANCE)
            if getattr(status, "Status", None) == 0x0000:
                return
        remote = self._registry.get(assoc.requestor.ae_title.strip())
        if remote is None:
            LOG.error(json.dumps({"event": "commitment.undeliverable", "calling_ae": assoc.requestor.ae_title}))
            return
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid, role.scu_role, role.scp_role = StorageCommitmentPushModel, False, True
        other = self.ae.associate(remote.host, remote.port, contexts=[build_context(StorageCommitmentPushModel)],
                                  ae_title=remote.ae_title, ext_neg=[role])
        if other.is_established:
            other.send_n_event_report(report, event_type, StorageCommitmentPushModel, handlers.COMMITMENT_INSTANCE)
            other.release()
        else:
            LOG.error(json.dumps({"event": "commitment.undeliverable", "calling_ae": remote.ae_title}))

    def _on_connection(self, event) -> None:
        _nodelay(event.assoc.dul.socket.socket)
        self._reload_registry()

    def _audit(self, entry: dict) -> None:
        """Record from a notification handler (pynetdicom would only log an exception)."""
        try:
            self.archive.audit.record(entry)
        except AuditError as exc:
            LOG.error(json.dumps({"event": "audit.failed", "error": str(exc)}))

    def _on_accepted(self, event) -> None:
        self.metrics.add("associations_total", outcome="accepted")
        assoc = event.assoc
        tls = isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
        peer = assoc.dul.socket.socket.getpeercert() if tls else None
        subject = ", ".join(f"{k}={v}" for rdn in (peer or {}).get("subject", ()) for k, v in rdn)
        self._audit(audit.event("User Authentication", type="Login", op="association", **handlers.requestor(assoc),
                                called_ae=str(assoc.acceptor.ae_title).strip(), tls=tls, certificate=subject))

    def _on_rejected(self, event) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.ae_title).strip()
        called = str(assoc.requestor.primitive.called_ae_title).strip()
        if self.ae.require_calling_aet and calling not in self.ae.require_calling_aet:
            reason = "calling AE title not registered"
        elif self.ae.require_called_aet and called != self.ae_title:
            reason = f"called AE title {called!r} is not this archive's"
        else:
            reason = "too many associations"
        self.metrics.add("associations_total", outcome="rejected")
        LOG.warning(json.dumps({"event": "association.rejected", "calling_ae": calling, "called_ae": called,
                                "address": str(assoc.requestor.address), "reason": reason}))
        self._audit(audit.event("Security Alert", type="Node Authentication", op="association", outcome=4,
                                called_ae=called, reason=reason, **handlers.requestor(assoc)))

    def _on_handshake_failure(self, address: tuple, exc: Exception) -> None:
        self.metrics.add("associations_total", outcome="rejected")
        reason = f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}"
        LOG.warning(json.dumps({"event": "association.rejected", "address": address[0], "reason": reason}))
        self._audit(audit.event("Security Alert", type="Node Authentication", op="association", outcome=4,
                                user="-", host=str(address[0]), reason=reason))

    def _on_ended(self, event) -> None:
        with self._stats_lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        LOG.info(json.dumps({"event": "association.ended", "calling_ae": stats.calling_ae,
                             "address": stats.address, "services": sorted(stats.services),
                             "stored": stats.stored, "duplicates": stats.duplicates, "failed": stats.failed,
                             "bytes": stats.bytes, "queries": stats.queries, "retrieved": stats.retrieved,
                             "seconds": round(time.monotonic() - stats.started, 3),
                             "aborted": event.event.name == "EVT_ABORTED"}))

    def start(self) -> ThreadedAssociationServer:
        """Start serving in background threads; returns the server."""
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.STORE_SEND_CHUNKED_DATASET = True
        _config.UNRESTRICTED_STORAGE_SERVICE = self.config.appliance.dicom.allow_unknown_sop_classes
        # pynetdicom logs query and retrieve identifiers (patient names) otherwise: PHI stays out of logs.
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        if not self.receive_dir.parent.is_dir():
            raise TierUnavailable(f"the hot tier {self.receive_dir.parent} is not there (disk not mounted?): "
                                  "not serving until it is")
        self._sweep_receive_dirs()
        self.receive_dir.mkdir(exist_ok=True)
        # pynetdicom writes received datasets with NamedTemporaryFile: keep them on the data volume.
        tempfile.tempdir = str(self.receive_dir)
        self.server = self.ae.make_server(
            (self.config.appliance.dicom.bind_address, self.port), ae_title=self.ae_title,
            ssl_context=_tls_context(self.config), evt_handlers=self._handlers(),
            server_class=_AuditedServer, request_handler=_RequestHandler)
        self.server.contexts = _SupportedContexts(self.server.contexts)
        self.server.on_handshake_failure = self._on_handshake_failure
        self.server.server_metrics = self.metrics
        self.server.retrieve_service = RetrieveService(self.archive, self.model_of, self.authorise,
                                                       self.move_destination, self.open_association,
                                                       self.stats_of)
        self.ae._servers.append(self.server)
        threading.Thread(target=self.server.serve_forever, name="dicom-listener", daemon=True).start()
        settings = self.config.appliance.metrics
        if settings.port:
            self.metrics_endpoint = MetricsEndpoint(settings.bind_address, settings.port, self.metrics,
                                                    lambda: health.status(self.archive, time.time()))
            self.metrics_endpoint.start()
        LOG.info(json.dumps({"event": "serve.started", "ae_title": self.ae_title, "port": self.port,
                             "tls": self.server.ssl_context is not None}))
        self.archive.audit.note_config_changes(self.config.files())
        self.archive.audit.record(audit.event("Application Activity", type="Application Start", op="serve",
                                              ae_title=self.ae_title, port=self.port,
                                              tls=self.server.ssl_context is not None))
        return self.server

    def _sweep_receive_dirs(self) -> None:
        """Remove receive directories of server processes that are gone (killed mid-receive)."""
        for path in self.receive_dir.parent.glob(".receive-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(path, ignore_errors=True)

    def serve_until_signalled(self, drain_seconds: float = 30.0) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self._stopping.set())
        self.start()
        self._stopping.wait()
        self.stop(drain_seconds)

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Stop accepting; wait for associations in flight, abort what is left after the drain time."""
        LOG.info(json.dumps({"event": "serve.stopping"}))
        if self.server is not None:
            self.server.shutdown()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        deadline = time.monotonic() + drain_seconds
        # Associations still negotiating (or half-open peers) hold no work worth waiting for.
        while any(a.is_established for a in self.ae.active_associations) and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            assoc.abort()
        shutil.rmtree(self.receive_dir, ignore_errors=True)
        self._audit(audit.event("Application Activity", type="Application Stop", op="serve", ae_title=self.ae_title))
        LOG.info(json.dumps({"event": "serve.stopped"}))
