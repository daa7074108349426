"""The CLI contract, through the real command."""

import json
import os
import stat

import pydicom

from conftest import run_cli


def test_init_creates_the_documented_home(tmp_path):
    home = tmp_path / "h"
    result = run_cli("init", home=home)
    assert "key file" in result.stdout
    for name in ("appliance.yaml", "tiers/hot-raid.yaml", "tiers/cold-disk.yaml", "policies/default.yaml", "kek.key", "keyring/data.mdb", "index/data.mdb", "hot"):
        assert (home / name).exists(), name
    assert stat.S_IMODE((home / "kek.key").stat().st_mode) == 0o600
    again = run_cli("init", home=home, check=False)
    assert again.returncode != 0 and "already an appliance home" in again.stderr


def test_import_export_status_round_trip(tmp_path, home, ct_files):
    junk = tmp_path / "in" / "notes.txt"
    junk.parent.mkdir()
    junk.write_text("not an image")
    for path in ct_files[:4]:
        (tmp_path / "in" / path.name).write_bytes(path.read_bytes())
    result = run_cli("import", str(tmp_path / "in"), "--json", home=home, check=False)
    assert result.returncode == 1  # one file rejected
    summary = json.loads(result.stdout)
    assert summary["stored"] == 4 and summary["duplicates"] == 0
    assert summary["rejected"] == [{"path": str(junk), "reason": "not a DICOM file"}]
    *logged, reason = result.stderr.splitlines()
    assert sorted(json.loads(line)["event"] for line in logged) == ["import.rejected"] + ["import.stored"] * 4
    assert reason == "appliance: 1 of 5 files rejected"

    again = json.loads(run_cli("import", *map(str, ct_files[:4]), "--json", home=home).stdout)
    assert again["duplicates"] == 4 and again["stored"] == 0

    status = json.loads(run_cli("status", "--json", home=home).stdout)
    assert status["instances"] == 4 and status["studies"] == 1
    assert status["received_bytes"] == sum(p.stat().st_size for p in ct_files[:4])
    assert 0 < status["stored_ratio"] < 0.7
    assert status["keys"]["data_keys"] == 1

    study_uid = pydicom.dcmread(ct_files[0]).StudyInstanceUID
    dest = tmp_path / "out"
    run_cli("export", study_uid, str(dest), home=home)
    for path in ct_files[:4]:
        sop = pydicom.dcmread(path).SOPInstanceUID
        assert (dest / f"{sop}.dcm").read_bytes() == path.read_bytes()
    assert run_cli("fsck", home=home).returncode == 0


def test_appliance_home_environment_variable(home):
    result = run_cli("status", env={**os.environ, "APPLIANCE_HOME": str(home)})
    assert "0 instances" in result.stdout


def test_errors_are_one_line_with_nonzero_exit(tmp_path, home):
    for args, needle in ((["status"], "appliance init"), (["export", "1.2.3", str(tmp_path)], None)):
        target = tmp_path / "nothing" if needle else home
        result = run_cli(*args, home=target, check=False)
        assert result.returncode != 0
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("appliance: ")
        if needle:
            assert needle in result.stderr
    missing = run_cli("import", str(tmp_path / "absent.dcm"), home=home, check=False)
    assert missing.returncode != 0 and "no such file" in missing.stderr


def test_ae_registry_commands(home):
    run_cli("ae", "add", "PACS1", "127.0.0.1", "104", "--roles", "store,query", home=home)
    run_cli("ae", "add", "VIEWER", "127.0.0.1", "11113", "--roles", "move-destination", home=home)
    listed = json.loads(run_cli("ae", "list", "--json", home=home).stdout)
    assert {(r["ae_title"], r["port"], tuple(r["roles"])) for r in listed} == {
        ("PACS1", 104, ("store", "query")), ("VIEWER", 11113, ("move-destination",))}
    bad = run_cli("ae", "add", "X", "127.0.0.1", "1", "--roles", "admin", home=home, check=False)
    assert bad.returncode != 0 and "unknown role admin" in bad.stderr
    run_cli("ae", "remove", "PACS1", home=home)
    assert [r["ae_title"] for r in json.loads(run_cli("ae", "list", "--json", home=home).stdout)] == ["VIEWER"]
    missing = run_cli("ae", "remove", "PACS1", home=home, check=False)
    assert missing.returncode != 0


def test_keys_rotate_then_export(tmp_path, home, ct_files):
    run_cli("import", *map(str, ct_files[:2]), home=home)
    before = json.loads(run_cli("keys", "status", "--json", home=home).stdout)
    run_cli("keys", "rotate", home=home)
    after = json.loads(run_cli("keys", "status", "--json", home=home).stdout)
    assert after["kek_id"] != before["kek_id"] and after["data_keys"] == before["data_keys"] == 1
    assert (home / "retired-keys" / f"kek-{before['kek_id']}.key").exists()
    study_uid = pydicom.dcmread(ct_files[0]).StudyInstanceUID
    run_cli("export", study_uid, str(tmp_path / "out"), home=home)
    assert sorted(p.read_bytes() for p in (tmp_path / "out").iterdir()) == sorted(
        p.read_bytes() for p in ct_files[:2])


def test_fsck_rebuild_index_cli(home, ct_files):
    run_cli("import", *map(str, ct_files[:3]), home=home)
    before = json.loads(run_cli("status", "--json", home=home).stdout)
    result = run_cli("fsck", "--rebuild-index", home=home)
    assert "3 versions indexed" in result.stdout
    after = json.loads(run_cli("status", "--json", home=home).stdout)
    for key in ("patients", "studies", "series", "instances", "versions", "received_bytes", "stored_bytes"):
        assert after[key] == before[key], key


def test_import_shows_a_progress_bar_on_a_terminal(home, ct_files):
    import pty
    import subprocess
    import sys

    from conftest import REPO

    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "appliance", "--home", str(home), "import",
                                *map(str, ct_files[:3])], stdin=terminal, stdout=terminal, stderr=terminal,
                               cwd=REPO, close_fds=True)
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        output += chunk
    process.wait()
    os.close(controller)
    text = output.decode()
    assert process.returncode == 0
    assert "\rimport [" in text and "3/3 files" in text and "MB/s" in text
    assert '"event"' not in text  # no log lines on a terminal: the bar stands for them
