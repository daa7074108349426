"""`appliance` commands: audit: verify, export and report the trail."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from appliance import config as cfg
from appliance.audit.formats import to_atna_xml, to_syslog
from appliance.audit.query import access_summary, matches
from appliance.audit.trail import AuditTrail
from appliance.cli.common import home_of, output_file
from appliance.errors import ApplianceError, Incomplete
from appliance.fsutil import write_file_atomic
from appliance.jobs.offsite import restore
from appliance.observe import html_reports


def _since(text: str | None) -> str:
    """--since as the prefix of a record's UTC time (YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS])."""
    if not text:
        return ""
    for form in ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"):
        try:
            return time.strftime("%Y-%m-%dT%H:%M:%S", time.strptime(text, form))
        except ValueError:
            continue
    raise ApplianceError(f"--since {text!r}: give YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS] (UTC)")


def _pinned_keys(values: list[str] | None) -> list[str]:
    keys = []
    for value in values or []:
        text = Path(value).read_text().strip() if Path(value).is_file() else value.strip()
        if len(text) != 64 or any(c not in "0123456789abcdef" for c in text.lower()):
            raise ApplianceError(f"--public-key {value!r}: give the 64 hex digits `keys status` shows, or a file")
        keys.append(text.lower())
    return keys


def cmd_audit(args) -> int:
    config = cfg.load(home_of(args))
    trail = AuditTrail(config.audit_dir, config.audit_key_file)
    if args.action == "verify":
        offsite = restore.offsite_audit_head(config) if args.offsite else None
        if args.offsite and offsite is None:
            print("no off-site copy of the trail yet: checked the local trail only")
        result = trail.verify(_pinned_keys(args.public_key), offsite)
        if args.json:
            print(json.dumps(result.as_dict(), indent=2))
        elif result.intact:
            print(f"audit trail intact: {result.records} records, hash chain unbroken, signed head and "
                  f"{result.checkpoints} checkpoints valid (keys {', '.join(k[:16] for k in result.keys)})")
        else:
            print(f"audit trail DOES NOT VERIFY: {len(result.problems)} problems in {result.records} records")
            for problem in result.problems:
                print(f"  {problem}")
        if not result.intact:
            raise Incomplete(f"the audit trail does not verify ({len(result.problems)} problems)")
        return 0
    since = _since(args.since)
    if args.action == "export":
        out = open(output_file(config, args.output), "w", encoding="utf-8") if args.output else sys.stdout
        try:
            for record in trail.records():
                if since and record["time"] < since:
                    continue
                if args.format == "syslog":
                    out.write(to_syslog(record, trail.host) + "\n")
                elif args.format == "atna-xml":
                    out.write(to_atna_xml(record, f"pacs-vault@{trail.host}") + "\n")
                else:
                    out.write(json.dumps(record, sort_keys=True) + "\n")
        finally:
            if out is not sys.stdout:
                out.close()
        return 0
    if sum(bool(v) for v in (args.patient, args.study, args.ae)) != 1:
        raise ApplianceError("audit report needs one of --patient ID, --study UID, --ae AET")
    subject = (f"patient {args.patient}" if args.patient else f"study {args.study}" if args.study
               else f"AE {args.ae}") + (f" since {since}" if since else "")
    records = [r for r in trail.records() if matches(r, patient=args.patient or "", study=args.study or "",
                                                     ae=args.ae or "", since=since)]
    summary = access_summary(records)
    verification = trail.verify().as_dict()
    if args.html:
        write_file_atomic(output_file(config, args.html),
                          html_reports.audit_html(subject, records, summary, verification).encode(), mode=0o640)
    if args.json:
        print(json.dumps({"subject": subject, "trail_intact": verification["intact"], "summary": summary,
                          "records": records}, indent=2))
        return 0
    for row in summary:
        print(f"{row['user']:<16} {row['host'] or '-':<15} {row['event']} / {row['op']}: {row['records']} "
              f"records, {row['instances']} instances, {row['failures']} failures, {row['first'][:16]} .. "
              f"{row['last'][:16]}")
    print(f"{len(records)} records about {subject}"
          + ("" if verification["intact"] else "; THE TRAIL DOES NOT VERIFY (`appliance audit verify`)"))
    return 0


def register(sub) -> None:
    aud = sub.add_parser("audit", help="the audit trail: verify it, export it, report who accessed what")
    aud.add_argument("action", choices=("verify", "export", "report"))
    aud.add_argument("--public-key", action="append",
                     help="verify: trust only a trail this public key (hex, or a file) signed (repeatable)")
    aud.add_argument("--offsite", action="store_true",
                     help="verify: also check that the trail holds everything the latest off-site copy signed")
    aud.add_argument("--format", choices=("json", "syslog", "atna-xml"), default="json",
                     help="export: JSON lines, RFC 5424 syslog lines, or one DICOM AuditMessage per line")
    aud.add_argument("--output", help="export: write to FILE instead of standard output")
    aud.add_argument("--since", help="export, report: records at or after this UTC date or time")
    aud.add_argument("--patient", help="report: a PatientID")
    aud.add_argument("--study", help="report: a Study Instance UID")
    aud.add_argument("--ae", help="report: an AE title (as caller or destination)")
    aud.add_argument("--html", help="report: also write a self-contained HTML page to FILE")
    aud.add_argument("--json", action="store_true")
    aud.set_defaults(func=cmd_audit)
