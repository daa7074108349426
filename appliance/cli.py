"""The `appliance` command: argument parsing and printing only.

Exit code 0 on success; otherwise the code of the error (see errors.py) and a
single line on stderr. `--json` where a machine reads the output.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

from appliance import (access, audit, auditor, exporter, fsck, health, home, importer, lifecycle, metrics, policy,
                       registry, replicate, reports, scrub, units)
from appliance import config as cfg
from appliance.access import ADMIN, AUDITOR, AccessDenied
from appliance.audit import AuditTrail
from appliance.config import is_ae_title
from appliance.errors import ApplianceError, HomeLocked, Incomplete
from appliance.fsutil import HomeLock, write_file_atomic
from appliance.progress import Progress, human_bytes
from appliance.store.archive import Archive


def _home(args) -> Path:
    if args.home:
        return Path(args.home)
    if os.environ.get("APPLIANCE_HOME"):
        return Path(os.environ["APPLIANCE_HOME"])
    raise ApplianceError("no home directory: pass --home DIR or set APPLIANCE_HOME")


def _open(args, **mode) -> Archive:
    return Archive.open(cfg.load(_home(args)), **mode)


def cmd_init(args) -> int:
    config = home.init(_home(args))
    with Archive.open(config) as archive:
        kek = archive.keyring.kek_id.hex()
    print(f"initialised {config.home}")
    print(f"  key file  {config.key_file} (KEK {kek[:8]}; back it up apart from the data)")
    print(f"  hot tier  {config.resolve(config.hot_tier.path)}")
    return 0


def cmd_serve(args) -> int:
    from appliance.dicom.server import DicomServer  # the DICOM front's imports only where it runs

    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if args.debug else logging.WARNING)
    # pydicom warns of every odd value a peer sends (a junk A-ASSOCIATE-RQ, a padded UID):
    # nothing to act on, and a flood of them would flood the log.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")
    # A thread back from a sync (its acknowledgement ready) waits at most this long for the
    # interpreter while another thread computes (Python's default is 5 ms).
    sys.setswitchinterval(0.0005)
    with _open(args, writer=True) as archive:
        DicomServer(archive, port=args.port, ae_title=args.ae_title).serve_until_signalled()
    return 0


def cmd_conformance(args) -> int:
    from appliance.dicom import conformance  # the DICOM front's tables, only where they are needed

    print(conformance.statement(), end="")
    return 0


def cmd_ae(args) -> int:
    config = cfg.load(_home(args))
    remotes = registry.load(config.remote_aes_path)
    if args.action == "add":
        if not args.ae_title or not args.host or not args.port:
            raise ApplianceError("usage: appliance ae add AET HOST PORT [--roles store,query,retrieve]")
        if not is_ae_title(args.ae_title):
            raise ApplianceError(f"invalid AE title {args.ae_title!r}: 1 to 16 ASCII characters")
        remotes[args.ae_title] = registry.RemoteAE(args.ae_title, args.host, args.port,
                                                   registry.parse_roles(args.roles))
        registry.save(config.remote_aes_path, remotes)
        print(f"registered {args.ae_title} at {args.host}:{args.port} ({', '.join(remotes[args.ae_title].roles)})")
    elif args.action == "remove":
        if remotes.pop(args.ae_title or "", None) is None:
            raise ApplianceError(f"no remote AE {args.ae_title!r}")
        registry.save(config.remote_aes_path, remotes)
        print(f"removed {args.ae_title}")
    elif args.json:
        print(json.dumps([vars(r) | {"roles": list(r.roles)} for r in remotes.values()], indent=2))
    else:
        for remote in remotes.values():
            print(f"{remote.ae_title:<16} {remote.host}:{remote.port}  {', '.join(remote.roles)}")
    return 0


def cmd_import(args) -> int:
    files = list(importer.iter_files(args.paths))
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise ApplianceError(f"no such file or directory: {missing[0]}")
    total_bytes = sum(p.stat().st_size for p in files)
    studies: dict[str, dict] = {}
    config = cfg.load(_home(args))
    progress = Progress("import", len(files), total_bytes)

    def on_result(path, outcome, reason):
        size = path.stat().st_size if path.exists() else 0
        progress.advance(size)
        if outcome is not None:
            study = studies.setdefault(outcome.info.study_uid, {
                "patient": str(outcome.info.patient.get("PatientID", "")), "stored": 0, "duplicates": 0})
            study["duplicates" if outcome.status == "duplicate" else "stored"] += 1
        if outcome is None:
            progress.event("import.rejected", path=str(path), reason=reason)
            if sys.stderr.isatty():
                sys.stderr.write(f"\nrejected {path}: {reason}\n")
        else:
            progress.event(f"import.{outcome.status}", path=str(path), bytes=outcome.info.length)

    try:
        summary = importer.run_import(config, files, config.appliance.imports.workers, on_result)
    finally:
        progress.close()
        if studies:
            trail = AuditTrail(config.audit_dir, config.audit_key_file, enabled=config.appliance.audit.enabled)
            for study_uid, study in sorted(studies.items()):
                trail.record(audit.event(
                    "Import", op="import", action="C", study=study_uid, patient=study["patient"],
                    instances=study["stored"], duplicates=study["duplicates"], source=", ".join(args.paths)[:500]))
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        print(f"imported {len(files)} files: {summary.stored} stored ({summary.new_versions} new versions), "
              f"{summary.duplicates} duplicates, {len(summary.rejected)} rejected, "
              f"{summary.bytes / 1e6:,.1f} MB")
        for path, reason in summary.rejected:
            print(f"  rejected {path}: {reason}")
    if summary.aborted:
        raise ApplianceError(f"import stopped: {summary.aborted}")
    if summary.rejected:
        raise Incomplete(f"{len(summary.rejected)} of {len(files)} files rejected")
    return 0


def cmd_export(args) -> int:
    with _open(args) as archive:
        result = exporter.export_study(archive, args.study_uid, Path(args.dest), args.transfer_syntax)
        written, failures, transcoded = result.written, result.failures, result.counts.summary()
        archive.audit.record(audit.event(
            "Export", op="export", action="R", outcome=4 if failures else 0, study=args.study_uid,
            patient=archive.patient_id_of(args.study_uid), instances=len(written),
            dest=str(Path(args.dest).resolve()), failed=len(failures), transfer_syntax=args.transfer_syntax,
            transcoded=transcoded))
    print(f"exported {len(written)} instances of {args.study_uid} to {args.dest}")
    for pair in (pair for pair in transcoded if pair["instances"]):
        print(f"  transcoded {pair['instances']} from {pair['from']} to {pair['to']}")
    for sop_uid, reason in failures:
        print(f"  FAILED {sop_uid}: {reason}", file=sys.stderr)
    if failures:
        why = "could not be read or transcoded" if args.transfer_syntax else "failed verification"
        raise ApplianceError(f"{len(failures)} instances {why} and were not written")
    return 0


def cmd_status(args) -> int:
    with _open(args) as archive:
        status = health.status(archive, time.time())
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    ratio = f"{status['stored_ratio']:.2f}" if status["stored_ratio"] is not None else "-"
    print(f"state      {status['state']}")
    print(f"home       {status['home']}")
    print(f"contents   {status['patients']} patients, {status['studies']} studies, {status['series']} series, "
          f"{status['instances']} instances ({status['versions']} versions)")
    print(f"bytes      {status['received_bytes'] / 1e6:,.1f} MB received, "
          f"{status['stored_bytes'] / 1e6:,.1f} MB stored (ratio {ratio})")
    print(f"keys       KEK {status['keys']['kek_id'][:8]}, {status['keys']['data_keys']} data keys")
    for name, tier in status["tiers"].items():
        line = f"tier {name:<6} {tier['kind']:<10} {tier['role']:<4}"
        if "free_bytes" in tier:
            line += (f" {tier['path']}: {tier['used_percent']}% used (high watermark {tier['high_watermark_percent']}%),"
                     f" {human_bytes(tier['free_bytes'])} free")
        if "cartridges" in tier:
            line += " " + ", ".join(f"{c['label']} ({'loaded' if c['loaded'] else 'not loaded'}, "
                                    f"{human_bytes(c['used_bytes'])} of {human_bytes(c['capacity_bytes'])})"
                                    for c in tier["cartridges"])
        if "bucket" in tier:
            line += f" s3://{tier['bucket']}/{tier['prefix']}"
        if "error" in tier:
            line += f" CANNOT BE REACHED: {tier['error']}"
        if tier.get("packs"):
            line += f"; {tier['packs']} packs, {human_bytes(tier['pack_bytes'])}"
        overdue = tier.get("scrub_overdue", {})
        if overdue.get("fast") or overdue.get("deep"):
            line += f"; overdue for verification: {overdue['fast']} fast, {overdue['deep']} deep"
        print(line)
    print(f"jobs       {status['jobs']['pending']} pending ({status['jobs']['failing']} being retried), "
          f"{status['holds']} legal holds")
    print(f"scrub      {status['last_scrub']}")
    lag = status["replication_lag_s"]
    print(f"off-site   {status['last_replication']}; "
          + ("everything verified off-site" if lag is None else
             f"oldest not yet off-site: {lag / 3600:.1f} h (RPO {status['rpo_hours']} h)"))
    trail = status["audit"]
    print(f"audit      {trail['records']} records, last signed {trail['signed'][:19].replace('T', ' ')} UTC"
          if trail["enabled"] else "audit      OFF")
    if status["damaged"]:
        print(f"damaged    {status['damaged']} stored versions have no good copy")
    for alarm in status["alarms"]:
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(alarm["since"]))
        print(f"ALARM      {alarm['message']} (since {since})\n           action: {alarm['action']}")
    return 0


def _output_file(config: cfg.Config, path: str) -> Path:
    """Where a report or metrics file may be written: outside the home or in its reports/ directory,
    never over a key (the command may run as the service account, for someone else)."""
    target, home = Path(path).resolve(), config.home.resolve()
    if (home in target.parents and home / "reports" not in target.parents) or target == home \
            or target in (config.key_file.resolve(), config.audit_key_file.resolve()):
        raise AccessDenied(f"{path}: reports go outside the home or under {home / 'reports'}/")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def cmd_report(args) -> int:
    with _open(args) as archive:
        data = auditor.gather(archive, time.time(), since_days=args.days, horizon_days=args.horizon)
    if args.html:
        write_file_atomic(_output_file(archive.config, args.html), reports.auditor_html(data).encode(), mode=0o640)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    elif args.html:
        print(f"wrote {args.html}: state {data['status']['state']}, {data['access']['records']} audit records in "
              f"{args.days} days, trail {'verifies' if data['access']['verification']['intact'] else 'DOES NOT VERIFY'}")
    else:
        raise ApplianceError("give --html FILE and/or --json")
    return 0


def cmd_metrics(args) -> int:
    with _open(args) as archive:
        text = metrics.health_gauges(health.status(archive, time.time()), time.time())
    if args.textfile:  # node_exporter reads *.prom files: replace whole, never half-written
        write_file_atomic(_output_file(archive.config, args.textfile), text.encode())
    else:
        print(text, end="")
    return 0


def cmd_scrub(args) -> int:
    with _open(args, writer=True) as archive, HomeLock(archive.config.home, exclusive=True, name="scrub"):
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
            target = _output_file(archive.config, args.report)
            if target.suffix in (".html", ".htm"):
                target.write_text(reports.scrub_html(result, scrub.history(archive)))
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


def cmd_replicate(args) -> int:
    with _open(args, writer=True) as archive, HomeLock(archive.config.home, exclusive=True, name="replicate"):
        progress = Progress("replicate", 0, 0, unit="objects")
        report = replicate.replicate(archive, verify_all=args.verify,
                                     on_event=lambda kind, data: progress.event(kind, **data))
        progress.close()
        if args.report:
            target = _output_file(archive.config, args.report)
            runs = replicate.history(archive)
            target.write_text(reports.backup_html(report.as_dict(), runs, archive.config.appliance.replication.rpo_hours)
                              if target.suffix in (".html", ".htm") else json.dumps(report.as_dict(), indent=2))
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.line())
    if not report.verified:
        raise ApplianceError(f"replication failed: {report.failure}")
    return 0


def cmd_restore(args) -> int:
    if not args.source or not args.key_file:
        raise ApplianceError("usage: appliance --home NEWDIR restore --from TARGET --key-file FILE")
    progress = Progress("restore", 0, 0)
    settings = cfg.ReplicationConfig(ssh_port=args.ssh_port, ssh_key=args.ssh_key or "",
                                     ssh_known_hosts=args.ssh_known_hosts or "",
                                     password_file=args.password_file or "")
    report = replicate.restore(_home(args), args.source, Path(args.key_file), settings,
                               on_event=lambda kind, data: progress.event(kind, **data))
    progress.close()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(report.snapshot_time))
        print(f"restored {_home(args)} from {args.source}: snapshot of {when}, {report.objects} blobs, "
              f"{report.packs} packs, {report.newer_than_snapshot} instances newer than the snapshot indexed")
        print("  next: `appliance fsck`, then `appliance serve`; packs are on the `cold` tier")
    for error in report.errors:
        print(f"  {error}", file=sys.stderr)
    if report.errors:
        raise ApplianceError(f"{len(report.errors)} objects could not be restored")
    return 0


def _rules(archive: Archive) -> list:
    return policy.check_policies(archive.config)


def cmd_policy(args) -> int:
    if args.action == "check":
        rules = policy.check_policies(cfg.load(_home(args)))
        print(f"policies ok: {len(rules)} classes ({', '.join(r.name for r in rules)})")
        return 0
    if args.action == "apply":
        with _open(args, writer=True) as archive:
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
    with _open(args) as archive:
        if args.action == "plan":
            actions, unclassified = lifecycle.Lifecycle(archive, _rules(archive)).plan()
            # What the plan needs: the hot tier (its usage) and the tiers it migrates to.
            needed = [archive.hot.name, *sorted({tier for a in actions for tier in a.targets})]
            unreachable = {name: tier["error"] for name in needed
                           if "error" in (tier := health.tier_status(archive, archive.config.tiers[name]))}
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
            retry = time.strftime("%Y-%m-%d %H:%M", time.localtime(job["next_try"])) if job["next_try"] else "now"
            print(f"{uid}  {job['kind']} {', '.join(job['targets'])}  attempts {job['attempts']}, next {retry}"
                  + (f"\n    last error: {job['error']}" if job["error"] else ""))
        print(f"{len(out)} jobs")
    else:
        for uid, record in out.items():
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(record["time"]))
            print(f"{uid}  deleted {when} by {record['by']}, rule {record['rule']}, "
                  f"{len(record['instances'])} instances")
            for copy in record["unremoved"]:
                print(f"    copy still on {copy['tier']} {copy['where'] or ''} (unreadable; removed when reachable)")
    return 0


def cmd_hold(args) -> int:
    with _open(args, writer=args.action != "list") as archive:
        if args.action == "list":
            holds = lifecycle.holds(archive)
            if args.json:
                print(json.dumps(holds, indent=2))
            for key, record in holds.items():
                since = time.strftime("%Y-%m-%d", time.localtime(record["since"]))
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


def cmd_recall(args) -> int:
    with _open(args, writer=True) as archive:
        archive.study(args.study_uid)

        def waiting(message: str) -> None:
            print(f"recall of {args.study_uid} waits: {message}", file=sys.stderr)
        count = archive.recall_study(args.study_uid, on_wait=waiting)
    print(f"recalled {count} instances of {args.study_uid} to the hot tier" if count
          else f"{args.study_uid} is on the hot tier already")
    return 0


def cmd_fsck(args) -> int:
    if args.rebuild_index:
        report = fsck.rebuild(cfg.load(_home(args)))
        print(f"rebuilt the index from {report.blobs} blobs ({report.packs} packs on cold tiers): "
              f"{report.instances} versions indexed, "
              f"{report.shredded} unreadable by design (study deleted), {len(report.errors)} errors")
        if report.old_index:
            print(f"  the previous index is kept at {report.old_index}")
        for error in report.errors:
            print(f"  {error}", file=sys.stderr)
        if report.errors:
            raise ApplianceError(f"{len(report.errors)} blobs could not be indexed")
        return 0
    config = cfg.load(_home(args))
    try:
        archive = Archive.open(config, exclusive=True)
        repair = True
    except HomeLocked:  # the home is in use: check without repairing
        archive, repair = Archive.open(config), False
    with archive:
        report = fsck.check(archive, repair=repair)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(f"fsck: {report.versions_checked} stored versions checked, {report.files_seen} blob files, "
              f"{report.packs_checked} packs, {len(report.errors)} errors")
        for line in report.unreachable:
            print(f"  not checked now (tier unreachable): {line}")
        if report.unreferenced:
            action = "removed" if repair else "found (run fsck when the home is idle to remove them)"
            print(f"  {len(report.unreferenced)} unreferenced blob files from interrupted stores {action}")
        for error in report.errors:
            print(f"  {error}")
    if report.errors:
        raise ApplianceError(f"fsck found {len(report.errors)} errors")
    return 0


def cmd_keys(args) -> int:
    if args.action == "rotate":
        with _open(args, exclusive=True) as archive:
            old, new, count = archive.keyring.rotate()
            archive.audit.record(audit.event(
                "Security Alert", type="Security Configuration", op="keys rotate", action="U",
                old_kek=old.hex(), new_kek=new.hex(), data_keys=count))
        print(f"rotated KEK {old.hex()[:8]} -> {new.hex()[:8]}: {count} data keys re-wrapped, no blob touched")
        print("  the old key file is kept under retired-keys/: older off-site keyring snapshots need it; "
              "store it offline")
        return 0
    with _open(args) as archive:
        created = archive.keyring.kek_created
        status = {"kek_id": archive.keyring.kek_id.hex(), "key_file": str(archive.config.key_file),
                  "kek_created": created, "kek_age_days": int((time.time() - created) // 86400),
                  "data_keys": archive.keyring.count(), "audit_key_file": str(archive.config.audit_key_file),
                  "audit_public_key": archive.audit.public_key()}
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(f"KEK        {status['kek_id']} in {status['key_file']}, made "
              f"{time.strftime('%Y-%m-%d', time.localtime(created))} ({status['kek_age_days']} days ago)")
        print(f"data keys  {status['data_keys']} wrapped under it (one per study)")
        print(f"audit key  {status['audit_key_file']}, public key {status['audit_public_key']}")
        print("           (note the public key apart: `audit verify --public-key` checks the trail against it)")
    return 0


def cmd_install_systemd(args) -> int:
    config = cfg.load(_home(args))
    executable = Path(sys.executable).parent / "appliance"
    if not executable.exists():
        executable = Path(shutil.which("appliance") or executable)
    written = units.install(config, Path(args.dest), args.user, args.group or args.user, executable)
    for path in written:
        print(f"wrote {path}")
    timers = " ".join(p.name for p in written if p.suffix == ".timer")
    print(f"next: systemctl daemon-reload && systemctl enable --now appliance.service {timers}")
    return 0


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
    config = cfg.load(_home(args))
    trail = AuditTrail(config.audit_dir, config.audit_key_file)
    if args.action == "verify":
        offsite = replicate.offsite_audit_head(config) if args.offsite else None
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
        out = open(_output_file(config, args.output), "w", encoding="utf-8") if args.output else sys.stdout
        try:
            for record in trail.records():
                if since and record["time"] < since:
                    continue
                if args.format == "syslog":
                    out.write(audit.to_syslog(record, trail.host) + "\n")
                elif args.format == "atna-xml":
                    out.write(audit.to_atna_xml(record, f"pacs-vault@{trail.host}") + "\n")
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
    records = [r for r in trail.records() if audit.matches(r, patient=args.patient or "", study=args.study or "",
                                                           ae=args.ae or "", since=since)]
    summary = audit.access_summary(records)
    verification = trail.verify().as_dict()
    if args.html:
        write_file_atomic(_output_file(config, args.html),
                          reports.audit_html(subject, records, summary, verification).encode(), mode=0o640)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="pacs-vault medical image archive")
    parser.add_argument("--home", help="appliance home directory (default: $APPLIANCE_HOME)")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("init", help="create a home: config, key file, keyring, index, hot tier").set_defaults(
        func=cmd_init)

    serve = sub.add_parser("serve", help="run the DICOM server")
    serve.add_argument("--port", type=int)
    serve.add_argument("--ae-title")
    serve.add_argument("--debug", action="store_true",
                       help="log every PDU and DIMSE message (UIDs, but never query identifiers or patient data)")
    serve.set_defaults(func=cmd_serve)

    conformance = sub.add_parser("conformance", help="print the DICOM conformance statement (Markdown)")
    conformance.set_defaults(func=cmd_conformance)

    ae = sub.add_parser("ae", help="remote application entities and their roles")
    ae.add_argument("action", choices=("add", "remove", "list"))
    ae.add_argument("ae_title", nargs="?")
    ae.add_argument("host", nargs="?")
    ae.add_argument("port", nargs="?", type=int)
    ae.add_argument("--roles", default="store,query,retrieve",
                    help=f"comma-separated, of: {', '.join(registry.ROLES)}")
    ae.add_argument("--json", action="store_true")
    ae.set_defaults(func=cmd_ae)

    imp = sub.add_parser("import", help="store DICOM files and directories (recursive)")
    imp.add_argument("paths", nargs="+")
    imp.add_argument("--json", action="store_true", help="print the summary as JSON")
    imp.set_defaults(func=cmd_import)

    exp = sub.add_parser("export", help="write a study's instances byte-exact to a directory")
    exp.add_argument("study_uid")
    exp.add_argument("dest")
    exp.add_argument("--transfer-syntax", metavar="UID",
                     help="write every instance in this transfer syntax, its pixel data decoded where it is "
                          "stored compressed (adds no loss; default: as stored, byte-exact)")
    exp.set_defaults(func=cmd_export)

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

    check = sub.add_parser("fsck", help="check the index against the blobs, or rebuild it")
    check.add_argument("--rebuild-index", action="store_true")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=cmd_fsck)

    scr = sub.add_parser("scrub", help="verify every copy on every tier, repair from good copies")
    scr.add_argument("--deep", action="store_true", help="decrypt and re-hash (default: sealed-bytes hash)")
    scr.add_argument("--rate", type=float, default=0, help="read at most this many MB/s (default: no limit)")
    scr.add_argument("--tier", action="append", help="only this tier (repeatable)")
    scr.add_argument("--report", help="write the report to FILE (.html: a page for people; else JSON)")
    scr.add_argument("--json", action="store_true")
    scr.set_defaults(func=cmd_scrub)

    rep = sub.add_parser("replicate", help="send the sealed data off-site with rsync and verify it")
    rep.add_argument("--verify", action="store_true", help="verify (and resend) every object, not only new ones")
    rep.add_argument("--report", help="write the backup report to FILE (.html for people; else JSON)")
    rep.add_argument("--json", action="store_true")
    rep.set_defaults(func=cmd_replicate)

    res = sub.add_parser("restore", help="build a new home from an off-site copy and the key file")
    res.add_argument("--from", dest="source", help="the off-site target: a path, rsync://..., or host:path")
    res.add_argument("--key-file", help="the key-encryption key file kept apart from the data")
    res.add_argument("--ssh-port", type=int, default=22)
    res.add_argument("--ssh-key", help="private key for an ssh target")
    res.add_argument("--ssh-known-hosts", help="known_hosts file pinning the ssh target's host key")
    res.add_argument("--password-file", help="password file for an rsync daemon")
    res.add_argument("--json", action="store_true")
    res.set_defaults(func=cmd_restore)

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

    recall = sub.add_parser("recall", help="bring a study back from cold tiers to the hot tier")
    recall.add_argument("study_uid")
    recall.set_defaults(func=cmd_recall)

    inst = sub.add_parser("install-systemd", help="write the systemd units and timers for this home and a user")
    inst.add_argument("--user", required=True, help="the dedicated account the services run as (owns the home)")
    inst.add_argument("--group", help="its group (default: same name as the user)")
    inst.add_argument("--dest", default="/etc/systemd/system", help="where the units go")
    inst.set_defaults(func=cmd_install_systemd)

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

    keys = sub.add_parser("keys", help="key management")
    keys.add_argument("action", choices=("status", "rotate"))
    keys.add_argument("--json", action="store_true")
    keys.set_defaults(func=cmd_keys)
    return parser


def _required_role(args) -> str | None:
    action = getattr(args, "action", None)
    if args.command in ("audit", "report"):
        return AUDITOR
    if (args.command, action) in (("keys", "rotate"), ("hold", "release"), ("policy", "apply"), ("ae", "add"),
                                  ("ae", "remove")) \
            or args.command in ("restore", "install-systemd") or (args.command == "fsck" and args.rebuild_index):
        return ADMIN
    return None


class _Session:
    """The audit side of one command: who runs it, whether they may, and its record."""

    def __init__(self, args, argv: list[str]):
        self.args = args
        words = [w for w in argv if not w.startswith("--home=")]
        if "--home" in words:
            at = words.index("--home")
            del words[at:at + 2]
        self.command = " ".join(words)[:1000]
        self.home = _home(args) if args.home or os.environ.get("APPLIANCE_HOME") else None
        self.config: cfg.Config | None = None
        self.trail: AuditTrail | None = None
        self.caller: access.Caller | None = None
        self.refused = False

    def _open(self) -> bool:
        if self.trail is None and self.home is not None and (self.home / cfg.CONFIG_FILE).exists() \
                and not (self.home / cfg.RESTORE_MARKER).exists():
            self.config = cfg.load(self.home)
            settings = self.config.appliance.access
            self.caller = access.identify(self.home, settings.admin_group, settings.auditor_group)
            self.trail = AuditTrail(self.config.audit_dir, self.config.audit_key_file,
                                    enabled=self.config.appliance.audit.enabled, user=self.caller.user)
        return self.trail is not None

    def begin(self) -> None:
        if self._open():
            self.trail.note_config_changes(self.config.files())
            settings = self.config.appliance.access
        else:  # init, restore: no home yet (or one whose restore did not finish)
            settings = cfg.AccessConfig()
            self.caller = access.identify(self.home or Path.cwd(), settings.admin_group, settings.auditor_group)
        role = _required_role(self.args)
        if self.caller.may(role):
            return
        self.refused = True
        group = settings.admin_group if role == ADMIN else settings.auditor_group
        if self.trail is not None:
            self.trail.record(audit.event("Security Alert", type="Use of Restricted Function", op="command",
                                          outcome=4, command=self.command, reason=f"needs the {role} role",
                                          runs_as=self.caller.runs_as), force=True)
        raise AccessDenied(f"`{self.args.command}{' ' + self.args.action if getattr(self.args, 'action', None) else ''}`"
                           f" needs the {role} role: user {self.caller.user} is not in group {group}")

    def finish(self, code: int, error: str) -> None:
        try:
            if self.refused or not self._open():
                return
        except ApplianceError:  # the configuration cannot be read (said already): nowhere to record
            return
        self.trail.note_config_changes(self.config.files(), by_command=self.command)
        reading = self.args.command in ("audit", "report")
        self.trail.record(audit.event(
            "Audit Log Used" if reading else "Application Activity", op="command", action="R" if reading else "E",
            outcome=0 if code == 0 else 8 if code == 70 else 4, command=self.command, exit=code,
            reason=error, runs_as=self.caller.runs_as if self.caller.runs_as != self.caller.user else ""))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    # pydicom warns about every non-conformant value it reads; the archive keeps such files
    # byte-exact on purpose, and the warnings would drown the progress and log lines.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
    session = _Session(args, argv)
    try:
        session.begin()
        code, error = args.func(args), ""
    except ApplianceError as exc:
        code, error = exc.exit_code, str(exc)
    except KeyboardInterrupt:
        code, error = 130, "interrupted"
    except BrokenPipeError:  # `appliance status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code, error = 0, ""
    except Exception as exc:
        session.finish(70, f"internal error ({type(exc).__name__})")
        raise
    if error:
        print(f"appliance: {error}", file=sys.stderr)
    try:
        session.finish(code, error)
    except ApplianceError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return code or exc.exit_code
    return code
