"""DICOMweb, side by side: pacs-vault's DICOMweb front against Orthanc with its DICOMweb plugin.

    python benchmarks/web_bench.py [--quick] [--ct N] [--qido-studies K] [--studies N] [--queries Q]
                                   [--workdir DIR] [--results DIR]

Both servers run as plain processes on loopback ports with their data under the same work
directory, driven by the same Python client (requests, keep-alive sessions):

- STOW-RS of a CT study (N instances of 512 KB) in one request, and of four CT studies by
  four clients at once, in MB/s;
- WADO-RS of the study (multipart/related application/dicom, as stored), in MB/s (best of
  three), and of its metadata (DICOM JSON), in instances per second: the first request
  (pacs-vault computes it from the sealed instances) and the best of three more (pacs-vault
  answers those from its metadata cache);
- QIDO-RS study searches on an index of K studies both hold (one small instance each,
  stored by STOW-RS into both), five query shapes, the total time of all queries; and
  pacs-vault alone on an index of 1,000,000 studies bulk-loaded as find_bench.py loads it
  (Orthanc has no bulk load: it would take hours to store a million instances), median per
  shape, against the C-FIND bound.

pacs-vault runs with its defaults (durable before it answers: sealed blob, index entry and
audit record); Orthanc 1.10 with its defaults and storage compression off (Debian
orthanc-dicomweb: its DICOMweb plugin; orthanc-gdcm as in dicom_bench.py).
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pydicom
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
import corpus  # noqa: E402
from common import (add_common_arguments, free_port, machine, run_and_report, server_processes,  # noqa: E402
                    status_total)
from dicom_bench import ORTHANC, ORTHANC_GDCM, Orthanc, wait_port  # noqa: E402
from find_bench import bulk_loaded_home, queries, synthetic_study  # noqa: E402

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
PARALLEL = 4
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ACCEPT_STORED = 'multipart/related; type="application/dicom"'


class WebVault:
    name = "pacs-vault"

    def __init__(self, home: Path, create: bool = True):
        appliance = [sys.executable, "-m", "appliance", "--home", str(home)]
        if create:
            subprocess.run(appliance + ["init"], check=True, capture_output=True, cwd=REPO)
        added = subprocess.run(appliance + ["token", "add", "bench", "--roles", "store,query,retrieve"], check=True,
                               capture_output=True, text=True, cwd=REPO)
        self.headers = {"Authorization": f"Bearer {added.stdout.strip().splitlines()[-1]}"}
        self.http = free_port()
        self.process = subprocess.Popen(appliance + ["serve", "--port", str(free_port()), "--dicomweb-port",
                                                     str(self.http)], cwd=REPO, stderr=open(home / "serve.log", "w"))
        wait_port(self.http)
        self.root = f"http://127.0.0.1:{self.http}/dicom-web"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


class WebOrthanc(Orthanc):
    def __init__(self, work: Path):
        plugins = [str(p) for p in (ORTHANC_GDCM, DICOMWEB_PLUGIN) if p.exists()]
        super().__init__(work, False, free_port(), Plugins=plugins, DicomWeb={"Enable": True, "Root": "/dicom-web/"})
        self.name = "Orthanc"
        self.headers = {}
        self.root = f"http://127.0.0.1:{self.http}/dicom-web"


def multipart(files: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
                    for data in files) + f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(peer, session: requests.Session, files: list[bytes]) -> None:
    body, content_type = multipart(files)
    response = session.post(f"{peer.root}/studies", data=body, timeout=600,
                            headers={**peer.headers, "Content-Type": content_type, "Accept": "application/dicom+json"})
    if response.status_code != 200:
        raise RuntimeError(f"{peer.name}: STOW-RS answered {response.status_code}: {response.text[:500]}")


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def stow_parallel(peer, studies: list[list[bytes]]) -> float:
    errors = []

    def send(files):
        try:
            stow(peer, requests.Session(), files)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(files,)) for files in studies]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def get(peer, session: requests.Session, path: str, accept: str, **params) -> requests.Response:
    response = session.get(f"{peer.root}{path}", params=params, timeout=600, headers={**peer.headers, "Accept": accept})
    if response.status_code != 200:
        raise RuntimeError(f"{peer.name}: GET {path} answered {response.status_code}: {response.text[:300]}")
    return response


def best_of(runs: int, fn, *args) -> float:
    return min(timed(fn, *args) for _ in range(runs))


def tiny_instance(number: int, rng: random.Random) -> bytes:
    """One small instance of the synthetic study `number`, with find_bench's attributes."""
    info = synthetic_study(number, rng)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SECONDARY_CAPTURE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = info.instance["SOPInstanceUID"]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for values in (info.patient, info.study, info.series):
        for keyword, value in values.items():
            if value:
                setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def qido_shapes(studies: int, rng: random.Random) -> dict:
    """find_bench's C-FIND query shapes as QIDO-RS parameters (their keys with a value)."""
    def parameters(make):
        return lambda: {e.keyword: str(e.value) for e in make() if e.value and e.keyword != "QueryRetrieveLevel"}
    return {shape: parameters(make) for shape, make in queries(studies, rng).items()}


def qido_latencies(peer, studies: int, count: int) -> dict:
    session = requests.Session()
    results = {}
    for shape, make in qido_shapes(studies, random.Random(11)).items():
        latencies = []
        for _ in range(count):
            params = {**make(), "includefield": "NumberOfStudyRelatedInstances"}
            start = time.perf_counter()
            get(peer, session, "/studies", "application/dicom+json", **params)
            latencies.append((time.perf_counter() - start) * 1000)
        results[shape] = {"median_ms": statistics.median(latencies), "total_ms": sum(latencies)}
    return results


def measure(peer, ct: list[bytes], parallel: list[list[bytes]], ct_uid: str, small: list[bytes], studies: int,
            queries: int) -> dict:
    session = requests.Session()
    megabytes = sum(map(len, ct)) / 1e6
    row = {"stow_ct_mb_s": megabytes / timed(stow, peer, session, ct),
           "stow_ct_parallel_mb_s": sum(map(len, sum(parallel, []))) / 1e6 / stow_parallel(peer, parallel)}
    row["wado_study_mb_s"] = megabytes / best_of(3, get, peer, session, f"/studies/{ct_uid}", ACCEPT_STORED)
    metadata = f"/studies/{ct_uid}/metadata"
    row["wado_metadata_first_inst_s"] = len(ct) / timed(get, peer, session, metadata, "application/dicom+json")
    row["wado_metadata_inst_s"] = len(ct) / best_of(3, get, peer, session, metadata, "application/dicom+json")
    for first in range(0, len(small), 200):
        stow(peer, session, small[first:first + 200])
    row["qido"] = qido_latencies(peer, studies, queries)
    row["qido_total_ms"] = sum(shape["total_ms"] for shape in row["qido"].values())
    return row


def qido_million(work: Path, studies: int, queries: int) -> dict:
    """pacs-vault alone: QIDO-RS on a bulk-loaded index of `studies` studies."""
    home = work / "million"
    load_seconds = bulk_loaded_home(home, studies)
    vault = WebVault(home, create=False)
    try:
        return {"studies": studies, "load_seconds": load_seconds, "queries": qido_latencies(vault, studies, queries)}
    finally:
        vault.stop()


RATES = ("stow_ct_mb_s", "stow_ct_parallel_mb_s", "wado_study_mb_s", "wado_metadata_first_inst_s",
         "wado_metadata_inst_s")


def run(work: Path, counts: dict) -> dict:
    root = work / "corpus"
    ct_files = corpus.ct_study(root / "ct", counts["ct"])
    ct = [p.read_bytes() for p in ct_files]
    parallel = [[p.read_bytes() for p in corpus.ct_study(root / f"ct-{n}", counts["ct"] // PARALLEL or 1,
                                                         patient_id=f"PW{n:04d}", seed=20 + n)]
                for n in range(PARALLEL)]
    ct_uid = pydicom.dcmread(ct_files[0], stop_before_pixels=True).StudyInstanceUID
    rng = random.Random(7)
    small = [tiny_instance(n, rng) for n in range(counts["qido_studies"])]
    results = {"machine": machine(), "ct_instances": counts["ct"], "ct_bytes": sum(map(len, ct)),
               "qido_studies": counts["qido_studies"], "peers": {}}
    peers = [lambda: WebVault(work / "vault")]
    if Path(ORTHANC).exists() and DICOMWEB_PLUGIN.exists():
        peers.append(lambda: WebOrthanc(work))
    for make in peers:
        peer = make()
        try:
            row = measure(peer, ct, parallel, ct_uid, small, counts["qido_studies"], counts["queries"])
            row["peak_rss_mb"] = status_total(server_processes(peer.process.pid), "VmHWM") / 1024
            results["peers"][peer.name] = row
        finally:
            peer.stop()
    results["million"] = qido_million(work, counts["studies"], counts["queries"])
    vault, orthanc = results["peers"]["pacs-vault"], results["peers"].get("Orthanc")
    results["ratios"] = {} if orthanc is None else {
        **{f"{key} vs Orthanc": vault[key] / orthanc[key] for key in RATES},
        "qido_time vs Orthanc": orthanc["qido_total_ms"] / vault["qido_total_ms"]}
    return results


def markdown(results: dict) -> str:
    peers = results["peers"]
    lines = [f"DICOMweb: a CT study of {results['ct_instances']} instances ({results['ct_bytes'] / 1e6:.0f} MB); "
             f"QIDO-RS on {results['qido_studies']:,} studies both hold", "",
             "| measure | " + " | ".join(peers) + " |", "|---" * (len(peers) + 1) + "|"]
    for key in RATES + ("qido_total_ms", "peak_rss_mb"):
        lines.append(f"| {key} | " + " | ".join(f"{row[key]:.1f}" for row in peers.values()) + " |")
    for shape in next(iter(peers.values()))["qido"]:
        lines.append(f"| QIDO median ms, {shape} | " + " | ".join(
            f"{row['qido'][shape]['median_ms']:.1f}" for row in peers.values()) + " |")
    lines += ["", "| pacs-vault ratio (higher is better) | value |", "|---|---|"]
    lines += [f"| {key} | {value:.2f} |" for key, value in results["ratios"].items()]
    million = results["million"]
    lines += ["", f"pacs-vault alone, QIDO-RS studies on {million['studies']:,} studies (bulk load "
                  f"{million['load_seconds']:.0f} s):", "", "| query | median ms |", "|---|---|"]
    lines += [f"| {shape} | {row['median_ms']:.1f} |" for shape, row in million["queries"].items()]
    lines += ["", f"Machine: {results['machine']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=100, help="CT instances (512 KB each)")
    parser.add_argument("--qido-studies", type=int, default=1000, help="studies both servers hold for QIDO-RS")
    parser.add_argument("--studies", type=int, default=1_000_000, help="studies of pacs-vault's bulk-loaded index")
    parser.add_argument("--queries", type=int, default=30, help="queries per shape")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    counts = ({"ct": 8, "qido_studies": 40, "studies": 2_000, "queries": 3} if args.quick else
              {"ct": args.ct, "qido_studies": args.qido_studies, "studies": args.studies, "queries": args.queries})
    return run_and_report("web", args, lambda work: run(work, counts), markdown)


if __name__ == "__main__":
    raise SystemExit(main())
