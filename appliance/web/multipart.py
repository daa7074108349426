"""multipart/related bodies (RFC 2046, RFC 2387) read and written as streams, pure.

Reading: `MultipartReader(boundary)` is fed the body in whatever pieces the socket
gives (`feed`) and hands back events: `Part(headers)` when a part's headers are
complete, its content as `bytes` pieces, `PartEnd()` at its closing delimiter. It
holds at most one piece plus a delimiter's length, never a whole part: a 2 GB
instance goes through in the pieces it came in. `close()` at the end of the body
raises MultipartError unless the closing delimiter was seen. A body whose boundary
is not the one the Content-Type names has no part: its bytes are all preamble.

Writing: `part_head(boundary, headers, first)` and `closing(boundary)` frame the
parts of a response; the content goes between them as it is read.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HEADER_BYTES = 16 << 10
# RFC 2046 allows 70 characters; some clients (Orthanc) use more.
MAX_BOUNDARY = 256


class MultipartError(ValueError):
    """The body is not a well-formed multipart body for its boundary."""


@dataclass(frozen=True)
class Part:
    """A part begins; `headers`: lower-case names to values."""

    headers: dict[str, str]


@dataclass(frozen=True)
class PartEnd:
    """The part that began last is complete."""


_PREAMBLE, _AFTER_DELIMITER, _HEADERS, _CONTENT, _DONE = range(5)


class MultipartReader:
    def __init__(self, boundary: str | bytes):
        boundary = boundary.encode("latin-1") if isinstance(boundary, str) else boundary
        if not 1 <= len(boundary) <= MAX_BOUNDARY:
            raise MultipartError(f"the boundary must be 1 to {MAX_BOUNDARY} characters")
        # The body starts with "--boundary" (no CRLF before the first delimiter): a CRLF is
        # put in front so that every delimiter is found the same way.
        self._delimiter = b"\r\n--" + boundary
        self._buffer = bytearray(b"\r\n")
        self._state = _PREAMBLE
        self.parts = 0

    def feed(self, data: bytes) -> list:
        """Events for `data` (the next bytes of the body)."""
        if self._state == _DONE:
            return []  # the epilogue is ignored
        self._buffer += data
        events: list = []
        while self._step(events):
            pass
        return events

    def close(self) -> None:
        """The body has ended: it must have ended with the closing delimiter."""
        if self._state != _DONE:
            if self.parts == 0 and self._state == _PREAMBLE:
                raise MultipartError("no part with the boundary the Content-Type names")
            raise MultipartError("the body ends before its closing boundary (truncated)")

    def _step(self, events: list) -> bool:
        """Advance once; False when more bytes are needed."""
        if self._state == _PREAMBLE:
            return self._skip_to_delimiter()
        if self._state == _AFTER_DELIMITER:
            return self._after_delimiter()
        if self._state == _HEADERS:
            return self._headers(events)
        if self._state == _CONTENT:
            return self._content(events)
        return False

    def _skip_to_delimiter(self) -> bool:
        at = self._buffer.find(self._delimiter)
        if at < 0:
            del self._buffer[:max(0, len(self._buffer) - len(self._delimiter) + 1)]
            return False
        del self._buffer[:at + len(self._delimiter)]
        self._state = _AFTER_DELIMITER
        return True

    def _after_delimiter(self) -> bool:
        """After a delimiter: "--" closes the body, else (optional spaces and) CRLF open a part."""
        if len(self._buffer) < 2:
            return False
        if self._buffer[:2] == b"--":
            self._state = _DONE
            self._buffer = bytearray()
            return False
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > 256:
                raise MultipartError("junk after a boundary")
            return False
        if self._buffer[:end].strip(b" \t"):
            raise MultipartError("junk after a boundary")
        del self._buffer[:end + 2]
        self._state = _HEADERS
        return True

    def _headers(self, events: list) -> bool:
        if self._buffer[:2] == b"\r\n":  # a part without headers
            head, rest = b"", 2
        else:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEADER_BYTES:
                    raise MultipartError("part headers too long")
                return False
            head, rest = bytes(self._buffer[:end]), end + 4
        del self._buffer[:rest]
        events.append(Part(_parse_headers(head)))
        self.parts += 1
        self._state = _CONTENT
        return True

    def _content(self, events: list) -> bool:
        at = self._buffer.find(self._delimiter)
        if at < 0:
            keep = len(self._delimiter) - 1
            if len(self._buffer) > keep:
                events.append(bytes(self._buffer[:len(self._buffer) - keep]))
                del self._buffer[:len(self._buffer) - keep]
            return False
        if at:
            events.append(bytes(self._buffer[:at]))
        del self._buffer[:at + len(self._delimiter)]
        events.append(PartEnd())
        self._state = _AFTER_DELIMITER
        return True


def _parse_headers(head: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n") if head else ():
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise MultipartError("malformed part header")
        headers[name.strip().lower()] = value.strip()
    return headers


def part_head(boundary: str, headers: dict[str, str], first: bool) -> bytes:
    """The delimiter and headers that come before a part's content."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (b"" if first else b"\r\n") + f"--{boundary}\r\n{lines}\r\n".encode("latin-1")


def closing(boundary: str) -> bytes:
    return f"\r\n--{boundary}--\r\n".encode("latin-1")
