"""The DICOMweb front's ASGI app: routes, bearer tokens, one log line and metrics per request.

Every route needs `Authorization: Bearer TOKEN` (tokens.py) and a role: store for STOW-RS,
query for QIDO-RS, retrieve for WADO-RS and WADO-URI. No token or a wrong one: 401, audited
like a refused association (one record per address and reason per minute, the first at
once, the rest counted, so a flood cannot fill the trail); a token without the role: 403,
audited. The OHIF viewer's files (no patient data) need no token: the viewer sends its
token (`/viewer/...?token=TOKEN`) with every DICOMweb request it makes.

Blocking work (the index, sealing, decrypting, the trail) runs in worker threads; the
event loop only moves bytes. Each request ends in one JSON log line on stderr (route
template, status, seconds, token name: no UID, no patient data) and in the Prometheus
counters: requests_total and request_duration_seconds by service, http_responses_total by
route and status.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from anyio import to_thread
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from appliance.audit.events import AuditError, EventID, EventType, event
from appliance.audit.refusals import Refusals
from appliance.errors import (ApplianceError, CartridgeOffline, IntegrityError, NotFound, TierUnavailable,
                              TranscodeError)
from appliance.observe.metrics import ServerMetrics
from appliance.security.tokens import Token, TokenFile
from appliance.store.archive import Archive
from appliance.web.cache import MetadataCache

LOG = logging.getLogger("appliance.web")
BASE = "/dicom-web"
SOURCE = "DICOMweb"  # the archive's `source` of what STOW-RS stores, and the audit records' channel
REFUSALS_INTERVAL_S = 60.0
RETRY_AFTER_S = 60
# Instance metadata (DICOM JSON) kept for the next request: ~10,000 CT instances.
METADATA_CACHE_BYTES = 32 << 20


class HttpError(Exception):
    """Answer the request with `status` and a one-line reason."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status, self.headers = status, headers or {}

    def response(self) -> Response:
        return PlainTextResponse(str(self) + "\n", self.status, headers=self.headers)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the token's name is the user of its audit records."""

    token: Token
    address: str

    def who(self) -> dict:
        return {"user": self.token.name, "host": self.address, "source": SOURCE}


def run(fn, *args):
    """`fn(*args)` in a worker thread."""
    return to_thread.run_sync(fn, *args)


class WebFront:
    """What every request needs: the archive, the tokens, the counters, the refusals, the
    instance metadata computed lately."""

    def __init__(self, archive: Archive, metrics: ServerMetrics):
        self.archive = archive
        self.settings = archive.config.appliance.dicomweb
        self.metrics = metrics
        self.tokens = TokenFile(archive.config.tokens_path)
        self.refusals = Refusals(self.audit, REFUSALS_INTERVAL_S)
        self.metadata = MetadataCache(METADATA_CACHE_BYTES)

    def audit(self, entry: dict) -> None:
        """Record from a request (a failing trail is said in the log; the request goes on only
        where it needs no record: STOW-RS commits each part with its record)."""
        try:
            self.archive.audit.record(entry)
        except AuditError as exc:
            LOG.error(json.dumps({"event": "audit.failed", "error": str(exc)}))

    def _refused(self, address: str, reason: str) -> None:
        self.refusals.flush()
        self.refusals.note(address, reason, op="dicomweb")

    async def authorise(self, request: Request, role: str, service: str) -> Caller:
        address = request.client.host if request.client else "-"
        scheme, _, secret = request.headers.get("authorization", "").partition(" ")
        token = self.tokens.find(secret.strip()) if scheme.lower() == "bearer" and secret.strip() else None
        if token is None:
            await run(self._refused, address, "wrong bearer token" if secret.strip() else "no bearer token")
            raise HttpError(401, "a bearer token is needed: Authorization: Bearer TOKEN",
                            {"WWW-Authenticate": 'Bearer realm="pacs-vault"'})
        caller = Caller(token, address)
        if not token.may(role):
            await run(self.audit, event(EventID.SECURITY_ALERT, type=EventType.USE_OF_RESTRICTED_FUNCTION,
                                        op=service, outcome=4, reason=f"token has no {role} role", **caller.who()))
            raise HttpError(403, f"this token has no {role} role")
        return caller

    def observe(self, service: str, route: str, method: str, status: int, seconds: float, user: str) -> None:
        outcome = ("success" if status < 300 and status != 202 else "warning" if status == 202
                   else "refused" if status in (401, 403) else "failure")
        self.metrics.observe(service, seconds, outcome)
        self.metrics.add("http_responses_total", route=route, status=str(status))
        LOG.info(json.dumps({"event": "http", "service": service, "method": method, "route": route,
                             "status": status, "seconds": round(seconds, 4), "user": user}))


def error_response(exc: ApplianceError) -> Response:
    """The HTTP answer to an error of the archive."""
    if isinstance(exc, NotFound):
        return HttpError(404, str(exc)).response()
    if isinstance(exc, CartridgeOffline):
        return HttpError(503, f"the study is on tape cartridge {exc.label}, which is not loaded: {exc}",
                         {"Retry-After": str(RETRY_AFTER_S)}).response()
    if isinstance(exc, TierUnavailable):
        return HttpError(503, str(exc), {"Retry-After": str(RETRY_AFTER_S)}).response()
    if isinstance(exc, TranscodeError):
        return HttpError(406, str(exc)).response()
    if isinstance(exc, AuditError):
        return HttpError(503, "the audit trail cannot be written", {"Retry-After": str(RETRY_AFTER_S)}).response()
    if isinstance(exc, IntegrityError):
        LOG.error(json.dumps({"event": "http.integrity", "error": str(exc)}))
    return HttpError(500, str(exc)).response()


Handler = Callable[[WebFront, Request, Caller], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    """One route: its template, method, service name (metrics), role and handler."""

    path: str
    method: str
    service: str
    role: str
    handler: Handler

    def route(self, front: WebFront) -> Route:
        async def endpoint(request: Request) -> Response:
            started, user = time.monotonic(), "-"
            try:
                caller = await front.authorise(request, self.role, self.service)
                user = caller.token.name
                response = await self.handler(front, request, caller)
            except HttpError as exc:
                response = exc.response()
            except ApplianceError as exc:
                response = error_response(exc)
            except ClientDisconnect:
                response = Response(status_code=499)  # nobody reads it: for the log and the metrics
            front.observe(self.service, self.path, self.method, response.status_code,
                          time.monotonic() - started, user)
            return response
        return Route(self.path, endpoint, methods=[self.method], name=f"{self.method} {self.path}")


def build(front: WebFront, endpoints: list[Endpoint], extra_routes: list) -> Starlette:
    middleware = []
    if front.settings.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(front.settings.cors_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type",
                                                                                    "Accept"],
                                     expose_headers=["Warning", "Retry-After", "Content-Location"]))
    return Starlette(routes=[e.route(front) for e in endpoints] + extra_routes, middleware=middleware)
