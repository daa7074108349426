"""A stateful model of the archive (hypothesis): whatever the sequence of stores, new versions,
re-sends, deletions, key rotations and index rebuilds, every stored version reads back exactly
and nothing deleted can be read again."""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
from pathlib import Path

import corpus
import pydicom
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from appliance import config as cfg
from appliance.admin import home as home_mod
from appliance.admin.home import open_archive
from appliance.errors import KeyMissing, NotFound
from appliance.jobs import fsck

_SOURCE = Path(tempfile.mkdtemp(prefix="pv-model-"))
atexit.register(shutil.rmtree, _SOURCE, True)
# Three studies of two small instances each: the material every run draws from.
STUDIES = [corpus.small_instances(_SOURCE / f"s{n}", 2, patient_id=f"M{n}", seed=n) for n in range(3)]


class ArchiveModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="pv-model-home-"))
        self.home = self.dir / "home"
        home_mod.init(self.home)
        self.config = cfg.load(self.home)
        self.archive = open_archive(self.config, writer=True)
        self.versions: dict[str, dict[bytes, bytes]] = {}  # sop -> {content address: bytes}
        self.current: dict[str, bytes] = {}  # sop -> content address
        self.study_of: dict[str, str] = {}
        self.deleted: dict[bytes, bytes] = {}  # content address -> key id it was sealed under
        self.edits = 0

    def teardown(self):
        self.archive.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _store(self, path: Path) -> None:
        data = path.read_bytes()
        ca = hashlib.sha256(data).digest()
        outcome = self.archive.store_file(path)
        sop = outcome.info.sop_uid
        known = self.versions.setdefault(sop, {})
        expected = "duplicate" if ca in known else ("new_version" if known else "stored")
        assert outcome.status == expected
        if ca not in known:
            known[ca] = data
            self.current[sop] = ca
        self.study_of[sop] = outcome.info.study_uid

    @rule(study=st.integers(0, 2), index=st.integers(0, 1))
    def store(self, study, index):
        self._store(STUDIES[study][index])

    @precondition(lambda self: self.versions)
    @rule(data=st.data())
    def store_new_version(self, data):
        sop = data.draw(st.sampled_from(sorted(self.versions)))
        path = next(p for s in STUDIES for p in s if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == sop)
        ds = pydicom.dcmread(path)
        self.edits += 1
        ds.SeriesDescription = f"edit {self.edits}"
        edited = self.dir / f"edit{self.edits}.dcm"
        ds.save_as(edited)
        self._store(edited)

    @precondition(lambda self: self.study_of)
    @rule(data=st.data())
    def delete_study(self, data):
        study = data.draw(st.sampled_from(sorted(set(self.study_of.values()))))
        with self.archive.catalog.read() as view:
            keys = {ca: view.blob(ca).key_id for sop, s in self.study_of.items() if s == study
                    for ca in self.versions[sop]}
        self.archive.delete_study(study)
        for sop in [sop for sop, s in self.study_of.items() if s == study]:
            del self.study_of[sop], self.current[sop], self.versions[sop]
        self.deleted.update(keys)

    @rule()
    def rotate_keys(self):
        self.archive.close()
        archive = open_archive(self.config, exclusive=True)
        archive.keyring.rotate()
        archive.close()
        self.archive = open_archive(self.config, writer=True)

    @rule()
    def rebuild_index(self):
        self.archive.close()
        fsck.rebuild(self.config)
        self.archive = open_archive(self.config, writer=True)

    @invariant()
    def every_version_reads_back_exactly(self):
        for sop, versions in self.versions.items():
            assert self.archive.instance(sop).current == self.current[sop]
            for ca, data in versions.items():
                assert b"".join(self.archive.open_blob(ca)) == data

    @invariant()
    def nothing_deleted_is_readable(self):
        for ca, key_id in self.deleted.items():
            if not any(ca in versions for versions in self.versions.values()):  # unless stored again
                with pytest.raises(NotFound):
                    b"".join(self.archive.open_blob(ca))
            with pytest.raises(KeyMissing):  # shredded for good, even if the study came back
                self.archive.keyring.data_key(key_id)

    @invariant()
    def counters_and_fsck_agree(self):
        counters = self.archive.counters()
        assert counters["instances"] == len(self.versions)
        assert counters["versions"] == sum(len(v) for v in self.versions.values())
        assert fsck.check(self.archive, repair=False).clean


ArchiveModel.TestCase.settings = settings(max_examples=20, stateful_step_count=12, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestArchiveModel = ArchiveModel.TestCase
