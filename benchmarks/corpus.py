"""Generated DICOM studies for tests and benchmarks (never committed: made on the fly).

    ct_study(dir, n)         CT, 512x512 16-bit, a body phantom with realistic noise (~2x with zstd);
                             in another transfer syntax (e.g. JPEG 2000 lossless) with transfer_syntax=
    mr_series(dir, n)        MR, 256x256 16-bit
    small_instances(dir, n)  ~10 KB secondary-capture instances
    multiframe(path, mb)     one large multi-frame instance of about `mb` MB, written in chunks
    multiframe_j2k(path, mb) the same in JPEG 2000 lossless, about `mb` MB as stored

Every file is a valid Part 10 file with its own UIDs; `patient_name` lets a
test plant a canary.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_SC = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC


def _dataset(sop_class: str, study_uid: str, series_uid: str, number: int, *, patient_name: str,
             patient_id: str, modality: str, rows: int, columns: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = ds.SeriesDate = "20261124"
    ds.StudyTime = "101500"
    ds.AccessionNumber = f"ACC{abs(hash(study_uid)) % 10**8:08d}"
    ds.StudyID = "1"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def _phantom(rng: np.random.Generator, size: int, slice_no: int) -> np.ndarray:
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    organ = ((x - 0.2) / 0.25) ** 2 + ((y + 0.05 * np.sin(slice_no / 7)) / 0.2) ** 2 < 1
    image = np.where(body, 1024 + 40, 24).astype(np.float64)
    image[organ] += 60
    image += rng.normal(0, 1, image.shape) * np.where(body, 20, 10)  # quantum and detector noise
    return np.clip(image, 0, 4095).astype(np.uint16)


def _series(directory: Path, count: int, *, sop_class: str, modality: str, size: tuple[int, int],
            pixels, patient_name: str, patient_id: str, seed: int,
            transfer_syntax: str = ExplicitVRLittleEndian) -> list[Path]:
    """One series of `count` single-frame instances; pixels(rng, number) gives each frame, encoded
    in `transfer_syntax` (pydicom's encoders)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []
    for number in range(1, count + 1):
        ds = _dataset(sop_class, study_uid, series_uid, number, patient_name=patient_name,
                      patient_id=patient_id, modality=modality, rows=size[0], columns=size[1])
        if modality == "CT":
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = pixels(rng, number).tobytes()
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, generate_instance_uid=False)
        path = directory / f"{modality}{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def ct_study(directory: Path, count: int, *, patient_name: str = "DOE^JANE", patient_id: str = "PV0001",
             seed: int = 1, transfer_syntax: str = ExplicitVRLittleEndian) -> list[Path]:
    return _series(directory, count, sop_class=CT_IMAGE, modality="CT", size=(512, 512),
                   pixels=lambda rng, n: _phantom(rng, 512, n), patient_name=patient_name,
                   patient_id=patient_id, seed=seed, transfer_syntax=transfer_syntax)


def mr_series(directory: Path, count: int, *, patient_name: str = "ROE^RICHARD", patient_id: str = "PV0002",
              seed: int = 2) -> list[Path]:
    return _series(directory, count, sop_class=MR_IMAGE, modality="MR", size=(256, 256),
                   pixels=lambda rng, n: _phantom(rng, 256, n), patient_name=patient_name,
                   patient_id=patient_id, seed=seed)


def small_instances(directory: Path, count: int, *, patient_name: str = "POE^EDGAR",
                    patient_id: str = "PV0003", seed: int = 3) -> list[Path]:
    """~10 KB secondary-capture instances (64x72, 16-bit noise)."""
    return _series(directory, count, sop_class=SECONDARY_CAPTURE, modality="OT", size=(64, 72),
                   pixels=lambda rng, n: rng.integers(0, 4096, 64 * 72, dtype=np.uint16),
                   patient_name=patient_name, patient_id=patient_id, seed=seed)


def multiframe(path: Path, megabytes: int, *, patient_name: str = "BIG^FRAMES", patient_id: str = "PV0004",
               seed: int = 4, comments: str = "", marker: bytes = b"") -> Path:
    """One multi-frame instance of about `megabytes` MB, written in bounded memory
    (`comments`: its Image Comments; `marker`: bytes that begin every frame, a canary)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame_bytes = 512 * 512 * 2
    frames = max(1, megabytes * 1_000_000 // frame_bytes)
    ds = _dataset(MULTIFRAME_SC, generate_uid(), generate_uid(), 1, patient_name=patient_name,
                  patient_id=patient_id, modality="OT", rows=512, columns=512)
    ds.NumberOfFrames = frames
    if comments:
        ds.ImageComments = comments
    ds.save_as(path, enforce_file_format=True)  # header only; pixel data appended below
    rng = np.random.default_rng(seed)
    with open(path, "ab") as fp:
        fp.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frames * frame_bytes))
        # 16 distinct noisy frames in turn: more than zstd's window, so the ratio stays realistic.
        distinct = [marker + _phantom(rng, 512, number).tobytes()[len(marker):] for number in range(min(frames, 16))]
        for number in range(frames):
            fp.write(distinct[number % len(distinct)])
        fp.flush()
        os.fsync(fp.fileno())
    return path


def multiframe_j2k(path: Path, megabytes: int, *, patient_name: str = "BIG^JPEG2000", patient_id: str = "PV0005",
                   seed: int = 5) -> Path:
    """One multi-frame JPEG 2000 lossless instance of about `megabytes` MB as stored, written in
    bounded memory, with its Basic Offset Table. Frames are 512x512 of 16-bit noise, 16 distinct
    ones in turn: noise barely compresses, so the size takes the fewest frames to decode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    encoder = get_encoder(JPEG2000Lossless)
    distinct = []
    for _ in range(16):
        codestream = encoder.encode(rng.integers(0, 1 << 16, (512, 512), dtype=np.uint16), rows=512, columns=512,
                                    samples_per_pixel=1, bits_allocated=16, bits_stored=16, pixel_representation=0,
                                    photometric_interpretation="MONOCHROME2", number_of_frames=1)
        distinct.append(codestream + b"\x00" * (len(codestream) % 2))  # fragments have an even length
    frames = max(1, megabytes * 1_000_000 * len(distinct) // sum(map(len, distinct)))
    fragments = [distinct[number % len(distinct)] for number in range(frames)]
    offsets = np.cumsum([0] + [8 + len(fragment) for fragment in fragments[:-1]])
    ds = _dataset(MULTIFRAME_SC, generate_uid(), generate_uid(), 1, patient_name=patient_name,
                  patient_id=patient_id, modality="OT", rows=512, columns=512)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.BitsStored, ds.HighBit = 16, 15
    ds.NumberOfFrames = frames
    ds.save_as(path, enforce_file_format=True)  # header only; pixel data appended below
    with open(path, "ab") as fp:
        fp.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
        fp.write(struct.pack("<HHI", 0xFFFE, 0xE000, 4 * frames) + offsets.astype("<u4").tobytes())
        for fragment in fragments:
            fp.write(struct.pack("<HHI", 0xFFFE, 0xE000, len(fragment)))
            fp.write(fragment)
        fp.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
        fp.flush()
        os.fsync(fp.fileno())
    return path
