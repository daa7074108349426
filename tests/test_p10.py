"""Reading received files: framing checks and index attributes."""

import struct

import pydicom
import pytest
from pydicom.data import get_testdata_file

from appliance.errors import InvalidInstance
from appliance.store import p10


def test_reads_index_attributes(ct_files):
    info = p10.inspect(ct_files[0])
    ds = pydicom.dcmread(ct_files[0])
    assert info.sop_uid == ds.SOPInstanceUID and info.study_uid == ds.StudyInstanceUID
    assert info.series_uid == ds.SeriesInstanceUID
    assert info.patient["PatientName"] == "DOE^JANE" and info.series["Modality"] == "CT"
    assert info.transfer_syntax == "1.2.840.10008.1.2.1" and info.compressible
    assert info.length == ct_files[0].stat().st_size


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "ExplVR_BigEndNoMeta.dcm", "OT-PAL-8-face.dcm",
                                  "SC_rgb_jpeg.dcm", "JPEG2000.dcm", "image_dfl.dcm"])
def test_accepts_real_world_encodings(name):
    info = p10.inspect(get_testdata_file(name))
    assert info.sop_uid and info.study_uid


def test_encapsulated_pixel_data_is_not_compressible():
    assert not p10.inspect(get_testdata_file("JPEG2000.dcm")).compressible


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan_truncated.dcm",
                                  "emri_small_jpeg_2k_lossless_too_short.dcm"])
def test_rejects_truncated_files_pydicom_accepts(name):
    path = get_testdata_file(name)
    pydicom.dcmread(path)  # pydicom reads it without complaint...
    with pytest.raises(InvalidInstance, match="truncated"):
        p10.inspect(path)  # ...the archive does not


def test_rejects_cut_anywhere_inside_pixel_data(ct_files, tmp_path):
    data = ct_files[0].read_bytes()
    for cut in (1, 100, 1000, len(data) // 2):
        path = tmp_path / f"cut{cut}.dcm"
        path.write_bytes(data[:-cut])
        with pytest.raises(InvalidInstance, match="truncated"):
            p10.inspect(path)


def test_rejects_cut_inside_a_sequence(tmp_path):
    data = open(get_testdata_file("rtplan.dcm"), "rb").read()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(InvalidInstance):
        p10.inspect(path)


@pytest.mark.parametrize("content,reason", [
    (b"", "empty"),
    (b"hello, this is a text file\n" * 10, "not a DICOM file"),
    (b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI" + struct.pack("<H", 200) + b"1.2", "truncated"),
])
def test_rejects_non_dicom(tmp_path, content, reason):
    path = tmp_path / "bad.dcm"
    path.write_bytes(content)
    with pytest.raises(InvalidInstance, match=reason):
        p10.inspect(path)


def test_rejects_missing_uids(tmp_path, ct_files):
    ds = pydicom.dcmread(ct_files[0])
    del ds.StudyInstanceUID
    path = tmp_path / "nostudy.dcm"
    ds.save_as(path)
    with pytest.raises(InvalidInstance, match="missing StudyInstanceUID"):
        p10.inspect(path)
    ds = pydicom.dcmread(ct_files[0])
    ds.SOPInstanceUID = "not-a-uid"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    ds.save_as(path)
    with pytest.raises(InvalidInstance, match="SOPInstanceUID is not a valid UID"):
        p10.inspect(path)


def test_rejects_missing_file():
    with pytest.raises(InvalidInstance, match="cannot read"):
        p10.inspect("/nonexistent/file.dcm")
