"""Transcoding for a peer that cannot take an instance's stored transfer syntax (retrieve, export).

The stored bytes never change: `transcode` reads them as the archive streams them (a Part 10 file,
or a bare data set) and writes the data set anew in the target syntax, without file meta.

What can be sent as what (`targets_for`, `can_transcode`):

- the stored syntax itself, always;
- native syntaxes (explicit/implicit VR little endian, explicit VR big endian, deflated) to explicit
  and implicit VR little endian: element values unchanged, re-encoded (byte order, VR field);
- encapsulated syntaxes with a decoder below (JPEG, JPEG-LS, JPEG 2000, RLE) decoded to explicit and
  implicit VR little endian; lossy ones too, as decoding adds no loss. Nothing is ever encoded lossy.

What changes with the encoding, and nothing else: Pixel Data, Photometric Interpretation when the
decoder hands back another colour space (YCbCr JPEG 2000 comes back RGB; lossy YCbCr JPEG is
converted to RGB, as every viewer shows it), Planar Configuration (decoded colour is interleaved),
Lossy Image Compression "01" (and its Method when absent) for the always-lossy JPEG syntaxes, the
Extended Offset Table (encapsulated only), group lengths (byte counts of the old encoding: dropped),
and sequence and item lengths (written undefined). The SOP Instance UID stays: this is the same
instance in another encoding, not a derived one.

Memory stays bounded whatever the instance's size: elements stream one by one, native pixel data
in 1 MiB pieces, encapsulated pixel data one frame at a time (one compressed frame and one decoded
frame in memory); an encapsulated icon image in a sequence is decoded whole (icons are small).
Everything before the Pixel Data is held until the first frame decodes, so a stored syntax that
does not decode fails before the first byte is handed out; a later frame that fails raises
mid-stream (a sender that must not half-send spools the output first).
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
from pydicom.datadict import dictionary_VR, private_dictionary_VR
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from appliance.errors import TranscodeError

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_NATIVE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                     DeflatedExplicitVRLittleEndian})


@dataclass(frozen=True)
class Decoding:
    """How an encapsulated syntax is decoded."""

    plugin: str  # the pydicom decoding plugin
    lossy: bool  # always lossy: the decoded copy says so (0028,2110) and shows YCbCr as RGB
    method: str = ""  # Lossy Image Compression Method (0028,2114), for the always-lossy ones


# Decoders chosen by measurement (issue 18): pylibjpeg (libjpeg, openjpeg, rle) decodes 57 of the 60
# compressed corpus files with pixel data, gdcm 55 (no 12-bit JPEG Extended); CharLS (pyjpegls)
# decodes JPEG-LS 4-7x faster than libjpeg with identical output; pylibjpeg-rle is 5x pydicom's RLE.
# One plugin per syntax, no fallback: every frame of every instance decodes the same way.
# JPEG-LS near-lossless and JPEG 2000 (.4.91) may or may not be lossy: their flags stay as stored.
DECODINGS: dict[str, Decoding] = {
    JPEGBaseline8Bit: Decoding("pylibjpeg", lossy=True, method="ISO_10918_1"),
    JPEGExtended12Bit: Decoding("pylibjpeg", lossy=True, method="ISO_10918_1"),
    JPEGLossless: Decoding("pylibjpeg", lossy=False),
    JPEGLosslessSV1: Decoding("pylibjpeg", lossy=False),
    JPEGLSLossless: Decoding("pyjpegls", lossy=False),
    JPEGLSNearLossless: Decoding("pyjpegls", lossy=False),
    JPEG2000Lossless: Decoding("pylibjpeg", lossy=False),
    JPEG2000: Decoding("pylibjpeg", lossy=False),
    RLELossless: Decoding("pylibjpeg", lossy=False),
}


def targets_for(stored_ts: str) -> tuple[str, ...]:
    """The transfer syntaxes an instance stored in `stored_ts` can be sent in, best first: as stored,
    then explicit and implicit VR little endian when it can be re-encoded or decoded to them."""
    if stored_ts in _NATIVE or stored_ts in DECODINGS:
        return (stored_ts, *(ts for ts in UNCOMPRESSED if ts != stored_ts))
    return (stored_ts,)


def can_transcode(stored_ts: str, target_ts: str) -> bool:
    return target_ts in targets_for(stored_ts)


def pick_target(stored_ts: str, accepted: Iterable[str]) -> str | None:
    """What to send an instance in, given the syntaxes a peer accepted for its SOP class (in the
    peer's order of preference): the stored one when accepted, else the first accepted one it can
    be transcoded to, else None."""
    accepted = list(accepted)
    if stored_ts in accepted:
        return stored_ts
    return next((ts for ts in accepted if can_transcode(stored_ts, ts)), None)


class TranscodeCounts:
    """Instances transcoded per (stored, target) syntax pair, for audit records and metrics.
    Shared by the sub-operations of one retrieve or export; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.transcoded: Counter[tuple[str, str]] = Counter()
        self.failed: Counter[tuple[str, str]] = Counter()

    def record(self, stored_ts: str, target_ts: str, ok: bool) -> None:
        with self._lock:
            (self.transcoded if ok else self.failed)[(stored_ts, target_ts)] += 1

    def summary(self) -> list[dict]:
        """[{"from": stored UID, "to": target UID, "instances": n, "failed": m}, ...], sorted."""
        with self._lock:
            pairs = sorted(set(self.transcoded) | set(self.failed))
            return [{"from": s, "to": t, "instances": self.transcoded[(s, t)], "failed": self.failed[(s, t)]}
                    for s, t in pairs]


def transcode(chunks: Iterable[bytes], stored_ts: str, target_ts: str, *,
              counts: TranscodeCounts | None = None) -> Iterator[bytes]:
    """The data set of a stored instance (its bytes as Archive.open_blob yields them: a Part 10
    file or a bare data set) encoded in `target_ts`, without file meta, in pieces of at most a
    frame. Same syntax: the stored data set bytes unchanged.

    Raises TranscodeError at once when `target_ts` is not one of targets_for(stored_ts), and while
    iterating when the instance cannot be read or decoded. `counts` records each instance
    transcoded to another syntax (or failing to be) once its last piece is out."""
    if not can_transcode(stored_ts, target_ts):
        raise TranscodeError(f"{_short(stored_ts)} cannot be transcoded to {_short(target_ts)}")
    pieces = _transcoded(_Stream(chunks), stored_ts, target_ts)
    if stored_ts == target_ts or counts is None:
        return pieces
    return _counted(pieces, stored_ts, target_ts, counts)


def _short(ts: str) -> str:
    return UID(ts).keyword or ts


def _counted(pieces: Iterator[bytes], stored_ts: str, target_ts: str, counts: TranscodeCounts) -> Iterator[bytes]:
    try:
        yield from pieces
    except TranscodeError:
        counts.record(stored_ts, target_ts, ok=False)
        raise
    counts.record(stored_ts, target_ts, ok=True)


# -- reading the stored bytes ----------------------------------------------------------------

class _Stream:
    """Exact reads across chunk boundaries; holds only what a read needs."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = iter(chunks)
        self._buffer = b""
        self._offset = 0
        self.position = 0  # bytes consumed

    def _fill(self, n: int) -> None:
        parts, have = [self._buffer[self._offset:]], len(self._buffer) - self._offset
        while have < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            parts.append(chunk)
            have += len(chunk)
        self._buffer, self._offset = b"".join(parts), 0

    def peek(self, n: int) -> bytes:
        if len(self._buffer) - self._offset < n:
            self._fill(n)
        return self._buffer[self._offset:self._offset + n]

    def read(self, n: int) -> bytes:
        data = self.peek(n)
        if len(data) < n:
            raise TranscodeError("the stored instance ends early")
        self._offset += n
        self.position += n
        return data

    def at_end(self) -> bool:
        return not self.peek(1)

    def rest(self) -> Iterator[bytes]:
        if self._offset < len(self._buffer):
            yield self._buffer[self._offset:]
        self._buffer, self._offset = b"", 0
        yield from self._chunks


def _inflated(chunks: Iterator[bytes]) -> Iterator[bytes]:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        for chunk in chunks:
            data = chunk
            while data:  # bounded output per call: a small deflated input may inflate hugely
                out = inflater.decompress(data, _PIECE)
                if out:
                    yield out
                data = inflater.unconsumed_tail
        if tail := inflater.flush():
            yield tail
    except zlib.error:
        raise TranscodeError("the deflated data set does not inflate") from None


@dataclass(frozen=True)
class _Syntax:
    implicit: bool
    little: bool

    @property
    def order(self) -> str:
        return "<" if self.little else ">"


_EXPLICIT_LE, _IMPLICIT_LE = _Syntax(False, True), _Syntax(True, True)
_SYNTAX = {ImplicitVRLittleEndian: _IMPLICIT_LE, ExplicitVRBigEndian: _Syntax(False, False)}

_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA, _EXTENDED_OFFSETS, _EXTENDED_LENGTHS = 0x7FE00010, 0x7FE00001, 0x7FE00002
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_SWAP_UNIT = {"US": 2, "SS": 2, "OW": 2, "AT": 2, "UL": 4, "SL": 4, "FL": 4, "OL": 4, "OF": 4,
              "FD": 8, "OD": 8, "SV": 8, "UV": 8, "OV": 8}
_PIECE = 1 << 20  # values above this size stream through in pieces of this size
# What the decoder needs to know of the pixel data, read from the top-level elements as they pass.
_PIXEL_MODULE = frozenset({0x00280002, 0x00280004, 0x00280006, 0x00280008, 0x00280010, 0x00280011,
                           0x00280100, 0x00280101, 0x00280103, _EXTENDED_OFFSETS, _EXTENDED_LENGTHS})


def _read_header(src: _Stream, syntax: _Syntax) -> tuple[int, str | None, int]:
    """(tag, VR or None when implicit, length) of the next element, item or delimiter."""
    group, element = struct.unpack(syntax.order + "HH", src.read(4))
    tag = group << 16 | element
    if group == 0xFFFE or syntax.implicit:
        return tag, None, struct.unpack(syntax.order + "I", src.read(4))[0]
    vr = src.read(2).decode("latin-1")
    if not vr.isalpha() or not vr.isupper():
        raise TranscodeError(f"malformed element ({group:04X},{element:04X})")
    if vr in _LONG_VRS:
        return tag, vr, struct.unpack(syntax.order + "2xI", src.read(6))[0]
    return tag, vr, struct.unpack(syntax.order + "H", src.read(2))[0]


def _skip_file_meta(src: _Stream) -> str | None:
    """Consume preamble and group 0002 (explicit VR little endian); return their transfer syntax."""
    if src.peek(132)[128:132] == b"DICM":
        src.read(132)
    meta_ts = None
    while len(head := src.peek(2)) == 2 and struct.unpack("<H", head)[0] == 0x0002:
        tag, _, length = _read_header(src, _EXPLICIT_LE)
        value = src.read(length)
        if tag == 0x00020010:
            meta_ts = value.rstrip(b"\x00 ").decode("ascii", "replace")
    return meta_ts


# -- writing ---------------------------------------------------------------------------------

def _header(tag: int, vr: str, length: int, implicit: bool) -> bytes:
    group, element = tag >> 16, tag & 0xFFFF
    if implicit or group == 0xFFFE:
        return struct.pack("<HHI", group, element, length)
    if vr in _LONG_VRS:
        return struct.pack("<HH2s2xI", group, element, vr.encode(), length)
    return struct.pack("<HH2sH", group, element, vr.encode(), length)


def _swapped(data: bytes, unit: int) -> bytes:
    if unit < 2:
        return data
    if len(data) % unit:
        raise TranscodeError("a value's length does not fit its VR")
    return np.frombuffer(data, dtype=f">u{unit}").astype(f"<u{unit}").tobytes()


def _coalesced(pieces: Iterator[bytes], size: int = 256 << 10) -> Iterator[bytes]:
    """Small pieces (element by element) gathered into fewer, larger ones; large ones (frames)
    pass as they are, never copied."""
    pending, held = [], 0
    for piece in pieces:
        if len(piece) >= size:
            if pending:
                yield b"".join(pending)
                pending, held = [], 0
            yield piece
            continue
        pending.append(piece)
        held += len(piece)
        if held >= size:
            yield b"".join(pending)
            pending, held = [], 0
    if pending:
        yield b"".join(pending)


# -- the data set walk -----------------------------------------------------------------------

@dataclass
class _Level:
    """What the elements of one data set (top level or item) tell about the ones after them."""

    pixel_representation: int | None = None
    bits_allocated: int | None = None
    creators: dict[tuple[int, int], str] = field(default_factory=dict)
    pixel_values: dict[int, bytes] = field(default_factory=dict)  # its Image Pixel elements, raw


def _transcoded(src: _Stream, stored_ts: str, target_ts: str) -> Iterator[bytes]:
    meta_ts = _skip_file_meta(src)
    if meta_ts is not None and meta_ts != stored_ts:
        raise TranscodeError("the file meta names another transfer syntax")
    if stored_ts == target_ts:
        yield from src.rest()
        return
    if stored_ts == DeflatedExplicitVRLittleEndian:
        src = _Stream(_inflated(src.rest()))
    walk = _Walk(src, _SYNTAX.get(stored_ts, _EXPLICIT_LE), target_ts == ImplicitVRLittleEndian,
                 stored_ts, DECODINGS.get(stored_ts))
    yield from _coalesced(walk.top_level())


class _Walk:
    """One pass over a stored data set, yielding it re-encoded (little endian, explicit or implicit)."""

    def __init__(self, src: _Stream, syntax: _Syntax, implicit_out: bool, stored_ts: str,
                 decoding: Decoding | None):
        self.src, self.syntax, self.implicit_out = src, syntax, implicit_out
        self.stored_ts, self.decoding = stored_ts, decoding

    def top_level(self) -> Iterator[bytes]:
        return self._dataset(None, self.syntax, self.implicit_out, [], top=True)

    def _dataset(self, end: int | None, syntax: _Syntax, implicit_out: bool, levels: list[_Level],
                 top: bool = False) -> Iterator[bytes]:
        """The elements of the data set (top) or of one item, up to byte `end` (defined length), the
        item's delimiter, or the end of the stored bytes."""
        level = _Level()
        levels = [level, *levels]
        # Encapsulated: the elements before the Pixel Data wait for its first decoded frame, which
        # settles the ones that change with the decoding; an item (an icon image) waits for its end.
        held: list[tuple[int, bytes]] | None = [] if self.decoding else None
        while self._more(end, top):
            tag, vr, length = _read_header(self.src, syntax)
            if tag == _ITEM_END and end is None and not top:
                break
            if tag == _PIXEL_DATA and length == _UNDEFINED:
                if held is None:
                    raise TranscodeError("encapsulated pixel data in a native syntax")
                pixel_data = self._decoded_pixel_data(held, level.pixel_values, top)
                if top:  # frame by frame, nothing held from here on
                    yield from pixel_data
                    held = None
                else:
                    held = [(tag, b"".join(pixel_data))]
                continue
            if tag == _PIXEL_DATA and top and held is not None:
                raise TranscodeError("native pixel data in an encapsulated syntax")
            if tag in _PIXEL_MODULE and length <= _PIECE:
                level.pixel_values[tag] = self.src.peek(length)
            pieces = self._element(tag, vr, length, syntax, implicit_out, levels)
            if held is None:
                yield from pieces
            else:
                held.append((tag, b"".join(pieces)))
        if end is not None and self.src.position != end:
            raise TranscodeError("an item is longer than its declared length")
        for _, encoded in held or ():
            yield encoded

    def _more(self, end: int | None, top: bool) -> bool:
        if top:
            return not self.src.at_end()
        return end is None or self.src.position < end  # an undefined length item ends at its delimiter

    def _element(self, tag: int, vr: str | None, length: int, syntax: _Syntax, implicit_out: bool,
                 levels: list[_Level]) -> Iterator[bytes]:
        if tag >> 16 == 0xFFFE:
            raise TranscodeError("an item or delimiter outside a sequence")
        if vr is None:
            vr = self._implicit_vr(tag, length, levels)
        if vr == "UN" and length == _UNDEFINED and not syntax.implicit:
            # PS3.5 6.2.2: its items are implicit VR little endian, and stay so under UN.
            yield _header(tag, "UN", _UNDEFINED, implicit_out)
            yield from self._items(_UNDEFINED, _IMPLICIT_LE, True, levels)
            return
        if vr == "SQ":
            yield _header(tag, "SQ", _UNDEFINED, implicit_out)
            yield from self._items(length, syntax, implicit_out, levels)
            return
        if length == _UNDEFINED:
            raise TranscodeError(f"undefined length on a {vr} element")
        if tag & 0xFFFF == 0:
            self._skip(length)  # a group length counts bytes of the old encoding
            return
        unit = 1 if syntax.little else self._swap_unit(tag, vr, levels)
        out_vr = vr if vr in _LONG_VRS or length <= 0xFFFF else "UN"  # PS3.5 6.2.2: too long for VR
        yield _header(tag, out_vr, length, implicit_out)
        if length <= _PIECE:
            value = self.src.read(length)
            self._note(tag, value, syntax, levels[0])
            yield _swapped(value, unit)
            return
        remaining = length
        while remaining:
            piece = self.src.read(min(remaining, _PIECE))
            remaining -= len(piece)
            yield _swapped(piece, unit)

    def _items(self, length: int, syntax: _Syntax, implicit_out: bool, levels: list[_Level]) -> Iterator[bytes]:
        end = None if length == _UNDEFINED else self.src.position + length
        while end is None or self.src.position < end:
            tag, _, item_length = _read_header(self.src, syntax)
            if tag == _SEQUENCE_END and end is None:
                break
            if tag != _ITEM:
                raise TranscodeError("malformed sequence")
            yield _header(_ITEM, "", _UNDEFINED, True)
            item_end = None if item_length == _UNDEFINED else self.src.position + item_length
            yield from self._dataset(item_end, syntax, implicit_out, levels)
            yield _header(_ITEM_END, "", 0, True)
        if end is not None and self.src.position != end:
            raise TranscodeError("a sequence is longer than its declared length")
        yield _header(_SEQUENCE_END, "", 0, True)

    def _skip(self, length: int) -> None:
        while length:
            length -= len(self.src.read(min(length, _PIECE)))

    def _implicit_vr(self, tag: int, length: int, levels: list[_Level]) -> str:
        """The VR an explicit encoding writes for an implicit VR element (pydicom's rules)."""
        group, element = tag >> 16, tag & 0xFFFF
        if element == 0:
            return "UL"
        if group & 1:
            if 0x10 <= element <= 0xFF:
                return "LO"
            creator = levels[0].creators.get((group, element >> 8))
            try:
                vr = private_dictionary_VR(tag, creator) if creator else "UN"
            except KeyError:
                vr = "UN"
        else:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = "UN"
        if vr == "UN" and length == _UNDEFINED and self.src.peek(4) == struct.pack("<HH", 0xFFFE, 0xE000):
            return "SQ"  # an unknown element made of items is a sequence
        if vr == "US or SS":
            pixel_representation = next((lv.pixel_representation for lv in levels
                                         if lv.pixel_representation is not None), 0)
            return "SS" if pixel_representation == 1 else "US"
        if vr == "US or OW":  # LUT Data: US when the descriptor says one entry (two bytes)
            return "US" if length == 2 else "OW"
        if " or " in vr:  # OB or OW, US or SS or OW: always OW in implicit VR (PS3.5 A.1)
            return "OW"
        return vr

    def _swap_unit(self, tag: int, vr: str, levels: list[_Level]) -> int:
        """Bytes per swapped unit of a big endian value (pydicom's reading of Pixel Data)."""
        if tag == _PIXEL_DATA and vr == "OW":
            bits = next((lv.bits_allocated for lv in levels if lv.bits_allocated is not None), 16)
            return max(2, bits // 8) if bits >= 8 else 1
        return _SWAP_UNIT.get(vr, 1)

    @staticmethod
    def _note(tag: int, value: bytes, syntax: _Syntax, level: _Level) -> None:
        if tag == 0x00280103 and len(value) == 2:
            level.pixel_representation = struct.unpack(syntax.order + "H", value)[0]
        elif tag == 0x00280100 and len(value) == 2:
            level.bits_allocated = struct.unpack(syntax.order + "H", value)[0]
        elif tag >> 16 & 1 and 0x10 <= tag & 0xFFFF <= 0xFF:
            level.creators[(tag >> 16, tag & 0xFFFF)] = value.decode("latin-1").strip(" \x00")

    # -- encapsulated pixel data -------------------------------------------------------------

    def _decoded_pixel_data(self, held: list[tuple[int, bytes]], values: dict[int, bytes],
                            top: bool) -> Iterator[bytes]:
        module = _PixelModule.parse(values, self.syntax)
        frames = self._frames(module.frames, _extended_offsets(values))
        decoding = self.decoding
        first = next(frames, None)
        if first is None:
            raise TranscodeError("the pixel data has no frame")
        decoded, properties = _decode(first, 0, module, self.stored_ts, decoding)
        yield from self._settled(held, module, properties, top)
        total = module.frame_length * module.frames
        if total >= _UNDEFINED:
            raise TranscodeError("decoded pixel data would exceed 4 GB")
        vr = "OB" if module.bits_allocated <= 8 else "OW"
        yield _header(_PIXEL_DATA, vr, total + total % 2, self.implicit_out)
        yield self._checked(decoded, 0, module)
        count = 1
        for frame in frames:
            if count == module.frames:
                raise TranscodeError("more frames than Number of Frames")
            decoded, frame_properties = _decode(frame, count, module, self.stored_ts, decoding)
            if frame_properties["photometric_interpretation"] != properties["photometric_interpretation"]:
                raise TranscodeError(f"frame {count + 1} decodes to another colour space")
            yield self._checked(decoded, count, module)
            count += 1
        if count != module.frames:
            raise TranscodeError("fewer frames than Number of Frames")
        if total % 2:
            yield b"\x00"

    @staticmethod
    def _checked(decoded: bytes, index: int, module: "_PixelModule") -> bytes:
        if len(decoded) != module.frame_length:
            raise TranscodeError(f"frame {index + 1} decodes to the wrong size")
        return decoded

    def _settled(self, held: list[tuple[int, bytes]], module: "_PixelModule", properties: dict,
                 top: bool) -> Iterator[bytes]:
        """The held elements, with those the decoding changes changed (the lossy flags belong to
        the image, not to an icon)."""
        settled = {tag: encoded for tag, encoded in held if tag not in (_EXTENDED_OFFSETS, _EXTENDED_LENGTHS)}
        changes: dict[int, tuple[str, bytes]] = {0x00280004: ("CS", properties["photometric_interpretation"].encode())}
        if module.samples_per_pixel > 1:
            changes[0x00280006] = ("US", struct.pack("<H", properties["planar_configuration"]))
        if self.decoding.lossy and top:
            changes[0x00282110] = ("CS", b"01")
            if 0x00282114 not in settled:
                changes[0x00282114] = ("CS", self.decoding.method.encode())
        for tag, (vr, value) in changes.items():
            value += b" " * (len(value) % 2)
            settled[tag] = _header(tag, vr, len(value), self.implicit_out) + value
        for tag in sorted(settled):
            yield settled[tag]

    def _frames(self, number_of_frames: int, extended: list[int] | None) -> Iterator[bytes]:
        """Each frame's encoded bytes, read fragment by fragment (PS3.5 A.4), split as pydicom does:
        by the Extended or Basic Offset Table, else all in one frame, else one fragment per frame
        (RLE) or up to each fragment ending in an EOI/EOC marker."""
        tag, _, length = _read_header(self.src, self.syntax)
        if tag != _ITEM:
            raise TranscodeError("malformed encapsulated pixel data")
        table = self.src.read(length)
        offsets = list(struct.unpack(f"<{length // 4}I", table[:length // 4 * 4]))
        fragments = self._fragments()
        if extended is not None:
            yield from fragments  # an Extended Offset Table means one fragment per frame
            return
        if len(offsets) == number_of_frames > 1:
            bounds, frame, position = offsets[1:], [], 0
            for fragment in fragments:
                if bounds and position >= bounds[0]:
                    yield b"".join(frame)
                    frame = []
                    bounds.pop(0)
                frame.append(fragment)
                position += 8 + len(fragment)
            if frame:
                yield b"".join(frame)
            return
        if number_of_frames == 1:
            yield b"".join(fragments)
            return
        if self.stored_ts == RLELossless:
            yield from fragments
            return
        frame = []
        for fragment in fragments:
            frame.append(fragment)
            if b"\xff\xd9" in fragment[-10:]:
                yield b"".join(frame)
                frame = []
        if frame:
            yield b"".join(frame)

    def _fragments(self) -> Iterator[bytes]:
        while True:
            tag, _, length = _read_header(self.src, self.syntax)
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM or length == _UNDEFINED:
                raise TranscodeError("malformed encapsulated pixel data")
            yield self.src.read(length)


def _extended_offsets(values: dict[int, bytes]) -> list[int] | None:
    table = values.get(_EXTENDED_OFFSETS)
    if not table or _EXTENDED_LENGTHS not in values:
        return None
    return list(struct.unpack(f"<{len(table) // 8}Q", table[:len(table) // 8 * 8]))


@dataclass(frozen=True)
class _PixelModule:
    """The Image Pixel attributes the decoder needs, read from the stored elements."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric_interpretation: str
    planar_configuration: int
    frames: int

    @property
    def frame_length(self) -> int:
        return self.rows * self.columns * self.samples_per_pixel * (self.bits_allocated // 8)

    @classmethod
    def parse(cls, values: dict[int, bytes], syntax: _Syntax) -> "_PixelModule":
        def us(tag: int, default=None) -> int:
            raw = values.get(tag)
            if raw is None or len(raw) < 2:
                if default is None:
                    raise TranscodeError(f"no (0028,{tag & 0xFFFF:04X}) for the pixel data")
                return default
            return struct.unpack(syntax.order + "H", raw[:2])[0]

        def text(tag: int) -> str:
            return values.get(tag, b"").decode("ascii", "replace").strip(" \x00")

        try:
            frames = int(text(0x00280008) or 1)
        except ValueError:
            raise TranscodeError("Number of Frames is not a number") from None
        module = cls(rows=us(0x00280010), columns=us(0x00280011), samples_per_pixel=us(0x00280002, 1),
                     bits_allocated=us(0x00280100), bits_stored=us(0x00280101),
                     pixel_representation=us(0x00280103, 0), photometric_interpretation=text(0x00280004),
                     planar_configuration=us(0x00280006, 0), frames=max(frames, 1))
        if module.bits_allocated % 8 or not module.bits_allocated:
            raise TranscodeError(f"Bits Allocated {module.bits_allocated} cannot be decoded")
        return module


def _decode(frame: bytes, index: int, module: _PixelModule, stored_ts: str, decoding: Decoding) -> tuple[bytes, dict]:
    """One decoded frame (little endian, colour interleaved) and the Image Pixel values describing it,
    as pydicom's own decompress() makes them (YCbCr to RGB only for the always-lossy syntaxes)."""
    options = dict(rows=module.rows, columns=module.columns, samples_per_pixel=module.samples_per_pixel,
                   bits_allocated=module.bits_allocated, bits_stored=module.bits_stored,
                   pixel_representation=module.pixel_representation,
                   photometric_interpretation=module.photometric_interpretation,
                   planar_configuration=module.planar_configuration, number_of_frames=1,
                   pixel_keyword="PixelData")
    try:
        array, properties = get_decoder(stored_ts).as_array(
            encapsulate([frame]), index=0, decoding_plugin=decoding.plugin, as_rgb=decoding.lossy, **options)
    except Exception as exc:  # noqa: BLE001 - decoders raise anything on bad data; the cause is chained
        raise TranscodeError(f"frame {index + 1} of {module.frames} does not decode "
                             f"({_short(stored_ts)})") from exc
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes(), properties
