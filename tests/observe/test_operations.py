"""Operations: the health summary, the Prometheus metrics (scraped from a running server and
as a textfile), the auditor report rendered by a real browser, and the systemd installer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from conftest import make_study, prometheus_samples, run_cli, set_config, sudo_env
from support.dicom_server import CLIENT_AE, Server, dcmtk, free_port, register


def test_status_says_online_degraded_or_faulted_and_why(home, tmp_path):
    uid, files = make_study(tmp_path / "s", 3, patient_id="PID-H")
    run_cli("import", str(tmp_path / "s"), home=home)
    status = json.loads(run_cli("status", "--json", home=home).stdout)
    assert status["state"] == "ONLINE" and status["alarms"] == []
    hot = status["tiers"]["hot"]
    assert (hot["high_watermark_percent"], hot["low_watermark_percent"]) == (85, 70)
    assert hot["copies"] == 3 and hot["scrub_overdue"] == {"fast": 0, "deep": 0}
    # A copy rots and no other copy exists: FAULTED, with what to do.
    blob = next(p for p in (home / "hot").rglob("*") if p.is_file() and not p.name.startswith("."))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    run_cli("scrub", home=home, check=False)
    status = json.loads(run_cli("status", "--json", home=home).stdout)
    assert status["state"] == "FAULTED" and status["damaged"] == 1
    assert any(a["key"] == "damaged" and "store them again" in a["action"] for a in status["alarms"])
    text = run_cli("status", home=home).stdout
    assert text.startswith("state      FAULTED") and "ALARM      1 stored versions have no good copy left" in text
    # The sender stores it again: healed, and only the audit trail being off is left (DEGRADED).
    run_cli("import", str(files[0]), str(files[1]), str(files[2]), home=home)
    set_config(home, "  enabled: true", "  enabled: false")
    status = json.loads(run_cli("status", "--json", home=home).stdout)
    assert status["state"] == "DEGRADED" and [a["key"] for a in status["alarms"]] == ["audit-off"]


def test_metrics_endpoint_counts_what_the_server_does(home, tmp_path):
    port = free_port()
    set_config(home, "textfile collector.\n  port: 0", f"textfile collector.\n  port: {port}")
    register(home, CLIENT_AE, free_port(), "store,query")
    uid, files = make_study(tmp_path / "s", 4, patient_id="PID-M")
    srv = Server(home).start()
    try:
        addr = ["-aet", CLIENT_AE, "-aec", "ARCHIVE", "127.0.0.1", str(srv.port)]
        dcmtk("storescu", "-nh", *addr, *map(str, files))
        dcmtk("storescu", "-nh", *addr, str(files[0]))  # the same bytes again
        dcmtk("findscu", "-S", *addr, "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=PID-M")
        dcmtk("getscu", "-S", *addr, "-od", str(tmp_path), "-k", "QueryRetrieveLevel=STUDY", "-k",
              f"StudyInstanceUID={uid}")  # no retrieve role: refused
        dcmtk("echoscu", "-aet", "STRANGER", "-aec", "ARCHIVE", "127.0.0.1", str(srv.port), check=False)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            samples = prometheus_samples(response.read().decode())
    finally:
        srv.stop()
    value = lambda name, **labels: samples[(f"pacs_vault_{name}", frozenset(labels.items()))]  # noqa: E731
    assert value("stored_instances_total") == 4 and value("duplicate_instances_total") == 1
    assert value("received_bytes_total") == value("received_bytes") > 0  # counted live = what the index holds
    assert value("requests_total", service="c-store", outcome="success") == 5
    assert value("requests_total", service="c-find", outcome="success") == 1
    assert value("requests_total", service="c-get", outcome="refused") == 1
    assert value("associations_total", outcome="accepted") == 4
    assert value("associations_total", outcome="rejected") == 1
    assert value("request_duration_seconds_count", service="c-store") == 5
    assert value("request_duration_seconds_bucket", service="c-store", le="+Inf") == 5
    assert value("instances") == 4 and value("state", state="ONLINE") == 1 and value("alarms") == 0
    assert value("tier_high_watermark_ratio", tier="hot") == 0.85
    assert value("audit_records") > 10


def test_metrics_textfile_for_node_exporter(home, tmp_path):
    make_study(tmp_path / "s", 2)
    run_cli("import", str(tmp_path / "s"), home=home)
    run_cli("scrub", home=home)
    target = tmp_path / "textfile" / "pacs_vault.prom"
    target.parent.mkdir()
    run_cli("metrics", "--textfile", str(target), home=home)
    samples = prometheus_samples(target.read_text())
    assert samples[("pacs_vault_instances", frozenset())] == 2
    assert samples[("pacs_vault_scrub_last_copies_checked", frozenset())] == 2
    assert samples[("pacs_vault_replication_lag_seconds", frozenset())] > 0  # never replicated
    assert list(target.parent.iterdir()) == [target]  # written whole, no temporary left
    # An output path is never a key or anything else in the home (the command may run as the
    # service account on someone's behalf): only HOME/reports/ there.
    key = (home / "kek.key").read_bytes()
    for inside in (home / "kek.key", home / "audit" / "head", home / "metrics.prom"):
        refused = run_cli("metrics", "--textfile", str(inside), home=home, check=False)
        assert refused.returncode == 77 and "reports go outside the home" in refused.stderr
    assert (home / "kek.key").read_bytes() == key
    run_cli("metrics", "--textfile", str(home / "reports" / "pacs_vault.prom"), home=home)


def _png_stats(path: Path) -> tuple[float, int]:
    """(share of pixels that are not background white, number of distinct colours)."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 24)
    inked = sum(count for count, colour in colours if colour != (255, 255, 255))
    return inked / (image.width * image.height), len(colours)


def test_the_auditor_report_renders_in_a_real_browser(home, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "make test installs Debian's chromium package"
    keep_uid, _ = make_study(tmp_path / "keep", 3, patient_id="PID-R1", study_date="20230105")
    old_uid, _ = make_study(tmp_path / "old", 2, patient_id="PID-R2", study_date="20000101")
    (home / "policies" / "default.yaml").write_text(
        "classes:\n  - name: everything\n    match: {}\n    retention: {years_after_study: 4}\n"
        "    transitions:\n      - {after_days: 0, to: [cold], keep_hot: true}\n    at_expiry: delete\n")
    run_cli("import", str(tmp_path / "keep"), str(tmp_path / "old"), home=home)
    run_cli("hold", "set", keep_uid, "--reason", "litigation 2026-117", home=home)
    run_cli("policy", "apply", home=home)  # the 2000 study is deleted, the 2023 one migrated
    run_cli("scrub", "--deep", home=home)
    run_cli("replicate", home=home)
    run_cli("export", keep_uid, str(tmp_path / "out"), home=home)
    run_cli("keys", "rotate", home=home, check=False, env=sudo_env("nobody"))  # refused: a Security Alert
    report = tmp_path / "report.html"
    run_cli("report", "--html", str(report), home=home)
    html = report.read_text()
    for part in ("Integrity", "Backups", "Retention", "Access", "litigation 2026-117", keep_uid, old_uid,
                 "Use of Restricted Function", "<svg"):
        assert part in html, part
    assert "src=" not in html and "href=" not in html  # self-contained: nothing to fetch
    data = json.loads(run_cli("report", "--json", home=home).stdout)
    assert data["access"]["verification"]["intact"] and data["retention"]["deletions"][old_uid]["instances"] == 2
    assert [row["study"] for row in data["retention"]["calendar"]] == [keep_uid]  # ends 2027-01-05, held
    assert data["retention"]["calendar"][0]["held"] is True
    assert data["backups"]["runs"][-1]["verified"] and data["integrity"]["runs"][-1]["deep"]

    shot = tmp_path / "report.png"
    result = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert shot.exists(), result.stderr[-2000:]
    inked, colours = _png_stats(shot)
    assert inked > 0.03 and colours > 20, (inked, colours)  # text, tables and charts drawn, not a blank page
    blank = tmp_path / "blank.html"
    blank.write_text("<!doctype html><title>x</title>")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={tmp_path / 'b.png'}",
                    "--window-size=1280,2400", blank.as_uri()], capture_output=True, timeout=120)
    assert _png_stats(tmp_path / "b.png")[0] < 0.001  # the check itself tells a blank page


def test_the_report_is_for_auditors(home):
    result = run_cli("report", "--json", home=home, check=False, env=sudo_env("nobody"))
    assert result.returncode == 77 and "needs the auditor role" in result.stderr


def test_a_hot_tier_that_is_not_mounted_is_faulted_and_never_made_anew(home, tmp_path):
    make_study(tmp_path / "s", 2, patient_id="PID-U")
    run_cli("import", str(tmp_path / "s"), home=home)
    os.rename(home / "hot", home / "hot.elsewhere")  # the RAID volume is not mounted
    status = json.loads(run_cli("status", "--json", home=home).stdout)
    assert status["state"] == "FAULTED"
    [alarm] = [a for a in status["alarms"] if a["key"] == "hot-tier"]
    assert "cannot be read" in alarm["message"] and "mount" in alarm["action"]
    make_study(tmp_path / "new", 1, patient_id="PID-U")
    imported = run_cli("import", str(tmp_path / "new"), home=home, check=False)
    assert imported.returncode == 1 and "import stopped: tier hot" in imported.stderr
    assert "not there (disk not mounted?)" in imported.stderr
    served = run_cli("serve", "--port", str(free_port()), home=home, check=False, timeout=60)
    assert served.returncode == 75 and "not serving until it is" in served.stderr
    assert not (home / "hot").exists()  # nothing was written into the empty mount point
    os.rename(home / "hot.elsewhere", home / "hot")
    assert json.loads(run_cli("status", "--json", home=home).stdout)["state"] == "ONLINE"


def test_a_job_that_fails_without_a_tier_to_blame_raises_its_own_alarm(home, tmp_path):
    uid, files = make_study(tmp_path / "s", 2, patient_id="PID-J")
    run_cli("import", str(tmp_path / "s"), home=home)
    set_config(home, "retry_backoff_s: 60", "retry_backoff_s: 1")
    (home / "policies" / "default.yaml").write_text(
        "classes:\n  - name: everything\n    match: {}\n    retention: {years_after_study: 30}\n"
        "    transitions:\n      - {after_days: 0, to: [cold]}\n    at_expiry: review\n")
    blob = next(p for p in (home / "hot").rglob("*") if p.is_file() and ".incoming" not in p.parts)
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0xFF  # the source copy rots before it is packed
    blob.write_bytes(bytes(data))
    assert run_cli("policy", "apply", home=home, check=False).returncode == 1
    status = json.loads(run_cli("status", "--json", home=home).stdout)
    [alarm] = [a for a in status["alarms"] if a["key"] == f"job:{uid}"]
    assert "a migrate job failed" in alarm["message"] and "appliance policy jobs" in alarm["action"]
    run_cli("scrub", home=home, check=False)  # marks the version damaged
    run_cli("import", *map(str, files), home=home)  # the sender stores it again: healed
    time.sleep(1.5)  # the job's retry delay (1 s here)
    run_cli("policy", "apply", home=home)  # retried: done
    status = json.loads(run_cli("status", "--json", home=home).stdout)
    assert status["state"] == "ONLINE" and status["alarms"] == []
