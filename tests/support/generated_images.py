"""Generated multi-frame images and instances for the transcoding tests (small, made on the fly)."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid


def image(frames: int = 3, rows: int = 48, columns: int = 40, seed: int = 1) -> np.ndarray:
    """12-bit frames, a gradient with noise: compressible, and every frame different."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns]
    return np.stack([((x * 37 + y * 11 + f * 101) % 4096 + rng.integers(0, 64, (rows, columns))).astype(np.uint16)
                     for f in range(frames)])


def instance(pixels: np.ndarray, ts: str = ExplicitVRLittleEndian, study_uid: str | None = None) -> Dataset:
    """A multi-frame grayscale instance holding `pixels` (uncompressed; `ts` names its encoding)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "TRANSCODE^TEST", "TC1"
    ds.NumberOfFrames = len(pixels)
    ds.Rows, ds.Columns = pixels.shape[1:3]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    return ds


def part10(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def j2k_frames(pixels: np.ndarray) -> list[bytes]:
    """Each frame of `pixels` as a JPEG 2000 lossless codestream."""
    ds = instance(pixels)
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    return list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=len(pixels)))
