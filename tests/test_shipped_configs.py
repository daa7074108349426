"""Every configuration the project ships works (issue 17, "bad days"): the tier and policy
examples and the default appliance.yaml, combined as a user combines them, on a day when a disk
is not mounted, a cartridge is not loaded, S3 cannot be reached or the off-site target is down.
`status`, `status --json`, `metrics --textfile`, `report --html` and `policy plan` never crash:
each says what is wrong."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import yaml

from appliance import cli
from conftest import REPO, load_cartridge, make_study, prometheus_samples, run_cli
from dicom_server import free_port


def appliance(home: Path, *args: str) -> tuple[int, str, str]:
    """The CLI in-process (the real code path, without an interpreter start per command):
    (exit code, stdout, stderr). An exception escaping main() is the crash this file hunts."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(["--home", str(home), *args])
    assert "Traceback" not in err.getvalue()  # a worker thread's crash is printed, not raised
    return code, out.getvalue(), err.getvalue()


TIER_FILES = {"hot": "hot-raid.yaml", "cold": "cold-disk.yaml", "tape": "ltfs-tape.yaml", "s3": "s3.yaml"}


def example(name: str) -> dict:
    """A shipped tier example as data, to change the settings a user changes."""
    shipped = REPO / "tiers" / TIER_FILES[name]
    return yaml.safe_load((shipped if shipped.exists() else shipped.with_suffix(".yaml.example")).read_text())


def write_tier(home: Path, data: dict) -> None:
    """HOME/tiers/<the file name the example has or says to rename it to>."""
    (home / "tiers" / TIER_FILES[data["name"]]).write_text(yaml.safe_dump(data, sort_keys=False))


def tape_tier(cartridges: Path, loaded: tuple[str, ...], **settings) -> dict:
    """tiers/ltfs-tape.yaml.example with its cartridges in `cartridges/` (those not in `loaded`
    point at a mount point with nothing mounted)."""
    tier = example("tape") | settings
    for cartridge in tier["cartridges"]:
        label = cartridge["label"]
        cartridge["path"] = str(cartridges / (label if label in loaded else f"{label}-not-mounted"))
    return tier


def s3_tier(endpoint: str, bucket: str, **settings) -> dict:
    tier = example("s3") | settings
    tier["s3"] |= {"endpoint_url": endpoint, "bucket": bucket, "timeout_s": 5}
    return tier


# -- the LTFS example with a rate limit (the report of issue 17) --------------------------------

def test_the_ltfs_example_with_a_rate_limit_gives_status_metrics_and_report(home, tmp_path):
    load_cartridge(tmp_path / "cartridges" / "PV0001L9", "PV0001L9")
    write_tier(home, tape_tier(tmp_path / "cartridges", ("PV0001L9",), rate_limit_mbps=200))
    (home / "policies" / "default.yaml").write_text(
        "classes:\n  - name: everything\n    match: {}\n    retention: {years_after_study: 30}\n"
        "    transitions:\n      - {after_days: 0, to: [tape], keep_hot: true}\n    at_expiry: review\n")
    make_study(tmp_path / "s", 2)
    run_cli("import", str(tmp_path / "s"), home=home)
    run_cli("policy", "apply", home=home)  # a pack written through the rate limit

    text = run_cli("status", home=home).stdout
    [line] = [line for line in text.splitlines() if line.startswith("tier tape")]
    assert "PV0001L9 (loaded" in line and "PV0002L9 (not loaded" in line and "1 packs" in line
    status = json.loads(run_cli("status", "--json", home=home).stdout)
    assert [c["loaded"] for c in status["tiers"]["tape"]["cartridges"]] == [True, False]
    assert status["state"] == "ONLINE"
    run_cli("metrics", "--textfile", str(tmp_path / "pacs_vault.prom"), home=home)
    samples = prometheus_samples((tmp_path / "pacs_vault.prom").read_text())
    assert samples[("pacs_vault_cartridge_loaded", frozenset({("tier", "tape"), ("cartridge", "PV0002L9")}))] == 0
    assert samples[("pacs_vault_tier_up", frozenset({("tier", "tape")}))] == 1
    run_cli("report", "--html", str(tmp_path / "report.html"), home=home)
    assert "PV0002L9 (not loaded)" in (tmp_path / "report.html").read_text()


# -- the everyday commands ----------------------------------------------------------------------

def test_a_fresh_home_answers_every_everyday_command(home):
    """The home `init` makes, before anything is stored: what a newcomer tries first."""
    for args, said in ((["status"], "state      ONLINE"), (["policy", "check"], "policies ok: 3 classes"),
                       (["policy", "plan"], "0 actions"), (["keys", "status"], "0 wrapped under it"),
                       (["audit", "verify"], "audit trail intact"), (["replicate"], "verified"),
                       (["audit", "verify", "--offsite"], "audit trail intact"),
                       (["scrub"], "scrub repaired 0 copies, 0 unrecoverable"),
                       (["scrub", "--deep"], "deep scrub repaired 0 copies"), (["fsck"], "0 errors"),
                       (["policy", "jobs"], "0 jobs"), (["hold", "list"], ""), (["policy", "deletions"], "")):
        code, out, err = appliance(home, *args)
        assert code == 0 and said in out, (args, out, err)


def test_the_hospital_example_as_its_header_says_with_the_shipped_tier_examples(home):
    write_tier(home, example("tape"))
    write_tier(home, s3_tier(f"http://127.0.0.1:{free_port()}", example("s3")["s3"]["bucket"]))  # never AWS
    (home / "policies" / "default.yaml").unlink()
    shutil.copy(REPO / "policies" / "hospital-example.yaml.example", home / "policies" / "hospital.yaml")
    code, out, err = appliance(home, "policy", "check")
    assert code == 0 and "policies ok: 5 classes (research-trial-2024, mammography" in out, err
    # Beside default.yaml instead, it is refused with the reason, as the header warns.
    shutil.copy(REPO / "policies" / "default.yaml", home / "policies" / "default.yaml")
    code, _, err = appliance(home, "policy", "check")
    assert code == 78 and "class 'mammography' is defined twice" in err
