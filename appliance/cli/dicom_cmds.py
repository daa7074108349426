"""`appliance` commands: serve (the DICOM front, and DICOMweb beside it), conformance, ae: the
DICOM front and the peers it knows."""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings

from appliance import config as cfg
from appliance.cli.common import archive_of, home_of
from appliance.config import is_ae_title
from appliance.dicom import registry
from appliance.errors import ApplianceError
from appliance.observe import health


def cmd_serve(args) -> int:
    from appliance.dicom.server import DicomServer  # the fronts' imports only where they run

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
    with archive_of(args, writer=True) as archive:
        server = DicomServer(archive, port=args.port, ae_title=args.ae_title,
                             health_gauges=lambda: health.gauges(health.status(archive, time.time()), time.time()))
        web_port = args.dicomweb_port if args.dicomweb_port is not None else archive.config.appliance.dicomweb.port
        siblings = []
        if web_port:
            from appliance.web.server import WebServer

            siblings.append(WebServer(archive, port=web_port, metrics=server.metrics))
        server.serve_until_signalled(others=siblings)
    return 0


def cmd_conformance(args) -> int:
    from appliance.dicom import conformance  # the DICOM front's tables, only where they are needed

    print(conformance.statement(), end="")
    return 0


def cmd_ae(args) -> int:
    config = cfg.load(home_of(args))
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


def register(sub) -> None:
    serve = sub.add_parser("serve", help="run the DICOM server (and DICOMweb, when its port is set)")
    serve.add_argument("--port", type=int)
    serve.add_argument("--ae-title")
    serve.add_argument("--dicomweb-port", type=int, help="serve DICOMweb on this port (overrides dicomweb.port)")
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
