"""The whole benchmark suite in one command (`make bench`): every script, then a summary.

    python benchmarks/suite.py [--quick] [--workdir DIR] [--results DIR] [--only LIST] [--soak-minutes M]
                               [--powercut-cuts N]

Runs, one after the other so that none disturbs another, the physical limits, the
DICOM side-by-side (pacs-vault, Orthanc with compression off and on, dcmtk storescp),
C-FIND over a bulk-loaded index, import against cp, scrub against reading the same
bytes, the cold tiers, off-site replication, DICOMweb against Orthanc's DICOMweb plugin,
power cuts during C-STORE (pacs-vault and Orthanc, 100 cuts per archive and cut mode
unless --powercut-cuts), and last the soak (30 minutes of everything at once unless
--soak-minutes). Each writes <name>.json and <name>.md into the results
directory (default benchmarks/results/<UTC time>/); the suite adds summary.md and
summary.json: the machine, every goal with its measured value, and every script's table.
`--quick` runs every path on a tiny corpus, the soak for under a minute (no meaningful numbers).
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
           ("replicate", "replicate_bench.py"), ("web", "web_bench.py"), ("powercut", "powercut_bench.py"),
           ("soak", "soak_bench.py")]
POWERCUT_CUTS = 100  # per archive and cut mode: two modes, so 200 cuts of each archive
ORTHANC_OFF, ORTHANC_ON = "Orthanc (compression off)", "Orthanc (compression on)"
SYNC_PEERS = ("pacs-vault", ORTHANC_OFF, "dcmtk storescp")  # dicom_bench's untimed pass under strace
_COMPARE = {">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq}


def goals(results: dict) -> list[dict]:
    """Every goal of the suite with what this run measured (None: not measured in this run): issue
    16's table first, then the goals kept from before it and the soak's. A goal may have a floor
    beside its target, the least that is acceptable (same operator); one without a target is reported."""
    dicom = results.get("dicom", {})
    ratios, vault, syncs = dicom.get("ratios", {}), dicom.get("peers", {}).get("pacs-vault", {}), dicom.get("syncs", {})
    find = results.get("find", {}).get("queries", {})
    imported = results.get("import", {}).get("ct", {}).get("import_mb_s")
    sealing_limit = results.get("limits", {}).get("sealing", {}).get("two_processes_synced_files_mb_s")
    soak = results.get("soak", {})
    powercut = results.get("powercut", {})

    def lost(archive: str) -> int | None:
        rows = [row for key, row in powercut.get("rows", {}).items() if key.startswith(archive + " ")]
        return sum(row["lost"] for row in rows) if rows else None

    def acknowledged(archive: str) -> int:
        return sum(row["acknowledged"] for key, row in powercut.get("rows", {}).items()
                   if key.startswith(archive + " "))
    web = results.get("web", {})
    web_ratios = web.get("ratios", {})
    web_million = max((row["median_ms"] for row in web.get("million", {}).get("queries", {}).values()), default=None)

    def ratio(key: str, peer: str = ORTHANC_OFF) -> float | None:
        return ratios.get(f"{key} vs {peer}")

    rss = vault.get("peak_rss_mb_by_phase", {})
    rss_peak = max(rss["ct_parallel"], rss["big"]) if "ct_parallel" in rss and "big" in rss else None
    rss_goal = ("peak server RSS MB, 4 CT associations storing at once, and a "
                f"{vault.get('big_instance_mb', 0):.0f} MB instance stored and sent back byte-exact")
    multiframe_mb = dicom.get("corpus", {}).get("multiframe_bytes", 0) / 1e6
    find_median = max((row["median_ms"] for row in find.values()), default=None)
    # (goal, measured, operator, target, floor)
    rows = [
        ("C-STORE CT, one association, vs Orthanc (compression off)", ratio("ct_ingest_mb_s"), ">=", 1.5, 1.0),
        ("C-STORE CT, 4 associations, vs Orthanc (compression off)", ratio("ct_parallel_ingest_mb_s"), ">=", 1.0, None),
        ("C-STORE ~10 KB instances vs Orthanc (compression off)", ratio("small_ingest_inst_s"), ">=", 1.0, None),
        ("C-STORE MR vs Orthanc (compression off)", ratio("mr_ingest_inst_s"), ">=", 1.0, None),
        (f"C-STORE one {multiframe_mb:.0f} MB multi-frame instance vs Orthanc (compression off)",
         ratio("multiframe_ingest_mb_s"), ">=", 1.5, None),
        ("C-GET CT study vs Orthanc (compression off)", ratio("ct_get_mb_s"), ">=", 1.5, 1.0),
        ("C-MOVE CT study vs Orthanc (compression off)", ratio("ct_move_mb_s"), ">=", 1.5, 1.0),
        ("C-GET the multi-frame instance vs Orthanc (compression off)", ratio("multiframe_get_mb_s"), ">=", 1.5, 1.0),
        ("C-GET a JPEG 2000 lossless CT study by a client taking uncompressed syntaxes only (transcoded, MB/s "
         "decoded) vs Orthanc (compression off, GDCM plugin)", ratio("ct_j2k_get_mb_s"), ">=", 1.0, None),
        ("import CT MB/s vs the two-core sealing limit (sealing from memory into synced files)",
         None if imported is None or sealing_limit is None else imported / sealing_limit, ">=", 0.8, None),
        ("stored / received bytes, CT at rest", vault.get("ct_stored_over_received"), "<=", 0.5, None),
        (rss_goal, rss_peak, "<", 300, None),
        *((f"syncs per acknowledged instance, {peer}"
           + (f"; durable before Success: {syncs[peer]['durable_before_success']}" if peer in syncs else ""),
           syncs.get(peer, {}).get("syncs_per_acknowledged_instance"), None, None, None) for peer in SYNC_PEERS),
        ("C-STORE CT vs Orthanc (compression on)", ratio("ct_ingest_mb_s", ORTHANC_ON), ">=", 10, None),
        ("C-FIND study level, median ms (slowest query shape)", find_median, "<", 50, None),
        ("STOW-RS CT study, one client, vs Orthanc (DICOMweb plugin)", web_ratios.get("stow_ct_mb_s vs Orthanc"),
         ">=", 1.0, None),
        ("STOW-RS CT studies, 4 clients, vs Orthanc (DICOMweb plugin)",
         web_ratios.get("stow_ct_parallel_mb_s vs Orthanc"), ">=", 1.0, None),
        ("WADO-RS CT study vs Orthanc (DICOMweb plugin)", web_ratios.get("wado_study_mb_s vs Orthanc"), ">=", 1.0, None),
        ("WADO-RS CT study metadata, first request, vs Orthanc (DICOMweb plugin)",
         web_ratios.get("wado_metadata_first_inst_s vs Orthanc"), ">=", 1.0, None),
        ("WADO-RS CT study metadata, repeated (best of three), vs Orthanc (DICOMweb plugin)",
         web_ratios.get("wado_metadata_inst_s vs Orthanc"), ">=", 1.0, None),
        ("QIDO-RS study searches on an index both hold vs Orthanc (DICOMweb plugin)",
         web_ratios.get("qido_time vs Orthanc"), ">=", 1.0, None),
        ("QIDO-RS study level on the bulk-loaded index, median ms (slowest query shape)", web_million, "<", 50, None),
        ("peak server RSS MB, DICOMweb (STOW-RS, WADO-RS, QIDO-RS)",
         web.get("peers", {}).get("pacs-vault", {}).get("peak_rss_mb"), "<", 300, None),
        (f"acknowledged instances lost after {2 * powercut.get('cuts', 0)} power cuts during C-STORE, pacs-vault "
         f"(of {acknowledged('pacs-vault')} acknowledged)", lost("pacs-vault"), "==", 0, None),
        (f"acknowledged instances lost after {2 * powercut.get('cuts', 0)} power cuts during C-STORE, Orthanc "
         f"with its defaults (of {acknowledged('orthanc')} acknowledged)", lost("orthanc"), None, None, None),
        (f"soak, {soak.get('seconds', 0) / 60:.1f} min of everything at once: errors", soak.get("errors_total"),
         "==", 0, None),
        # Anonymous memory is what a leak grows; RSS also counts the index's mapped pages, which grow
        # with what is stored and the kernel takes back when it needs them.
        ("soak: server anonymous RSS slope, MB per hour (least squares)",
         soak.get("resources", {}).get("rss_anon_mb", {}).get("slope_per_hour"), None, None, None),
        ("soak: server RSS slope, MB per hour, the index's mapped pages included",
         soak.get("resources", {}).get("rss_mb", {}).get("slope_per_hour"), None, None, None),
    ]
    # The RSS goal is met only when what came back was the data set that went in.
    exact = {rss_goal: vault.get("big_byte_exact") is True}

    def met(name: str, value, op: str | None, bound) -> bool | None:
        if value is None or bound is None:
            return None
        return _COMPARE[op](value, bound) and exact.get(name, True)

    return [{"goal": name, "measured": value, "target": None if target is None else f"{op} {target}",
             "floor": None if floor is None else f"{op} {floor}", "met": met(name, value, op, target),
             "floor_met": met(name, value, op, floor)}
            for name, value, op, target, floor in rows]


def _shown(goal: dict) -> str:
    if goal["measured"] is None:
        return "not measured"
    if goal["target"] is None:
        return "reported"
    if goal["met"]:
        return "yes"
    return "floor only" if goal["floor_met"] else "no"


def summary_markdown(summary: dict, tables: dict) -> str:
    m = summary["machine"]
    lines = [f"# pacs-vault benchmarks, {summary['finished']}{' (quick: no meaningful numbers)' if summary['quick'] else ''}",
             "", "Machine: " + ", ".join(f"{k}: {v}" for k, v in m.items()), "",
             "| goal | measured | target | floor | met |", "|---|---:|---|---|---|"]
    for goal in summary["goals"]:
        value = goal["measured"]
        shown = "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"| {goal['goal']} | {shown} | {goal['target'] or ''} | {goal['floor'] or ''} | {_shown(goal)} |")
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
    parser.add_argument("--soak-minutes", type=float,
                        help="how long the soak runs (default 30; --quick: under a minute)")
    parser.add_argument("--powercut-cuts", type=int, default=POWERCUT_CUTS,
                        help=f"power cuts per archive and cut mode (default {POWERCUT_CUTS}; --quick: 3)")
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
        command += ["--minutes", str(args.soak_minutes)] if name == "soak" and args.soak_minutes else []
        command += ["--cuts", str(args.powercut_cuts)] if name == "powercut" and not args.quick else []
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
