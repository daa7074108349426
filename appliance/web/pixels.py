"""Frames and rendered images of a stored instance, decrypted into memory only.

An instance is read whole into memory (`instance_file`): a BytesIO up to IN_MEMORY_BYTES,
else an anonymous memfd (never a disk, and pages not mapped into the process); pydicom
then reads only what it needs from it: the header, and one frame at a time.

- `stored_frames`: the frames as stored (native: the slice of Pixel Data; encapsulated:
  each frame's fragments joined, through pydicom.encaps);
- `decoded_frame`: one frame uncompressed, little endian (colour interleaved, YBR as RGB),
  decoded with the plugin transcode.py chose for the syntax;
- `rendered`: one frame as JPEG or PNG for a thumbnail: Rescale Slope/Intercept, the first
  window (or the frame's range), MONOCHROME1 inverted, 8 bits; colour scaled to 8 bits.
"""

from __future__ import annotations

import io
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian

from appliance.format import transcode
from appliance.errors import InvalidInstance, NotFound, TranscodeError
from appliance.store.archive import Archive
from appliance.store.catalog import Instance

IN_MEMORY_BYTES = 32 << 20
_UNDEFINED = 0xFFFFFFFF
_SEQUENCE_DELIMITER = 0xE0DDFFFE  # (FFFE,E0DD) read as one little endian number


@contextmanager
def instance_file(archive: Archive, record: Instance, size: int) -> Iterator[BinaryIO]:
    """The stored bytes of an instance's current version as a readable file, in memory."""
    if size <= IN_MEMORY_BYTES:
        yield io.BytesIO(archive.read_blob(record.current))  # one pass: half the CPU of the stream
        return
    chunks = archive.open_blob(record.current)
    fd = os.memfd_create("pacs-vault-instance", os.MFD_CLOEXEC)
    with os.fdopen(fd, "w+b") as fp:
        for chunk in chunks:
            fp.write(chunk)
        fp.seek(0)
        yield fp


def header(fp: BinaryIO, whole: bool = False) -> Dataset:
    """The data set up to its pixel data (the file position is left where it stops), or all of it."""
    fp.seek(0)
    try:
        return dcmread(fp, stop_before_pixels=not whole, force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a stored oddity
        raise InvalidInstance(f"the stored instance cannot be parsed: {exc}") from None


@dataclass(frozen=True)
class PixelData:
    """Where the pixel data of an instance file is: its value's offset and length (0xFFFFFFFF:
    encapsulated), and its VR."""

    offset: int
    length: int
    vr: str


def pixel_data(fp: BinaryIO, ds: Dataset) -> PixelData | None:
    """The pixel data after the header `header(fp)` just read, or None when there is none."""
    at = fp.tell()
    head = fp.read(12)
    if head[:4] not in (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10"):
        return None
    little = head[:2] == b"\xe0\x7f"
    if head[4:6].isalpha() and head[4:6].isupper():  # explicit VR: OB or OW, 2 reserved bytes, 4-byte length
        return PixelData(at + 12, struct.unpack("<I" if little else ">I", head[8:12])[0], head[4:6].decode())
    vr = "OW" if int(ds.get("BitsAllocated", 8)) > 8 else "OB"
    return PixelData(at + 8, struct.unpack("<I", head[4:8])[0], vr)


def trailing(fp: BinaryIO, pixels: PixelData, syntax: str) -> Dataset:
    """The elements after the pixel data (trailing padding, signatures), usually none."""
    if pixels.length != _UNDEFINED:
        fp.seek(pixels.offset + pixels.length)
    else:
        fp.seek(pixels.offset)
        while True:  # items of the encapsulated pixel data, up to its sequence delimiter
            tag, length = struct.unpack("<II", fp.read(8) or b"\0" * 8)
            if tag in (_SEQUENCE_DELIMITER, 0):
                break
            fp.seek(length, io.SEEK_CUR)
    uid = UID(syntax)
    try:
        return read_dataset(fp, uid.is_implicit_VR, uid.is_little_endian)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a stored oddity
        raise InvalidInstance(f"the stored instance cannot be parsed after its pixel data: {exc}") from None


def frame_count(ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1


def check_frames(ds: Dataset, pixels: PixelData | None, numbers: list[int]) -> PixelData:
    count = frame_count(ds)
    if pixels is None:
        raise FrameMissing("the instance has no pixel data")
    bad = [n for n in numbers if not 1 <= n <= count]
    if bad:
        raise FrameMissing(f"frame {bad[0]} is not one of the {count} frames")
    return pixels


class FrameMissing(NotFound):
    """A frame the instance does not have (or no pixel data at all)."""


def _native_frame_length(ds: Dataset) -> int:
    bits = int(ds.BitsAllocated)
    if bits % 8:
        raise TranscodeError("frames of 1-bit pixel data are not served")
    return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits // 8


def stored_frame(fp: BinaryIO, ds: Dataset, pixels: PixelData, syntax: str, number: int) -> bytes:
    """Frame `number` (1-based) as stored in `syntax`."""
    syntax = UID(syntax)
    if syntax.is_deflated:
        raise TranscodeError("frames of deflated instances are served decoded only")
    if syntax.is_encapsulated:
        fp.seek(pixels.offset)
        return get_frame(fp, number - 1, number_of_frames=frame_count(ds))
    if syntax == ExplicitVRBigEndian:
        raise TranscodeError("frames of big endian instances are served decoded only")
    length = _native_frame_length(ds)
    fp.seek(pixels.offset + (number - 1) * length)
    return fp.read(length)


def decoded_frame(fp: BinaryIO, syntax: str, number: int) -> np.ndarray:
    """Frame `number` (1-based) of an instance stored in `syntax`, decoded: rows x columns (x samples)."""
    decoding = transcode.DECODINGS.get(syntax)
    if UID(syntax).is_encapsulated and decoding is None:
        raise TranscodeError(f"{UID(syntax).name} frames cannot be decoded")
    fp.seek(0)
    try:
        return pixel_array(fp, index=number - 1, decoding_plugin=decoding.plugin if decoding else "")
    except Exception as exc:  # noqa: BLE001 - a decoder's many failures
        raise TranscodeError(f"frame {number} does not decode: {exc}") from None


def uncompressed(array: np.ndarray) -> bytes:
    """A decoded frame as PS3.18 octets: little endian, samples interleaved."""
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def rendered(array: np.ndarray, ds: Dataset, kind: str, quality: int = 90) -> bytes:
    """A decoded frame as an 8-bit JPEG ("image/jpeg") or PNG ("image/png")."""
    if array.ndim == 3 and array.shape[2] in (3, 4):
        image = _to_8bit(array.astype(np.float64), 0.0, float((1 << int(ds.get("BitsStored", 8))) - 1))
    else:
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        values = array.astype(np.float64) * slope + intercept
        low, high = _window(ds, values)
        image = _to_8bit(values, low, high)
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            image = 255 - image
    out = io.BytesIO()
    picture = Image.fromarray(image)
    if kind == "image/png":
        picture.save(out, "PNG")
    else:
        picture.convert("RGB" if image.ndim == 3 else "L").save(out, "JPEG", quality=quality)
    return out.getvalue()


def _window(ds: Dataset, values: np.ndarray) -> tuple[float, float]:
    """The first window of the instance, else the frame's range."""
    try:
        center, width = (_first(ds.get(keyword)) for keyword in ("WindowCenter", "WindowWidth"))
    except (TypeError, ValueError, IndexError):
        return float(values.min()), float(values.max())
    return center - width / 2, center + width / 2


def _first(value) -> float:
    return float(value[0]) if isinstance(value, MultiValue) else float(value)


def _to_8bit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (values - low) / max(high - low, 1e-9)
    return (np.clip(scaled, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
