"""What the auditor's report says, as a typed record (`as_dict` is its JSON; html_reports lays
it out): integrity (scrub coverage, runs and findings, damaged versions), backups
(replication runs, RPO lag), retention (what expires next and how, holds, deletions) and
access (a summary of the audit trail and whether it verifies)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

from appliance.admin.home import audit_trail
from appliance.audit.chain import utc
from appliance.audit.query import access_summary
from appliance.errors import ApplianceError
from appliance.jobs import lifecycle, policy, scrub
from appliance.jobs.offsite import replicate
from appliance.observe import health
from appliance.store.archive import Archive


@dataclass(frozen=True)
class Integrity:
    coverage: dict[str, dict]  # per tier: copies and the share verified within its intervals
    runs: list[dict]  # the last scrub runs' summaries
    damaged: int


@dataclass(frozen=True)
class Backups:
    runs: list[dict]  # the last replication runs' summaries
    rpo_lag_s: float | None
    rpo_hours: int


@dataclass(frozen=True)
class Retention:
    horizon_days: int
    calendar: list[dict]  # what expires within the horizon, and how
    policy_error: str
    holds: dict[str, dict]
    deletions: dict[str, dict]


@dataclass(frozen=True)
class Access:
    verification: dict
    records: int
    summary: list[dict]
    per_day: dict[str, dict[str, int]]
    security_alerts: list[dict]


@dataclass(frozen=True)
class AuditorReport:
    generated: float
    home: str
    period: dict[str, str | int]  # since, until (UTC), days
    status: health.HealthStatus
    integrity: Integrity
    backups: Backups
    retention: Retention
    access: Access

    def as_dict(self) -> dict:
        """The JSON of `appliance report --json` (and what the HTML page is made from)."""
        out = asdict(self)
        out["status"] = self.status.as_dict()
        return out


def gather(archive: Archive, now: float, since_days: int = 90, horizon_days: int = 365) -> AuditorReport:
    since = utc(now - since_days * 86400)
    status = health.status(archive, now)
    trail = audit_trail(archive.config)
    try:
        rules = policy.check_policies(archive.config)
        states = lifecycle.study_states(archive)
        calendar = lifecycle.retention_calendar(states, rules, int(now), horizon_days)
        policy_error = ""
    except ApplianceError as exc:
        calendar, policy_error = [], str(exc)
    records = [r for r in trail.records() if r["time"] >= since]
    per_day: dict[str, Counter] = {}
    for record in records:
        per_day.setdefault(record["time"][:10], Counter())[record["event"]] += 1
    verification = trail.verify()
    return AuditorReport(
        generated=now, home=str(archive.config.home), period={"since": since, "until": utc(now), "days": since_days},
        status=status,
        integrity=Integrity(status.scrub_coverage, scrub.history(archive)[-60:], status.damaged),
        backups=Backups(replicate.history(archive)[-60:], status.replication_lag_s, status.rpo_hours),
        retention=Retention(horizon_days, calendar, policy_error, lifecycle.holds(archive),
                            {uid: {k: v for k, v in rec.items() if k not in ("series", "instances")}
                             | {"instances": len(rec["instances"])}
                             for uid, rec in lifecycle.deletions(archive).items()}),
        access=Access(verification.as_dict(), len(records), access_summary(records),
                      {day: dict(counts) for day, counts in sorted(per_day.items())},
                      [r for r in records if r["event"] == "Security Alert"][-100:]))
