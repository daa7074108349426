"""DICOM ingest and retrieval, side by side: pacs-vault against dcmtk's storescp and Orthanc.

Every peer runs as a plain process on a free loopback port with its data under
the same work directory (same file system), and every peer is driven by the same
client: dcmtk's storescu (one association, and 4 at once on a second CT study) /
getscu / movescu (to a dcmtk storescp) with TCP_NODELAY=1. Figures are reported as
ratios against the peers measured in the same run.

    python benchmarks/dicom_bench.py [--quick] [--ct N] [--small N] [--workdir DIR]

pacs-vault runs with its defaults: zstd, AES-256-GCM, durable acknowledgement (fsync
of the blob and a synced index commit before Success) and the audit trail (a durable
record per instance); once more with the trail off, to show what it costs. storescp writes
files without fsync; Orthanc is run with storage compression off and on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import corpus  # noqa: E402
from common import free_port, machine, run_and_report  # noqa: E402

CLIENT_AE = "BENCH"
DEST_AE = "BENCHDEST"  # a dcmtk storescp receiving C-MOVE sub-operations
PARALLEL = 4  # associations of the parallel variant
# dcmtk (storescp, the clients, and Orthanc, which is built on it) sets TCP_NODELAY only when
# told to; without it every DIMSE exchange waits ~40 ms for a delayed ACK.
NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def dcmtk(tool: str, *args: str) -> float:
    """Run a dcmtk client; return its wall-clock seconds. Dirty pages of the previous run are
    written back first, so that no peer pays for another's writes."""
    os.sync()
    start = time.perf_counter()
    result = subprocess.run([f"/usr/bin/{tool}", *args], capture_output=True, text=True, env=NODELAY_ENV)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{tool} failed: {result.stderr[-2000:]}")
    return elapsed


class Peer:
    name: str
    ae_title: str
    port: int
    process: subprocess.Popen
    supports_get = True

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    @property
    def rss_mb(self) -> float:
        return peak_rss_mb(self.process.pid)


class Vault(Peer):
    ae_title = "ARCHIVE"

    def __init__(self, work: Path, destination_port: int, audit: bool = True):
        """`audit=False`: the same with the audit trail off, to measure what the trail costs."""
        self.name = "pacs-vault" if audit else "pacs-vault (audit off)"
        self.home = work / ("vault" if audit else "vault-no-audit")
        appliance = [sys.executable, "-m", "appliance", "--home", str(self.home)]
        subprocess.run(appliance + ["init"], check=True, capture_output=True, cwd=REPO)
        if not audit:
            config = self.home / "appliance.yaml"
            config.write_text(config.read_text().replace("  enabled: true", "  enabled: false", 1))
        subprocess.run(appliance + ["ae", "add", CLIENT_AE, "127.0.0.1", str(free_port()), "--roles",
                                    "store,query,retrieve"], check=True, capture_output=True, cwd=REPO)
        subprocess.run(appliance + ["ae", "add", DEST_AE, "127.0.0.1", str(destination_port), "--roles",
                                    "move-destination"], check=True, capture_output=True, cwd=REPO)
        self.port = free_port()
        self.process = subprocess.Popen(appliance + ["serve", "--port", str(self.port)], cwd=REPO,
                                        stderr=open(self.home / "serve.log", "w"))
        wait_port(self.port)

    def stored_bytes(self) -> int:
        status = subprocess.run([sys.executable, "-m", "appliance", "--home", str(self.home), "status", "--json"],
                                check=True, capture_output=True, text=True, cwd=REPO)
        return json.loads(status.stdout)["stored_bytes"]


class Storescp(Peer):
    name, ae_title, supports_get = "dcmtk storescp", "STORESCP", False

    def __init__(self, work: Path):
        self.dir = work / "storescp"
        self.dir.mkdir()
        self.port = free_port()
        self.process = subprocess.Popen(["/usr/bin/storescp", "-aet", self.ae_title, "-od", str(self.dir),
                                         str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env=NODELAY_ENV)
        wait_port(self.port)

    def stored_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.rglob("*") if p.is_file())


class Orthanc(Peer):
    ae_title = "ORTHANC"

    def __init__(self, work: Path, compression: bool, destination_port: int):
        self.name = f"Orthanc (compression {'on' if compression else 'off'})"
        self.dir = work / f"orthanc-{'z' if compression else 'plain'}"
        self.dir.mkdir()
        self.port, self.http = free_port(), free_port()
        config = {
            "Name": "bench", "StorageDirectory": str(self.dir / "storage"), "IndexDirectory": str(self.dir / "index"),
            "StorageCompression": compression, "HttpPort": self.http, "DicomPort": self.port,
            "DicomAet": self.ae_title, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True,
            "DicomModalities": {"bench": [CLIENT_AE, "127.0.0.1", free_port()],
                                "dest": [DEST_AE, "127.0.0.1", destination_port]},
            "Plugins": [], "HttpServerEnabled": True, "HttpDescribeErrors": False,
        }
        path = self.dir / "orthanc.json"
        path.write_text(json.dumps(config))
        self.process = subprocess.Popen([ORTHANC, str(path)], stdout=subprocess.DEVNULL,
                                        stderr=open(self.dir / "orthanc.log", "w"), env=NODELAY_ENV)
        wait_port(self.port)
        wait_port(self.http)

    def stored_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.dir / "storage").rglob("*") if p.is_file())

    def statistics(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/statistics", timeout=10) as response:
            return json.loads(response.read())


def storescu(peer: Peer, files: list[Path]) -> float:
    return dcmtk("storescu", "-aet", CLIENT_AE, "-aec", peer.ae_title, "127.0.0.1", str(peer.port),
                 *map(str, files))


def storescu_parallel(peer: Peer, files: list[Path]) -> float:
    """PARALLEL storescu processes at once, each with its share of `files`; wall-clock seconds."""
    os.sync()
    shares = [files[n::PARALLEL] for n in range(PARALLEL)]
    start = time.perf_counter()
    clients = [subprocess.Popen(["/usr/bin/storescu", "-aet", CLIENT_AE, "-aec", peer.ae_title, "127.0.0.1",
                                 str(peer.port), *map(str, share)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=NODELAY_ENV) for share in shares if share]
    for client in clients:
        if client.wait() != 0:
            raise RuntimeError(f"storescu failed: {client.stderr.read().decode()[-2000:]}")
    return time.perf_counter() - start


def movescu(peer: Peer, study_uid: str) -> float:
    return dcmtk("movescu", "-S", "-aet", CLIENT_AE, "-aec", peer.ae_title, "-aem", DEST_AE, "127.0.0.1",
                 str(peer.port), "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}")


def getscu(peer: Peer, study_uid: str, out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    return dcmtk("getscu", "-S", "-aet", CLIENT_AE, "-aec", peer.ae_title, "127.0.0.1", str(peer.port),
                 "-od", str(out), "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}")


def run(work: Path, ct_count: int, small_count: int) -> dict:
    ct = corpus.ct_study(work / "corpus" / "ct", ct_count)
    ct_parallel = corpus.ct_study(work / "corpus" / "ct-parallel", ct_count, patient_id="PV0009", seed=11)
    small = corpus.small_instances(work / "corpus" / "small", small_count)
    ct_bytes = sum(p.stat().st_size for p in ct)
    ct_bytes_parallel = sum(p.stat().st_size for p in ct_parallel)
    small_bytes = sum(p.stat().st_size for p in small)
    import pydicom
    study_uid = pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID

    # The trail's cost: the same server with the trail off, measured first (the place that pays
    # for anything left over from generating the corpus), then with it on.
    destination_dir = work / "moved"
    destination_dir.mkdir()
    destination_port = free_port()
    destination = subprocess.Popen(["/usr/bin/storescp", "-aet", DEST_AE, "-od", str(destination_dir),
                                    str(destination_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env=NODELAY_ENV)
    peers: list[Peer] = [Vault(work, destination_port, audit=False), Vault(work, destination_port), Storescp(work)]
    if Path(ORTHANC).exists():
        peers += [Orthanc(work, False, destination_port), Orthanc(work, True, destination_port)]
    results = {"machine": machine(), "corpus": {"ct_instances": len(ct), "ct_bytes": ct_bytes,
                                                "small_instances": len(small), "small_bytes": small_bytes},
               "peers": {}}
    try:
        for peer in peers:
            row = {}
            seconds = storescu(peer, ct)
            row["ct_ingest_mb_s"] = ct_bytes / seconds / 1e6
            row["ct_ingest_inst_s"] = len(ct) / seconds
            seconds = storescu_parallel(peer, ct_parallel)
            row["ct_parallel_ingest_mb_s"] = ct_bytes_parallel / seconds / 1e6
            row["ct_parallel_ingest_inst_s"] = len(ct_parallel) / seconds
            seconds = storescu(peer, small)
            row["small_ingest_inst_s"] = len(small) / seconds
            row["stored_over_received"] = peer.stored_bytes() / (ct_bytes + ct_bytes_parallel + small_bytes)
            if peer.supports_get:
                seconds = getscu(peer, study_uid, work / "get" / peer.name.replace(" ", "_"))
                row["ct_get_mb_s"] = ct_bytes / seconds / 1e6
                seconds = movescu(peer, study_uid)
                row["ct_move_mb_s"] = ct_bytes / seconds / 1e6
            row["peak_rss_mb"] = peer.rss_mb
            results["peers"][peer.name] = row
    finally:
        for peer in peers:
            peer.stop()
        destination.terminate()
        destination.wait()
    vault = results["peers"]["pacs-vault"]
    ratios = {}
    for name, row in results["peers"].items():
        if name == "pacs-vault":
            continue
        for key in ("ct_ingest_mb_s", "ct_ingest_inst_s", "ct_parallel_ingest_mb_s", "small_ingest_inst_s",
                    "ct_get_mb_s", "ct_move_mb_s"):
            if key in row and key in vault:
                ratios[f"{key} vs {name}"] = vault[key] / row[key]
    results["ratios"] = ratios
    return results


def markdown(results: dict) -> str:
    keys = ("ct_ingest_mb_s", "ct_ingest_inst_s", "ct_parallel_ingest_mb_s", "small_ingest_inst_s", "ct_get_mb_s",
            "ct_move_mb_s", "stored_over_received", "peak_rss_mb")
    lines = ["| peer | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in results["peers"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.2f}" if k in row else "-" for k in keys) + " |")
    lines += ["", "| pacs-vault ratio | value |", "|---|---|"]
    lines += [f"| {key} | {value:.2f} |" for key, value in results["ratios"].items()]
    corpus_info = results["corpus"]
    lines += ["", f"CT: {corpus_info['ct_instances']} instances, {corpus_info['ct_bytes'] / 1e6:.1f} MB; "
                  f"small: {corpus_info['small_instances']} instances of ~10 KB. Machine: {results['machine']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny corpus: every path, no meaningful numbers")
    parser.add_argument("--ct", type=int, default=200)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    ct_count, small_count = (10, 20) if args.quick else (args.ct, args.small)
    return run_and_report("dicom", args.workdir, lambda work: run(work, ct_count, small_count), markdown)


if __name__ == "__main__":
    raise SystemExit(main())
