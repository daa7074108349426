"""The benchmarks run every path on a tiny corpus, so they never rot (no speed assertions)."""

import json
import subprocess
import sys


from conftest import REPO


def _quick(script: str, name: str, tmp_path) -> dict:
    results_dir = REPO / "benchmarks" / "results"
    before = set(results_dir.glob(f"{name}-*.json"))
    result = subprocess.run([sys.executable, f"benchmarks/{script}", "--quick", "--workdir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    assert list(tmp_path.iterdir()) == []  # the scratch directory is cleaned up
    [new] = set(results_dir.glob(f"{name}-*.json")) - before
    return json.loads(new.read_text())


def test_dicom_bench_quick(tmp_path):
    results = _quick("dicom_bench.py", "dicom", tmp_path)
    vault = results["peers"]["pacs-vault"]
    for key in ("ct_ingest_mb_s", "ct_ingest_inst_s", "ct_parallel_ingest_mb_s", "small_ingest_inst_s",
                "ct_get_mb_s", "ct_move_mb_s", "peak_rss_mb"):
        assert vault[key] > 0, key
    assert 0 < vault["stored_over_received"] < 1
    assert "ct_ingest_mb_s vs dcmtk storescp" in results["ratios"]
    assert "ct_ingest_inst_s vs pacs-vault (audit off)" in results["ratios"]  # what the audit trail costs


def test_import_bench_quick(tmp_path):
    results = _quick("import_bench.py", "import", tmp_path)
    for key in ("cp_sync_mb_s", "import_mb_s", "import_inst_s", "import_over_cp_sync"):
        assert results["ct"][key] > 0, key
    assert 0 < results["ct"]["stored_over_received"] < 1
    assert results["big"]["export_byte_exact"] is True
    assert results["big"]["import_peak_rss_mb"] > 0 and results["big"]["export_peak_rss_mb"] > 0


def test_find_bench_quick(tmp_path):
    results = _quick("find_bench.py", "find", tmp_path)
    assert results["studies"] > 0
    for shape, row in results["queries"].items():
        assert row["median_ms"] > 0 and row["p95_ms"] >= row["median_ms"], shape
    assert results["queries"]["PatientID"]["mean_matches"] >= 1  # every patient has studies
    assert results["queries"]["StudyInstanceUID"]["mean_matches"] == 1


def test_tier_bench_quick(tmp_path):
    results = _quick("tier_bench.py", "tiers", tmp_path)
    assert set(results["rows"]) == {"migrate to cartridge dir", "migrate to S3", "recall from cartridge dir",
                                    "recall from S3"}
    for name, row in results["rows"].items():
        assert row["pacs_vault_mb_s"] > 0 and row["baseline_mb_s"] > 0, name


def test_scrub_bench_quick(tmp_path):
    results = _quick("scrub_bench.py", "scrub", tmp_path)
    for key in ("fast_mb_s", "cat_mb_s", "deep_mb_s", "codec_limit_mb_s", "ingest_alone_mb_s",
                "ingest_beside_scrub_mb_s"):
        assert results[key] > 0, key


def test_replicate_bench_quick(tmp_path):
    results = _quick("replicate_bench.py", "replicate", tmp_path)
    assert results["replicate_mb_s"] > 0 and results["rsync_mb_s"] > 0
    assert results["drill"]["byte_exact"] is True
