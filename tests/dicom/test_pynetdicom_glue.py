"""The A-ASSOCIATE PDUs pynetdicom codes for the server (appliance/dicom/pynetdicom_glue.py),
checked byte by byte against PS3.8 9.3.2-9.3.3: if a pynetdicom release codes them
otherwise, these say which field and where."""

import struct

from appliance.dicom import negotiation
from appliance.dicom.negotiation import Outcome, Proposed
from appliance.dicom.pynetdicom_glue import (decode_associate_ac, decode_associate_rq, encode_associate_ac,
                                             encode_associate_rq)

CT, EXPLICIT, IMPLICIT = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def _uid(kind: int, uid: str) -> bytes:
    return _item(kind, uid.encode())


def _request() -> bytes:
    """An A-ASSOCIATE-RQ as PS3.8 Table 9-11 lays it out, written by hand."""
    context = bytes((3, 0, 0, 0)) + _uid(0x30, CT) + _uid(0x40, EXPLICIT) + _uid(0x40, IMPLICIT)
    role = struct.pack(">H", len(CT)) + CT.encode() + bytes((0, 1))
    user = (_item(0x51, struct.pack(">I", 16384)) + _uid(0x52, "1.2.3.4.5") + _item(0x55, b"TESTIMPL")
            + _item(0x54, role) + _item(0x58, bytes((1, 0)) + struct.pack(">H", 5) + b"alice" + b"\0\0"))
    body = (struct.pack(">HH", 1, 0) + b"ARCHIVE".ljust(16) + b"PACS1".ljust(16) + bytes(32)
            + _uid(0x10, "1.2.840.10008.3.1.1.1") + _item(0x20, context) + _item(0x50, user))
    return struct.pack(">BBI", 1, 0, len(body)) + body


def test_an_associate_request_decodes_field_by_field():
    request = decode_associate_rq(_request())
    assert (request.calling_ae, request.called_ae) == ("PACS1", "ARCHIVE")
    assert request.application_context == negotiation.APPLICATION_CONTEXT
    assert request.contexts == [Proposed(3, CT, (EXPLICIT, IMPLICIT))]
    assert request.max_pdu == 16384 and request.implementation_uid == "1.2.3.4.5"
    assert request.implementation_version == "TESTIMPL"
    assert request.roles == {CT: (False, True)} and request.user_identity == "alice"


def _items(raw: bytes, at: int) -> list[tuple[int, bytes]]:
    out = []
    while at < len(raw):
        kind, _, length = struct.unpack_from(">BBH", raw, at)
        out.append((kind, raw[at + 4:at + 4 + length]))
        at += 4 + length
    return out


def test_an_associate_accept_encodes_field_by_field():
    request = decode_associate_rq(_request())
    outcome = Outcome(results=[(3, 0, IMPLICIT)], roles={CT: (False, True)})
    raw = encode_associate_ac(request, outcome, max_pdu=1 << 20, implementation_uid="1.2.3.9",
                              implementation_version="PV1")
    pdu_type, _, length = struct.unpack_from(">BBI", raw)
    assert pdu_type == 2 and length == len(raw) - 6
    assert raw[10:26] == b"ARCHIVE".ljust(16) and raw[26:42] == b"PACS1".ljust(16)
    items = _items(raw, 74)
    assert items[0] == (0x10, b"1.2.840.10008.3.1.1.1")
    context = items[1]
    assert context[0] == 0x21 and context[1][0] == 3 and context[1][2] == 0  # id 3, accepted
    assert _items(context[1], 4) == [(0x40, IMPLICIT.encode())]
    user = dict(_items(items[2][1], 0))
    assert items[2][0] == 0x50 and struct.unpack(">I", user[0x51]) == (1 << 20,)
    assert user[0x52] == b"1.2.3.9" and user[0x55] == b"PV1"
    assert user[0x54] == struct.pack(">H", len(CT)) + CT.encode() + bytes((0, 1))


def test_a_request_we_send_is_the_request_we_read():
    raw = encode_associate_rq(calling_ae="ARCHIVE", called_ae="DEST", contexts=[Proposed(1, CT, (EXPLICIT,))],
                              max_pdu=65536, implementation_uid="1.2.3.9", implementation_version="PV1",
                              roles={CT: (False, True)})
    request = decode_associate_rq(raw)
    assert (request.calling_ae, request.called_ae, request.contexts) == ("ARCHIVE", "DEST",
                                                                         [Proposed(1, CT, (EXPLICIT,))])
    assert request.max_pdu == 65536 and request.roles == {CT: (False, True)}
    accept = decode_associate_ac(encode_associate_ac(request, Outcome(results=[(1, 0, EXPLICIT)]), max_pdu=4096,
                                                     implementation_uid="1.2.3.9", implementation_version="PV1"))
    assert accept.results == [(1, 0, EXPLICIT)] and accept.max_pdu == 4096
