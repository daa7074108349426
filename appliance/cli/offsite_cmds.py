"""`appliance` commands: replicate and restore: the off-site copy and the disaster-recovery drill."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from appliance import config as cfg
from appliance.cli.common import archive_of, home_of, output_file
from appliance.cli.render import Progress
from appliance.errors import ApplianceError
from appliance.fsutil import HomeLock
from appliance.human import local_time
from appliance.jobs.offsite import replicate, restore
from appliance.observe import html_reports


def cmd_replicate(args) -> int:
    with archive_of(args, writer=True) as archive, HomeLock(archive.config.home, exclusive=True, name="replicate"):
        progress = Progress("replicate", 0, 0, unit="objects")
        report = replicate.replicate(archive, verify_all=args.verify,
                                     on_event=lambda kind, data: progress.event(kind, **data))
        progress.close()
        if args.report:
            target = output_file(archive.config, args.report)
            runs = replicate.history(archive)
            rpo_hours = archive.config.appliance.replication.rpo_hours
            target.write_text(html_reports.backup_html(report.as_dict(), runs, rpo_hours)
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
    report = restore.restore(home_of(args), args.source, Path(args.key_file), settings,
                             on_event=lambda kind, data: progress.event(kind, **data))
    progress.close()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        when = local_time(report.snapshot_time)
        print(f"restored {home_of(args)} from {args.source}: snapshot of {when}, {report.objects} blobs, "
              f"{report.packs} packs, {report.newer_than_snapshot} instances newer than the snapshot indexed")
        print("  next: `appliance fsck`, then `appliance serve`; packs are on the `cold` tier")
    for error in report.errors:
        print(f"  {error}", file=sys.stderr)
    if report.errors:
        raise ApplianceError(f"{len(report.errors)} objects could not be restored")
    return 0


def register(sub) -> None:
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
