"""Off-site replication and the disaster-recovery drill, with real rsync to a local path, a real
rsync daemon and a real sshd on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from conftest import make_study, run_cli, set_config
from support.dicom_server import CLIENT_AE, Server, dataset_bytes, dcmtk, free_port, register
from support.offsite_servers import RsyncDaemon, SshServer

from appliance import config as cfg
from appliance.admin.home import open_archive
from appliance.audit.signing import load_key, public_hex
from appliance.audit.trail import AuditTrail
from appliance.store import index as ix


def _offsite_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _sha(paths) -> set[str]:
    return {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def _policy_to_cold(home: Path) -> None:
    (home / "policies" / "default.yaml").write_text(
        "classes:\n  - name: all\n    retention: {keep_forever: true}\n"
        "    transitions:\n      - {after_days: 0, to: [cold]}\n")


def test_disaster_recovery_drill(home, tmp_path):
    """Ingest over DICOM, replicate, lose the home, restore from the off-site copy and the key
    file alone, and get every instance back byte-exact over DICOM."""
    register(home, CLIENT_AE, free_port(), "store,query,retrieve")
    first_uid, first = make_study(tmp_path / "a", 3, patient_name="CANARY^DRILL", patient_id="A")
    second_uid, second = make_study(tmp_path / "b", 2, patient_id="B")
    server = Server(home).start()
    try:
        dcmtk("storescu", "-aet", CLIENT_AE, "-aec", "ARCHIVE", "127.0.0.1", str(server.port), *map(str, first))
    finally:
        server.stop()
    _policy_to_cold(home)
    run_cli("policy", "apply", home=home)  # study A lives in a pack on the cold tier only
    run_cli("import", str(tmp_path / "b"), home=home)  # study B on the hot tier
    run_cli("hold", "set", second_uid, "--reason", "kept through the drill", home=home)
    result = run_cli("replicate", home=home)
    assert "verified" in result.stdout
    offsite = tmp_path / "elsewhere"
    shutil.copytree(home / "offsite", offsite)  # the off-site disk, physically elsewhere
    key_copy = tmp_path / "safe" / "kek.key"
    key_copy.parent.mkdir()
    shutil.copy2(home / "kek.key", key_copy)  # the admin's copy, kept apart

    # Nothing off-site gives away a patient, a UID, or the key.
    key_bytes = (home / "kek.key").read_bytes()
    key_line = [line for line in key_bytes.splitlines() if line.startswith(b"key:")][0].split()[1]
    raw_key = __import__("base64").b64decode(key_line)
    for path in _offsite_files(offsite):
        data = path.read_bytes()
        assert b"CANARY" not in data and first_uid.encode() not in data, path
        assert key_line not in data and raw_key not in data, path
        assert first_uid not in str(path) and second_uid not in str(path)

    shutil.rmtree(home)
    started = time.monotonic()
    new_home = tmp_path / "rebuilt"
    result = run_cli("restore", "--from", str(offsite), "--key-file", str(key_copy), home=new_home)
    assert "restored" in result.stdout, result.stderr
    assert run_cli("fsck", home=new_home).returncode == 0
    assert json.loads(run_cli("hold", "list", "--json", home=new_home).stdout)[f"study:{second_uid}"]["reason"] == \
        "kept through the drill"
    register(new_home, CLIENT_AE, free_port(), "store,query,retrieve")
    server = Server(new_home).start()
    try:
        for uid, files in ((first_uid, first), (second_uid, second)):
            out = tmp_path / f"got-{uid[-6:]}"
            out.mkdir()
            dcmtk("getscu", "-S", "-aet", CLIENT_AE, "-aec", "ARCHIVE", "127.0.0.1", str(server.port),
                  "-od", str(out), "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}")
            assert sorted(dataset_bytes(p) for p in out.iterdir()) == sorted(dataset_bytes(p) for p in files)
    finally:
        server.stop()
    print(f"DR drill: restore + fsck + retrieve of 5 instances took {time.monotonic() - started:.1f} s")
    # The audit trail came back with the data, continues under the new home's own audit key,
    # and still verifies: the stores before the disaster, the restore, the retrieves after it.
    assert run_cli("audit", "verify", home=new_home).returncode == 0
    config = cfg.load(new_home)
    records = list(AuditTrail(config.audit_dir, config.audit_key_file).records())
    ops = [r["op"] for r in records]
    assert ops.count("c-store") == 3 and ops.index("c-store") < ops.index("hold set") < ops.index("restore")
    assert ops.index("restore") < ops.index("c-get")
    keys = [r["detail"]["audit_key"] for r in records if "audit_key" in r.get("detail", {})]
    assert len(keys) == 2 and keys[1] == public_hex(load_key(config.audit_key_file))
    assert not (offsite / "audit.key").exists() and not any("audit.key" in p.name for p in _offsite_files(offsite))


def test_restore_refuses_what_it_must(home, tmp_path, ct_files):
    run_cli("import", str(ct_files[0]), home=home)
    run_cli("replicate", home=home)
    other = tmp_path / "other"
    run_cli("init", home=other)
    wrong = run_cli("restore", "--from", str(home / "offsite"), "--key-file", str(other / "kek.key"),
                    home=tmp_path / "n1", check=False)
    assert wrong.returncode == 77 and "wrong key file" in wrong.stderr
    missing = run_cli("restore", "--from", str(home / "offsite"), "--key-file", str(tmp_path / "nope.key"),
                      home=tmp_path / "n2", check=False)
    assert missing.returncode == 77 and "missing" in missing.stderr
    busy = run_cli("restore", "--from", str(home / "offsite"), "--key-file", str(home / "kek.key"),
                   home=other, check=False)
    assert busy.returncode != 0 and "not empty" in busy.stderr
    nothing = run_cli("restore", "--from", str(tmp_path / "empty"), "--key-file", str(home / "kek.key"),
                      home=tmp_path / "n3", check=False)
    assert nothing.returncode != 0 and "no manifest" in nothing.stderr
    assert not (tmp_path / "n1" / "appliance.yaml").exists() and not (tmp_path / "n2").exists()


def test_rsync_daemon_target_with_faults(home, tmp_path):
    daemon = RsyncDaemon(tmp_path / "daemon").start()
    try:
        set_config(home, "target: offsite", f"target: {daemon.url}")
        uid, files = make_study(tmp_path / "in", 6, pixels=512)
        run_cli("import", str(tmp_path / "in"), home=home)
        # The daemon dies in the middle of a slow transfer: the run fails, nothing counts.
        set_config(home, "bwlimit_kbps: 0", "bwlimit_kbps: 300")
        import subprocess
        import sys

        from conftest import REPO

        run = subprocess.Popen([sys.executable, "-m", "appliance", "--home", str(home), "replicate"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not list((daemon.module).rglob("*")):
            assert time.monotonic() < deadline and run.poll() is None
            time.sleep(0.05)
        time.sleep(0.5)
        daemon.kill()
        out, err = run.communicate(timeout=120)
        assert run.returncode != 0 and "replication failed" in err and "rsync" in err
        with open_archive(cfg.load(home)) as archive, archive.catalog.read() as view:
            assert view.replicas() == []
        status = json.loads(run_cli("status", "--json", home=home).stdout)
        assert "replication-failed" in [a["key"] for a in status["alarms"]]

        set_config(home, "bwlimit_kbps: 300", "bwlimit_kbps: 0")
        daemon.start()
        assert "verified" in run_cli("replicate", home=home).stdout
        objects = [p for p in (daemon.module / "site-a" / "objects").rglob("*")
                   if p.is_file() and not p.name.startswith(".")]  # rsync's own temp files of the killed run
        assert len(objects) == 6
        assert json.loads(run_cli("status", "--json", home=home).stdout)["replication_lag_s"] is None

        # A copy rots off-site: `replicate --verify` reads everything back, finds it and sends it again.
        victim = objects[0]
        data = bytearray(victim.read_bytes())
        data[100] ^= 1
        victim.write_bytes(bytes(data))
        report = json.loads(run_cli("replicate", "--verify", "--json", home=home).stdout)
        assert report["verified"] and report["resent"] == 1
        with open_archive(cfg.load(home)) as archive, archive.catalog.read() as view:
            good = {b.copies["hot"].name: b.xxh3 for b in view.blobs()}
        import xxhash

        assert xxhash.xxh3_128(victim.read_bytes()).digest() == good[victim.name]

        # Restore straight from the daemon.
        restored = tmp_path / "restored"
        run_cli("restore", "--from", daemon.url, "--key-file", str(home / "kek.key"), home=restored)
        run_cli("export", uid, str(tmp_path / "out"), home=restored)
        assert _sha((tmp_path / "out").iterdir()) == _sha(files)
    finally:
        daemon.kill()


def test_ssh_target_verified_by_checksum_and_deletions_follow(home, tmp_path):
    sshd = SshServer(tmp_path / "ssh").start()
    try:
        remote = tmp_path / "remote-site"
        settings = (f"target: {sshd.target(remote)}", f"ssh_port: {sshd.port}", f"ssh_key: {sshd.client_key}",
                    f"ssh_known_hosts: {sshd.known_hosts}")
        for old, new in zip(("target: offsite", "ssh_port: 22", 'ssh_key: ""', 'ssh_known_hosts: ""'), settings):
            set_config(home, old, new)
        keep_uid, keep = make_study(tmp_path / "keep", 2, patient_id="KEEP")
        gone_uid, _ = make_study(tmp_path / "gone", 2, patient_id="GONE")
        run_cli("import", str(tmp_path / "keep"), str(tmp_path / "gone"), home=home)
        assert "verified" in run_cli("replicate", home=home).stdout
        assert len(list((remote / "objects").rglob("*.*"))) == 0  # names carry no extension or UID
        assert len([p for p in (remote / "objects").rglob("*") if p.is_file()]) == 4
        # A rotten remote copy is caught by rsync's checksum comparison and sent again.
        victim = next(p for p in (remote / "objects").rglob("*") if p.is_file())
        data = bytearray(victim.read_bytes())
        data[50] ^= 1
        victim.write_bytes(bytes(data))
        report = json.loads(run_cli("replicate", "--verify", "--json", home=home).stdout)
        assert report["verified"] and report["resent"] == 1

        # Deleted at home (expired and shredded): gone off-site at the next run.
        with open_archive(cfg.load(home), writer=True) as archive:
            archive.delete_study(gone_uid)
        report = json.loads(run_cli("replicate", "--json", home=home).stdout)
        assert report["objects_deleted"] == 2
        assert len([p for p in (remote / "objects").rglob("*") if p.is_file()]) == 2

        restored = tmp_path / "restored"
        run_cli("restore", "--from", sshd.target(remote), "--key-file", str(home / "kek.key"), "--ssh-port",
                str(sshd.port), "--ssh-key", str(sshd.client_key), "--ssh-known-hosts", str(sshd.known_hosts),
                home=restored)
        run_cli("export", keep_uid, str(tmp_path / "out"), home=restored)
        assert _sha((tmp_path / "out").iterdir()) == _sha(keep)
        assert run_cli("export", gone_uid, str(tmp_path / "none"), home=restored, check=False).returncode == 66
    finally:
        sshd.stop()


def test_rpo_lag_raises_an_alarm_and_the_backup_report_says_why(home, tmp_path):
    set_config(home, "target: offsite", f"target: rsync://127.0.0.1:{free_port()}/offsite/x")  # down
    set_config(home, "rpo_hours: 24", "rpo_hours: 1")
    run_cli("import", str(make_study(tmp_path / "in", 1)[1][0].parent), home=home)
    with open_archive(cfg.load(home), writer=True) as archive:
        def age(t: ix.Txn) -> None:  # acknowledged two hours ago
            for ca, blob in list(t.items("blobs")):
                blob["stored"] -= 7200
                t.put("blobs", ca, blob)
        archive._index.write(age)  # time passed, written below the catalog
    result = run_cli("replicate", "--report", str(tmp_path / "backup.html"), home=home, check=False)
    assert result.returncode != 0 and "Connection refused" in result.stderr and "exit 10" in result.stderr
    page = (tmp_path / "backup.html").read_text()
    assert "FAILED" in page and "exceeded" in page
    keys = [a["key"] for a in json.loads(run_cli("status", "--json", home=home).stdout)["alarms"]]
    assert "replication-rpo" in keys and "replication-failed" in keys


def test_objects_sent_by_a_run_that_failed_before_its_manifest_are_restored(home, tmp_path, monkeypatch):
    from appliance.jobs.offsite import replicate
    from appliance.jobs.offsite.target import ReplicationError

    first_uid, _ = make_study(tmp_path / "a", 2, patient_id="A")
    run_cli("import", str(tmp_path / "a"), home=home)
    run_cli("replicate", home=home)
    second_uid, second = make_study(tmp_path / "b", 2, patient_id="B")
    run_cli("import", str(tmp_path / "b"), home=home)
    real_push = replicate.push

    def push_until_the_manifest(target, source, files, dest, **kwargs):
        if any(f.startswith("manifests/") for f in files):
            raise ReplicationError("the link went down")  # the run dies at its commit point
        return real_push(target, source, files, dest, **kwargs)

    monkeypatch.setattr(replicate, "push", push_until_the_manifest)
    with open_archive(cfg.load(home), writer=True) as archive:
        report = replicate.replicate(archive)
    assert not report.verified and "link went down" in report.failure
    monkeypatch.undo()
    restored = tmp_path / "restored"
    result = run_cli("restore", "--from", str(home / "offsite"), "--key-file", str(home / "kek.key"), home=restored)
    assert "2 instances newer than the snapshot indexed" in result.stdout
    run_cli("export", second_uid, str(tmp_path / "out"), home=restored)
    assert _sha((tmp_path / "out").iterdir()) == _sha(second)
    assert run_cli("fsck", home=restored).returncode == 0


def test_old_manifests_go_by_count(home, tmp_path):
    set_config(home, "keep_manifests: 30", "keep_manifests: 2")
    for number in range(3):
        run_cli("import", str(make_study(tmp_path / f"s{number}", 1, patient_id=f"P{number}")[1][0].parent),
                home=home)
        run_cli("replicate", home=home)
    assert len(list((home / "offsite" / "manifests").iterdir())) == 2
    assert len(list((home / "offsite" / "snapshots").glob("*.index"))) == 2


def test_a_new_target_gets_everything_and_the_lag_says_so_meanwhile(home, tmp_path):
    make_study(tmp_path / "s", 3, patient_id="MOVE")
    run_cli("import", str(tmp_path / "s"), home=home)
    run_cli("replicate", home=home)
    assert json.loads(run_cli("status", "--json", home=home).stdout)["replication_lag_s"] is None
    set_config(home, "  target: offsite", "  target: rsync://127.0.0.1:1/gone")  # a NAS that is down
    assert run_cli("replicate", home=home, check=False).returncode != 0
    status = json.loads(run_cli("status", "--json", home=home).stdout)
    assert status["replication_lag_s"] > 0 and "replication-failed" in [a["key"] for a in status["alarms"]]
    set_config(home, "  target: rsync://127.0.0.1:1/gone", f"  target: {tmp_path / 'new-nas'}")
    report = json.loads(run_cli("replicate", "--json", home=home).stdout)
    assert report["objects_sent"] == 3 and report["verified"]
    status = json.loads(run_cli("status", "--json", home=home).stdout)
    assert status["replication_lag_s"] is None and status["alarms"] == []  # the failure alarm is cleared
    assert len(list((tmp_path / "new-nas" / "manifests").iterdir())) == 1
