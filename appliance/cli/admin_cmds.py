"""`appliance` commands: init and install-systemd: making a home and the units that run it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from appliance import config as cfg
from appliance.admin import home, systemd
from appliance.admin.home import open_archive
from appliance.cli.common import home_of


def cmd_init(args) -> int:
    config = home.init(home_of(args))
    with open_archive(config) as archive:
        kek = archive.keyring.kek_id.hex()
    print(f"initialised {config.home}")
    print(f"  key file  {config.key_file} (KEK {kek[:8]}; back it up apart from the data)")
    print(f"  hot tier  {config.resolve(config.hot_tier.path)}")
    return 0


def cmd_install_systemd(args) -> int:
    config = cfg.load(home_of(args))
    executable = Path(sys.executable).parent / "appliance"
    if not executable.exists():
        executable = Path(shutil.which("appliance") or executable)
    written = systemd.install(config, Path(args.dest), args.user, args.group or args.user, executable)
    for path in written:
        print(f"wrote {path}")
    timers = " ".join(p.name for p in written if p.suffix == ".timer")
    print(f"next: systemctl daemon-reload && systemctl enable --now appliance.service {timers}")
    return 0


def register(sub) -> None:
    sub.add_parser("init", help="create a home: config, key file, keyring, index, hot tier").set_defaults(
        func=cmd_init)

    inst = sub.add_parser("install-systemd", help="write the systemd units and timers for this home and a user")
    inst.add_argument("--user", required=True, help="the dedicated account the services run as (owns the home)")
    inst.add_argument("--group", help="its group (default: same name as the user)")
    inst.add_argument("--dest", default="/etc/systemd/system", help="where the units go")
    inst.set_defaults(func=cmd_install_systemd)
