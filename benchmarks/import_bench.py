"""`appliance import` against `cp -r` + `sync` of the same files, in one run on one file system.

    python benchmarks/import_bench.py [--quick] [--ct N] [--big-mb M] [--workdir DIR] [--results DIR]

Measures, each import into a fresh home, alternating with the baseline (cp, import,
cp, import) because these machines are noisy:
- CT study (512x512, 16-bit): MB/s and instances/s of both, and their ratio;
- stored / received bytes on CT;
- peak RSS of `import` and `export` of one large multi-frame instance (and that the
  export is byte-identical).
The physical limits beside them are measured by limits_bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import corpus  # noqa: E402
from common import IMPORT_STUDY_INSTANCES, add_common_arguments, machine, run_and_report  # noqa: E402

APPLIANCE = [sys.executable, "-m", "appliance"]


def timed(command: list[str], **kwargs) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=REPO, **kwargs)
    return time.perf_counter() - start


def peak_rss_mb(command: list[str]) -> float:
    """Run a command; the peak RSS of that one child, from wait4."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed")
    return usage.ru_maxrss / 1024


def cp_sync(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def appliance_import(home: Path, src: Path) -> tuple[float, dict]:
    subprocess.run(APPLIANCE + ["--home", str(home), "init"], check=True, capture_output=True, cwd=REPO)
    seconds = timed(APPLIANCE + ["--home", str(home), "import", str(src)])
    status = subprocess.run(APPLIANCE + ["--home", str(home), "status", "--json"], check=True,
                            capture_output=True, text=True, cwd=REPO)
    return seconds, json.loads(status.stdout)


def run(work: Path, ct_count: int, big_mb: int) -> dict:
    src = work / "ct"
    files = corpus.ct_study(src, ct_count)
    total = sum(p.stat().st_size for p in files)
    cp_times, import_times, status = [], [], {}
    for round_ in range(2):
        cp_times.append(cp_sync(src, work / f"cp{round_}"))
        seconds, status = appliance_import(work / f"home{round_}", src)
        import_times.append(seconds)
        shutil.rmtree(work / f"cp{round_}")
    cp_s, import_s = statistics.median(cp_times), statistics.median(import_times)
    results = {
        "machine": machine(),
        "ct": {"instances": ct_count, "bytes": total,
               "cp_sync_mb_s": total / cp_s / 1e6, "cp_sync_inst_s": ct_count / cp_s,
               "import_mb_s": total / import_s / 1e6, "import_inst_s": ct_count / import_s,
               "import_over_cp_sync": cp_s / import_s, "runs_s": {"cp_sync": cp_times, "import": import_times},
               "stored_over_received": status["stored_bytes"] / status["received_bytes"]},
    }
    big = corpus.multiframe(work / "big" / "big.dcm", big_mb)
    home = work / "bighome"
    subprocess.run(APPLIANCE + ["--home", str(home), "init"], check=True, capture_output=True, cwd=REPO)
    import_rss = peak_rss_mb(APPLIANCE + ["--home", str(home), "import", str(big)])
    import pydicom
    study = pydicom.dcmread(big, stop_before_pixels=True).StudyInstanceUID
    export_rss = peak_rss_mb(APPLIANCE + ["--home", str(home), "export", study, str(work / "bigout")])
    [exported] = list((work / "bigout").glob("*.dcm"))
    results["big"] = {"bytes": big.stat().st_size, "import_peak_rss_mb": import_rss,
                      "export_peak_rss_mb": export_rss,
                      "export_byte_exact": _same_file(exported, big)}
    return results


def _same_file(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def markdown(results: dict) -> str:
    ct, big = results["ct"], results["big"]
    return "\n".join([
        "| measure | value |", "|---|---|",
        f"| CT instances (512x512, 16-bit) | {ct['instances']} ({ct['bytes'] / 1e6:.1f} MB) |",
        f"| cp -r + sync | {ct['cp_sync_mb_s']:.1f} MB/s, {ct['cp_sync_inst_s']:.0f} inst/s |",
        f"| appliance import | {ct['import_mb_s']:.1f} MB/s, {ct['import_inst_s']:.0f} inst/s |",
        f"| import / (cp + sync) | {ct['import_over_cp_sync']:.2f} |",
        f"| stored / received (CT) | {ct['stored_over_received']:.3f} |",
        f"| large instance | {big['bytes'] / 1e6:.0f} MB, byte-exact export: {big['export_byte_exact']} |",
        f"| peak RSS import / export | {big['import_peak_rss_mb']:.0f} MB / {big['export_peak_rss_mb']:.0f} MB |",
        "", f"Machine: {results['machine']}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=IMPORT_STUDY_INSTANCES)
    parser.add_argument("--big-mb", type=int, default=1000)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    ct_count, big_mb = (12, 30) if args.quick else (args.ct, args.big_mb)
    return run_and_report("import", args, lambda work: run(work, ct_count, big_mb), markdown)


if __name__ == "__main__":
    raise SystemExit(main())
