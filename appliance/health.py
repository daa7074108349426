"""The health of the appliance in one dict: what `status` prints and the metrics expose.

State, in the spirit of `zpool status`: ONLINE (no alarm), DEGRADED (an alarm: something
needs doing, no data is lost), FAULTED (stored versions without a good copy, or the hot
tier cannot be written: data is lost or new data cannot be taken).
"""

from __future__ import annotations

import shutil

from appliance import lifecycle, replicate, scrub
from appliance.store import alarms as alarm_store
from appliance.store.archive import Archive


def tier_status(archive: Archive, tier) -> dict:
    """Usage of one tier, from the index (bytes of copies) and, where it can be asked, the medium."""
    entry = {"kind": tier.kind, "role": "hot" if tier.name == archive.hot.name else "cold",
             "high_watermark_percent": tier.high_watermark_percent,
             "low_watermark_percent": tier.low_watermark_percent}
    if tier.kind == "filesystem":
        path = archive.config.resolve(tier.path)
        entry["path"] = str(path)
        try:
            usage = shutil.disk_usage(path)
            entry.update(free_bytes=usage.free, capacity_bytes=tier.capacity_mb * 10**6 or usage.total,
                         used_percent=round(100 * usage.used / usage.total, 1))
        except OSError as exc:
            entry["error"] = exc.strerror
    elif tier.kind == "ltfs":
        backend = archive.tier(tier.name).inner
        entry["cartridges"] = [{"label": c.label, "path": str(c.path), "loaded": c.loaded(),
                                "used_bytes": c.used(), "capacity_bytes": c.capacity} for c in backend.cartridges]
    else:
        entry["bucket"], entry["prefix"] = tier.s3.bucket, tier.s3.prefix
    return entry


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
        alarms.append({"key": "hot-tier", "message": f"the hot tier {hot['path']} cannot be read: {hot['error']}",
                       "action": "mount or repair the hot tier's file system; stores fail until then", "since": now})
    if not archive.config.appliance.audit.enabled:
        alarms.append({"key": "audit-off", "message": "the audit trail is turned off (audit.enabled: false)",
                       "action": "set audit.enabled: true in appliance.yaml", "since": now})
    head = archive.audit.head() or {}
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
