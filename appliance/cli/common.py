"""What every command group shares: the home it works on, the archive it opens."""

from __future__ import annotations

import os
from pathlib import Path

from appliance import config as cfg
from appliance.admin.home import open_archive
from appliance.errors import ApplianceError
from appliance.security import access
from appliance.store.archive import Archive


def home_of(args) -> Path:
    if args.home:
        return Path(args.home)
    if os.environ.get("APPLIANCE_HOME"):
        return Path(os.environ["APPLIANCE_HOME"])
    raise ApplianceError("no home directory: pass --home DIR or set APPLIANCE_HOME")


def archive_of(args, **mode) -> Archive:
    return open_archive(cfg.load(home_of(args)), **mode)


def output_file(config: cfg.Config, path: str) -> Path:
    """Where a command may write the report or metrics file it was asked for (security.access)."""
    return access.report_target(config.home, (config.key_file, config.audit_key_file), path)
