"""The audit trail: tamper evidence (hypothesis), concurrent and killed writers, the CLI's
access control, configuration changes, and a whole workflow over DICOM that must leave the
expected events, in order, with no key material or patient name anywhere it should not be."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, make_study, run_cli, set_config, small_volume, sudo_env
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.dicom_server import CLIENT_AE, DEST_AE, Server, dcmtk, free_port, register
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance import config as cfg
from appliance.audit.chain import GENESIS, canonical, link
from appliance.audit.events import AuditError, EventID, event
from appliance.audit.signing import load_key, sign_checkpoint
from appliance.audit.trail import AuditTrail
from appliance.audit.verify import Verification, verify
from appliance.store.keys import read_key_file, snapshot_key


def _records(home: Path) -> list[dict]:
    config = cfg.load(home)
    return list(AuditTrail(config.audit_dir, config.audit_key_file).records())


def _ops(records: list[dict]) -> list[tuple[str, str]]:
    return [(r["event"], r["op"]) for r in records]


# -- tamper evidence ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trail_files(tmp_path_factory):
    """A real trail of 30 records (plus the first), its head and checkpoints."""
    root = tmp_path_factory.mktemp("trail")
    trail = AuditTrail.create(root / "audit", root / "audit.key")
    for number in range(30):
        trail.record(event(EventID.QUERY, op="c-find", user=f"AE{number % 3}", keys={"PatientID": f"P{number}"},
                           matches=number))
    lines = [line for _, line in trail.lines()]
    return lines, trail.head(), trail.checkpoint_lines()


def _verify(lines: list[bytes], head, checkpoints) -> Verification:
    return verify(((f"line {n}", line) for n, line in enumerate(lines, 1)), head, checkpoints)


def test_an_untouched_trail_verifies(trail_files):
    lines, head, checkpoints = trail_files
    result = _verify(lines, head, checkpoints)
    assert result.intact, result.problems
    assert result.records == 31 and result.last_seq == 31 and len(result.keys) == 1


_TAMPERING = st.one_of(
    st.tuples(st.just("edit"), st.integers(0, 30), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("delete"), st.integers(0, 30)),
    st.tuples(st.just("insert"), st.integers(0, 31), st.integers(0, 30)),
    st.tuples(st.just("forge"), st.integers(0, 31), st.text(min_size=1, max_size=40)),
    st.tuples(st.just("swap"), st.integers(0, 30), st.integers(0, 30)),
    st.tuples(st.just("truncate"), st.integers(1, 31)),
    st.tuples(st.just("cut"), st.integers(1, 200)),
)


def _tamper(lines: list[bytes], how: tuple) -> list[bytes]:
    lines = list(lines)
    kind = how[0]
    if kind == "edit":  # one byte of one record changed
        _, row, offset, delta = how
        line = bytearray(lines[row])
        line[offset % len(line)] = (line[offset % len(line)] + delta) % 256
        lines[row] = bytes(line)
    elif kind == "delete":
        del lines[how[1]]
    elif kind == "insert":  # a copy of a real record put elsewhere
        lines.insert(how[1], lines[how[2]])
    elif kind == "forge":  # a well-formed record with a plausible seq and link, written by hand
        at, text = how[1], how[2]
        prev = link(lines[at - 1]) if at else GENESIS
        forged = canonical({"seq": at + 1, "time": "2026-01-01T00:00:00.000000Z", "prev": prev,
                            "event": "Query", "op": "c-find", "action": "E", "outcome": 0, "user": text})
        lines.insert(at, forged + b"\n")
    elif kind == "swap":
        a, b = how[1], how[2]
        if lines[a] == lines[b]:
            b = (a + 1) % len(lines)
        lines[a], lines[b] = lines[b], lines[a]
    elif kind == "truncate":  # records removed from the end
        del lines[-how[1]:]
    elif kind == "cut":  # the file cut short in the middle of the last record
        lines[-1] = lines[-1][:-min(how[1], len(lines[-1]) - 1)]
    return lines


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(how=_TAMPERING)
def test_any_edit_deletion_insertion_reordering_or_truncation_is_detected(trail_files, how):
    lines, head, checkpoints = trail_files
    tampered = _tamper(lines, how)
    assert tampered != lines
    result = _verify(tampered, head, checkpoints)
    assert not result.intact, how


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, 10_000), delta=st.integers(1, 255), which=st.sampled_from(["head", "checkpoint"]))
def test_an_edited_head_or_checkpoint_is_detected(trail_files, offset, delta, which):
    lines, head, checkpoints = trail_files
    raw = bytearray(canonical(head) if which == "head" else checkpoints[0])
    raw[offset % len(raw)] = (raw[offset % len(raw)] + delta) % 256
    try:
        edited = json.loads(bytes(raw))
    except ValueError:
        edited = {}
    if which == "head":
        result = _verify(lines, edited, checkpoints)
    else:
        result = _verify(lines, head, [bytes(raw)])
    assert not result.intact


def test_problems_name_the_record(trail_files):
    lines, head, checkpoints = trail_files
    assert any("records 11 to 11 are missing" in p for p in _verify(_tamper(lines, ("delete", 10)), head,
                                                                    checkpoints).problems)
    assert any("records 30 to 31 were removed" in p for p in _verify(lines[:-2], head, checkpoints).problems)
    edited = _verify(_tamper(lines, ("edit", 4, 60, 1)), head, checkpoints).problems
    assert any("record 6 does not link to record 5" in p for p in edited)
    resigned = sign_checkpoint(Ed25519PrivateKey.generate(), 29, link(lines[28]), 0)
    assert any("signed by a key no record announces" in p for p in _verify(lines[:-2], resigned, []).problems)


# -- writers -----------------------------------------------------------------------------------

_WRITER = """
import sys
from pathlib import Path
from appliance.audit.events import EventID, event
from appliance.audit.trail import AuditTrail
trail = AuditTrail(Path(sys.argv[1]), Path(sys.argv[2]))
for number in range(int(sys.argv[3])):
    trail.record(event(EventID.QUERY, op="c-find", user=sys.argv[4], matches=number))
"""


def test_concurrent_writers_and_a_writer_killed_mid_append_leave_one_intact_chain(tmp_path):
    trail = AuditTrail.create(tmp_path / "audit", tmp_path / "audit.key")
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "audit"), str(tmp_path / "audit.key"),
                                 "150", f"W{n}"], cwd=REPO) for n in range(3)]
    endless = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "audit"), str(tmp_path / "audit.key"),
                                "1000000", "KILLED"], cwd=REPO)
    assert [w.wait(120) for w in writers] == [0, 0, 0]
    endless.send_signal(signal.SIGKILL)
    endless.wait()
    # A writer that died inside write() leaves at most part of a line: the next append drops it.
    segment = trail.segment_paths()[-1]
    with open(segment, "ab") as fp:
        fp.write(b'{"seq":')
    trail.record(event(EventID.APPLICATION_ACTIVITY, op="test"))
    result = trail.verify()
    assert result.intact, result.problems
    records = list(trail.records())
    assert sum(r.get("user") == f"W{n}" for r in records for n in range(3)) == 450
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    dropped = [r for r in records if r["op"] == "audit" and "cut off" in r["detail"].get("reason", "")]
    assert len(dropped) == 1


def test_a_full_disk_refuses_the_record_and_leaves_no_half_record(tmp_path):
    with small_volume(tmp_path / "small", "256k") as mount:
        trail = AuditTrail.create(mount / "audit", tmp_path / "audit.key")
        with pytest.raises(AuditError):
            for number in range(100_000):
                trail.record(event(EventID.QUERY, op="c-find", keys={"PatientName": "X" * 200}, matches=number))
        (mount / "audit" / "checkpoints.log").unlink()  # space comes back (and a checkpoint is lost)
        trail.record(event(EventID.APPLICATION_ACTIVITY, op="after"))
        result = trail.verify()
        assert [p for p in result.problems if "checkpoint" not in p] == []
        assert list(trail.records())[-1]["op"] == "after"


# -- the CLI: who may do what, and what every command leaves --------------------------------

def test_roles_are_enforced_and_every_refusal_is_audited(home, tmp_path):
    uid, _ = make_study(tmp_path / "s", 1, patient_id="PID-ROLE")
    run_cli("import", str(tmp_path / "s"), home=home)
    run_cli("hold", "set", uid, "--reason", "court order", home=home)
    # nobody's own group (nogroup) is the auditor group; nobody is not in the admin group.
    set_config(home, "auditor_group: pacs-vault-audit", "auditor_group: nogroup")
    refused = {("keys", "rotate"), ("hold", "release", uid, "--reason", "x"), ("policy", "apply"),
               ("ae", "add", "X", "127.0.0.1", "104"), ("fsck", "--rebuild-index")}
    for command in refused:
        result = run_cli(*command, home=home, check=False, env=sudo_env("nobody"))
        assert result.returncode == 77, (command, result.stderr)
        assert "needs the admin role: user nobody is not in group pacs-vault-admin" in result.stderr
    restore = run_cli("--home", str(tmp_path / "new"), "restore", "--from", str(home / "offsite"), "--key-file",
                      str(home / "kek.key"), check=False, env=sudo_env("nobody"))
    assert restore.returncode == 77 and not (tmp_path / "new").exists()
    assert run_cli("audit", "report", "--study", uid, home=home, env=sudo_env("nobody")).returncode == 0
    assert run_cli("audit", "verify", home=home, env=sudo_env("nobody")).returncode == 0
    # not an auditor: the trail stays closed
    assert run_cli("audit", "export", home=home, check=False, env=sudo_env("daemon")).returncode == 77
    # the hold is still there, the KEK unchanged
    assert "court order" in run_cli("hold", "list", home=home).stdout
    alerts = [r for r in _records(home) if r["event"] == "Security Alert" and r.get("type") ==
              "Use of Restricted Function"]
    assert {(r["user"], r["detail"]["command"].split()[0]) for r in alerts} == {
        ("nobody", "keys"), ("nobody", "hold"), ("nobody", "policy"), ("nobody", "ae"), ("nobody", "fsck"),
        ("daemon", "audit")}
    used = [r for r in _records(home) if r["event"] == "Audit Log Used"]
    assert {r["user"] for r in used} == {"nobody"} and len(used) == 2
    # root (no sudo) is an admin
    run_cli("hold", "release", uid, "--reason", "case closed", home=home)
    assert run_cli("audit", "verify", home=home).returncode == 0


_WHO = "from pathlib import Path; from appliance.security import access; print(access.identify(Path('{home}'), 'root', 'x'))"


def test_sudo_user_is_believed_only_from_root_or_the_home_owner(tmp_path):
    shared = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        shared.chmod(0o755)
        env = {**os.environ, "SUDO_USER": "root", "PYTHONPATH": str(REPO)}
        as_nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                                    "-c", _WHO.format(home=shared)], capture_output=True, text=True, env=env)
        assert as_nobody.returncode == 0, as_nobody.stderr
        assert "user='nobody'" in as_nobody.stdout and "admin=False" in as_nobody.stdout
        as_root = subprocess.run([sys.executable, "-c", _WHO.format(home=shared)], capture_output=True, text=True,
                                 env={**env, "SUDO_USER": "nobody"})
        assert "user='nobody'" in as_root.stdout and "admin=False" in as_root.stdout
    finally:
        shared.rmdir()


def test_commands_config_changes_and_keys_are_recorded(home, tmp_path):
    uid, _ = make_study(tmp_path / "s", 2, patient_id="PID-CFG")
    run_cli("import", str(tmp_path / "s"), home=home)
    run_cli("export", uid, str(tmp_path / "out"), home=home)
    set_config(home, "rpo_hours: 24", "rpo_hours: 12")  # by hand
    run_cli("status", home=home)
    run_cli("ae", "add", "PACS2", "127.0.0.1", "104", "--roles", "query", home=home)
    status = json.loads(run_cli("keys", "status", "--json", home=home).stdout)
    run_cli("keys", "rotate", home=home)
    records = _records(home)
    changes = [r for r in records if r.get("type") == "Software Configuration"]
    assert [(c["detail"]["changed"], c["detail"].get("noticed", ""), c["detail"].get("command", ""))
            for c in changes] == [(["appliance.yaml"], "changed outside appliance commands", ""),
                                  (["remote-aes.yaml"], "", "ae add PACS2 127.0.0.1 104 --roles query")]
    imported = next(r for r in records if r["event"] == "Import")
    assert (imported["study"], imported["patient"], imported["instances"]) == (uid, "PID-CFG", 2)
    exported = next(r for r in records if r["event"] == "Export")
    assert (exported["study"], exported["instances"], exported["dest"]) == (uid, 2, str(tmp_path / "out"))
    rotation = next(r for r in records if r.get("type") == "Security Configuration")
    assert rotation["detail"]["old_kek"] == status["kek_id"] and rotation["detail"]["data_keys"] == 1
    commands = [r["detail"]["command"] for r in records if r["op"] == "command"]
    assert commands[-5:] == [f"export {uid} {tmp_path / 'out'}", "status", "ae add PACS2 127.0.0.1 104 --roles query",
                             "keys status --json", "keys rotate"]
    assert {r["user"] for r in records} == {"root"}
    # keys status: the KEK, its age, the wrapped keys, and the audit key kept apart
    assert status["data_keys"] == 1 and status["kek_age_days"] == 0
    assert Path(status["audit_key_file"]) != Path(status["key_file"])
    assert status["audit_public_key"] in json.loads(run_cli("audit", "verify", "--json", home=home).stdout)["keys"]
    assert run_cli("audit", "verify", "--public-key", status["audit_public_key"], home=home).returncode == 0
    pinned = run_cli("audit", "verify", "--public-key", "ab" * 32, home=home, check=False)
    assert pinned.returncode == 1 and "pinned public key" in pinned.stdout and "not pinned" in pinned.stdout


def test_turning_the_trail_off_is_recorded_and_raises_an_alarm(home):
    set_config(home, "  enabled: true", "  enabled: false")
    status = json.loads(run_cli("status", "--json", home=home).stdout)
    assert status["state"] == "DEGRADED" and not status["audit"]["enabled"]
    assert [a["action"] for a in status["alarms"]] == ["set audit.enabled: true in appliance.yaml"]
    records = _records(home)
    assert records[-1]["type"] == "Software Configuration" and records[-1]["detail"]["changed"] == ["appliance.yaml"]
    run_cli("status", home=home)
    assert _records(home) == records  # nothing else while it is off
    assert "audit      OFF" in run_cli("status", home=home).stdout


def test_a_tampered_trail_fails_verify_and_the_report_says_so(home, tmp_path):
    uid, _ = make_study(tmp_path / "s", 1, patient_id="PID-T")
    run_cli("import", str(tmp_path / "s"), home=home)
    segment = sorted((home / "audit" / "trail").iterdir())[-1]
    lines = segment.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"root"', b'"eve"')
    segment.write_bytes(b"".join(lines))
    result = run_cli("audit", "verify", home=home, check=False)
    assert result.returncode == 1 and "record 3 does not link to record 2" in result.stdout
    report = run_cli("audit", "report", "--patient", "PID-T", "--html", str(tmp_path / "r.html"), home=home)
    assert "THE TRAIL DOES NOT VERIFY" in report.stdout
    assert "THE TRAIL DOES NOT VERIFY" in (tmp_path / "r.html").read_text()


def test_a_tail_cut_by_someone_holding_the_audit_key_is_caught_by_the_off_site_copy(home, tmp_path):
    make_study(tmp_path / "s", 2, patient_id="PID-CUT")
    run_cli("import", str(tmp_path / "s"), home=home)
    run_cli("status", home=home)
    run_cli("status", home=home)
    run_cli("replicate", home=home)  # its copy of the trail: 5 records
    assert "intact" in run_cli("audit", "verify", "--offsite", home=home).stdout
    # Cut the trail back to record 3 and sign it again, as someone with the audit key could.
    segment = sorted((home / "audit" / "trail").iterdir())[-1]
    lines = segment.read_bytes().splitlines(keepends=True)[:3]
    segment.write_bytes(b"".join(lines))
    (home / "audit" / "checkpoints.log").write_bytes(
        b"".join(line + b"\n" for line in (home / "audit" / "checkpoints.log").read_bytes().splitlines()
                 if json.loads(line)["seq"] <= 3))
    key = load_key(home / "audit.key")
    (home / "audit" / "head").write_bytes(canonical(sign_checkpoint(key, 3, link(lines[-1]), 0)))
    assert run_cli("audit", "verify", home=home).returncode == 0  # locally consistent
    caught = run_cli("audit", "verify", "--offsite", home=home, check=False)
    assert caught.returncode == 1 and "the off-site copy's head" in caught.stdout, caught.stdout


def test_export_formats(home, tmp_path):
    import xml.etree.ElementTree as ET

    uid, _ = make_study(tmp_path / "s", 1, patient_id="PID-X")
    run_cli("import", str(tmp_path / "s"), home=home)
    records = [json.loads(line) for line in run_cli("audit", "export", home=home).stdout.splitlines()]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    syslog = run_cli("audit", "export", "--format", "syslog", home=home).stdout.splitlines()
    assert len(syslog) == len(records) + 1  # the first export is in the trail now
    assert all(re.match(r"<10[89]>1 \S+Z \S+ pacs-vault - \S+ \[audit@32473 seq=", line) for line in syslog)
    imported = next(line for line in syslog if 'event="Import"' in line)
    assert f'study="{uid}"' in imported and '[audit@32473 ' in imported and ' pacs-vault - import ' in imported
    xml = run_cli("audit", "export", "--format", "atna-xml", "--since", "2000-01-01", home=home).stdout.splitlines()
    messages = [ET.fromstring(line) for line in xml]
    message = next(m for m in messages if m.find("EventIdentification/EventID").get("originalText") == "Import")
    assert message.find("EventIdentification/EventID").get("csd-code") == "110107"
    objects = {o.find("ParticipantObjectIDTypeCode").get("originalText"): o.get("ParticipantObjectID")
               for o in message.findall("ParticipantObjectIdentification")}
    assert objects == {"Study Instance UID": uid, "Patient Number": "PID-X"}
    assert run_cli("audit", "export", "--since", "2999-01-01", home=home).stdout == ""


# -- the whole workflow over DICOM -----------------------------------------------------------

CANARY = "CANARYNAME^ZQXJ"


def test_a_full_workflow_leaves_its_events_in_order_and_no_secret_anywhere(home, tmp_path):
    register(home, CLIENT_AE, free_port(), "store,query,retrieve")
    register(home, "STOREONLY", free_port(), "store")
    dest_port = free_port()
    register(home, DEST_AE, dest_port, "move-destination")
    (home / "policies" / "default.yaml").write_text(
        "classes:\n  - name: everything\n    match: {}\n    retention: {years_after_study: 5}\n"
        "    transitions:\n      - {after_days: 0, to: [cold], keep_hot: true}\n    at_expiry: delete\n")
    keep_uid, keep_files = make_study(tmp_path / "keep", 3, patient_id="PID-KEEP", patient_name=CANARY,
                                      study_date=__import__("time").strftime("%Y%m%d"))
    old_uid, old_files = make_study(tmp_path / "old", 2, patient_id="PID-OLD", study_date="20000101")
    srv = Server(home, extra=("--debug",)).start()
    received = tmp_path / "received"
    received.mkdir()
    storescp = subprocess.Popen(["/usr/bin/storescp", "-aet", DEST_AE, "-od", str(received), str(dest_port)])
    addr = ["-aet", CLIENT_AE, "-aec", "ARCHIVE", "127.0.0.1", str(srv.port)]
    try:
        dcmtk("storescu", "-nh", *addr, *map(str, keep_files + old_files))
        found = dcmtk("findscu", "-v", "-S", *addr, "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientName={CANARY}",
                      "-k", "StudyInstanceUID")
        assert keep_uid in found.stderr + found.stdout
        dcmtk("movescu", "-S", "-aem", DEST_AE, *addr, "-k", "QueryRetrieveLevel=STUDY", "-k",
              f"StudyInstanceUID={keep_uid}")
        (tmp_path / "got").mkdir()
        dcmtk("getscu", "-S", "-od", str(tmp_path / "got"), *addr, "-k", "QueryRetrieveLevel=STUDY", "-k",
              f"StudyInstanceUID={keep_uid}")
        refused = dcmtk("findscu", "-v", "-S", "-aet", "STOREONLY", "-aec", "ARCHIVE", "127.0.0.1", str(srv.port),
                        "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=*", check=False)
        assert "Status: 0x124" in refused.stderr, refused.stderr
        stranger = dcmtk("echoscu", "-aet", "STRANGER", "-aec", "ARCHIVE", "127.0.0.1", str(srv.port), check=False)
        assert stranger.returncode != 0
    finally:
        assert srv.stop() == 0
        storescp.terminate()
        storescp.wait()
    assert len(list(received.iterdir())) == 3 and len(list((tmp_path / "got").iterdir())) == 3
    run_cli("policy", "apply", home=home)
    run_cli("scrub", "--deep", "--report", str(tmp_path / "scrub.html"), home=home)
    run_cli("replicate", "--report", str(tmp_path / "backup.html"), home=home)
    run_cli("audit", "report", "--patient", "PID-KEEP", "--html", str(tmp_path / "access.html"), home=home)
    exports = [run_cli("audit", "export", "--format", form, home=home).stdout for form in ("json", "syslog",
                                                                                           "atna-xml")]
    assert run_cli("audit", "verify", home=home).returncode == 0

    records = _records(home)
    events = _ops(records)
    expected = [("Application Activity", "serve"), ("User Authentication", "association"),
                ("DICOM Instances Transferred", "c-store"), ("Query", "c-find"),
                ("Begin Transferring DICOM Instances", "c-move"), ("DICOM Instances Transferred", "c-move"),
                ("Begin Transferring DICOM Instances", "c-get"), ("DICOM Instances Transferred", "c-get"),
                ("Security Alert", "c-find"), ("Security Alert", "association"), ("Application Activity", "serve"),
                ("DICOM Instances Accessed", "migrate"), ("Application Activity", "command"),
                ("Application Activity", "deep scrub"), ("Application Activity", "replicate"),
                ("Audit Log Used", "command")]
    position = 0
    for step in expected:  # in this order (other records between them)
        position = events.index(step, position) + 1
    stopped = max(n for n, e in enumerate(events) if e == ("Application Activity", "serve"))
    assert ("DICOM Study Deleted", "expire") in events[stopped:]
    stores = [r for r in records if r["op"] == "c-store"]
    assert len(stores) == 5 and {r["user"] for r in stores} == {CLIENT_AE}
    assert {r["study"] for r in stores} == {keep_uid, old_uid} and all(r["host"] == "127.0.0.1" for r in stores)
    query = next(r for r in records if r["event"] == "Query")
    assert query["detail"]["keys"]["PatientName"] == CANARY and query["detail"]["matches"] == 1
    moved = next(r for r in records if r["event"] == "DICOM Instances Transferred" and r["op"] == "c-move")
    assert (moved["study"], moved["patient"], moved["instances"]) == (keep_uid, "PID-KEEP", 3)
    assert moved["dest"] == f"{DEST_AE}@127.0.0.1:{dest_port}"
    deleted = next(r for r in records if r["event"] == "DICOM Study Deleted")
    assert (deleted["study"], deleted["patient"], deleted["instances"], deleted["action"]) == (old_uid, "PID-OLD",
                                                                                               2, "D")
    rejected = next(r for r in records if r["op"] == "association" and r["event"] == "Security Alert")
    assert (rejected["user"], rejected["detail"]["reason"]) == ("STRANGER", "calling AE title not registered")
    refusal = next(r for r in records if r["op"] == "c-find" and r["event"] == "Security Alert")
    assert refusal["user"] == "STOREONLY" and refusal["outcome"] == 4
    access_page = (tmp_path / "access.html").read_text()
    assert "c-move" in access_page and "c-get" in access_page and CLIENT_AE in access_page

    # Debug logs carry no patient name; nothing but the key file holds key material.
    log = srv.log.read_bytes()
    assert b"Received Store Request" in log or b"Association" in log  # debug logging was on
    assert CANARY.encode() not in log and b"CANARYNAME" not in log
    kek = read_key_file(home / "kek.key")
    audit_key = load_key(home / "audit.key").private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    secrets = [kek.key, base64.b64encode(kek.key), kek.key.hex().encode(), snapshot_key(kek), audit_key,
               base64.b64encode(audit_key), audit_key.hex().encode(),
               b"".join((home / "audit.key").read_bytes().splitlines()[1:2])]
    places = {"server log": log, "scrub report": (tmp_path / "scrub.html").read_bytes(),
              "backup report": (tmp_path / "backup.html").read_bytes(), "access report": access_page.encode(),
              **{f"export {n}": e.encode() for n, e in enumerate(exports)}}
    places.update({str(p): p.read_bytes() for p in (home / "offsite").rglob("*") if p.is_file()})
    places.update({str(p): p.read_bytes() for p in (home / "audit").rglob("*") if p.is_file()})
    assert len(places) > 10
    for name, data in places.items():
        for secret in secrets:
            assert secret not in data, name
    for name in places:
        assert "kek.key" not in Path(name).name and "audit.key" not in Path(name).name


def test_a_home_from_before_the_trail_starts_one(home):
    import shutil

    shutil.rmtree(home / "audit")
    (home / "audit.key").unlink()
    run_cli("status", home=home)
    records = _records(home)
    assert records[0]["detail"]["reason"] == "trail started in an existing home" and "audit_key" in records[0]["detail"]
    assert run_cli("audit", "verify", home=home).returncode == 0
