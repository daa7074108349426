"""Retention and tiering: the planner (pure) and the executor (a job queue in LMDB).

`plan_actions` turns what the index says about each study, the policy rules and
the time into a list of actions, each with the rule that causes it. `Lifecycle.apply`
records one job per study in the index ("jobs"), runs the jobs that are due, and
keeps a job until it finished: a run killed at any point is finished by the next
one, with nothing lost and nothing written twice (see store/tiering.py). A job
that meets an unreachable tier is retried later with a doubling delay, raises an
alarm, and leaves its source untouched.

Expiry deletes only what the rules still say has expired at the moment of
deletion, and never a study under a legal hold.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from typing import Callable

from appliance.admin.home import audit_trail
from appliance.audit.events import EventID, event
from appliance.errors import ApplianceError, NotFound
from appliance.jobs.policy import Rule, StudyFacts, classify, parse_date, retention_end
from appliance.store import tiering
from appliance.store.archive import Archive
from appliance.store.catalog import Hold, Job, Study, View

_MAX_BACKOFF_S = 6 * 3600
_DAY = 86400


# -- planning (pure) ---------------------------------------------------------------------------

@dataclass(frozen=True)
class StudyState:
    facts: StudyFacts
    last_access: int  # unix s: last store, retrieve or export
    first_stored: int
    hot_bytes: int  # sealed bytes of its hot copies
    cold_tiers: frozenset[str]  # tiers where every version has a copy
    held: tuple[str, ...] = ()  # reasons of the holds on it


@dataclass(frozen=True)
class Action:
    kind: str  # migrate, evict, expire, review, held
    study: str
    rule: str  # class name and where it is written
    reason: str
    targets: tuple[str, ...] = ()
    drop_hot: bool = False


@dataclass(frozen=True)
class HotUsage:
    used: int
    capacity: int
    high_percent: int
    low_percent: int


def _day(ts: int) -> date:
    return datetime.fromtimestamp(ts, timezone.utc).date()


def plan_actions(studies: list[StudyState], rules: list[Rule], now: int,
                 usage: HotUsage | None = None) -> tuple[list[Action], list[str]]:
    """(actions, unclassified study UIDs)."""
    today = _day(now)
    actions: list[Action] = []
    unclassified: list[str] = []
    by_uid: dict[str, tuple[StudyState, Rule]] = {}
    for state in studies:
        rule = classify(rules, state.facts)
        if rule is None:
            unclassified.append(state.facts.uid)
            continue
        by_uid[state.facts.uid] = (state, rule)
        label = f"{rule.name} ({rule.source})"
        end = retention_end(rule.study_class.retention, state.facts)
        if end.until is not None and today >= end.until:
            why = f"retention ended {end.until.isoformat()} ({end.reason})"
            if state.held:
                actions.append(Action("held", state.facts.uid, label, f"{why}; kept: held ({'; '.join(state.held)})"))
            elif rule.study_class.at_expiry == "delete":
                actions.append(Action("expire", state.facts.uid, label, why))
            else:
                actions.append(Action("review", state.facts.uid, label, why))
            continue
        targets: list[str] = []
        drop_hot, reasons = False, []
        idle_days = (now - state.last_access) // _DAY
        age_days = (now - state.first_stored) // _DAY
        for transition in rule.study_class.transitions:
            due = ((0 <= transition.after_days_without_access <= idle_days)
                   or (0 <= transition.after_days <= age_days))
            if not due:
                continue
            missing = [t for t in transition.to if t not in state.cold_tiers and t not in targets]
            targets += missing
            drop = not transition.keep_hot and state.hot_bytes > 0
            drop_hot = drop_hot or drop
            if missing or drop:
                reasons.append(f"{idle_days} days without access, {age_days} days stored: "
                               + (f"copy to {', '.join(transition.to)}" if missing else "copies verified")
                               + ("" if transition.keep_hot else ", then drop the hot copy"))
        if targets or drop_hot:
            actions.append(Action("migrate", state.facts.uid, label, "; ".join(reasons), tuple(targets), drop_hot))
    if usage is not None and usage.capacity and usage.used * 100 > usage.high_percent * usage.capacity:
        actions += _relieve_pressure(by_uid, actions, usage)
    return actions, unclassified


def retention_calendar(studies: list[StudyState], rules: list[Rule], now: int, horizon_days: int) -> list[dict]:
    """Studies whose retention ends within `horizon_days` (or has ended), soonest first: what
    expires next, under which rule, and what happens then."""
    limit = _day(now + horizon_days * _DAY)
    rows = []
    for state in studies:
        rule = classify(rules, state.facts)
        if rule is None:
            continue
        end = retention_end(rule.study_class.retention, state.facts)
        if end.until is not None and end.until <= limit:
            rows.append({"study": state.facts.uid, "until": end.until.isoformat(), "why": end.reason,
                         "rule": f"{rule.name} ({rule.source})", "at_expiry": rule.study_class.at_expiry,
                         "held": bool(state.held)})
    return sorted(rows, key=lambda row: (row["until"], row["study"]))


def _relieve_pressure(by_uid: dict, actions: list[Action], usage: HotUsage) -> list[Action]:
    """Free the hot tier down to its low watermark, least recently used first."""
    planned = {a.study for a in actions}
    freed = sum(by_uid[a.study][0].hot_bytes for a in actions if a.drop_hot and a.study in by_uid)
    goal = usage.used - usage.low_percent * usage.capacity // 100
    percent = usage.used * 100 // usage.capacity
    extra = []
    candidates = sorted((s for s, _ in by_uid.values() if s.hot_bytes and s.facts.uid not in planned),
                        key=lambda s: (s.last_access, s.facts.uid))
    for state in candidates:
        if freed >= goal:
            break
        rule = by_uid[state.facts.uid][1]
        label = f"{rule.name} ({rule.source})"
        wanted = []
        for transition in rule.study_class.transitions:
            wanted += [t for t in transition.to if t not in wanted]
        reason = f"hot tier at {percent}% (high watermark {usage.high_percent}%), least recently used"
        if state.cold_tiers and set(wanted) <= state.cold_tiers:
            extra.append(Action("evict", state.facts.uid, label, reason + "; cold copies verified", (), True))
        elif wanted:
            missing = tuple(t for t in wanted if t not in state.cold_tiers)
            extra.append(Action("migrate", state.facts.uid, label, reason, missing, True))
        else:
            continue  # its class keeps it on the hot tier
        freed += state.hot_bytes
    return extra


# -- reading the index into planner input ------------------------------------------------------

def _study_date(study: Study) -> date:
    """StudyDate, or the day the study was first stored when it has none."""
    return parse_date(study.attributes.get("StudyDate", "")) or _day(study.first_stored)


def _patient_id(view: View, study: Study) -> str:
    patient = view.patient(study.patient)
    return patient.attributes.get("PatientID", "") if patient else ""


def _state(view: View, study: Study, last_patient_study: date, hot: str) -> StudyState:
    patient = view.patient(study.patient)
    attributes = patient.attributes if patient else {}
    blobs = view.study_blobs(study.uid)
    tiers = set.intersection(*(set(b.copies) for b in blobs)) if blobs else set()
    held = tuple(h.reason for h in (view.hold(f"study:{study.uid}"),
                                    view.hold(f"patient:{attributes.get('PatientID', '')}")) if h)
    facts = StudyFacts(study.uid, _study_date(study), parse_date(attributes.get("PatientBirthDate", "")),
                       last_patient_study, study.modalities, study.sop_classes, study.source_aes,
                       study.attributes.get("InstitutionName", ""))
    return StudyState(facts, max(study.last_access, study.last_stored), study.first_stored,
                      sum(b.sealed_size for b in blobs if b.hot(hot) is not None), frozenset(tiers - {hot}), held)


def study_states(archive: Archive) -> list[StudyState]:
    """Every study, as the planner sees it."""
    with archive.catalog.read() as view:
        last_of_patient: dict[str, date] = {}
        studies = list(view.studies())
        for study in studies:
            day = _study_date(study)
            if day > last_of_patient.get(study.patient, date.min):
                last_of_patient[study.patient] = day
        return [_state(view, study, last_of_patient[study.patient], archive.hot.name) for study in studies]


def study_state(archive: Archive, uid: str) -> StudyState | None:
    """One study, as the planner sees it (its patient's other studies read through the catalog)."""
    with archive.catalog.read() as view:
        study = view.study(uid)
        if study is None:
            return None
        others = [view.study(other) for other in view.patient_studies(study.patient)]
        last = max((_study_date(other) for other in others if other is not None), default=date.min)
        return _state(view, study, max(last, _study_date(study)), archive.hot.name)


def hot_usage(archive: Archive, states: list[StudyState]) -> HotUsage | None:
    """None when the hot tier's file system cannot be read (not mounted): no pressure is known."""
    tier = archive.config.hot_tier
    if tier.capacity_mb:
        used, capacity = sum(s.hot_bytes for s in states), tier.capacity_mb * 10**6
    else:
        try:
            disk = shutil.disk_usage(archive.hot.root)
        except OSError:
            return None
        used, capacity = disk.used, disk.total
    return HotUsage(used, capacity, tier.high_watermark_percent, tier.low_watermark_percent)


# -- holds -----------------------------------------------------------------------------------

def hold_key(study_uid: str | None, patient_id: str | None) -> str:
    if bool(study_uid) == bool(patient_id):
        raise ApplianceError("name either a study UID or --patient ID")
    return f"study:{study_uid}" if study_uid else f"patient:{patient_id}"


def set_hold(archive: Archive, key: str, reason: str, now: int | None = None) -> None:
    if not reason.strip():
        raise ApplianceError("a hold needs a reason (--reason TEXT)")
    if key.startswith("study:"):
        archive.study(key[6:])  # NotFound for a study the archive does not hold
    archive.catalog.set_hold(Hold(key, reason, audit_trail(archive.config).user, int(now or time.time())))
    _audit_hold(archive, key, "hold set", reason)


def _audit_hold(archive: Archive, key: str, op: str, reason: str) -> None:
    kind, name = key.split(":", 1)
    study = name if kind == "study" else ""
    archive.audit.record(event(EventID.INSTANCES_ACCESSED, op=op, action="U", study=study,
                               patient=name if kind == "patient" else archive.patient_id_of(study),
                               reason=reason))


def release_hold(archive: Archive, key: str, reason: str) -> Hold:
    with archive.catalog.read() as view:
        if view.hold(key) is None:
            raise NotFound(f"no hold on {key.replace(':', ' ', 1)}")
    _audit_hold(archive, key, "hold release", reason)  # recorded first: no release goes unrecorded
    return archive.catalog.release_hold(key)


def holds(archive: Archive) -> dict[str, dict]:
    """Every legal hold: key ("study:UID", "patient:ID") -> {reason, by, since} (for people and JSON)."""
    with archive.catalog.read() as view:
        return {hold.key: hold.raw() for hold in view.holds()}


def is_held(view: View, study_uid: str) -> bool:
    if view.hold(f"study:{study_uid}") is not None:
        return True
    study = view.study(study_uid)
    return study is not None and view.hold(f"patient:{_patient_id(view, study)}") is not None


# -- executing ---------------------------------------------------------------------------------

@dataclass
class ApplyReport:
    planned: int = 0
    done: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    waiting: int = 0  # jobs whose retry time has not come
    bytes_written: int = 0
    copies_cleaned: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class Lifecycle:
    def __init__(self, archive: Archive, rules: list[Rule], *, clock: Callable[[], float] = time.time):
        self.archive, self.rules, self.clock = archive, rules, clock

    def plan(self) -> tuple[list[Action], list[str]]:
        states = study_states(self.archive)
        return plan_actions(states, self.rules, int(self.clock()), hot_usage(self.archive, states))

    def apply(self, on_event: Callable[[str, dict], None] = lambda kind, data: None) -> ApplyReport:
        report = ApplyReport()
        actions, _ = self.plan()
        now = int(self.clock())
        runnable = [a for a in actions if a.kind in ("migrate", "evict", "expire")]
        report.planned = len(runnable)

        self.archive.catalog.enqueue_jobs([Job(a.study, a.kind, tuple(a.targets), a.drop_hot, a.rule, a.reason, now)
                                           for a in runnable])
        report.copies_cleaned = self._retry_shred_cleanup()
        with self.archive.catalog.read() as view:
            jobs = view.jobs()
            due_bytes = sum((study.stored_bytes if (study := view.study(job.study)) else 0) * len(job.targets)
                            for job in jobs if job.next_try <= now)
        on_event("jobs", {"count": sum(1 for job in jobs if job.next_try <= now), "bytes": due_bytes})
        for job in jobs:
            study_uid, targets = job.study, list(job.targets)
            if job.next_try > now:
                report.waiting += 1
                continue
            on_event("job.start", {"study": study_uid, "kind": job.kind, "targets": targets})
            try:
                written = self._run(job)
            except ApplianceError as exc:  # tier down, full, a source copy that fails to verify
                self._postpone(job, exc)
                report.failed.append({"study": study_uid, "kind": job.kind, "error": str(exc)})
                on_event("job.failed", {"study": study_uid, "kind": job.kind, "error": str(exc)})
                continue
            report.bytes_written += written
            if job.kind != "expire":
                self.archive.audit.record(event(
                    EventID.INSTANCES_ACCESSED, op=job.kind, action="U", study=study_uid,
                    patient=self.archive.patient_id_of(study_uid), dest=",".join(targets),
                    instances=self._instance_count(study_uid),
                    bytes=written, hot_copy_dropped=job.drop_hot, rule=job.rule))
            self.archive.catalog.finish_job(study_uid)
            for key in [f"tier:{tier}" for tier in targets] + [f"job:{study_uid}"]:
                self.archive.catalog.clear_alarm(key)
            report.done.append({"study": study_uid, "kind": job.kind, "targets": targets, "bytes": written})
            on_event("job.done", {"study": study_uid, "kind": job.kind, "bytes": written})
        return report

    def _instance_count(self, study_uid: str) -> int:
        try:
            return len(self.archive.instances_of_study(study_uid))
        except NotFound:  # deleted meanwhile
            return 0

    def _run(self, job: Job) -> int:
        study_uid = job.study
        self._clean_orphans(job)
        if job.kind == "expire":
            self._expire(study_uid)
            return 0
        try:
            self.archive.study(study_uid)
        except NotFound:
            return 0  # deleted meanwhile: nothing left to do
        written = 0
        for tier in job.targets:
            written += tiering.pack_study(
                self.archive, study_uid, tier,
                remember_pending=lambda pack_id, tier=tier: self.archive.catalog.note_pending_pack(study_uid, tier,
                                                                                                   pack_id))
        if job.drop_hot:
            tiering.drop_hot(self.archive, study_uid, list(job.targets))
        return written

    def _clean_orphans(self, job: Job) -> None:
        for tier, pack_id in job.pending.items():
            tiering.discard_if_unrecorded(self.archive, tier, pack_id)
            self.archive.catalog.note_pending_pack(job.study, tier, None)

    def _expire(self, study_uid: str) -> None:
        # Look again at the moment of deletion: a hold set or a study stored since the plan wins.
        state = study_state(self.archive, study_uid)
        if state is None:
            return
        with self.archive.catalog.read() as view:
            if is_held(view, study_uid):
                return
            patient_id = _patient_id(view, view.study(study_uid))
            series = view.study_series(study_uid)
            instances = [sop for s in series for sop in view.series_instances(s)]
        rule = classify(self.rules, state.facts)
        end = retention_end(rule.study_class.retention, state.facts) if rule else None
        if (rule is None or rule.study_class.at_expiry != "delete" or end.until is None
                or _day(int(self.clock())) < end.until):
            return  # within retention now (a new study of the patient, a policy change): kept
        _, unremoved = self.archive.delete_study(study_uid)
        record = {"time": int(self.clock()), "rule": f"{rule.name} ({rule.source})",
                  "reason": f"retention ended {end.until.isoformat()} ({end.reason})",
                  "by": audit_trail(self.archive.config).user, "patient_id": patient_id, "series": series,
                  "instances": instances, "unremoved": unremoved}
        self.archive.catalog.record_deletion(study_uid, record)
        self.archive.audit.record(event(
            EventID.STUDY_DELETED, op="expire", action="D", study=study_uid, patient=record["patient_id"],
            instances=len(instances), rule=record["rule"], reason=record["reason"], shredded=True,
            copies_left=len(unremoved)))
        if unremoved:
            self.archive.catalog.raise_alarm("shred-cleanup", f"{len(unremoved)} copies of deleted studies remain "
                                             "(unreadable: their keys are destroyed)",
                                             "load the cartridges listed by `appliance policy deletions`, then run `policy apply`")

    def _retry_shred_cleanup(self) -> int:
        with self.archive.catalog.read() as view:
            pending = [(uid, rec) for uid, rec in view.deletions().items() if rec.get("unremoved")]
        cleaned = 0
        for study_uid, record in pending:
            left = tiering.delete_packs(self.archive, {u["pack"]: (u["tier"], u.get("where", ""))
                                                       for u in record["unremoved"]})
            cleaned += len(record["unremoved"]) - len(left)
            record["unremoved"] = left
            self.archive.catalog.set_unremoved(study_uid, left)
        if pending and not any(r["unremoved"] for _, r in pending):
            self.archive.catalog.clear_alarm("shred-cleanup")
        return cleaned

    def _postpone(self, job: Job, exc: ApplianceError) -> None:
        delay = min(self.archive.config.appliance.lifecycle.retry_backoff_s * 2 ** job.attempts, _MAX_BACKOFF_S)
        self.archive.catalog.postpone_job(job.study, int(self.clock()) + delay, str(exc))
        tier = getattr(exc, "tier", None)
        if tier:
            self.archive.catalog.raise_alarm(
                f"tier:{tier}", f"tier {tier} failed: {exc}",
                "check the tier (network, credentials, cartridge); jobs are retried by `policy apply`")
        else:
            self.archive.catalog.raise_alarm(f"job:{job.study}", f"a {job.kind} job failed: {exc}",
                                             "see `appliance policy jobs`; the job is retried by `policy apply`")


def jobs(archive: Archive) -> dict[str, dict]:
    """The job queue: study -> {kind, targets, drop_hot, rule, reason, created, attempts, next_try,
    error, pending} (for people and JSON)."""
    with archive.catalog.read() as view:
        return {job.study: job.raw() for job in view.jobs()}


def deletions(archive: Archive) -> dict[str, dict]:
    with archive.catalog.read() as view:
        return view.deletions()
