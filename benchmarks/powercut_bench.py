"""Power cuts during C-STORE, counted: how many acknowledged instances does each archive lose?

    python benchmarks/powercut_bench.py [--quick] [--cuts N] [--per-cut N] [--archives LIST]
                                        [--modes LIST] [--workdir DIR] [--results DIR]

pacs-vault and Orthanc (its default configuration: SyncStorageArea true, SQLite index)
each run with their whole storage (pacs-vault's home; Orthanc's storage directory and
index) on the power-cut file system of the tests (tests/support/powercut.py). A campaign,
per archive and per cut mode (drop-all: every unsynced write and directory change is lost;
random: a seeded random subset of the unsynced 4 KB pages survives): start the archive,
send a batch of ~10 KB instances with two dcmtk `storescu -v` at once (TCP_NODELAY=1), cut
the power after a random number of Success responses, start the archive again, and look
for every instance acknowledged so far, in this cut and all before: pacs-vault by `appliance
export` (every byte verified), Orthanc by its REST API on 127.0.0.1 (/tools/lookup, then
the instance's file). An instance counts as lost when it is missing or its data set differs
from what was sent. An archive that does not start again after a cut loses everything; the
campaign then starts it afresh.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))
import corpus  # noqa: E402
from appliance.fsutil import sync_tree  # noqa: E402
from common import add_common_arguments, free_port, machine, run_and_report, storescu_acknowledged  # noqa: E402
from dicom_bench import NODELAY_ENV, ORTHANC, wait_port  # noqa: E402
from support.powercut import MODES, powercut_mount  # noqa: E402

CLIENT_AE = "BENCH"
CLIENTS = 2  # storescu processes at once
ARCHIVES = ("pacs-vault", "orthanc")


def dataset(data: bytes) -> bytes:
    """The data set of a Part 10 file, after its file meta (each archive writes its own)."""
    group_length = int.from_bytes(data[140:144], "little")  # (0002,0000) UL, explicit VR
    return data[144 + group_length:]


class Vault:
    name, ae_title = "pacs-vault", "ARCHIVE"

    def __init__(self, root: Path, logs: Path):
        self.home, self.logs = root / "home", logs
        self.process: subprocess.Popen | None = None

    def _cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "appliance", "--home", str(self.home), *args], cwd=REPO,
                              capture_output=True, text=True, check=check)

    def create(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)
        self._cli("init")
        self._cli("ae", "add", CLIENT_AE, "127.0.0.1", str(free_port()), "--roles", "store")

    def start(self) -> None:
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, "-m", "appliance", "--home", str(self.home), "serve",
                                         "--port", str(self.port)], cwd=REPO, stdout=subprocess.DEVNULL,
                                        stderr=open(self.logs / "vault.log", "ab"))
        wait_port(self.port, 60)

    def stored(self, study: str, sops: set[str], out: Path) -> dict[str, bytes]:
        """SOP Instance UID -> data set, of what it can hand back, verified."""
        shutil.rmtree(out, ignore_errors=True)
        self._cli("export", study, str(out), check=False)  # a failed instance is left out, and said so
        return {path.stem: dataset(path.read_bytes()) for path in out.glob("*.dcm") if path.stem in sops}


class Orthanc:
    name, ae_title = "Orthanc", "ORTHANC"

    def __init__(self, root: Path, logs: Path):
        self.dir, self.logs = root / "orthanc", logs
        self.process: subprocess.Popen | None = None

    def create(self) -> None:
        """A fresh Orthanc that has run once (its storage and index exist)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir()
        self.start()
        self.process.terminate()
        self.process.wait(60)

    def start(self) -> None:
        self.port, self.http = free_port(), free_port()
        config = {  # defaults otherwise: SyncStorageArea true, SQLite index
            "Name": "powercut", "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "index"), "HttpPort": self.http, "DicomPort": self.port,
            "DicomAet": self.ae_title, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "Plugins": [],
        }
        path = self.logs / "orthanc.json"  # outside the mount: the test never holds a file there
        path.write_text(json.dumps(config))
        self.process = subprocess.Popen([ORTHANC, str(path)], stdout=subprocess.DEVNULL,
                                        stderr=open(self.logs / "orthanc.log", "ab"), env=NODELAY_ENV, cwd="/")
        wait_port(self.port, 60)
        wait_port(self.http, 60)

    def _get(self, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=body)
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def stored(self, study: str, sops: set[str], out: Path) -> dict[str, bytes]:
        found = {}
        for sop in sops:
            matches = json.loads(self._get("/tools/lookup", sop.encode()))
            for match in matches:
                if match["Type"] == "Instance":
                    try:
                        found[sop] = dataset(self._get(f"/instances/{match['ID']}/file"))
                    except urllib.error.HTTPError:
                        pass  # indexed, unreadable from its storage: lost
        return found


def _settled(archive, mount) -> None:
    """Create the archive, make all of it durable (as minutes of running would: the cuts are
    about what it does while storing, not about its installation), and start it."""
    archive.create()
    sync_tree(mount.path)
    archive.start()


def _campaign(archive, mount, files: list[Path], sent: dict[str, bytes], study: str, cuts: int, per_cut: int,
              mode: str, logs: Path) -> dict:
    rng = random.Random(f"{archive.name}-{mode}")
    acknowledged: set[str] = set()
    lost: set[str] = set()
    row = {"cuts": 0, "acknowledged": 0, "lost": 0, "lost_per_cut": [], "did_not_start": 0}
    _settled(archive, mount)
    for cut in range(cuts):
        batch = files[cut * per_cut:(cut + 1) * per_cut]
        client_logs = [logs / f"storescu-{n}.log" for n in range(CLIENTS)]
        clients = [subprocess.Popen(["/usr/bin/storescu", "-v", "-aet", CLIENT_AE, "-aec", archive.ae_title,
                                     "127.0.0.1", str(archive.port), *map(str, batch[n::CLIENTS])],
                                    stdout=open(log, "w"), stderr=subprocess.STDOUT, env=NODELAY_ENV)
                   for n, log in enumerate(client_logs)]
        cut_after = rng.randint(1, len(batch) - 1)
        deadline = time.monotonic() + 60
        while sum(len(storescu_acknowledged(log)) for log in client_logs) < cut_after \
                and time.monotonic() < deadline and any(client.poll() is None for client in clients):
            time.sleep(0.005)
        mount.cut(mode=mode, seed=cut)
        archive.process.wait()
        for client in clients:
            client.wait(60)
        acknowledged |= {path.stem for log in client_logs for path in storescu_acknowledged(log)}
        try:
            archive.start()
        except RuntimeError:  # it does not start again: everything it held is lost
            row["did_not_start"] += 1
            if archive.process.poll() is None:
                archive.process.kill()
            archive.process.wait()
            lost |= acknowledged
            row["lost_per_cut"].append(len(acknowledged))
            _settled(archive, mount)
            acknowledged = set()
            continue
        stored = archive.stored(study, acknowledged, logs / "export")
        missing = {sop for sop in acknowledged if stored.get(sop) != sent[sop]}
        row["lost_per_cut"].append(len(missing - lost))
        lost |= missing
    archive.process.terminate()
    archive.process.wait(60)
    row["acknowledged"] = len(acknowledged | lost)
    row["lost"] = len(lost)
    row["cuts"] = cuts
    return row


def run(work: Path, cuts: int, per_cut: int, archives: list[str], modes: list[str]) -> dict:
    import pydicom

    named = []  # by SOP Instance UID, so that a storescu log names what was acknowledged
    for path in corpus.small_instances(work / "corpus", cuts * per_cut):
        named.append(path.rename(path.with_name(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
                                                + ".dcm")))
    sent = {path.stem: dataset(path.read_bytes()) for path in named}
    study = pydicom.dcmread(named[0], stop_before_pixels=True).StudyInstanceUID
    results = {"machine": machine(), "cuts": cuts, "per_cut": per_cut, "instance_bytes": named[0].stat().st_size,
               "rows": {}}
    makers = {"pacs-vault": Vault, "orthanc": Orthanc}
    for name in archives:
        for mode in modes:
            logs = work / f"logs-{name}-{mode}"
            logs.mkdir()
            with powercut_mount(work / f"mount-{name}-{mode}") as mount:
                archive = makers[name](mount.path, logs)
                started = time.monotonic()
                row = _campaign(archive, mount, named, sent, study, cuts, per_cut, mode, logs)
                row["seconds"] = time.monotonic() - started
                row["syncs"] = mount.stats()
            results["rows"][f"{name} {mode}"] = row
            print(f"{name} {mode}: {row['lost']} of {row['acknowledged']} acknowledged instances lost "
                  f"after {row['cuts']} cuts", flush=True)
    return results


def markdown(results: dict) -> str:
    rows = results["rows"]
    modes = [mode for mode in MODES if any(key.endswith(mode) for key in rows)]
    lines = ["| | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]

    def cell(name: str, mode: str) -> str:
        row = rows.get(f"{name} {mode}")
        if row is None:
            return "-"
        text = f"{row['lost']} of {row['acknowledged']}"
        return text + (f" (did not start {row['did_not_start']} times)" if row["did_not_start"] else "")

    lines.append(f"| acknowledged instances lost after {results['cuts']} power cuts: pacs-vault vs Orthanc | "
                 + " | ".join(f"{cell('pacs-vault', mode)} vs {cell('orthanc', mode)}" for mode in modes) + " |")
    lines += ["", "| archive, mode | cuts | acknowledged | lost | did not start | fsync | fdatasync | fsyncdir | "
                  "O_DSYNC writes | seconds |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, row in rows.items():
        syncs = row["syncs"]
        lines.append(f"| {key} | {row['cuts']} | {row['acknowledged']} | {row['lost']} | {row['did_not_start']} | "
                     f"{syncs['fsync']} | {syncs['fdatasync']} | {syncs['fsyncdir']} | {syncs['sync_writes']} | "
                     f"{row['seconds']:.0f} |")
    lines += ["", f"Each cut: {results['per_cut']} instances of ~{results['instance_bytes'] / 1000:.0f} KB sent "
                  f"over {CLIENTS} associations, the power cut after a random number of Success responses; "
                  "every instance acknowledged since the campaign began is looked for after every cut."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuts", type=int, default=300, help="power cuts per archive and mode")
    parser.add_argument("--per-cut", type=int, default=10, help="instances sent before each cut")
    parser.add_argument("--archives", default=",".join(ARCHIVES), help=f"comma-separated, of {', '.join(ARCHIVES)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    archives = [name.strip() for name in args.archives.split(",") if name.strip()]
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if set(archives) - set(ARCHIVES) or set(modes) - set(MODES):
        parser.error("unknown archive or mode")
    if not Path(ORTHANC).exists():
        archives = [name for name in archives if name != "orthanc"]
    cuts = 3 if args.quick else args.cuts
    return run_and_report("powercut", args, lambda work: run(work, cuts, args.per_cut, archives, modes), markdown)


if __name__ == "__main__":
    raise SystemExit(main())
