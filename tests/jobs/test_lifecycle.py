"""Tiers and policies end to end: real directories as tape cartridges, a real S3 server, the CLI
as a user runs it, `kill -9` in the middle of a migration."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    REPO,
    add_tier,
    load_cartridge,
    make_study,
    new_bucket,
    run_cli,
    s3_tier_yaml,
    set_config,
    write_s3_credentials,
)

from appliance import config as cfg
from appliance.admin.home import open_archive
from appliance.jobs import lifecycle
from appliance.jobs.lifecycle import Lifecycle
from appliance.jobs.policy import check_policies

TAPE = "kind: ltfs\ncartridges:\n  - {label: PV0001L9, path: cartridges/PV0001L9, capacity_mb: 1000}\n" \
       "  - {label: PV0002L9, path: cartridges/PV0002L9, capacity_mb: 1000}\nretries: 0\n"


def _policy(home: Path, to: str, *, after_days: int = 0, keep_hot: bool = False, years: int = 10,
            at_expiry: str = "review") -> None:
    (home / "policies" / "default.yaml").write_text(
        "classes:\n  - name: everything\n    match: {}\n"
        f"    retention: {{years_after_study: {years}}}\n"
        f"    transitions:\n      - {{after_days: {after_days}, to: [{to}], keep_hot: {str(keep_hot).lower()}}}\n"
        f"    at_expiry: {at_expiry}\n")


def _sha(paths) -> set[str]:
    return {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def _hot_files(home: Path) -> list[Path]:
    return [p for p in (home / "hot").rglob("*") if p.is_file() and ".incoming" not in p.parts]


@pytest.fixture
def tiered(home, s3_server):
    """A home with a two-cartridge tape tier and an S3 tier."""
    for label in ("PV0001L9", "PV0002L9"):
        load_cartridge(home / "cartridges" / label, label)
    add_tier(home, "tape", TAPE)
    write_s3_credentials(home)
    bucket = new_bucket(s3_server)
    add_tier(home, "s3", s3_tier_yaml(s3_server, bucket))
    set_config(home, "recall_wait_s: 300", "recall_wait_s: 0")
    return home, bucket


def test_migrate_to_tape_and_s3_then_recall_byte_exact(tiered, s3_server, tmp_path):
    home, bucket = tiered
    study_uid, files = make_study(tmp_path / "in", 4, patient_name="CANARY^PATIENT")
    run_cli("import", str(tmp_path / "in"), home=home)
    _policy(home, "tape, s3")
    plan = json.loads(run_cli("policy", "plan", "--json", home=home).stdout)
    assert [(a["study"], a["kind"], a["targets"], a["drop_hot"]) for a in plan["actions"]] == \
        [(study_uid, "migrate", ["tape", "s3"], True)]
    run_cli("policy", "apply", home=home)
    assert _hot_files(home) == []  # both cold copies verified, the hot copy went

    status = json.loads(run_cli("status", "--json", home=home).stdout)
    assert status["tiers"]["tape"]["packs"] == 1 and status["tiers"]["s3"]["packs"] == 1
    assert status["state"] == "ONLINE" and status["jobs"]["pending"] == 0
    # Nothing on a cold tier names the study, the patient or a plaintext hash.
    objects = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    tape_files = list((home / "cartridges").rglob("packs/*"))
    for name in objects + [str(p) for p in tape_files]:
        assert study_uid not in name and all(h not in name for h in _sha(files))
    for path in tape_files:
        assert b"CANARY" not in path.read_bytes() and study_uid.encode() not in path.read_bytes()
    # A second apply has nothing left to do.
    assert json.loads(run_cli("policy", "plan", "--json", home=home).stdout)["actions"] == []

    # Export recalls it (tape first), byte-exact, and caches it on the hot tier.
    run_cli("export", study_uid, str(tmp_path / "out1"), home=home)
    assert _sha((tmp_path / "out1").iterdir()) == _sha(files)
    assert len(_hot_files(home)) == 4

    # Evicted again (it has verified cold copies), then recalled with the tape unloaded: S3 serves.
    with open_archive(cfg.load(home), writer=True) as archive:
        from appliance.store import tiering

        assert tiering.drop_hot(archive, study_uid, ["tape", "s3"]) == 4
    os.rename(home / "cartridges" / "PV0001L9", home / "cartridges" / "unloaded")
    result = run_cli("recall", study_uid, home=home)
    assert "recalled 4 instances" in result.stdout
    run_cli("export", study_uid, str(tmp_path / "out2"), home=home)
    assert _sha((tmp_path / "out2").iterdir()) == _sha(files)


def test_a_cartridge_that_is_not_loaded_is_named(tiered, tmp_path):
    home, _ = tiered
    study_uid, files = make_study(tmp_path / "in", 2)
    run_cli("import", str(tmp_path / "in"), home=home)
    _policy(home, "tape")
    run_cli("policy", "apply", home=home)
    os.rename(home / "cartridges" / "PV0001L9", home / "cartridges" / "on-the-shelf")
    result = run_cli("recall", study_uid, home=home, check=False)
    assert result.returncode == 75 and "load cartridge PV0001L9" in result.stderr
    status = run_cli("status", home=home).stdout
    assert "DEGRADED" in status and "load cartridge PV0001L9" in status
    result = run_cli("export", study_uid, str(tmp_path / "out"), home=home, check=False)
    assert result.returncode != 0 and "PV0001L9" in result.stderr
    # Loaded again: the recall waits for nothing, the alarm clears.
    os.rename(home / "cartridges" / "on-the-shelf", home / "cartridges" / "PV0001L9")
    run_cli("export", study_uid, str(tmp_path / "out"), home=home)
    assert _sha((tmp_path / "out").iterdir()) == _sha(files)
    assert "ONLINE" in run_cli("status", home=home).stdout


def test_a_recall_waits_for_the_cartridge_to_be_loaded(tiered, tmp_path):
    home, _ = tiered
    set_config(home, "recall_wait_s: 0", "recall_wait_s: 60")
    study_uid, files = make_study(tmp_path / "in", 2)
    run_cli("import", str(tmp_path / "in"), home=home)
    _policy(home, "tape")
    run_cli("policy", "apply", home=home)
    os.rename(home / "cartridges" / "PV0001L9", home / "cartridges" / "on-the-shelf")
    recall = subprocess.Popen([sys.executable, "-m", "appliance", "--home", str(home), "recall", study_uid],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while "load cartridge PV0001L9" not in run_cli("status", home=home).stdout:  # the operator sees it
        assert time.monotonic() < deadline and recall.poll() is None
        time.sleep(0.2)
    os.rename(home / "cartridges" / "on-the-shelf", home / "cartridges" / "PV0001L9")
    out, err = recall.communicate(timeout=60)
    assert recall.returncode == 0, err
    assert "waits: load cartridge PV0001L9" in err and "recalled 2 instances" in out


def test_an_s3_tier_that_is_down_is_retried_with_backoff_and_nothing_leaves_hot(tiered, s3_server, tmp_path):
    home, bucket = tiered
    from s3server import free_ports

    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    text = (home / "tiers" / "s3.yaml").read_text()
    (home / "tiers" / "s3.yaml").write_text(text.replace(s3_server.endpoint, dead))
    study_uid, files = make_study(tmp_path / "in", 3)
    run_cli("import", str(tmp_path / "in"), home=home)
    _policy(home, "tape, s3")
    hot_before = sorted(p.name for p in _hot_files(home))

    clock = [time.time()]
    config = cfg.load(home)
    with open_archive(config, writer=True) as archive:
        engine = Lifecycle(archive, check_policies(config), clock=lambda: clock[0])
        report = engine.apply()
        assert len(report.failed) == 1 and "unreachable" in report.failed[0]["error"]
        job = lifecycle.jobs(archive)[study_uid]
        assert job["attempts"] == 1 and job["next_try"] == int(clock[0]) + 60
        assert engine.apply().waiting == 1  # not before its time
        clock[0] += 61
        assert len(engine.apply().failed) == 1
        job = lifecycle.jobs(archive)[study_uid]
        assert job["attempts"] == 2 and job["next_try"] == int(clock[0]) + 120  # doubled
    assert sorted(p.name for p in _hot_files(home)) == hot_before  # the source is untouched
    status = json.loads(run_cli("status", "--json", home=home).stdout)
    assert status["state"] == "DEGRADED" and [a["key"] for a in status["alarms"]] == ["tier:s3"]

    (home / "tiers" / "s3.yaml").write_text(text)  # the network is back
    clock[0] += 3600
    config = cfg.load(home)
    with open_archive(config, writer=True) as archive:
        report = Lifecycle(archive, check_policies(config), clock=lambda: clock[0]).apply()
        assert [d["study"] for d in report.done] == [study_uid] and not report.failed
    assert _hot_files(home) == []
    assert json.loads(run_cli("status", "--json", home=home).stdout)["alarms"] == []
    # One pack per tier: the attempts that failed left nothing behind.
    assert len(list((home / "cartridges").rglob("packs/*"))) == 1
    assert len(s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]) == 1
    run_cli("export", study_uid, str(tmp_path / "out"), home=home)
    assert _sha((tmp_path / "out").iterdir()) == _sha(files)


def test_kill_9_during_apply_then_apply_again_finishes_with_nothing_lost_or_doubled(tiered, tmp_path):
    home, _ = tiered
    # A slow tier (1 MB/s) so the kill lands mid-pack.
    (home / "tiers" / "tape.yaml").write_text((home / "tiers" / "tape.yaml").read_text() + "rate_limit_mbps: 1\n")
    studies = [make_study(tmp_path / f"in{n}", 3, pixels=512, patient_id=f"P{n}") for n in range(3)]
    run_cli("import", *[str(tmp_path / f"in{n}") for n in range(3)], home=home)
    _policy(home, "tape")
    apply = subprocess.Popen([sys.executable, "-m", "appliance", "--home", str(home), "policy", "apply"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list((home / "cartridges").rglob("packs/.*.tmp")) and not list((home / "cartridges").rglob("packs/*")):
        assert time.monotonic() < deadline and apply.poll() is None
        time.sleep(0.05)
    time.sleep(0.3)
    apply.send_signal(signal.SIGKILL)
    apply.wait()

    run_cli("policy", "apply", home=home)
    packs = [p for p in (home / "cartridges").rglob("packs/*") if not p.name.startswith(".")]
    assert not list((home / "cartridges").rglob("packs/.*.tmp"))
    assert len(packs) == 3  # one per study: the pack the kill interrupted was removed, not kept twice
    assert _hot_files(home) == []
    with open_archive(cfg.load(home)) as archive, archive.catalog.read() as view:
        recorded = {pack.id for pack in view.packs()}
        assert recorded == {p.name for p in packs}
        assert view.jobs() == []
    for number, (study_uid, files) in enumerate(studies):
        run_cli("export", study_uid, str(tmp_path / f"out{number}"), home=home)
        assert _sha((tmp_path / f"out{number}").iterdir()) == _sha(files)
    assert run_cli("fsck", home=home).returncode == 0


def test_expiry_shreds_every_copy_and_lists_what_it_could_not_reach(tiered, s3_server, tmp_path):
    home, bucket = tiered
    old_uid, old_files = make_study(tmp_path / "old", 2, study_date="20100101", patient_id="OLD")
    new_uid, new_files = make_study(tmp_path / "new", 2, study_date="20260101", patient_id="NEW")
    run_cli("import", str(tmp_path / "old"), str(tmp_path / "new"), home=home)
    with open_archive(cfg.load(home)) as archive:
        key_id = archive.study_key(old_uid)
    # Both go to the cold tiers first, keeping their hot copies, under a long retention.
    _policy(home, "tape, s3", years=100, keep_hot=True)
    run_cli("policy", "apply", home=home)
    assert len(s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]) == 2

    _policy(home, "tape, s3", years=5, at_expiry="delete", keep_hot=True)
    plan = json.loads(run_cli("policy", "plan", "--json", home=home).stdout)
    assert [(a["study"], a["kind"]) for a in plan["actions"]] == [(old_uid, "expire")]
    os.rename(home / "cartridges" / "PV0001L9", home / "cartridges" / "shelf")  # its tape is not loaded
    result = run_cli("policy", "apply", home=home)
    assert "1 jobs done" in result.stdout

    with open_archive(cfg.load(home)) as archive:
        assert not archive.keyring.has(key_id)  # crypto-shredded: every remaining copy is unreadable
        assert old_uid not in archive.study_uids() and new_uid in archive.study_uids()
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert len(keys) == 1  # the old study's S3 object is gone, the new one's stays
    deletions = json.loads(run_cli("policy", "deletions", "--json", home=home).stdout)
    record = deletions[old_uid]
    assert record["rule"].startswith("everything (default.yaml:") and record["by"]
    assert sorted(record["instances"]) == sorted(_sop_uids(old_files))
    assert [(u["tier"], u["where"]) for u in record["unremoved"]] == [("tape", "PV0001L9")]
    assert "copies of deleted studies remain" in run_cli("status", home=home).stdout

    os.rename(home / "cartridges" / "shelf", home / "cartridges" / "PV0001L9")
    result = run_cli("policy", "apply", home=home)
    assert "1 leftover copies of deleted studies removed" in result.stdout
    assert json.loads(run_cli("policy", "deletions", "--json", home=home).stdout)[old_uid]["unremoved"] == []
    assert len(list((home / "cartridges").rglob("packs/*"))) == 1
    assert "ONLINE" in run_cli("status", home=home).stdout
    run_cli("export", new_uid, str(tmp_path / "out"), home=home)
    assert _sha((tmp_path / "out").iterdir()) == _sha(new_files)


def _sop_uids(files) -> list[str]:
    import pydicom

    return [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]


def test_a_held_study_is_never_deleted(home, tmp_path):
    uid_a, _ = make_study(tmp_path / "a", 1, study_date="20000101", patient_id="LAWSUIT")
    uid_b, _ = make_study(tmp_path / "b", 1, study_date="20000101", patient_id="OTHER")
    uid_c, files_c = make_study(tmp_path / "c", 1, study_date="20000101", patient_id="OTHER")
    run_cli("import", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"), home=home)
    _policy(home, "cold", years=5, at_expiry="delete", keep_hot=True, after_days=10000)
    result = run_cli("hold", "set", "--patient", "LAWSUIT", home=home, check=False)
    assert result.returncode != 0 and "needs a reason" in result.stderr
    run_cli("hold", "set", "--patient", "LAWSUIT", "--reason", "litigation 2026-117", home=home)
    run_cli("hold", "set", uid_c, "--reason", "audit request", home=home)
    assert "litigation 2026-117" in run_cli("hold", "list", home=home).stdout
    plan = {a["study"]: a["kind"] for a in json.loads(run_cli("policy", "plan", "--json", home=home).stdout)["actions"]}
    assert plan == {uid_a: "held", uid_b: "expire", uid_c: "held"}
    run_cli("policy", "apply", home=home)
    with open_archive(cfg.load(home)) as archive:
        assert set(archive.study_uids()) == {uid_a, uid_c}
    run_cli("export", uid_c, str(tmp_path / "out"), home=home)
    assert _sha((tmp_path / "out").iterdir()) == _sha(files_c)
    assert json.loads(run_cli("status", "--json", home=home).stdout)["holds"] == 2
    run_cli("hold", "release", uid_c, "--reason", "audit closed", home=home)
    run_cli("policy", "apply", home=home)
    with open_archive(cfg.load(home)) as archive:
        assert archive.study_uids() == [uid_a]
    result = run_cli("hold", "release", uid_c, "--reason", "again", home=home, check=False)
    assert result.returncode == 66 and "no hold" in result.stderr


def test_the_index_is_rebuilt_from_packs_alone(tiered, tmp_path):
    home, _ = tiered
    cold_uid, cold_files = make_study(tmp_path / "a", 3, patient_id="A")
    run_cli("import", str(tmp_path / "a"), home=home)
    _policy(home, "tape, s3")
    run_cli("policy", "apply", home=home)  # study A lives only in packs now
    hot_uid, hot_files = make_study(tmp_path / "b", 2, patient_id="B")
    run_cli("import", str(tmp_path / "b"), home=home)
    before = json.loads(run_cli("status", "--json", home=home).stdout)

    result = run_cli("fsck", "--rebuild-index", home=home)
    assert "5 versions indexed" in result.stdout and "2 packs on cold tiers" in result.stdout
    after = json.loads(run_cli("status", "--json", home=home).stdout)
    for key in ("patients", "studies", "instances", "versions", "received_bytes", "stored_bytes"):
        assert after[key] == before[key], key
    assert after["tiers"]["tape"]["packs"] == 1 and after["tiers"]["s3"]["packs"] == 1
    assert run_cli("fsck", home=home).returncode == 0
    assert json.loads(run_cli("policy", "plan", "--json", home=home).stdout)["actions"] == [
        {"kind": "migrate", "study": hot_uid, "rule": "everything (default.yaml:2)", "targets": ["tape", "s3"],
         "drop_hot": True, "reason": "0 days without access, 0 days stored: copy to tape, s3, then drop the hot copy"}]
    for uid, files, out in ((cold_uid, cold_files, "out-a"), (hot_uid, hot_files, "out-b")):
        run_cli("export", uid, str(tmp_path / out), home=home)
        assert _sha((tmp_path / out).iterdir()) == _sha(files)


def test_large_studies_are_split_into_packs_of_the_configured_size(tiered, tmp_path):
    home, _ = tiered
    (home / "tiers" / "tape.yaml").write_text((home / "tiers" / "tape.yaml").read_text() + "pack_size_mb: 1\n")
    study_uid, files = make_study(tmp_path / "in", 6, pixels=512)  # ~0.5 MB sealed each
    run_cli("import", str(tmp_path / "in"), home=home)
    _policy(home, "tape")
    run_cli("policy", "apply", home=home)
    packs = [p for p in (home / "cartridges").rglob("packs/*")]
    assert len(packs) >= 3 and all(p.stat().st_size <= 2 << 20 for p in packs)
    run_cli("export", study_uid, str(tmp_path / "out"), home=home)
    assert _sha((tmp_path / "out").iterdir()) == _sha(files)


def test_a_migration_to_a_cartridge_that_is_out_waits_and_says_so(tiered, tmp_path):
    home, _ = tiered
    for label in ("PV0001L9", "PV0002L9"):
        os.rename(home / "cartridges" / label, home / "cartridges" / f"shelf-{label}")
    study_uid, files = make_study(tmp_path / "in", 2)
    run_cli("import", str(tmp_path / "in"), home=home)
    _policy(home, "tape")
    result = run_cli("policy", "apply", home=home, check=False)
    assert result.returncode == 1 and "load PV0001L9" in result.stdout
    assert len(_hot_files(home)) == 2  # nothing left the hot tier
    status = json.loads(run_cli("status", "--json", home=home).stdout)
    assert [a["key"] for a in status["alarms"]] == ["tier:tape"] and status["jobs"]["failing"] == 1
    assert "load PV0001L9" in run_cli("policy", "jobs", home=home).stdout


def test_the_hot_watermark_moves_the_least_recently_used_first(home, tmp_path):
    studies = [make_study(tmp_path / f"s{n}", 3, pixels=512, patient_id=f"P{n}") for n in range(4)]
    for number in range(4):  # stored one after the other: s0 is the oldest
        run_cli("import", str(tmp_path / f"s{number}"), home=home)
    time.sleep(1.1)  # access times are kept in whole seconds
    run_cli("export", studies[0][0], str(tmp_path / "touched"), home=home)  # now the most recently used
    with open_archive(cfg.load(home)) as archive:
        total = sum(archive.study(uid).stored_bytes for uid, _ in studies)
    # Transitions only after a year, so nothing is due: the watermark alone acts. Each study is
    # about a fifth of the capacity: usage ~85% > 50%; down to 30% takes three studies.
    _policy(home, "cold", after_days=365)
    capacity_mb = -(-total * 100 // 85 // 10**6)
    hot_yaml = home / "tiers" / "hot-raid.yaml"
    hot_yaml.write_text(hot_yaml.read_text().replace("high_watermark_percent: 85", "high_watermark_percent: 50")
                        .replace("low_watermark_percent: 70", "low_watermark_percent: 30")
                        + f"capacity_mb: {capacity_mb}\n")
    plan = json.loads(run_cli("policy", "plan", "--json", home=home).stdout)["actions"]
    # The three least recently used, never the one just read (stores within one second tie).
    assert sorted(a["study"] for a in plan) == sorted(uid for uid, _ in studies[1:])
    assert all("high watermark 50%" in a["reason"] and a["drop_hot"] for a in plan)
    run_cli("policy", "apply", home=home)
    with open_archive(cfg.load(home)) as archive:
        assert [uid for uid, _ in studies if not archive.needs_recall(uid)] == [studies[0][0]]
    assert json.loads(run_cli("policy", "plan", "--json", home=home).stdout)["actions"] == []
