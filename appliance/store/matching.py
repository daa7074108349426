"""C-FIND attribute matching (DICOM PS3.4 C.2.2.2), pure functions.

- Universal: an empty value (or "*") matches everything, missing values included.
- List of UIDs (VR UI): matches when the stored UID is one of the backslash-separated values.
- Range (DA, TM, DT): "A-B", "A-" or "-B", inclusive, on normalised values; a missing stored
  value never matches a range. A TM bound names a whole period at its precision: the
  upper bound "10" reaches 10:59:59.999999. Stored DT time zone offsets are ignored; a '-'
  in a DT query is always the range separator.
- Wildcard (* any run, ? one character) for text VRs; not for DA/TM/DT/UI or numbers.
- Single value otherwise. Leading and trailing spaces are insignificant. Matching is
  case-sensitive except for PN, which pacs-vault matches ignoring case (the standard
  leaves this to the implementation) and ignoring trailing empty name components.
- PN component groups (alphabetic=ideographic=phonetic, PS3.5 6.2.1.2) match one by one, each
  against the stored group in its place, single value or wild card; a group the query leaves
  empty matches anything. So "Yamada^Tarou" (a Latin-1 requestor's) and "=山田^太郎" both find
  "Yamada^Tarou=山田^太郎=やまだ^たろう". Values are compared decoded, whatever character set the
  query and the stored instance came in.
- A multi-valued stored attribute (ModalitiesInStudy) matches when any value does.
"""

from __future__ import annotations

import re

from appliance.format.p10 import person_name_key

_NO_WILDCARD_VRS = {"DA", "TM", "DT", "UI", "IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "AT", "UV", "SV"}
_RANGE_VRS = {"DA", "TM", "DT"}
_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")
_DA = re.compile(r"^\d{8}$")
_DT = re.compile(r"^\d{4}(\d{2}){0,5}(\.\d{1,6})?(\+\d{4})?$")


def _clean(value: str) -> str:
    return value.strip(" \x00")


def _normalise_date(value: str) -> str:
    value = value.replace(".", "") if len(value) == 10 and value[4] == "." else value  # ACR-NEMA YYYY.MM.DD
    return value


def _time_bounds(value: str) -> tuple[str, str]:
    """The first and last instant a TM value names, as HHMMSS.FFFFFF strings."""
    match = _TM.match(value)
    hours, minutes, seconds, fraction = match.groups()
    low = hours + (minutes or "00") + (seconds or "00") + "." + (fraction or ".")[1:].ljust(6, "0")
    high = hours + (minutes or "59") + (seconds or "59") + "." + ((fraction or ".")[1:].ljust(6, "9"))
    return low, high


def _datetime_bounds(value: str) -> tuple[str, str]:
    value = re.sub(r"[+-]\d{4}$", "", value)
    whole, _, fraction = value.partition(".")
    low_fill, high_fill = "00000101000000", "99991231235959"
    low = whole + low_fill[len(whole):] + "." + fraction.ljust(6, "0")
    high = whole + high_fill[len(whole):] + "." + fraction.ljust(6, "9")
    return low, high


def _bounds(vr: str, value: str) -> tuple[str, str]:
    if vr == "DA":
        value = _normalise_date(value)
        return value, value
    if vr == "TM":
        return _time_bounds(value)
    return _datetime_bounds(value)


def validate_query(vr: str, query: str) -> None:
    """Raise ValueError for a query value that cannot be matched (malformed range or date)."""
    query = _clean(query)
    if vr not in _RANGE_VRS or not query:
        return
    for value in query.split("\\"):
        parts = value.split("-")
        if len(parts) > 2 or (len(parts) == 2 and not any(parts)):
            raise ValueError(f"malformed range {value!r}")
        for part in parts:
            if part and not _valid(vr, part):
                raise ValueError(f"{part!r} is not a valid {vr} value")


def _valid(vr: str, value: str) -> bool:
    if vr == "DA":
        return bool(_DA.match(_normalise_date(value)))
    if vr == "TM":
        return bool(_TM.match(value))
    return bool(_DT.match(value))


def _wildcard(pattern: str, value: str, fold: bool) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL | (re.IGNORECASE if fold else 0)) is not None


def _match_one(vr: str, query: str, stored: str) -> bool:
    stored = _clean(stored)
    if vr == "UI":
        return stored in {_clean(uid) for uid in query.split("\\")}
    if vr in _RANGE_VRS:
        if not stored:
            return False
        parts = query.split("-")
        stored_low, stored_high = _bounds(vr, stored)
        if len(parts) == 1:
            low, high = _bounds(vr, query)
            return low <= stored_low and stored_high <= high
        low = _bounds(vr, parts[0])[0] if parts[0] else ""
        high = _bounds(vr, parts[1])[1] if parts[1] else "\uffff"
        return low <= stored_low and stored_low <= high
    if vr == "PN":
        return _person_name_matches(query, stored)
    if "*" in query or "?" in query:
        if vr in _NO_WILDCARD_VRS:
            return query == stored
        return _wildcard(query, stored, fold=False)
    return query == stored


def _person_name_matches(query: str, stored: str) -> bool:
    stored_groups = stored.split("=")
    for place, group in enumerate(query.split("=")):
        group = group.strip(" ")
        if group in ("", "*"):
            continue
        value = stored_groups[place] if place < len(stored_groups) else ""
        if "*" in group or "?" in group:
            if not _wildcard(group.upper(), value.strip(" ").upper(), fold=False):
                return False
        elif person_name_key(group) != person_name_key(value):
            return False
    return True


def match_attribute(vr: str, query: str, stored) -> bool:
    query = _clean(query or "")
    if not query or query == "*":
        return True
    values = stored if isinstance(stored, (list, tuple)) else [stored or ""]
    if vr in _RANGE_VRS and "\\" in query:  # a list of dates/times: any of them
        return any(_match_one(vr, one, value) for one in query.split("\\") for value in values)
    return any(_match_one(vr, query, value) for value in values)


def record_matches(query: dict[str, tuple[str, str]], record: dict) -> bool:
    for keyword, (vr, value) in query.items():
        stored = record.get(keyword)
        if stored is None and keyword == "ModalitiesInStudy":
            stored = record.get("modalities")
        if not match_attribute(vr, value, stored):
            return False
    return True
