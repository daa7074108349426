"""Remote application entities and their roles: HOME/remote-aes.yaml, managed by `appliance ae`.

    # Remote DICOM application entities allowed to talk to this archive.
    aes:
      - ae_title: PACS1
        host: 10.0.0.5
        port: 104
        roles: [store, query, retrieve, move-destination]

Roles: `store` (C-STORE to the archive, storage commitment), `query` (C-FIND),
`retrieve` (C-GET, and C-MOVE requests), `move-destination` (may receive
C-MOVE sub-operations, at its registered host and port).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from appliance.config import is_ae_title, read_list
from appliance.errors import ConfigError
from appliance.fsutil import write_file_atomic
from appliance.security import access

ROLES = ("store", "query", "retrieve", "move-destination")
_HEADER = "# Remote DICOM application entities allowed to talk to this archive (see `appliance ae`).\n"


@dataclass(frozen=True)
class RemoteAE:
    ae_title: str
    host: str
    port: int
    roles: tuple[str, ...]

    def can(self, role: str) -> bool:
        return role in self.roles


def parse_roles(text: str) -> tuple[str, ...]:
    return access.parse_roles(text, ROLES)


def load(path: Path) -> dict[str, RemoteAE]:
    registry: dict[str, RemoteAE] = {}
    for number, entry in enumerate(read_list(path, "aes"), 1):
        try:
            remote = RemoteAE(str(entry["ae_title"]).strip(), str(entry["host"]), int(entry["port"]),
                              tuple(entry.get("roles") or ()))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{path}: entry {number} needs ae_title, host, port and roles") from None
        if not is_ae_title(remote.ae_title) or not 0 < remote.port < 65536:
            raise ConfigError(f"{path}: entry {number} has an invalid AE title or port")
        parse_roles(",".join(remote.roles))
        registry[remote.ae_title] = remote
    return registry


def save(path: Path, registry: dict[str, RemoteAE]) -> None:
    entries = [{"ae_title": r.ae_title, "host": r.host, "port": r.port, "roles": list(r.roles)}
               for r in sorted(registry.values(), key=lambda r: r.ae_title)]
    write_file_atomic(path, (_HEADER + yaml.safe_dump({"aes": entries}, sort_keys=False)).encode())
