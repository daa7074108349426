"""C-FIND across character sets: names stored in Latin-1 (ISO_IR 100), UTF-8 (ISO_IR 192) and
Japanese (ISO 2022 IR 87) are found by queries sent in another character set, and the answers
come in a character set the requestor reads."""

from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from conftest import run_cli
from support.dicom_server import CLIENT_AE, Server, dcmtk, free_port, register
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from appliance import config as cfg
from appliance.admin import home as home_mod
from appliance.admin.home import open_archive
from appliance.store import matching
from appliance.store import query as q
from appliance.store.archive import Archive

# The pydicom test files: Specific Character Set, Patient ID, Patient Name as pydicom decodes it.
STORED = {
    "chrFren.dcm": ("ISO_IR 100", "SCSFREN", "Buc^Jérôme"),
    "chrX1.dcm": ("ISO_IR 192", "X1EXAMPLE", "Wang^XiaoDong=王^小東"),
    "chrH31.dcm": ("\\ISO 2022 IR 87", "H31EXAMPLE", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
}
JIS = ["", "ISO 2022 IR 87"]

# (character set of the query, Patient Name asked for, Patient IDs that must answer)
QUERIES = [
    ("ISO_IR 192", "Buc^Jérôme", {"SCSFREN"}),  # Latin-1 stored, UTF-8 asked
    ("ISO_IR 100", "BUC^JÉRÔME", {"SCSFREN"}),  # names match ignoring case, accented letters too
    (JIS, "buc^j*", {"SCSFREN"}),
    (None, "Wang^XiaoDong", {"X1EXAMPLE"}),  # the alphabetic group of a UTF-8 name, in ASCII
    ("ISO_IR 100", "Yamada^Tarou", {"H31EXAMPLE"}),  # the alphabetic group of a Japanese name
    ("ISO_IR 192", "=山田^太郎", {"H31EXAMPLE"}),  # its ideographic group alone, in UTF-8
    ("ISO_IR 192", "==やまだ^たろう", {"H31EXAMPLE"}),  # its phonetic group alone
    ("ISO_IR 192", "Yamada^Tarou=山田^太郎=やまだ^たろう", {"H31EXAMPLE"}),
    ("ISO_IR 192", "=山田*", {"H31EXAMPLE"}),  # wild cards within a group
    ("ISO_IR 192", "Yamada^Tarou=山田^次郎", set()),  # every group asked for must match
    (JIS, "=王^小東", {"X1EXAMPLE"}),  # a UTF-8 stored Chinese name asked in JIS X 0208
    (JIS, "Yamada^Tarou=山田^太郎=やまだ^たろう", {"H31EXAMPLE"}),
    ("ISO_IR 192", "*", {"SCSFREN", "X1EXAMPLE", "H31EXAMPLE"}),
]


def _charset_file(name: str) -> Path:
    return Path(get_charset_files(name)[0])


def _identifier(charset, name: str | None = None) -> Dataset:
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = name if name is not None else ""
    ds.PatientID = ""
    ds.StudyDescription = ""
    return ds


def _over_the_wire(ds: Dataset) -> Dataset:
    """`ds` encoded and decoded as a C-FIND identifier travels (explicit VR little endian)."""
    return decode(BytesIO(encode(ds, False, True)), False, True)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    home = tmp_path_factory.mktemp("charsets") / "home"
    home_mod.init(home)
    with open_archive(cfg.load(home), writer=True) as opened:
        for name in STORED:
            opened.store_file(_charset_file(name))
        yield opened


def _found(archive: Archive, identifier: Dataset) -> list[dict]:
    query = q.parse(_over_the_wire(identifier), q.STUDY_ROOT)
    with archive.catalog.read() as view:
        return list(q.find(view.txn, query))


# -- the pure functions ---------------------------------------------------------------------

@pytest.mark.parametrize(("charset", "name", "expected"), QUERIES, ids=[f"{c}:{n}" for c, n, _ in QUERIES])
def test_a_name_is_found_whatever_character_set_the_query_comes_in(archive, charset, name, expected):
    assert {view["PatientID"] for view in _found(archive, _identifier(charset, name))} == expected


@pytest.mark.parametrize(("query", "stored", "expected"), [
    ("Yamada^Tarou", "Yamada^Tarou=山田^太郎=やまだ^たろう", True),  # groups left out match anything
    ("=山田^太郎", "Yamada^Tarou=山田^太郎=やまだ^たろう", True),
    ("=山田^太郎", "Yamada^Tarou", False),
    ("Yamada^Tarou=山田^太郎", "Yamada^Tarou=山田^次郎", False),
    ("yamada^tarou^^=山田^太郎", "YAMADA^TAROU=山田^太郎", True),
    ("=*太郎", "Yamada^Tarou=山田^太郎=やまだ^たろう", True),
    ("*太郎", "Yamada^Tarou=山田^太郎=やまだ^たろう", False),  # the alphabetic group ends in Tarou
    ("Jérôme*", "JÉRÔME^BUC", True),
])
def test_person_names_match_component_group_by_component_group(query, stored, expected):
    assert matching.match_attribute("PN", query, stored) is expected


_GROUP = st.text(alphabet="ab^éÉ山田たろ", min_size=1, max_size=6).filter(lambda g: g.strip("^"))


@settings(max_examples=300)
@given(groups=st.lists(_GROUP, min_size=1, max_size=3), place=st.integers(0, 2), other=_GROUP)
def test_any_one_group_of_a_name_finds_it_and_a_different_one_does_not(groups, place, other):
    stored = "=".join(groups)
    place = min(place, len(groups) - 1)
    asked = "=" * place + groups[place].swapcase()
    assert matching.match_attribute("PN", asked, stored)
    assert matching.match_attribute("PN", "=" * place + groups[place][:1] + "*", stored)
    differs = matching.person_name_key(other) != matching.person_name_key(groups[place])
    assert matching.match_attribute("PN", "=" * place + other, stored) is not differs


def _response(archive: Archive, charset, name: str, patient_id: str) -> tuple[Dataset, bytes]:
    """The response identifier for one match, and its bytes on the wire."""
    query = q.parse(_over_the_wire(_identifier(charset, name)), q.STUDY_ROOT)
    [view] = [v for v in _found(archive, _identifier(charset, name)) if v["PatientID"] == patient_id]
    encoded = encode(q.response(query, view, "ARCHIVE"), False, True)
    return decode(BytesIO(encoded), False, True), encoded


def test_the_answer_comes_in_the_requestors_character_set(archive):
    answer, wire = _response(archive, "ISO_IR 100", "Buc*", "SCSFREN")
    assert answer.SpecificCharacterSet == "ISO_IR 100"
    assert "Buc^J\xe9r\xf4me".encode("latin-1") in wire and str(answer.PatientName) == "Buc^Jérôme"

    answer, wire = _response(archive, JIS, "=王*", "X1EXAMPLE")
    assert list(answer.SpecificCharacterSet) == JIS
    assert b"\x1b$B" in wire and "王".encode("utf-8") not in wire  # JIS X 0208 by escape sequence
    assert str(answer.PatientName) == "Wang^XiaoDong=王^小東"


def test_an_answer_keeps_the_name_groups_the_requestors_character_set_can_carry(archive):
    answer, wire = _response(archive, "ISO_IR 100", "Yamada*", "H31EXAMPLE")
    assert answer.SpecificCharacterSet == "ISO_IR 100"
    assert str(answer.PatientName) == "Yamada^Tarou"  # kanji and kana are not in Latin-1


def test_an_answer_the_requestors_character_set_cannot_carry_comes_in_utf8(archive):
    for charset in (None, JIS):  # neither the default repertoire nor JIS X 0208 has an é
        answer, wire = _response(archive, charset, "Buc*", "SCSFREN")
        assert answer.SpecificCharacterSet == "ISO_IR 192"
        assert "Jérôme".encode("utf-8") in wire and str(answer.PatientName) == "Buc^Jérôme"


# -- through a real server: pynetdicom and dcmtk as the requestor -----------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("charset-server") / "home"
    home_mod.init(home)
    run_cli("import", *(str(_charset_file(name)) for name in STORED), home=home)
    register(home, CLIENT_AE, free_port(), "query")
    srv = Server(home).start()
    yield srv
    srv.stop()


def _pynetdicom_find(srv, identifier: Dataset) -> list[Dataset]:
    ae = AE(ae_title=CLIENT_AE)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", srv.port, ae_title="ARCHIVE")
    assert assoc.is_established
    try:
        return [answer for status, answer in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
                if status.Status == 0xFF00]
    finally:
        assoc.release()


@pytest.mark.parametrize(("charset", "name", "expected"), QUERIES, ids=[f"{c}:{n}" for c, n, _ in QUERIES])
def test_pynetdicom_finds_names_across_character_sets(server, charset, name, expected):
    answers = _pynetdicom_find(server, _identifier(charset, name))
    assert {answer.PatientID for answer in answers} == expected
    for answer in answers:
        full = STORED[next(n for n, v in STORED.items() if v[1] == answer.PatientID)][2]
        assert str(answer.PatientName) in full  # whole, or the groups the character set carries
        assert "SpecificCharacterSet" in answer


def _findscu(srv, tmp_path: Path, *keys: bytes) -> list[Dataset]:
    """dcmtk's findscu with raw key bytes (as a requestor in that character set sends them);
    the answers it saved, read back."""
    out = tmp_path / f"rsp-{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    args = [x for key in keys for x in ("-k", os.fsdecode(key))]  # the bytes pass through unchanged
    dcmtk("findscu", "-S", "-X", "-od", str(out), "-aet", CLIENT_AE, "-aec", "ARCHIVE", "127.0.0.1",
          str(srv.port), "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID", *args)
    return [pydicom.dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


def test_findscu_in_latin1_finds_a_japanese_name_and_reads_the_answer(server, tmp_path):
    [answer] = _findscu(server, tmp_path, b"SpecificCharacterSet=ISO_IR 100", b"PatientName=yamada^tarou")
    assert (answer.PatientID, answer.SpecificCharacterSet) == ("H31EXAMPLE", "ISO_IR 100")
    assert str(answer.PatientName) == "Yamada^Tarou"
    [answer] = _findscu(server, tmp_path, b"SpecificCharacterSet=ISO_IR 100",
                        b"PatientName=" + "BUC^JÉRÔME".encode("latin-1"))
    assert (answer.PatientID, str(answer.PatientName)) == ("SCSFREN", "Buc^Jérôme")


def test_findscu_in_jis_finds_a_utf8_stored_name(server, tmp_path):
    name = pydicom.valuerep.PersonName("=王^小東").encode(pydicom.charset.convert_encodings(JIS))
    [answer] = _findscu(server, tmp_path, b"SpecificCharacterSet=\\ISO 2022 IR 87", b"PatientName=" + name)
    assert answer.PatientID == "X1EXAMPLE" and list(answer.SpecificCharacterSet) == JIS
    assert str(answer.PatientName) == "Wang^XiaoDong=王^小東"
