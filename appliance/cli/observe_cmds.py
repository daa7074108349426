"""`appliance` commands: status, report, metrics: what the appliance holds and how it is."""

from __future__ import annotations

import json
import time

from appliance.cli.common import archive_of, output_file
from appliance.errors import ApplianceError
from appliance.fsutil import write_file_atomic
from appliance.human import human_bytes, local_time
from appliance.observe import auditor_report, health, html_reports


def cmd_status(args) -> int:
    with archive_of(args) as archive:
        status = health.status(archive, time.time())
    if args.json:
        print(json.dumps(status.as_dict(), indent=2))
        return 0
    ratio = f"{status.stored_ratio:.2f}" if status.stored_ratio is not None else "-"
    print(f"state      {status.state}")
    print(f"home       {status.home}")
    print(f"contents   {status.patients} patients, {status.studies} studies, {status.series} series, "
          f"{status.instances} instances ({status.versions} versions)")
    print(f"bytes      {status.received_bytes / 1e6:,.1f} MB received, "
          f"{status.stored_bytes / 1e6:,.1f} MB stored (ratio {ratio})")
    print(f"keys       KEK {str(status.keys['kek_id'])[:8]}, {status.keys['data_keys']} data keys")
    for name, tier in status.tiers.items():
        print(_tier_line(name, tier))
    print(f"jobs       {status.jobs['pending']} pending ({status.jobs['failing']} being retried), "
          f"{status.holds} legal holds")
    print(f"scrub      {status.last_scrub}")
    lag = status.replication_lag_s
    print(f"off-site   {status.last_replication}; "
          + ("everything verified off-site" if lag is None else
             f"oldest not yet off-site: {lag / 3600:.1f} h (RPO {status.rpo_hours} h)"))
    trail = status.audit
    print(f"audit      {trail['records']} records, last signed {str(trail['signed'])[:19].replace('T', ' ')} UTC"
          if trail["enabled"] else "audit      OFF")
    if status.damaged:
        print(f"damaged    {status.damaged} stored versions have no good copy")
    for alarm in status.alarms:
        print(f"ALARM      {alarm.message} (since {local_time(alarm.since)})\n           action: {alarm.action}")
    return 0


def _tier_line(name: str, tier: health.TierHealth) -> str:
    line = f"tier {name:<6} {tier.kind:<10} {tier.role:<4}"
    if tier.free_bytes is not None:
        line += (f" {tier.path}: {tier.used_percent}% used (high watermark {tier.high_watermark_percent}%),"
                 f" {human_bytes(tier.free_bytes)} free")
    if tier.cartridges is not None:
        line += " " + ", ".join(f"{c.label} ({'loaded' if c.loaded else 'not loaded'}, "
                                f"{human_bytes(c.used_bytes)} of {human_bytes(c.capacity_bytes)})"
                                for c in tier.cartridges)
    if tier.bucket is not None:
        line += f" s3://{tier.bucket}/{tier.prefix}"
    if tier.error is not None:
        line += f" CANNOT BE REACHED: {tier.error}"
    if tier.packs:
        line += f"; {tier.packs} packs, {human_bytes(tier.pack_bytes or 0)}"
    overdue = tier.scrub_overdue or {}
    if overdue.get("fast") or overdue.get("deep"):
        line += f"; overdue for verification: {overdue['fast']} fast, {overdue['deep']} deep"
    return line


def cmd_report(args) -> int:
    with archive_of(args) as archive:
        data = auditor_report.gather(archive, time.time(), since_days=args.days,
                                     horizon_days=args.horizon).as_dict()
    if args.html:
        write_file_atomic(output_file(archive.config, args.html), html_reports.auditor_html(data).encode(), mode=0o640)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    elif args.html:
        print(f"wrote {args.html}: state {data['status']['state']}, {data['access']['records']} audit records in "
              f"{args.days} days, trail {'verifies' if data['access']['verification']['intact'] else 'DOES NOT VERIFY'}")
    else:
        raise ApplianceError("give --html FILE and/or --json")
    return 0


def cmd_metrics(args) -> int:
    with archive_of(args) as archive:
        text = health.gauges(health.status(archive, time.time()), time.time())
    if args.textfile:  # node_exporter reads *.prom files: replace whole, never half-written
        write_file_atomic(output_file(archive.config, args.textfile), text.encode())
    else:
        print(text, end="")
    return 0


def register(sub) -> None:
    status = sub.add_parser("status", help="what the appliance holds")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    rep_all = sub.add_parser("report", help="one report for an auditor: integrity, backups, retention, access")
    rep_all.add_argument("--html", help="write the self-contained HTML page to FILE")
    rep_all.add_argument("--json", action="store_true", help="print the same as JSON")
    rep_all.add_argument("--days", type=int, default=90, help="the period the access part covers (default 90)")
    rep_all.add_argument("--horizon", type=int, default=365,
                         help="list studies whose retention ends within this many days (default 365)")
    rep_all.set_defaults(func=cmd_report)

    met = sub.add_parser("metrics", help="the health gauges in Prometheus text format")
    met.add_argument("--textfile", help="write them to FILE (node_exporter's textfile collector) instead")
    met.set_defaults(func=cmd_metrics)
