"""Power cuts under the appliance: the whole home (hot tier, index, keyring, audit trail, spool,
cold tier, off-site copy) on the power-cut file system, the power cut at random moments of
import, C-STORE, policy apply, scrub repair, keys rotate, restore and audit appends. After
every cut, the appliance starts again and: fsck is clean, every acknowledged instance
exports byte-exact, nothing is exported that was not sent, and the trail verifies (or names
only records after its signed head)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pydicom
import pytest
from common import storescu_acknowledged
from conftest import REPO, make_study, run_cli
from support.dicom_server import CLIENT_AE, DCMTK, Server, dataset_bytes, register
from support.powercut import DROP_ALL, RANDOM

from appliance.config import RESTORE_MARKER

MODES = (DROP_ALL, RANDOM)


def _sop(path: Path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


class Ledger:
    """What the appliance was given and what it acknowledged, per study. `content` is what
    must come back: the whole file when imported, the data set when sent over DICOM (the
    archive writes its own file meta)."""

    def __init__(self, content=Path.read_bytes):
        self.content = content
        self.sent: dict[str, dict[str, bytes]] = {}  # study -> SOP Instance UID -> content
        self.acknowledged: dict[str, bytes] = {}  # SOP Instance UID -> content

    def send(self, files: list[Path]) -> None:
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            self.sent.setdefault(ds.StudyInstanceUID, {})[ds.SOPInstanceUID] = self.content(path)

    def acknowledge(self, path: Path) -> None:
        self.acknowledged[_sop(path)] = self.content(path)


def _check(home: Path, ledger: Ledger, out: Path, what: str) -> None:
    """The appliance after a cut: fsck clean, acknowledged instances byte-exact, nothing else
    half-visible, the trail intact but for an unsigned tail."""
    fsck = json.loads(run_cli("fsck", "--json", home=home).stdout)
    assert fsck["clean"], f"{what}: fsck found {fsck['errors']}"
    exported: dict[str, bytes] = {}
    for study, instances in ledger.sent.items():
        dest = out / study
        shutil.rmtree(dest, ignore_errors=True)
        result = run_cli("export", study, str(dest), home=home, check=False)
        acknowledged = [sop for sop in instances if sop in ledger.acknowledged]
        if result.returncode == 66 and not acknowledged:
            continue  # nothing of the study was acknowledged, and nothing of it is indexed
        assert result.returncode == 0, f"{what}: export of {study} failed: {result.stderr}"
        for path in dest.glob("*.dcm"):
            exported[path.stem] = ledger.content(path)
            assert instances.get(path.stem) == exported[path.stem], f"{what}: {path.stem} exported, never sent as such"
    lost = [sop for sop, data in ledger.acknowledged.items() if exported.get(sop) != data]
    assert not lost, f"{what}: {len(lost)} acknowledged instances lost or changed"
    _audit_verifies(home, what)


def _audit_verifies(home: Path, what: str) -> None:
    result = run_cli("audit", "verify", "--json", home=home, check=False)
    verification = json.loads(result.stdout)
    unexpected = [p for p in verification["problems"] if "come after the signed head" not in p]
    assert not unexpected, f"{what}: the audit trail does not verify: {unexpected}"


@pytest.fixture
def vault(powercut, tmp_path):
    """An initialised home on the power-cut mount (init makes it durable), and a ledger."""
    home = powercut.path / "home"
    run_cli("init", home=home)
    return home, Ledger()


def _imported(home: Path, ledger: Ledger, directory: Path, count: int) -> None:
    """A study of `count` instances imported (and so acknowledged) before the cuts begin."""
    files = _rounds(directory, 1, count)[0]
    ledger.send(files)
    run_cli("import", *map(str, files), home=home)
    for path in files:
        ledger.acknowledge(path)


def _rounds(directory: Path, rounds: int, per_round: int) -> list[list[Path]]:
    """One study (so one export checks it all), its instances sent `per_round` at a time."""
    files = make_study(directory, rounds * per_round, pixels=96)[1]
    return [files[n * per_round:(n + 1) * per_round] for n in range(rounds)]


def _cut(powercut, round_: int) -> str:
    mode = MODES[round_ % 2]
    report = powercut.cut(mode=mode, seed=round_)
    return f"cut {round_} ({mode}, killed {sorted(report.killed.values())})"


def test_import(vault, powercut, tmp_path):
    home, ledger = vault
    rng = random.Random(1)
    for round_, files in enumerate(_rounds(tmp_path / "in", 2, 12)):
        ledger.send(files)
        process = subprocess.Popen([sys.executable, "-m", "appliance", "--home", str(home), "import",
                                    *map(str, files)], cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        stop_after = rng.randint(1, len(files) - 1)
        stored = []
        for line in process.stderr:
            if line.startswith("{") and json.loads(line)["event"] == "import.stored":
                stored.append(Path(json.loads(line)["path"]))
                if len(stored) >= stop_after:
                    break
        what = _cut(powercut, round_)
        process.wait()
        for path in stored:  # a file is acknowledged once the import reported it stored
            ledger.acknowledge(path)
        _check(home, ledger, tmp_path / "out", what)
        run_cli("import", *map(str, files), home=home)  # and the same import runs to the end
        for path in files:
            ledger.acknowledge(path)


def test_c_store_over_parallel_associations(vault, powercut, tmp_path):
    home, _ = vault
    ledger = Ledger(dataset_bytes)
    rng = random.Random(2)
    register(home, CLIENT_AE, 1, "store")
    for round_, files in enumerate(_rounds(tmp_path / "in", 3, 12)):
        ledger.send(files)
        server = Server(home, log_dir=tmp_path).start()
        logs = [tmp_path / f"storescu-{round_}-{n}.log" for n in range(3)]
        clients = [subprocess.Popen([str(DCMTK / "storescu"), "-v", "-aet", CLIENT_AE, "-aec", "ARCHIVE",
                                     "127.0.0.1", str(server.port), *map(str, files[n::3])],
                                    stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                    env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}) for n, log in enumerate(logs)]
        cut_after = rng.randint(1, len(files) - 2)
        deadline = time.monotonic() + 120
        while sum(len(storescu_acknowledged(log)) for log in logs) < cut_after and time.monotonic() < deadline:
            if all(client.poll() is not None for client in clients):
                break
            time.sleep(0.01)
        what = _cut(powercut, round_)
        server.process.wait()
        for client in clients:
            client.wait(60)
        for log in logs:
            for path in storescu_acknowledged(log):
                ledger.acknowledge(path)
        _check(home, ledger, tmp_path / "out", what)


def _policy_to_cold(home: Path, keep_hot: bool) -> None:
    """Migrate every study to the filesystem cold tier now (the policy's days set to 0)."""
    (home / "policies" / "default.yaml").write_text(
        "classes:\n  - name: everything\n    match: {}\n    retention: {years_after_study: 10}\n"
        f"    transitions:\n      - {{after_days: 0, to: [cold], keep_hot: {str(keep_hot).lower()}}}\n"
        "    at_expiry: review\n")
    run_cli("policy", "check", home=home)


def _run_and_cut(powercut, home: Path, args: list[str], delay: float, round_: int) -> tuple[str, int | None]:
    """Start an appliance command, cut the power `delay` seconds later; (what, its exit code
    if it finished before the cut)."""
    process = subprocess.Popen([sys.executable, "-m", "appliance", "--home", str(home), *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    finished = process.poll()
    what = _cut(powercut, round_) + f" {delay:.2f} s into {' '.join(args)}"
    process.wait()
    return what, finished


def test_policy_apply_to_a_cold_tier(vault, powercut, tmp_path):
    home, ledger = vault
    rng = random.Random(3)
    _policy_to_cold(home, keep_hot=False)
    for round_, files in enumerate(_rounds(tmp_path / "in", 2, 8)):
        ledger.send(files)
        run_cli("import", *map(str, files), home=home)
        for path in files:
            ledger.acknowledge(path)
        what, _ = _run_and_cut(powercut, home, ["policy", "apply"], rng.uniform(0.5, 2.0), round_)
        _check(home, ledger, tmp_path / "out", what)
        run_cli("policy", "apply", home=home)  # starts again and finishes


def _damage_a_hot_copy(home: Path, rng: random.Random) -> None:
    import os

    blobs = sorted(p for p in (home / "hot").rglob("*") if p.is_file() and ".incoming" not in p.parts)
    victim = rng.choice(blobs)
    with open(victim, "r+b") as fp:
        fp.seek(200)
        byte = fp.read(1)
        fp.seek(200)
        fp.write(bytes([byte[0] ^ 0x10]))
        fp.flush()
        os.fsync(fp.fileno())  # bit rot is durable


def test_scrub_repair(vault, powercut, tmp_path):
    home, ledger = vault
    rng = random.Random(4)
    _policy_to_cold(home, keep_hot=True)
    _imported(home, ledger, tmp_path / "in", 16)
    run_cli("policy", "apply", home=home)
    for round_ in range(2):
        _damage_a_hot_copy(home, rng)
        what, _ = _run_and_cut(powercut, home, ["scrub", "--deep"], rng.uniform(0.4, 1.5), round_)
        run_cli("scrub", "--deep", home=home)  # a scrub starts again and finishes the repair
        _check(home, ledger, tmp_path / "out", what)


def test_keys_rotate(vault, powercut, tmp_path):
    home, ledger = vault
    rng = random.Random(5)
    _imported(home, ledger, tmp_path / "in", 8)
    for round_ in range(2):
        what, _ = _run_and_cut(powercut, home, ["keys", "rotate"], rng.uniform(0.3, 1.0), round_)
        run_cli("keys", "status", home=home)
        _check(home, ledger, tmp_path / "out", what)


def test_restore_from_an_off_site_copy(vault, powercut, tmp_path):
    home, ledger = vault
    rng = random.Random(6)
    _imported(home, ledger, tmp_path / "in", 12)
    run_cli("replicate", home=home)
    key = tmp_path / "kek.key"  # the key file, kept apart from the data as the README says
    key.write_bytes((home / "kek.key").read_bytes())
    key.chmod(0o600)
    for round_ in range(2):
        restored = powercut.path / f"restored-{round_}"
        what, _ = _run_and_cut(powercut, restored, ["restore", "--from", str(home / "offsite"), "--key-file",
                                                    str(key)], rng.uniform(0.5, 2.5), round_)
        if (restored / RESTORE_MARKER).exists() or not (restored / "appliance.yaml").exists():
            # cut before it finished: the same restore starts again (a finished one refuses to)
            run_cli("restore", "--from", str(home / "offsite"), "--key-file", str(key), home=restored)
        _check(restored, ledger, tmp_path / "out", what)


APPENDER = """
    import sys
    from pathlib import Path
    from appliance.audit.events import EventID, event
    from appliance.audit.trail import AuditTrail
    trail = AuditTrail(Path(sys.argv[1]), Path(sys.argv[2]))
    for n in range(100000):
        trail.record(event(EventID.QUERY, op="powercut-test", writer=sys.argv[3], n=n))
        print(n, flush=True)
"""


def test_audit_appends_from_concurrent_writers(vault, powercut, tmp_path):
    home, _ = vault
    rng = random.Random(7)
    for round_ in range(3):
        writers = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(APPENDER), str(home / "audit"),
                                     str(home / "audit.key"), f"{round_}-{n}"], cwd=REPO, stdout=subprocess.PIPE,
                                    text=True) for n in range(2)]
        for writer in writers:
            writer.stdout.readline()
        time.sleep(rng.uniform(0.05, 0.5))
        what = _cut(powercut, round_)
        acknowledged = {f"{round_}-{n}": int(lines[-1]) if (lines := writer.stdout.read().split()) else 0
                        for n, writer in enumerate(writers)}
        for writer in writers:
            writer.wait()
        _audit_verifies(home, what)
        export = run_cli("audit", "export", "--format", "json", home=home).stdout
        seen: dict[str, set[int]] = {}
        for line in export.splitlines():
            record = json.loads(line)
            if record["op"] == "powercut-test":
                seen.setdefault(record["detail"]["writer"], set()).add(record["detail"]["n"])
        for writer, last in acknowledged.items():
            assert set(range(last + 1)) <= seen.get(writer, set()), f"{what}: acknowledged records of {writer} lost"
