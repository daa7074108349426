"""`appliance export --transfer-syntax UID`, end to end through the CLI."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
from conftest import REPO, run_cli
from support.generated_images import image, instance, j2k_frames
from pydicom.encaps import encapsulate
from pydicom.pixels import iter_pixels
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from appliance import config as cfg
from appliance.audit.trail import AuditTrail

_RSS_BOUND_KB = 300 << 10
_CLI_REPORTING_PEAK = ("import sys\nfrom appliance.cli import main\ncode = main(sys.argv[1:])\n"
                       "sys.stderr.write(open('/proc/self/status').read())\nsys.exit(code)")


def _study(directory: Path) -> tuple[str, dict[str, tuple[Path, np.ndarray]]]:
    """One study stored in four syntaxes: {SOP Instance UID: (file, pixels)}."""
    directory.mkdir()
    study_uid, made = generate_uid(), {}
    for number, ts in enumerate((RLELossless, JPEG2000Lossless, ExplicitVRBigEndian, ExplicitVRLittleEndian)):
        pixels = image(frames=2, seed=number)
        ds = instance(pixels, ExplicitVRLittleEndian, study_uid)
        path = directory / f"{number}.dcm"
        if ts == ExplicitVRBigEndian:
            ds.file_meta.TransferSyntaxUID = ts
            ds.PixelData = pixels.astype(">u2").tobytes()
            ds.save_as(path, implicit_vr=False, little_endian=False, enforce_file_format=True)
        else:
            if ts != ExplicitVRLittleEndian:
                ds.compress(ts, generate_instance_uid=False)
            ds.save_as(path, enforce_file_format=True)
        made[ds.SOPInstanceUID] = (path, pixels)
    return study_uid, made


def _export_record(home: Path) -> dict:
    config = cfg.load(home)
    return [r for r in AuditTrail(config.audit_dir, config.audit_key_file).records() if r["event"] == "Export"][-1]


def test_export_in_one_syntax_decodes_what_is_compressed_and_says_so(tmp_path, home):
    study_uid, made = _study(tmp_path / "in")
    run_cli("import", str(tmp_path / "in"), home=home)
    dest = tmp_path / "out"
    result = run_cli("export", study_uid, str(dest), "--transfer-syntax", ImplicitVRLittleEndian, home=home)
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{sop}.dcm" for sop in made)
    for sop_uid, (source, pixels) in made.items():
        exported = pydicom.dcmread(dest / f"{sop_uid}.dcm")
        assert exported.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert exported.SOPInstanceUID == exported.file_meta.MediaStorageSOPInstanceUID == sop_uid
        assert np.array_equal(exported.pixel_array, pixels)
        assert exported.PatientName == pydicom.dcmread(source).PatientName
    for stored in (RLELossless, JPEG2000Lossless, ExplicitVRBigEndian, ExplicitVRLittleEndian):
        assert f"transcoded 1 from {stored} to {ImplicitVRLittleEndian}" in result.stdout
    record = _export_record(home)
    assert record["instances"] == 4 and record["detail"]["transfer_syntax"] == ImplicitVRLittleEndian
    assert {(t["from"], t["instances"]) for t in record["detail"]["transcoded"]} == {
        (RLELossless, 1), (JPEG2000Lossless, 1), (ExplicitVRBigEndian, 1), (ExplicitVRLittleEndian, 1)}


def test_export_without_a_syntax_and_in_the_stored_one_is_byte_exact(tmp_path, home):
    study_uid, made = _study(tmp_path / "in")
    run_cli("import", str(tmp_path / "in"), home=home)
    run_cli("export", study_uid, str(tmp_path / "as-stored"), home=home)
    for sop_uid, (source, _) in made.items():
        assert (tmp_path / "as-stored" / f"{sop_uid}.dcm").read_bytes() == source.read_bytes()

    dest = tmp_path / "rle"
    result = run_cli("export", study_uid, str(dest), "--transfer-syntax", RLELossless, home=home, check=False)
    assert result.returncode != 0  # nothing is encoded: the three not stored as RLE fail
    rle_uid = next(sop for sop, (path, _) in made.items() if path.name == "0.dcm")
    assert [p.name for p in dest.iterdir()] == [f"{rle_uid}.dcm"]  # no partial file left either
    assert (dest / f"{rle_uid}.dcm").read_bytes() == made[rle_uid][0].read_bytes()
    assert result.stderr.count("cannot be transcoded to RLELossless") == 3
    assert "3 instances could not be read or transcoded" in result.stderr.splitlines()[-1]


def test_an_instance_that_does_not_decode_fails_alone(tmp_path, home):
    study_uid, made = _study(tmp_path / "in")
    pixels = image(frames=2, seed=9)
    broken = instance(pixels, JPEG2000Lossless, study_uid)
    frames = j2k_frames(pixels)
    broken.PixelData = encapsulate([frames[0], frames[1][:20] + b"\x00" * (len(frames[1]) - 20)])
    broken["PixelData"].is_undefined_length = True
    broken.save_as(tmp_path / "in" / "broken.dcm", enforce_file_format=True)
    run_cli("import", str(tmp_path / "in"), home=home)
    dest = tmp_path / "out"
    result = run_cli("export", study_uid, str(dest), "--transfer-syntax", ExplicitVRLittleEndian, home=home,
                     check=False)
    assert result.returncode != 0
    assert f"FAILED {broken.SOPInstanceUID}: frame 2 of 2 does not decode (JPEG2000Lossless)" in result.stderr
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{sop}.dcm" for sop in made)
    assert _export_record(home)["detail"]["failed"] == 1


def test_an_unknown_syntax_is_refused_before_anything_is_written(tmp_path, home):
    study_uid, _ = _study(tmp_path / "in")
    run_cli("import", str(tmp_path / "in"), home=home)
    result = run_cli("export", study_uid, str(tmp_path / "out"), "--transfer-syntax", "1.2.3", home=home,
                     check=False)
    assert result.returncode != 0 and "1.2.3 is not a transfer syntax" in result.stderr
    assert not (tmp_path / "out").exists()


def _big_j2k_instance(path: Path, study_uid: str, size: int) -> tuple[np.ndarray, int]:
    """A multi-frame JPEG 2000 lossless file of about `size` bytes, written frame by frame (one noisy
    1024x1024 frame repeated: generating it stays quick, decoding it does the full work)."""
    pixels = np.random.default_rng(7).integers(0, 4096, (1, 1024, 1024), dtype=np.uint16)
    frame = j2k_frames(pixels)[0]
    frame += b"\x00" * (len(frame) % 2)
    count = size // (len(frame) + 8) + 1
    ds = instance(pixels, JPEG2000Lossless, study_uid)
    del ds.PixelData
    ds.NumberOfFrames = count
    with open(path, "wb") as out:
        ds.save_as(out, enforce_file_format=True)
        out.write(struct.pack("<HH4sI", 0x7FE0, 0x0010, b"OB\x00\x00", 0xFFFFFFFF))
        offsets = struct.pack(f"<{count}I", *(i * (len(frame) + 8) for i in range(count)))
        out.write(struct.pack("<HHI", 0xFFFE, 0xE000, len(offsets)) + offsets)
        for _ in range(count):
            out.write(struct.pack("<HHI", 0xFFFE, 0xE000, len(frame)) + frame)
        out.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    return pixels[0], count


def test_a_256_mb_jpeg_2000_instance_exports_decoded_within_the_memory_bound(tmp_path, home):
    study_uid = generate_uid()
    (tmp_path / "in").mkdir()
    big = tmp_path / "in" / "big.dcm"
    pixels, count = _big_j2k_instance(big, study_uid, 256 << 20)
    assert big.stat().st_size >= 256 << 20
    run_cli("import", str(big), home=home)
    big.unlink()  # the export reads the archive's copy only
    dest = tmp_path / "out"
    # The CLI's own peak (VmHWM): a child's rusage would carry this test process's peak across exec.
    export = subprocess.run([sys.executable, "-c", _CLI_REPORTING_PEAK, "--home", str(home), "export", study_uid,
                             str(dest), "--transfer-syntax", ExplicitVRLittleEndian], cwd=REPO,
                            capture_output=True, text=True)
    assert export.returncode == 0, export.stderr
    peak_kb = int(export.stderr.split("VmHWM:")[1].split()[0])
    assert peak_kb < _RSS_BOUND_KB, f"export peaked at {peak_kb >> 10} MB"
    [exported] = dest.iterdir()
    assert exported.stat().st_size > count * pixels.nbytes  # all of it decoded
    for index, frame in zip((0, count - 1), iter_pixels(exported, indices=[0, count - 1])):
        assert np.array_equal(frame, pixels), index
