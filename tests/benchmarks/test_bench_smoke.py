"""`make bench` on a tiny corpus: every script and every path runs, so the suite never rots.
No speed is asserted; the results must be complete and say what they measured."""

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory):
    results, work = tmp_path_factory.mktemp("results"), tmp_path_factory.mktemp("work")
    run = subprocess.run([sys.executable, "benchmarks/suite.py", "--quick", "--workdir", str(work),
                          "--results", str(results)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert list(work.iterdir()) == []  # every scratch directory is cleaned up
    return {path.stem: json.loads(path.read_text()) for path in results.glob("*.json")}, results


def test_the_summary_lists_every_goal_with_a_measured_value(quick_suite):
    results, directory = quick_suite
    summary = results["summary"]
    assert summary["quick"] is True and summary["failed"] == []
    assert {"cpu", "cores", "memory_gb", "filesystem", "device", "orthanc", "dcmtk"} <= set(summary["machine"])
    for goal in summary["goals"]:
        assert goal["measured"] is not None, goal["goal"]
        # A goal without a target is reported only; one with a floor is checked against both.
        assert goal["met"] in ((None,) if goal["target"] is None else (True, False)), goal["goal"]
        assert goal["floor_met"] in ((None,) if goal["floor"] is None else (True, False)), goal["goal"]
    names = [goal["goal"] for goal in summary["goals"]]
    for peer in ("pacs-vault", "Orthanc (compression off)", "dcmtk storescp"):
        assert any(name.startswith(f"syncs per acknowledged instance, {peer}; durable before Success: ")
                   for name in names), peer
    assert any(name.startswith("import CT MB/s vs the two-core sealing limit") for name in names)
    assert any(name.startswith("soak, ") for name in names)
    for archive in ("pacs-vault", "Orthanc"):
        assert any(name.startswith("acknowledged instances lost after 6 power cuts during C-STORE, " + archive)
                   for name in names), archive
    text = (directory / "summary.md").read_text()
    assert "| goal | measured | target | floor | met |" in text
    assert "## dicom" in text and "## limits" in text and "## soak" in text


def test_dicom_side_by_side_covers_every_workload_and_peer(quick_suite):
    dicom = quick_suite[0]["dicom"]
    assert set(dicom["peers"]) == {"pacs-vault", "pacs-vault (audit off)", "dcmtk storescp",
                                   "Orthanc (compression off)", "Orthanc (compression on)"}
    vault = dicom["peers"]["pacs-vault"]
    assert set(vault["peak_rss_mb_by_phase"]) == {"ct", "ct_parallel", "small", "mr", "multiframe", "retrieve", "big"}
    for key in ("ct_ingest_mb_s", "ct_ingest_inst_s", "ct_parallel_ingest_mb_s", "small_ingest_inst_s",
                "mr_ingest_inst_s", "multiframe_ingest_mb_s", "ct_get_mb_s", "ct_move_mb_s", "multiframe_get_mb_s",
                "ct_j2k_get_mb_s", "big_ingest_mb_s", "big_get_mb_s", "peak_rss_mb"):
        assert vault[key] > 0, key
    assert vault["big_byte_exact"] is True
    assert 0 < vault["ct_stored_over_received"] < 1 and 0 < vault["stored_over_received"] < 1
    assert "ct_ingest_mb_s vs dcmtk storescp" in dicom["ratios"]
    assert "ct_j2k_get_mb_s vs Orthanc (compression off)" in dicom["ratios"]  # Orthanc transcodes it too
    assert "ct_ingest_inst_s vs pacs-vault (audit off)" in dicom["ratios"]  # what the audit trail costs
    assert "ct_get_mb_s" not in dicom["peers"]["dcmtk storescp"]  # storescp serves no retrieval


def test_syncs_per_acknowledged_instance_for_each_peer(quick_suite):
    syncs = quick_suite[0]["dicom"]["syncs"]
    assert set(syncs) == {"pacs-vault", "Orthanc (compression off)", "dcmtk storescp"}
    for peer, row in syncs.items():
        assert row["acknowledged"] == row["instances"] > 0, peer
        assert row["syncs_per_acknowledged_instance"] >= 0 and row["sync_ms_per_acknowledged_instance"] >= 0, peer
        assert row["durable_before_success"], peer
    assert syncs["pacs-vault"]["syncs"] > 0  # it acknowledges only what is on disk


def test_physical_limits(quick_suite):
    limits = quick_suite[0]["limits"]
    for key, value in (*limits["disk"].items(), *limits["one_core"].items()):
        assert value > 0, key
    sealing = limits["sealing"]
    for key in ("one_process_null_mb_s", "two_processes_null_mb_s", "two_processes_synced_files_mb_s"):
        assert sealing[key] > 0, key


def test_power_cuts_are_counted_for_both_archives_in_both_modes(quick_suite):
    powercut = quick_suite[0]["powercut"]
    assert set(powercut["rows"]) == {"pacs-vault drop-all", "pacs-vault random", "orthanc drop-all", "orthanc random"}
    for key, row in powercut["rows"].items():
        assert row["cuts"] == 3 and row["acknowledged"] > 0 and 0 <= row["lost"] <= row["acknowledged"], key
    assert powercut["rows"]["pacs-vault drop-all"]["lost"] == powercut["rows"]["pacs-vault random"]["lost"] == 0


def test_soak_reports_every_operation_and_resource(quick_suite):
    soak = quick_suite[0]["soak"]
    for operation in ("store", "find", "get", "move", "scrub", "policy apply"):
        row = soak["operations"][operation]
        assert row["runs"] > 0 and row["failed_runs"] >= 0 and isinstance(row["errors"], dict), operation
    assert soak["operations"]["store"]["instances"] > 0
    assert soak["operations"]["server"]["runs"] == soak["operations"]["fsck after the run"]["runs"] == 1
    assert soak["errors_total"] == sum(sum(row["errors"].values()) for row in soak["operations"].values())
    assert len(soak["samples"]) >= 2
    for key in ("rss_mb", "rss_anon_mb", "fds", "threads", "processes"):
        trend = soak["resources"][key]
        assert trend["peak"] >= max(trend["start"], trend["end"]) > 0, key
        assert isinstance(trend["slope_per_hour"], float), key


def test_import_find_tiers_scrub_and_replication(quick_suite):
    results = quick_suite[0]
    ct = results["import"]["ct"]
    for key in ("cp_sync_mb_s", "import_mb_s", "import_inst_s", "import_over_cp_sync"):
        assert ct[key] > 0, key
    assert results["import"]["big"]["export_byte_exact"] is True
    find = results["find"]
    for shape, row in find["queries"].items():
        assert row["median_ms"] > 0 and row["p95_ms"] >= row["median_ms"], shape
    assert find["queries"]["PatientID"]["mean_matches"] >= 1  # every patient has studies
    assert find["queries"]["StudyInstanceUID"]["mean_matches"] == 1
    assert set(results["tiers"]["rows"]) == {"migrate to cartridge dir", "migrate to S3",
                                             "recall from cartridge dir", "recall from S3"}
    for name, row in results["tiers"]["rows"].items():
        assert row["pacs_vault_mb_s"] > 0 and row["baseline_mb_s"] > 0, name
    for key in ("fast_mb_s", "cat_mb_s", "deep_mb_s", "codec_limit_mb_s", "ingest_alone_mb_s"):
        assert results["scrub"][key] > 0, key
    assert results["replicate"]["replicate_mb_s"] > 0 and results["replicate"]["rsync_mb_s"] > 0
    assert results["replicate"]["drill"]["byte_exact"] is True


def test_dicomweb_side_by_side_has_every_ratio(quick_suite):
    web = quick_suite[0]["web"]
    assert set(web["peers"]) == {"pacs-vault", "Orthanc"}
    assert set(web["ratios"]) == {"stow_ct_mb_s vs Orthanc", "stow_ct_parallel_mb_s vs Orthanc",
                                  "wado_study_mb_s vs Orthanc", "wado_metadata_first_inst_s vs Orthanc",
                                  "wado_metadata_inst_s vs Orthanc",
                                  "qido_time vs Orthanc"}
    assert all(value > 0 for value in web["ratios"].values())
    assert web["million"]["queries"] and web["peers"]["pacs-vault"]["peak_rss_mb"] > 0
