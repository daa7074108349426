"""The DICOMweb front in `appliance serve`: uvicorn in a thread of the serve process.

`WebServer(archive, port=..., metrics=...)`: `start()` listens (dicomweb.bind_address,
dicomweb.port or the --dicomweb-port override; TLS when dicomweb.tls has a certificate,
client certificates checked against ca_certificates when required) and returns once it
does; `stop()` stops accepting, lets the requests in flight finish (a STOW-RS commits its
parts, a WADO-RS response goes to its end) for up to the drain time, then closes what is
left. The routes (PS3.18 under /dicom-web, WADO-URI at /wado, the viewer at /viewer) are
listed in ENDPOINTS with the role each needs.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time

import uvicorn

from appliance.audit.events import EventID, EventType, event
from appliance.errors import ConfigError
from appliance.observe.metrics import ServerMetrics
from appliance.store.archive import Archive
from appliance.web import qido, stow, wado
from appliance.web.app import BASE, Endpoint, WebFront, build
from appliance.web.viewer import VIEWER_DIR, Viewer

LOG = logging.getLogger("appliance.web")
_STUDY, _SERIES = BASE + "/studies/{study}", BASE + "/studies/{study}/series/{series}"
_INSTANCE = _SERIES + "/instances/{instance}"

ENDPOINTS = [
    Endpoint(BASE + "/studies", "POST", "STOW-RS", "store", stow.store),
    Endpoint(_STUDY, "POST", "STOW-RS", "store", stow.store),
    Endpoint(BASE + "/studies", "GET", "QIDO-RS studies", "query", qido.search("studies")),
    Endpoint(BASE + "/series", "GET", "QIDO-RS series", "query", qido.search("series")),
    Endpoint(BASE + "/instances", "GET", "QIDO-RS instances", "query", qido.search("instances")),
    Endpoint(_STUDY + "/series", "GET", "QIDO-RS series", "query", qido.search("series")),
    Endpoint(_STUDY + "/instances", "GET", "QIDO-RS instances", "query", qido.search("instances")),
    Endpoint(_SERIES + "/instances", "GET", "QIDO-RS instances", "query", qido.search("instances")),
    Endpoint(_STUDY, "GET", "WADO-RS instances", "retrieve", wado.instances),
    Endpoint(_SERIES, "GET", "WADO-RS instances", "retrieve", wado.instances),
    Endpoint(_INSTANCE, "GET", "WADO-RS instances", "retrieve", wado.instances),
    Endpoint(_STUDY + "/metadata", "GET", "WADO-RS metadata", "retrieve", wado.metadata),
    Endpoint(_SERIES + "/metadata", "GET", "WADO-RS metadata", "retrieve", wado.metadata),
    Endpoint(_INSTANCE + "/metadata", "GET", "WADO-RS metadata", "retrieve", wado.metadata),
    Endpoint(_INSTANCE + "/frames/{frames}", "GET", "WADO-RS frames", "retrieve", wado.frames),
    Endpoint(_INSTANCE + "/bulkdata/{path:path}", "GET", "WADO-RS bulkdata", "retrieve", wado.bulkdata),
    Endpoint(_INSTANCE + "/rendered", "GET", "WADO-RS rendered", "retrieve", wado.rendered),
    Endpoint(_INSTANCE + "/frames/{frames}/rendered", "GET", "WADO-RS rendered", "retrieve", wado.rendered),
    Endpoint("/wado", "GET", "WADO-URI", "retrieve", wado.wado_uri),
]


def _ssl_options(front: WebFront) -> dict:
    tls, config = front.settings.tls, front.archive.config
    if not tls.certificate:
        return {}
    options = {"ssl_certfile": str(config.resolve(tls.certificate)), "ssl_keyfile": str(config.resolve(tls.private_key)),
               "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE}
    if tls.ca_certificates:
        options["ssl_ca_certs"] = str(config.resolve(tls.ca_certificates))
    return options


class WebServer:
    def __init__(self, archive: Archive, *, port: int | None = None, metrics: ServerMetrics | None = None,
                 drain_seconds: int = 30):
        self.front = WebFront(archive, metrics or ServerMetrics())
        settings = self.front.settings
        self.port = port if port is not None else settings.port
        extra = Viewer(VIEWER_DIR, BASE).routes() if settings.viewer else []
        self.app = build(self.front, ENDPOINTS, extra)
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # our own JSON lines say it
        self._server = uvicorn.Server(uvicorn.Config(
            self.app, host=settings.bind_address, port=self.port, log_config=None, access_log=False,
            lifespan="off", http="httptools", server_header=False, timeout_graceful_shutdown=drain_seconds,
            **_ssl_options(self.front)))
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread = threading.Thread(target=self._server.run, name="dicomweb", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"DICOMweb cannot listen on {self.front.settings.bind_address}:{self.port}")
            time.sleep(0.02)
        tls = bool(self.front.settings.tls.certificate)
        LOG.info(json.dumps({"event": "dicomweb.started", "port": self.port, "tls": tls,
                             "viewer": self.front.settings.viewer}))
        self.front.audit(event(EventID.APPLICATION_ACTIVITY, type=EventType.APPLICATION_START, op="dicomweb",
                               port=self.port, tls=tls))

    def stop(self) -> None:
        """Stop accepting, drain the requests in flight, then return."""
        LOG.info(json.dumps({"event": "dicomweb.stopping"}))
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()
        self.front.refusals.flush(final=True)
        self.front.audit(event(EventID.APPLICATION_ACTIVITY, type=EventType.APPLICATION_STOP, op="dicomweb"))
        LOG.info(json.dumps({"event": "dicomweb.stopped"}))
