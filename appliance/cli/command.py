"""The `appliance` command: the parser assembled from each command group, the session every
command runs in (who runs it, whether they may, its audit record), exit codes.

Exit code 0 on success; otherwise the code of the error (see errors.py) and a
single line on stderr. `--json` where a machine reads the output.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from appliance import config as cfg
from appliance.audit.events import EventID, EventType, event
from appliance.audit.trail import AuditTrail
from appliance.cli import (
    admin_cmds,
    audit_cmds,
    dicom_cmds,
    observe_cmds,
    offsite_cmds,
    policy_cmds,
    scrub_cmds,
    store_cmds,
    web_cmds,
)
from appliance.cli.common import home_of
from appliance.errors import ApplianceError
from appliance.security import access
from appliance.security.access import ADMIN, AccessDenied


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="pacs-vault medical image archive")
    parser.add_argument("--home", help="appliance home directory (default: $APPLIANCE_HOME)")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (admin_cmds, dicom_cmds, web_cmds, store_cmds, observe_cmds, policy_cmds, scrub_cmds, offsite_cmds,
                  audit_cmds):
        group.register(sub)
    return parser


class _Session:
    """The audit side of one command: who runs it, whether they may, and its record."""

    def __init__(self, args, argv: list[str]):
        self.args = args
        words = [w for w in argv if not w.startswith("--home=")]
        if "--home" in words:
            at = words.index("--home")
            del words[at:at + 2]
        self.command = " ".join(words)[:1000]
        self.home = home_of(args) if args.home or os.environ.get("APPLIANCE_HOME") else None
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
        role = access.required_role(self.args.command, getattr(self.args, "action", None),
                                    rebuild_index=getattr(self.args, "rebuild_index", False))
        if self.caller.may(role):
            return
        self.refused = True
        group = settings.admin_group if role == ADMIN else settings.auditor_group
        if self.trail is not None:
            self.trail.record(event(EventID.SECURITY_ALERT, type=EventType.USE_OF_RESTRICTED_FUNCTION, op="command",
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
        self.trail.record(event(
            EventID.AUDIT_LOG_USED if reading else EventID.APPLICATION_ACTIVITY, op="command", action="R" if reading else "E",
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
