"""Replication throughput against a plain `rsync -a` of the same bytes, and the DR drill's duration.

    python benchmarks/replicate_bench.py [--quick] [--ct N] [--workdir DIR] [--results DIR]

A CT study (N instances) is imported into a fresh home. Measured in one run:
- `appliance replicate` to an empty local target (rsync, then every object read back and
  hashed, sealed index snapshot and manifest) vs `rsync -a` of the hot tier's files to
  another empty directory; both followed by `sync`;
- the disaster-recovery drill: `appliance restore` into a new home from that copy and the
  key file, `appliance fsck`, and `appliance export` of the whole study, each timed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import corpus  # noqa: E402
from common import bench_main, machine  # noqa: E402

APPLIANCE = [sys.executable, "-m", "appliance"]


def _timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=REPO)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def run(work: Path, count: int) -> dict:
    home = work / "home"
    files = corpus.ct_study(work / "ct", count)
    subprocess.run(APPLIANCE + ["--home", str(home), "init"], check=True, capture_output=True, cwd=REPO)
    subprocess.run(APPLIANCE + ["--home", str(home), "import", str(work / "ct")], check=True, capture_output=True,
                   cwd=REPO)
    stored = sum(p.stat().st_size for p in (home / "hot").rglob("*") if p.is_file())
    plain = _timed(["rsync", "-a", f"{home / 'hot'}/", f"{work / 'plain'}/"])
    replicate = _timed(APPLIANCE + ["--home", str(home), "replicate"])
    offsite, key = work / "offsite", work / "kek.key"
    shutil.move(str(home / "offsite"), offsite)
    shutil.copy2(home / "kek.key", key)
    shutil.rmtree(home)
    new_home = work / "restored"
    restore = _timed(APPLIANCE + ["--home", str(new_home), "restore", "--from", str(offsite), "--key-file", str(key)])
    fsck = _timed(APPLIANCE + ["--home", str(new_home), "fsck"])
    uid = _study_uid(files[0])
    export = _timed(APPLIANCE + ["--home", str(new_home), "export", uid, str(work / "out")])
    exact = sorted(p.read_bytes() for p in (work / "out").iterdir()) == sorted(p.read_bytes() for p in files)
    mb = stored / 1e6
    return {"machine": machine(), "instances": count, "stored_mb": round(mb, 1),
            "replicate_mb_s": round(mb / replicate, 1), "rsync_mb_s": round(mb / plain, 1),
            "replicate_over_rsync": round(plain / replicate, 2),
            "drill": {"restore_s": round(restore, 2), "fsck_s": round(fsck, 2), "export_s": round(export, 2),
                      "total_s": round(restore + fsck + export, 2), "byte_exact": exact}}


def _study_uid(path: Path) -> str:
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID


def markdown(r: dict) -> str:
    d = r["drill"]
    return "\n".join([
        f"Replication: {r['instances']} CT instances, {r['stored_mb']} MB sealed, {r['machine']['cores']} cores", "",
        "| measure | pacs-vault | baseline | ratio |", "|---|---:|---|---:|",
        f"| replicate to a local target (incl. read-back verify) | {r['replicate_mb_s']} MB/s | "
        f"rsync -a of the same files: {r['rsync_mb_s']} MB/s | {r['replicate_over_rsync']} |",
        f"| DR drill: restore + fsck + export of the study | {d['total_s']} s (restore {d['restore_s']} s, "
        f"fsck {d['fsck_s']} s, export {d['export_s']} s), byte-exact: {d['byte_exact']} | | |"])


def main() -> int:
    return bench_main("replicate", __doc__, lambda work, count, args: run(work, count), markdown, default_ct=400)


if __name__ == "__main__":
    sys.exit(main())
