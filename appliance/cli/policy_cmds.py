"""`appliance` commands: policy and hold: retention, tiering, legal holds."""

from __future__ import annotations

import json

from appliance import config as cfg
from appliance.cli.common import archive_of, home_of
from appliance.cli.render import Progress
from appliance.errors import ApplianceError, Incomplete
from appliance.human import local_time
from appliance.jobs import lifecycle, policy
from appliance.observe import health
from appliance.store.archive import Archive


def _rules(archive: Archive) -> list:
    return policy.check_policies(archive.config)


def cmd_policy(args) -> int:
    if args.action == "check":
        rules = policy.check_policies(cfg.load(home_of(args)))
        print(f"policies ok: {len(rules)} classes ({', '.join(r.name for r in rules)})")
        return 0
    if args.action == "apply":
        with archive_of(args, writer=True) as archive:
            engine = lifecycle.Lifecycle(archive, _rules(archive))
            progress = Progress("policy apply", 0, 0, unit="jobs")

            def on_event(kind: str, data: dict) -> None:
                progress.event(f"policy.{kind}", **data)
                if kind == "jobs":
                    progress.set_total(data["count"], data["bytes"])
                elif kind in ("job.done", "job.failed"):
                    progress.advance(data.get("bytes", 0))
            report = engine.apply(on_event)
            progress.close()
        if args.json:
            print(json.dumps(report.as_dict(), indent=2))
        else:
            print(f"policy apply: {len(report.done)} jobs done, {len(report.failed)} failed (retried later), "
                  f"{report.waiting} waiting to retry, {report.bytes_written / 1e6:,.1f} MB written to cold tiers"
                  + (f", {report.copies_cleaned} leftover copies of deleted studies removed"
                     if report.copies_cleaned else ""))
            for failure in report.failed:
                print(f"  FAILED {failure['kind']} {failure['study']}: {failure['error']}")
        if report.failed:
            raise Incomplete(f"{len(report.failed)} jobs failed (retried on the next apply)")
        return 0
    with archive_of(args) as archive:
        if args.action == "plan":
            actions, unclassified = lifecycle.Lifecycle(archive, _rules(archive)).plan()
            # What the plan needs: the hot tier (its usage) and the tiers it migrates to.
            needed = [archive.hot.name, *sorted({tier for a in actions for tier in a.targets})]
            unreachable = {name: tier.error for name in needed
                           if (tier := health.tier_status(archive, archive.config.tiers[name])).error is not None}
            out = {"actions": [vars(a) | {"targets": list(a.targets)} for a in actions],
                   "unclassified": unclassified, "unreachable_tiers": unreachable}
        elif args.action == "jobs":
            out = lifecycle.jobs(archive)
        else:
            out = lifecycle.deletions(archive)
    if args.json:
        print(json.dumps(out, indent=2))
    elif args.action == "plan":
        for a in actions:
            what = {"migrate": f"migrate to {', '.join(a.targets) or '(copies present)'}"
                               + (", drop hot copy" if a.drop_hot else ""),
                    "evict": "drop hot copy (cold copies verified)", "expire": "DELETE and crypto-shred",
                    "review": "expired: review", "held": "expired, held"}[a.kind]
            print(f"{a.study}  {what}\n    rule {a.rule}: {a.reason}")
        print(f"{len(actions)} actions, {len(unclassified)} studies match no class (kept)")
        for name, error in unreachable.items():
            print(f"tier {name} cannot be reached now: {error}")
    elif args.action == "jobs":
        for uid, job in out.items():
            retry = local_time(job["next_try"]) if job["next_try"] else "now"
            print(f"{uid}  {job['kind']} {', '.join(job['targets'])}  attempts {job['attempts']}, next {retry}"
                  + (f"\n    last error: {job['error']}" if job["error"] else ""))
        print(f"{len(out)} jobs")
    else:
        for uid, record in out.items():
            when = local_time(record["time"])
            print(f"{uid}  deleted {when} by {record['by']}, rule {record['rule']}, "
                  f"{len(record['instances'])} instances")
            for copy in record["unremoved"]:
                print(f"    copy still on {copy['tier']} {copy['where'] or ''} (unreadable; removed when reachable)")
    return 0


def cmd_hold(args) -> int:
    with archive_of(args, writer=args.action != "list") as archive:
        if args.action == "list":
            holds = lifecycle.holds(archive)
            if args.json:
                print(json.dumps(holds, indent=2))
            for key, record in holds.items():
                since = local_time(record["since"], date_only=True)
                if not args.json:
                    print(f"{key.replace(':', ' ', 1)}  since {since} by {record['by']}: {record['reason']}")
            return 0
        key = lifecycle.hold_key(args.study_uid, args.patient)
        if args.action == "set":
            lifecycle.set_hold(archive, key, args.reason or "")
            print(f"hold set on {key.replace(':', ' ', 1)}: {args.reason}")
        else:
            if not (args.reason or "").strip():
                raise ApplianceError("releasing a hold needs a reason (--reason TEXT)")
            lifecycle.release_hold(archive, key, args.reason)
            print(f"hold released on {key.replace(':', ' ', 1)}: {args.reason}")
    return 0


def register(sub) -> None:
    pol = sub.add_parser("policy", help="retention and tiering policies")
    pol.add_argument("action", choices=("plan", "apply", "check", "jobs", "deletions"),
                     help="plan: dry run; apply: execute; check: validate the YAML; jobs: the queue; "
                          "deletions: deletion records and copies still to remove")
    pol.add_argument("--json", action="store_true")
    pol.set_defaults(func=cmd_policy)

    hold = sub.add_parser("hold", help="legal holds: a held study is never deleted")
    hold.add_argument("action", choices=("set", "release", "list"))
    hold.add_argument("study_uid", nargs="?")
    hold.add_argument("--patient", help="hold every study of this PatientID, present and future")
    hold.add_argument("--reason")
    hold.add_argument("--json", action="store_true")
    hold.set_defaults(func=cmd_hold)
