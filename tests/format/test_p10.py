"""Reading received files: framing checks and index attributes."""

import struct

import pydicom
import pytest
from conftest import dicom_test_files
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from appliance.errors import InvalidInstance
from appliance.format import p10


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


# -- the index attributes equal pydicom's own reading ---------------------------------------------

def _read_by_pydicom(path) -> dict:
    """What pydicom makes of the attributes inspect() keeps: the oracle for the walk's capture."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    meta = getattr(ds, "file_meta", None)
    out = {}
    for keyword in (*p10.PATIENT_KEYS, *p10.STUDY_KEYS, *p10.SERIES_KEYS, *p10.INSTANCE_KEYS):
        value = p10.text_value(ds.get(keyword)).strip("\x00 ")
        if not value and meta is not None and keyword in ("SOPInstanceUID", "SOPClassUID"):
            value = p10.text_value(meta.get(f"MediaStorage{keyword}")).strip("\x00 ")
        out[keyword] = value
    bits = ds.get("BitsAllocated")
    out["bits_allocated"] = bits if isinstance(bits, int) else 0
    out["charset"] = p10.text_value(ds.get("SpecificCharacterSet"))
    return out


def _as_inspected(info: p10.InstanceInfo) -> dict:
    return {**info.patient, **info.study, **info.series, **info.instance, "bits_allocated": info.bits_allocated,
            "charset": info.specific_character_set}


def test_every_test_file_reads_as_pydicom_reads_it():
    """Every file of pydicom's and pydicom-data's test data that the archive accepts: the
    attributes taken during the walk equal pydicom's full reading (character sets, implicit
    and big-endian files, files without meta, deflated, multi-valued and odd values)."""
    compared = 0
    for path in dicom_test_files():
        try:
            info = p10.inspect(path)
        except InvalidInstance:
            continue
        assert _as_inspected(info) == _read_by_pydicom(path), path.name
        compared += 1
    assert compared > 200


_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\\\x00", exclude_categories=("Cs", "Cc")),
                max_size=20)


@settings(max_examples=150, deadline=None)
@example(name="", other_name="=", description="", ids=[""], number=0, rows=0, charset="ISO_IR 192",
         syntax="1.2.840.10008.1.2", padded=True)  # empty trailing component groups: pydicom drops them
@given(name=_TEXT, other_name=_TEXT, description=_TEXT, ids=st.lists(_TEXT, min_size=1, max_size=3),
       number=st.integers(-(2 ** 31), 2 ** 31 - 1), rows=st.integers(0, 65535),
       charset=st.sampled_from(["ISO_IR 192", "ISO_IR 100", None]),
       syntax=st.sampled_from(["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"]),
       padded=st.booleans())
def test_generated_values_read_as_pydicom_reads_them(tmp_path_factory, name, other_name, description, ids,
                                                     number, rows, charset, syntax, padded):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid
    if charset == "ISO_IR 100":  # Latin-1 cannot carry everything: keep what it can
        name, other_name, description = (v.encode("latin-1", "ignore").decode("latin-1")
                                         for v in (name, other_name, description))
        ids = [v.encode("latin-1", "ignore").decode("latin-1") for v in ids]
    elif charset is None:
        name, other_name, description = (v.encode("ascii", "ignore").decode() for v in (name, other_name, description))
        ids = [v.encode("ascii", "ignore").decode() for v in ids]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = syntax
    if charset:
        ds.SpecificCharacterSet = charset
    pad = " " if padded else ""
    ds.PatientName = f"{name}^{other_name}{pad}"
    ds.PatientID = "\\".join(ids)[:64]
    ds.StudyDescription = description + pad
    ds.ReferringPhysicianName = [name, other_name]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.InstanceNumber = number
    ds.SeriesNumber = f" {abs(number) % 1000}" if padded else abs(number) % 1000
    ds.Rows, ds.Columns, ds.BitsAllocated = rows, 1, 16
    ds.StudyDate = "20260101"
    ds.Modality = "OT"
    path = tmp_path_factory.mktemp("gen") / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert _as_inspected(p10.inspect(path)) == _read_by_pydicom(path)


def test_a_declared_length_past_the_end_is_truncation_not_an_allocation(tmp_path):
    """A 30-byte file whose Patient ID claims 4 GB: refused as truncated before anything of
    that size is read (the length comes from the file)."""
    path = tmp_path / "liar.dcm"
    path.write_bytes(struct.pack("<HHI", 0x0008, 0x0016, 4) + b"1.2\x00"
                     + struct.pack("<HHI", 0x0010, 0x0020, 0xFFFFFFF0) + b"PV01")
    with pytest.raises(InvalidInstance, match="truncated|not a DICOM file"):
        p10.inspect(path)


_FRAGMENTED = ["MR_small_bigendian.dcm", "ExplVR_BigEndNoMeta.dcm", "image_dfl.dcm", "rtplan.dcm", "JPEG2000.dcm",
               "emri_small_jpeg_2k_lossless_too_short.dcm", "rtplan_truncated.dcm", "SC_rgb_rle_2frame.dcm",
               "liver.dcm", "no_meta_group_length.dcm"]


def _outcome(chunks) -> object:
    try:
        return _as_inspected(info := p10.inspect_stream(chunks)) | {"ca": info.content_address,
                                                                    "syntax": info.transfer_syntax}
    except InvalidInstance as exc:
        return str(exc)


@settings(max_examples=120, deadline=None)
@given(name=st.sampled_from(_FRAGMENTED), cuts=st.lists(st.floats(0, 1), max_size=12))
def test_any_fragmentation_of_the_bytes_reads_the_same(name, cuts):
    """A C-STORE's data set arrives in PDVs cut anywhere: the walk gives the same answer
    (attributes, or the same refusal) however the bytes are split."""
    data = open(get_testdata_file(name), "rb").read()
    bounds = sorted({0, len(data), *(int(c * len(data)) for c in cuts)})
    pieces = [data[low:high] for low, high in zip(bounds, bounds[1:])]
    assert _outcome(pieces) == _outcome([data])


def test_the_walk_keeps_no_more_than_element_headers(ct_files):
    """Pixel data passes through without being buffered: the walk's buffer stays small
    whatever the piece size."""
    data = ct_files[0].read_bytes()
    inspector = p10.Inspector()
    for at in range(0, len(data), 65536):
        inspector.feed(data[at:at + 65536])
        walk = inspector._data_walk or inspector._walk
        assert len(walk._buffer) <= 65536 + 4096
    assert inspector.finish().sop_uid == pydicom.dcmread(ct_files[0]).SOPInstanceUID
    assert inspector.ready and inspector.bits_allocated == 16 and inspector.study_uid
