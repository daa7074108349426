"""`appliance` commands: scrub: verify every copy."""

from __future__ import annotations

import json

from appliance.cli.common import archive_of, output_file
from appliance.cli.render import Progress
from appliance.errors import ApplianceError, Incomplete
from appliance.fsutil import HomeLock
from appliance.jobs import scrub
from appliance.observe import html_reports


def cmd_scrub(args) -> int:
    with archive_of(args, writer=True) as archive, HomeLock(archive.config.home, exclusive=True, name="scrub"):
        if args.tier:
            for tier in args.tier:
                if tier not in archive.config.tiers:
                    raise ApplianceError(f"no tier {tier!r} (tiers: {', '.join(sorted(archive.config.tiers))})")
        scrub.lower_io_priority()
        progress = Progress("deep scrub" if args.deep else "scrub", 0, 0, unit="objects")

        def on_event(kind: str, data: dict) -> None:
            if kind == "scrub.start":
                progress.set_total(data["units"], data["bytes"])
            elif kind in ("scrub.unit", "scrub.unreachable"):
                progress.advance(data["bytes"])
            progress.event(kind, **data)
        scrubber = scrub.Scrubber(archive, deep=args.deep, rate=args.rate * 1e6, tiers=args.tier,
                                  on_event=on_event)
        report = scrubber.run()
        progress.close()
        result = report.as_dict()
        if args.report:
            target = output_file(archive.config, args.report)
            if target.suffix in (".html", ".htm"):
                target.write_text(html_reports.scrub_html(result, scrub.history(archive)))
            else:
                target.write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(report.line())
        for finding in report.findings:
            print(f"  {finding.tier} {finding.copy}: instance {finding.instance} of study {finding.study}: "
                  f"{finding.problem} -> {finding.action}")
        for line in report.unreachable:
            print(f"  not checked: {line}")
    if report.unrecoverable:
        raise Incomplete(f"unrecoverable copies: {report.unrecoverable} (no good copy to repair them from)")
    return 0


def register(sub) -> None:
    scr = sub.add_parser("scrub", help="verify every copy on every tier, repair from good copies")
    scr.add_argument("--deep", action="store_true", help="decrypt and re-hash (default: sealed-bytes hash)")
    scr.add_argument("--rate", type=float, default=0, help="read at most this many MB/s (default: no limit)")
    scr.add_argument("--tier", action="append", help="only this tier (repeatable)")
    scr.add_argument("--report", help="write the report to FILE (.html: a page for people; else JSON)")
    scr.add_argument("--json", action="store_true")
    scr.set_defaults(func=cmd_scrub)
