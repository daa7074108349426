"""Every configuration the project ships works (issue 17, "bad days"): the tier and policy
examples and the default appliance.yaml, combined as a user combines them, on a day when a disk
is not mounted, a cartridge is not loaded, S3 cannot be reached or the off-site target is down.
`status`, `status --json`, `metrics --textfile`, `report --html` and `policy plan` never crash:
each says what is wrong."""

from __future__ import annotations

import html
import io
import json
import shutil
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import (
    REPO,
    load_cartridge,
    make_study,
    new_bucket,
    prometheus_samples,
    run_cli,
    set_config,
    write_s3_credentials,
)
from support.dicom_server import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance import cli
from appliance.admin import home as home_mod

LABELS = ("PV0001L9", "PV0002L9")


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


# -- any configuration built from the examples --------------------------------------------------

@dataclass(frozen=True)
class TierSettings:
    state: str
    rate_limit_mbps: int = 0
    retries: int = 3


@dataclass(frozen=True)
class Configuration:
    hot: str  # mounted, nearly full, not mounted
    cold: TierSettings  # mounted, not mounted
    tape: TierSettings | None  # both loaded, first loaded, second loaded, none loaded; None: example not enabled
    s3: TierSettings | None  # reachable, port closed, no credentials file
    replication: str  # local path, rsync daemon down, ssh target down
    audit: bool
    policy: str  # default, hospital

    def unreachable(self) -> set[str]:
        down = {"hot"} if self.hot == "not mounted" else set()
        down |= {"cold"} if self.cold.state == "not mounted" else set()
        down |= {"tape"} if self.tape and self.tape.state == "none loaded" else set()
        return down | ({"s3"} if self.s3 and self.s3.state != "reachable" else set())

    def loaded(self) -> dict[str, bool]:
        """Cartridge label: loaded."""
        if self.tape is None:
            return {}
        loaded = {"both loaded": LABELS, "first loaded": LABELS[:1], "second loaded": LABELS[1:], "none loaded": ()}
        return {label: label in loaded[self.tape.state] for label in LABELS}

    def policy_valid(self) -> bool:
        return self.policy == "default" or (self.tape is not None and self.s3 is not None)


def tier_settings(states: list[str]) -> st.SearchStrategy[TierSettings]:
    return st.builds(TierSettings, st.sampled_from(states), rate_limit_mbps=st.sampled_from([0, 1, 200]),
                     retries=st.sampled_from([0, 1, 3]))


CONFIGURATIONS = st.builds(
    Configuration,
    hot=st.sampled_from(["mounted", "nearly full", "not mounted"]),
    cold=tier_settings(["mounted", "not mounted"]),
    tape=st.none() | tier_settings(["both loaded", "first loaded", "second loaded", "none loaded"]),
    s3=st.none() | tier_settings(["reachable", "port closed", "no credentials file"]),
    replication=st.sampled_from(["local path", "rsync daemon down", "ssh target down"]),
    audit=st.booleans(),
    policy=st.sampled_from(["default", "hospital"]),
)


@pytest.fixture(scope="module")
def stocked_home(tmp_path_factory, s3_server) -> tuple[Path, str]:
    """A home from `init` with the tape and S3 examples enabled and three studies: one whose
    retention ended long ago, one on every cold tier (and hot), one on the hot tier only."""
    root = tmp_path_factory.mktemp("stocked")
    home, cartridges = root / "home", root / "cartridges"
    home_mod.init(home)
    for label in LABELS:
        load_cartridge(cartridges / label, label)
    write_s3_credentials(home)
    bucket = new_bucket(s3_server)
    write_tier(home, tape_tier(cartridges, LABELS))
    write_tier(home, s3_tier(s3_server.endpoint, bucket))
    make_study(root / "expired", 2, study_date="19900101", patient_id="PID-OLD")
    make_study(root / "cold", 2, study_date="20250101", patient_id="PID-COLD")
    shipped = (home / "policies" / "default.yaml").read_text()
    (home / "policies" / "default.yaml").write_text(
        "classes:\n  - name: everything\n    match: {}\n    retention: {keep_forever: true}\n"
        "    transitions:\n      - {after_days: 0, to: [cold, tape, s3], keep_hot: true}\n")
    assert appliance(home, "import", str(root / "expired"), str(root / "cold"))[0] == 0
    assert appliance(home, "policy", "apply")[0] == 0
    (home / "policies" / "default.yaml").write_text(shipped)
    make_study(root / "hot", 2, study_date="20260101", patient_id="PID-HOT")
    assert appliance(home, "import", str(root / "hot"))[0] == 0
    status = json.loads(appliance(home, "status", "--json")[1])
    assert status["state"] == "ONLINE" and status["tiers"]["tape"]["packs"] == 2, status
    return home, bucket


def configure(home: Path, setup: Configuration, cartridges: Path, s3_endpoint: str, bucket: str) -> None:
    """Turn a copy of the stocked home into `setup`, as an admin would edit its files."""
    hot = example("hot")
    if setup.hot == "nearly full":  # above the high watermark: `policy plan` migrates to make room
        hot |= {"capacity_mb": 1, "high_watermark_percent": 1, "low_watermark_percent": 1}
    elif setup.hot == "not mounted":
        hot["path"] = str(home / "raid-not-mounted")
    write_tier(home, hot)
    cold = example("cold") | {"rate_limit_mbps": setup.cold.rate_limit_mbps, "retries": setup.cold.retries}
    if setup.cold.state == "not mounted":
        cold["path"] = str(home / "disk-not-mounted")
    write_tier(home, cold)
    (home / "tiers" / TIER_FILES["tape"]).unlink()
    if setup.tape:
        loaded = tuple(label for label, mounted in setup.loaded().items() if mounted)
        write_tier(home, tape_tier(cartridges, loaded, rate_limit_mbps=setup.tape.rate_limit_mbps,
                                   retries=setup.tape.retries))
    (home / "tiers" / TIER_FILES["s3"]).unlink()
    if setup.s3:
        endpoint = f"http://127.0.0.1:{free_port()}" if setup.s3.state == "port closed" else s3_endpoint
        write_tier(home, s3_tier(endpoint, bucket, rate_limit_mbps=setup.s3.rate_limit_mbps,
                                 retries=setup.s3.retries))
        if setup.s3.state == "no credentials file":
            (home / "s3-credentials").unlink()
    target = {"local path": "offsite", "rsync daemon down": f"rsync://127.0.0.1:{free_port()}/pacs/site-a",
              "ssh target down": "pacs@127.0.0.1:site-a"}[setup.replication]
    set_config(home, "target: offsite", f"target: {target}")
    set_config(home, "ssh_port: 22", f"ssh_port: {free_port()}")
    if not setup.audit:
        set_config(home, "  enabled: true", "  enabled: false")
    if setup.policy == "hospital":  # as the example's header says
        (home / "policies" / "default.yaml").unlink()
        shutil.copy(REPO / "policies" / "hospital-example.yaml.example", home / "policies" / "hospital.yaml")


def expected_alarms(setup: Configuration) -> set[str]:
    keys = {"hot-tier"} if "hot" in setup.unreachable() else set()
    keys |= {f"tier-unreachable:{name}" for name in setup.unreachable() - {"hot"}}
    keys |= {f"tier-unconfigured:{name}" for name in ("tape", "s3") if getattr(setup, name) is None}
    if setup.replication != "local path" or setup.hot == "not mounted":  # rsync has nothing to send from
        keys.add("replication-failed")
    return keys | ({"audit-off"} if not setup.audit else set())


def assert_status_says_it(setup: Configuration, text: str, status: dict) -> None:
    configured = ["cold", "hot"] + [name for name in ("tape", "s3") if getattr(setup, name)]
    assert sorted(status["tiers"]) == sorted(configured)
    assert {name for name, tier in status["tiers"].items() if "error" in tier} == setup.unreachable()
    assert {c["label"]: c["loaded"] for c in status["tiers"].get("tape", {}).get("cartridges", [])} == setup.loaded()
    assert {a["key"] for a in status["alarms"]} == expected_alarms(setup)
    state = "FAULTED" if setup.hot == "not mounted" else "DEGRADED" if status["alarms"] else "ONLINE"
    assert status["state"] == state
    assert text.startswith(f"state      {state}\n")
    for name in configured:
        [line] = [line for line in text.splitlines() if line.startswith(f"tier {name:<6} ")]
        assert ("CANNOT BE REACHED" in line) == (name in setup.unreachable()), line
    for label, loaded in setup.loaded().items():
        assert f"{label} ({'loaded' if loaded else 'not loaded'}," in text
    for alarm in status["alarms"]:
        assert f"ALARM      {alarm['message']} (since" in text


def assert_metrics_say_it(setup: Configuration, status: dict, samples: dict) -> None:
    assert samples[("pacs_vault_state", frozenset({("state", status["state"])}))] == 1
    for name in status["tiers"]:
        assert samples[("pacs_vault_tier_up", frozenset({("tier", name)}))] == (name not in setup.unreachable())
    for label, loaded in setup.loaded().items():
        assert samples[("pacs_vault_cartridge_loaded", frozenset({("tier", "tape"), ("cartridge", label)}))] == loaded
    alarms = {dict(labels)["key"] for (name, labels), value in samples.items() if name == "pacs_vault_alarm" and value}
    assert alarms == expected_alarms(setup)


def assert_report_says_it(setup: Configuration, status: dict, page: str, policy_error: str) -> None:
    assert f"state <b>{status['state']}</b>" in page
    for alarm in status["alarms"]:
        assert html.escape(alarm["message"]) in page
    for name, tier in status["tiers"].items():
        if "error" in tier:
            assert f"<b>NO</b>: {html.escape(tier['error'])}" in page
    for label, loaded in setup.loaded().items():
        assert f"{label} ({'loaded' if loaded else 'not loaded'})" in page
    assert html.escape(policy_error) in page


def assert_plan_says_it(setup: Configuration, code: int, out: str, err: str) -> str:
    """The policy error `policy plan` gave ("" for none)."""
    if not setup.policy_valid():  # the hospital example names tiers that are not configured
        assert code == 78 and err.count("\n") == 1 and "hospital.yaml" in err and "is not a cold tier" in err
        return err.removeprefix("appliance: ").strip()
    assert code == 0, err
    assert ("expired: review" if setup.policy == "default" else "DELETE and crypto-shred") in out
    needed = {"hot"}
    if setup.hot == "nearly full":  # the hot-only study moves to its class's cold tiers
        needed |= {"cold"} if setup.policy == "default" else {"s3", "tape"}
    said = {line.split()[1] for line in out.splitlines()
            if line.startswith("tier ") and " cannot be reached now: " in line}
    assert said == needed & setup.unreachable()
    return ""


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(setup=CONFIGURATIONS)
def test_every_configuration_of_the_examples_says_what_is_wrong(stocked_home, s3_server, setup):
    base, bucket = stocked_home
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch) / "home"
        shutil.copytree(base, home, symlinks=True)
        configure(home, setup, base.parent / "cartridges", s3_server.endpoint, bucket)
        code, _, err = appliance(home, "replicate")
        assert code == (1 if "replication-failed" in expected_alarms(setup) else 0), err
        outputs = [appliance(home, *args) for args in (
            ["status"], ["status", "--json"], ["metrics", "--textfile", f"{scratch}/pacs_vault.prom"],
            ["report", "--html", f"{scratch}/report.html"])]
        assert [code for code, _, _ in outputs] == [0, 0, 0, 0], outputs
        status = json.loads(outputs[1][1])
        assert_status_says_it(setup, outputs[0][1], status)
        assert_metrics_say_it(setup, status, prometheus_samples(Path(scratch, "pacs_vault.prom").read_text()))
        policy_error = assert_plan_says_it(setup, *appliance(home, "policy", "plan"))
        assert_report_says_it(setup, status, Path(scratch, "report.html").read_text(), policy_error)


def test_scrub_and_fsck_check_what_they_reach_and_name_the_rest(stocked_home, s3_server, tmp_path):
    """S3 without its credentials file, the cold disk not mounted, the tape tier's file removed
    (its packs still indexed): the hot copies are checked all the same."""
    base, bucket = stocked_home
    home = tmp_path / "home"
    shutil.copytree(base, home, symlinks=True)
    setup = Configuration("mounted", TierSettings("not mounted"), None, TierSettings("no credentials file"),
                          "local path", True, "default")
    configure(home, setup, base.parent / "cartridges", s3_server.endpoint, bucket)
    code, out, err = appliance(home, "scrub", "--json")
    report = json.loads(out)
    assert code == 0 and report["copies_checked"] == 6, err  # every hot copy
    unreachable = "\n".join(report["unreachable"])
    assert "s3-credentials: S3 credentials file not found" in unreachable
    assert "disk not mounted" in unreachable
    code, out, err = appliance(home, "fsck")
    assert code == 0 and "0 errors" in out, err
    for said in ("S3 credentials file not found", "tier tape is not configured", "disk not mounted"):
        assert said in out
