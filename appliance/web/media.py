"""Media types (RFC 9110): Content-Type and Accept as PS3.18 uses them, and DICOM JSON responses."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
MULTIPART = "multipart/related"


@dataclass(frozen=True)
class MediaType:
    kind: str  # "type/subtype", lower case
    params: dict[str, str] = field(default_factory=dict)  # lower-case names, unquoted values
    quality: float = 1.0


def parse(text: str) -> MediaType:
    """One media type with its parameters: `multipart/related; type="application/dicom"`."""
    kind, *params = _split(text, ";")
    values = {}
    for param in params:
        name, _, value = param.partition("=")
        values[name.strip().lower()] = value.strip().strip('"')
    quality = values.pop("q", "1")
    try:
        q = float(quality)
    except ValueError:
        q = 0.0
    return MediaType(kind.strip().lower(), values, q)


def accepted(header: str) -> list[MediaType]:
    """The media ranges of an Accept header, best first (an empty header accepts anything)."""
    ranges = [parse(item) for item in _split(header, ",") if item.strip()] or [parse("*/*")]
    return sorted((r for r in ranges if r.quality > 0), key=lambda r: -r.quality)


def _split(text: str, separator: str) -> list[str]:
    """Split on `separator` outside double quotes."""
    items: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return items


def base_url(request: Request, path: str) -> str:
    """The absolute URL of `path` on the server the request came to (for RetrieveURLs). A Host
    header without a port (dicomweb-client sends one) gets the port the request came in on."""
    scheme, host = request.url.scheme, request.headers.get("host") or request.url.netloc
    server = request.scope.get("server")
    default = 443 if scheme == "https" else 80
    if server and ":" not in host.rsplit("]", 1)[-1] and server[1] != default:
        host = f"{host}:{server[1]}"
    return f"{scheme}://{host}{path}"


def dicom_json(payload, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return Response(body, status, headers=headers, media_type=DICOM_JSON)
