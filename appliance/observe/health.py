"""The health of the appliance in one dict: what `status` prints and the metrics expose.

State, in the spirit of `zpool status`: ONLINE (no alarm), DEGRADED (an alarm: something
needs doing, no data is lost), FAULTED (stored versions without a good copy, or the hot
tier cannot be written: data is lost or new data cannot be taken).
"""

from __future__ import annotations

import shutil

from appliance import backends
from appliance.admin.home import audit_trail
from appliance.backends.ltfs import LtfsBackend
from appliance.errors import ApplianceError
from appliance.jobs import lifecycle, scrub
from appliance.jobs.offsite import replicate
from appliance.store import alarms as alarm_store
from appliance.store.archive import Archive


def tier_status(archive: Archive, tier) -> dict:
    """Usage of one tier, from the index (bytes of copies) and, where it can be asked, the medium;
    `error` says why the tier cannot be reached now."""
    entry = {"kind": tier.kind, "role": "hot" if tier.name == archive.hot.name else "cold",
             "high_watermark_percent": tier.high_watermark_percent,
             "low_watermark_percent": tier.low_watermark_percent}
    if tier.kind == "filesystem":
        entry["path"] = str(archive.config.resolve(tier.path))
    elif tier.kind == "s3":
        entry["bucket"], entry["prefix"] = tier.s3.bucket, tier.s3.prefix
    try:
        backend = archive.hot if entry["role"] == "hot" else archive.tier(tier.name)
        if tier.kind == "ltfs":
            entry["cartridges"] = [{"label": c.label, "path": str(c.path), "loaded": c.loaded(),
                                    "used_bytes": c.used(), "capacity_bytes": c.capacity}
                                   for c in backends.unwrap(backend, LtfsBackend).cartridges]
        backend.check()
        if tier.kind == "filesystem":
            usage = shutil.disk_usage(entry["path"])
            entry.update(free_bytes=usage.free, capacity_bytes=tier.capacity_mb * 10**6 or usage.total,
                         used_percent=round(100 * usage.used / usage.total, 1))
    except ApplianceError as exc:  # not there, not loaded, refused, or its settings cannot be used
        entry["error"] = str(exc)
    except OSError as exc:
        entry["error"] = f"{exc.filename}: {exc.strerror}"
    return entry


def _unreachable_alarm(name: str, tier: dict, now: float) -> dict:
    action = {"filesystem": f"mount the tier's disk at {tier.get('path')}",
              "ltfs": "load one of the tier's cartridges",
              "s3": "check the endpoint, the network, the bucket and the credentials"}[tier["kind"]]
    return {"key": f"tier-unreachable:{name}", "message": f"tier {name} cannot be reached: {tier['error']}",
            "action": f"{action}; migrations to it and recalls from it wait until then", "since": now}


def status(archive: Archive, now: float) -> dict:
    counters = archive.counters()
    received, stored = counters["received_bytes"], counters["stored_bytes"]
    with archive.index.read() as t:
        packs: dict[str, dict] = {}
        for _, record in t.items("packs"):
            tier = packs.setdefault(record["tier"], {"packs": 0, "pack_bytes": 0})
            tier["packs"] += 1
            tier["pack_bytes"] += record["size"]
    tiers = {}
    for name, tier in archive.config.tiers.items():
        tiers[name] = tier_status(archive, tier) | packs.get(name, {})
    cover = scrub.coverage(archive, int(now))  # one scan of the index serves the tiers and the alarms
    for name, row in cover.items():
        tiers[name]["copies"] = row["copies"]
        tiers[name]["scrub_overdue"] = {"fast": row["copies"] - row["fast_ok"], "deep": row["copies"] - row["deep_ok"]}
    jobs = lifecycle.jobs(archive)
    damaged = scrub.damaged_count(archive)
    alarms = [{"key": key, **value} for key, value in alarm_store.alarms(archive.index).items()]
    alarms += scrub.computed_alarms(archive, now, damaged, cover)
    hot = tiers[archive.hot.name]
    if "error" in hot:
        alarms.append({"key": "hot-tier", "message": f"the hot tier cannot be read: {hot['error']}",
                       "action": "mount or repair the hot tier's file system; stores fail until then", "since": now})
    raised = {a["key"] for a in alarms}  # a job that met the tier raised tier:NAME already: one alarm is enough
    alarms += [_unreachable_alarm(name, tier, now) for name, tier in tiers.items()
               if tier["role"] == "cold" and "error" in tier and f"tier:{name}" not in raised]
    tiers_dir = archive.config.resolve(archive.config.appliance.tiers_dir)
    alarms += [{"key": f"tier-unconfigured:{name}",
                "message": f"{row['packs']} packs are indexed on tier {name}, which no file in {tiers_dir} defines",
                "action": f"put the tier's YAML file back in {tiers_dir}: its packs cannot be read without it",
                "since": now} for name, row in packs.items() if name not in tiers]
    if not archive.config.appliance.audit.enabled:
        alarms.append({"key": "audit-off", "message": "the audit trail is turned off (audit.enabled: false)",
                       "action": "set audit.enabled: true in appliance.yaml", "since": now})
    head = audit_trail(archive.config).head() or {}
    runs = scrub.history(archive)
    copies = replicate.history(archive)
    state = "FAULTED" if damaged or "error" in hot else "DEGRADED" if alarms else "ONLINE"
    return {
        "home": str(archive.config.home),
        "state": state,
        "patients": counters["patients"], "studies": counters["studies"], "series": counters["series"],
        "instances": counters["instances"], "versions": counters["versions"],
        "received_bytes": received, "stored_bytes": stored,
        "stored_ratio": round(stored / received, 4) if received else None,
        "keys": {"kek_id": archive.keyring.kek_id.hex(), "data_keys": archive.keyring.count()},
        "tiers": tiers,
        "scrub_coverage": cover,
        "jobs": {"pending": len(jobs), "failing": sum(1 for j in jobs.values() if j["attempts"])},
        "holds": len(lifecycle.holds(archive)),
        "damaged": damaged,
        "last_scrub": runs[-1]["line"] if runs else "no scrub has run yet",
        "last_scrub_run": runs[-1] if runs else None,
        "last_replication": copies[-1]["line"] if copies else "never replicated",
        "last_replication_run": copies[-1] if copies else None,
        "replication_lag_s": replicate.rpo_lag(archive, now),
        "rpo_hours": archive.config.appliance.replication.rpo_hours,
        "audit": {"enabled": archive.config.appliance.audit.enabled, "records": head.get("seq", 0),
                  "signed": head.get("time", "")},
        "alarms": alarms,
    }
