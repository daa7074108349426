"""The multipart reader: whatever pieces the body comes in, the same parts; what is not a
well-formed body for its boundary is refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.web.multipart import MultipartError, MultipartReader, Part, PartEnd, closing, part_head


def body_of(parts: list[bytes], boundary: str, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    return preamble + b"".join(part_head(boundary, {"Content-Type": "application/dicom"}, n == 0) + part
                               for n, part in enumerate(parts)) + closing(boundary) + epilogue


def read(body: bytes, boundary: str, cuts: list[int]) -> list[tuple[dict, bytes]]:
    reader = MultipartReader(boundary)
    events = []
    for start, end in zip([0] + cuts, cuts + [len(body)]):
        events += reader.feed(body[start:end])
    reader.close()
    parts = []
    for event in events:
        if isinstance(event, Part):
            parts.append((event.headers, bytearray()))
        elif isinstance(event, PartEnd):
            parts[-1] = (parts[-1][0], bytes(parts[-1][1]))
        else:
            parts[-1][1].extend(event)
    return parts


BOUNDARY = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789'()+_,-./:=?", min_size=1, max_size=70)
# Contents made of the boundary's own pieces, CRLFs and dashes: the cases a reader gets wrong.
CONTENT = st.lists(st.sampled_from([b"\r\n", b"--", b"-", b"\r", b"\n", b"DICM", b"\x00\xff", b"a"]),
                   max_size=40).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(boundary=BOUNDARY, parts=st.lists(CONTENT, min_size=1, max_size=4), data=st.data())
def test_any_chunking_gives_the_same_parts(boundary, parts, data):
    parts = [p for p in parts if f"\r\n--{boundary}".encode() not in b"\r\n" + p + b"\r\n"] or [b"x"]
    body = body_of(parts, boundary, preamble=b"ignored preamble\r\n", epilogue=b"\r\nignored epilogue")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=12)))
    got = read(body, boundary, cuts)
    assert [content for _, content in got] == parts
    assert all(headers == {"content-type": "application/dicom"} for headers, _ in got)


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(CONTENT.filter(lambda p: b"--b" not in p), min_size=1, max_size=3), data=st.data())
def test_a_truncated_body_is_refused_wherever_it_stops(parts, data):
    body = body_of(parts, "b")
    stop = data.draw(st.integers(0, len(body) - len(b"--\r\n") - 1))
    with pytest.raises(MultipartError):
        read(body[:stop], "b", [])


def test_a_body_with_another_boundary_has_no_part():
    with pytest.raises(MultipartError, match="no part"):
        read(body_of([b"data"], "theirs"), "ours", [])


def test_junk_after_a_boundary_and_endless_headers_are_refused():
    with pytest.raises(MultipartError):
        read(b"--b junk\r\n\r\nx\r\n--b--", "b", [])
    reader = MultipartReader("b")
    with pytest.raises(MultipartError, match="too long"):
        reader.feed(b"--b\r\n" + b"X: " + b"y" * 20000)


def test_a_part_is_never_held_whole():
    reader = MultipartReader("b")
    reader.feed(b"--b\r\n\r\n")
    held = [len(piece) for _ in range(100) for piece in reader.feed(b"z" * 65536) if isinstance(piece, bytes)]
    assert sum(held) >= 100 * 65536 - 10 and max(held) <= 65536 + 10
