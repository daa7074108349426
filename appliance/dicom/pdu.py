"""DICOM upper layer PDUs (PS3.8 9.3): framing, P-DATA-TF, release and abort. Pure.

Every PDU starts with a 6-byte header: type (1), reserved (1), length of what follows
(big-endian u32). The association PDUs (A-ASSOCIATE-RQ/AC) are coded by pynetdicom
(pynetdicom_glue.py); the ones on the data path are coded here:

    P-DATA-TF (0x04)   one or more PDV items, each:
                       offset size
                       0      4    item length (big-endian u32): 2 + the fragment's length
                       4      1    presentation context id (odd, 1..255)
                       5      1    message control header: bit 0 set = command, else data set;
                                   bit 1 set = last fragment of the command or data set
                       6      ...  the fragment
    A-ASSOCIATE-RJ     0x03, length 4: reserved, result, source, reason/diagnostic
    A-RELEASE-RQ/RP    0x05 / 0x06, length 4: reserved
    A-ABORT            0x07, length 4: reserved, reserved, source, reason/diagnostic
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = 1, 2, 3, 4, 5, 6, 7
HEADER = struct.Struct(">BBI")
HEADER_SIZE = HEADER.size  # 6
PDV_HEADER = struct.Struct(">IBB")
PDV_HEADER_SIZE = PDV_HEADER.size  # 6
COMMAND, LAST = 0x01, 0x02

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason
RJ_PERMANENT, RJ_TRANSIENT = 1, 2
RJ_USER, RJ_ACSE, RJ_PRESENTATION = 1, 2, 3
RJ_NO_REASON, RJ_APP_CONTEXT_NOT_SUPPORTED, RJ_CALLING_AE_NOT_RECOGNISED, RJ_CALLED_AE_NOT_RECOGNISED = 1, 2, 3, 7
RJ_PROTOCOL_VERSION_NOT_SUPPORTED = 2  # source ACSE
RJ_TEMPORARY_CONGESTION, RJ_LOCAL_LIMIT_EXCEEDED = 1, 2  # source presentation
# A-ABORT: source 0 = service user, 2 = service provider; reasons when the provider aborts
ABORT_USER, ABORT_PROVIDER = 0, 2
ABORT_UNRECOGNISED_PDU, ABORT_UNEXPECTED_PDU, ABORT_UNRECOGNISED_PARAMETER, ABORT_INVALID_PARAMETER = 1, 2, 4, 6

# The largest A-ASSOCIATE-RQ read before its sender is dropped (hundreds of presentation
# contexts and a user identity fit easily); the largest PDU of any other control type.
MAX_ASSOCIATE_RQ = 1 << 20
MAX_CONTROL_PDU = 64


class ProtocolError(Exception):
    """The peer broke PS3.8: the association is aborted (source provider, `reason`)."""

    def __init__(self, message: str, reason: int = ABORT_INVALID_PARAMETER):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Pdv:
    context_id: int
    control: int
    data: memoryview

    @property
    def is_command(self) -> bool:
        return bool(self.control & COMMAND)

    @property
    def is_last(self) -> bool:
        return bool(self.control & LAST)


def pdvs(body: memoryview) -> Iterator[Pdv]:
    """The PDV items of a P-DATA-TF body (what follows its 6-byte header)."""
    at, end = 0, len(body)
    if end == 0:
        raise ProtocolError("P-DATA-TF without a PDV")
    while at < end:
        if end - at < PDV_HEADER_SIZE:
            raise ProtocolError("P-DATA-TF ends inside a PDV header")
        length, context_id, control = PDV_HEADER.unpack_from(body, at)
        if length < 2 or at + 4 + length > end:
            raise ProtocolError("PDV item length does not fit its PDU")
        if control & ~(COMMAND | LAST):
            raise ProtocolError("PDV message control header has reserved bits set")
        yield Pdv(context_id, control, body[at + PDV_HEADER_SIZE:at + 4 + length])
        at += 4 + length


def p_data(context_id: int, control: int, fragment) -> list:
    """One P-DATA-TF PDU holding one PDV, as buffers for a gathering send."""
    length = len(fragment)
    return [HEADER.pack(P_DATA, 0, length + PDV_HEADER_SIZE) + PDV_HEADER.pack(length + 2, context_id, control),
            fragment]


def message_pdus(context_id: int, command: bytes, dataset, max_pdu: int) -> Iterator[list]:
    """The PDUs of one DIMSE message, as lists of buffers: the command set, then the data
    set (`dataset`: bytes-like, or None) cut into fragments that fit the peer's maximum
    PDU length (0: unlimited). Fragments are views: nothing is copied."""
    fragment_max = (max_pdu - PDV_HEADER_SIZE) if max_pdu else (1 << 30)
    yield from _fragments(context_id, COMMAND, memoryview(command), fragment_max)
    if dataset is not None:
        yield from _fragments(context_id, 0, memoryview(dataset), fragment_max)


def data_pdus(context_id: int, data, fragment_max: int, last: bool) -> Iterator[list]:
    """Data set fragments of `data` (a piece of a data set; `last`: its final piece)."""
    view = memoryview(data)
    for at in range(0, len(view), fragment_max):
        piece = view[at:at + fragment_max]
        yield p_data(context_id, LAST if last and at + fragment_max >= len(view) else 0, piece)


def _fragments(context_id: int, kind: int, view: memoryview, fragment_max: int) -> Iterator[list]:
    if not len(view):
        yield p_data(context_id, kind | LAST, view)
        return
    for at in range(0, len(view), fragment_max):
        last = at + fragment_max >= len(view)
        yield p_data(context_id, kind | (LAST if last else 0), view[at:at + fragment_max])


def associate_rj(result: int, source: int, reason: int) -> bytes:
    return HEADER.pack(ASSOCIATE_RJ, 0, 4) + bytes((0, result, source, reason))


def release_rq() -> bytes:
    return HEADER.pack(RELEASE_RQ, 0, 4) + b"\0\0\0\0"


def release_rp() -> bytes:
    return HEADER.pack(RELEASE_RP, 0, 4) + b"\0\0\0\0"


def abort(source: int = ABORT_PROVIDER, reason: int = 0) -> bytes:
    return HEADER.pack(ABORT, 0, 4) + bytes((0, 0, source, reason if source == ABORT_PROVIDER else 0))


def check_header(pdu_type: int, length: int, max_data: int) -> None:
    """Refuse a PDU header that cannot be right, before anything of that length is read:
    an unknown type, or a length past what was negotiated (`max_data`: the largest P-DATA
    body we accept)."""
    if pdu_type == P_DATA:
        if length > max_data:
            raise ProtocolError(f"P-DATA-TF of {length} bytes exceeds the negotiated maximum")
    elif pdu_type in (RELEASE_RQ, RELEASE_RP, ABORT):
        if length != 4:
            raise ProtocolError("release or abort PDU of the wrong length", ABORT_INVALID_PARAMETER)
    elif pdu_type in (ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ):
        if length > MAX_ASSOCIATE_RQ:
            raise ProtocolError("association PDU too long")
    else:
        raise ProtocolError(f"unknown PDU type 0x{pdu_type:02x}", ABORT_UNRECOGNISED_PDU)
