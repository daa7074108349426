"""The benchmarks run every path on a tiny corpus, so they never rot (no speed assertions)."""

import json
import subprocess
import sys

from conftest import REPO


def test_dicom_bench_quick(tmp_path):
    before = set((REPO / "benchmarks" / "results").glob("dicom-*.json"))
    result = subprocess.run([sys.executable, "benchmarks/dicom_bench.py", "--quick", "--workdir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [new] = set((REPO / "benchmarks" / "results").glob("dicom-*.json")) - before
    results = json.loads(new.read_text())
    vault = results["peers"]["pacs-vault"]
    for key in ("ct_ingest_mb_s", "ct_ingest_inst_s", "small_ingest_inst_s", "ct_get_mb_s", "peak_rss_mb"):
        assert vault[key] > 0, key
    assert 0 < vault["stored_over_received"] < 1
    assert "ct_ingest_mb_s vs dcmtk storescp" in results["ratios"]
    assert list(tmp_path.iterdir()) == []  # the work directory is cleaned up


def test_import_bench_quick(tmp_path):
    before = set((REPO / "benchmarks" / "results").glob("import-*.json"))
    result = subprocess.run([sys.executable, "benchmarks/import_bench.py", "--quick", "--workdir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [new] = set((REPO / "benchmarks" / "results").glob("import-*.json")) - before
    results = json.loads(new.read_text())
    for key in ("cp_sync_mb_s", "import_mb_s", "import_inst_s", "import_over_cp_sync"):
        assert results["ct"][key] > 0, key
    assert 0 < results["ct"]["stored_over_received"] < 1
    assert results["big"]["export_byte_exact"] is True
    assert results["big"]["import_peak_rss_mb"] > 0 and results["big"]["export_peak_rss_mb"] > 0
    assert list(tmp_path.iterdir()) == []
