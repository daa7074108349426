"""DICOMweb bearer tokens: HOME/dicomweb-tokens.yaml, managed by `appliance token`.

    # DICOMweb bearer tokens (see `appliance token`): only their SHA-256 is kept.
    tokens:
      - name: viewer
        roles: [query, retrieve]
        sha256: 3f0c...        # of the token, which was shown once and is kept nowhere
        created: 2026-12-01T10:00:00Z

A token is 32 random bytes (URL-safe base64, 43 characters): a plain SHA-256 is enough
to keep it (nothing to brute-force), and looking its hash up needs no comparison of
secrets. The roles are the DICOM roles: store (STOW-RS), query (QIDO-RS), retrieve
(WADO-RS, WADO-URI). The file is read again when it changes, so `token remove` takes
effect on a running server at its next request.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from appliance.config import read_list
from appliance.errors import ConfigError
from appliance.fsutil import write_file_atomic
from appliance.security.access import parse_roles

ROLES = ("store", "query", "retrieve")
_HEADER = "# DICOMweb bearer tokens (see `appliance token`): only their SHA-256 is kept.\n"


@dataclass(frozen=True)
class Token:
    name: str
    roles: tuple[str, ...]
    sha256: str
    created: str

    def may(self, role: str) -> bool:
        return role in self.roles


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()


def web_roles(text: str) -> tuple[str, ...]:
    """The roles of a `--roles` argument: the DICOM roles a web client can use."""
    return parse_roles(text, ROLES, "DICOMweb ")


def load(path: Path) -> dict[str, Token]:
    """The tokens by name."""
    tokens: dict[str, Token] = {}
    for number, entry in enumerate(read_list(path, "tokens"), 1):
        try:
            token = Token(str(entry["name"]), web_roles(",".join(entry["roles"])), str(entry["sha256"]),
                          str(entry.get("created", "")))
        except (KeyError, TypeError, ConfigError):
            raise ConfigError(f"{path}: entry {number} needs name, roles and sha256") from None
        tokens[token.name] = token
    return tokens


def save(path: Path, tokens: dict[str, Token]) -> None:
    entries = [{"name": t.name, "roles": list(t.roles), "sha256": t.sha256, "created": t.created}
               for t in sorted(tokens.values(), key=lambda t: t.name)]
    write_file_atomic(path, (_HEADER + yaml.safe_dump({"tokens": entries}, sort_keys=False)).encode(), mode=0o600)


def add(path: Path, name: str, roles: tuple[str, ...]) -> str:
    """Make a token for `name` (replacing one of that name); returns the secret, kept nowhere."""
    if not name.strip() or not name.isprintable() or len(name) > 64:
        raise ConfigError("a token name is 1 to 64 printable characters")
    tokens = load(path)
    secret = secrets.token_urlsafe(32)
    tokens[name] = Token(name, roles, digest(secret), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    save(path, tokens)
    return secret


def remove(path: Path, name: str) -> bool:
    tokens = load(path)
    if tokens.pop(name, None) is None:
        return False
    save(path, tokens)
    return True


class TokenFile:
    """The tokens of a running server, read again when the file changes."""

    def __init__(self, path: Path):
        self._path = path
        self._stamp: tuple | None = None
        self._by_digest: dict[str, Token] = {}

    def find(self, secret: str) -> Token | None:
        self._reload()
        return self._by_digest.get(digest(secret))

    def _reload(self) -> None:
        try:
            stat = self._path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp or stamp is None:
            self._by_digest = {t.sha256: t for t in load(self._path).values()}
            self._stamp = stamp
