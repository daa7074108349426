"""`appliance token`: the DICOMweb front's bearer tokens and their roles."""

from __future__ import annotations

import json

from appliance import config as cfg
from appliance.cli.common import home_of
from appliance.errors import ApplianceError
from appliance.security import tokens


def cmd_token(args) -> int:
    path = cfg.load(home_of(args)).tokens_path
    if args.action == "add":
        if not args.name:
            raise ApplianceError("usage: appliance token add NAME --roles store,query,retrieve")
        roles = tokens.web_roles(args.roles)
        secret = tokens.add(path, args.name, roles)
        print(f"token {args.name} ({', '.join(roles)}): shown once, kept only as a hash")
        print(secret)
    elif args.action == "remove":
        if not tokens.remove(path, args.name or ""):
            raise ApplianceError(f"no token {args.name!r}")
        print(f"removed token {args.name}")
    elif args.json:
        print(json.dumps([{"name": t.name, "roles": list(t.roles), "created": t.created}
                          for t in tokens.load(path).values()], indent=2))
    else:
        for token in tokens.load(path).values():
            print(f"{token.name:<24} {', '.join(token.roles):<24} {token.created}")
    return 0


def register(sub) -> None:
    token = sub.add_parser("token", help="DICOMweb bearer tokens and their roles")
    token.add_argument("action", choices=("add", "remove", "list"))
    token.add_argument("name", nargs="?")
    token.add_argument("--roles", default="query,retrieve", help=f"comma-separated, of: {', '.join(tokens.ROLES)}")
    token.add_argument("--json", action="store_true")
    token.set_defaults(func=cmd_token)
