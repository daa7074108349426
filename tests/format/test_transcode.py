"""Transcoding (appliance/format/transcode.py) checked against pydicom's own reading of the originals."""

from __future__ import annotations

import copy
import subprocess
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import dicom_test_files
from support.generated_images import image, instance, j2k_frames, part10
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    MPEG2MPML,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    RLELossless,
    generate_uid,
)

from appliance.errors import TranscodeError
from appliance.format import p10
from appliance.format import transcode as tc


def _corpus() -> dict[str, tuple[str, Path]]:
    """name -> (transfer syntax, path) of every corpus file pydicom reads a transfer syntax from."""
    found = {}
    for path in dicom_test_files():
        try:
            ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        except Exception:  # noqa: BLE001 - not DICOM, or no file meta: nothing says how it is encoded
            continue
        found[path.name] = (str(ts), path)
    return found


CORPUS = _corpus()
# What cannot be transcoded, and the reason it fails with (the archive refuses the malformed and
# truncated ones at import already).
UNTRANSCODABLE = {
    "JPEG-lossy.dcm": "does not decode",  # 12-bit JPEG with a misplaced marker: libjpeg and gdcm refuse it
    "JPEG2000-embedded-sequence-delimiter.dcm": "does not decode",  # its codestream has no valid header
    "SC_rgb_jpeg.dcm": "malformed",  # garbage from (0008,0008) on; dcmdump cannot read it either
    "emri_small_jpeg_2k_lossless_too_short.dcm": "ends early",
    "rtplan_truncated.dcm": "ends early",
    "MR_truncated.dcm": "ends early",
    "DICOMDIR-nooffset": "ends early",  # its last item claims more bytes than the file has
}
_BINARY_UNIT = {"OB": 1, "UN": 1, "OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _chunked(data: bytes, size: int = 997) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def _transcoded(data: bytes, stored: str, target: str) -> bytes:
    return b"".join(tc.transcode(_chunked(data), stored, target))


def _reread(dataset_bytes: bytes, target: str) -> Dataset:
    return pydicom.dcmread(BytesIO(p10.file_meta("1.2.3", "1.2.3", target) + dataset_bytes))


def _le_bytes(elem, little: bool) -> bytes:
    """An element's value as little endian bytes, however pydicom holds it."""
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        unit = _BINARY_UNIT.get(elem.VR, 1)
        if little or unit == 1:
            return bytes(value)
        return np.frombuffer(value, dtype=f">u{unit}").astype(f"<u{unit}").tobytes()
    fp = pydicom.filebase.DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    pydicom.filewriter.write_data_element(fp, elem)
    return fp.getvalue()[8:]


def _assert_same_elements(original: Dataset, new: Dataset, little: bool, skip: set[int], where: str = "") -> None:
    """Every element of `original` is in `new` with the same value, and nothing else is."""
    def kept(ds):
        return {int(tag) for tag in ds.keys() if int(tag) & 0xFFFF and int(tag) not in skip}

    assert kept(original) == kept(new), where
    for tag in kept(original):
        old, now = original[tag], new[tag]
        at = f"{where}({tag >> 16:04X},{tag & 0xFFFF:04X})"
        if old.VR == "SQ" or now.VR == "SQ":
            assert old.VR == now.VR == "SQ" and len(old.value) == len(now.value), at
            for number, (a, b) in enumerate(zip(old.value, now.value)):
                _assert_same_elements(a, b, little, set(), f"{at}[{number}]")
        elif old.is_empty and now.is_empty:  # pydicom holds an empty value as None, [] or ""
            continue
        elif old.VR == now.VR and not isinstance(old.value, bytes):
            assert old.value == now.value, at
        else:  # a VR only the old encoding knew (private, UN), or binary values: compare the bytes
            assert _le_bytes(old, little).rstrip(b" \x00") == _le_bytes(now, True).rstrip(b" \x00"), at


def _pixels(ds: Dataset):
    try:
        return ds.pixel_array
    except Exception:  # noqa: BLE001 - no pixel data pydicom can decode
        return None


_CASES = [(name, ts, target) for name, (ts, _) in sorted(CORPUS.items()) if len(tc.targets_for(ts)) > 1
          for target in tc.UNCOMPRESSED if target != ts]


def test_the_corpus_holds_every_decodable_syntax():
    stored = {ts for _, ts, _ in _CASES}
    assert set(tc.DECODINGS) - {tc.JPEGLossless} <= stored  # JPEG process 14 (any SV): generated below
    assert {ExplicitVRBigEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian} <= stored


@pytest.mark.parametrize(("name", "stored", "target"), _CASES,
                         ids=[f"{n}->{pydicom.uid.UID(t).keyword}" for n, _, t in _CASES])
def test_corpus_file_reads_back_with_the_same_elements_and_pixels(name, stored, target):
    path = CORPUS[name][1]
    data = path.read_bytes()
    if name in UNTRANSCODABLE:
        with pytest.raises(TranscodeError, match=UNTRANSCODABLE[name]) as caught:
            _transcoded(data, stored, target)
        assert len(str(caught.value)) <= 64
        return
    new = _reread(_transcoded(data, stored, target), target)
    original = pydicom.dcmread(path)
    assert new.get("SOPInstanceUID") == original.get("SOPInstanceUID")  # the same instance, not a derived one
    skip = {0x7FE00001, 0x7FE00002}
    if stored in tc.DECODINGS:
        skip |= {0x00280004, 0x00280006, 0x00282110, 0x00282114}  # what decoding may change (checked below)
        if tc.DECODINGS[stored].lossy and "PixelData" in original:
            assert new.LossyImageCompression == "01"
    expected = _pixels(original)
    if expected is not None:
        skip.add(0x7FE00010)
        actual = new.pixel_array
        assert actual.dtype.newbyteorder("=") == expected.dtype.newbyteorder("=")
        assert np.array_equal(actual, expected)
    little = pydicom.uid.UID(stored).is_little_endian
    _assert_same_elements(original, new, little, skip)


# -- the table --------------------------------------------------------------------------------

def test_compressed_syntaxes_go_out_as_stored_or_decoded_and_nothing_is_ever_encoded():
    assert tc.targets_for(JPEG2000Lossless) == (JPEG2000Lossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert tc.targets_for(JPEGBaseline8Bit) == (JPEGBaseline8Bit, ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert tc.targets_for(ImplicitVRLittleEndian) == (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
    assert tc.targets_for(ExplicitVRBigEndian) == (ExplicitVRBigEndian, ExplicitVRLittleEndian,
                                                   ImplicitVRLittleEndian)
    assert tc.targets_for(MPEG2MPML) == (MPEG2MPML,)  # no decoder: as stored or not at all
    assert not tc.can_transcode(ExplicitVRLittleEndian, JPEG2000Lossless)
    assert not tc.can_transcode(JPEG2000Lossless, RLELossless)
    assert not tc.can_transcode(ExplicitVRLittleEndian, ExplicitVRBigEndian)
    with pytest.raises(TranscodeError, match="cannot be transcoded"):
        tc.transcode([b""], ExplicitVRLittleEndian, JPEG2000Lossless)


def test_pick_target_prefers_the_stored_syntax_then_the_peers_order():
    assert tc.pick_target(JPEG2000Lossless, [ImplicitVRLittleEndian, JPEG2000Lossless]) == JPEG2000Lossless
    assert tc.pick_target(JPEG2000Lossless, [JPEGBaseline8Bit, ImplicitVRLittleEndian,
                                             ExplicitVRLittleEndian]) == ImplicitVRLittleEndian
    assert tc.pick_target(MPEG2MPML, [ExplicitVRLittleEndian]) is None


def test_every_decoder_in_the_table_is_installed():
    for ts, decoding in tc.DECODINGS.items():
        assert decoding.plugin in get_decoder(ts).available_plugins, ts


# -- generated instances --------------------------------------------------------------------

@pytest.mark.parametrize("framing", ["basic offset table", "extended offset table", "end markers",
                                     "one fragment each"])
def test_frames_are_found_however_they_are_fragmented(framing):
    pixels = image(frames=4)
    frames = j2k_frames(pixels)
    ds = instance(pixels, JPEG2000Lossless)
    if framing == "basic offset table":
        ds.PixelData = encapsulate(frames, fragments_per_frame=3, has_bot=True)
    elif framing == "extended offset table":
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(frames)
    elif framing == "end markers":
        ds.PixelData = encapsulate(frames, fragments_per_frame=2, has_bot=False)
    else:
        ds.PixelData = encapsulate(frames, has_bot=False)
    ds["PixelData"].is_undefined_length = True
    new = _reread(_transcoded(part10(ds), JPEG2000Lossless, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    assert np.array_equal(new.pixel_array, pixels)
    assert "ExtendedOffsetTable" not in new  # it describes fragments, which native pixel data has not


def test_an_encapsulated_icon_image_is_decoded_with_the_image():
    pixels, icon = image(frames=2), image(frames=1, rows=32, columns=32, seed=5)
    ds = instance(pixels, JPEG2000Lossless)
    ds.PixelData = encapsulate(j2k_frames(pixels))
    ds["PixelData"].is_undefined_length = True
    item = Dataset()
    for keyword in ("SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation"):
        setattr(item, keyword, ds.data_element(keyword).value)
    item.Rows, item.Columns = icon.shape[1:]
    item.PixelData = encapsulate(j2k_frames(icon))
    item["PixelData"].VR, item["PixelData"].is_undefined_length = "OB", True
    ds.IconImageSequence = Sequence([item])
    new = _reread(_transcoded(part10(ds), JPEG2000Lossless, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    assert np.array_equal(new.pixel_array, pixels)
    assert new.IconImageSequence[0].PixelData == icon.tobytes()
    assert new.IconImageSequence[0].Rows == 32


def test_jpeg_lossless_with_any_predictor_from_dcmtk_decodes_to_the_source_pixels(tmp_path):
    pixels = image(frames=3)
    source, encoded = tmp_path / "source.dcm", tmp_path / "jpeg.dcm"
    instance(pixels).save_as(source, enforce_file_format=True)
    subprocess.run(["dcmcjpeg", "+el", "+sv", "6", str(source), str(encoded)], check=True)
    assert pydicom.dcmread(encoded).file_meta.TransferSyntaxUID == JPEGLossless
    new = _reread(_transcoded(encoded.read_bytes(), JPEGLossless, ImplicitVRLittleEndian), ImplicitVRLittleEndian)
    assert np.array_equal(new.pixel_array, pixels)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.floats(0, 1), max_size=12), source=st.sampled_from(["j2k", "rle", "big endian"]))
def test_output_does_not_depend_on_where_the_stored_bytes_are_cut(cuts, source):
    pixels = image(frames=3, rows=32, columns=40)
    if source == "j2k":
        ds, stored = instance(pixels, JPEG2000Lossless), JPEG2000Lossless
        ds.PixelData = encapsulate(j2k_frames(pixels), fragments_per_frame=2, has_bot=False)
        ds["PixelData"].is_undefined_length = True
        data = part10(ds)
    elif source == "rle":
        ds, stored = instance(pixels), RLELossless
        ds.compress(RLELossless, generate_instance_uid=False)
        data = part10(ds)
    else:
        ds, stored = instance(pixels, ExplicitVRBigEndian), ExplicitVRBigEndian
        ds.PixelData = pixels.astype(">u2").tobytes()  # pydicom writes the value's bytes as they are
        out = BytesIO()
        ds.save_as(out, implicit_vr=False, little_endian=False, enforce_file_format=True)
        data = out.getvalue()
    positions = sorted({int(c * len(data)) for c in cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in zip(positions, positions[1:])]
    expected = b"".join(tc.transcode([data], stored, ImplicitVRLittleEndian))
    assert b"".join(tc.transcode(pieces, stored, ImplicitVRLittleEndian)) == expected
    assert np.array_equal(_reread(expected, ImplicitVRLittleEndian).pixel_array, pixels)


# Elements whose encoding differs between the syntaxes: byte order (numbers, AT, O*), VR field,
# the VRs implicit VR leaves to the reader (US or SS by Pixel Representation), nesting.
_TEXT = st.text(alphabet="ABCDEFGHIJ KLMNOP0123456789", max_size=12).map(str.strip)


def _words(unit: int):
    return st.binary(max_size=4 * unit).map(lambda b: b[:len(b) // unit * unit])


_ELEMENTS = {
    0x00080060: ("CS", st.sampled_from(["CT", "MR", "OT"])),
    0x0008040C: ("UV", st.integers(0, 2**64 - 1)),
    0x00089459: ("FL", st.floats(-1e3, 1e3, width=32)),
    0x00100010: ("PN", _TEXT),
    0x00180050: ("DS", st.sampled_from(["0.5", "1.25", "-3", "100"])),
    0x00181310: ("US", st.lists(st.integers(0, 65535), min_size=4, max_size=4)),
    0x00181638: ("OF", _words(4)),
    0x00186020: ("SL", st.integers(-2**31, 2**31 - 1)),
    0x00189089: ("FD", st.lists(st.floats(-1e6, 1e6), min_size=3, max_size=3)),
    0x00189095: ("UL", st.integers(0, 2**32 - 1)),
    0x00189219: ("SS", st.integers(-32768, 32767)),
    0x00200013: ("IS", st.integers(0, 9999).map(str)),
    0x00209165: ("AT", st.sampled_from([0x00100010, 0x7FE00010, 0x00080060])),
    0x00280030: ("DS", st.lists(st.sampled_from(["0.5", "0.75"]), min_size=2, max_size=2)),
    0x00280103: ("US", st.integers(0, 1)),
    0x00280106: ("US or SS", st.integers(0, 32767)),
    0x003A032E: ("OD", _words(8)),
    0x00420011: ("OB", st.binary(max_size=15)),
    0x00660023: ("OW", _words(2)),
    0x00660040: ("OL", _words(4)),
    0x00720082: ("SV", st.lists(st.integers(-2**63, 2**63 - 1), max_size=3)),
}


def _datasets(depth: int = 0, pixel_representation: int | None = None):
    @st.composite
    def build(draw):
        ds = Dataset()
        representation = pixel_representation
        for tag in sorted(draw(st.sets(st.sampled_from(sorted(_ELEMENTS)), max_size=10))):
            vr, values = _ELEMENTS[tag]
            value = draw(values)
            if tag == 0x00280103:
                representation = value
            if vr == "US or SS":  # as the nearest Pixel Representation says (pydicom's and our rule)
                vr = "SS" if representation == 1 else "US"
            ds.add_new(tag, vr, value)
        if depth < 2 and draw(st.booleans()):
            # The sequence (0008,1115) comes before this level's Pixel Representation (0028,0103):
            # read in order, an item sees only the Pixel Representations that precede it.
            ds.ReferencedSeriesSequence = Sequence(draw(st.lists(_datasets(depth + 1, pixel_representation),
                                                                 max_size=3)))
        return ds
    return build()


def _big_endian_words(ds: Dataset) -> Dataset:
    """`ds` with its OW/OF/OD/OL values in big endian words: pydicom writes such values' bytes as
    they are, so a big endian file needs them swapped beforehand."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _big_endian_words(item)
        elif _BINARY_UNIT.get(elem.VR, 1) > 1:
            unit = _BINARY_UNIT[elem.VR]
            elem.value = np.frombuffer(elem.value, dtype=f"<u{unit}").astype(f">u{unit}").tobytes()
    return ds


@settings(max_examples=60, deadline=None)
@given(ds=_datasets())
def test_generated_data_sets_survive_big_endian_implicit_and_explicit_round_trips(ds):
    ds.SOPInstanceUID = generate_uid()
    encoded = {}
    for ts, implicit, little in ((ExplicitVRBigEndian, False, False), (ImplicitVRLittleEndian, True, True),
                                 (ExplicitVRLittleEndian, False, True)):
        out = BytesIO()
        written = ds if little else _big_endian_words(copy.deepcopy(ds))
        written.file_meta = FileMetaDataset()
        written.file_meta.TransferSyntaxUID = ts
        written.file_meta.MediaStorageSOPClassUID = "1.2.3"
        written.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        written.save_as(out, implicit_vr=implicit, little_endian=little, enforce_file_format=True)
        encoded[ts] = out.getvalue()
    from_big = _transcoded(encoded[ExplicitVRBigEndian], ExplicitVRBigEndian, ExplicitVRLittleEndian)
    to_implicit = _transcoded(encoded[ExplicitVRBigEndian], ExplicitVRBigEndian, ImplicitVRLittleEndian)
    back = _transcoded(to_implicit, ImplicitVRLittleEndian, ExplicitVRLittleEndian)
    assert back == from_big  # implicit VR loses nothing a public element needs
    assert _transcoded(encoded[ImplicitVRLittleEndian], ImplicitVRLittleEndian, ExplicitVRLittleEndian) == from_big
    for dataset_bytes, ts in ((from_big, ExplicitVRLittleEndian), (to_implicit, ImplicitVRLittleEndian),
                              (_transcoded(encoded[ExplicitVRLittleEndian], ExplicitVRLittleEndian,
                                           ImplicitVRLittleEndian), ImplicitVRLittleEndian)):
        _assert_same_elements(ds, _reread(dataset_bytes, ts), True, set())


# -- failures, counts -----------------------------------------------------------------------

def test_a_frame_that_does_not_decode_fails_before_the_first_byte_with_a_short_reason():
    pixels = image(frames=2)
    frames = j2k_frames(pixels)
    ds = instance(pixels, JPEG2000Lossless)
    ds.PixelData = encapsulate([frames[0][:12] + b"\x00" * (len(frames[0]) - 12), frames[1]])
    ds["PixelData"].is_undefined_length = True
    pieces = tc.transcode([part10(ds)], JPEG2000Lossless, ExplicitVRLittleEndian)
    with pytest.raises(TranscodeError, match="frame 1 of 2 does not decode") as caught:
        next(pieces)
    assert len(str(caught.value)) <= 64


def test_a_cut_short_instance_is_refused():
    data = part10(instance(image()))
    with pytest.raises(TranscodeError, match="ends early"):
        _transcoded(data[:-100], ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def test_counts_say_how_many_instances_went_from_what_to_what():
    counts = tc.TranscodeCounts()
    pixels = image(frames=1)
    ds = instance(pixels)
    ds.compress(RLELossless, generate_instance_uid=False)
    for _ in range(2):
        b"".join(tc.transcode([part10(ds)], RLELossless, ImplicitVRLittleEndian, counts=counts))
    b"".join(tc.transcode([part10(instance(pixels))], ExplicitVRLittleEndian, ExplicitVRLittleEndian,
                          counts=counts))  # sent as stored: not a transcode
    with pytest.raises(TranscodeError):
        b"".join(tc.transcode([part10(ds)[:-40]], RLELossless, ExplicitVRLittleEndian, counts=counts))
    assert counts.summary() == [
        {"from": RLELossless, "to": ImplicitVRLittleEndian, "instances": 2, "failed": 0},
        {"from": RLELossless, "to": ExplicitVRLittleEndian, "instances": 0, "failed": 1}]


def test_lossy_jpeg_comes_out_rgb_and_marked_lossy_with_the_same_uid():
    name = "SC_rgb_dcmtk_+eb+cy+s2.dcm"  # YBR_FULL_422 baseline JPEG from dcmtk
    stored, path = CORPUS[name]
    assert stored == JPEGBaseline8Bit
    original = pydicom.dcmread(path)
    new = _reread(_transcoded(path.read_bytes(), stored, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    assert original.PhotometricInterpretation == "YBR_FULL_422"
    assert (new.PhotometricInterpretation, new.PlanarConfiguration) == ("RGB", 0)
    assert (new.LossyImageCompression, new.LossyImageCompressionMethod) == ("01", "ISO_10918_1")
    assert new.SOPInstanceUID == original.SOPInstanceUID


def test_lossless_colour_keeps_its_colour_space():
    pixels = np.stack([image(frames=3, seed=s)[0] % 256 for s in range(3)], axis=-1).astype(np.uint8)[None]
    ds = instance(pixels[..., 0])
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = pixels.tobytes()
    ds.compress(RLELossless, generate_instance_uid=False)
    new = _reread(_transcoded(part10(ds), RLELossless, ImplicitVRLittleEndian), ImplicitVRLittleEndian)
    assert new.PhotometricInterpretation == "YBR_FULL"  # no rounding through RGB
    assert new.PixelData == pixels.tobytes()


