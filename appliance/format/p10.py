"""Reading a received DICOM instance just enough to index it, never re-encoding it.

An `Inspector` is fed the Part 10 bytes as they arrive (PDV by PDV from a C-STORE,
chunk by chunk from a file) and keeps nothing but element headers and a few short
values:
  1. the framing: every data element, sequence, item and pixel-data fragment is
     walked by its declared length, so a truncated or malformed instance is
     rejected (pydicom alone reads a truncated file without complaint); a deflated
     data set is inflated on the way and walked the same;
  2. the attributes the index and C-FIND need: their elements are taken during the
     walk and converted with pydicom's element converter;
  3. while it walks, what the sealer needs to start (the study, 16-bit pixels or not).
`inspect(path)` does the same for a file and adds its content address (SHA-256).
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator

from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.tag import BaseTag
from pydicom.uid import UID

from appliance.errors import InvalidInstance

_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_ITEM, _ITEM_END, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
_PIXEL_DATA = (0x7FE0, 0x0010)
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_EXPLICIT_LE, _IMPLICIT_LE, _EXPLICIT_BE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
_DEFLATED = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"}
READ_SIZE = 1 << 20

# Attributes kept in the index, by level (see index.py for the schema).
PATIENT_KEYS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "IssuerOfPatientID")
STUDY_KEYS = ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
              "StudyDescription", "ReferringPhysicianName", "PatientAge", "InstitutionName")
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate",
               "SeriesTime", "BodyPartExamined")
INSTANCE_KEYS = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames",
                 "ContentDate", "ContentTime")
# (group, element) -> keyword of every element inspect() reads: the index attributes, what
# decodes them, and the file meta's UIDs (used when the dataset lacks its own).
_KEPT = {(tag >> 16, tag & 0xFFFF): keyword for keyword, tag in (
    (kw, tag_for_keyword(kw)) for kw in (*PATIENT_KEYS, *STUDY_KEYS, *SERIES_KEYS, *INSTANCE_KEYS,
                                         "SpecificCharacterSet", "BitsAllocated", "MediaStorageSOPClassUID",
                                         "MediaStorageSOPInstanceUID"))}
_KEPT_VR = {tag: dictionary_VR((tag[0] << 16) | tag[1]) for tag in _KEPT}  # for implicit VR data sets
_CHARSET = (0x0008, 0x0005)
_STUDY_UID = (0x0020, 0x000D)
_BITS_ALLOCATED = (0x0028, 0x0100)
# A kept attribute longer than this is not captured (it cannot be one: they are short
# strings), so a declared length from the peer never becomes an allocation.
_KEPT_MAX = 1 << 16


@dataclass
class InstanceInfo:
    content_address: bytes
    length: int
    transfer_syntax: str
    has_file_meta: bool
    patient: dict = field(default_factory=dict)
    study: dict = field(default_factory=dict)
    series: dict = field(default_factory=dict)
    instance: dict = field(default_factory=dict)
    specific_character_set: str = ""
    bits_allocated: int = 0  # of the pixel data (0: none or unknown)

    @property
    def study_uid(self) -> str:
        return self.study["StudyInstanceUID"]

    @property
    def series_uid(self) -> str:
        return self.series["SeriesInstanceUID"]

    @property
    def sop_uid(self) -> str:
        return self.instance["SOPInstanceUID"]

    @property
    def compressible(self) -> bool:
        """False when the pixel data is already compressed (encapsulated or deflated)."""
        try:
            return not UID(self.transfer_syntax).is_compressed
        except ValueError:  # a private transfer syntax: let the compression probe decide
            return True


class _Skip:
    """A request of the walk: pass over `n` bytes without keeping them."""

    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n


class _Peek:
    """A request of the walk: look at up to `n` bytes without consuming them (fewer at the end)."""

    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n


class _Walk:
    """Drives a walk (a generator) over bytes fed in any pieces.

    The generator yields its requests: an int n (the next n bytes; it is sent None when
    the input ends first), _Skip(n) or _Peek(n). Skipped bytes are never buffered, so a
    gigabyte of pixel data passes through without a copy; only element headers and
    the values the walk keeps are. `rest()`: what was fed past the walk's end."""

    def __init__(self, walk, *, trailing_ok: bool = False):
        self._walk = walk
        self._trailing_ok = trailing_ok
        self._buffer = bytearray()
        self._offset = 0
        self._skip = 0
        self._ended = False
        self.result = None
        self.done = False
        self._request = None
        self._advance(None, first=True)

    def feed(self, data) -> None:
        view = memoryview(data)
        if self._skip and self._offset == len(self._buffer):
            take = min(self._skip, len(view))
            self._skip -= take
            view = view[take:]
            if not self._skip:
                self._advance(None)
        if len(view):
            if self.done and not self._trailing_ok:
                raise InvalidInstance("malformed: bytes after the end of the data set")
            if self._offset == len(self._buffer):
                self._buffer, self._offset = view, 0  # walked in place; only a remainder is copied
            else:
                self._buffer = bytearray(self._buffer[self._offset:]) + view
                self._offset = 0
        self._run()
        if isinstance(self._buffer, memoryview) and not self.done:  # the caller's bytes: keep a copy of the rest
            self._buffer, self._offset = bytearray(self._buffer[self._offset:]), 0

    def finish(self):
        self._ended = True
        self._run()
        if not self.done:
            raise InvalidInstance("truncated: the data ends inside a data element")
        return self.result

    def rest(self):
        """What was fed past the end of the walk (a view: use it before the next feed)."""
        return self._buffer[self._offset:]

    def _advance(self, reply, first: bool = False) -> None:
        while True:
            try:
                request = next(self._walk) if first else self._walk.send(reply)
            except StopIteration as stop:
                self.done, self.result, self._request = True, stop.value, None
                return
            first, reply = False, None
            if type(request) is not _Skip:
                self._request = request
                return
            if request.n:
                self._skip, self._request = request.n, None
                return

    def _run(self) -> None:
        while not self.done:
            available = len(self._buffer) - self._offset
            if self._skip:
                take = min(self._skip, available)
                self._offset += take
                self._skip -= take
                if self._skip:
                    if self._ended:
                        raise InvalidInstance("truncated: a data element runs past the end of the data")
                    return
                self._advance(None)
                continue
            request = self._request
            if type(request) is int:
                if available < request and not self._ended:
                    return
                reply = None
                if available >= request:
                    reply = bytes(self._buffer[self._offset:self._offset + request])
                    self._offset += request
            else:  # _Peek
                if available < request.n and not self._ended:
                    return
                reply = bytes(self._buffer[self._offset:self._offset + request.n])
            self._advance(reply)
        if len(self._buffer) > self._offset and not self._trailing_ok:
            raise InvalidInstance("malformed: bytes after the end of the data set")


def _need(data: bytes | None) -> bytes:
    if data is None:
        raise InvalidInstance("truncated: the data ends inside a data element")
    return data


class _Elements:
    """The element framing of one byte order and VR encoding."""

    def __init__(self, little: bool, explicit: bool):
        self.little, self.explicit = little, explicit
        self._pair = struct.Struct("<HH" if little else ">HH")
        self._u32 = struct.Struct("<I" if little else ">I")
        self._u16 = struct.Struct("<H" if little else ">H")

    def header(self, first: bytes | None = None):
        """(tag, vr, length) of the next element; None at a clean end of the data (`first`:
        its tag bytes, already read)."""
        raw = first if first is not None else (yield 4)
        if raw is None:
            return None
        tag = self._pair.unpack(raw)
        if tag[0] == 0xFFFE or not self.explicit:
            return tag, None, self._u32.unpack(_need((yield 4)))[0]
        vr = _need((yield 2))
        if vr in _LONG_VRS:
            return tag, vr, self._u32.unpack(_need((yield 6))[2:])[0]
        if not (vr.isalpha() and vr.isupper()):
            raise InvalidInstance("malformed: invalid VR")
        return tag, vr, self._u16.unpack(_need((yield 2)))[0]


def _tag_int(tag: tuple[int, int]) -> int:
    return (tag[0] << 16) | tag[1]


def _raw_element(tag: tuple[int, int], vr: bytes | None, value: bytes, framing: _Elements) -> RawDataElement:
    """A kept element as the RawDataElement pydicom would make of it."""
    return RawDataElement(BaseTag(_tag_int(tag)), vr.decode() if vr else None, len(value), value, 0,
                          not framing.explicit, framing.little)


class _DatasetWalk:
    """Walks a data set element by element, checking every declared length, keeping the
    top-level elements the index needs (before the pixel data, as pydicom's
    stop_before_pixels), and noting how far it got (the sealer starts once it knows the
    study and the pixels)."""

    def __init__(self, framing: _Elements):
        self.framing = framing
        self.captured: dict = {}
        self.last_top_tag = (0, 0)
        self.pixels_seen = False

    def top(self, first: bytes | None = None):
        framing = self.framing
        while True:
            element = yield from framing.header(first)
            first = None
            if element is None:
                return
            tag, vr, length = element
            if tag[0] == 0xFFFE:
                raise InvalidInstance("malformed: unexpected delimiter at the top level")
            self.last_top_tag = tag
            if tag == _PIXEL_DATA:
                self.pixels_seen = True
            keep = not self.pixels_seen and tag in _KEPT and length != _UNDEFINED
            if keep and length <= _KEPT_MAX:
                self.captured[tag] = _raw_element(tag, vr, _need((yield length)), framing)
            else:
                yield from self._value(tag, vr, length, 0)

    def _value(self, tag, vr, length: int, depth: int):
        if length != _UNDEFINED:
            if length:
                yield _Skip(length)
        elif tag == _PIXEL_DATA and vr != b"SQ":
            yield from self._fragments()
        elif vr in (None, b"SQ"):
            yield from self._sequence(self.framing, depth)
        elif vr == b"UN":  # undefined-length UN holds implicit VR little endian
            yield from self._sequence(_Elements(True, False), depth)
        else:
            raise InvalidInstance(f"malformed: undefined length on a {vr.decode()} element")

    def _sequence(self, framing: _Elements, depth: int):
        if depth > 64:
            raise InvalidInstance("malformed: sequences nested too deep")
        while True:
            tag, _, length = _need((yield from framing.header()))
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM:
                raise InvalidInstance("malformed: expected a sequence item")
            yield from self._item(framing, None if length == _UNDEFINED else length, depth + 1)

    def _item(self, framing: _Elements, length: int | None, depth: int):
        """The elements of one item: up to its item delimiter, or exactly `length` bytes."""
        remaining = length
        while remaining is None or remaining > 0:
            element = yield from framing.header()
            tag, vr, value_length = _need(element)
            header_size = 8 if not framing.explicit or tag[0] == 0xFFFE else (12 if vr in _LONG_VRS else 8)
            if tag == _ITEM_END and length is None:
                return
            if tag[0] == 0xFFFE:
                raise InvalidInstance("malformed: unexpected delimiter inside an item")
            if remaining is not None:
                if value_length != _UNDEFINED and header_size + value_length > remaining:
                    raise InvalidInstance("malformed: an item's content overruns its length")
                remaining -= header_size
            walk = self._value(tag, vr, value_length, depth)
            if remaining is None or value_length != _UNDEFINED:
                yield from walk
                if remaining is not None:
                    remaining -= value_length
            else:  # an undefined-length element inside a defined-length item: measure it
                used = yield from _measured(walk)
                if used > remaining:
                    raise InvalidInstance("malformed: an item's content overruns its length")
                remaining -= used
        if remaining:
            raise InvalidInstance("malformed: an item's content overruns its length")

    def _fragments(self):
        framing = _Elements(self.framing.little, False)
        while True:
            tag, _, length = _need((yield from framing.header()))
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM or length == _UNDEFINED:
                raise InvalidInstance("malformed: encapsulated pixel data has a bad fragment")
            if length:
                yield _Skip(length)


def _measured(walk):
    """Run a sub-walk and return how many bytes it consumed."""
    used = 0
    request = next(walk, _DONE)
    while request is not _DONE:
        if type(request) is int:
            reply = yield request
            used += len(reply) if reply is not None else 0
        elif type(request) is _Skip:
            yield request
            used += request.n
            reply = None
        else:
            reply = yield request
        try:
            request = walk.send(reply)
        except StopIteration:
            break
    return used


_DONE = object()


class Inspector:
    """Reads a Part 10 stream (or a bare data set) as it arrives: `feed()` the bytes in any
    pieces, then `finish()` for the InstanceInfo. The content address is the caller's
    (the sealer hashes what it seals); `finish(content_address=...)` puts it in.

    While the bytes come, `transfer_syntax`, `study_uid`, `bits_allocated` and `ready`
    (the walk is past the attributes the sealer needs: group 0028's Bits Allocated or
    the pixel data) tell the caller when it can start sealing."""

    def __init__(self):
        self.transfer_syntax = ""
        self.has_meta = False
        self._meta_captured: dict = {}
        self._dataset: _DatasetWalk | None = None
        self._inflater = None
        self._walk = _Walk(self._meta(), trailing_ok=True)
        self._data_walk: _Walk | None = None
        self.length = 0

    # -- progress, for the sealer --------------------------------------------------------

    @property
    def ready(self) -> bool:
        d = self._dataset
        return d is not None and (d.pixels_seen or d.last_top_tag > _BITS_ALLOCATED)

    @property
    def study_uid(self) -> str:
        element = self._dataset.captured.get(_STUDY_UID) if self._dataset else None
        return element.value.decode("ascii", "replace").strip("\x00 ") if element is not None else ""

    @property
    def bits_allocated(self) -> int:
        element = self._dataset.captured.get(_BITS_ALLOCATED) if self._dataset else None
        if element is None or len(element.value) != 2:
            return 0
        return struct.unpack("<H" if element.is_little_endian else ">H", element.value)[0]

    @property
    def compressible(self) -> bool:
        return _compressible(self.transfer_syntax)

    # -- feeding -------------------------------------------------------------------------

    def feed(self, data) -> None:
        self.length += len(data)
        if self._data_walk is None:
            self._walk.feed(data)
            if not self._walk.done:
                return
            data = self._start_dataset()
        self._feed_dataset(data)

    def finish(self, content_address: bytes = b"") -> InstanceInfo:
        if self.length == 0:
            raise InvalidInstance("empty file")
        if self._data_walk is None:
            self._walk.finish()
            self._feed_dataset(self._start_dataset())
        if self._inflater is not None:
            if not self._inflater.eof:
                raise InvalidInstance("truncated: deflated dataset ends early")
        self._data_walk.finish()
        return _instance_info(content_address, self.length, self.transfer_syntax, self.has_meta,
                              {**self._meta_captured, **self._dataset.captured})

    def _feed_dataset(self, data) -> None:
        if self._inflater is not None:
            try:
                data = self._inflater.decompress(data)
            except zlib.error as exc:
                raise InvalidInstance(f"malformed: deflated dataset does not inflate ({exc})") from None
        self._data_walk.feed(data)

    def _start_dataset(self) -> bytes:
        """The meta walk is over: what it read past the meta goes to the data set walk."""
        self.transfer_syntax, little, explicit = self._walk.result
        if self.transfer_syntax in _DEFLATED:
            self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._dataset = _DatasetWalk(_Elements(little, explicit))
        self._data_walk = _Walk(self._dataset.top())
        return self._walk.rest()

    def _meta(self):
        """Preamble and file meta (explicit VR little endian); returns (transfer syntax, the
        data set's byte order and VR encoding)."""
        head = yield _Peek(132)
        has_preamble = head[128:132] == b"DICM"
        if has_preamble:
            yield _Skip(132)
        first = yield _Peek(2)
        self.has_meta = has_preamble or first == b"\x02\x00"
        transfer_syntax = ""
        if self.has_meta:
            framing = _Elements(True, True)
            while True:
                group = yield _Peek(2)
                if group != b"\x02\x00":
                    break
                tag, vr, length = _need((yield from framing.header()))
                if length == _UNDEFINED:
                    raise InvalidInstance("malformed: undefined length in the file meta information")
                if length > _KEPT_MAX:
                    raise InvalidInstance("malformed: a file meta element is too long")
                value = _need((yield length))
                if tag == (0x0002, 0x0010):
                    transfer_syntax = value.rstrip(b"\x00 ").decode("ascii", "replace")
                elif tag in _KEPT:
                    self._meta_captured[tag] = _raw_element(tag, vr, value, framing)
            if not transfer_syntax:
                raise InvalidInstance("malformed: file meta information has no transfer syntax")
        if transfer_syntax in _DEFLATED:
            return transfer_syntax, True, True
        head = yield _Peek(6)
        if transfer_syntax:
            little = transfer_syntax != _EXPLICIT_BE
        else:  # no file meta: the smaller reading of the first group number is the right byte order
            little = len(head) < 2 or head[1::-1] <= head[0:2]
        # Like pydicom, trust the first element over the transfer syntax for explicit/implicit
        # VR: real archives hold files that say explicit and are written implicit.
        explicit = len(head) == 6 and head[4:6].isalpha() and head[4:6].isupper()
        if not transfer_syntax:
            transfer_syntax = _IMPLICIT_LE if not explicit else (_EXPLICIT_LE if little else _EXPLICIT_BE)
        return transfer_syntax, little, explicit


# The file meta the archive writes before a received data set (C-STORE, STOW-RS): its
# own implementation class UID (pydicom generate_uid of "pacs-vault implementation class") and version.
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.12562272139305564999365229736904451166"
IMPLEMENTATION_VERSION = "PACS_VAULT_1"


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB") else b" "
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, "DICM" and the file meta group (explicit VR little endian) for a data set
    received over the network: the same for the same instance, so a data set sent again is
    a duplicate."""
    elements = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", sop_class_uid.encode("ascii", "replace")),
        _meta_element(0x0003, b"UI", sop_instance_uid.encode("ascii", "replace")),
        _meta_element(0x0010, b"UI", transfer_syntax.encode("ascii")),
        _meta_element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode()),
        _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION.encode())))
    return b"\0" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<I", len(elements))) + elements


def dataset_offset(head: bytes | memoryview) -> int:
    """Where the data set starts in stored P10 bytes (`head`: enough of their beginning, the
    whole file meta): after the preamble and the file meta group, or 0 for a bare data set."""
    if head[128:132] != b"DICM":
        return 0
    at = 132
    while head[at:at + 2] == b"\x02\x00":
        vr = bytes(head[at + 4:at + 6])
        if vr in _LONG_VRS:
            at += 12 + struct.unpack_from("<I", head, at + 8)[0]
        else:
            at += 8 + struct.unpack_from("<H", head, at + 6)[0]
    if at > len(head):
        raise InvalidInstance("the file meta runs past the first chunk")
    return at


def _compressible(transfer_syntax: str) -> bool:
    """False when the pixel data is already compressed (encapsulated or deflated)."""
    try:
        return not UID(transfer_syntax).is_compressed
    except ValueError:  # a private transfer syntax: let the compression probe decide
        return True


def person_name_key(value: str) -> str:
    """A Person Name as pacs-vault matches it: case ignored, trailing empty components dropped."""
    return "=".join(group.rstrip("^") for group in value.strip(" \x00").split("=")).rstrip("=").upper()


def text_value(value) -> str:
    """A pydicom element value as the DICOM string form (multiple values joined by a backslash)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(text_value(v) for v in value)
    return str(value)


def _required_uid(values: dict, keyword: str, meta_keyword: str | None = None) -> str:
    value = text_value(values.get(keyword))
    if not value and meta_keyword:
        value = text_value(values.get(meta_keyword))
    value = value.strip("\x00 ")
    if not value:
        raise InvalidInstance(f"missing {keyword}")
    if len(value) > 64 or not _UID_RE.match(value):
        raise InvalidInstance(f"{keyword} is not a valid UID")
    return value


def _attribute_values(captured: dict) -> dict:
    """keyword -> value of every attribute the index keeps, converted by pydicom's own
    element converter (its character sets, VR lookup for implicit VR, UN replacement), but
    from the elements the walk captured: no second parse."""
    encodings = [default_encoding]
    charset = captured.get(_CHARSET)
    if charset is not None:
        encodings = convert_encodings(_converted(charset, encodings))
    return {_KEPT[tag]: _converted(element, encodings) for tag, element in captured.items()}


def _converted(element: RawDataElement, encodings):
    plain = _plain_value(element)
    return plain if plain is not None else convert_raw_data_element(element, encoding=encodings).value


# VRs whose single ASCII value reads, once stripped, as pydicom reads it; decoding one of them
# here skips pydicom's converter machinery (most of inspect's time on a CT instance).
_PLAIN_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UI"}
_NOT_PLAIN = re.compile(rb"[\\\x1b\x80-\xff]")


def _plain_value(element: RawDataElement):
    """The value of a kept element when it is plain: one ASCII value of a text VR, or a US.
    None otherwise (pydicom's converter decides: character sets, multi-values, odd VRs)."""
    vr = element.VR or _KEPT_VR.get((element.tag >> 16, element.tag & 0xFFFF))
    value = element.value
    if vr == "US" and len(value) == 2:
        return struct.unpack("<H" if element.is_little_endian else ">H", value)[0]
    if vr in _PLAIN_TEXT_VRS and not _NOT_PLAIN.search(value) and not (vr == "PN" and b"=" in value):
        return value.decode("ascii")  # (a name with component groups: pydicom drops empty trailing ones)
    return None


def _instance_info(content_address: bytes, length: int, transfer_syntax: str, has_meta: bool,
                   captured: dict) -> InstanceInfo:
    info = InstanceInfo(content_address, length, transfer_syntax, has_meta)
    try:
        values = _attribute_values(captured)
        info.specific_character_set = text_value(values.get("SpecificCharacterSet"))
        bits = values.get("BitsAllocated")
        info.bits_allocated = bits if isinstance(bits, int) else 0
        for keys, target in ((PATIENT_KEYS, info.patient), (STUDY_KEYS, info.study),
                             (SERIES_KEYS, info.series), (INSTANCE_KEYS, info.instance)):
            for keyword in keys:
                target[keyword] = text_value(values.get(keyword)).strip("\x00 ")
    except Exception as exc:  # pydicom raises many types for a bad value  # noqa: BLE001
        raise InvalidInstance(f"unreadable attribute: {exc}") from None
    info.study["StudyInstanceUID"] = _required_uid(values, "StudyInstanceUID")
    info.series["SeriesInstanceUID"] = _required_uid(values, "SeriesInstanceUID")
    info.instance["SOPInstanceUID"] = _required_uid(values, "SOPInstanceUID", "MediaStorageSOPInstanceUID")
    info.instance["SOPClassUID"] = _required_uid(values, "SOPClassUID", "MediaStorageSOPClassUID")
    return info


def inspect_stream(chunks: Iterable) -> InstanceInfo:
    """Hash and inspect P10 bytes given as chunks (see Inspector). Raises InvalidInstance."""
    inspector = Inspector()
    sha = hashlib.sha256()
    first = b""
    try:
        for chunk in chunks:
            if len(first) < 132:
                first += bytes(chunk[:132 - len(first)])
            sha.update(chunk)
            inspector.feed(chunk)
        return inspector.finish(sha.digest())
    except InvalidInstance as exc:
        if first[128:132] != b"DICM" and str(exc).startswith(("truncated", "malformed")):
            raise InvalidInstance("not a DICOM file") from None
        raise
    except (struct.error, UnicodeDecodeError) as exc:
        raise InvalidInstance(f"malformed: {exc}") from None


def file_chunks(fp: BinaryIO) -> Iterator[bytes]:
    while chunk := fp.read(READ_SIZE):
        yield chunk


def inspect(path: str | os.PathLike) -> InstanceInfo:
    """Hash, check and read the index attributes of one file. Raises InvalidInstance."""
    try:
        with open(path, "rb") as fp:
            return inspect_stream(file_chunks(fp))
    except OSError as exc:
        raise InvalidInstance(f"cannot read: {exc.strerror}") from None
