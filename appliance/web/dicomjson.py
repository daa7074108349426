"""DICOM JSON (PS3.18 F.2) of a stored instance's data set, with BulkDataURIs.

Every element is written as pydicom's `to_json_dict` writes it, except binary values
(OB, OD, OF, OL, OV, OW, UN) longer than BULK_THRESHOLD and the pixel data, which
become a BulkDataURI: `<instance URL>/bulkdata/<path>`, the path being the tag, or for
an element inside a sequence `<sequence tag>/<item index>/<tag>` (any depth). `element_at`
finds the element a path names.
"""

from __future__ import annotations

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
BULK_THRESHOLD = 1024
PIXEL_DATA = "7FE00010"


def metadata(ds: Dataset, instance_url: str, pixel_vr: str | None) -> dict:
    """The data set as DICOM JSON; `pixel_vr`: the VR of the pixel data the data set was read
    without (stop_before_pixels), or None when it has none."""
    out = _json(ds, f"{instance_url}/bulkdata/")
    if pixel_vr:
        out[PIXEL_DATA] = {"vr": pixel_vr, "BulkDataURI": f"{instance_url}/bulkdata/{PIXEL_DATA}"}
    return out


def _json(ds: Dataset, prefix: str) -> dict:
    out = {}
    for element in ds:
        tag = f"{element.tag:08X}"
        if element.VR == "SQ":
            items = [_json(item, f"{prefix}{tag}/{number}/") for number, item in enumerate(element.value)]
            out[tag] = {"vr": "SQ", "Value": items}
        elif _bulk(element):
            out[tag] = {"vr": element.VR, "BulkDataURI": prefix + tag}
        else:
            out[tag] = element.to_json_dict(None, BULK_THRESHOLD)
    return out


def _bulk(element: DataElement) -> bool:
    if element.tag == int(PIXEL_DATA, 16):
        return True
    return element.VR in BULK_VRS and element.value is not None and len(element.value) > BULK_THRESHOLD


def element_at(ds: Dataset, path: str) -> DataElement | None:
    """The element a bulk data path names, or None."""
    parts = path.strip("/").split("/")
    if len(parts) % 2 != 1:
        return None
    try:
        for sequence, number in zip(parts[:-1:2], parts[1:-1:2]):
            ds = ds[int(sequence, 16)].value[int(number)]
        return ds.get(int(parts[-1], 16))
    except (KeyError, ValueError, IndexError, TypeError):
        return None
