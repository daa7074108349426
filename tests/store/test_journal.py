"""The ingest journal: what a crash leaves is replayed, exactly once, by the next process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, run_cli

from appliance import config as cfg
from appliance.admin.home import open_archive
from appliance.audit.trail import AuditTrail
from appliance.format import journal as journal_format
from appliance.store import journal as jr

# Stores each file with a C-STORE-like audit record, says so once it is durable, and dies
# (kill -9) right after the last one: acknowledged, very likely not yet applied.
_STORE_THEN_DIE = textwrap.dedent("""
    import os, signal, sys, time
    from appliance import config as cfg
    from appliance.audit.events import EventID, event
    from appliance.admin.home import open_archive
    from appliance.store import journal as jr
    jr.CHECKPOINT_INTERVAL_S = 3600  # no checkpoint: the journal holds everything at the kill
    archive = open_archive(cfg.load(sys.argv[1]), writer=True)
    if sys.argv[2] == "slow-apply":
        original = archive.apply
        archive.apply = lambda records, replaying: (time.sleep(3600), original(records, replaying))
    for path in sys.argv[3:]:
        ingest = archive.begin_store("TESTSCU")
        with open(path, "rb") as fp:
            ingest.write(fp.read())
        stored = ingest.finish(lambda info, status: event(
            EventID.INSTANCES_TRANSFERRED, op="c-store", action="C", study=info.study_uid, instances=1,
            sop=info.sop_uid, user="TESTSCU", host="127.0.0.1"))
        print(stored.info.sop_uid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _crash_after_storing(home, files, mode="plain") -> list[str]:
    result = subprocess.run([sys.executable, "-c", _STORE_THEN_DIE, str(home), mode, *map(str, files)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    return result.stdout.split()


def _c_store_records(home) -> list[str]:
    config = cfg.load(home)
    return [r["detail"]["sop"] for r in AuditTrail(config.audit_dir, config.audit_key_file).records()
            if r["op"] == "c-store"]


@pytest.mark.parametrize("mode", ["plain", "slow-apply"])
def test_acknowledged_stores_of_a_killed_process_are_replayed_once(home, ct_files, tmp_path, mode):
    """Killed with its journal full: the next writer replays it; every acknowledged instance
    exports byte-exact, each has one audit record, fsck is clean, the journal is gone."""
    acknowledged = _crash_after_storing(home, ct_files[:6], mode)
    assert len(acknowledged) == 6
    journal_files = list((home / "journal").glob("*.wal"))
    assert journal_files  # what the kill left
    with open_archive(cfg.load(home), writer=True):
        pass  # opening replays
    assert not list((home / "journal").glob("*.wal"))
    assert run_cli("fsck", home=home).returncode == 0
    assert sorted(_c_store_records(home)) == sorted(acknowledged)
    out = tmp_path / "out"
    study = json.loads(run_cli("status", "--json", home=home).stdout)
    assert study["instances"] == 6
    import pydicom
    run_cli("export", pydicom.dcmread(ct_files[0]).StudyInstanceUID, str(out), home=home)
    assert sorted(p.read_bytes() for p in out.glob("*.dcm")) == sorted(p.read_bytes() for p in ct_files[:6])
    assert run_cli("audit", "verify", home=home).returncode == 0


def test_replaying_a_journal_again_changes_nothing(home, ct_files, tmp_path):
    """A replay cut short and run again (the same journal files, applied twice) stores each
    instance once and keeps its bytes."""
    _crash_after_storing(home, ct_files[:4], "slow-apply")
    copies = tmp_path / "journal-copy"
    shutil.copytree(home / "journal", copies)
    with open_archive(cfg.load(home), writer=True):
        pass
    first = json.loads(run_cli("status", "--json", home=home).stdout)
    for path in copies.glob("*.wal"):
        shutil.copy(path, home / "journal" / path.name)
    with open_archive(cfg.load(home), writer=True):
        pass
    again = json.loads(run_cli("status", "--json", home=home).stdout)
    assert (again["instances"], again["versions"]) == (first["instances"], first["versions"]) == (4, 4)
    assert run_cli("fsck", home=home).returncode == 0
    assert len(_c_store_records(home)) == 4  # each audit record once


def test_a_record_cut_short_ends_the_journal(home, ct_files):
    """A batch the kill interrupted mid-write was never acknowledged: replay takes what
    precedes it, and nothing of it or after it."""
    acknowledged = _crash_after_storing(home, ct_files[:5], "slow-apply")
    [path] = list((home / "journal").glob("*.wal"))
    data = bytearray(path.read_bytes())
    # the fourth record's body, one byte changed: it does not authenticate
    offset = journal_format.FILE_HEADER.size
    for _ in range(3):
        _, length, _ = journal_format.RECORD_HEADER.unpack_from(data, offset)
        offset += journal_format.RECORD_HEADER.size + length
    data[offset + journal_format.RECORD_HEADER.size + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    with open_archive(cfg.load(home), writer=True):
        pass
    assert json.loads(run_cli("status", "--json", home=home).stdout)["instances"] == 3
    assert sorted(_c_store_records(home)) == sorted(acknowledged[:3])
    assert run_cli("fsck", home=home).returncode == 0


def test_the_journal_holds_no_patient_data_in_the_clear(home, tmp_path):
    import corpus
    files = corpus.ct_study(tmp_path / "ct", 2, patient_name="JOURNAL^CANARY", patient_id="JRNLCANARY")
    _crash_after_storing(home, files, "slow-apply")
    data = b"".join(p.read_bytes() for p in (home / "journal").glob("*.wal"))
    assert data and b"JOURNAL^CANARY" not in data and b"JRNLCANARY" not in data
    assert os.stat(next((home / "journal").glob("*.wal"))).st_mode & 0o077 == 0


class _ListApplier:
    def __init__(self):
        self.applied: list[int] = []

    def publish(self, staged):
        pass

    def apply(self, records, replaying):
        self.applied += [r.number for r in records]

    def checkpoint(self):
        pass

    def forget(self, journal_id):
        pass


def test_no_room_for_another_journal_file_refuses_every_waiting_store(tmp_path, monkeypatch):
    """The current file full and no room for a new one: each store waiting in the batch is
    refused (out of space), none waits forever, the journal still closes."""
    import threading

    from appliance.errors import OutOfSpace
    free = {"bytes": 40 << 20}
    monkeypatch.setattr(jr, "free_bytes", lambda directory: free["bytes"])
    applier = _ListApplier()
    journal = jr.Journal(tmp_path / "journal", b"k" * 16, lambda journal_id: b"j" * 32, applier)
    free["bytes"] = 1 << 20  # from now on a new file would leave nothing for the hot tier
    outcomes: list = []

    def store():
        try:
            outcomes.append(journal.commit({"op": "audit", "pad": os.urandom(900 << 10)}))
        except OutOfSpace as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=store, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a store waits forever"
    refused = [o for o in outcomes if isinstance(o, OutOfSpace)]
    assert len(outcomes) == 8 and refused and all("out of space" in str(o) for o in refused)
    journal.close()
    assert sorted(applier.applied) == sorted(o.number for o in outcomes if not isinstance(o, OutOfSpace))


def test_records_that_cannot_be_applied_stay_in_the_journal_for_the_next_start(home, ct_files, tmp_path):
    """The hot tier refuses every write (a full disk): the stores were acknowledged, so closing
    keeps the journal rather than waiting forever, and the next writer replays them."""
    import errno

    import pydicom
    archive = open_archive(cfg.load(home), writer=True)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    archive.hot.write_unsynced = full
    for path in ct_files[:3]:  # as a C-STORE does: inline in the journal record
        ingest = archive.begin_store("TESTSCU")
        ingest.write(path.read_bytes())
        ingest.finish()
    archive.close()
    assert list((home / "journal").glob("*.wal"))
    with open_archive(cfg.load(home), writer=True):
        pass  # opening replays
    assert not list((home / "journal").glob("*.wal"))
    out = tmp_path / "out"
    run_cli("export", pydicom.dcmread(ct_files[0]).StudyInstanceUID, str(out), home=home)
    assert sorted(p.read_bytes() for p in out.glob("*.dcm")) == sorted(p.read_bytes() for p in ct_files[:3])
    assert run_cli("fsck", home=home).returncode == 0


# Stores each file, says so once it is acknowledged, and keeps its archive open until stdin
# closes; its applier is slow (each batch waits 1.5 s), as on a loaded machine.
_STORE_AND_STAY = textwrap.dedent("""
    import sys, time
    from appliance import config as cfg
    from appliance.admin.home import open_archive
    archive = open_archive(cfg.load(sys.argv[1]), writer=True)
    original = archive.apply
    archive.apply = lambda records, replaying: (time.sleep(1.5), original(records, replaying))
    for path in sys.argv[2:]:
        print(archive.store_file(path).info.sop_uid, flush=True)
    sys.stdin.read()
    archive.close()
""")


def test_another_process_reads_what_a_live_writer_acknowledged(home, ct_files):
    """The moment a store is acknowledged, another process (`status`, `export`) finds it,
    even though the writer has not applied it to the index yet."""
    writer = subprocess.Popen([sys.executable, "-c", _STORE_AND_STAY, str(home), *map(str, ct_files[:3])],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        acknowledged = [writer.stdout.readline().strip() for _ in range(3)]
        assert all(acknowledged)
        status = json.loads(run_cli("status", "--json", home=home).stdout)
        assert status["instances"] == 3
    finally:
        writer.stdin.close()
        writer.wait(timeout=60)
    assert writer.returncode == 0
    assert not list((home / "journal").iterdir())  # files and state gone with the writer
