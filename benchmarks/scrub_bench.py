"""Scrub speed against the disk and the codec, and what a rate-limited scrub costs ingest.

    python benchmarks/scrub_bench.py [--quick] [--ct N] [--rate MBPS] [--workdir DIR] [--results DIR]

On a home holding a CT study (N instances on the hot tier):
- fast scrub (sealed-bytes hash) MB/s vs reading the same files with `cat` (page cache
  dropped before each when running as root); the scrub's rate is over the time it reports
  for reading and checking (the wall time with process start is kept beside it);
- deep scrub (decrypt, decompress, SHA-256) MB/s vs the one-core limit of the same work
  on the same blobs held in memory;
- `appliance import` of a second CT study alone, and again while `appliance scrub --rate`
  runs over the first one.
MB/s are sealed (stored) bytes per second.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
import corpus  # noqa: E402
from common import bench_main, machine  # noqa: E402

from appliance import config as cfg  # noqa: E402
from appliance.admin.home import open_archive  # noqa: E402
from appliance.format import sealed  # noqa: E402

APPLIANCE = [sys.executable, "-m", "appliance"]


def _drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _scrub_seconds(home: Path, *args: str) -> tuple[float, float]:
    """(seconds the scrub spent reading and checking, wall seconds including process start)."""
    start = time.perf_counter()
    result = subprocess.run(APPLIANCE + ["--home", str(home), "scrub", "--json", *args], check=True,
                            capture_output=True, text=True, cwd=REPO)
    return json.loads(result.stdout)["seconds"], time.perf_counter() - start


def _timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - start


def _hot_files(home: Path) -> list[Path]:
    return [p for p in (home / "hot").rglob("*") if p.is_file() and ".incoming" not in p.parts]


def _codec_limit(home: Path) -> float:
    """Seconds one core needs to unseal every hot blob from memory (decrypt, decompress, SHA-256)."""
    with open_archive(cfg.load(home)) as archive, archive.catalog.read() as view:
        blobs = [(b.ca, archive.hot.path(b.copies["hot"].name).read_bytes()) for b in view.blobs()]
        start = time.perf_counter()
        for ca, raw in blobs:
            for _ in sealed.unseal(io.BytesIO(raw), key_for=archive.keyring.data_key, content_address=ca):
                pass
        return time.perf_counter() - start


def _import_mb_s(home: Path, source: Path, size: int) -> float:
    return size / 1e6 / _timed(APPLIANCE + ["--home", str(home), "import", str(source)])


def run(work: Path, count: int, rate: int) -> dict:
    home = work / "home"
    subprocess.run(APPLIANCE + ["--home", str(home), "init"], check=True, capture_output=True, cwd=REPO)
    corpus.ct_study(work / "ct", count)
    subprocess.run(APPLIANCE + ["--home", str(home), "import", str(work / "ct")], check=True, capture_output=True,
                   cwd=REPO)
    files = _hot_files(home)
    stored = sum(p.stat().st_size for p in files)
    (work / "list").write_text("\0".join(str(p) for p in files))
    cold = _drop_caches()
    cat = _timed(["sh", "-c", f"xargs -0 cat < {work / 'list'} > /dev/null"])
    _drop_caches()
    fast, fast_wall = _scrub_seconds(home)
    _drop_caches()
    deep, deep_wall = _scrub_seconds(home, "--deep")
    limit = _codec_limit(home)

    # Ingest alone, then beside a rate-limited scrub that loops over the first study.
    second = corpus.ct_study(work / "ct2", count)
    size = sum(p.stat().st_size for p in second)
    alone = _import_mb_s(home, work / "ct2", size)
    third = corpus.ct_study(work / "ct3", count)
    scrubber = subprocess.Popen(["sh", "-c", f"while :; do {' '.join(APPLIANCE)} --home {home} scrub --rate {rate} "
                                             ">/dev/null 2>&1; done"], cwd=REPO)
    try:
        time.sleep(1)
        beside = _import_mb_s(home, work / "ct3", sum(p.stat().st_size for p in third))
    finally:
        scrubber.terminate()
        scrubber.wait()
        subprocess.run(["pkill", "-f", "--", f"--home {home} scrub"], check=False)
    mb = stored / 1e6
    return {"machine": machine(), "instances": count, "stored_mb": round(mb, 1), "cold_cache": cold,
            "fast_mb_s": round(mb / fast, 1), "fast_wall_mb_s": round(mb / fast_wall, 1),
            "deep_wall_mb_s": round(mb / deep_wall, 1), "cat_mb_s": round(mb / cat, 1),
            "fast_over_disk_read": round(cat / fast, 2),
            "deep_mb_s": round(mb / deep, 1), "codec_limit_mb_s": round(mb / limit, 1),
            "deep_over_codec_limit": round(limit / deep, 2),
            "scrub_rate_mb_s": rate, "ingest_alone_mb_s": round(alone, 1), "ingest_beside_scrub_mb_s": round(beside, 1),
            "ingest_kept": round(beside / alone, 2)}


def markdown(r: dict) -> str:
    return "\n".join([
        f"Scrub: {r['instances']} CT instances, {r['stored_mb']} MB sealed, {r['machine']['cores']} cores, "
        f"{'page cache dropped before each read' if r['cold_cache'] else 'warm page cache'}; scrub MB/s over "
        f"its reading and checking (with process start and index scan: fast {r['fast_wall_mb_s']}, "
        f"deep {r['deep_wall_mb_s']} MB/s)", "",
        "| measure | pacs-vault | baseline | ratio |", "|---|---:|---|---:|",
        f"| fast scrub | {r['fast_mb_s']} MB/s | cat of the same files: {r['cat_mb_s']} MB/s | "
        f"{r['fast_over_disk_read']} |",
        f"| deep scrub | {r['deep_mb_s']} MB/s | one-core unseal in memory: {r['codec_limit_mb_s']} MB/s | "
        f"{r['deep_over_codec_limit']} |",
        f"| import beside `scrub --rate {r['scrub_rate_mb_s']}` | {r['ingest_beside_scrub_mb_s']} MB/s | "
        f"import alone: {r['ingest_alone_mb_s']} MB/s | {r['ingest_kept']} |"])


def _arguments(parser) -> None:
    parser.add_argument("--rate", type=int, default=50, help="MB/s of the scrub running beside the import")


def main() -> int:
    return bench_main("scrub", __doc__, lambda work, count, args: run(work, count, args.rate), markdown,
                      default_ct=1000, add_arguments=_arguments)


if __name__ == "__main__":
    sys.exit(main())
