"""What every benchmark script shares: the machine's description, a scratch directory on the
file system under test, and where results go (JSON + markdown under benchmarks/results/)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"
# The CT study `appliance import` is measured on, and the sealing limit beside it (limits_bench):
# ~525 MB, so that a command's start (~0.5 s of Python imports) does not pass for its throughput.
IMPORT_STUDY_INSTANCES = 1000


def machine() -> dict:
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gb": _memory_gb(),
            "python": platform.python_version(), "kernel": platform.release()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


def _version(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def describe_machine(workdir: Path) -> dict:
    """What a storage admin needs to compare a run with theirs: CPU, memory, the file system
    and device under the work directory, and the versions of the peers."""
    try:
        found = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "--target", str(workdir)],
                               capture_output=True, text=True).stdout
    except OSError:  # no findmnt: the rest of the description still stands
        found = ""
    source, fstype, options = (found.split() + ["?", "?", "?"])[:3]
    return {**machine(), "workdir": str(workdir), "filesystem": fstype, "device": source,
            "mount_options": options,
            "orthanc": _version(["/usr/sbin/Orthanc", "--version"]),
            "dcmtk": _version(["/usr/bin/storescu", "--version"])}


def server_processes(pid: int) -> list[int]:
    """`pid` and every process under it: a server may hand work to child processes, and what they
    hold is the server's too."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def status_total(pids: list[int], field: str) -> int:
    """One /proc/PID/status field summed over `pids` (kB for Vm* and Rss*, a count for Threads);
    a process that ended meanwhile counts 0."""
    total = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in lines if line.startswith(f"{field}:"))
    return total


def reset_peak_rss(pids: list[int]) -> None:
    """Start a new high-water mark (VmHWM) in each process (clear_refs 5, Linux >= 4.0), so that the
    next reading is the peak of what came after."""
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5\n")
        except FileNotFoundError:  # ended meanwhile
            pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def storescu_acknowledged(log: Path) -> list[Path]:
    """The files a `storescu -v` saw answered Success, from its log (it may have been cut off)."""
    done, sending = [], None
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("I: Sending file: "):
            sending = Path(line.removeprefix("I: Sending file: "))
        elif "Received Store Response (Success)" in line and sending is not None:
            done.append(sending)
            sending = None
    return done


def add_common_arguments(parser) -> None:
    """--quick, --workdir and --results: every benchmark script takes them."""
    parser.add_argument("--quick", action="store_true", help="a tiny corpus: every path, no meaningful numbers")
    parser.add_argument("--workdir", type=Path, help="scratch directory on the file system under test "
                                                      "(default /var/tmp)")
    parser.add_argument("--results", type=Path, help="directory for <name>.json and <name>.md "
                                                     "(default benchmarks/results/<UTC time>/)")


def results_dir(requested: Path | None) -> Path:
    path = requested or RESULTS / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_and_report(name: str, args, run: Callable[[Path], dict], markdown: Callable[[dict], str]) -> int:
    """Run in a fresh scratch directory (removed afterwards), save and print the results."""
    work = Path(tempfile.mkdtemp(prefix=f"pv-{name}-", dir=args.workdir or "/var/tmp"))
    try:
        results = run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["quick"] = bool(args.quick)
    out = results_dir(args.results)
    table = markdown(results)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{name}.md").write_text(table + "\n")
    print(table)
    return 0


def bench_main(name: str, doc: str, run: Callable, markdown: Callable[[dict], str], *, default_ct: int,
               add_arguments: Callable | None = None) -> int:
    """The command line the CT-corpus benchmarks share: --ct N and the common arguments (and
    whatever `add_arguments` adds); `run(work, count, args)` does the measuring."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--ct", type=int, default=default_ct, help="CT instances (512 KB each)")
    add_common_arguments(parser)
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args()
    count = 6 if args.quick else args.ct
    return run_and_report(name, args, lambda work: run(work, count, args), markdown)
