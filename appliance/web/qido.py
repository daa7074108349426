"""QIDO-RS (PS3.18 10.6): studies, series and instances, at every level and nested.

The query parameters become a C-FIND identifier and go through the same query and
matching as C-FIND (appliance/dicom/query.py, matching.py): served from the index, with
wildcards, ranges, lists of UIDs (commas or backslashes), names matched ignoring case,
component group by component group. The answer holds the level's default attributes
(PS3.18 table 10.6.3-3, those the index keeps), the UIDs of the levels above, the
attributes queried and those of `includefield` (a keyword or a tag, comma-separated or
repeated; `all`: every attribute the index keeps), in DICOM JSON (PS3.18 F.2, UTF-8) with
a RetrieveURL. `limit` and `offset` page through the matches (at most MAX_RESULTS at once;
a Warning header says when more are left); `fuzzymatching=true` is answered with literal
matching and a Warning saying so. An unknown parameter or a malformed value: 400.
"""

from __future__ import annotations

import itertools
import re

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from starlette.requests import Request
from starlette.responses import Response

from appliance.audit.events import EventID, event
from appliance.store import query as q
from appliance.format import p10
from appliance.web import media
from appliance.web.app import BASE, Caller, HttpError, WebFront, run

MAX_RESULTS = 10_000
LEVELS = {"studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}
DEFAULTS = {
    "STUDY": ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
              "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "SERIES": ("Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID", "NumberOfSeriesRelatedInstances"),
    "IMAGE": ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames"),
}
_DERIVED = ("ModalitiesInStudy", "SOPClassesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
            "NumberOfSeriesRelatedInstances")
EVERY_KEY = tuple(dict.fromkeys(p10.PATIENT_KEYS + p10.STUDY_KEYS + p10.SERIES_KEYS + p10.INSTANCE_KEYS + _DERIVED))
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_NOT_KEYS = {"limit", "offset", "fuzzymatching", "includefield"}
MORE_RESULTS = '299 pacs-vault "There are additional results that can be requested"'
NO_FUZZY = '299 pacs-vault "The fuzzymatching parameter is not supported. Only literal matching has been performed."'


def keyword_of(name: str) -> str:
    """A query key (keyword or 8 hex digits) as a keyword; 400 for anything else."""
    keyword = keyword_for_tag(int(name, 16)) if _TAG.match(name) else name
    if not keyword or tag_for_keyword(keyword) is None:
        raise HttpError(400, f"unknown attribute {name!r} (nested attributes are not supported)")
    return keyword


def identifier(request: Request, level: str) -> tuple[Dataset, int, int, list[str]]:
    """(the C-FIND identifier, offset, limit, warnings) of a QIDO-RS request."""
    params = request.query_params
    requested = list(DEFAULTS[level])
    nested = request.path_params
    if level != "STUDY":
        requested[:0] = ["StudyInstanceUID"] if "study" in nested else list(DEFAULTS["STUDY"])
    if level == "IMAGE":
        requested[:0] = ["SeriesInstanceUID"] if "series" in nested else list(DEFAULTS["SERIES"])
    for value in params.getlist("includefield"):
        for name in filter(None, (v.strip() for v in value.split(","))):
            requested += EVERY_KEY if name == "all" else [keyword_of(name)]
    keys: dict[str, str] = {}
    for name, value in params.multi_items():
        if name not in _NOT_KEYS:
            keyword = keyword_of(name)
            keys[keyword] = keys[keyword] + "\\" + value if keyword in keys else value
    keys.update({"StudyInstanceUID": nested["study"]} if "study" in nested else {})
    keys.update({"SeriesInstanceUID": nested["series"]} if "series" in nested else {})
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level
    for keyword in dict.fromkeys(requested + list(keys)):
        vr = dictionary_VR(Tag(keyword))
        value = keys.get(keyword, "")
        ds.add_new(Tag(keyword), vr, [] if vr == "SQ" else value.replace(",", "\\") if vr == "UI" else value)
    warnings = [NO_FUZZY] if params.get("fuzzymatching", "false").lower() == "true" else []
    return ds, _number(params, "offset", 0), min(_number(params, "limit", MAX_RESULTS), MAX_RESULTS), warnings


def _number(params, name: str, default: int) -> int:
    value = params.get(name, str(default))
    if not value.isdigit():
        raise HttpError(400, f"{name} must be a whole number")
    return int(value)


def _retrieve_url(base: str, level: str, view: dict) -> str:
    url = f"{base}/studies/{view['StudyInstanceUID']}"
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{view['SeriesInstanceUID']}"
    if level == "IMAGE":
        url += f"/instances/{view['SOPInstanceUID']}"
    return url


def matches(front: WebFront, query: q.Query, offset: int, limit: int) -> list[dict]:
    """Up to limit + 1 matching index views from `offset` on (one more: are there more?)."""
    with front.archive.catalog.read() as view:
        return list(itertools.islice(q.find(view.txn, query), offset, offset + limit + 1))


def search(level_name: str):
    level = LEVELS[level_name]

    async def handler(front: WebFront, request: Request, caller: Caller) -> Response:
        ds, offset, limit, warnings = identifier(request, level)
        try:
            query = q.parse(ds, q.STUDY_ROOT)
        except q.QueryError as exc:
            raise HttpError(400, str(exc)) from None
        views = await run(matches, front, query, offset, limit)
        if len(views) > limit:
            views, warnings = views[:limit], warnings + [MORE_RESULTS]
        keys = {keyword: value for keyword, (_, value) in query.keys.items()}
        await run(front.audit, event(EventID.QUERY, op="qido-rs", patient=keys.get("PatientID", ""), level=level,
                                     keys=keys, matches=len(views), **caller.who()))
        base = media.base_url(request, BASE)
        answers = [_answer(query, view, level, base) for view in views]
        return media.dicom_json(answers, headers={"Warning": ", ".join(warnings)} if warnings else None)
    return handler


def _answer(query: q.Query, view: dict, level: str, base: str) -> dict:
    ds = q.response(query, view, "")
    del ds.QueryRetrieveLevel
    if "RetrieveAETitle" not in query.requested:
        del ds.RetrieveAETitle
    ds.RetrieveURL = _retrieve_url(base, level, view)
    return ds.to_json_dict()
