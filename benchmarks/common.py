"""What every benchmark script shares: the machine's description, a scratch directory on the
file system under test, and where results go (JSON + markdown under benchmarks/results/)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "kernel": platform.release()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_and_report(name: str, workdir: Path | None, run: Callable[[Path], dict],
                   markdown: Callable[[dict], str]) -> int:
    """Run in a fresh scratch directory (removed afterwards), save and print the results."""
    work = Path(tempfile.mkdtemp(prefix=f"pv-{name}-", dir=workdir or "/var/tmp"))
    try:
        results = run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    table = markdown(results)
    (RESULTS / f"{name}-{stamp}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{name}-{stamp}.md").write_text(table + "\n")
    print(table)
    return 0


def bench_main(name: str, doc: str, run: Callable, markdown: Callable[[dict], str], *, default_ct: int,
               add_arguments: Callable | None = None) -> int:
    """The command line the CT-corpus benchmarks share: --quick, --ct N, --workdir DIR (and
    whatever `add_arguments` adds); `run(work, count, args)` does the measuring."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny corpus: every path, no meaningful numbers")
    parser.add_argument("--ct", type=int, default=default_ct, help="CT instances (512 KB each)")
    parser.add_argument("--workdir", type=Path, help="scratch directory on the file system under test")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args()
    count = 6 if args.quick else args.ct
    return run_and_report(name, args.workdir, lambda work: run(work, count, args), markdown)
