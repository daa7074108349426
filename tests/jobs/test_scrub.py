"""Scrub: every kind of bad copy on the hot tier, a tape cartridge and S3 is found, mended from a
good copy, or reported and never served; a killed scrub resumes without re-checking or missing
anything; the rate limit holds with an injected clock."""

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
from conftest import REPO, add_tier, load_cartridge, make_study, new_bucket, run_cli, s3_tier_yaml, write_s3_credentials
from support.dicom_server import CLIENT_AE, Server, dcmtk, free_port, register

from appliance import config as cfg
from appliance.admin.home import open_archive
from appliance.backends.wrappers import TokenBucket
from appliance.jobs import scrub
from appliance.store import index as ix

TAPE = "kind: ltfs\ncartridges:\n  - {label: PV0001L9, path: cartridges/PV0001L9, capacity_mb: 1000}\nretries: 0\n"


def _policy(home: Path, to: str, keep_hot: bool = True) -> None:
    (home / "policies" / "default.yaml").write_text(
        "classes:\n  - name: all\n    retention: {keep_forever: true}\n"
        f"    transitions:\n      - {{after_days: 0, to: [{to}], keep_hot: {str(keep_hot).lower()}}}\n")


def _sha(paths) -> set[str]:
    return {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def _hot_files(home: Path) -> list[Path]:
    return sorted(p for p in (home / "hot").rglob("*") if p.is_file() and ".incoming" not in p.parts)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x10
    path.write_bytes(bytes(data))


def _scrub(home: Path, *args: str, check: bool = True) -> dict:
    result = run_cli("scrub", "--json", *args, home=home, check=False)
    assert result.returncode in ((0,) if check else (0, 1)), result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def two_copies(home, tmp_path, s3_server):
    """Two studies, each on hot, a tape cartridge and S3."""
    load_cartridge(home / "cartridges" / "PV0001L9", "PV0001L9")
    add_tier(home, "tape", TAPE)
    write_s3_credentials(home)
    bucket = new_bucket(s3_server)
    add_tier(home, "s3", s3_tier_yaml(s3_server, bucket))
    studies = [make_study(tmp_path / f"in{n}", 3, patient_id=f"P{n}", pixels=128) for n in range(2)]
    run_cli("import", *[str(tmp_path / f"in{n}") for n in range(2)], home=home)
    _policy(home, "tape, s3")
    run_cli("policy", "apply", home=home)
    return home, studies, bucket


def test_every_bad_hot_copy_is_found_and_repaired(two_copies, tmp_path):
    home, studies, _ = two_copies
    files = _hot_files(home)
    assert len(files) == 6
    _flip(files[0], 300)  # a bit flip in the payload
    files[1].write_bytes(files[1].read_bytes()[:-100])  # truncated
    files[2].unlink()  # missing
    a, b = files[3].read_bytes(), files[4].read_bytes()  # swapped: each file holds the other's blob
    files[3].write_bytes(b)
    files[4].write_bytes(a)
    # A blob sealed under another study's key, in place of this one (a misfiled copy).
    files[5].write_bytes(files[3].read_bytes())
    report = _scrub(home, "--tier", "hot")
    assert report["repaired"] == 6 and report["unrecoverable"] == 0
    assert {f["instance"] for f in report["findings"]} == {f["instance"] for f in report["findings"]}
    assert all(f["action"].startswith("repaired from") for f in report["findings"])
    assert all(f["study"] in {s for s, _ in studies} for f in report["findings"])
    # Re-verified: a second fast and a deep pass find nothing; everything reads back exactly.
    assert _scrub(home)["findings"] == [] and _scrub(home, "--deep")["findings"] == []
    for number, (uid, files_in) in enumerate(studies):
        run_cli("export", uid, str(tmp_path / f"out{number}"), home=home)
        assert _sha((tmp_path / f"out{number}").iterdir()) == _sha(files_in)


def test_deep_finds_what_keeps_the_sealed_hash(two_copies):
    """A copy can only change without changing its sealed bytes if the index lies about them:
    deep re-hashes the content itself."""
    home, studies, _ = two_copies
    config = cfg.load(home)
    with open_archive(config, writer=True) as archive:
        with archive.catalog.read() as view:
            blob = next(view.blobs())
        ca = blob.ca
        other = archive.hot.path(blob.copies["hot"].name)
        sibling = next(p for p in _hot_files(home) if p != other)
        # Put another blob's bytes in place and make the index agree on the sealed hash.
        other.write_bytes(sibling.read_bytes())
        size, digest = len(sibling.read_bytes()), __import__("xxhash").xxh3_128(sibling.read_bytes()).digest()

        def lie(t: ix.Txn) -> None:
            record = t.get("blobs", ca)
            record["sealed_size"], record["xxh3"] = size, digest
            t.put("blobs", ca, record)
        archive._index.write(lie)  # the index itself tampered with, below the catalog
    assert [f for f in _scrub(home, "--tier", "hot")["findings"]] == []
    deep = _scrub(home, "--deep", "--tier", "hot", check=False)
    assert len(deep["findings"]) == 1 and "another instance" in deep["findings"][0]["problem"]


def test_bad_copies_on_tape_and_s3_are_found_and_repaired(two_copies, s3_server, tmp_path):
    home, studies, bucket = two_copies
    packs = sorted((home / "cartridges" / "PV0001L9" / "packs").iterdir())
    _flip(packs[0], 500)  # inside the first blob of the first pack
    packs[1].write_bytes(packs[1].read_bytes()[:-7])  # truncated: footer gone
    client = s3_server.client()
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    body = bytearray(client.get_object(Bucket=bucket, Key=keys[0])["Body"].read())
    body[1000] ^= 1
    client.put_object(Bucket=bucket, Key=keys[0], Body=bytes(body))
    client.delete_object(Bucket=bucket, Key=keys[1])

    fast = _scrub(home)
    problems = {(f["tier"], f["copy"]) for f in fast["findings"]}
    assert {("tape", packs[0].name), ("tape", packs[1].name)} <= problems
    assert {("s3", keys[0].rsplit("/", 1)[1]), ("s3", keys[1].rsplit("/", 1)[1])} <= problems
    assert fast["unrecoverable"] == 0 and all(f["action"].startswith("repaired") for f in fast["findings"])
    # The repaired copies are new packs, read back and verified; the bad ones are gone.
    deep = _scrub(home, "--deep")["findings"]
    assert deep == [], [(f["tier"], f["problem"], f["action"]) for f in deep]
    with open_archive(cfg.load(home)) as archive, archive.catalog.read() as view:
        recorded = {pack.id: pack for pack in view.packs()}
    on_tape = {p.name for p in (home / "cartridges" / "PV0001L9" / "packs").iterdir()}
    on_s3 = {o["Key"].rsplit("/", 1)[1] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert on_tape | on_s3 <= set(recorded)
    # With the hot copies gone, both studies come back from the repaired cold copies alone.
    for path in _hot_files(home):
        path.unlink()
    os.rename(home / "cartridges" / "PV0001L9", home / "cartridges" / "shelf")  # S3 alone
    _scrub(home, "--tier", "hot")  # hot copies missing: rewritten from S3
    for number, (uid, files_in) in enumerate(studies):
        run_cli("export", uid, str(tmp_path / f"out{number}"), home=home)
        assert _sha((tmp_path / f"out{number}").iterdir()) == _sha(files_in)


def test_a_copy_with_no_good_twin_is_reported_and_never_served(home, tmp_path):
    study_uid, files = make_study(tmp_path / "in", 2, pixels=128)
    register(home, CLIENT_AE, free_port(), "store,query,retrieve")
    run_cli("import", str(tmp_path / "in"), home=home)
    _flip(_hot_files(home)[0], 400)
    result = run_cli("scrub", "--report", str(tmp_path / "scrub.html"), home=home, check=False)
    assert result.returncode == 1 and "1 unrecoverable" in result.stdout and "marked damaged" in result.stdout
    assert result.stderr.splitlines()[-1] == "appliance: unrecoverable copies: 1 (no good copy to repair them from)"
    page = (tmp_path / "scrub.html").read_text()
    assert "1 unrecoverable" in page and "<svg" in page and "http://" not in page and "https://" not in page
    status = json.loads(run_cli("status", "--json", home=home).stdout)
    assert status["state"] == "FAULTED" and status["damaged"] == 1  # an instance is lost unless sent again
    assert "damaged" in [a["key"] for a in status["alarms"]]
    assert "1 unrecoverable" in status["last_scrub"]
    export = run_cli("export", study_uid, str(tmp_path / "out"), home=home, check=False)
    assert export.returncode != 0 and "damaged" in export.stderr
    assert len(list((tmp_path / "out").glob("*.dcm"))) == 1  # the good one only
    server = Server(home).start()
    try:
        out = tmp_path / "got"
        out.mkdir()
        got = dcmtk("getscu", "-S", "-aet", CLIENT_AE, "-aec", "ARCHIVE", "127.0.0.1", str(server.port),
                    "-od", str(out), "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                    check=False)
        assert len(list(out.iterdir())) == 1, got.stdout + got.stderr  # the damaged one is never sent
    finally:
        server.stop()
    # The sender still has it: storing it again heals the damaged version.
    run_cli("import", str(tmp_path / "in"), home=home)
    run_cli("export", study_uid, str(tmp_path / "healed"), home=home)
    assert _sha((tmp_path / "healed").iterdir()) == _sha(files)
    assert json.loads(run_cli("status", "--json", home=home).stdout)["damaged"] == 0
    assert _scrub(home, "--deep")["findings"] == []


def test_a_killed_scrub_resumes_without_rechecking_or_missing_anything(home, tmp_path):
    run_cli("import", str(make_study(tmp_path / "in", 40, pixels=128)[1][0].parent), home=home)
    command = [sys.executable, "-m", "appliance", "--home", str(home), "scrub", "--rate", "0.2"]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while len(seen) < 5:
        line = first.stderr.readline()
        assert line and time.monotonic() < deadline
        event = json.loads(line)
        if event["event"] == "scrub.unit":
            seen.append(event["id"])
    first.send_signal(signal.SIGKILL)
    first.wait()
    with open_archive(cfg.load(home)) as archive:
        with archive.catalog.read() as view:
            started = view.scrub_run()["started"]
        everything = {u.id for u in scrub.units(archive, deep=False)}
        recorded = {u.id for u in scrub.units(archive, deep=False) if u.last >= started}
    assert set(seen) <= recorded and len(everything) == 40
    second = run_cli("scrub", home=home)
    rest = [json.loads(line)["id"] for line in second.stderr.splitlines()
            if json.loads(line)["event"] == "scrub.unit"]
    start = next(json.loads(line) for line in second.stderr.splitlines() if json.loads(line)["event"] == "scrub.start")
    assert start["resumed"] is True
    assert sorted(rest) == sorted(everything - recorded)  # nothing recorded is checked again, nothing missed
    next_run = run_cli("scrub", home=home)  # a new run checks everything again
    assert sum(1 for line in next_run.stderr.splitlines() if json.loads(line)["event"] == "scrub.unit") == 40


def test_the_rate_limit_holds_with_an_injected_clock(home, tmp_path):
    run_cli("import", str(make_study(tmp_path / "in", 5, pixels=256)[1][0].parent), home=home)
    clock, slept = [1000.0], []

    def sleep(seconds):
        slept.append(seconds)
        clock[0] += seconds

    config = cfg.load(home)
    with open_archive(config, writer=True) as archive:
        bucket = TokenBucket(100_000, clock=lambda: clock[0], sleep=sleep)  # 0.1 MB/s
        report = scrub.Scrubber(archive, deep=False, bucket=bucket, clock=lambda: clock[0]).run()
    assert report.bytes_read > 300_000
    # Reading N bytes at 0.1 MB/s takes N / 100000 seconds, less the one second of burst.
    assert sum(slept) == pytest.approx(report.bytes_read / 100_000 - 1, abs=0.2)


def test_copies_past_their_interval_raise_an_alarm_until_scrubbed(home, tmp_path):
    run_cli("import", str(make_study(tmp_path / "in", 2)[1][0].parent), home=home)
    with open_archive(cfg.load(home), writer=True) as archive:
        assert scrub.overdue(archive, scrub.coverage(archive, int(time.time()))) == []
        late = scrub.overdue(archive, scrub.coverage(archive, int(time.time()) + 8 * 86400))  # hot: fast every 7 days
        assert [(r["tier"], r["kind"], r["copies"]) for r in late] == [("hot", "fast", 2)]
        month = scrub.overdue(archive, scrub.coverage(archive, int(time.time()) + 31 * 86400))
        assert {(r["tier"], r["kind"]) for r in month} == {("hot", "fast"), ("hot", "deep")}

        def age(t: ix.Txn) -> None:  # as if the copies were last verified 40 days ago
            for ca, blob in list(t.items("blobs")):
                blob["copies"]["hot"].update(verified=int(time.time()) - 40 * 86400, deep=0)
                blob["stored"] = int(time.time()) - 40 * 86400
                t.put("blobs", ca, blob)
        archive._index.write(age)  # time passed, written below the catalog
    status = json.loads(run_cli("status", "--json", home=home).stdout)
    assert {a["key"] for a in status["alarms"]} == {"scrub-overdue:hot:fast", "scrub-overdue:hot:deep"}
    run_cli("scrub", home=home)
    assert [a["key"] for a in json.loads(run_cli("status", "--json", home=home).stdout)["alarms"]] == \
        ["scrub-overdue:hot:deep"]
    run_cli("scrub", "--deep", home=home)
    assert json.loads(run_cli("status", "--json", home=home).stdout)["alarms"] == []


def test_a_hot_copy_a_migration_drops_while_scrub_runs_is_not_lost_or_brought_back(config, ct_files, monkeypatch):
    """Scrub lists the copies, then `policy apply` drops the hot ones (their cold copies
    verified): the files scrub no longer finds are not "missing", and nothing is repaired."""
    from appliance.store import tiering

    with open_archive(config, writer=True) as archive:
        for path in ct_files[:3]:
            archive.store_file(path)
        [study] = archive.study_uids()
        listed = scrub.units(archive, deep=False, tiers=["hot"])
        tiering.pack_study(archive, study, "cold", remember_pending=lambda pack_id: None)
        assert tiering.drop_hot(archive, study, ["cold"]) == 3
        monkeypatch.setattr(scrub, "units", lambda *args, **kwargs: listed)  # what the run listed before
        report = scrub.Scrubber(archive, deep=False, tiers=["hot"]).run()
        assert report.findings == [] and report.unrecoverable == 0
        assert list(archive.hot.list()) == [] and archive.needs_recall(study)
