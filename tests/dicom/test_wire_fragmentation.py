"""C-STOREs written on a raw socket, fragmented and grouped every way PS3.8 allows, against
a real `appliance serve`: what is stored is what was sent, byte for byte; a data set cut off
by an A-ABORT or a dropped connection leaves nothing."""

from __future__ import annotations

import json
import socket
import struct

import pytest
from conftest import run_cli
from support.dicom_server import CLIENT_AE, Server, free_port, register
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid

from appliance.dicom import dimse
from appliance.dicom.negotiation import Proposed
from appliance.dicom.pynetdicom_glue import decode_associate_ac, encode_associate_rq
from appliance.format import p10

SC = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT = "1.2.840.10008.1.2.1"


class RawAssociation:
    """The requestor's side written by hand: whatever PDUs the test chooses."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(encode_associate_rq(calling_ae=CLIENT_AE, called_ae="ARCHIVE",
                                              contexts=[Proposed(1, SC, (EXPLICIT,))], max_pdu=1 << 16,
                                              implementation_uid="1.2.3.4", implementation_version="RAW"))
        kind, body = self.read_pdu()
        assert kind == 2, kind
        accept = decode_associate_ac(struct.pack(">BBI", kind, 0, len(body)) + body)
        assert accept.results == [(1, 0, EXPLICIT)]

    def read_pdu(self) -> tuple[int, bytes]:
        head = self._exactly(6)
        kind, _, length = struct.unpack(">BBI", head)
        return kind, self._exactly(length)

    def _exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            more = self.sock.recv(count - len(data))
            if not more:
                raise ConnectionError("closed")
            data += more
        return data

    def send_pdvs(self, pdvs: list[tuple[int, bytes]], grouping: list[int]) -> None:
        """PDVs (control header, fragment) on context 1, `grouping[i]` of them per PDU."""
        pdus, at = [], 0
        for size in grouping + [len(pdvs)]:
            group = pdvs[at:at + max(size, 1)]
            if not group:
                break
            at += len(group)
            items = b"".join(struct.pack(">IBB", len(data) + 2, 1, control) + data for control, data in group)
            pdus.append(struct.pack(">BBI", 4, 0, len(items)) + items)
        self.sock.sendall(b"".join(pdus))

    def response(self) -> dict:
        command = b""
        while True:
            kind, body = self.read_pdu()
            assert kind == 4, kind
            at = 0
            while at < len(body):
                length, _, control = struct.unpack_from(">IBB", body, at)
                command += body[at + 6:at + 4 + length]
                at += 4 + length
                if control & 3 == 3:
                    return dimse.decode(command)

    def release(self) -> None:
        self.sock.sendall(struct.pack(">BBI", 5, 0, 4) + bytes(4))
        assert self.read_pdu()[0] == 6
        self.sock.close()


def _dataset(study_uid: str, pixels: bytes) -> tuple[str, bytes]:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SC, generate_uid()
    ds.PatientID, ds.PatientName = "RAW1", "RAW^WIRE"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality = "OT"
    ds.Columns = min(len(pixels) // 2, 1000)
    ds.Rows, ds.BitsAllocated, ds.SamplesPerPixel = max(1, len(pixels) // 2 // ds.Columns), 16, 1
    ds.PixelData = pixels
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return ds.SOPInstanceUID, out.getvalue()


def _cut(data: bytes, points: list[float]) -> list[bytes]:
    bounds = sorted({0, len(data), *(int(p * len(data)) for p in points)})
    return [data[low:high] for low, high in zip(bounds, bounds[1:])] or [b""]


def _store_pdvs(sop_uid: str, data: bytes, command_cuts: list[float], data_cuts: list[float]) -> list:
    command = dimse.encode({"CommandField": dimse.C_STORE_RQ, "MessageID": 7, "Priority": 0,
                            "AffectedSOPClassUID": SC, "AffectedSOPInstanceUID": sop_uid,
                            "CommandDataSetType": 1})
    commands = _cut(command, command_cuts)
    fragments = _cut(data, data_cuts)
    return ([(0x01 | (0x02 if n == len(commands) - 1 else 0), c) for n, c in enumerate(commands)]
            + [(0x02 if n == len(fragments) - 1 else 0, f) for n, f in enumerate(fragments)])


@pytest.fixture(scope="module")
def raw_server(tmp_path_factory):
    from appliance.admin import home as home_mod
    home = tmp_path_factory.mktemp("raw") / "home"
    home_mod.init(home)
    register(home, CLIENT_AE, free_port(), "store,query,retrieve")
    srv = Server(home).start()
    yield srv
    srv.stop()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pixels=st.binary(min_size=2, max_size=3000).map(lambda b: b[:len(b) & ~1] or b"\0\0"),
       command_cuts=st.lists(st.floats(0, 1), max_size=4), data_cuts=st.lists(st.floats(0, 1), max_size=8),
       grouping=st.lists(st.integers(1, 5), max_size=12))
def test_any_fragmentation_and_grouping_stores_the_bytes_sent(raw_server, pixels, command_cuts, data_cuts, grouping):
    """Command and data set cut into PDVs anywhere, several PDVs per PDU or one each, the
    command's last fragment and the data set's first in one PDU: Success, and the stored
    data set is the one sent."""
    sop_uid, data = _dataset("1.2.826.0.1.3680043.8.498.777", pixels)
    assoc = RawAssociation(raw_server.port)
    assoc.send_pdvs(_store_pdvs(sop_uid, data, command_cuts, data_cuts), grouping)
    rsp = assoc.response()
    assoc.release()
    assert rsp["Status"] == 0 and rsp["MessageIDBeingRespondedTo"] == 7 and rsp["AffectedSOPInstanceUID"] == sop_uid
    _SENT[sop_uid] = data


_SENT: dict[str, bytes] = {}


def test_every_fragmented_store_exports_byte_exact(raw_server, tmp_path):
    """(after the property test) every instance it stored, exported: meta + the data set sent."""
    assert _SENT, "the fragmentation test ran first"
    out = tmp_path / "out"
    run_cli("export", "1.2.826.0.1.3680043.8.498.777", str(out), home=raw_server.home)
    exported = {p.stem: p.read_bytes() for p in out.glob("*.dcm")}
    for sop_uid, data in _SENT.items():
        stored = exported[sop_uid]
        assert stored == p10.file_meta(SC, sop_uid, EXPLICIT) + data


@pytest.mark.parametrize("ending", ["abort", "close"])
def test_a_data_set_cut_off_stores_nothing_and_leaves_nothing(raw_server, ending):
    before = json.loads(run_cli("status", "--json", home=raw_server.home).stdout)["versions"]
    sop_uid, data = _dataset("1.2.826.0.1.3680043.8.498.778", bytes(range(256)) * 40000)  # a 10 MB data set
    pdvs = _store_pdvs(sop_uid, data, [], [n / 40 for n in range(1, 40)])
    assoc = RawAssociation(raw_server.port)
    assoc.send_pdvs(pdvs[:20], [1] * 20)  # the command and half the data set
    if ending == "abort":
        assoc.sock.sendall(struct.pack(">BBI", 7, 0, 4) + bytes(4))
    assoc.sock.close()
    # The server goes on; the half instance is nowhere: not indexed, no file of it anywhere.
    other_uid, other = _dataset("1.2.826.0.1.3680043.8.498.778", b"\1\2" * 100)
    assoc = RawAssociation(raw_server.port)
    assoc.send_pdvs(_store_pdvs(other_uid, other, [], []), [3])
    assert assoc.response()["Status"] == 0
    assoc.release()
    status = json.loads(run_cli("status", "--json", home=raw_server.home).stdout)
    assert status["versions"] == before + 1
    assert not list((raw_server.home / "hot" / ".incoming").iterdir())
