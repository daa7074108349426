"""C-FIND matching rules against naive references (hypothesis) and the standard's examples."""

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.store.matching import match_attribute, record_matches, validate_query

ALPHABET = "ab^ *?"
text = st.text(alphabet="ab^ ", max_size=8)
pattern = st.text(alphabet=ALPHABET, max_size=8)


def naive_wildcard(pattern: str, value: str) -> bool:
    """Backtracking reference: * any run, ? one character."""
    if not pattern:
        return not value
    head, rest = pattern[0], pattern[1:]
    if head == "*":
        return any(naive_wildcard(rest, value[i:]) for i in range(len(value) + 1))
    return bool(value) and (head == "?" or head == value[0]) and naive_wildcard(rest, value[1:])


@settings(max_examples=500)
@given(pattern=pattern, value=text)
def test_wildcards_agree_with_a_naive_matcher(pattern, value):
    query, stored = pattern.strip(" "), value.strip(" ")
    expected = True if query in ("", "*") else (
        naive_wildcard(query, stored) if ("*" in query or "?" in query) else query == stored)
    assert match_attribute("LO", pattern, value) == expected


@given(pattern=pattern, value=text)
def test_person_names_match_ignoring_case(pattern, value):
    assert match_attribute("PN", pattern, value) == match_attribute("PN", pattern.upper(), value.lower())


@given(uids=st.lists(st.from_regex(r"1\.2\.[0-9]{1,5}", fullmatch=True), min_size=1, max_size=5),
       stored=st.from_regex(r"1\.2\.[0-9]{1,5}", fullmatch=True))
def test_uid_lists_match_exactly_the_listed_uids(uids, stored):
    assert match_attribute("UI", "\\".join(uids), stored) == (stored in uids)


dates = st.dates(min_value=datetime.date(1900, 1, 1), max_value=datetime.date(2100, 12, 31))


@given(low=st.one_of(st.none(), dates), high=st.one_of(st.none(), dates), stored=dates)
def test_date_ranges_agree_with_date_comparison(low, high, stored):
    if low is None and high is None:
        return
    query = f"{low.strftime('%Y%m%d') if low else ''}-{high.strftime('%Y%m%d') if high else ''}"
    expected = (low is None or low <= stored) and (high is None or stored <= high)
    assert match_attribute("DA", query, stored.strftime("%Y%m%d")) == expected


@pytest.mark.parametrize("vr,query,stored,expected", [
    ("LO", "", None, True),                       # universal matches a missing value
    ("LO", "*", "", True),
    ("LO", "abc", None, False),
    ("PN", "DOE^JANE^^", "doe^jane", True),        # trailing empty components ignored
    ("PN", "Doe*", "DOE^JANE", True),
    ("LO", "Doe*", "DOE^JANE", False),             # other VRs are case-sensitive
    ("SH", " ACC1 ", "ACC1", True),                # leading/trailing spaces insignificant
    ("CS", "CT", ["MR", "CT"], True),              # any value of a multi-valued attribute
    ("CS", "US", ["MR", "CT"], False),
    ("DA", "20261124", "20261124", True),
    ("DA", "2026.11.24", "20261124", True),        # ACR-NEMA date form
    ("DA", "20260101-", "", False),                # a missing value never matches a range
    ("DA", "20260101-20261231\\19990101", "19990101", True),
    ("TM", "10", "105959", True),                  # an upper bound names its whole hour
    ("TM", "-10", "105959.999", True),
    ("TM", "-10", "110000", False),
    ("TM", "1030-1100", "103000", True),
    ("DT", "20260101-20261231", "20260615120000+0100", True),
    ("DT", "2027-", "20261231235959", False),
    ("UI", "1.2.3*", "1.2.34", False),             # no wildcards on UIDs
    ("IS", "1*", "12", False),                     # nor on numbers
])
def test_matching_rules(vr, query, stored, expected):
    assert match_attribute(vr, query, stored) is expected


@pytest.mark.parametrize("vr,query", [("DA", "2020-2021-2022"), ("DA", "2026011"), ("TM", "25a"),
                                      ("DA", "-"), ("DT", "2026x")])
def test_malformed_queries_are_refused(vr, query):
    with pytest.raises(ValueError):
        validate_query(vr, query)


def test_valid_queries_pass_validation():
    for vr, query in (("DA", "20260101-"), ("TM", "1010-1020"), ("DT", "2026-"), ("LO", "*x?")):
        validate_query(vr, query)


def test_record_matching_uses_every_key_and_modalities_in_study():
    record = {"PatientName": "DOE^JANE", "StudyDate": "20261124", "modalities": ["CT", "SR"]}
    assert record_matches({"PatientName": ("PN", "doe*"), "ModalitiesInStudy": ("CS", "SR")}, record)
    assert not record_matches({"PatientName": ("PN", "doe*"), "StudyDate": ("DA", "2025-")} | {
        "StudyDate": ("DA", "-2025")}, record)
