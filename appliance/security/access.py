"""Who runs a command, and what they may do: the local role model.

File permissions are the first gate (the home belongs to the service account; the key
file is readable by it alone). Inside, two roles:

- admin: destructive and key commands: `policy apply` (it deletes expired studies),
  `hold release`, `keys rotate`, `restore`, `ae add|remove`, `token add|remove`,
  `fsck --rebuild-index`, `install-systemd`;
- auditor: the audit trail and what is built from it: `audit verify|export|report`, `report`.

A caller is an admin when it is root, the owner of the home (the service account the
systemd units run as) or a member of `access.admin_group`; an auditor when it is an admin
or a member of `access.auditor_group`. People reach the appliance with sudo
(`sudo -u pacs-vault appliance ...`): then the person is SUDO_USER and *their* groups
decide. SUDO_USER is believed only when the process runs as root or as the home's owner,
who could do anything anyway; from anyone else it is ignored. Every refusal is audited.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from appliance.errors import ApplianceError, ConfigError

ADMIN, AUDITOR = "admin", "auditor"


# The role each command needs (none: any user who can read the home); see the module docstring.
COMMAND_ROLES: dict[tuple[str, str | None], str] = {
    ("audit", None): AUDITOR, ("report", None): AUDITOR,
    ("keys", "rotate"): ADMIN, ("hold", "release"): ADMIN, ("policy", "apply"): ADMIN, ("ae", "add"): ADMIN,
    ("ae", "remove"): ADMIN, ("token", "add"): ADMIN, ("token", "remove"): ADMIN, ("restore", None): ADMIN,
    ("install-systemd", None): ADMIN,
}


def parse_roles(text: str, known: tuple[str, ...], of: str = "") -> tuple[str, ...]:
    """The roles of a `--roles` argument (comma-separated), each one of `known`; `of` names
    whose roles they are, in the error."""
    roles = tuple(role.strip() for role in text.split(",") if role.strip())
    unknown = [role for role in roles if role not in known]
    if unknown or not roles:
        raise ConfigError(f"unknown role {unknown[0] if unknown else '(none)'}: {of}roles are {', '.join(known)}")
    return roles


class AccessDenied(ApplianceError):
    exit_code = 77  # EX_NOPERM


def required_role(command: str, action: str | None, *, rebuild_index: bool = False) -> str | None:
    """The role `appliance COMMAND [ACTION]` needs (None: none beyond reading the home)."""
    if command == "fsck" and rebuild_index:
        return ADMIN
    return COMMAND_ROLES.get((command, action)) or COMMAND_ROLES.get((command, None))


def report_target(home: Path, protected: Iterable[Path], path: str) -> Path:
    """Where a report or metrics file may be written: outside the home or in its reports/
    directory, never over a key (the command may run as the service account, for someone
    else). Makes its directory; raises AccessDenied otherwise."""
    target, home = Path(path).resolve(), home.resolve()
    if (home in target.parents and home / "reports" not in target.parents) or target == home \
            or target in {p.resolve() for p in protected}:
        raise AccessDenied(f"{path}: reports go outside the home or under {home / 'reports'}/")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


@dataclass(frozen=True)
class Caller:
    user: str  # the person (SUDO_USER under sudo)
    runs_as: str  # the account the process runs as
    groups: frozenset[str]
    admin: bool
    auditor: bool

    def may(self, role: str | None) -> bool:
        return role is None or {ADMIN: self.admin, AUDITOR: self.auditor}.get(role, True)


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _privileged(home: Path) -> bool:
    """Root, or the owner of the home (for a home not created yet: whoever creates it)."""
    euid = os.geteuid()
    if euid == 0:
        return True
    probe = Path(home)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe.stat().st_uid == euid


def person(home: Path) -> str:
    """The name the audit trail records for this process."""
    sudo_user = os.environ.get("SUDO_USER", "")
    if sudo_user and _privileged(home):
        return sudo_user
    return _name(os.geteuid())


def identify(home: Path, admin_group: str, auditor_group: str) -> Caller:
    runs_as = _name(os.geteuid())
    privileged = _privileged(home)
    sudo_user = os.environ.get("SUDO_USER", "")
    if sudo_user and privileged and sudo_user != runs_as:
        try:
            gids = os.getgrouplist(sudo_user, pwd.getpwnam(sudo_user).pw_gid)
        except KeyError:
            gids = []
        user, privileged = sudo_user, False
    else:
        gids = sorted(set(os.getgroups()) | {os.getegid()})
        user = runs_as
    groups = frozenset(_group_name(g) for g in gids)
    admin = privileged or admin_group in groups
    return Caller(user, runs_as, groups, admin, admin or auditor_group in groups)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
