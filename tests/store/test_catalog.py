"""The catalog's named mutations, one by one, on a real index (LMDB in a temporary directory):
what each records, what it refuses, and what repeating it does."""

from __future__ import annotations

import os

import pytest

from appliance.errors import ApplianceError, NotFound
from appliance.format.p10 import InstanceInfo
from appliance.store.catalog import Catalog, Hold, Job, Pack, Replica
from appliance.store.catalog.records import HotCopy, PackCopy
from appliance.store.index import Index

HOT, COLD = "hot", "cold"


@pytest.fixture
def catalog(tmp_path):
    index = Index(tmp_path / "index", create=True)
    yield Catalog(index)
    index.close()


def _info(sop: str, study: str = "1.2.3", series: str = "1.2.3.1", data: bytes | None = None) -> InstanceInfo:
    info = InstanceInfo(os.urandom(32) if data is None else data, 1000, "1.2.840.10008.1.2.1", True)
    info.patient.update(PatientID="P1", PatientName="DOE^JANE")
    info.study.update(StudyInstanceUID=study, StudyDate="20260101")
    info.series.update(SeriesInstanceUID=series, Modality="CT")
    info.instance.update(SOPInstanceUID=sop, SOPClassUID="1.2.840.10008.5.1.4.1.1.2")
    return info


def _blob(name: str | None = None) -> dict:
    return {"name": name or os.urandom(16).hex(), "sealed_size": 400, "xxh3": os.urandom(16),
            "key_id": b"k" * 16, "compression": 1}


def _store(catalog: Catalog, *stores, journal: bytes = b"j" * 16, keep_previous: bool = True) -> list[str]:
    numbered = [(number, info, blob, "TESTSCU") for number, (info, blob) in enumerate(stores, 1)]
    return catalog.record_stores(journal, len(numbered), numbered, HOT, keep_previous=keep_previous,
                                 readable=lambda key_id: True)


def test_a_stored_instance_is_in_every_record_with_its_hot_copy(catalog):
    info, blob = _info("1.1"), _blob()
    assert _store(catalog, (info, blob)) == []
    with catalog.read() as view:
        stored = view.blob(info.content_address)
        assert stored.sop == "1.1" and stored.copies == {HOT: HotCopy(blob["name"], stored.copies[HOT].verified)}
        instance = view.instance("1.1")
        assert instance.current == info.content_address and instance.versions == (info.content_address,)
        study = view.study("1.2.3")
        assert (study.series, study.instances, study.modalities, study.source_aes) == (1, 1, ("CT",), ("TESTSCU",))
        assert view.patient(study.patient).attributes["PatientName"] == "DOE^JANE"
        assert view.counters()["instances"] == 1 and view.count("studies") == 1


def test_records_at_or_below_the_journal_position_are_not_applied_twice(catalog):
    first, second = (_info("1.1"), _blob()), (_info("1.2"), _blob())
    _store(catalog, first)
    # a replay after a crash hands the same record again, with the next one
    catalog.record_stores(b"j" * 16, 2, [(1, *first, "TESTSCU"), (2, *second, "TESTSCU")], HOT,
                          keep_previous=True, readable=lambda key_id: True)
    with catalog.read() as view:
        assert view.counters()["instances"] == 2 and view.journal_position(b"j" * 16) == 2
    catalog.forget_journal(b"j" * 16)
    with catalog.read() as view:
        assert view.journal_position(b"j" * 16) == 0


def test_the_same_bytes_under_another_name_are_surplus(catalog):
    data = os.urandom(32)
    _store(catalog, (_info("1.1", data=data), _blob("first")))
    assert _store(catalog, (_info("1.1", data=data), _blob("second")), journal=b"k" * 16) == ["second"]


def test_a_new_version_replaces_the_old_one_unless_versions_are_kept(catalog):
    _store(catalog, (_info("1.1"), _blob("old")))
    assert _store(catalog, (_info("1.1"), _blob("new")), journal=b"k" * 16, keep_previous=False) == ["old"]
    with catalog.read() as view:
        assert len(view.instance("1.1").versions) == 1 and view.counters()["versions"] == 1


def test_a_version_whose_key_is_gone_is_not_indexed(catalog):
    blob = _blob()
    assert catalog.record_stores(b"j" * 16, 1, [(1, _info("1.1"), blob, "TESTSCU")], HOT, keep_previous=True,
                                 readable=lambda key_id: False) == [blob["name"]]
    with catalog.read() as view:
        assert view.counters()["instances"] == 0


def test_a_damaged_version_stored_again_is_healed(catalog):
    info = _info("1.1")
    _store(catalog, (info, _blob("bad")))
    catalog.mark_damaged(info.content_address, "hot: bit rot", 100)
    with catalog.read() as view:
        assert view.blob(info.content_address).damaged.reason == "hot: bit rot"
    assert _store(catalog, (info, _blob("good")), journal=b"k" * 16) == ["bad"]
    with catalog.read() as view:
        healed = view.blob(info.content_address)
        assert healed.damaged is None and healed.hot(HOT).name == "good"


def _packed(catalog: Catalog, info: InstanceInfo) -> Pack:
    pack = Pack("p1", COLD, "1.2.3", 500, b"x" * 16, "", 10, 10, 0, (info.content_address,))

    class Entry:
        ca, offset, length = info.content_address, 0, 400
    catalog.add_pack(pack, [Entry])
    catalog.add_pack(pack, [Entry])  # repeated: the same
    return pack


def test_a_pack_records_its_cold_copies_and_the_hot_copy_may_then_go(catalog):
    info = _info("1.1")
    _store(catalog, (info, _blob("h1")))
    with pytest.raises(ApplianceError, match="no verified copy"):
        catalog.drop_hot_copies("1.2.3", HOT, [])  # no cold copy yet: refused, nothing changed
    _packed(catalog, info)
    with catalog.read() as view:
        assert view.blob(info.content_address).copies[COLD] == PackCopy("p1", 0, 400, 10)
        assert view.study("1.2.3").packs == {COLD: ("p1",)}
    with pytest.raises(ApplianceError):
        catalog.drop_hot_copies("1.2.3", HOT, ["s3"])  # no copy on the tier asked for
    assert catalog.drop_hot_copies("1.2.3", HOT, [COLD]) == ["h1"]
    with catalog.read() as view:
        assert view.blob(info.content_address).hot(HOT) is None


def test_recalled_copies_are_recorded_once(catalog):
    info = _info("1.1")
    _store(catalog, (info, _blob("h1")))
    _packed(catalog, info)
    catalog.drop_hot_copies("1.2.3", HOT, [COLD])
    assert catalog.record_recalled("1.2.3", HOT, {info.content_address: "r1"}, 50) == []
    assert catalog.record_recalled("1.2.3", HOT, {info.content_address: "r2"}, 51) == ["r2"]  # another process won
    with catalog.read() as view:
        assert view.blob(info.content_address).hot(HOT).name == "r1" and view.study("1.2.3").recalled == 51


def test_bad_copies_in_a_pack_are_forgotten_and_an_empty_pack_can_go(catalog):
    info = _info("1.1")
    _store(catalog, (info, _blob()))
    _packed(catalog, info)
    pack = catalog.forget_pack_copies("p1", COLD, [info.content_address])
    assert pack.blobs == ()
    with catalog.read() as view:
        assert COLD not in view.blob(info.content_address).copies
    assert catalog.forget_pack("p1").id == "p1"
    assert catalog.forget_pack("p1") is None
    with catalog.read() as view:
        assert view.pack("p1") is None and view.study("1.2.3").packs.get(COLD, ()) == ()


def test_verification_marks_skip_a_copy_that_moved_and_clear_damage(catalog):
    info = _info("1.1")
    _store(catalog, (info, _blob("h1")))
    catalog.mark_damaged(info.content_address, "scare", 1)
    catalog.mark_verified([(HOT, "blob", "elsewhere", [info.content_address], 99.0)], deep=True)
    with catalog.read() as view:
        assert view.blob(info.content_address).damaged is not None  # that mark was about another object
    catalog.mark_verified([(HOT, "blob", "h1", [info.content_address], 99.0)], deep=True)
    with catalog.read() as view:
        blob = view.blob(info.content_address)
        assert blob.damaged is None and (blob.hot(HOT).verified, blob.hot(HOT).deep) == (99.0, 99.0)


def test_a_hot_copy_is_replaced_by_a_verified_one(catalog):
    info = _info("1.1")
    _store(catalog, (info, _blob("h1")))
    catalog.replace_hot_copy(info.content_address, HOT, "h2", 7, deep=False)
    with catalog.read() as view:
        assert view.blob(info.content_address).hot(HOT) == HotCopy("h2", 7)
    with pytest.raises(NotFound):
        catalog.replace_hot_copy(os.urandom(32), HOT, "h3", 8, deep=False)


def test_removing_a_study_returns_every_copy_to_delete(catalog):
    info = _info("1.1")
    _store(catalog, (info, _blob("h1")))
    _packed(catalog, info)
    copies, packs = catalog.remove_study("1.2.3")
    assert {tier: copy.where for tier, copy in copies[info.content_address].items()} == {HOT: "h1", COLD: "p1"}
    assert list(packs) == ["p1"]
    with catalog.read() as view:
        assert view.study("1.2.3") is None and view.blob(info.content_address) is None
        assert view.counters() == {"instances": 0, "versions": 0, "received_bytes": 0, "stored_bytes": 0}


def test_jobs_queue_once_and_count_their_attempts(catalog):
    job = Job("1.2.3", "migrate", (COLD,), True, "ct (default.yaml)", "older than 90 days", 5)
    catalog.enqueue_jobs([job])
    catalog.enqueue_jobs([Job("1.2.3", "expire", (), False, "other", "", 6)])  # the study has one already
    catalog.note_pending_pack("1.2.3", COLD, "p9")
    assert catalog.postpone_job("1.2.3", 100, "tier down").attempts == 1
    with catalog.read() as view:
        queued = view.job("1.2.3")
        assert (queued.kind, queued.attempts, queued.next_try, queued.error) == ("migrate", 1, 100, "tier down")
        assert queued.pending == {COLD: "p9"}
    catalog.finish_job("1.2.3")
    catalog.finish_job("1.2.3")  # repeated: nothing more
    assert catalog.postpone_job("1.2.3", 200, "x") is None
    with catalog.read() as view:
        assert view.jobs() == []


def test_holds_are_set_and_released_once(catalog):
    catalog.set_hold(Hold("study:1.2.3", "litigation", "alice", 10))
    with catalog.read() as view:
        assert view.hold("study:1.2.3").by == "alice"
    assert catalog.release_hold("study:1.2.3").reason == "litigation"
    with pytest.raises(NotFound):
        catalog.release_hold("study:1.2.3")


def test_an_alarm_keeps_when_it_was_first_raised(catalog):
    catalog.raise_alarm("tier:s3", "down", "check it")
    with catalog.read() as view:
        [first] = view.alarms()
    catalog.raise_alarm("tier:s3", "still down", "check it")
    with catalog.read() as view:
        [again] = view.alarms()
    assert again.message == "still down" and again.since == first.since
    catalog.clear_alarm("tier:s3")
    catalog.clear_alarm("tier:s3")
    with catalog.read() as view:
        assert view.alarms() == []


def test_a_scrub_run_is_kept_until_it_finishes(catalog):
    catalog.begin_scrub_run({"id": 1, "deep": False, "started": 5.0, "tiers": [HOT]})
    catalog.note_scrub_pending(COLD, "p7")
    with catalog.read() as view:
        assert view.scrub_run()["pending"] == [COLD, "p7"]
    catalog.finish_scrub_run(1, {"line": "scrub repaired 0 copies"}, 5.0, [(HOT, "fast")])
    with catalog.read() as view:
        assert view.scrub_run() is None and view.scrub_done(HOT, "fast") == 5.0 and view.scrub_done(HOT, "deep") is None
        assert view.scrub_runs() == [{"line": "scrub repaired 0 copies"}]


def test_replicas_are_recorded_and_forgotten(catalog):
    catalog.record_replicas([Replica("objects/ab/cd/abcd", 10, b"x" * 16, 1.0, 3, "/offsite")])
    catalog.record_replication_run(3, {"target": "/offsite"})
    with catalog.read() as view:
        assert [r.path for r in view.replicas()] == ["objects/ab/cd/abcd"]
        assert view.replication_runs() == [{"target": "/offsite"}]
    catalog.forget_replicas(["objects/ab/cd/abcd", "objects/never/sent"])
    with catalog.read() as view:
        assert view.replicas() == []


def test_a_restored_catalog_points_at_what_came_back(catalog):
    kept, lost = _info("1.1"), _info("1.2")
    _store(catalog, (kept, _blob("h1")), (lost, _blob("h2")))
    catalog.raise_alarm("tier:s3", "down", "x")
    objects, problems = catalog.adopt_restored(HOT, {"h1"}, COLD, set())
    assert objects == 1 and len(problems) == 1 and "1.2" in problems[0]
    with catalog.read() as view:
        assert view.blob(kept.content_address).hot(HOT).name == "h1"
        assert view.blob(lost.content_address).copies == {} and view.alarms() == []
