"""C-FIND query planning over the catalog (store/query.py), on a real index: each level, the
secondary keys a query is planned with, and relational queries below the top level."""

from __future__ import annotations

import itertools

import pytest
from pydicom.datadict import dictionary_VR

from appliance.format.p10 import InstanceInfo
from appliance.store import query as q
from appliance.store.catalog import Catalog
from appliance.store.index import Index

_CAS = itertools.count(1)
STUDIES = [  # (patient id, name, study uid, date, accession, modality, series uid, instances)
    ("P1", "DOE^JANE", "1.1", "20240105", "A1", "CT", "1.1.1", 2),
    ("P1", "DOE^JANE", "1.2", "20250310", "A2", "MR", "1.2.1", 1),
    ("P2", "ROE^RICHARD", "1.3", "20250311", "A3", "CT", "1.3.1", 3),
    ("P3", "Smith^Anna", "1.4", "20260101", "A4", "US", "1.4.1", 1),
]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    index = Index(tmp_path_factory.mktemp("index"), create=True)
    catalog = Catalog(index)
    stores = []
    for pid, name, study, date, accession, modality, series, count in STUDIES:
        for n in range(count):
            info = InstanceInfo(next(_CAS).to_bytes(32, "big"), 100, "1.2.840.10008.1.2.1", True)
            info.patient.update(PatientID=pid, PatientName=name)
            info.study.update(StudyInstanceUID=study, StudyDate=date, AccessionNumber=accession)
            info.series.update(SeriesInstanceUID=series, Modality=modality)
            info.instance.update(SOPInstanceUID=f"{series}.{n}", SOPClassUID="1.2.840.10008.5.1.4.1.1.2")
            blob = {"name": f"{len(stores):032x}", "sealed_size": 50, "xxh3": bytes(16), "key_id": bytes(16),
                    "compression": 0}
            stores.append((len(stores) + 1, info, blob, "TEST"))
    catalog.record_stores(b"q" * 16, len(stores), stores, "hot", keep_previous=True, readable=lambda key: True)
    yield catalog
    index.close()


def _find(catalog, level: str, **keys) -> list[dict]:
    query = q.Query(level, {k: (dictionary_VR(k), v) for k, v in keys.items()}, list(keys))
    with catalog.read() as view:
        return list(q.find(view.txn, query))


@pytest.mark.parametrize("keys, studies", [
    ({"PatientID": "P1"}, {"1.1", "1.2"}),
    ({"AccessionNumber": "A3"}, {"1.3"}),
    ({"StudyInstanceUID": "1.4\\1.1"}, {"1.1", "1.4"}),
    ({"PatientName": "doe^*"}, {"1.1", "1.2"}),  # names match ignoring case, by prefix
    ({"PatientName": "smith^anna"}, {"1.4"}),
    ({"StudyDate": "20250101-20251231"}, {"1.2", "1.3"}),
    ({"StudyDate": "-20240131"}, {"1.1"}),
    ({"StudyDate": "20250311"}, {"1.3"}),
    ({"PatientID": "P1", "StudyDate": "2025*"}, set()),  # dates take ranges, not wildcards
    ({"PatientID": "P1", "AccessionNumber": "A2"}, {"1.2"}),  # every key matches, not only the planned one
    ({}, {"1.1", "1.2", "1.3", "1.4"}),  # no key: every study
])
def test_study_level(catalog, keys, studies):
    assert {view["StudyInstanceUID"] for view in _find(catalog, "STUDY", **keys)} == studies


def test_study_level_answers_carry_the_counts_and_modalities(catalog):
    [view] = _find(catalog, "STUDY", StudyInstanceUID="1.3")
    assert view["NumberOfStudyRelatedSeries"] == "1" and view["NumberOfStudyRelatedInstances"] == "3"
    assert view["ModalitiesInStudy"] == ["CT"] and view["PatientName"] == "ROE^RICHARD"


def test_series_and_instances_below_a_study_and_across_studies(catalog):
    assert {v["SeriesInstanceUID"] for v in _find(catalog, "SERIES", StudyInstanceUID="1.1")} == {"1.1.1"}
    # relational: below the top level without the UIDs of the levels above
    assert {v["SeriesInstanceUID"] for v in _find(catalog, "SERIES", PatientID="P1")} == {"1.1.1", "1.2.1"}
    assert sorted(v["SOPInstanceUID"] for v in _find(catalog, "IMAGE", SeriesInstanceUID="1.3.1")) == [
        "1.3.1.0", "1.3.1.1", "1.3.1.2"]
    assert {v["SOPInstanceUID"] for v in _find(catalog, "IMAGE", PatientID="P2")} == {"1.3.1.0", "1.3.1.1",
                                                                                      "1.3.1.2"}


def test_patient_level_counts_what_is_under_each_patient(catalog):
    [view] = _find(catalog, "PATIENT", PatientID="P1")
    assert (view["NumberOfPatientRelatedStudies"], view["NumberOfPatientRelatedSeries"],
            view["NumberOfPatientRelatedInstances"]) == ("2", "2", "3")
