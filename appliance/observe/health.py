"""The health of the appliance: what `status` prints (and `status --json` gives, as_dict) and the
metrics expose, as typed records.

State, in the spirit of `zpool status`: ONLINE (no alarm), DEGRADED (an alarm: something
needs doing, no data is lost), FAULTED (stored versions without a good copy, or the hot
tier cannot be written: data is lost or new data cannot be taken).
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from appliance import backends
from appliance.admin.home import audit_trail
from appliance.backends.ltfs import LtfsBackend
from appliance.errors import ApplianceError
from appliance.jobs import lifecycle, scrub
from appliance.jobs.offsite import replicate
from appliance.observe.metrics import family
from appliance.store.archive import Archive


@dataclass(frozen=True)
class CartridgeHealth:
    label: str
    path: str
    loaded: bool
    used_bytes: int
    capacity_bytes: int


@dataclass
class TierHealth:
    """One tier: its usage where it can be asked, what the catalog holds on it, and `error` when it
    cannot be reached now. A field that does not apply to the tier's kind is None (and absent
    from the JSON)."""

    kind: str
    role: str  # hot or cold
    high_watermark_percent: int
    low_watermark_percent: int
    path: str | None = None  # filesystem
    bucket: str | None = None  # s3
    prefix: str | None = None
    cartridges: list[CartridgeHealth] | None = None  # ltfs
    free_bytes: int | None = None  # filesystem, when it can be read
    capacity_bytes: int | None = None
    used_percent: float | None = None
    error: str | None = None
    packs: int | None = None  # cold: packs the catalog lists on it
    pack_bytes: int | None = None
    copies: int | None = None  # copies on it and how many are past their scrub interval
    scrub_overdue: dict[str, int] | None = None

    def as_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class AlarmHealth:
    key: str
    message: str
    action: str
    since: float


@dataclass
class HealthStatus:
    """The whole summary (see the module docstring for `state`)."""

    home: str
    state: str  # ONLINE, DEGRADED, FAULTED
    patients: int
    studies: int
    series: int
    instances: int
    versions: int
    received_bytes: int
    stored_bytes: int
    stored_ratio: float | None
    keys: dict[str, Any]  # kek_id (hex), data_keys (count)
    tiers: dict[str, TierHealth]
    scrub_coverage: dict[str, dict]
    jobs: dict[str, int]  # pending, failing
    holds: int
    damaged: int
    last_scrub: str
    last_scrub_run: dict | None
    last_replication: str
    last_replication_run: dict | None
    replication_lag_s: float | None
    rpo_hours: int
    audit: dict[str, Any]  # enabled (bool), records (int), signed (UTC time)
    alarms: list[AlarmHealth] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The JSON of `appliance status --json`."""
        out = asdict(self)
        out["tiers"] = {name: tier.as_dict() for name, tier in self.tiers.items()}
        return out


def tier_status(archive: Archive, tier) -> TierHealth:
    """Usage of one tier, from the index (bytes of copies) and, where it can be asked, the medium;
    `error` says why the tier cannot be reached now."""
    entry = TierHealth(tier.kind, "hot" if tier.name == archive.hot.name else "cold",
                       tier.high_watermark_percent, tier.low_watermark_percent)
    path = str(archive.config.resolve(tier.path)) if tier.kind == "filesystem" else ""
    if tier.kind == "filesystem":
        entry.path = path
    elif tier.kind == "s3":
        entry.bucket, entry.prefix = tier.s3.bucket, tier.s3.prefix
    try:
        backend = archive.hot if entry.role == "hot" else archive.tier(tier.name)
        if tier.kind == "ltfs":
            entry.cartridges = [CartridgeHealth(c.label, str(c.path), c.loaded(), c.used(), c.capacity)
                                for c in backends.unwrap(backend, LtfsBackend).cartridges]
        backend.check()
        if tier.kind == "filesystem":
            usage = shutil.disk_usage(path)
            entry.free_bytes = usage.free
            entry.capacity_bytes = tier.capacity_mb * 10**6 or usage.total
            entry.used_percent = round(100 * usage.used / usage.total, 1)
    except ApplianceError as exc:  # not there, not loaded, refused, or its settings cannot be used
        entry.error = str(exc)
    except OSError as exc:
        entry.error = f"{exc.filename}: {exc.strerror}"
    return entry


def _unreachable_alarm(name: str, tier: TierHealth, now: float) -> AlarmHealth:
    action = {"filesystem": f"mount the tier's disk at {tier.path}",
              "ltfs": "load one of the tier's cartridges",
              "s3": "check the endpoint, the network, the bucket and the credentials"}[tier.kind]
    return AlarmHealth(f"tier-unreachable:{name}", f"tier {name} cannot be reached: {tier.error}",
                       f"{action}; migrations to it and recalls from it wait until then", now)


def status(archive: Archive, now: float) -> HealthStatus:
    counters = archive.counters()
    received, stored = counters["received_bytes"], counters["stored_bytes"]
    with archive.catalog.read() as view:
        packs: dict[str, list[int]] = {}  # tier -> [packs, bytes]
        for record in view.packs():
            row = packs.setdefault(record.tier, [0, 0])
            row[0] += 1
            row[1] += record.size
        alarms = [AlarmHealth(alarm.key, alarm.message, alarm.action, alarm.since) for alarm in view.alarms()]
    tiers = {}
    for name, tier in archive.config.tiers.items():
        tiers[name] = tier_status(archive, tier)
        if name in packs:
            tiers[name].packs, tiers[name].pack_bytes = packs[name]
    cover = scrub.coverage(archive, int(now))  # one scan of the index serves the tiers and the alarms
    for name, row in cover.items():
        tiers[name].copies = row["copies"]
        tiers[name].scrub_overdue = {"fast": row["copies"] - row["fast_ok"], "deep": row["copies"] - row["deep_ok"]}
    jobs = lifecycle.jobs(archive)
    damaged = scrub.damaged_count(archive)
    alarms += [AlarmHealth(a["key"], a["message"], a["action"], a["since"])
               for a in scrub.computed_alarms(archive, now, damaged, cover)]
    hot = tiers[archive.hot.name]
    if hot.error is not None:
        alarms.append(AlarmHealth("hot-tier", f"the hot tier cannot be read: {hot.error}",
                                  "mount or repair the hot tier's file system; stores fail until then", now))
    raised = {a.key for a in alarms}  # a job that met the tier raised tier:NAME already: one alarm is enough
    alarms += [_unreachable_alarm(name, tier, now) for name, tier in tiers.items()
               if tier.role == "cold" and tier.error is not None and f"tier:{name}" not in raised]
    tiers_dir = archive.config.resolve(archive.config.appliance.tiers_dir)
    alarms += [AlarmHealth(f"tier-unconfigured:{name}",
                           f"{row[0]} packs are indexed on tier {name}, which no file in {tiers_dir} defines",
                           f"put the tier's YAML file back in {tiers_dir}: its packs cannot be read without it", now)
               for name, row in packs.items() if name not in tiers]
    if not archive.config.appliance.audit.enabled:
        alarms.append(AlarmHealth("audit-off", "the audit trail is turned off (audit.enabled: false)",
                                  "set audit.enabled: true in appliance.yaml", now))
    head = audit_trail(archive.config).head() or {}
    runs = scrub.history(archive)
    copies = replicate.history(archive)
    state = "FAULTED" if damaged or hot.error is not None else "DEGRADED" if alarms else "ONLINE"
    return HealthStatus(
        home=str(archive.config.home), state=state, patients=counters["patients"], studies=counters["studies"],
        series=counters["series"], instances=counters["instances"], versions=counters["versions"],
        received_bytes=received, stored_bytes=stored,
        stored_ratio=round(stored / received, 4) if received else None,
        keys={"kek_id": archive.keyring.kek_id.hex(), "data_keys": archive.keyring.count()},
        tiers=tiers, scrub_coverage=cover,
        jobs={"pending": len(jobs), "failing": sum(1 for job in jobs.values() if job["attempts"])},
        holds=len(lifecycle.holds(archive)), damaged=damaged,
        last_scrub=runs[-1]["line"] if runs else "no scrub has run yet", last_scrub_run=runs[-1] if runs else None,
        last_replication=copies[-1]["line"] if copies else "never replicated",
        last_replication_run=copies[-1] if copies else None,
        replication_lag_s=replicate.rpo_lag(archive, now), rpo_hours=archive.config.appliance.replication.rpo_hours,
        audit={"enabled": archive.config.appliance.audit.enabled, "records": head.get("seq", 0),
               "signed": head.get("time", "")},
        alarms=alarms)


_STATES = ("ONLINE", "DEGRADED", "FAULTED")


def _alarm_label(key: str) -> str:
    return "job" if key.startswith("job:") else key


def gauges(status: HealthStatus, now: float) -> str:
    """The health summary as Prometheus gauges (metrics.family)."""
    tiers = status.tiers
    last_scrub, last_copy = status.last_scrub_run, status.last_replication_run
    lag = status.replication_lag_s
    alarm_counts = Counter(_alarm_label(a.key) for a in status.alarms)
    families = [
        family("up", "gauge", "1: the archive could be read for this scrape.", [({}, 1)]),
        family("state", "gauge", "1 for the current state (ONLINE, DEGRADED, FAULTED).",
               [({"state": s}, int(status.state == s)) for s in _STATES]),
        family("instances", "gauge", "Instances held.", [({}, status.instances)]),
        family("studies", "gauge", "Studies held.", [({}, status.studies)]),
        family("received_bytes", "gauge", "Bytes of all stored versions as received.", [({}, status.received_bytes)]),
        family("stored_bytes", "gauge", "Bytes of all stored versions as sealed.", [({}, status.stored_bytes)]),
        family("tier_up", "gauge", "1: the tier could be reached for this scrape (0: see its alarm).",
               [({"tier": n}, int(t.error is None)) for n, t in tiers.items()]),
        family("cartridge_loaded", "gauge", "1: the tape cartridge is loaded (mounted with its label).",
               [({"tier": n, "cartridge": c.label}, int(c.loaded)) for n, t in tiers.items()
                for c in t.cartridges or []]),
        family("tier_used_ratio", "gauge", "Share of a filesystem tier's volume in use.",
               [({"tier": n}, t.used_percent / 100) for n, t in tiers.items() if t.used_percent is not None]),
        family("tier_free_bytes", "gauge", "Free bytes on a filesystem tier's volume.",
               [({"tier": n}, t.free_bytes) for n, t in tiers.items() if t.free_bytes is not None]),
        family("tier_high_watermark_ratio", "gauge", "A tier's high watermark.",
               [({"tier": n}, t.high_watermark_percent / 100) for n, t in tiers.items()]),
        family("tier_pack_bytes", "gauge", "Bytes of packs on a cold tier.",
               [({"tier": n}, t.pack_bytes or 0) for n, t in tiers.items() if t.role == "cold"]),
        family("tier_scrub_overdue_copies", "gauge", "Copies past their scrub interval, by tier and kind.",
               [({"tier": n, "kind": k}, v) for n, t in tiers.items() for k, v in (t.scrub_overdue or {}).items()]),
        family("jobs_pending", "gauge", "Migration and expiry jobs queued.", [({}, status.jobs["pending"])]),
        family("jobs_failing", "gauge", "Jobs being retried after a failure.", [({}, status.jobs["failing"])]),
        family("holds", "gauge", "Legal holds.", [({}, status.holds)]),
        family("damaged_versions", "gauge", "Stored versions with no good copy.", [({}, status.damaged)]),
        family("scrub_last_finished_timestamp_seconds", "gauge", "When the last scrub finished.",
               [({"kind": "deep" if last_scrub.get("deep") else "fast"}, last_scrub.get("finished") or 0)]
               if last_scrub else []),
        family("scrub_last_copies_checked", "gauge", "Copies the last scrub checked.",
               [({}, last_scrub.get("copies_checked", 0))] if last_scrub else []),
        family("scrub_last_problems", "gauge", "Bad copies the last scrub found (repaired or not).",
               [({}, len(last_scrub.get("findings", [])))] if last_scrub else []),
        family("replication_lag_seconds", "gauge",
               "Age of the oldest instance not yet verified off-site (0: everything is).", [({}, lag or 0)]),
        family("replication_rpo_seconds", "gauge", "The recovery point objective.", [({}, status.rpo_hours * 3600)]),
        family("replication_last_success", "gauge", "1 if the last replication run verified.",
               [({}, int(bool(last_copy and last_copy.get("verified"))))] if last_copy else []),
        family("audit_records", "gauge", "Records in the audit trail (signed head).", [({}, status.audit["records"])]),
        family("alarms", "gauge", "Open alarms.", [({}, len(status.alarms))]),
        family("alarm", "gauge", "Open alarms by key (job alarms counted under \"job\": no study UID leaves).",
               [({"key": key}, count) for key, count in sorted(alarm_counts.items())]),
        family("scrape_timestamp_seconds", "gauge", "When these figures were read.", [({}, round(now, 3))]),
    ]
    return "".join(families)
