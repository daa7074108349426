"""Every configuration the project ships works (issue 17, "bad days"): the tier and policy
examples and the default appliance.yaml, combined as a user combines them, on a day when a disk
is not mounted, a cartridge is not loaded, S3 cannot be reached or the off-site target is down.
`status`, `status --json`, `metrics --textfile`, `report --html` and `policy plan` never crash:
each says what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from conftest import REPO, load_cartridge, make_study, prometheus_samples, run_cli


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
