"""pynetdicom's own getscu and movescu (`python -m pynetdicom ...`) retrieving a study of compressed
corpus instances (issue 18): every instance arrives, in a transfer syntax the app accepted, and
the pixels of the lossless ones equal pydicom's decoding of the original."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from support.dicom_server import CLIENT_AE, DEST_AE, Server, corpus_study, free_port, retrieving_home, send_as_is, storable
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES

from appliance.format import transcode


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A server holding the study; (server, its files by SOP Instance UID, study UID, C-MOVE destination port)."""
    work, dest_port = tmp_path_factory.mktemp("pynetdicom-apps"), free_port()
    home = retrieving_home(work, dest_port)
    files = corpus_study(work / "study")
    srv = Server(home).start()
    send_as_is(srv, storable(files))
    originals = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in files}
    yield srv, originals, pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID, dest_port
    srv.stop()


def _pynetdicom_app(app: str, srv, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pynetdicom", app, "127.0.0.1", str(srv.port), "-aet", CLIENT_AE,
                           "-aec", "ARCHIVE", "-S", *args], capture_output=True, text=True, timeout=300)


def _received(out: Path) -> dict[str, Path]:
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in out.iterdir()}


def _assert_pixels_kept(original: Path, got: Path) -> None:
    stored = pydicom.dcmread(original, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if not transcode.DECODINGS.get(stored, transcode.Decoding("", False)).lossy:
        assert np.array_equal(pydicom.dcmread(got).pixel_array, pydicom.dcmread(original).pixel_array), original.name


def test_pynetdicom_getscu_gets_every_instance_in_a_syntax_it_proposed(study, tmp_path):
    """Its storage contexts propose the uncompressed syntaxes only (implicit VR first): the
    compressed instances arrive decoded, in its first choice."""
    srv, originals, study_uid, _ = study
    result = _pynetdicom_app("getscu", srv, "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                             "-od", str(tmp_path))
    received = _received(tmp_path)
    assert set(received) == set(originals), result.stderr[-2000:]
    for sop, got in received.items():
        syntax = pydicom.dcmread(got, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert syntax == DEFAULT_TRANSFER_SYNTAXES[0], (originals[sop].name, syntax)
        _assert_pixels_kept(originals[sop], got)


def test_pynetdicom_movescu_storage_scp_gets_every_instance_as_stored(study, tmp_path):
    """Its Storage SCP accepts every transfer syntax: each instance arrives in its stored one,
    its data set byte for byte."""
    srv, originals, study_uid, dest_port = study
    result = _pynetdicom_app("movescu", srv, "-aem", DEST_AE, "--store", "--store-aet", DEST_AE,
                             "--store-port", str(dest_port), "-k", "QueryRetrieveLevel=STUDY",
                             "-k", f"StudyInstanceUID={study_uid}", "-od", str(tmp_path))
    received = _received(tmp_path)
    assert set(received) == set(originals), result.stderr[-2000:]
    for sop, got in received.items():
        original = originals[sop]
        stored = pydicom.dcmread(original, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert pydicom.dcmread(got, stop_before_pixels=True).file_meta.TransferSyntaxUID == stored
        _assert_pixels_kept(original, got)
