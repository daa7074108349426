"""`appliance` commands: import, export, recall, fsck, keys: what goes in and out of the store, and its keys."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from appliance import config as cfg
from appliance.admin.home import audit_trail, open_archive
from appliance.cli.common import archive_of, home_of
from appliance.cli.render import Progress
from appliance.errors import ApplianceError, HomeLocked, Incomplete
from appliance.human import local_time
from appliance.jobs import exporter, fsck, importer


def cmd_import(args) -> int:
    files = list(importer.iter_files(args.paths))
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise ApplianceError(f"no such file or directory: {missing[0]}")
    total_bytes = sum(p.stat().st_size for p in files)
    config = cfg.load(home_of(args))
    progress = Progress("import", len(files), total_bytes)

    def on_result(path, outcome, reason):
        size = path.stat().st_size if path.exists() else 0
        progress.advance(size)
        if outcome is None:
            progress.event("import.rejected", path=str(path), reason=reason)
            if sys.stderr.isatty():
                sys.stderr.write(f"\nrejected {path}: {reason}\n")
        else:
            progress.event(f"import.{outcome.status}", path=str(path), bytes=outcome.info.length)

    try:
        summary = importer.run_import(config, files, config.appliance.imports.workers, on_result,
                                      source=", ".join(args.paths))
    finally:
        progress.close()
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
    with archive_of(args) as archive:
        result = exporter.export_study(archive, args.study_uid, Path(args.dest), args.transfer_syntax)
        written, failures, transcoded = result.written, result.failures, result.counts.summary()
    print(f"exported {len(written)} instances of {args.study_uid} to {args.dest}")
    for pair in (pair for pair in transcoded if pair["instances"]):
        print(f"  transcoded {pair['instances']} from {pair['from']} to {pair['to']}")
    for sop_uid, reason in failures:
        print(f"  FAILED {sop_uid}: {reason}", file=sys.stderr)
    if failures:
        why = "could not be read or transcoded" if args.transfer_syntax else "failed verification"
        raise ApplianceError(f"{len(failures)} instances {why} and were not written")
    return 0


def cmd_recall(args) -> int:
    with archive_of(args, writer=True) as archive:
        archive.study(args.study_uid)

        def waiting(message: str) -> None:
            print(f"recall of {args.study_uid} waits: {message}", file=sys.stderr)
        count = archive.recall_study(args.study_uid, on_wait=waiting)
    print(f"recalled {count} instances of {args.study_uid} to the hot tier" if count
          else f"{args.study_uid} is on the hot tier already")
    return 0


def cmd_fsck(args) -> int:
    if args.rebuild_index:
        report = fsck.rebuild(cfg.load(home_of(args)))
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
    config = cfg.load(home_of(args))
    try:
        archive = open_archive(config, exclusive=True)
        repair = True
    except HomeLocked:  # the home is in use: check without repairing
        archive, repair = open_archive(config), False
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
        with archive_of(args, exclusive=True) as archive:
            old, new, count = archive.rotate_kek()
        print(f"rotated KEK {old.hex()[:8]} -> {new.hex()[:8]}: {count} data keys re-wrapped, no blob touched")
        print("  the old key file is kept under retired-keys/: older off-site keyring snapshots need it; "
              "store it offline")
        return 0
    with archive_of(args) as archive:
        created = archive.keyring.kek_created
        status = {"kek_id": archive.keyring.kek_id.hex(), "key_file": str(archive.config.key_file),
                  "kek_created": created, "kek_age_days": int((time.time() - created) // 86400),
                  "data_keys": archive.keyring.count(), "audit_key_file": str(archive.config.audit_key_file),
                  "audit_public_key": audit_trail(archive.config).public_key()}
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(f"KEK        {status['kek_id']} in {status['key_file']}, made "
              f"{local_time(created, date_only=True)} ({status['kek_age_days']} days ago)")
        print(f"data keys  {status['data_keys']} wrapped under it (one per study)")
        print(f"audit key  {status['audit_key_file']}, public key {status['audit_public_key']}")
        print("           (note the public key apart: `audit verify --public-key` checks the trail against it)")
    return 0


def register(sub) -> None:
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

    recall = sub.add_parser("recall", help="bring a study back from cold tiers to the hot tier")
    recall.add_argument("study_uid")
    recall.set_defaults(func=cmd_recall)

    check = sub.add_parser("fsck", help="check the index against the blobs, or rebuild it")
    check.add_argument("--rebuild-index", action="store_true")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=cmd_fsck)

    keys = sub.add_parser("keys", help="key management")
    keys.add_argument("action", choices=("status", "rotate"))
    keys.add_argument("--json", action="store_true")
    keys.set_defaults(func=cmd_keys)
