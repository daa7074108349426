"""C-FIND latency at study level against a large index (default 1,000,000 studies).

    python benchmarks/find_bench.py [--quick] [--studies N] [--queries Q] [--workdir DIR] [--results DIR]

The studies are bulk-loaded into the index by the loader below (the index's own
record function, in large transactions), not sent over the network; then
`appliance serve` answers C-FIND requests from one pynetdicom association, and
the round trip of each request (all responses received) is timed. Reports the
median and 95th percentile per query shape. The index of this benchmark has no
blobs behind it: it measures the query path only.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from common import add_common_arguments, free_port, machine, run_and_report  # noqa: E402

from appliance import config as cfg  # noqa: E402
from appliance.admin import home as home_mod  # noqa: E402
from appliance.format.p10 import InstanceInfo  # noqa: E402
from appliance.store.catalog import instances as catalog_instances  # noqa: E402
from appliance.store.index import Index  # noqa: E402

CLIENT_AE = "FINDBENCH"
SURNAMES = ["SMITH", "JONES", "GARCIA", "MUELLER", "ROSSI", "DUBOIS", "NOWAK", "SILVA", "KIM", "NGUYEN",
            "OKAFOR", "HANSEN", "LEVY", "IVANOV", "TANAKA", "MARTIN"]
MODALITIES = ["CT", "MR", "CR", "US", "MG", "PT", "NM", "XA"]


def synthetic_study(number: int, rng: random.Random) -> InstanceInfo:
    """One instance of one study, with the attributes C-FIND uses."""
    study_uid = f"2.25.{number}1"
    day = 20000101 + (number % 28) + 100 * (number // 28 % 12) + 10000 * (number // 336 % 26)
    patient = {"PatientID": f"P{number // 3:08d}", "IssuerOfPatientID": "",
               "PatientName": f"{SURNAMES[number % 16]}{number % 997}^{['ANNA', 'JAN', 'LI', 'OMAR'][number % 4]}",
               "PatientBirthDate": "19600101", "PatientSex": rng.choice("MFO")}
    study = {"StudyInstanceUID": study_uid, "StudyDate": str(day), "StudyTime": "101500",
             "AccessionNumber": f"A{number:09d}", "StudyID": "1", "StudyDescription": "BENCH",
             "ReferringPhysicianName": "", "PatientAge": ""}
    series = {"SeriesInstanceUID": f"{study_uid}.1", "Modality": rng.choice(MODALITIES), "SeriesNumber": "1",
              "SeriesDescription": "", "SeriesDate": "", "SeriesTime": "", "BodyPartExamined": ""}
    instance = {"SOPInstanceUID": f"{study_uid}.1.1", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                "InstanceNumber": "1", "Rows": "512", "Columns": "512", "NumberOfFrames": "", "ContentDate": "",
                "ContentTime": ""}
    return InstanceInfo(number.to_bytes(32, "big"), 525_000, "1.2.840.10008.1.2.1", True,
                        patient, study, series, instance, "ISO_IR 192")


def bulk_load(index: Index, studies: int, batch: int = 20_000) -> float:
    rng = random.Random(7)
    blob = {"name": "0" * 32, "sealed_size": 260_000, "xxh3": bytes(16), "key_id": bytes(16), "compression": 1}
    start = time.perf_counter()
    for first in range(0, studies, batch):
        infos = [synthetic_study(n, rng) for n in range(first, min(first + batch, studies))]
        index.write(lambda t, infos=infos: [catalog_instances.record_instance(t, info, blob, "hot") for info in infos])
    return time.perf_counter() - start


def bulk_loaded_home(home: Path, studies: int) -> float:
    """A new home whose index holds `studies` synthetic studies; returns the load's seconds."""
    config = home_mod.init(home)
    index = Index(config.index_path, map_size=config.appliance.index.initial_map_size_mb << 20)
    try:
        return bulk_load(index, studies)
    finally:
        index.close()


def queries(studies: int, rng: random.Random) -> dict[str, callable]:
    """Query shapes a PACS sends, each a function returning a fresh identifier."""
    from pydicom.dataset import Dataset

    def identifier(**keys) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "AccessionNumber",
                        "ModalitiesInStudy", "NumberOfStudyRelatedInstances"):
            setattr(ds, keyword, keys.get(keyword, ""))
        return ds

    def some() -> int:
        return rng.randrange(studies)

    return {
        "PatientID": lambda: identifier(PatientID=f"P{some() // 3:08d}"),
        "AccessionNumber": lambda: identifier(AccessionNumber=f"A{some():09d}"),
        "StudyInstanceUID": lambda: identifier(StudyInstanceUID=f"2.25.{some()}1"),
        "PatientName prefix": lambda: identifier(PatientName=(lambda n: f"{SURNAMES[n % 16]}{n % 997}^*")(some())),
        "StudyDate one day + modality": lambda: identifier(StudyDate=synthetic_study(some(), rng).study["StudyDate"],
                                                           ModalitiesInStudy="CT"),
    }


def run(work: Path, studies: int, count: int) -> dict:
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    home = work / "home"
    load_seconds = bulk_loaded_home(home, studies)
    subprocess.run([sys.executable, "-m", "appliance", "--home", str(home), "ae", "add", CLIENT_AE, "127.0.0.1",
                    "1", "--roles", "query"], check=True, capture_output=True, cwd=REPO)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "appliance", "--home", str(home), "serve", "--port", str(port)],
                              cwd=REPO, stderr=subprocess.DEVNULL)
    results = {"machine": machine(), "studies": studies, "load_seconds": load_seconds, "queries": {}}
    try:
        ae = AE(ae_title=CLIENT_AE)
        ae.add_requested_context(FIND)
        deadline = time.monotonic() + 60
        assoc = ae.associate("127.0.0.1", port, ae_title=cfg.load(home).appliance.dicom.ae_title)
        while not assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.2)
            assoc = ae.associate("127.0.0.1", port, ae_title="ARCHIVE")
        # pynetdicom does not set TCP_NODELAY: without it each request waits ~40 ms for a delayed ACK.
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rng = random.Random(11)
        for shape, make in queries(studies, rng).items():
            latencies, matches = [], []
            for _ in range(count):
                ds = make()
                start = time.perf_counter()
                responses = list(assoc.send_c_find(ds, FIND))
                latencies.append((time.perf_counter() - start) * 1000)
                matches.append(sum(1 for status, _ in responses if status.Status == 0xFF00))
                if responses[-1][0].Status != 0x0000:
                    raise RuntimeError(f"{shape}: C-FIND failed with 0x{responses[-1][0].Status:04X}")
            latencies.sort()
            results["queries"][shape] = {"median_ms": statistics.median(latencies),
                                         "p95_ms": latencies[int(len(latencies) * 0.95) - 1],
                                         "mean_matches": statistics.mean(matches)}
        assoc.release()
    finally:
        server.terminate()
        server.wait(60)
    return results


def markdown(results: dict) -> str:
    lines = [f"C-FIND, study level, {results['studies']:,} studies (bulk load {results['load_seconds']:.0f} s)",
             "", "| query | median ms | p95 ms | matches |", "|---|---|---|---|"]
    for shape, row in results["queries"].items():
        lines.append(f"| {shape} | {row['median_ms']:.1f} | {row['p95_ms']:.1f} | {row['mean_matches']:.1f} |")
    lines += ["", f"Machine: {results['machine']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=50)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    studies, count = (2_000, 5) if args.quick else (args.studies, args.queries)
    return run_and_report("find", args, lambda work: run(work, studies, count), markdown)


if __name__ == "__main__":
    raise SystemExit(main())
