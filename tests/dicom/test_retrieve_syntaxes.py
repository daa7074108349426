"""Every client gets its images (issue 18): the test corpus stored in every transfer syntax it
comes in, retrieved by dcmtk's getscu with each `+x` option (its syntax first: the stored
bytes, exactly) and with none (uncompressed only: transcoded), and moved to a storescp that
takes implicit VR little endian only. Transcoded instances carry the original's pixels
(lossless syntaxes) and every other element unchanged."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import dicom_test_files
from support.dicom_server import (
    CLIENT_AE,
    DEST_AE,
    Server,
    dataset_bytes,
    dcmtk,
    free_port,
    retrieving_home,
    send_as_is,
    storable,
)
from pydicom.uid import UID

from appliance import config as cfg
from appliance.admin.home import open_archive
from appliance.store.catalog import Instance
from appliance.format import transcode

# getscu's option that proposes each syntax first for its storage contexts. None proposes
# implicit VR little endian (those instances go transcoded, below); deflated is left out because
# getscu cannot keep a deflated data set bit for bit (+B): test_dicom checks it byte-exact with
# pynetdicom's C-GET.
GETSCU_OPTION = {
    "1.2.840.10008.1.2.1": "+xe", "1.2.840.10008.1.2.2": "+xb", "1.2.840.10008.1.2.4.50": "+xy", "1.2.840.10008.1.2.4.51": "+xx",
    "1.2.840.10008.1.2.4.70": "+xs", "1.2.840.10008.1.2.4.80": "+xt", "1.2.840.10008.1.2.4.81": "+xu",
    "1.2.840.10008.1.2.4.90": "+xv", "1.2.840.10008.1.2.4.91": "+xw", "1.2.840.10008.1.2.5": "+xr",
}
# Elements a decoding may change (transcode.py); everything else must come back equal.
_DECODING_CHANGES = {"PixelData", "PhotometricInterpretation", "PlanarConfiguration", "LossyImageCompression",
                     "LossyImageCompressionMethod", "LossyImageCompressionRatio", "ExtendedOffsetTable",
                     "ExtendedOffsetTableLengths"}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A server holding the corpus, and what it holds: SOP Instance UID -> (syntax, stored data set)."""
    dest_port = free_port()
    home = retrieving_home(tmp_path_factory.mktemp("syntaxes"), dest_port)
    files = storable(dicom_test_files())
    srv = Server(home).start()
    by_syntax: dict[str, list] = {}
    for path, info in files:
        by_syntax.setdefault(info.transfer_syntax, []).append((path, info))
    for group in by_syntax.values():
        send_as_is(srv, group)
    held = {}
    with open_archive(cfg.load(home)) as archive:
        with archive.catalog.read() as view:
            records = {instance.sop_uid: instance for instance in view.instances()}
        for sop, record in records.items():
            data = b"".join(archive.open_instance(sop))
            held[sop] = (record.transfer_syntax, record, data)
    yield srv, held, dest_port
    srv.stop()


def _get(srv, out: Path, record: Instance, *options: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    return dcmtk("getscu", "-S", "+B", *options, "-aet", CLIENT_AE, "-aec", "ARCHIVE", "127.0.0.1", str(srv.port),
                 "-od", str(out), "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={record.study}",
                 "-k", f"SeriesInstanceUID={record.series}", "-k", f"SOPInstanceUID={record.sop_uid}",
                 check=False)


def _decodable(data: bytes):
    from io import BytesIO
    try:
        return pydicom.dcmread(BytesIO(data)).pixel_array
    except Exception:  # noqa: BLE001 - pydicom cannot decode it either: nothing to compare
        return None


def _same_except_decoding(original: bytes, received: Path) -> None:
    from io import BytesIO
    a, b = pydicom.dcmread(BytesIO(original)), pydicom.dcmread(received)
    assert a.SOPInstanceUID == b.SOPInstanceUID
    kept = {e.keyword for e in a if e.keyword and e.keyword not in _DECODING_CHANGES}
    assert kept <= {e.keyword for e in b}, sorted(kept - {e.keyword for e in b})
    for keyword in kept:
        if a[keyword].VR != "SQ":
            assert a[keyword].value == b[keyword].value or str(a[keyword].value) == str(b[keyword].value), keyword


def test_each_syntax_is_sent_as_stored_to_a_getscu_that_prefers_it(stored, tmp_path):
    srv, held, _ = stored
    checked = 0
    for sop, (syntax, record, data) in sorted(held.items()):
        option = GETSCU_OPTION.get(syntax)
        if option is None:
            continue
        out = tmp_path / sop
        result = _get(srv, out, record, option)
        [got] = list(out.iterdir()) or [None]
        assert got is not None, (syntax, result.stderr[-500:])
        assert pydicom.dcmread(got, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
        assert dataset_bytes(got) == data[_dataset_start(data):], sop
        checked += 1
    assert checked > 100


def _dataset_start(data: bytes) -> int:
    from appliance.format import p10
    return p10.dataset_offset(data[:1 << 16])


def test_other_syntaxes_reach_a_getscu_that_takes_only_explicit_vr(stored, tmp_path):
    """getscu's default (explicit VR, little then big endian): compressed, deflated and implicit
    instances arrive transcoded, big endian ones as stored."""
    srv, held, _ = stored
    others = {sop: v for sop, v in held.items() if v[0] not in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")}
    assert len({v[0] for v in others.values()}) >= 9  # implicit, deflated, JPEG, JPEG-LS, JPEG 2000, RLE ...
    for sop, (syntax, record, data) in sorted(others.items()):
        original = _decodable(data)
        out = tmp_path / sop
        result = _get(srv, out, record)  # getscu's default: uncompressed syntaxes only
        received = list(out.iterdir())
        if original is None:  # what pydicom cannot decode either may fail, saying why
            assert received or "Failed Suboperations    : 1" in result.stderr, syntax
            continue
        assert received, (sop, syntax, result.stderr[-800:])
        [got] = received
        assert pydicom.dcmread(got, stop_before_pixels=True).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        _same_except_decoding(data, got)
        if not transcode.DECODINGS.get(syntax, transcode.Decoding("", False)).lossy:
            assert np.array_equal(pydicom.dcmread(got).pixel_array, original), sop


def test_a_move_to_an_implicit_only_storescp_delivers_every_decodable_instance(stored, tmp_path):
    srv, held, dest_port = stored
    out = tmp_path / "moved"
    out.mkdir()
    storescp = subprocess.Popen(["/usr/bin/storescp", "+B", "+xi", "-aet", DEST_AE, "-od", str(out), str(dest_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        for study in sorted({record.study for _, record, _ in held.values()}):
            dcmtk("movescu", "-S", "-aem", DEST_AE, "-aet", CLIENT_AE, "-aec", "ARCHIVE", "127.0.0.1",
                  str(srv.port), "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", check=False)
    finally:
        storescp.terminate()
        storescp.wait()
    received = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in out.iterdir()}
    for sop, (syntax, _, data) in held.items():
        if sop not in received:
            assert UID(syntax).is_compressed and _decodable(data) is None, (sop, syntax)
            continue
        got = received[sop]
        assert pydicom.dcmread(got, stop_before_pixels=True).file_meta.TransferSyntaxUID == transcode.UNCOMPRESSED[1]
        if syntax == transcode.UNCOMPRESSED[1]:
            assert dataset_bytes(got) == data[_dataset_start(data):]
        elif UID(syntax).is_compressed and not transcode.DECODINGS.get(syntax, transcode.Decoding("", True)).lossy:
            assert np.array_equal(pydicom.dcmread(got).pixel_array, _decodable(data)), sop
    assert len(received) > 0.9 * len(held)
