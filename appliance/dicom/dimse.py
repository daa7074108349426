"""DIMSE command sets (PS3.7 9.3, 10.3, E): always implicit VR little endian. Pure.

A command is a dict of keywords (pydicom's names for group 0000) to values: str for
UI/AE/LO, int for US/UL, a list of ints for a multi-valued US or AT. `decode` checks
the framing of every element; `encode` adds the group length and pads every value to
an even length as PS3.5 says (UI with NUL, text with a space).
"""

from __future__ import annotations

import struct

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from appliance.dicom.pdu import ProtocolError

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
N_EVENT_REPORT_RQ, N_EVENT_REPORT_RSP = 0x0100, 0x8100
N_GET_RQ, N_SET_RQ, N_CREATE_RQ, N_DELETE_RQ = 0x0110, 0x0120, 0x0140, 0x0150
N_ACTION_RQ, N_ACTION_RSP = 0x0130, 0x8130
C_CANCEL_RQ = 0x0FFF
NAMES = {C_STORE_RQ: "C-STORE-RQ", C_STORE_RSP: "C-STORE-RSP", C_GET_RQ: "C-GET-RQ", C_GET_RSP: "C-GET-RSP",
         C_FIND_RQ: "C-FIND-RQ", C_FIND_RSP: "C-FIND-RSP", C_MOVE_RQ: "C-MOVE-RQ", C_MOVE_RSP: "C-MOVE-RSP",
         C_ECHO_RQ: "C-ECHO-RQ", C_ECHO_RSP: "C-ECHO-RSP", N_EVENT_REPORT_RQ: "N-EVENT-REPORT-RQ",
         N_EVENT_REPORT_RSP: "N-EVENT-REPORT-RSP", N_ACTION_RQ: "N-ACTION-RQ", N_ACTION_RSP: "N-ACTION-RSP",
         C_CANCEL_RQ: "C-CANCEL-RQ"}
NO_DATA_SET = 0x0101
DATA_SET = 0x0000  # any other value than 0x0101 says a data set follows

PENDING, PENDING_WARNING, CANCEL = 0xFF00, 0xFF01, 0xFE00
SUCCESS = 0x0000

_ELEMENT = struct.Struct("<HHI")
_MAX_COMMAND = 64 << 10  # a command set is a few hundred bytes; more is not a command set


def _vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


_KEYWORDS: dict[int, tuple[str, str]] = {}  # element number -> (keyword, VR), filled lazily
_TAGS: dict[str, tuple[int, str]] = {}


def _element(element: int) -> tuple[str, str]:
    known = _KEYWORDS.get(element)
    if known is None:
        tag = element
        known = _KEYWORDS[element] = (keyword_for_tag(tag) or f"0000{element:04X}", _vr(tag))
    return known


def _tag(keyword: str) -> tuple[int, str]:
    known = _TAGS.get(keyword)
    if known is None:
        tag = tag_for_keyword(keyword)
        if tag is None or tag >> 16:
            raise ValueError(f"{keyword} is not a command element")
        known = _TAGS[keyword] = (tag & 0xFFFF, _vr(tag))
    return known


def decode(raw) -> dict:
    """The command set's elements by keyword; raises ProtocolError when it is malformed."""
    raw = bytes(raw)
    if len(raw) > _MAX_COMMAND:
        raise ProtocolError("command set too long")
    out: dict = {}
    at = 0
    while at < len(raw):
        if len(raw) - at < 8:
            raise ProtocolError("command set ends inside an element header")
        group, element, length = _ELEMENT.unpack_from(raw, at)
        at += 8
        if group != 0 or at + length > len(raw):
            raise ProtocolError("command set element outside group 0000 or past its end")
        value = raw[at:at + length]
        at += length
        keyword, vr = _element(element)
        out[keyword] = _value(vr, value)
    if "CommandField" not in out:
        raise ProtocolError("command set without Command Field")
    return out


def _value(vr: str, value: bytes):
    if vr in ("US", "UL", "AT"):
        size = 2 if vr == "US" else 4
        if len(value) % size:
            raise ProtocolError(f"command element of VR {vr} has a bad length")
        fmt = "<" + ("H" if vr == "US" else "I") * (len(value) // size)
        numbers = list(struct.unpack(fmt, value)) if vr != "AT" else \
            [(a << 16) | b for a, b in zip(*[iter(struct.unpack("<" + "H" * (len(value) // 2), value))] * 2)]
        return numbers[0] if len(numbers) == 1 and vr != "AT" else numbers
    return value.decode("ascii", "replace").rstrip("\0 ").lstrip(" ")


def encode(command: dict) -> bytes:
    """The command set, group length first, elements in tag order."""
    elements = []
    for keyword, value in command.items():
        if value is None:
            continue
        element, vr = _tag(keyword)
        elements.append((element, _encoded(vr, value)))
    elements.sort()
    body = b"".join(_ELEMENT.pack(0, element, len(data)) + data for element, data in elements)
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<I", len(body)) + body


def _encoded(vr: str, value) -> bytes:
    if vr in ("US", "UL"):
        values = value if isinstance(value, (list, tuple)) else [value]
        return struct.pack("<" + ("H" if vr == "US" else "I") * len(values), *values)
    if vr == "AT":
        values = value if isinstance(value, (list, tuple)) else [value]
        return b"".join(struct.pack("<HH", v >> 16, v & 0xFFFF) for v in values)
    data = str(value).encode("ascii", "replace")
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    return data


def describe(command: dict) -> str:
    """One line for a debug log: the message and its UIDs, never an identifier's content."""
    name = NAMES.get(command.get("CommandField"), f"command 0x{command.get('CommandField', 0):04x}")
    parts = [name]
    for keyword in ("MessageID", "MessageIDBeingRespondedTo", "AffectedSOPClassUID", "RequestedSOPClassUID",
                    "AffectedSOPInstanceUID", "MoveDestination", "Status"):
        if keyword in command:
            value = command[keyword]
            parts.append(f"{keyword}={value:#06x}" if keyword == "Status" else f"{keyword}={value}")
    return " ".join(parts)


def has_data_set(command: dict) -> bool:
    return command.get("CommandDataSetType", NO_DATA_SET) != NO_DATA_SET


def response(request: dict, field: int, status: int, **elements) -> dict:
    """A response to `request` (its message id and SOP class and instance echoed)."""
    rsp = {"CommandField": field, "MessageIDBeingRespondedTo": request.get("MessageID", 0),
           "CommandDataSetType": NO_DATA_SET, "Status": status}
    for keyword in ("AffectedSOPClassUID", "AffectedSOPInstanceUID"):
        if keyword in request:
            rsp[keyword] = request[keyword]
    if "RequestedSOPClassUID" in request and field in (N_ACTION_RSP,):
        rsp["AffectedSOPClassUID"] = request["RequestedSOPClassUID"]
        rsp["AffectedSOPInstanceUID"] = request.get("RequestedSOPInstanceUID")
    for keyword, value in elements.items():
        if value in (None, ""):
            continue
        rsp[keyword] = str(value)[:64] if keyword == "ErrorComment" else value
    return rsp
