"""Policies: the YAML a storage admin writes, the rules a lawyer reads, the plan they give."""

from __future__ import annotations

import shutil
from datetime import date, datetime, timezone
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from appliance import config as cfg
from appliance.errors import ConfigError
from appliance.jobs.lifecycle import HotUsage, StudyState, plan_actions
from appliance.jobs.policy import StudyFacts, check_policies, classify, retention_end

DAY = 86400


def _write(home: Path, text: str, name: str = "default.yaml") -> None:
    (home / "policies" / name).write_text(text)


def test_the_shipped_policies_load(config):
    rules = check_policies(config)
    assert [r.name for r in rules] == ["mammography", "minors", "adults"]
    assert rules[0].source == "default.yaml:9"


def test_the_hospital_example_loads_with_its_tiers(home):
    shutil.copy(REPO / "policies" / "hospital-example.yaml.example", home / "policies" / "default.yaml")
    for name, text in (("tape", "kind: ltfs\ncartridges:\n  - {label: PV0001L9, path: /mnt/a, capacity_mb: 1000}\n"),
                       ("s3", "kind: s3\ns3:\n  bucket: b\n")):
        (home / "tiers" / f"{name}.yaml").write_text(f"name: {name}\n{text}")
    rules = check_policies(cfg.load(home))
    assert rules[0].name == "research-trial-2024" and len(rules) == 5


@pytest.mark.parametrize("text, where", [
    ("classes:\n  - name: a\n    retention: {years_after_study: 10}\n    colour: red\n",
     "default.yaml:4: classes.0.colour: unknown key"),
    ("classes:\n  - name: a\n    retention: {years_after_study: ten}\n",
     "default.yaml:3: classes.0.retention.years_after_study: must be a whole number"),
    ("classes:\n  - name: a\n    retention: {}\n",
     "default.yaml:3: classes.0.retention: give keep_forever"),
    ("classes:\n  - name: a\n    retention: {years_after_study: 1}\n    transitions:\n      - to: [tape]\n"
     "        after_days: 3\n", "default.yaml:5: classes.0.transitions.0.to: 'tape' is not a cold tier"),
    ("classes:\n  - name: a\n    retention: {years_after_study: 1}\n    at_expiry: burn\n",
     "default.yaml:4: classes.0.at_expiry: must be review or delete"),
    ("classes:\n  - name: a\n    retention: {keep_forever: true}\n    at_expiry: delete\n",
     "default.yaml:4: classes.0.at_expiry: a class kept forever cannot be deleted"),
    ("classes:\n  - name: a\n    match: {study_date: {before: 2020-01-01}}\n    retention: {years_after_study: 1}\n",
     "default.yaml:3: classes.0.match.study_date.before: must be text (put it in quotes)"),
    ("classes:\n  - name: a\n    match: {study_date: {before: '2020-01-01'}}\n    retention: {years_after_study: 1}\n",
     "default.yaml:3: classes.0.match.study_date.before: must be a date as YYYYMMDD"),
    ("classes:\n  - name: a\n    retention: {years_after_study: 1}\n  - name: a\n    retention: {years_after_study: 2}\n",
     "default.yaml:4: classes.1.name: class 'a' is defined twice"),
    ("classes: [\n", "default.yaml:2: invalid YAML"),
])
def test_a_bad_policy_names_file_line_and_key(home, text, where):
    _write(home, text)
    with pytest.raises(ConfigError) as raised:
        check_policies(cfg.load(home))
    assert where in str(raised.value)


def test_bad_policy_yaml_stops_apply_and_changes_nothing(home, ct_files):
    run_cli("import", str(ct_files[0]), home=home)
    before = sorted(p.name for p in (home / "hot").rglob("*") if p.is_file())
    _write(home, "classes:\n  - name: a\n    retention: {years_after_study: 1}\n    transitions:\n"
                 "      - {to: [cold], after_days: 0, keep_hot: maybe}\n")
    for action in ("plan", "apply", "check"):
        result = run_cli("policy", action, home=home, check=False)
        assert result.returncode == 78 and "default.yaml:5: classes.0.transitions.0.keep_hot: must be true or false" \
            in result.stderr, result.stderr
    assert sorted(p.name for p in (home / "hot").rglob("*") if p.is_file()) == before
    assert not list((home / "cold").rglob("*.pack")) and not any(p.is_file() for p in (home / "cold").rglob("*")
                                                                 if ".incoming" not in p.parts)


def _facts(study_date=date(2010, 5, 1), birth=date(1960, 1, 1), last=None, modalities=("CT",), **kw):
    return StudyFacts("1.2.3", study_date, birth, last or study_date, modalities, **kw)


def test_retention_takes_the_latest_of_its_rules(config):
    rules = check_policies(config)
    # An adult: 10 years after the patient's last study.
    adult = _facts(last=date(2015, 3, 1))
    assert classify(rules, adult).name == "adults"
    assert retention_end(classify(rules, adult).study_class.retention, adult).until == date(2025, 3, 1)
    # A child of 5: until 25 (2030) beats 10 years after the last study (2020).
    child = _facts(study_date=date(2010, 5, 1), birth=date(2005, 2, 28), last=date(2010, 5, 1))
    rule = classify(rules, child)
    assert rule.name == "minors"
    end = retention_end(rule.study_class.retention, child)
    assert end.until == date(2030, 2, 28) and "25" in end.reason
    # ... and a teenager's last study at 17 in 2022: 2032 beats the 25th birthday (2030).
    teen = _facts(study_date=date(2022, 1, 10), birth=date(2005, 2, 28), last=date(2022, 1, 10))
    assert retention_end(classify(rules, teen).study_class.retention, teen).until == date(2032, 1, 10)
    # Mammography: 10 years after the study, whoever the patient.
    mammo = _facts(modalities=("MG",), birth=None)
    assert classify(rules, mammo).name == "mammography"
    assert retention_end(classify(rules, mammo).study_class.retention, mammo).until == date(2020, 5, 1)
    # Unknown birth date: not a minor by rule, and never expires by an age rule.
    unknown = _facts(birth=None)
    assert classify(rules, unknown).name == "adults"
    leap = _facts(study_date=date(2012, 2, 29), birth=date(2008, 2, 29))
    assert retention_end(classify(rules, leap).study_class.retention, leap).until == date(2033, 2, 28)


def _state(uid, *, facts=None, idle_days=0, hot=1000, cold=(), held=(), now):
    facts = facts or _facts()
    return StudyState(StudyFacts(uid, facts.study_date, facts.birth_date, facts.last_patient_study,
                                 facts.modalities), now - idle_days * DAY, now - idle_days * DAY, hot,
                      frozenset(cold), tuple(held))


def test_plan_gives_every_action_with_its_rule(config):
    rules = check_policies(config)
    now = int(datetime(2026, 11, 30, tzinfo=timezone.utc).timestamp())
    recent = _facts(study_date=date(2026, 1, 1))
    studies = [
        _state("1.1", facts=recent, idle_days=10, now=now),  # too recent: nothing
        _state("1.2", facts=recent, idle_days=100, now=now),  # idle: migrate, drop hot
        _state("1.3", facts=recent, idle_days=100, cold=("cold",), now=now),  # copied: drop hot
        _state("1.4", facts=recent, idle_days=100, cold=("cold",), hot=0, now=now),  # done: nothing
        _state("1.5", facts=_facts(study_date=date(2001, 1, 1)), now=now),  # expired: review
        _state("1.6", facts=_facts(study_date=date(2001, 1, 1)), held=("lawsuit 42",), now=now),
    ]
    actions, unclassified = plan_actions(studies, rules, now)
    got = {a.study: a for a in actions}
    assert set(got) == {"1.2", "1.3", "1.5", "1.6"} and unclassified == []
    assert (got["1.2"].kind, got["1.2"].targets, got["1.2"].drop_hot) == ("migrate", ("cold",), True)
    assert got["1.2"].rule.startswith("adults (default.yaml:") and "100 days without access" in got["1.2"].reason
    assert (got["1.3"].kind, got["1.3"].targets, got["1.3"].drop_hot) == ("migrate", (), True)
    assert got["1.5"].kind == "review" and "retention ended 2011-01-01" in got["1.5"].reason
    assert got["1.6"].kind == "held" and "lawsuit 42" in got["1.6"].reason


def test_expiry_deletes_only_by_a_delete_rule_and_never_a_held_study(home):
    _write(home, "classes:\n  - name: short\n    retention: {years_after_study: 1}\n    at_expiry: delete\n")
    rules = check_policies(cfg.load(home))
    now = int(datetime(2026, 11, 30, tzinfo=timezone.utc).timestamp())
    old = _facts(study_date=date(2020, 1, 1))
    actions, _ = plan_actions([_state("2.1", facts=old, now=now), _state("2.2", facts=old, held=("x",), now=now),
                               _state("2.3", facts=_facts(study_date=date(2026, 6, 1)), now=now)], rules, now)
    assert {(a.study, a.kind) for a in actions} == {("2.1", "expire"), ("2.2", "held")}


def test_above_the_high_watermark_the_least_recently_used_go_first(config):
    rules = check_policies(config)
    now = int(datetime(2026, 11, 30, tzinfo=timezone.utc).timestamp())
    recent = _facts(study_date=date(2026, 1, 1))
    studies = [_state("3.1", facts=recent, idle_days=5, hot=300, now=now),
               _state("3.2", facts=recent, idle_days=20, hot=300, cold=("cold",), now=now),  # recalled earlier
               _state("3.3", facts=recent, idle_days=10, hot=300, now=now),
               _state("3.4", facts=recent, idle_days=1, hot=100, now=now)]
    usage = HotUsage(used=1000, capacity=1100, high_percent=85, low_percent=40)  # 90%: free 560 bytes
    actions, _ = plan_actions(studies, rules, now, usage)
    assert [(a.study, a.kind) for a in actions] == [("3.2", "evict"), ("3.3", "migrate")]
    assert all(a.drop_hot and "high watermark" in a.reason for a in actions)
    assert plan_actions(studies, rules, now, HotUsage(900, 1100, 85, 40))[0] == []


def test_every_match_criterion(home):
    _write(home, """classes:
  - name: trial
    match: {source_ae: [TRIALWS], study_date: {on_or_after: "20240101", before: "20270101"}}
    retention: {keep_forever: true}
  - name: partner
    match: {institution: ["Clinique du Parc"], sop_class: ["1.2.840.10008.5.1.4.1.1.7"]}
    retention: {years_after_study: 20}
  - name: teens
    match: {patient_age_at_study: {at_least: 13, below: 18}}
    retention: {until_patient_age: 25}
  - name: rest
    retention: {years_after_study: 10}
""")
    rules = check_policies(cfg.load(home))

    def name(**kw):
        base = dict(study_date=date(2025, 1, 1), birth=date(1980, 1, 1))
        base.update(kw)
        return classify(rules, _facts(**base)).name

    assert name(source_aes=("TRIALWS",)) == "trial"
    assert name(source_aes=("TRIALWS",), study_date=date(2023, 12, 31)) == "rest"
    assert name(source_aes=("OTHER",)) == "rest"
    assert name(institution="clinique du parc", sop_classes=("1.2.840.10008.5.1.4.1.1.7",)) == "partner"
    assert name(institution="Clinique du Parc", sop_classes=("1.2.840.10008.5.1.4.1.1.2",)) == "rest"
    assert name(birth=date(2010, 6, 1)) == "teens"  # 14 at the study
    assert name(birth=date(2012, 1, 2)) == "rest"  # 12 at the study
    assert name(birth=date(2007, 1, 1)) == "rest"  # 18 at the study
