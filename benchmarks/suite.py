"""The whole benchmark suite in one command (`make bench`): every script, then a summary.

    python benchmarks/suite.py [--quick] [--workdir DIR] [--results DIR]

Runs, one after the other so that none disturbs another, the physical limits, the
DICOM side-by-side (pacs-vault, Orthanc with compression off and on, dcmtk storescp),
C-FIND over a bulk-loaded index, import against cp, scrub against reading the same
bytes, the cold tiers and off-site replication. Each writes <name>.json and <name>.md
into the results directory (default benchmarks/results/<UTC time>/); the suite adds
summary.md and summary.json: the machine, every goal with its measured ratio, and
every script's table. `--quick` runs every path on a tiny corpus (no meaningful numbers).
"""

from __future__ import annotations

import argparse
import json
import operator
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import describe_machine, results_dir  # noqa: E402

SCRIPTS = [("limits", "limits_bench.py"), ("dicom", "dicom_bench.py"), ("find", "find_bench.py"),
           ("import", "import_bench.py"), ("scrub", "scrub_bench.py"), ("tiers", "tier_bench.py"),
           ("replicate", "replicate_bench.py")]
ORTHANC_OFF, ORTHANC_ON = "Orthanc (compression off)", "Orthanc (compression on)"
_COMPARE = {">=": operator.ge, "<": operator.lt, "<=": operator.le}


def goals(results: dict) -> list[dict]:
    """Every goal of the suite with what this run measured (None: not measured in this run)."""
    dicom = results.get("dicom", {})
    ratios, vault = dicom.get("ratios", {}), dicom.get("peers", {}).get("pacs-vault", {})
    find = results.get("find", {}).get("queries", {})

    def ratio(key: str, peer: str) -> float | None:
        return ratios.get(f"{key} vs {peer}")

    find_median = max((row["median_ms"] for row in find.values()), default=None)
    big_rss = vault.get("peak_rss_mb") if "big_instance_mb" in vault else None
    rss_goal = (f"peak server RSS MB, storing and sending back a {vault.get('big_instance_mb', 0):.0f} MB instance "
                "byte-exact")
    rows = [
        ("CT ingest MB/s vs Orthanc, compression off", ratio("ct_ingest_mb_s", ORTHANC_OFF), ">=", 1.0),
        ("CT ingest instances/s vs Orthanc, compression off", ratio("ct_ingest_inst_s", ORTHANC_OFF), ">=", 1.0),
        ("CT ingest, 4 associations, MB/s vs Orthanc, compression off",
         ratio("ct_parallel_ingest_mb_s", ORTHANC_OFF), ">=", 1.0),
        ("CT ingest MB/s vs Orthanc, compression on", ratio("ct_ingest_mb_s", ORTHANC_ON), ">=", 10),
        ("~10 KB instances/s vs Orthanc, compression off", ratio("small_ingest_inst_s", ORTHANC_OFF), ">=", 1.0),
        ("MR ingest instances/s vs Orthanc, compression off", ratio("mr_ingest_inst_s", ORTHANC_OFF), ">=", 1.0),
        ("C-GET MB/s vs Orthanc, compression off", ratio("ct_get_mb_s", ORTHANC_OFF), ">=", 1.0),
        ("C-MOVE MB/s vs Orthanc, compression off", ratio("ct_move_mb_s", ORTHANC_OFF), ">=", 1.0),
        ("C-FIND study level, median ms (slowest query shape)", find_median, "<", 50),
        (rss_goal, big_rss, "<", 300),
        ("stored / received bytes, CT", vault.get("ct_stored_over_received"), "<=", 0.5),
    ]
    # The RSS goal is met only when what came back was the data set that went in.
    exact = {rss_goal: vault.get("big_byte_exact") is True}
    return [{"goal": name, "measured": value, "target": f"{op} {bound}",
             "met": None if value is None else _COMPARE[op](value, bound) and exact.get(name, True)}
            for name, value, op, bound in rows]


def summary_markdown(summary: dict, tables: dict) -> str:
    m = summary["machine"]
    lines = [f"# pacs-vault benchmarks, {summary['finished']}{' (quick: no meaningful numbers)' if summary['quick'] else ''}",
             "", "Machine: " + ", ".join(f"{k}: {v}" for k, v in m.items()), "",
             "| goal | measured | target | met |", "|---|---:|---|---|"]
    for goal in summary["goals"]:
        value = "-" if goal["measured"] is None else f"{goal['measured']:.2f}"
        met = {True: "yes", False: "no", None: "not measured"}[goal["met"]]
        lines.append(f"| {goal['goal']} | {value} | {goal['target']} | {met} |")
    for name, table in tables.items():
        lines += ["", f"## {name}", "", table.rstrip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny corpus: every path, no meaningful numbers")
    parser.add_argument("--workdir", type=Path, help="scratch directory on the file system under test "
                                                      "(default /var/tmp)")
    parser.add_argument("--results", type=Path, help="default benchmarks/results/<UTC time>/")
    parser.add_argument("--only", help="comma-separated subset of: " + ", ".join(name for name, _ in SCRIPTS))
    args = parser.parse_args(argv)
    out = results_dir(args.results)
    chosen = [name.strip() for name in args.only.split(",")] if args.only else [name for name, _ in SCRIPTS]
    unknown = set(chosen) - {name for name, _ in SCRIPTS}
    if unknown:
        parser.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
    failed = []
    for name, script in SCRIPTS:
        if name not in chosen:
            continue
        command = [sys.executable, str(HERE / script), "--results", str(out)]
        command += ["--quick"] if args.quick else []
        command += ["--workdir", str(args.workdir)] if args.workdir else []
        print(f"== {name}", flush=True)
        started = time.monotonic()
        if subprocess.run(command).returncode != 0:
            failed.append(name)
        print(f"== {name}: {time.monotonic() - started:.0f} s", flush=True)
    # Only what this invocation ran: a reused results directory may hold older files.
    results = {name: json.loads((out / f"{name}.json").read_text())
               for name in chosen if name not in failed and (out / f"{name}.json").exists()}
    tables = {name: (out / f"{name}.md").read_text() for name in results}
    summary = {"finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": args.quick,
               "machine": describe_machine(args.workdir or Path("/var/tmp")), "goals": goals(results),
               "failed": failed}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary, tables))
    print(f"results: {out}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
