"""What the auditor's report says, gathered in one dict (the JSON form; reports.auditor_html
lays it out): integrity (scrub coverage, runs and findings, damaged versions), backups
(replication runs, RPO lag), retention (what expires next and how, holds, deletions) and
access (a summary of the audit trail and whether it verifies)."""

from __future__ import annotations

from collections import Counter

from appliance.admin.home import audit_trail
from appliance.audit.chain import utc
from appliance.audit.query import access_summary
from appliance.errors import ApplianceError
from appliance.jobs import lifecycle, policy, scrub
from appliance.jobs.offsite import replicate
from appliance.observe import health
from appliance.store.archive import Archive


def gather(archive: Archive, now: float, since_days: int = 90, horizon_days: int = 365) -> dict:
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
    return {
        "generated": now,
        "home": str(archive.config.home),
        "period": {"since": since, "until": utc(now), "days": since_days},
        "status": status,
        "integrity": {
            "coverage": status["scrub_coverage"],
            "runs": scrub.history(archive)[-60:],
            "damaged": status["damaged"],
        },
        "backups": {
            "runs": replicate.history(archive)[-60:],
            "rpo_lag_s": status["replication_lag_s"],
            "rpo_hours": status["rpo_hours"],
        },
        "retention": {
            "horizon_days": horizon_days,
            "calendar": calendar,
            "policy_error": policy_error,
            "holds": lifecycle.holds(archive),
            "deletions": {uid: {k: v for k, v in rec.items() if k not in ("series", "instances")}
                          | {"instances": len(rec["instances"])}
                          for uid, rec in lifecycle.deletions(archive).items()},
        },
        "access": {
            "verification": verification.as_dict(),
            "records": len(records),
            "summary": access_summary(records),
            "per_day": {day: dict(counts) for day, counts in sorted(per_day.items())},
            "security_alerts": [r for r in records if r["event"] == "Security Alert"][-100:],
        },
    }

