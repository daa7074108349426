"""Reading a received DICOM file just enough to index it, never re-encoding it.

`inspect(path)` does three things over the bytes as received:
  1. the content address: SHA-256 and length of every byte;
  2. the framing: every data element, sequence, item and pixel-data fragment
     is walked by its declared length, so a truncated or malformed file is
     rejected (pydicom alone reads a truncated file without complaint);
  3. the attributes the index and C-FIND need: their elements are taken during
     the walk and converted with pydicom's element converter (a deflated dataset
     is read by pydicom itself).
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.errors import InvalidDicomError
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
_READ_SIZE = 1 << 20

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
_CHARSET = (0x0008, 0x0005)


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


class _Reader:
    def __init__(self, fp: BinaryIO, size: int, little: bool):
        self.fp, self.size, self.little = fp, size, little
        self.pos = fp.tell()

    def read(self, n: int) -> bytes:
        if self.pos + n > self.size:  # checked first: the length comes from the file
            raise InvalidInstance("truncated: the file ends inside a data element")
        data = self.fp.read(n)
        if len(data) != n:
            raise InvalidInstance("truncated: the file ends inside a data element")
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise InvalidInstance("truncated: a data element runs past the end of the file")
        self.pos += n
        self.fp.seek(self.pos)

    def u16_pair(self) -> tuple[int, int]:
        return struct.unpack("<HH" if self.little else ">HH", self.read(4))

    def u32(self) -> int:
        return struct.unpack("<I" if self.little else ">I", self.read(4))[0]

    def u16(self) -> int:
        return struct.unpack("<H" if self.little else ">H", self.read(2))[0]


def _element_header(r: _Reader, explicit: bool) -> tuple[tuple[int, int], bytes | None, int]:
    tag = r.u16_pair()
    if tag[0] == 0xFFFE:
        return tag, None, r.u32()
    if not explicit:
        return tag, None, r.u32()
    vr = r.read(2)
    if vr in _LONG_VRS:
        r.read(2)
        return tag, vr, r.u32()
    if not (vr.isalpha() and vr.isupper()):
        raise InvalidInstance(f"malformed: invalid VR at offset {r.pos - 2}")
    return tag, vr, r.u16()


def _tag_int(tag: tuple[int, int]) -> int:
    return (tag[0] << 16) | tag[1]


def _capture(captured: dict, r: _Reader, tag: tuple[int, int], vr: bytes | None, length: int,
             explicit: bool) -> None:
    """Read one element's value into `captured` as the RawDataElement pydicom would make of it."""
    tell = r.pos
    captured[tag] = RawDataElement(BaseTag(_tag_int(tag)), vr.decode() if vr else None, length, r.read(length),
                                   tell, not explicit, r.little)


def _walk_dataset(r: _Reader, explicit: bool, end: int | None, depth: int = 0,
                  captured: dict | None = None) -> None:
    """Walk elements until `end`, or until an item delimiter when `end` is None. The value of
    every element of the top level that the index keeps is put into `captured` as a
    pydicom RawDataElement."""
    if depth > 64:
        raise InvalidInstance("malformed: sequences nested too deep")
    while end is None or r.pos < end:
        tag, vr, length = _element_header(r, explicit)
        if tag == _ITEM_END and end is None:
            return
        if tag[0] == 0xFFFE:
            raise InvalidInstance(f"malformed: unexpected delimiter at offset {r.pos - 8}")
        if tag == _PIXEL_DATA:
            captured = None  # what follows the pixel data is not read (as pydicom's stop_before_pixels)
        if captured is not None and tag in _KEPT and length != _UNDEFINED:
            _capture(captured, r, tag, vr, length, explicit)
        elif length != _UNDEFINED:
            r.skip(length)
        elif tag == _PIXEL_DATA and vr != b"SQ":
            _walk_fragments(r)
        elif vr in (None, b"SQ"):
            _walk_sequence(r, explicit, depth)
        elif vr == b"UN":  # undefined-length UN holds implicit VR little endian
            little = r.little
            r.little = True
            _walk_sequence(r, False, depth)
            r.little = little
        else:
            raise InvalidInstance(f"malformed: undefined length on a {vr.decode()} element")
    if end is not None and r.pos != end:
        raise InvalidInstance("malformed: an item's content overruns its length")


def _walk_sequence(r: _Reader, explicit: bool, depth: int) -> None:
    while True:
        tag, _, length = _element_header(r, explicit)  # group FFFE: tag + 4-byte length always
        if tag == _SEQUENCE_END:
            return
        if tag != _ITEM:
            raise InvalidInstance(f"malformed: expected a sequence item at offset {r.pos - 8}")
        if length == _UNDEFINED:
            _walk_dataset(r, explicit, None, depth + 1)
        else:
            _walk_dataset(r, explicit, r.pos + length, depth + 1)


def _walk_fragments(r: _Reader) -> None:
    while True:
        tag, _, length = _element_header(r, False)
        if tag == _SEQUENCE_END:
            return
        if tag != _ITEM or length == _UNDEFINED:
            raise InvalidInstance("malformed: encapsulated pixel data has a bad fragment")
        r.skip(length)


def _check_deflated(fp: BinaryIO) -> None:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        while chunk := fp.read(_READ_SIZE):
            inflater.decompress(chunk, 0)
            if inflater.eof:
                break
    except zlib.error as exc:
        raise InvalidInstance(f"malformed: deflated dataset does not inflate ({exc})") from None
    if not inflater.eof:
        raise InvalidInstance("truncated: deflated dataset ends early")


def _walk_file(fp: BinaryIO, size: int, captured: dict) -> tuple[str, bool]:
    """Check the framing of a whole file; return (transfer syntax, has file meta). The
    elements the index keeps go into `captured` (not from a deflated dataset)."""
    fp.seek(128)
    has_preamble = fp.read(4) == b"DICM"
    fp.seek(132 if has_preamble else 0)
    first = fp.read(2)
    fp.seek(132 if has_preamble else 0)
    transfer_syntax = ""
    has_meta = has_preamble or first == b"\x02\x00"
    if has_meta:
        r = _Reader(fp, size, little=True)
        while r.pos < size:
            group = struct.unpack("<H", fp.read(2))[0]
            fp.seek(r.pos)
            if group != 0x0002:
                break
            tag, vr, length = _element_header(r, True)
            if length == _UNDEFINED:
                raise InvalidInstance("malformed: undefined length in the file meta information")
            if tag == (0x0002, 0x0010):
                transfer_syntax = r.read(length).rstrip(b"\x00 ").decode("ascii", "replace")
            elif tag in _KEPT:
                _capture(captured, r, tag, vr, length, explicit=True)
            else:
                r.skip(length)
        if not transfer_syntax:
            raise InvalidInstance("malformed: file meta information has no transfer syntax")
        data_start = r.pos
    else:
        data_start = 0
    fp.seek(data_start)
    if transfer_syntax in _DEFLATED:
        _check_deflated(fp)
        return transfer_syntax, has_meta
    head = fp.read(6)
    fp.seek(data_start)
    if transfer_syntax:
        little = transfer_syntax != _EXPLICIT_BE
    else:  # no file meta: the smaller reading of the first group number is the right byte order
        little = len(head) < 2 or head[1::-1] <= head[0:2]
    # Like pydicom, trust the first element over the transfer syntax for explicit/implicit
    # VR: real archives hold files that say explicit and are written implicit.
    explicit = len(head) == 6 and head[4:6].isalpha() and head[4:6].isupper()
    if not transfer_syntax:
        transfer_syntax = _IMPLICIT_LE if not explicit else (_EXPLICIT_LE if little else _EXPLICIT_BE)
    _walk_dataset(_Reader(fp, size, little), explicit, size, captured=captured)
    return transfer_syntax, has_meta


def _content_address(fp: BinaryIO) -> tuple[bytes, int]:
    sha = hashlib.sha256()
    size = 0
    fp.seek(0)
    while chunk := fp.read(_READ_SIZE):
        sha.update(chunk)
        size += len(chunk)
    return sha.digest(), size


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


def _attribute_values(fp: BinaryIO, transfer_syntax: str, captured: dict) -> dict:
    """keyword -> value of every attribute the index keeps, converted by pydicom's own
    element converter (its character sets, VR lookup for implicit VR, UN replacement), but
    from the elements the walk captured: no second parse of the file."""
    if transfer_syntax in _DEFLATED:  # the walk only inflated it to check the framing
        fp.seek(0)
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
        except (InvalidDicomError, ValueError, EOFError, struct.error, KeyError) as exc:
            raise InvalidInstance(f"not readable as DICOM: {exc}") from None
        sources = [source for source in (getattr(ds, "file_meta", None), ds) if source is not None]
        captured = {tag: element for tag in _KEPT for source in sources
                    if (element := source.get_item(_tag_int(tag))) is not None}
    encodings = [default_encoding]
    charset = captured.get(_CHARSET)
    if charset is not None:
        encodings = convert_encodings(_converted(charset, encodings))
    return {_KEPT[tag]: _converted(element, encodings) for tag, element in captured.items()}


def _converted(element, encodings):
    if isinstance(element, RawDataElement):
        return convert_raw_data_element(element, encoding=encodings).value
    return element.value


def inspect(path: str | os.PathLike) -> InstanceInfo:
    """Hash, check and read the index attributes of one file. Raises InvalidInstance."""
    try:
        with open(path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            if size == 0:
                raise InvalidInstance("empty file")
            content_address, hashed = _content_address(fp)
            if hashed != size:
                raise InvalidInstance("file changed while it was read")
            captured: dict = {}
            try:
                transfer_syntax, has_meta = _walk_file(fp, size, captured)
            except InvalidInstance as exc:
                fp.seek(128)
                if fp.read(4) != b"DICM" and str(exc).startswith(("truncated", "malformed")):
                    raise InvalidInstance("not a DICOM file") from None
                raise
            except (struct.error, UnicodeDecodeError) as exc:
                raise InvalidInstance(f"malformed: {exc}") from None
            info = InstanceInfo(content_address, size, transfer_syntax, has_meta)
            try:
                values = _attribute_values(fp, transfer_syntax, captured)
                info.specific_character_set = text_value(values.get("SpecificCharacterSet"))
                bits = values.get("BitsAllocated")
                info.bits_allocated = bits if isinstance(bits, int) else 0
                for keys, target in ((PATIENT_KEYS, info.patient), (STUDY_KEYS, info.study),
                                     (SERIES_KEYS, info.series), (INSTANCE_KEYS, info.instance)):
                    for keyword in keys:
                        target[keyword] = text_value(values.get(keyword)).strip("\x00 ")
            except InvalidInstance:
                raise
            except Exception as exc:  # pydicom raises many types for a bad value  # noqa: BLE001
                raise InvalidInstance(f"unreadable attribute: {exc}") from None
            info.study["StudyInstanceUID"] = _required_uid(values, "StudyInstanceUID")
            info.series["SeriesInstanceUID"] = _required_uid(values, "SeriesInstanceUID")
            info.instance["SOPInstanceUID"] = _required_uid(values, "SOPInstanceUID", "MediaStorageSOPInstanceUID")
            info.instance["SOPClassUID"] = _required_uid(values, "SOPClassUID", "MediaStorageSOPClassUID")
            return info
    except OSError as exc:
        raise InvalidInstance(f"cannot read: {exc.strerror}") from None
