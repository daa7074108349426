"""Migration and recall throughput against the plain tools, in one run on one machine.

    python benchmarks/tier_bench.py [--quick] [--ct N] [--workdir DIR] [--results DIR]

A CT study is imported into a fresh home with a tape tier (a cartridge directory on
the file system under test) and an S3 tier (SeaweedFS on 127.0.0.1, started here).
Measured, each beside its baseline moving the same bytes:
- migration to the cartridge (pack, read back, verify) vs `cp -r` + `sync` of the hot
  tier's sealed files to another directory;
- migration to S3 (pack, upload with SHA-256 checksums, read back, verify) vs a plain
  boto3 `upload_file` of a file of the same size;
- recall from the cartridge (read, verify, write to hot, fsync) vs `cp -r` + `sync` back;
- recall from S3 with the cartridge unloaded vs a plain boto3 `download_file`.
MB/s are sealed (stored) bytes per second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import corpus  # noqa: E402
from common import bench_main, machine  # noqa: E402
from s3server import SeaweedS3  # noqa: E402

from appliance import config as cfg  # noqa: E402
from appliance.admin.home import open_archive  # noqa: E402
from appliance.admin import home as home_mod  # noqa: E402
from appliance.backends.ltfs import LABEL_FILE, label_text  # noqa: E402
from appliance.jobs import lifecycle  # noqa: E402
from appliance.jobs.policy import check_policies  # noqa: E402
from appliance.store import tiering  # noqa: E402


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cp_sync(src: Path, dst: Path) -> float:
    return _timed(lambda: (subprocess.run(["cp", "-r", str(src), str(dst)], check=True),
                           subprocess.run(["sync"], check=True)))


def _setup(work: Path, server: SeaweedS3, files: list[Path]) -> tuple[cfg.Config, str]:
    home = work / "home"
    home_mod.init(home)
    cartridge = work / "cartridge"
    cartridge.mkdir()
    (cartridge / LABEL_FILE).write_text(label_text("PV0001L9"))
    (home / "tiers" / "tape.yaml").write_text(
        f"name: tape\nkind: ltfs\ncartridges:\n  - {{label: PV0001L9, path: {cartridge}, capacity_mb: 10000000}}\n")
    bucket = f"bench-{os.getpid()}"
    server.client().create_bucket(Bucket=bucket)
    (home / "s3-credentials").write_text("[default]\naws_access_key_id = bench\naws_secret_access_key = bench\n")
    (home / "tiers" / "s3.yaml").write_text(
        f"name: s3\nkind: s3\ns3:\n  bucket: {bucket}\n  endpoint_url: {server.endpoint}\n"
        "  credentials_file: s3-credentials\n")
    (home / "policies" / "default.yaml").write_text(
        "classes:\n  - name: all\n    retention: {keep_forever: true}\n"
        "    transitions:\n      - {after_days: 0, to: [TIER], keep_hot: true}\n")
    config = cfg.load(home)
    with open_archive(config, writer=True) as archive:
        for path in files:
            archive.store_file(path)
        return config, archive.study_uids()[0]


def _migrate(config: cfg.Config, tier: str) -> float:
    policy = config.policies_path / "default.yaml"
    policy.write_text(policy.read_text().replace("TIER", tier))
    try:
        with open_archive(config, writer=True) as archive:
            engine = lifecycle.Lifecycle(archive, check_policies(config))
            seconds = _timed(engine.apply)
            failed = [job["error"] for job in lifecycle.jobs(archive).values()]
            if failed:
                raise RuntimeError(f"migration to {tier} failed: {failed[0]}")
        return seconds
    finally:
        policy.write_text(policy.read_text().replace(tier, "TIER"))


def _recall(config: cfg.Config, study_uid: str, tiers: list[str]) -> float:
    with open_archive(config, writer=True) as archive:
        tiering.drop_hot(archive, study_uid, tiers)
        return _timed(lambda: archive.recall_study(study_uid))


def run(work: Path, count: int) -> dict:
    files = corpus.ct_study(work / "ct", count)
    server = SeaweedS3(work / "seaweedfs").start()
    try:
        config, study_uid = _setup(work, server, files)
        hot = config.resolve(config.hot_tier.path)
        stored = sum(p.stat().st_size for p in hot.rglob("*") if p.is_file() and ".incoming" not in p.parts)
        cp_to = _cp_sync(hot, work / "cp-copy")
        to_tape = _migrate(config, "tape")
        to_s3 = _migrate(config, "s3")
        blob = work / "same-size"
        with open(blob, "wb") as fp:
            fp.write(os.urandom(stored))
        client = server.client()
        boto_up = _timed(lambda: client.upload_file(str(blob), f"bench-{os.getpid()}", "plain/object"))
        boto_down = _timed(lambda: client.download_file(f"bench-{os.getpid()}", "plain/object", str(work / "down")))
        cp_back = _cp_sync(work / "cp-copy", work / "cp-back")
        from_tape = _recall(config, study_uid, ["tape", "s3"])
        os.rename(work / "cartridge", work / "shelf")  # the cartridge is out: S3 serves the recall
        from_s3 = _recall(config, study_uid, ["tape", "s3"])
        os.rename(work / "shelf", work / "cartridge")
    finally:
        server.stop()
    mb = stored / 1e6

    def rate(seconds: float) -> float:
        return round(mb / seconds, 1)

    rows = {
        "migrate to cartridge dir": (rate(to_tape), "cp -r + sync", rate(cp_to)),
        "migrate to S3": (rate(to_s3), "boto3 upload_file", rate(boto_up)),
        "recall from cartridge dir": (rate(from_tape), "cp -r + sync", rate(cp_back)),
        "recall from S3": (rate(from_s3), "boto3 download_file", rate(boto_down)),
    }
    return {"machine": machine(), "instances": count, "stored_mb": round(mb, 1),
            "rows": {k: {"pacs_vault_mb_s": v[0], "baseline": v[1], "baseline_mb_s": v[2],
                         "ratio": round(v[0] / v[2], 2)} for k, v in rows.items()}}


def markdown(results: dict) -> str:
    lines = [f"Tiers: {results['instances']} CT instances, {results['stored_mb']} MB sealed, "
             f"{results['machine']['cores']} cores", "",
             "| operation | pacs-vault MB/s | baseline | baseline MB/s | ratio |", "|---|---:|---|---:|---:|"]
    for name, row in results["rows"].items():
        lines.append(f"| {name} | {row['pacs_vault_mb_s']} | {row['baseline']} | {row['baseline_mb_s']} | "
                     f"{row['ratio']} |")
    return "\n".join(lines)


def main() -> int:
    return bench_main("tiers", __doc__, lambda work, count, args: run(work, count), markdown, default_ct=400)


if __name__ == "__main__":
    sys.exit(main())
