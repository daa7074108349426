"""`appliance install-systemd`: the units shipped in systemd/, written for one home and user.

The shipped files name a model installation (home /srv/pacs-vault, user pacs-vault,
the venv under /opt/pacs-vault); this writes them with the real home, user, executable
and the paths the services must write to (ProtectSystem=strict makes everything else
read-only): the home, and every tier, spool, key and off-site directory outside it.
"""

from __future__ import annotations

import re
from pathlib import Path

from appliance.config import Config
from appliance.fsutil import write_file_atomic

SHIPPED = Path(__file__).resolve().parents[2] / "systemd"
MODEL_HOME = "/srv/pacs-vault"
MODEL_USER = "pacs-vault"
MODEL_EXECUTABLE = "/opt/pacs-vault/.venv/bin/appliance"
MODEL_INSTALL = "/opt/pacs-vault"


def writable_paths(config: Config) -> list[str]:
    """The home first; then what lies outside it, each prefixed "-" (systemd skips a path that
    does not exist, such as the mount point of a cartridge that is not loaded)."""
    home = config.home.resolve()
    paths = [config.resolve(t.path) for t in config.tiers.values() if t.kind == "filesystem"]
    paths += [config.resolve(c.path) for t in config.tiers.values() for c in t.cartridges]
    paths += [config.resolve(config.appliance.lifecycle.spool_dir), config.key_file.parent,
              config.audit_key_file.parent]
    target = config.appliance.replication.target
    if ":" not in target.split("/", 1)[0]:  # a local off-site target (not rsync:// nor host:path)
        paths.append(config.resolve(target))
    outside = []
    for path in paths:
        path = path.resolve()
        if path != home and home not in path.parents and str(path) not in outside:
            outside.append(str(path))
    return [str(home)] + [f"-{p}" for p in sorted(outside)]


def render(text: str, config: Config, user: str, group: str, executable: Path) -> str:
    models = {MODEL_EXECUTABLE: str(executable), MODEL_HOME: str(config.home.resolve()),
              MODEL_INSTALL: str(SHIPPED.parent)}  # the longest first: alternatives are tried in order
    lines = []
    for line in text.splitlines():
        if line.startswith("ReadWritePaths="):
            line = "ReadWritePaths=" + " ".join(writable_paths(config))
        elif line.startswith("User="):
            line = f"User={user}"
        elif line.startswith("Group="):
            line = f"Group={group}"
        else:  # one pass: a substituted path is never substituted again
            line = re.sub("|".join(re.escape(model) for model in models), lambda m: models[m.group(0)], line)
        lines.append(line)
    return "\n".join(lines) + "\n"


def install(config: Config, dest: Path, user: str, group: str, executable: Path) -> list[Path]:
    """Write every shipped unit for this home into `dest`; return what was written."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for unit in sorted(SHIPPED.iterdir()):
        if unit.suffix in (".service", ".timer"):
            target = dest / unit.name
            write_file_atomic(target, render(unit.read_text(), config, user, group, executable).encode(), mode=0o644)
            written.append(target)
    return written
