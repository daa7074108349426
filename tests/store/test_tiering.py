"""Cold copies (store/tiering.py) on the default home's filesystem cold tier: a pack counts only
once read back, a hot copy goes only when a cold one is there, a recall brings every version
back verified, and a pack no catalog record names is the remains of a killed write."""

from __future__ import annotations

import pytest

from appliance import backends
from appliance.admin.home import open_archive
from appliance.backends.filesystem import FilesystemBackend
from appliance.errors import ApplianceError, IntegrityError
from appliance.store import tiering


@pytest.fixture
def archive(config, ct_files):
    with open_archive(config, writer=True) as archive:
        for path in ct_files[:3]:
            archive.store_file(path)
        yield archive


def _study(archive) -> str:
    [study] = archive.study_uids()
    return study


def test_a_pack_is_written_read_back_and_recorded_once(archive):
    study = _study(archive)
    pending = []
    written = tiering.pack_study(archive, study, "cold", remember_pending=pending.append)
    assert written > 0 and pending[-1] is None and len(pending) == 2  # noted before the write, cleared after
    with archive.catalog.read() as view:
        [pack] = list(view.packs())
        assert pack.tier == "cold" and len(pack.blobs) == 3
        assert all(blob.in_pack("cold", pack.id) for blob in view.study_blobs(study))
    assert tiering.pack_study(archive, study, "cold", remember_pending=pending.append) == 0  # nothing left to do


def test_a_pack_that_does_not_read_back_as_written_is_refused(archive):
    study = _study(archive)
    tiering.pack_study(archive, study, "cold", remember_pending=lambda pack_id: None)
    with archive.catalog.read() as view:
        [pack] = list(view.packs())
    path = backends.unwrap(archive.tier("cold"), FilesystemBackend).path(pack.id)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):  # the footer says so, or the size and hash recorded do
        tiering.verify_pack(archive, "cold", pack.id, pack.size, pack.xxh3)


def test_hot_copies_go_only_with_a_cold_copy_and_come_back_verified(archive, ct_files):
    study = _study(archive)
    with pytest.raises(ApplianceError, match="no verified copy"):
        tiering.drop_hot(archive, study, ["cold"])
    tiering.pack_study(archive, study, "cold", remember_pending=lambda pack_id: None)
    assert tiering.drop_hot(archive, study, ["cold"]) == 3 and list(archive.hot.list()) == []
    assert archive.needs_recall(study)
    assert tiering.recall(archive, study) == 3
    originals = sorted(path.read_bytes() for path in ct_files[:3])
    assert sorted(b"".join(archive.open_instance(i.sop_uid)) for i in archive.instances_of_study(study)) == originals
    assert not archive.needs_recall(study)


def test_a_pack_no_record_names_is_removed_and_a_recorded_one_kept(archive):
    study = _study(archive)
    tiering.pack_study(archive, study, "cold", remember_pending=lambda pack_id: None)
    with archive.catalog.read() as view:
        [pack] = list(view.packs())
    cold = archive.tier("cold")
    with open(archive.hot.path(next(iter(archive.hot.list()))), "rb") as fp:
        cold.put("0" * 32, fp)  # what a write killed before its record leaves
    tiering.discard_if_unrecorded(archive, "cold", "0" * 32)
    tiering.discard_if_unrecorded(archive, "cold", pack.id)
    assert set(cold.list()) == {pack.id}
