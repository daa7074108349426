"""C-FIND against the index: which records match an identifier, and the response identifiers.

Served from the LMDB index only, never from blobs. A candidate set comes from
the most selective key the identifier offers (the UIDs of the level or above,
then Patient ID, Accession Number, Study Date, Patient Name, Modality through
their secondary indexes), and every candidate is then checked against all
matching keys with the rules in matching.py. Queries below the top level may
omit the unique keys of the levels above (relational behaviour); they are then
answered by scanning.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

from appliance.format import p10
from appliance.store import matching
from appliance.store.index import SECONDARY, Txn, secondary_key

PATIENT_ROOT, STUDY_ROOT = "patient", "study"
LEVELS = {PATIENT_ROOT: ("PATIENT", "STUDY", "SERIES", "IMAGE"), STUDY_ROOT: ("STUDY", "SERIES", "IMAGE")}
_NOT_MATCHING = {"QueryRetrieveLevel", "SpecificCharacterSet"}


class QueryError(Exception):
    """The identifier cannot be answered; `status` is the C-FIND failure to send."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Query:
    level: str
    keys: dict[str, tuple[str, str]]  # keyword -> (VR, value) of every key with a value
    requested: list[str]  # every keyword the identifier names, in its order
    charset: tuple[str, ...] = ()  # the identifier's Specific Character Set: what the answers come in


def parse(identifier: Dataset, model: str) -> Query:
    """The query an identifier asks (its values decoded by its own Specific Character Set)."""
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in LEVELS[model]:
        raise QueryError(0xA900, f"QueryRetrieveLevel '{level}' is not valid for the {model} root model")
    charset = identifier.get("SpecificCharacterSet") or ()
    charset = (charset,) if isinstance(charset, str) else tuple(charset)
    keys, requested = {}, []
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in _NOT_MATCHING or element.VR == "SQ":
            if keyword and element.VR == "SQ":
                requested.append(keyword)
            continue
        requested.append(keyword)
        value = p10.text_value(element.value)
        if value.strip(" \x00"):
            try:
                matching.validate_query(element.VR, value)
            except ValueError as exc:
                raise QueryError(0xC000, f"{keyword}: {exc}") from None
            keys[keyword] = (element.VR, value)
    return Query(level, keys, requested, charset)


def _uids(query: Query, keyword: str) -> list[str] | None:
    vr_value = query.keys.get(keyword)
    if vr_value is None or "*" in vr_value[1] or "?" in vr_value[1]:
        return None
    return [uid.strip(" \x00") for uid in vr_value[1].split("\\") if uid.strip(" \x00")]


def _prefix(query: Query, keyword: str) -> str | None:
    """The literal start of a value whose only wildcard is one trailing '*'."""
    vr_value = query.keys.get(keyword)
    if vr_value is None:
        return None
    value = vr_value[1].strip(" \x00")
    if not value.endswith("*") or any(c in value[:-1] for c in "*?\\"):
        return None
    return value[:-1]


def _single(query: Query, keyword: str) -> str | None:
    vr_value = query.keys.get(keyword)
    if vr_value is None or any(c in vr_value[1] for c in "*?\\-"):
        return None
    return vr_value[1].strip(" \x00")


# -- records, flattened per level with the derived attributes C-FIND asks for ----------------

def _patient_view(t: Txn, key: str, patient: dict) -> dict:
    studies = [t.get("studies", uid) for uid in t.dup_values("patient_studies", key)]
    studies = [s for s in studies if s]
    return {**patient, "NumberOfPatientRelatedStudies": str(len(studies)),
            "NumberOfPatientRelatedSeries": str(sum(s["series"] for s in studies)),
            "NumberOfPatientRelatedInstances": str(sum(s["instances"] for s in studies))}


def _study_view(t: Txn, uid: str, study: dict) -> dict:
    patient = t.get("patients", study["patient"]) or {}
    return {**patient, **study, "StudyInstanceUID": uid,
            "ModalitiesInStudy": study["modalities"], "SOPClassesInStudy": study["sop_classes"],
            "NumberOfStudyRelatedSeries": str(study["series"]),
            "NumberOfStudyRelatedInstances": str(study["instances"])}


def _series_view(uid: str, series: dict, study_view: dict) -> dict:
    return {**study_view, **series, "SeriesInstanceUID": uid,
            "NumberOfSeriesRelatedInstances": str(series["instances"])}


def _instance_view(uid: str, instance: dict, series_view: dict) -> dict:
    return {**series_view, **instance, "SOPInstanceUID": uid}


# -- candidates ------------------------------------------------------------------------------

def _study_candidates(t: Txn, query: Query) -> Iterator[str]:
    """Study UIDs to check, from the most selective key the query has: UIDs, then patient ID,
    accession number and name (exact or prefix), then the date, then the modality (few values,
    many studies each), else every study."""
    uids = _uids(query, "StudyInstanceUID")
    if uids is not None:
        yield from uids
        return
    for found in (_secondary(t, query, "PatientID", "PatientID"),
                  _secondary(t, query, "AccessionNumber", "AccessionNumber"), _by_name(t, query)):
        if found is not None:
            yield from found
            return
    date = query.keys.get("StudyDate")
    if date is not None and "\\" not in date[1]:
        value = date[1].strip().replace(".", "")
        low, _, high = value.partition("-") if "-" in value else (value, "", value)
        for _, uid in t.dup_range("by_study_date", low, high or None):
            yield uid
        return
    found = _secondary(t, query, "ModalitiesInStudy", "Modality")
    if found is not None:
        yield from found
        return
    for key, _ in t.items("studies"):
        yield key.decode()


def _secondary(t: Txn, query: Query, keyword: str, field: str) -> Iterator[str] | None:
    """Candidates from a secondary index for an exact value or a trailing-* prefix, else None."""
    db = SECONDARY[field]
    value = _single(query, keyword)
    if value is not None and secondary_key(field, value):
        return iter(t.dup_values(db, secondary_key(field, value)))
    prefix = _prefix(query, keyword)
    if prefix:  # "DOE*": a range of the secondary index, not a scan of every study
        return (uid for _, uid in t.dup_range(db, prefix, prefix + "\U0010ffff"))
    return None


def _by_name(t: Txn, query: Query) -> Iterator[str] | None:
    """Candidates from the Patient Name index when the query names the alphabetic group: the index
    is keyed by the whole name ("YAMADA^TAROU=山田^太郎=..."), which starts with that group."""
    vr_value = query.keys.get("PatientName")
    if vr_value is None or "\\" in vr_value[1]:
        return None
    alphabetic = vr_value[1].strip(" \x00").split("=")[0].strip(" ")
    db = SECONDARY["PatientName"]
    if alphabetic and not any(c in alphabetic for c in "*?"):
        key = secondary_key("PatientName", alphabetic)
        return itertools.chain(t.dup_values(db, key),
                               (uid for _, uid in t.dup_range(db, key + "=", key + "=\U0010ffff")))
    prefix = alphabetic[:-1].upper()
    if alphabetic.endswith("*") and prefix and not any(c in prefix for c in "*?"):
        return (uid for _, uid in t.dup_range(db, prefix, prefix + "\U0010ffff"))
    return None


def _studies(t: Txn, query: Query) -> Iterator[dict]:
    seen = set()
    for uid in _study_candidates(t, query):
        if uid in seen:
            continue
        seen.add(uid)
        study = t.get("studies", uid)
        if study is not None:
            yield _study_view(t, uid, study)


def _children(t: Txn, query: Query, parents: Iterator[dict], *, parent_uid: str, link: str, db: str,
              uid_keyword: str, parent_field: str, view) -> Iterator[dict]:
    """The records one level down: the UIDs the query lists, or every child of each parent."""
    listed = _uids(query, uid_keyword)
    for parent in parents:
        for uid in listed if listed is not None else t.dup_values(link, parent[parent_uid]):
            record = t.get(db, uid)
            if record is not None and record[parent_field] == parent[parent_uid]:
                yield view(uid, record, parent)


def _series(t: Txn, query: Query) -> Iterator[dict]:
    return _children(t, query, _studies(t, query), parent_uid="StudyInstanceUID", link="study_series",
                     db="series", uid_keyword="SeriesInstanceUID", parent_field="study", view=_series_view)


def _instances(t: Txn, query: Query) -> Iterator[dict]:
    return _children(t, query, _series(t, query), parent_uid="SeriesInstanceUID", link="series_instances",
                     db="instances", uid_keyword="SOPInstanceUID", parent_field="series", view=_instance_view)


def _patients(t: Txn, query: Query) -> Iterator[dict]:
    patient_id = _single(query, "PatientID")
    for key, patient in t.items("patients"):
        if patient_id is None or key.decode().split("\0")[0] == patient_id:
            yield _patient_view(t, key.decode(), patient)


_LEVEL_SCAN = {"PATIENT": _patients, "STUDY": _studies, "SERIES": _series, "IMAGE": _instances}


def find(t: Txn, query: Query) -> Iterator[dict]:
    """Every record view at the query's level that matches all of its keys."""
    for view in _LEVEL_SCAN[query.level](t, query):
        if matching.record_matches(query.keys, view):
            yield view


def response(query: Query, view: dict, retrieve_ae_title: str) -> Dataset:
    """The identifier to send back: the requested keys only, plus the character set and level.

    It comes in the requestor's character set when that can carry every value (a name keeping
    the component groups it can carry: "Yamada^Tarou" for a Latin-1 requestor), else in UTF-8."""
    values = {}
    for keyword in query.requested:
        tag = tag_for_keyword(keyword)
        if tag is None:
            continue
        vr = dictionary_VR(tag)
        value = view.get(keyword, "")
        values[tag] = (vr, "\\".join(value) if isinstance(value, list) else value)
    charset, values = _in_charset(query.charset, values)
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = query.level
    for tag, (vr, value) in values.items():
        ds.add_new(tag, vr, [] if vr == "SQ" else _typed(vr, value))
    if "RetrieveAETitle" not in ds:
        ds.RetrieveAETitle = retrieve_ae_title
    return ds


_UTF8 = "ISO_IR 192"
_TEXT_VRS = {"PN", "LO", "SH", "LT", "ST", "UT", "UC"}
_DEFAULT_REPERTOIRE = {"", "ISO_IR 6", "ISO 2022 IR 6"}


def _in_charset(requested: tuple[str, ...], values: dict) -> tuple[str | list[str], dict]:
    """(Specific Character Set, values) of an answer: the requestor's when it carries them all."""
    codecs = ["ascii" if term in _DEFAULT_REPERTOIRE else python_encoding.get(term) for term in requested]
    if not codecs or None in codecs:  # none asked for, or one Python cannot encode
        return _UTF8, values
    fitted = {}
    for tag, (vr, value) in values.items():
        if vr in _TEXT_VRS and value and not _fits(value, codecs):
            if vr != "PN":
                return _UTF8, values
            groups = [group if _fits(group, codecs) else "" for group in value.split("=")]
            if not any(groups):
                return _UTF8, values
            value = "=".join(groups).rstrip("=")
        fitted[tag] = (vr, value)
    return (list(requested) if len(requested) > 1 else requested[0]), fitted


def _fits(text: str, codecs: list[str]) -> bool:
    """Whether every character of `text` has a code in one of the character sets."""
    def encodes(char: str, codec: str) -> bool:
        try:
            char.encode(codec)
        except UnicodeEncodeError:
            return False
        return True
    return all(any(encodes(char, codec) for codec in codecs) for char in text)


def _typed(vr: str, value: str):
    if value in ("", None):
        return None
    if vr in ("US", "SS", "UL", "SL"):
        return int(value)
    if vr in ("FL", "FD"):
        return float(value)
    return value
