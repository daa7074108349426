"""DIMSE command sets and PDV framing: pure codecs, against pydicom's own reading."""

from io import BytesIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.filereader import read_dataset

from appliance.dicom import dimse, negotiation, pdu

_UID = st.from_regex(r"[1-9][0-9]{0,3}(\.[0-9]{1,5}){1,8}", fullmatch=True)
_AE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\"), min_size=1,
              max_size=16)


@settings(max_examples=200)
@given(field=st.sampled_from(sorted(dimse.NAMES)), message_id=st.integers(0, 65535), sop_class=_UID,
       sop_instance=st.one_of(st.none(), _UID), status=st.one_of(st.none(), st.integers(0, 65535)),
       comment=st.one_of(st.none(), st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E,
                                                          exclude_characters="\\"), max_size=64)),
       destination=st.one_of(st.none(), _AE))
def test_command_sets_round_trip_and_read_as_pydicom_reads_them(field, message_id, sop_class, sop_instance, status,
                                                                comment, destination):
    command = {"CommandField": field, "MessageID": message_id, "AffectedSOPClassUID": sop_class,
               "AffectedSOPInstanceUID": sop_instance, "Status": status, "ErrorComment": comment,
               "MoveDestination": destination, "CommandDataSetType": dimse.NO_DATA_SET}
    raw = dimse.encode(command)
    expected = {k: v for k, v in command.items() if v is not None}
    if "ErrorComment" in expected:
        expected["ErrorComment"] = expected["ErrorComment"].strip()
    if "MoveDestination" in expected:
        expected["MoveDestination"] = expected["MoveDestination"].strip()
    decoded = dimse.decode(raw)
    assert {k: v for k, v in decoded.items() if k != "CommandGroupLength"} == expected
    assert decoded["CommandGroupLength"] == len(raw) - 12
    ds = read_dataset(BytesIO(raw), True, True)  # pydicom: implicit VR little endian
    assert ds.CommandField == field and ds.MessageID == message_id and ds.AffectedSOPClassUID == sop_class
    assert len(raw) % 2 == 0


@pytest.mark.parametrize("raw", [
    b"\x00\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00",  # group length, no Command Field
    b"\x08\x00\x18\x00\x02\x00\x00\x001\x00",  # an element outside group 0000
    b"\x00\x00\x00\x01\x02\x00\x00\x00\x30",  # a value running past the end
    b"\x00\x00\x00\x01\x03\x00\x00\x00\x30\x00\x00",  # US of three bytes
])
def test_malformed_command_sets_are_protocol_errors(raw):
    with pytest.raises(pdu.ProtocolError):
        dimse.decode(raw)


@settings(max_examples=200)
@given(fragments=st.lists(st.tuples(st.sampled_from([1, 3, 255]), st.integers(0, 3), st.binary(max_size=40)),
                          min_size=1, max_size=6))
def test_pdv_items_come_out_as_they_went_in(fragments):
    body = b"".join(pdu.PDV_HEADER.pack(len(data) + 2, context, control) + data for context, control, data in fragments)
    assert [(p.context_id, p.control, bytes(p.data)) for p in pdu.pdvs(memoryview(body))] == fragments


@settings(max_examples=200)
@given(body=st.binary(max_size=60))
def test_any_p_data_body_is_either_pdvs_or_a_protocol_error(body):
    try:
        items = list(pdu.pdvs(memoryview(body)))
    except pdu.ProtocolError:
        return
    assert sum(len(p.data) + 6 for p in items) == len(body)


@settings(max_examples=100)
@given(size=st.integers(0, 5000), max_pdu=st.sampled_from([0, 16, 100, 4096]))
def test_a_message_is_cut_to_the_peers_maximum_pdu(size, max_pdu):
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    pdus = [b"".join(bytes(b) for b in buffers) for buffers in pdu.message_pdus(1, b"CMD!", data, max_pdu)]
    assert all(len(p) - pdu.HEADER_SIZE <= max_pdu for p in pdus) if max_pdu else len(pdus) == 2
    fragments = [item for p in pdus for item in pdu.pdvs(memoryview(p[pdu.HEADER_SIZE:]))]
    assert b"".join(bytes(f.data) for f in fragments if f.is_command) == b"CMD!"
    assert b"".join(bytes(f.data) for f in fragments if not f.is_command) == data
    assert [f.is_last for f in fragments if not f.is_command][-1]
    assert sum(f.is_last for f in fragments) == 2


def test_the_requestor_order_decides_only_where_the_requestor_takes_instances():
    jpeg, j2k = "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90"
    ct = "1.2.840.10008.5.1.4.1.1.2"
    support = {ct: negotiation.Support((*negotiation.UNCOMPRESSED, jpeg, j2k), offers_scu=True)}
    proposed = [negotiation.Proposed(1, ct, (j2k, negotiation.EXPLICIT_LE)),
                negotiation.Proposed(3, ct, (jpeg, negotiation.IMPLICIT_LE)),
                negotiation.Proposed(5, "1.2.3.4", (negotiation.EXPLICIT_LE,))]
    stored = negotiation.negotiate(proposed, {}, support)
    assert stored.accepted[1].transfer_syntax == negotiation.EXPLICIT_LE  # ours: uncompressed first
    assert stored.accepted[3].transfer_syntax == negotiation.IMPLICIT_LE
    assert (5, negotiation.ABSTRACT_SYNTAX_NOT_SUPPORTED) in {(c, r) for c, r, _ in stored.results}
    taken = negotiation.negotiate(proposed, {ct: (False, True)}, support)
    assert taken.accepted[1].transfer_syntax == j2k and taken.accepted[3].transfer_syntax == jpeg
    assert taken.accepted[1].requestor_scp and not taken.accepted[1].requestor_scu
    assert taken.roles == {ct: (False, True)}
