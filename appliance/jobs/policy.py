"""Retention and migration policies: HOME/policies/*.yaml, loaded and validated, and the pure
rules that say which class a study belongs to and until when it must be kept.

A policy file lists classes of studies; the first class (files in name order,
classes in file order) whose `match` fits a study governs it. See
policies/SCHEMA.md for the format. Errors name the file, the line and the key,
and a policy set with any error is not used at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from appliance.config import Config, _build, _check, _Source
from appliance.errors import ConfigError

EXPIRY_ACTIONS = ("review", "delete")
_DATE = re.compile(r"^\d{8}$")


def _is_date(value: str) -> bool:
    return value == "" or (bool(_DATE.match(value)) and parse_date(value) is not None)


@dataclass(frozen=True)
class AgeRange:
    at_least: int = field(default=0, metadata=_check(lambda v: 0 <= v <= 200, "must be 0 to 200"))
    below: int = field(default=200, metadata=_check(lambda v: 0 <= v <= 200, "must be 0 to 200"))


@dataclass(frozen=True)
class DateRange:
    on_or_after: str = field(default="", metadata=_check(_is_date, "must be a date as YYYYMMDD"))
    before: str = field(default="", metadata=_check(_is_date, "must be a date as YYYYMMDD"))


@dataclass(frozen=True)
class Match:
    """Every criterion given must hold; lists match when any of their values does."""
    modality: tuple[str, ...] = ()  # any series of the study
    sop_class: tuple[str, ...] = ()  # any instance of the study
    patient_age_at_study: AgeRange | None = None  # whole years at StudyDate
    source_ae: tuple[str, ...] = ()  # the calling AE title that sent it ("import" for imports)
    study_date: DateRange | None = None
    institution: tuple[str, ...] = ()  # InstitutionName, ignoring case


@dataclass(frozen=True)
class Retention:
    """Kept until the latest of the dates the given rules produce."""
    keep_forever: bool = False
    years_after_study: int = field(default=0, metadata=_check(lambda v: 0 <= v <= 200, "must be 0 to 200"))
    years_after_last_study: int = field(default=0, metadata=_check(lambda v: 0 <= v <= 200,
                                                                   "must be 0 to 200"))
    until_patient_age: int = field(default=0, metadata=_check(lambda v: 0 <= v <= 200, "must be 0 to 200"))


@dataclass(frozen=True)
class Transition:
    to: tuple[str, ...]  # cold tiers that must each hold a verified copy
    after_days_without_access: int = field(default=-1, metadata=_check(lambda v: v >= -1, "must be 0 or more"))
    after_days: int = field(default=-1, metadata=_check(lambda v: v >= -1, "must be 0 or more"))
    keep_hot: bool = False  # drop the hot copy once every `to` tier has a verified copy


@dataclass(frozen=True)
class StudyClass:
    name: str
    retention: Retention
    match: Match = Match()
    transitions: tuple[Transition, ...] = ()
    at_expiry: str = field(default="review", metadata=_check(lambda v: v in EXPIRY_ACTIONS,
                                                             "must be review or delete"))


@dataclass(frozen=True)
class PolicyFile:
    classes: tuple[StudyClass, ...]


@dataclass(frozen=True)
class Rule:
    """One class, with where it was written (for plans and deletion records)."""
    study_class: StudyClass
    source: str  # "file.yaml:line"

    @property
    def name(self) -> str:
        return self.study_class.name


def load_policies(config: Config) -> list[Rule]:
    rules: list[Rule] = []
    names: dict[str, str] = {}
    cold = {t.name for t in config.cold_tiers}
    directory = config.policies_path
    for path in sorted(Path(directory).glob("*.yaml")):
        source = _Source(path)
        policy = _build(PolicyFile, source.data, source)
        for number, study_class in enumerate(policy.classes):
            here = ("classes", number)
            where = f"{path.name}:{source.lines.get(here, 1)}"
            if study_class.name in names:
                raise source.error(here + ("name",), f"class '{study_class.name}' is defined twice "
                                                     f"(also at {names[study_class.name]})")
            names[study_class.name] = where
            _check_class(study_class, source, here, cold)
            rules.append(Rule(study_class, where))
    return rules


def _check_class(study_class: StudyClass, source: _Source, here: tuple, cold: set[str]) -> None:
    retention = study_class.retention
    if not (retention.keep_forever or retention.years_after_study or retention.years_after_last_study
            or retention.until_patient_age):
        raise source.error(here + ("retention",), "give keep_forever: true or at least one of years_after_study, "
                                                  "years_after_last_study, until_patient_age")
    if retention.keep_forever and study_class.at_expiry == "delete":
        raise source.error(here + ("at_expiry",), "a class kept forever cannot be deleted at expiry")
    age = study_class.match.patient_age_at_study
    if age is not None and age.at_least >= age.below:
        raise source.error(here + ("match", "patient_age_at_study"), "at_least must be below `below`")
    for number, transition in enumerate(study_class.transitions):
        where = here + ("transitions", number)
        if transition.after_days_without_access < 0 and transition.after_days < 0:
            raise source.error(where, "give after_days_without_access or after_days")
        if not transition.to:
            raise source.error(where + ("to",), "name at least one cold tier")
        for tier in transition.to:
            if tier not in cold:
                known = ", ".join(sorted(cold)) or "none configured"
                raise source.error(where + ("to",), f"'{tier}' is not a cold tier (cold tiers: {known})")


def check_policies(config: Config) -> list[Rule]:
    """Load and validate, or raise ConfigError naming file:line: key."""
    if not config.policies_path.is_dir():
        raise ConfigError(f"{config.policies_path}: the policies directory is missing")
    return load_policies(config)


# -- pure rules ------------------------------------------------------------------------------

def parse_date(value: str) -> date | None:
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:8])) if len(value) >= 8 else None
    except ValueError:
        return None


def add_years(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February
        return day.replace(year=day.year + years, day=28)


def age_on(birth: date, day: date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


@dataclass(frozen=True)
class StudyFacts:
    """What the policy rules look at, read from the index."""
    uid: str
    study_date: date  # StudyDate, or the day it was first stored when absent
    birth_date: date | None
    last_patient_study: date  # the patient's most recent study date in the archive
    modalities: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()
    source_aes: tuple[str, ...] = ()
    institution: str = ""


def matches(match: Match, study: StudyFacts) -> bool:
    if match.modality and not set(match.modality) & set(study.modalities):
        return False
    if match.sop_class and not set(match.sop_class) & set(study.sop_classes):
        return False
    if match.source_ae and not set(match.source_ae) & set(study.source_aes):
        return False
    if match.institution and study.institution.strip().upper() not in {i.upper() for i in match.institution}:
        return False
    if match.study_date is not None:
        low, high = parse_date(match.study_date.on_or_after), parse_date(match.study_date.before)
        if (low and study.study_date < low) or (high and study.study_date >= high):
            return False
    if match.patient_age_at_study is not None:
        if study.birth_date is None:
            return False  # unknown age never matches an age rule
        age = age_on(study.birth_date, study.study_date)
        if not match.patient_age_at_study.at_least <= age < match.patient_age_at_study.below:
            return False
    return True


def classify(rules: list[Rule], study: StudyFacts) -> Rule | None:
    return next((rule for rule in rules if matches(rule.study_class.match, study)), None)


@dataclass(frozen=True)
class RetentionEnd:
    until: date | None  # None: kept forever, or the end cannot be known
    reason: str


def retention_end(retention: Retention, study: StudyFacts) -> RetentionEnd:
    """The day from which a study may go: the latest of the dates its rules give."""
    if retention.keep_forever:
        return RetentionEnd(None, "kept forever")
    ends = []
    if retention.years_after_study:
        ends.append((add_years(study.study_date, retention.years_after_study),
                     f"{retention.years_after_study} years after the study"))
    if retention.years_after_last_study:
        ends.append((add_years(study.last_patient_study, retention.years_after_last_study),
                     f"{retention.years_after_last_study} years after the patient's last study"))
    if retention.until_patient_age:
        if study.birth_date is None:
            return RetentionEnd(None, "patient birth date unknown: kept until a person decides")
        ends.append((add_years(study.birth_date, retention.until_patient_age),
                     f"until the patient is {retention.until_patient_age}"))
    until, reason = max(ends)
    return RetentionEnd(until, reason)
