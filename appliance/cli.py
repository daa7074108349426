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
import warnings
from pathlib import Path

from appliance import config as cfg
from appliance import fsck, home, importer, registry
from appliance.config import is_ae_title
from appliance.errors import ApplianceError, HomeLocked
from appliance.progress import Progress
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
    from appliance.dicom.server import DicomServer  # pynetdicom is only needed here

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    with _open(args, writer=True) as archive:
        DicomServer(archive, port=args.port, ae_title=args.ae_title).serve_until_signalled()
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
    with _open(args, writer=True) as archive:
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

        summary = importer.run_import(archive, files, archive.config.appliance.imports.workers, on_result)
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
    return 1 if summary.rejected else 0


def cmd_export(args) -> int:
    with _open(args) as archive:
        written, failures = archive.export_study(args.study_uid, Path(args.dest))
    print(f"exported {len(written)} instances of {args.study_uid} to {args.dest}")
    for sop_uid, reason in failures:
        print(f"  FAILED {sop_uid}: {reason}", file=sys.stderr)
    if failures:
        raise ApplianceError(f"{len(failures)} instances failed verification and were not written")
    return 0


def _status(archive: Archive) -> dict:
    counters = archive.counters()
    hot_root = archive.hot.root
    usage = shutil.disk_usage(hot_root)
    received, stored = counters["received_bytes"], counters["stored_bytes"]
    return {
        "home": str(archive.config.home),
        "patients": counters["patients"], "studies": counters["studies"], "series": counters["series"],
        "instances": counters["instances"], "versions": counters["versions"],
        "received_bytes": received, "stored_bytes": stored,
        "stored_ratio": round(stored / received, 4) if received else None,
        "keys": {"kek_id": archive.keyring.kek_id.hex(), "data_keys": archive.keyring.count()},
        "tiers": {archive.hot.name: {"kind": "filesystem", "path": str(hot_root), "role": "hot",
                                     "stored_bytes": stored, "free_bytes": usage.free,
                                     "capacity_bytes": usage.total}},
    }


def cmd_status(args) -> int:
    with _open(args) as archive:
        status = _status(archive)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    ratio = f"{status['stored_ratio']:.2f}" if status["stored_ratio"] is not None else "-"
    print(f"home       {status['home']}")
    print(f"holds      {status['patients']} patients, {status['studies']} studies, {status['series']} series, "
          f"{status['instances']} instances ({status['versions']} versions)")
    print(f"bytes      {status['received_bytes'] / 1e6:,.1f} MB received, "
          f"{status['stored_bytes'] / 1e6:,.1f} MB stored (ratio {ratio})")
    print(f"keys       KEK {status['keys']['kek_id'][:8]}, {status['keys']['data_keys']} data keys")
    for name, tier in status["tiers"].items():
        print(f"tier {name:<5} {tier['path']}: {tier['free_bytes'] / 1e9:,.1f} GB free of "
              f"{tier['capacity_bytes'] / 1e9:,.1f} GB")
    return 0


def cmd_fsck(args) -> int:
    if args.rebuild_index:
        report = fsck.rebuild(cfg.load(_home(args)))
        print(f"rebuilt the index from {report.blobs} blobs: {report.instances} instances indexed, "
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
              f"{len(report.errors)} errors")
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
        print(f"rotated KEK {old.hex()[:8]} -> {new.hex()[:8]}: {count} data keys re-wrapped, no blob touched")
        print("  the old key file is kept under retired-keys/: older off-site keyring snapshots need it; "
              "store it offline")
        return 0
    with _open(args) as archive:
        status = {"kek_id": archive.keyring.kek_id.hex(), "key_file": str(archive.config.key_file),
                  "data_keys": archive.keyring.count()}
    print(json.dumps(status, indent=2) if args.json else
          f"KEK {status['kek_id'][:8]} in {status['key_file']}, {status['data_keys']} data keys")
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
    serve.set_defaults(func=cmd_serve)

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
    exp.set_defaults(func=cmd_export)

    status = sub.add_parser("status", help="what the appliance holds")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    check = sub.add_parser("fsck", help="check the index against the blobs, or rebuild it")
    check.add_argument("--rebuild-index", action="store_true")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=cmd_fsck)

    keys = sub.add_parser("keys", help="key management")
    keys.add_argument("action", choices=("status", "rotate"))
    keys.add_argument("--json", action="store_true")
    keys.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # pydicom warns about every non-conformant value it reads; the archive keeps such files
    # byte-exact on purpose, and the warnings would drown the progress and log lines.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
    try:
        return args.func(args)
    except ApplianceError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("appliance: interrupted", file=sys.stderr)
        return 130
