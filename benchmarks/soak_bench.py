"""Soak: everything at once against one `appliance serve` for a long time. Does anything fail or leak?

    python benchmarks/soak_bench.py [--quick] [--minutes M] [--associations N] [--ct N] [--small N]
                                    [--sample-seconds S] [--workdir DIR] [--results DIR]

One pacs-vault server with its defaults, its filesystem cold tier and a policy that migrates
every study there after 0 days and drops the hot copy; in parallel until the time is up:
- N storescu loops (N associations at once), each storing new studies in turn, a CT study then
  ~10 KB instances, generated meanwhile, each study its own patient;
- a findscu loop: study-level queries for a stored study, by its UID and by a wildcard on its
  patient ID (exactly one match expected from each);
- a getscu loop and a movescu loop (to a dcmtk storescp) of stored studies picked at random,
  many of them migrated off the hot tier meanwhile (recalled on the way);
- `appliance scrub` and `appliance policy apply`, each in a loop with a short pause.
Every few seconds the server's RSS (and its anonymous part), open descriptors, threads and
processes are sampled, summed over its processes: start, peak, end and the least-squares slope
per hour of each. Every error is counted per operation and kind: client exit codes, non-success
statuses, instances without a response, failed sub-operations and instances that did not arrive,
a wrong number of C-FIND matches, a client or command killed without an answer (after 2
minutes, or at the end and a grace of up to a minute); then the server's exit code after
SIGTERM, the tracebacks in its log, and `appliance fsck` of the home. The first few messages
of each operation's errors are kept as examples.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import itertools
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pydicom

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import corpus  # noqa: E402
from common import add_common_arguments, machine, run_and_report, server_processes, status_total  # noqa: E402
from dicom_bench import (CLIENT_AE, DEST_AE, Storescp, Vault, acknowledged, dcmtk_client,  # noqa: E402
                         dimse_statuses)

APPLIANCE = [sys.executable, "-m", "appliance"]
OPERATIONS = ("store", "find", "get", "move", "scrub", "policy apply")
CHECKS = ("server", "fsck after the run")
QUICK_SECONDS = 35  # with start-up, the end and the checks, about a minute
MAINTENANCE_PAUSE_S = 2  # scrub and policy apply are timers in real use, not busy loops
FAILURE_PAUSE_S = 1  # so that a dead server does not turn into a million errors
HUNG_S = 120  # a client or command still waiting after this (or after the end and a grace) is killed
EXAMPLES, EXAMPLE_CHARS = 5, 3000  # error messages kept per operation, the last characters of each
POLICY = ("classes:\n  - name: everything\n    match: {}\n    retention: {years_after_study: 10}\n"
          "    transitions:\n      - {after_days: 0, to: [cold], keep_hot: false}\n    at_expiry: review\n")
FAILED_SUBOPERATIONS = re.compile(r"Number of Failed Suboperations\s*:\s*(\d+)")
FIND_MATCH = re.compile(r"Find Response: \d+ \(Pending\)")
TRACEBACK = "Traceback (most recent call last)"


class Tally:
    """What every loop did, shared by their threads: runs, counts and errors by kind per operation."""

    def __init__(self, started: float):
        self.started = started
        self.lock = threading.Lock()
        self.operations = {name: {"runs": 0, "failed_runs": 0, "errors": collections.Counter(), "examples": []}
                           for name in OPERATIONS + CHECKS}

    def record(self, operation: str, errors: collections.Counter, detail: str, **counts: int) -> bool:
        """Count one run of `operation` (`counts` are added up); True when it had no error."""
        with self.lock:
            row = self.operations[operation]
            row["runs"] += 1
            for key, value in counts.items():
                row[key] = row.get(key, 0) + value
            if errors:
                row["failed_runs"] += 1
                row["errors"].update(errors)
                if len(row["examples"]) < EXAMPLES:
                    row["examples"].append({"at_s": round(time.monotonic() - self.started, 1),
                                            "errors": dict(errors), "output": detail[-EXAMPLE_CHARS:]})
        return not errors


class Soak:
    """The server, the move destination and what the loops share: the clock, the studies stored."""

    def __init__(self, work: Path, seconds: float, sizes: dict):
        self.work, self.sizes = work, sizes
        self.destination = Storescp(work / "moved", DEST_AE)
        try:
            self.vault = Vault(work, self.destination.port)
        except BaseException:
            self.destination.stop()
            raise
        (self.vault.home / "policies" / "default.yaml").write_text(POLICY)
        self.started = time.monotonic()
        self.deadline = self.started + seconds
        self.grace = min(60.0, max(10.0, seconds / 4))  # for what is still running at the end
        self.stopping = threading.Event()
        self.tally = Tally(self.started)
        self.studies: list[tuple[str, str, int]] = []  # (study UID, patient ID, instances), every one acknowledged

    def timeout(self) -> float:
        return min(HUNG_S, self.deadline + self.grace - time.monotonic())

    def client(self, tool: str, *args: str) -> tuple[int | None, str]:
        """(exit code, everything it logged) of a dcmtk client talking to the server; None: no answer."""
        try:
            result = dcmtk_client(tool, "-v", "-aet", CLIENT_AE, "-aec", self.vault.ae_title, "127.0.0.1",
                                  str(self.vault.port), *args, timeout=self.timeout())
        except subprocess.TimeoutExpired as exc:
            return None, _timed_out(exc)
        return result.returncode, result.stdout + result.stderr

    def stored_study(self, rng: random.Random) -> tuple[str, str, int] | None:
        """A study stored in this run, at random; None when the time is up before the first one."""
        while not self.studies:
            if self.stopping.wait(0.2):
                return None
        return rng.choice(self.studies)


def _timed_out(exc: subprocess.TimeoutExpired) -> str:
    return "\n".join([str(exc), *(out.decode(errors="replace") for out in (exc.stdout, exc.stderr) if out)])


def _exit_errors(code: int | None) -> collections.Counter:
    if code is None:
        return collections.Counter({"no answer (killed)": 1})
    return collections.Counter({f"exit code {code}": 1} if code else {})


def _status_errors(statuses: list[str]) -> collections.Counter:
    return collections.Counter(f"status {status}" for status in statuses if not acknowledged(status))


def _store(soak: Soak, worker: int) -> Callable[[], bool]:
    iterations = itertools.count()

    def once() -> bool:
        iteration = next(iterations)
        directory, patient = soak.work / "outgoing" / f"{worker}-{iteration}", f"SOAK{worker}-{iteration}-"
        make, count = ((corpus.ct_study, soak.sizes["ct"]) if iteration % 2 == 0 else
                       (corpus.small_instances, soak.sizes["small"]))
        files = make(directory, count, patient_id=patient, seed=worker * 1_000_003 + iteration)
        study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        code, output = soak.client("storescu", "--no-halt", *map(str, files))
        shutil.rmtree(directory)
        statuses = dimse_statuses(output)
        errors = _exit_errors(code) + _status_errors(statuses)
        if len(statuses) < len(files):
            errors["instances without a response"] += len(files) - len(statuses)
        ok = soak.tally.record("store", errors, output, instances=len(files),
                               acknowledged=sum(map(acknowledged, statuses)))
        if ok:
            soak.studies.append((study, patient, len(files)))
        return ok
    return once


def _find(soak: Soak) -> Callable[[], bool]:
    rng, iterations = random.Random(1), itertools.count()

    def once() -> bool:
        picked = soak.stored_study(rng)
        if picked is None:
            return True
        study, patient, _ = picked
        keys = ([f"StudyInstanceUID={study}"] if next(iterations) % 2 == 0 else
                [f"PatientID={patient}*", "StudyInstanceUID"])  # the patient ends in "-": the wildcard finds it alone
        code, output = soak.client("findscu", "-S", "-k", "QueryRetrieveLevel=STUDY",
                                   *itertools.chain.from_iterable(("-k", key) for key in keys))
        errors = _exit_errors(code) + _status_errors(dimse_statuses(output))
        matches = len(FIND_MATCH.findall(output))
        if code == 0 and matches != 1:
            errors[f"{matches} matches instead of 1"] += 1
        return soak.tally.record("find", errors, output, queries=1, matches=matches)
    return once


def _retrieve(soak: Soak, operation: str) -> Callable[[], bool]:
    """C-GET into a directory of ours, or C-MOVE to the storescp: did every instance arrive?"""
    rng = random.Random(2 if operation == "get" else 3)
    arrived = soak.work / "got" if operation == "get" else soak.destination.dir
    arrived.mkdir(exist_ok=True)

    def once() -> bool:
        picked = soak.stored_study(rng)
        if picked is None:
            return True
        study, _, expected = picked
        keys = ("-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}")
        if operation == "get":
            code, output = soak.client("getscu", "-S", "-od", str(arrived), *keys)
        else:
            code, output = soak.client("movescu", "-S", "-aem", DEST_AE, *keys)
        files = [path for path in arrived.iterdir() if path.is_file()]
        for path in files:  # the directory stays: the storescp writes into it
            path.unlink()
        received = len(files)
        errors = _exit_errors(code) + _status_errors(dimse_statuses(output))
        failed = sum(map(int, FAILED_SUBOPERATIONS.findall(output)))  # getscu reports them, movescu does not
        if failed:
            errors["failed sub-operations"] += failed
        if received + failed < expected:
            errors["instances that did not arrive"] += expected - received - failed
        return soak.tally.record(operation, errors, output, instances=expected, received=received)
    return once


def _command(soak: Soak, operation: str, *args: str) -> Callable[[], bool]:
    def once() -> bool:
        try:
            result = subprocess.run(APPLIANCE + ["--home", str(soak.vault.home), *args], capture_output=True,
                                    text=True, cwd=REPO, timeout=soak.timeout())
        except subprocess.TimeoutExpired as exc:
            return soak.tally.record(operation, _exit_errors(None), _timed_out(exc))
        return soak.tally.record(operation, _exit_errors(result.returncode), result.stderr + result.stdout)
    return once


def _loop(soak: Soak, once: Callable[[], bool], pause_s: float) -> None:
    try:
        while not soak.stopping.is_set():
            ok = once()
            soak.stopping.wait(pause_s if ok else max(pause_s, FAILURE_PAUSE_S))
    except BaseException:  # a fault of this script, not of the server: stop everything, say so
        soak.stopping.set()
        raise


def _sample(soak: Soak) -> dict:
    pids = server_processes(soak.vault.process.pid)
    descriptors = 0
    for pid in pids:
        try:
            descriptors += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:  # ended meanwhile
            pass
    return {"t_s": round(time.monotonic() - soak.started, 2), "rss_mb": status_total(pids, "VmRSS") / 1024,
            "rss_anon_mb": status_total(pids, "RssAnon") / 1024, "fds": descriptors,
            "threads": status_total(pids, "Threads"), "processes": len(pids)}


RESOURCES = {"rss_mb": "RSS, MB", "rss_anon_mb": "anonymous RSS, MB", "fds": "open descriptors",
             "threads": "threads", "processes": "processes"}


def _trend(samples: list[dict], key: str) -> dict:
    values = [sample[key] for sample in samples]
    slope = (statistics.linear_regression([s["t_s"] / 3600 for s in samples], values).slope
             if len(samples) > 1 else 0.0)  # one sample: the server died at once
    return {"start": values[0], "peak": max(values), "end": values[-1], "slope_per_hour": slope}


def _server_errors(vault: Vault, died: int | None) -> tuple[collections.Counter, str]:
    """What went wrong with the server itself, and the part of its log that shows it: an exit during
    the run or after SIGTERM, and the tracebacks it logged (a thread that died in a request)."""
    # The log is one JSON line per association, beside whatever else went to stderr.
    complaints = "\n".join(line for line in (vault.home / "serve.log").read_text().splitlines()
                           if not line.startswith("{"))
    errors = collections.Counter()
    if died is not None:
        errors[f"exited during the run (exit code {died})"] += 1
    elif vault.process.returncode:
        errors[f"exit code {vault.process.returncode} after SIGTERM"] += 1
    if TRACEBACK in complaints:
        errors["tracebacks in its log"] += complaints.count(TRACEBACK)
    first = complaints.find(TRACEBACK)
    return errors, complaints[max(0, first - 200):first + 1500] if died is None else complaints


def run(work: Path, seconds: float, associations: int, sizes: dict, sample_s: float) -> dict:
    soak = Soak(work, seconds, sizes)
    loops = [*(_store(soak, worker) for worker in range(associations)), _find(soak), _retrieve(soak, "get"),
             _retrieve(soak, "move")]
    maintenance = [_command(soak, "scrub", "scrub"), _command(soak, "policy apply", "policy", "apply")]
    samples, tally = [], soak.tally
    pool = concurrent.futures.ThreadPoolExecutor(len(loops) + len(maintenance))
    try:
        running = [pool.submit(_loop, soak, once, 0) for once in loops]
        running += [pool.submit(_loop, soak, once, MAINTENANCE_PAUSE_S) for once in maintenance]
        samples.append(_sample(soak))
        while time.monotonic() < soak.deadline and soak.vault.process.poll() is None:
            if soak.stopping.wait(max(0.0, min(sample_s, soak.deadline - time.monotonic()))):
                break
            samples.append(_sample(soak))
        ran_s = time.monotonic() - soak.started
        soak.stopping.set()
        for loop in running:
            loop.result()
        died = soak.vault.process.poll()
    finally:
        soak.stopping.set()
        pool.shutdown()
        soak.destination.stop()  # first: a sub-association the server still holds to it ends now
        soak.vault.stop()
    tally.record("server", *_server_errors(soak.vault, died))
    fsck = subprocess.run(APPLIANCE + ["--home", str(soak.vault.home), "fsck"], capture_output=True, text=True,
                          cwd=REPO)
    tally.record("fsck after the run", _exit_errors(fsck.returncode), fsck.stdout + fsck.stderr)
    operations = {name: {**row, "errors": dict(row["errors"])} for name, row in tally.operations.items()}
    return {"machine": machine(), "seconds": round(ran_s, 1), "requested_seconds": seconds,
            "associations": associations, "sizes": sizes, "sample_seconds": sample_s,
            "studies_stored": len(soak.studies), "operations": operations,
            "errors_total": sum(sum(row["errors"].values()) for row in operations.values()),
            "resources": {key: _trend(samples, key) for key in RESOURCES}, "samples": samples}


def markdown(r: dict) -> str:
    lines = [f"Soak: {r['seconds'] / 60:.1f} min against one `appliance serve`: {r['associations']} storing "
             f"associations (CT studies of {r['sizes']['ct']} instances and series of {r['sizes']['small']} ~10 KB "
             f"instances, in turn), C-FIND, C-GET, C-MOVE, scrub and policy apply at once; "
             f"{r['studies_stored']} studies stored; errors: {r['errors_total']}", "",
             "| operation | runs | counts | failed runs | errors |", "|---|---:|---|---:|---|"]
    for name, row in r["operations"].items():
        counts = ", ".join(f"{key} {value}" for key, value in row.items()
                           if key not in ("runs", "failed_runs", "errors", "examples"))
        errors = ", ".join(f"{kind}: {count}" for kind, count in row["errors"].items()) or "none"
        lines.append(f"| {name} | {row['runs']} | {counts} | {row['failed_runs']} | {errors} |")
    lines += ["", f"Server (every process), sampled every {r['sample_seconds']} s:", "",
              "| resource | start | peak | end | least-squares slope per hour |", "|---|---:|---:|---:|---:|"]
    for key, label in RESOURCES.items():
        t = r["resources"][key]
        lines.append(f"| {label} | {t['start']:.1f} | {t['peak']:.1f} | {t['end']:.1f} | {t['slope_per_hour']:+.1f} |")
    for name, row in r["operations"].items():
        for example in row["examples"][:1]:  # the others are in the JSON
            lines += ["", f"First error of {name}, at {example['at_s']} s: {example['errors']}", "", "```",
                      example["output"].strip()[-1500:], "```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, help="how long (default 30; --quick: under a minute)")
    parser.add_argument("--associations", type=int, default=3, help="storescu loops storing at once")
    parser.add_argument("--ct", type=int, default=20, help="instances per CT study stored")
    parser.add_argument("--small", type=int, default=50, help="~10 KB instances per small series stored")
    parser.add_argument("--sample-seconds", type=float, default=5, help="between two samples of the server")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    seconds = args.minutes * 60 if args.minutes else QUICK_SECONDS if args.quick else 30 * 60
    associations, sizes, sample_s = ((2, {"ct": 4, "small": 10}, 2) if args.quick else
                                     (args.associations, {"ct": args.ct, "small": args.small}, args.sample_seconds))
    return run_and_report("soak", args, lambda work: run(work, seconds, associations, sizes, sample_s), markdown)


if __name__ == "__main__":
    raise SystemExit(main())
