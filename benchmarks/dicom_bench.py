"""DICOM ingest and retrieval, side by side: pacs-vault against dcmtk's storescp and Orthanc.

Every peer runs as a plain process on a free loopback port with its data under
the same work directory (same file system), and every peer is driven by the same
client: dcmtk's storescu (one association, and 4 at once on a second CT study) /
getscu / movescu (to a dcmtk storescp) with TCP_NODELAY=1. Workloads: a CT study,
~10 KB instances, an MR series, one large multi-frame instance; pacs-vault also
stores and sends back one 2 GB instance. Transcoding: a CT study stored in JPEG 2000
lossless, taken back by a getscu proposing the uncompressed syntaxes only, explicit VR
little endian first (dcmtk's getscu cannot propose that one alone; every instance must
arrive in it), in MB/s of what arrives decoded; Orthanc decodes JPEG 2000 with its GDCM
plugin (Debian orthanc-gdcm, loaded into every Orthanc peer), as its DCMTK core cannot. Figures are reported as ratios against the
peers measured in the same run. The server's peak RSS is taken per phase (the high-water
mark is reset before each), over the server's processes.

In a pass of its own before, untimed (strace slows what it traces): pacs-vault, Orthanc
(compression off) and storescp, each fresh, store the CT study over one association while
strace counts the sync system calls of every thread of the server; reported per acknowledged
instance, with the time spent in them and what each peer makes durable before it answers.

    python benchmarks/dicom_bench.py [--quick] [--ct N] [--small N] [--mr N] [--multiframe-mb M]
                                     [--big-mb M] [--ct-j2k N] [--peers LIST] [--workdir DIR] [--results DIR]

pacs-vault runs with its defaults: zstd, AES-256-GCM, durable acknowledgement (fsync
of the blob and a synced index commit before Success) and the audit trail (a durable
record per instance); once more with the trail off, to show what it costs. storescp writes
files without fsync; Orthanc is run with storage compression off and on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import corpus  # noqa: E402
from common import (add_common_arguments, free_port, machine, reset_peak_rss, run_and_report,  # noqa: E402
                    server_processes, status_total)

CLIENT_AE = "BENCH"
DEST_AE = "BENCHDEST"  # a dcmtk storescp receiving C-MOVE sub-operations
PARALLEL = 4  # associations of the parallel variant
# dcmtk (storescp, the clients, and Orthanc, which is built on it) sets TCP_NODELAY only when
# told to; without it every DIMSE exchange waits ~40 ms for a delayed ACK.
NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
ORTHANC_GDCM = Path("/usr/share/orthanc/plugins/libOrthancGdcm.so")  # its JPEG 2000 decoder (transcoding)


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def dcmtk_client(tool: str, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([f"/usr/bin/{tool}", *args], capture_output=True, text=True, env=NODELAY_ENV,
                          timeout=timeout)


# What dcmtk clients log with -v for each response: storescu one per instance, findscu / getscu /
# movescu their final one (and Pending ones before it).
_RESPONSE = re.compile(r"Received (?:Final )?(?:Store|Find|Move|C-GET) Response(?: \d+)? \(([^)]*)\)")


def dimse_statuses(output: str) -> list[str]:
    """The statuses a dcmtk client run with -v received, Pending ones left out ("Success",
    "Warning: ...", "Error: CannotUnderstand", "Refused: MoveDestinationUnknown" ...)."""
    return [status for status in _RESPONSE.findall(output) if status != "Pending"]


def acknowledged(status: str) -> bool:
    return status == "Success" or status.startswith("Warning")


def dcmtk(tool: str, *args: str) -> float:
    """Run a dcmtk client; return its wall-clock seconds. Dirty pages of the previous run are
    written back first, so that no peer pays for another's writes."""
    os.sync()
    start = time.perf_counter()
    result = dcmtk_client(tool, *args)
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
        """Peak RSS since the last reset_peak_rss(), summed over the server's processes."""
        return status_total(server_processes(self.process.pid), "VmHWM") / 1024

    def reset_peak_rss(self) -> None:
        reset_peak_rss(server_processes(self.process.pid))


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
    name, supports_get = "dcmtk storescp", False

    def __init__(self, directory: Path, ae_title: str = "STORESCP"):
        """A storescp writing into `directory`: a peer, or the destination of C-MOVEs (DEST_AE)."""
        self.dir, self.ae_title = directory, ae_title
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.process = subprocess.Popen(["/usr/bin/storescp", "-aet", self.ae_title, "-od", str(self.dir),
                                         str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env=NODELAY_ENV)
        wait_port(self.port)

    def stored_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.rglob("*") if p.is_file())


class Orthanc(Peer):
    ae_title = "ORTHANC"

    def __init__(self, work: Path, compression: bool, destination_port: int, **settings):
        """`settings`: Orthanc options beside (or over) these (web_bench.py: the DICOMweb plugin)."""
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
            "Plugins": [str(ORTHANC_GDCM)] if ORTHANC_GDCM.exists() else [], "HttpServerEnabled": True,
            "HttpDescribeErrors": False, **settings,
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


def storescu(peer: Peer, files: list[Path], *options: str) -> float:
    return dcmtk("storescu", *options, "-aet", CLIENT_AE, "-aec", peer.ae_title, "127.0.0.1", str(peer.port),
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


def getscu(peer: Peer, study_uid: str, out: Path, *options: str) -> float:
    out.mkdir(parents=True, exist_ok=True)
    return dcmtk("getscu", "-S", *options, "-aet", CLIENT_AE, "-aec", peer.ae_title, "127.0.0.1", str(peer.port),
                 "-od", str(out), "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}")


PEERS = ("vault-no-audit", "vault", "storescp", "orthanc", "orthanc-z")
RATES = ("ct_ingest_mb_s", "ct_ingest_inst_s", "ct_parallel_ingest_mb_s", "ct_parallel_ingest_inst_s",
         "small_ingest_inst_s", "mr_ingest_mb_s", "mr_ingest_inst_s", "multiframe_ingest_mb_s",
         "ct_get_mb_s", "ct_move_mb_s", "multiframe_get_mb_s", "ct_j2k_get_mb_s")


def _make_peers(work: Path, names: list[str], destination_port: int) -> list[Peer]:
    # The trail's cost: the same server with the trail off is measured first (the place that
    # pays for anything left over from generating the corpus), then with it on.
    makers = {"vault-no-audit": lambda: Vault(work, destination_port, audit=False),
              "vault": lambda: Vault(work, destination_port),
              "storescp": lambda: Storescp(work / "storescp"),
              "orthanc": lambda: Orthanc(work, False, destination_port),
              "orthanc-z": lambda: Orthanc(work, True, destination_port)}
    if not Path(ORTHANC).exists():
        names = [n for n in names if not n.startswith("orthanc")]
    return [makers[name]() for name in PEERS if name in names]


def _rate(row: dict, prefix: str, files: list[Path], seconds: float) -> None:
    row[f"{prefix}_mb_s"] = sum(p.stat().st_size for p in files) / seconds / 1e6
    row[f"{prefix}_inst_s"] = len(files) / seconds


def _check_received(directory: Path, expected: int, what: str) -> None:
    """A retrieval is timed only when everything arrived (a client may exit 0 on failed sub-operations)."""
    count = sum(1 for path in directory.rglob("*") if path.is_file())
    if count != expected:
        raise RuntimeError(f"{what}: {count} of {expected} instances arrived")


INGESTS = ("ct", "ct_parallel", "small", "mr", "multiframe")
RSS_PHASES = INGESTS + ("retrieve", "big")  # the server's peak RSS is taken for each


def _measure(peer: Peer, work: Path, studies: dict, moved: Path) -> dict:
    row: dict = {}
    rss = row["peak_rss_mb_by_phase"] = {}
    for name in INGESTS:
        files = studies[name]
        peer.reset_peak_rss()
        seconds = storescu_parallel(peer, files) if name == "ct_parallel" else storescu(peer, files)
        rss[name] = peer.rss_mb
        _rate(row, f"{name}_ingest", files, seconds)
        if name == "ct":  # everything stored so far is the CT study: the goal's ratio, on its own
            row["ct_stored_over_received"] = peer.stored_bytes() / studies["bytes"]["ct"]
    row["stored_over_received"] = peer.stored_bytes() / sum(studies["bytes"][name] for name in INGESTS)
    if peer.supports_get:
        storescu(peer, studies["ct_j2k"], "-xv")  # untimed: stored as JPEG 2000 lossless, for _transcoding_get
        ct, out = studies["ct"], work / "get" / peer.name.replace(" ", "_")
        peer.reset_peak_rss()
        row["ct_get_mb_s"] = studies["bytes"]["ct"] / getscu(peer, studies["uids"]["ct"], out / "ct") / 1e6
        _check_received(out / "ct", len(ct), f"C-GET from {peer.name}")
        row["ct_move_mb_s"] = studies["bytes"]["ct"] / movescu(peer, studies["uids"]["ct"]) / 1e6
        _check_received(moved, len(ct), f"C-MOVE from {peer.name}")
        row["multiframe_get_mb_s"] = (studies["bytes"]["multiframe"]
                                      / getscu(peer, studies["uids"]["multiframe"], out / "mf") / 1e6)
        _check_received(out / "mf", 1, f"C-GET of the multi-frame instance from {peer.name}")
        row["ct_j2k_get_mb_s"] = _transcoding_get(peer, studies, out / "ct-j2k")
        rss["retrieve"] = peer.rss_mb
        shutil.rmtree(out)
    return row


def _transcoding_get(peer: Peer, studies: dict, out: Path) -> float:
    """C-GET of the JPEG 2000 lossless study by a getscu proposing uncompressed syntaxes only
    (explicit VR little endian first); MB/s of what arrived. Every instance must arrive, and in
    explicit VR little endian: decoded by the peer."""
    import pydicom

    seconds = getscu(peer, studies["uids"]["ct_j2k"], out, "+xe")
    _check_received(out, len(studies["ct_j2k"]), f"transcoding C-GET from {peer.name}")
    received = [path for path in out.rglob("*") if path.is_file()]
    syntaxes = {pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID for path in received}
    if syntaxes != {ExplicitVRLittleEndian}:
        raise RuntimeError(f"transcoding C-GET from {peer.name}: arrived in {sorted(syntaxes)}")
    return sum(path.stat().st_size for path in received) / seconds / 1e6


def _big_instance(peer: "Vault", work: Path, megabytes: int) -> dict:
    """Store and C-GET one instance of `megabytes` MB; is what came back the data set that was
    sent? The server's peak RSS over both is read by the caller."""
    big = corpus.multiframe(work / "corpus" / "big" / "big.dcm", megabytes, patient_id="PV0010", seed=12)
    size = big.stat().st_size
    peer.reset_peak_rss()
    row = {"big_instance_mb": size / 1e6, "big_ingest_mb_s": size / storescu(peer, [big]) / 1e6}
    import pydicom
    uid = pydicom.dcmread(big, stop_before_pixels=True).StudyInstanceUID
    out = work / "get" / "big"
    row["big_get_mb_s"] = size / getscu(peer, uid, out) / 1e6
    copies = [p for p in out.iterdir() if p.is_file()]
    row["big_byte_exact"] = len(copies) == 1 and _same_dataset(big, copies[0])
    shutil.rmtree(out)
    big.unlink()
    return row


def _same_dataset(a: Path, b: Path) -> bool:
    """The same data set bytes after the file meta (the receiving getscu writes its own meta)."""
    from pynetdicom.dsutils import split_dataset

    (_, start_a), (_, start_b) = split_dataset(a), split_dataset(b)
    if a.stat().st_size - start_a != b.stat().st_size - start_b:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(start_a)
        fb.seek(start_b)
        while True:
            block = fa.read(1 << 22)
            if block != fb.read(1 << 22):
                return False
            if not block:
                return True


SYNC_CALLS = ("fsync", "fdatasync", "sync_file_range", "syncfs", "msync", "sync")
# What each peer of the untimed pass makes durable before it answers a C-STORE with Success
# (its defaults, as run here): the README's table is generated from these with the counts.
DURABLE_BEFORE_SUCCESS = {
    "pacs-vault": "the sealed blob, its index entry and its audit record",
    "Orthanc (compression off)": "each stored file (SyncStorageArea: fdatasync); the SQLite index in WAL mode with "
                                 "synchronous=NORMAL (commits not synced); no directory sync (Orthanc 1.10 defaults)",
    "dcmtk storescp": "nothing (files written, never synced)",
}
SYNC_PEERS = ("vault", "orthanc", "storescp")  # in _make_peers' names, those of DURABLE_BEFORE_SUCCESS


@contextlib.contextmanager
def traced_syncs(pid: int, out: Path) -> Iterator[dict[str, tuple[int, float]]]:
    """Count the sync system calls of a running server: every thread of its processes, and those
    started meanwhile (strace -f -c -w: seconds are wall time inside the calls, summed over threads).
    The dict yielded is filled in, {call: (calls, seconds)}, once strace has detached."""
    pids = server_processes(pid)
    tracer = subprocess.Popen(["strace", "-f", "-c", "-w", "-U", "name,calls,total-time",
                               "-e", "trace=" + ",".join(SYNC_CALLS), "-o", str(out),
                               *[arg for p in pids for arg in ("-p", str(p))]],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    counts: dict[str, tuple[int, float]] = {}
    try:
        _wait_attached(pids, tracer)
        yield counts
    finally:
        tracer.send_signal(signal.SIGINT)  # detach, write the summary
        tracer.wait(30)
    for line in out.read_text().splitlines():
        name, calls, seconds = (line.split() + ["", "", ""])[:3]
        if name in SYNC_CALLS:
            counts[name] = (int(calls), float(seconds))


def _wait_attached(pids: list[int], tracer: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if all(f"TracerPid:\t{tracer.pid}\n" in status.read_text()
                   for pid in pids for status in Path(f"/proc/{pid}/task").glob("*/status")):
                return
        except OSError:  # a thread ended meanwhile: look again
            pass
        if tracer.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"strace did not attach to {pids} (exit code {tracer.poll()}; attaching needs root "
                               "or kernel.yama.ptrace_scope 0)")
        time.sleep(0.05)


def _sync_pass(work: Path, files: list[Path], peer_names: list[str], destination_port: int) -> dict:
    """Untimed: each of SYNC_PEERS, fresh, stores `files` over one association under traced_syncs().
    `work` is removed afterwards."""
    work.mkdir()
    results = {}
    for name in [name for name in SYNC_PEERS if name in peer_names]:
        for peer in _make_peers(work, [name], destination_port):  # none for Orthanc when it is not installed
            os.sync()  # nobody else's dirty pages in this peer's syncs
            try:
                with traced_syncs(peer.process.pid, work / f"{name}.strace") as calls:
                    client = dcmtk_client("storescu", "-v", "-aet", CLIENT_AE, "-aec", peer.ae_title, "127.0.0.1",
                                          str(peer.port), *map(str, files))
            finally:
                peer.stop()
            count = sum(map(acknowledged, dimse_statuses(client.stderr + client.stdout)))
            if client.returncode != 0 or count == 0:
                raise RuntimeError(f"storescu to {peer.name} under strace: exit code {client.returncode}, "
                                   f"{count} of {len(files)} acknowledged: {client.stderr[-2000:]}")
            syncs, seconds = sum(c for c, _ in calls.values()), sum(s for _, s in calls.values())
            results[peer.name] = {
                "instances": len(files), "acknowledged": count, "calls": {call: c for call, (c, _) in calls.items()},
                "syncs": syncs, "sync_seconds": seconds, "syncs_per_acknowledged_instance": syncs / count,
                "sync_ms_per_acknowledged_instance": seconds * 1e3 / count,
                "durable_before_success": DURABLE_BEFORE_SUCCESS[peer.name]}
    shutil.rmtree(work)
    return results


def run(work: Path, counts: dict, peer_names: list[str]) -> dict:
    root = work / "corpus"
    studies = {"ct": corpus.ct_study(root / "ct", counts["ct"]),
               "ct_parallel": corpus.ct_study(root / "ct-parallel", counts["ct"], patient_id="PV0009", seed=11),
               "small": corpus.small_instances(root / "small", counts["small"]),
               "mr": corpus.mr_series(root / "mr", counts["mr"]),
               "multiframe": [corpus.multiframe(root / "mf" / "mf.dcm", counts["multiframe_mb"])],
               "ct_j2k": corpus.ct_study(root / "ct-j2k", counts["ct_j2k"], patient_id="PV0011", seed=13,
                                         transfer_syntax=JPEG2000Lossless)}
    import pydicom
    studies["bytes"] = {name: sum(p.stat().st_size for p in files) for name, files in studies.items()}
    studies["uids"] = {name: pydicom.dcmread(studies[name][0], stop_before_pixels=True).StudyInstanceUID
                       for name in ("ct", "multiframe", "ct_j2k")}

    destination = Storescp(work / "moved", DEST_AE)
    results = {"machine": machine(),
               "corpus": {"ct_instances": counts["ct"], "ct_bytes": studies["bytes"]["ct"],
                          "small_instances": counts["small"], "small_bytes": studies["bytes"]["small"],
                          "mr_instances": counts["mr"], "mr_bytes": studies["bytes"]["mr"],
                          "multiframe_bytes": studies["bytes"]["multiframe"], "ct_j2k_instances": counts["ct_j2k"],
                          "ct_j2k_bytes": studies["bytes"]["ct_j2k"]},
               "peers": {}}
    try:
        # First: it fails early when strace cannot attach, and pays for what the corpus left dirty.
        results["syncs"] = _sync_pass(work / "untimed", studies["ct"], peer_names, destination.port)
        peers = _make_peers(work, peer_names, destination.port)
        try:
            for peer in peers:
                row = _measure(peer, work, studies, destination.dir)
                if peer.name == "pacs-vault" and counts["big_mb"]:
                    row.update(_big_instance(peer, work, counts["big_mb"]))
                    row["peak_rss_mb_by_phase"]["big"] = peer.rss_mb
                row["peak_rss_mb"] = max(row["peak_rss_mb_by_phase"].values())
                results["peers"][peer.name] = row
                for path in destination.dir.iterdir():
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        finally:
            for peer in peers:
                peer.stop()
    finally:
        destination.stop()
    vault = results["peers"].get("pacs-vault", {})
    results["ratios"] = {f"{key} vs {name}": vault[key] / row[key]
                         for name, row in results["peers"].items() if name != "pacs-vault"
                         for key in RATES if key in row and key in vault}
    return results


def markdown(results: dict) -> str:
    peers = results["peers"].values()
    lines = ["| measure | " + " | ".join(results["peers"]) + " |", "|---" * (len(results["peers"]) + 1) + "|"]
    for key in RATES + ("ct_stored_over_received", "stored_over_received", "peak_rss_mb"):
        lines.append(f"| {key} | " + " | ".join(f"{row[key]:.2f}" if key in row else "-" for row in peers) + " |")
    for phase in RSS_PHASES:
        lines.append(f"| peak_rss_mb, {phase} | " + " | ".join(
            f"{row['peak_rss_mb_by_phase'][phase]:.2f}" if phase in row["peak_rss_mb_by_phase"] else "-"
            for row in peers) + " |")
    vault = results["peers"].get("pacs-vault", {})
    if "big_instance_mb" in vault:
        lines += ["", f"pacs-vault, one {vault['big_instance_mb']:.0f} MB instance: stored at "
                      f"{vault['big_ingest_mb_s']:.1f} MB/s, C-GET {vault['big_get_mb_s']:.1f} MB/s, byte-exact: "
                      f"{vault['big_byte_exact']}, server peak RSS storing and sending it back "
                      f"{vault['peak_rss_mb_by_phase']['big']:.0f} MB"]
    lines += ["", "Untimed, under strace (every server thread): the CT study stored over one association.", "",
              "| peer | acknowledged | sync calls | syncs per instance | ms in syncs per instance | "
              "durable before it answers Success |", "|---|---:|---|---:|---:|---|"]
    for name, row in results["syncs"].items():
        calls = ", ".join(f"{call} {count}" for call, count in row["calls"].items()) or "none"
        lines.append(f"| {name} | {row['acknowledged']} of {row['instances']} | {calls} | "
                     f"{row['syncs_per_acknowledged_instance']:.2f} | {row['sync_ms_per_acknowledged_instance']:.2f} | "
                     f"{row['durable_before_success']} |")
    lines += ["", "| pacs-vault ratio | value |", "|---|---|"]
    lines += [f"| {key} | {value:.2f} |" for key, value in results["ratios"].items()]
    c = results["corpus"]
    lines += ["", f"CT: 2 x {c['ct_instances']} instances, {c['ct_bytes'] / 1e6:.1f} MB each (the second over "
                  f"{PARALLEL} associations); MR: {c['mr_instances']} instances, {c['mr_bytes'] / 1e6:.1f} MB; "
                  f"small: {c['small_instances']} instances of ~10 KB; one multi-frame instance of "
                  f"{c['multiframe_bytes'] / 1e6:.0f} MB; CT in JPEG 2000 lossless: {c['ct_j2k_instances']} "
                  f"instances, {c['ct_j2k_bytes'] / 1e6:.1f} MB stored (ct_j2k_get_mb_s: MB/s of what arrives "
                  "decoded, explicit VR little endian, by a getscu proposing only uncompressed syntaxes)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=200, help="CT instances per study (512 KB each)")
    parser.add_argument("--small", type=int, default=1000, help="~10 KB instances")
    parser.add_argument("--mr", type=int, default=200, help="MR instances (128 KB each)")
    parser.add_argument("--multiframe-mb", type=int, default=256, help="the multi-frame instance every peer stores")
    parser.add_argument("--big-mb", type=int, default=2048,
                        help="one instance pacs-vault stores and sends back (its peak RSS); 0: none")
    parser.add_argument("--ct-j2k", type=int, default=100,
                        help="CT instances stored in JPEG 2000 lossless, taken back transcoded")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {', '.join(PEERS)}")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    counts = ({"ct": 10, "small": 20, "mr": 5, "multiframe_mb": 8, "big_mb": 16, "ct_j2k": 3} if args.quick else
              {"ct": args.ct, "small": args.small, "mr": args.mr, "multiframe_mb": args.multiframe_mb,
               "big_mb": args.big_mb, "ct_j2k": args.ct_j2k})
    peers = [name.strip() for name in args.peers.split(",") if name.strip()]
    unknown = set(peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers: {', '.join(sorted(unknown))}")
    return run_and_report("dicom", args, lambda work: run(work, counts, peers), markdown)


if __name__ == "__main__":
    raise SystemExit(main())
