"""Configuration: HOME/appliance.yaml and HOME/tiers/*.yaml, loaded into typed dataclasses.

Every error names the file, the line and the key. Paths in the files are
relative to the home directory unless absolute. The core receives these
dataclasses, never CLI arguments or globals.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from appliance.errors import ConfigError, NotInitialised

CONFIG_FILE = "appliance.yaml"
TIER_KINDS = ("filesystem",)


def _check(predicate, message: str) -> dict:
    return {"check": (predicate, message)}


@dataclass(frozen=True)
class IndexConfig:
    path: str = "index"
    initial_map_size_mb: int = field(default=256, metadata=_check(lambda v: 1 <= v <= 1 << 24,
                                                                    "must be 1 to 16777216"))


@dataclass(frozen=True)
class StoreConfig:
    hot_tier: str = "hot"
    compression_level: int = field(default=3, metadata=_check(lambda v: 0 <= v <= 19,
                                                                "must be 0 (off) to 19"))
    segment_size_kb: int = field(default=1024, metadata=_check(lambda v: 16 <= v <= 65536,
                                                                 "must be 16 to 65536"))
    keep_previous_versions: bool = True


@dataclass(frozen=True)
class ImportConfig:
    workers: int = field(default=4, metadata=_check(lambda v: 1 <= v <= 64, "must be 1 to 64"))


def is_ae_title(value: str) -> bool:
    return 0 < len(value.strip()) <= 16 and value.isascii() and "\\" not in value


@dataclass(frozen=True)
class TlsConfig:
    certificate: str = ""  # PEM; TLS is off while empty
    private_key: str = ""
    ca_certificates: str = ""  # PEM bundle used to check client certificates
    require_client_certificate: bool = False


@dataclass(frozen=True)
class DicomConfig:
    ae_title: str = field(default="ARCHIVE", metadata=_check(is_ae_title, "must be 1 to 16 ASCII characters"))
    port: int = field(default=11112, metadata=_check(lambda v: 1 <= v <= 65535, "must be 1 to 65535"))
    bind_address: str = "0.0.0.0"
    allow_unknown_callers: bool = False
    allow_any_called_ae_title: bool = False
    allow_unknown_sop_classes: bool = False
    max_associations: int = field(default=16, metadata=_check(lambda v: 1 <= v <= 256, "must be 1 to 256"))
    max_pdu_kb: int = field(default=1024, metadata=_check(lambda v: 16 <= v <= 65536, "must be 16 to 65536"))
    tls: TlsConfig = TlsConfig()


@dataclass(frozen=True)
class ApplianceConfig:
    key_file: str = "kek.key"
    keyring: str = "keyring"
    tiers_dir: str = "tiers"
    index: IndexConfig = IndexConfig()
    store: StoreConfig = StoreConfig()
    dicom: DicomConfig = DicomConfig()
    imports: ImportConfig = ImportConfig()


@dataclass(frozen=True)
class TierConfig:
    name: str
    kind: str = field(metadata=_check(lambda v: v in TIER_KINDS, f"must be one of {', '.join(TIER_KINDS)}"))
    path: str


@dataclass(frozen=True)
class Config:
    home: Path
    appliance: ApplianceConfig
    tiers: dict[str, TierConfig]

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.home / p

    @property
    def key_file(self) -> Path:
        return self.resolve(self.appliance.key_file)

    @property
    def keyring_path(self) -> Path:
        return self.resolve(self.appliance.keyring)

    @property
    def index_path(self) -> Path:
        return self.resolve(self.appliance.index.path)

    @property
    def remote_aes_path(self) -> Path:
        return self.home / "remote-aes.yaml"

    @property
    def hot_tier(self) -> TierConfig:
        return self.tiers[self.appliance.store.hot_tier]


class _Source:
    """A parsed YAML file with the line of every key path."""

    def __init__(self, path: Path):
        self.path = path
        try:
            text = path.read_text("utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        try:
            self.data = yaml.safe_load(text)
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
        self.lines: dict[tuple, int] = {}
        if node is not None:
            self._index(node, ())

    def _index(self, node, keypath: tuple) -> None:
        self.lines.setdefault(keypath, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, value_node in node.value:
                key = key_node.value
                if key in seen:
                    raise ConfigError(f"{self.path}:{key_node.start_mark.line + 1}: duplicate key '{key}'")
                seen.add(key)
                self.lines[keypath + (key,)] = key_node.start_mark.line + 1
                self._index(value_node, keypath + (key,))

    def error(self, keypath: tuple, message: str) -> ConfigError:
        line = self.lines.get(keypath) or self.lines.get(keypath[:-1]) or 1
        key = ".".join(str(k) for k in keypath) or "(top level)"
        return ConfigError(f"{self.path}:{line}: {key}: {message}")


def _build(cls, data: Any, source: _Source, keypath: tuple = ()):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise source.error(keypath, "expected a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for key in data:
        if key not in names:
            raise source.error(keypath + (key,), f"unknown key (known: {', '.join(sorted(names))})")
    values = {}
    for f in fields(cls):
        here = keypath + (f.name,)
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise source.error(here, "is required")
            continue
        value, kind = data[f.name], hints[f.name]
        if is_dataclass(kind):
            value = _build(kind, value, source, here)
        elif kind is bool:
            if not isinstance(value, bool):
                raise source.error(here, "must be true or false")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise source.error(here, "must be a whole number")
        elif kind is str:
            if not isinstance(value, (str, int)) or isinstance(value, bool) or (value == "" and f.default != ""):
                raise source.error(here, "must be a non-empty text")
            value = str(value)
        check = f.metadata.get("check")
        if check and not check[0](value):
            raise source.error(here, check[1])
        values[f.name] = value
    return cls(**values)


def load(home: Path, path: Path | None = None) -> Config:
    home = Path(home)
    path = path or home / CONFIG_FILE
    if not path.exists():
        raise NotInitialised(f"{home} is not an appliance home (no {CONFIG_FILE}); run `appliance init`")
    source = _Source(path)
    appliance = _build(ApplianceConfig, source.data, source)
    tiers: dict[str, TierConfig] = {}
    tiers_dir = Path(appliance.tiers_dir) if Path(appliance.tiers_dir).is_absolute() else home / appliance.tiers_dir
    for tier_file in sorted(tiers_dir.glob("*.yaml")):
        tier_source = _Source(tier_file)
        tier = _build(TierConfig, tier_source.data, tier_source)
        if tier.name in tiers:
            raise tier_source.error(("name",), f"tier '{tier.name}' is defined twice")
        tiers[tier.name] = tier
    if appliance.store.hot_tier not in tiers:
        raise source.error(("store", "hot_tier"), f"no tier named '{appliance.store.hot_tier}' in {tiers_dir}")
    return Config(home, appliance, tiers)
