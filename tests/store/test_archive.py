"""The archive facade: byte-exact storage of real-world files, idempotence, versions, rebuild, shredding."""


import dataclasses
import hashlib
import shutil
from concurrent.futures import ThreadPoolExecutor

import pydicom
import pytest
from conftest import dicom_test_files

from appliance import config as cfg
from appliance.admin.home import open_archive
from appliance.errors import InvalidInstance, KeyMissing, NotFound
from appliance.jobs import fsck
from appliance.store.index import Index


def _all_versions(archive):
    with archive.catalog.read() as view:
        return {blob.ca: blob for blob in view.blobs()}


def _snapshot(archive):
    """What C-FIND and export see: studies, series, instances with their current version."""
    out = {}
    for study_uid in archive.study_uids():
        study = archive.study(study_uid)
        instances = sorted((rec.sop_uid, rec.current, rec.versions) for rec in archive.instances_of_study(study_uid))
        out[study_uid] = (dataclasses.replace(study, first_stored=0, last_stored=0), instances)
    return out


def test_every_readable_test_file_round_trips_byte_exact(config):
    files = dicom_test_files()
    stored, rejected = {}, []
    with open_archive(config, writer=True) as archive:
        for path in files:
            try:
                outcome = archive.store_file(path)
            except InvalidInstance as exc:
                rejected.append((path.name, str(exc)))
                continue
            stored[outcome.info.content_address] = path
        assert len(stored) > 150, "most of pydicom's test files are instances"
        for ca, path in stored.items():
            assert b"".join(archive.open_blob(ca)) == path.read_bytes(), path
        # Every rejection is one of the documented reasons, never a crash.
        for name, reason in rejected:
            assert reason.startswith(("not a DICOM file", "missing ", "truncated", "malformed",
                                      "StudyInstanceUID is not")), (name, reason)
        assert {"MR_truncated.dcm", "rtplan_truncated.dcm"} <= {name for name, _ in rejected}


def test_reimport_is_idempotent(config, ct_files):
    with open_archive(config, writer=True) as archive:
        first = [archive.store_file(p).status for p in ct_files]
        before = (archive.counters(), sorted(archive.hot.list()))
        second = [archive.store_file(p).status for p in ct_files]
        after = (archive.counters(), sorted(archive.hot.list()))
    assert set(first) == {"stored"} and set(second) == {"duplicate"}
    assert before == after


def test_concurrent_stores_of_one_study_share_one_key_and_lose_nothing(config, ct_files):
    with open_archive(config, writer=True) as archive:
        with ThreadPoolExecutor(max_workers=6) as pool:
            outcomes = list(pool.map(archive.store_file, ct_files + ct_files))
        statuses = sorted(o.status for o in outcomes)
        assert statuses.count("stored") == len(ct_files)
        assert statuses.count("duplicate") == len(ct_files)
        study_uid = outcomes[0].info.study_uid
        blobs = _all_versions(archive)
        assert len({b.key_id for b in blobs.values()}) == 1
        assert archive.keyring.count() == 1
        assert len(archive.instances_of_study(study_uid)) == len(ct_files)
        # duplicates sealed concurrently were removed again
        assert len(list(archive.hot.list())) == len(ct_files)


def test_new_version_keeps_previous_and_becomes_current(config, ct_files, tmp_path):
    original = ct_files[0]
    ds = pydicom.dcmread(original)
    ds.SeriesDescription = "corrected"
    corrected = tmp_path / "corrected.dcm"
    ds.save_as(corrected)
    with open_archive(config, writer=True) as archive:
        assert archive.store_file(original).status == "stored"
        assert archive.store_file(corrected).status == "new_version"
        record = archive.instance(ds.SOPInstanceUID)
        assert len(record.versions) == 2
        assert record.current == hashlib.sha256(corrected.read_bytes()).digest()
        assert b"".join(archive.open_instance(ds.SOPInstanceUID)) == corrected.read_bytes()
        assert b"".join(archive.open_blob(record.versions[0])) == original.read_bytes()
        counters = archive.counters()
        assert counters["instances"] == 1 and counters["versions"] == 2


def test_previous_version_dropped_when_config_says_so(home, ct_files, tmp_path):
    text = (home / "appliance.yaml").read_text().replace("keep_previous_versions: true",
                                                         "keep_previous_versions: false")
    (home / "appliance.yaml").write_text(text)
    ds = pydicom.dcmread(ct_files[0])
    ds.SeriesDescription = "corrected"
    corrected = tmp_path / "corrected.dcm"
    ds.save_as(corrected)
    with open_archive(cfg.load(home), writer=True) as archive:
        archive.store_file(ct_files[0])
        assert archive.store_file(corrected).status == "new_version"
        assert archive.instance(ds.SOPInstanceUID).versions == (hashlib.sha256(corrected.read_bytes()).digest(),)
        assert len(list(archive.hot.list())) == 1
        assert fsck.check(archive, repair=False).clean


def test_rebuild_index_gives_the_same_studies(home, config, ct_files, tmp_path):
    ds = pydicom.dcmread(ct_files[1])
    ds.SeriesDescription = "v2"
    v2 = tmp_path / "v2.dcm"
    ds.save_as(v2)
    with open_archive(config, writer=True) as archive:
        for path in ct_files + [v2] + dicom_test_files()[:60]:
            try:
                archive.store_file(path)
            except InvalidInstance:
                pass
        before, counters_before = _snapshot(archive), archive.counters()
    shutil.rmtree(home / "index")
    report = fsck.rebuild(config)
    assert not report.errors and report.instances == counters_before["versions"]
    with open_archive(config) as archive:
        assert _snapshot(archive) == before
        assert archive.counters() == counters_before
        assert fsck.check(archive, repair=False).clean


def test_delete_study_removes_every_copy_and_shreds_the_key(config, ct_files):
    with open_archive(config, writer=True) as archive:
        info = archive.store_file(ct_files[0]).info
        key_id = archive.study_key(info.study_uid)
        assert archive.delete_study(info.study_uid) == (1, [])
        assert list(archive.hot.list()) == []
        with pytest.raises(KeyMissing):
            archive.keyring.data_key(key_id)
        with pytest.raises(NotFound):
            archive.study(info.study_uid)
        assert archive.counters()["instances"] == 0
        with pytest.raises(NotFound):
            archive.delete_study(info.study_uid)
        # storing the study again starts afresh with a new key
        archive.store_file(ct_files[0])
        assert archive.study_key(info.study_uid) != key_id


def test_index_map_grows_on_its_own_under_concurrent_writers(tmp_path):
    index = Index(tmp_path / "index", map_size=64 << 10, create=True)
    start = index.map_size

    def writer(n):
        for i in range(200):
            index.write(lambda t, i=i: t.put("studies", f"{n}.{i}", {"pad": "x" * 1000}))

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(writer, range(4)))
    with index.read() as t:
        assert t.count("studies") == 800
        assert all(t.get("studies", f"{n}.{i}")["pad"] == "x" * 1000 for n in range(4) for i in range(200))
    assert index.map_size > start
    index.close()


def test_one_failing_writer_does_not_spoil_its_batch(tmp_path):
    index = Index(tmp_path / "index", create=True)

    def bad(t):
        t.put("studies", "bad", {"x": 1})
        raise ValueError("boom")

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(index.write, bad if i % 2 else
                               (lambda t, i=i: t.put("studies", f"good{i}", {"i": i}))) for i in range(40)]
        errors = [f.exception() for f in futures]
    assert sum(isinstance(e, ValueError) for e in errors) == 20
    with index.read() as t:
        assert t.get("studies", "bad") is None
        assert t.count("studies") == 20
    index.close()


def test_delete_shreds_before_it_forgets(config, ct_files):
    """A delete interrupted right after the keys were destroyed leaves nothing readable, and
    deleting again finishes the job."""

    with open_archive(config, writer=True) as archive:
        info = archive.store_file(ct_files[0]).info
        with archive.catalog.read() as view:
            key_ids = view.study_key_ids(info.study_uid)
        archive.keyring.destroy(key_ids)  # the state a crash after the shred leaves
        with pytest.raises(KeyMissing):
            b"".join(archive.open_instance(info.sop_uid))
        assert archive.delete_study(info.study_uid) == (1, [])
        assert list(archive.hot.list()) == [] and archive.counters()["instances"] == 0
