"""A 256 MB multi-frame JPEG 2000 lossless instance fetched by C-GET by a client that takes explicit
VR little endian only (issue 18): it arrives decoded, its frames equal pydicom's decoding of the
original, the server's peak RSS stays under 300 MB (the decoded copy is built in a memfd), and the
client hears from the archive while the instance decodes: Pending C-GET responses, or its DIMSE
timeout (pynetdicom's default: 30 s) would end the retrieve before the instance comes. A client
that gives up meanwhile leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet, Verification

import corpus
from support.dicom_server import CLIENT_AE, Server, retrieving_home, send_as_is, storable


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A server holding the instance, and the instance's file."""
    work = tmp_path_factory.mktemp("large-j2k")
    home = retrieving_home(work)
    original = corpus.multiframe_j2k(work / "j2k.dcm", 256)
    server = Server(home).start()
    send_as_is(server, storable([original]))
    yield server, original
    server.stop()


def _explicit_le_only_client(sop_class: str, on_store):
    """A C-GET requestor whose storage context for `sop_class` takes explicit VR little endian only."""
    ae = AE(ae_title=CLIENT_AE)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(Verification)
    ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    return ae, dict(ae_title="ARCHIVE", max_pdu=0, ext_neg=[build_role(sop_class, scp_role=True)],
                    evt_handlers=[(evt.EVT_C_STORE, on_store)])


def _query(ds) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", ds.StudyInstanceUID
    return query


def test_a_256_mb_jpeg_2000_instance_is_sent_decoded_within_the_rss_bound(stored, tmp_path, monkeypatch):
    server, original = stored
    ds = pydicom.dcmread(original, stop_before_pixels=True)
    received = tmp_path / "received.dcm"
    statuses, pending_before_store = [], []

    def on_store(event):  # the data set as received, in a file (pynetdicom's chunked receive)
        pending_before_store.append(statuses.count(0xFF00))
        shutil.move(event.dataset_path, received)
        return 0x0000

    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
    ae, options = _explicit_le_only_client(ds.SOPClassUID, on_store)
    assoc = ae.associate("127.0.0.1", server.port, **options)
    for status, _ in assoc.send_c_get(_query(ds), StudyRootQueryRetrieveInformationModelGet):
        statuses.append(status.Status)
    assoc.release()
    peak_kb = server.peak_rss_kb()
    assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    assert pending_before_store[0] > 0
    got = pydicom.dcmread(received, stop_before_pixels=True)
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (got.SOPInstanceUID, got.NumberOfFrames) == (ds.SOPInstanceUID, ds.NumberOfFrames)
    for index in (0, 1, ds.NumberOfFrames // 2, ds.NumberOfFrames - 1):
        assert np.array_equal(pixel_array(received, index=index), pixel_array(original, index=index)), index
    print(f"server peak RSS {peak_kb / 1024:.0f} MB")
    assert peak_kb < 300 * 1024, f"server peak RSS {peak_kb / 1024:.0f} MB"


def _transcode_memfds(pid: int) -> list[str]:
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith("/memfd:pacs-vault-transcode"):
            found.append(target)
    return found


def test_a_client_that_aborts_while_its_instance_decodes_leaves_no_decoded_copy(stored):
    server, original = stored
    ds = pydicom.dcmread(original, stop_before_pixels=True)
    ae, options = _explicit_le_only_client(ds.SOPClassUID, lambda event: 0x0000)
    assoc = ae.associate("127.0.0.1", server.port, **options)
    for status, _ in assoc.send_c_get(_query(ds), StudyRootQueryRetrieveInformationModelGet):
        if status.Status == 0xFF00:  # Pending while the instance decodes: give up
            assoc.abort()
            break
    pid = server.process.pid
    assert _transcode_memfds(pid), "no transcode under way"
    deadline = time.monotonic() + 300
    while _transcode_memfds(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _transcode_memfds(pid) == []
    echo = AE(ae_title=CLIENT_AE)
    echo.add_requested_context(Verification)
    assoc = echo.associate("127.0.0.1", server.port, ae_title="ARCHIVE")
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
