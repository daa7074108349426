"""Faults against the core store, through the real CLI: kill -9, a full disk, tampered copies,
key files gone wrong, a bad YAML file, and plaintext that must never reach the disk."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys

import pydicom
import pytest

import corpus
from conftest import REPO, run_cli, small_volume


def _sop(path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


def _blob_files(home):
    return sorted(p for p in (home / "hot").rglob("*") if p.is_file() and ".incoming" not in p.parts
                  and len(p.name) == 32)


@pytest.fixture(scope="module")
def long_study(tmp_path_factory):
    return corpus.ct_study(tmp_path_factory.mktemp("long"), 150, seed=11)


@pytest.mark.parametrize("kill_after", [1, 40, 110])
def test_kill9_during_import_loses_no_reported_instance(tmp_path, long_study, kill_after):
    home = tmp_path / "home"
    run_cli("init", home=home)
    process = subprocess.Popen([sys.executable, "-m", "appliance", "--home", str(home), "import",
                                str(long_study[0].parent)], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    reported = []
    for line in process.stderr:
        event = json.loads(line)
        if event["event"] == "import.stored":
            reported.append(event["path"])
            if len(reported) >= kill_after:
                process.send_signal(signal.SIGKILL)
                break
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert run_cli("fsck", home=home).returncode == 0  # clean, whatever the kill left behind
    study = pydicom.dcmread(long_study[0], stop_before_pixels=True).StudyInstanceUID
    out = tmp_path / "out"
    run_cli("export", study, str(out), home=home)
    for path in reported:
        assert (out / f"{_sop(path)}.dcm").read_bytes() == open(path, "rb").read()
    for path in out.glob("*.dcm"):  # nothing half-stored became visible
        assert path.read_bytes() in {p.read_bytes() for p in long_study if _sop(p) == path.stem}
    # the store goes on working: the same import completes
    run_cli("import", str(long_study[0].parent), home=home)
    shutil.rmtree(out)
    run_cli("export", study, str(out), home=home)
    assert sorted(p.read_bytes() for p in out.glob("*.dcm")) == sorted(p.read_bytes() for p in long_study)
    assert not list((home / "hot" / ".incoming").iterdir())


def test_full_disk_import_stops_cleanly_and_resumes(tmp_path, long_study):
    with small_volume(tmp_path / "small", "8m") as mount:
        home = mount / "home"
        run_cli("init", home=home)
        files = long_study[:60]
        result = run_cli("import", *map(str, files), home=home, check=False)
        assert result.returncode != 0
        # log lines (stderr is not a TTY), then the one line for a human
        # (index and blobs share this volume: whichever write meets the full disk first says so)
        assert re.fullmatch(r"appliance: import stopped: out of space on the (data volume \((write|\d+ MB free)\)"
                            r"|index volume; nothing was committed)", result.stderr.strip().splitlines()[-1])
        status = json.loads(run_cli("status", "--json", home=home).stdout)
        assert 0 < status["instances"] < len(files)
        assert run_cli("fsck", home=home).returncode == 0
        assert not list((home / "hot" / ".incoming").iterdir())
        subprocess.run(["mount", "-o", "remount,size=128m", str(mount)], check=True)
        run_cli("import", *map(str, files), home=home)
        out = tmp_path / "out"
        run_cli("export", pydicom.dcmread(files[0]).StudyInstanceUID, str(out), home=home)
        assert sorted(p.read_bytes() for p in out.glob("*.dcm")) == sorted(p.read_bytes() for p in files)
        assert run_cli("audit", "verify", home=home).returncode == 0


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset if offset >= 0 else len(data) + offset] ^= 0x10
    path.write_bytes(bytes(data))


TAMPERING = {
    "bit flip in the header": lambda p, other: _flip(p, 20),
    "bit flip in the middle": lambda p, other: _flip(p, p.stat().st_size // 2),
    "bit flip in the last byte": lambda p, other: _flip(p, -1),
    "truncated by one byte": lambda p, other: p.write_bytes(p.read_bytes()[:-1]),
    "truncated to half": lambda p, other: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "truncated to nothing": lambda p, other: p.write_bytes(b""),
    "extended by a byte": lambda p, other: p.write_bytes(p.read_bytes() + b"\0"),
    "extended by a segment": lambda p, other: p.write_bytes(p.read_bytes() + b"\0" * (1 << 20)),
    "swapped with another blob": lambda p, other: p.write_bytes(other.read_bytes()),
    "deleted": lambda p, other: p.unlink(),
}


@pytest.mark.parametrize("damage", sorted(TAMPERING))
def test_tampered_copy_is_never_exported(tmp_path, ct_files, damage):
    home = tmp_path / "home"
    run_cli("init", home=home)
    run_cli("import", *map(str, ct_files[:3]), home=home)
    blobs = _blob_files(home)
    victim, other = blobs[0], blobs[1]
    TAMPERING[damage](victim, other)
    out = tmp_path / "out"
    result = run_cli("export", pydicom.dcmread(ct_files[0]).StudyInstanceUID, str(out), home=home, check=False)
    assert result.returncode != 0 and "failed verification" in result.stderr
    exported = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(exported) == 2  # the two intact instances, and nothing else (no partial file)
    originals = {f"{_sop(p)}.dcm": p.read_bytes() for p in ct_files[:3]}
    for name, data in exported.items():
        assert originals[name] == data
    check = run_cli("fsck", home=home, check=False)
    assert check.returncode != 0
    assert ("missing" in check.stdout) if damage == "deleted" else ("sealed-bytes hash" in check.stdout
                                                                    or "bytes, expected" in check.stdout)


def test_blob_from_another_home_is_refused(tmp_path, ct_files):
    homes = [tmp_path / "a", tmp_path / "b"]
    for home in homes:
        run_cli("init", home=home)
        run_cli("import", str(ct_files[0]), home=home)
    [mine], [theirs] = _blob_files(homes[0]), _blob_files(homes[1])
    mine.write_bytes(theirs.read_bytes())  # same instance, sealed under the other home's key
    result = run_cli("export", pydicom.dcmread(ct_files[0]).StudyInstanceUID, str(tmp_path / "out"),
                     home=homes[0], check=False)
    assert result.returncode != 0 and not list((tmp_path / "out").glob("*.dcm"))


def test_canary_never_reaches_the_disk_in_plaintext(tmp_path):
    files = corpus.ct_study(tmp_path / "in", 3, patient_name="CANARY^XYZZYPLUGH", patient_id="CANARYID123")
    home = tmp_path / "home"
    outputs = [run_cli("init", home=home), run_cli("import", *map(str, files), home=home),
               run_cli("status", home=home), run_cli("keys", "status", home=home), run_cli("fsck", home=home)]
    pixels = pydicom.dcmread(files[0]).PixelData[4096:4160]
    needles = [b"CANARY^XYZZYPLUGH", b"CANARYID123", "CANARY^XYZZYPLUGH".encode("utf-16-le"), pixels]
    kek_line = next(line for line in (home / "kek.key").read_text().splitlines() if line.startswith("key: "))
    key_material = kek_line.split(": ", 1)[1].encode()
    scanned = 0
    for path in home.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        # The index holds PHI by design, the audit trail patient IDs (who accessed whose images);
        # nothing else may, and no patient name or pixel goes anywhere but the index.
        allowed = {"index": needles, "trail": [b"CANARYID123"]}.get(path.parent.name, [])
        for needle in needles:
            if needle not in allowed:
                assert needle not in data, (path, needle[:20])
        if path.name != "kek.key":
            assert key_material not in data, path
        scanned += 1
    assert scanned > 5
    for result in outputs:
        assert key_material.decode() not in result.stdout + result.stderr
        assert "CANARY" not in result.stdout + result.stderr
    assert stat.S_IMODE((home / "kek.key").stat().st_mode) == 0o600


def test_missing_wrong_or_open_key_file_is_refused(tmp_path, ct_files):
    home, other = tmp_path / "home", tmp_path / "other"
    run_cli("init", home=home)
    run_cli("init", home=other)
    run_cli("import", str(ct_files[0]), home=home)
    def holdings():  # what the archive holds (free space on the shared disk moves by itself)
        status = json.loads(run_cli("status", "--json", home=home).stdout)
        return {k: v for k, v in status.items()
                if k not in ("tiers", "alarms", "state", "replication_lag_s", "audit")}  # the trail records each try

    before = holdings()
    key = home / "kek.key"
    saved = key.read_bytes()

    key.unlink()
    for args in (["status"], ["import", str(ct_files[1])], ["export", "1.2.3", str(tmp_path / "x")]):
        result = run_cli(*args, home=home, check=False)
        assert result.returncode == 77 and f"key file {key} is missing" in result.stderr
    shutil.copy(other / "kek.key", key)
    os.chmod(key, 0o600)
    wrong = run_cli("status", home=home, check=False)
    assert wrong.returncode == 77 and "wrong key file" in wrong.stderr
    key.write_bytes(saved)
    os.chmod(key, 0o644)
    loose = run_cli("status", home=home, check=False)
    assert loose.returncode == 77 and "chmod 600" in loose.stderr
    os.chmod(key, 0o600)
    assert holdings() == before  # nothing changed meanwhile


def test_interrupted_rotation_is_undone_or_finished(tmp_path, ct_files):
    from appliance.store.keys import Kek, write_key_file

    home = tmp_path / "home"
    run_cli("init", home=home)
    run_cli("import", str(ct_files[0]), home=home)
    # A rotation killed before its keyring commit leaves a new key file that nothing uses: undone.
    write_key_file(home / "kek.key.new", Kek.generate())
    run_cli("status", home=home)
    assert not (home / "kek.key.new").exists()
    # A rotation killed after its commit, before the files moved: finished at the next open.
    from appliance import config as cfg
    from appliance.store.keys import Keyring
    keyring = Keyring(home / "keyring", home / "kek.key")
    old_id, new_id, _ = keyring.rotate()
    keyring.close()
    retired = home / "retired-keys" / f"kek-{old_id.hex()}.key"
    os.replace(home / "kek.key", home / "kek.key.new")  # as if the new key never moved in
    os.replace(retired, home / "kek.key")  # and the old one never moved out
    status = json.loads(run_cli("keys", "status", "--json", home=home).stdout)
    assert status["kek_id"] == new_id.hex() and retired.exists() and not (home / "kek.key.new").exists()
    out = tmp_path / "out"
    run_cli("export", pydicom.dcmread(ct_files[0]).StudyInstanceUID, str(out), home=home)
    assert [p.read_bytes() for p in out.glob("*.dcm")] == [ct_files[0].read_bytes()]
    assert cfg.load(home).key_file.exists()


def test_bad_yaml_is_one_line_with_file_and_line_and_changes_nothing(tmp_path):
    home = tmp_path / "home"
    run_cli("init", home=home)
    config = home / "appliance.yaml"
    lines = config.read_text().splitlines()
    number = next(i for i, line in enumerate(lines, 1) if line.strip().startswith("compression_level"))
    lines[number - 1] = "  compression_level: [3"
    config.write_text("\n".join(lines) + "\n")
    snapshot = {p: p.stat().st_mtime_ns for p in home.rglob("*") if p.is_file()}
    result = run_cli("import", str(tmp_path), home=home, check=False)
    assert result.returncode == 78
    [line] = result.stderr.strip().splitlines()
    assert f"{config}:" in line and "invalid YAML" in line
    assert int(line.split(f"{config}:")[1].split(":")[0]) >= number
    assert snapshot == {p: p.stat().st_mtime_ns for p in home.rglob("*") if p.is_file()}
