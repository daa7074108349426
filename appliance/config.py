"""Configuration: HOME/appliance.yaml and HOME/tiers/*.yaml, loaded into typed dataclasses.

Every error names the file, the line and the key. Paths in the files are
relative to the home directory unless absolute. The core receives these
dataclasses, never CLI arguments or globals.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from appliance.errors import ConfigError, NotInitialised, TierUnavailable

CONFIG_FILE = "appliance.yaml"
TIER_KINDS = ("filesystem", "ltfs", "s3")


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
    # The ingest journal (store/journal.py): every acknowledged store is written here first.
    # A fast, durable device of its own (an NVMe mirror) shortens every acknowledgement.
    journal_dir: str = "journal"


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
    # Association slots, in all, per calling AE title and per source address: no one peer can
    # take every slot. Connections that have not yet sent their A-ASSOCIATE-RQ hold none; at
    # most `max_pending_per_address` of them per address, each dropped after
    # `association_request_timeout_s` (the TLS handshake included).
    max_associations: int = field(default=32, metadata=_check(lambda v: 1 <= v <= 1024, "must be 1 to 1024"))
    max_associations_per_ae: int = field(default=8, metadata=_check(lambda v: 1 <= v <= 1024,
                                                                      "must be 1 to 1024"))
    max_associations_per_address: int = field(default=16, metadata=_check(lambda v: 1 <= v <= 1024,
                                                                           "must be 1 to 1024"))
    max_pending_per_address: int = field(default=16, metadata=_check(lambda v: 1 <= v <= 4096,
                                                                      "must be 1 to 4096"))
    association_request_timeout_s: float = field(default=5.0, metadata=_check(lambda v: 0.1 <= v <= 300,
                                                                               "must be 0.1 to 300"))
    # An accepted association with nothing on the wire for this long is released.
    idle_timeout_s: float = field(default=120.0, metadata=_check(lambda v: 1 <= v <= 86400, "must be 1 to 86400"))
    max_pdu_kb: int = field(default=1024, metadata=_check(lambda v: 16 <= v <= 65536, "must be 16 to 65536"))
    tls: TlsConfig = TlsConfig()


@dataclass(frozen=True)
class DicomWebConfig:
    # The DICOMweb front (appliance/web/) in `serve`: QIDO-RS, WADO-RS, STOW-RS under
    # /dicom-web, WADO-URI at /wado; 0 turns it off (`serve --dicomweb-port N` overrides).
    port: int = field(default=0, metadata=_check(lambda v: 0 <= v <= 65535, "must be 0 (off) to 65535"))
    bind_address: str = "127.0.0.1"
    tls: TlsConfig = TlsConfig()
    # Origins a browser may call from (CORS), e.g. "https://viewer.example.org"; none by default.
    cors_origins: tuple[str, ...] = ()
    # Serve the OHIF viewer (fetched by `make`) at /viewer, pointed at this DICOMweb root.
    viewer: bool = False
    # A STOW-RS request with a larger body is refused (413).
    max_request_mb: int = field(default=16384, metadata=_check(lambda v: v >= 1, "must be at least 1"))


@dataclass(frozen=True)
class LifecycleConfig:
    policies_dir: str = "policies"
    # A recall that needs a cartridge loaded (or an S3 archive-class restore) waits this long,
    # with an alarm saying what to do, before it fails.
    recall_wait_s: int = field(default=300, metadata=_check(lambda v: v >= 0, "must be 0 or more"))
    # A job that failed (tier down) is retried by later runs after this delay, doubled per
    # failure up to 6 hours.
    retry_backoff_s: int = field(default=60, metadata=_check(lambda v: v >= 1, "must be at least 1"))
    # Packs for object storage are assembled here (sealed bytes only) before the upload.
    spool_dir: str = "spool"


@dataclass(frozen=True)
class ReplicationConfig:
    # Where the off-site copy goes: a local path (another disk, a NAS mount; relative to the
    # home), an rsync daemon (rsync://host:port/module/path) or ssh ([user@]host:path).
    target: str = "offsite"
    ssh_port: int = field(default=22, metadata=_check(lambda v: 1 <= v <= 65535, "must be 1 to 65535"))
    ssh_key: str = ""  # private key for ssh targets (BatchMode: no passwords)
    ssh_known_hosts: str = ""  # known_hosts file pinning the target's host key
    password_file: str = ""  # for rsync daemons that ask for one
    bwlimit_kbps: int = field(default=0, metadata=_check(lambda v: v >= 0, "must be 0 or more"))
    # An alarm is raised when the oldest acknowledged instance not yet verified off-site is older.
    rpo_hours: int = field(default=24, metadata=_check(lambda v: v >= 1, "must be at least 1"))
    keep_manifests: int = field(default=30, metadata=_check(lambda v: v >= 1, "must be at least 1"))
    timeout_s: int = field(default=600, metadata=_check(lambda v: v >= 10, "must be at least 10"))


@dataclass(frozen=True)
class MetricsConfig:
    # `serve` answers GET /metrics (Prometheus text format) on this port; 0: off.
    port: int = field(default=0, metadata=_check(lambda v: 0 <= v <= 65535, "must be 0 (off) to 65535"))
    bind_address: str = "127.0.0.1"


@dataclass(frozen=True)
class AuditConfig:
    # Turning the trail off is for benchmarks only: `status` raises an alarm while it is off.
    enabled: bool = True
    # Ed25519 key that signs the trail's checkpoints; kept apart from the KEK, never replicated.
    key_file: str = "audit.key"


@dataclass(frozen=True)
class AccessConfig:
    # Unix groups: admins run destructive and key commands, auditors read the audit trail.
    admin_group: str = "pacs-vault-admin"
    auditor_group: str = "pacs-vault-audit"


@dataclass(frozen=True)
class ApplianceConfig:
    key_file: str = "kek.key"
    keyring: str = "keyring"
    tiers_dir: str = "tiers"
    index: IndexConfig = IndexConfig()
    store: StoreConfig = StoreConfig()
    dicom: DicomConfig = DicomConfig()
    dicomweb: DicomWebConfig = DicomWebConfig()
    imports: ImportConfig = ImportConfig()
    lifecycle: LifecycleConfig = LifecycleConfig()
    replication: ReplicationConfig = ReplicationConfig()
    audit: AuditConfig = AuditConfig()
    access: AccessConfig = AccessConfig()
    metrics: MetricsConfig = MetricsConfig()


@dataclass(frozen=True)
class CartridgeConfig:
    label: str  # the volume serial printed on the cartridge, e.g. PV0001L9
    path: str  # where LTFS mounts it
    capacity_mb: int = field(metadata=_check(lambda v: v >= 1, "must be at least 1"))


@dataclass(frozen=True)
class S3Config:
    bucket: str
    endpoint_url: str = ""  # empty: AWS; any S3-compatible cluster otherwise (Ceph RGW, MinIO, SeaweedFS)
    prefix: str = "pacs-vault/"
    region: str = "us-east-1"
    # STANDARD, STANDARD_IA, ... or an archive class (GLACIER, DEEP_ARCHIVE): those are read by
    # requesting a restore first and retrying once it is done.
    storage_class: str = "STANDARD"
    restore_days: int = field(default=2, metadata=_check(lambda v: v >= 1, "must be at least 1"))
    # An AWS-style INI credentials file (aws_access_key_id, aws_secret_access_key) and its
    # profile; empty: boto3's own chain (environment, ~/.aws, instance role).
    credentials_file: str = ""
    profile: str = "default"
    part_size_mb: int = field(default=64, metadata=_check(lambda v: 5 <= v <= 5120, "must be 5 to 5120"))
    timeout_s: int = field(default=30, metadata=_check(lambda v: v >= 1, "must be at least 1"))


@dataclass(frozen=True)
class TierConfig:
    name: str
    kind: str = field(metadata=_check(lambda v: v in TIER_KINDS, f"must be one of {', '.join(TIER_KINDS)}"))
    path: str = ""  # filesystem tiers
    cartridges: tuple[CartridgeConfig, ...] = ()  # ltfs tiers, filled in this order
    s3: S3Config | None = None  # s3 tiers
    # Cold tiers hold packs of at most this size (a larger single instance gets its own pack).
    pack_size_mb: int = field(default=1024, metadata=_check(lambda v: v >= 1, "must be at least 1"))
    # Usage above the high watermark makes `policy apply` move studies off this tier, least
    # recently used first, until usage is below the low one. capacity_mb 0: the file system's size.
    capacity_mb: int = field(default=0, metadata=_check(lambda v: v >= 0, "must be 0 or more"))
    high_watermark_percent: int = field(default=85, metadata=_check(lambda v: 1 <= v <= 100, "must be 1 to 100"))
    low_watermark_percent: int = field(default=70, metadata=_check(lambda v: 1 <= v <= 100, "must be 1 to 100"))
    # Transient failures (timeouts, 5xx, busy drive) are retried this many times within a run,
    # with exponential backoff; a job that still fails is retried by the next run.
    retries: int = field(default=3, metadata=_check(lambda v: 0 <= v <= 20, "must be 0 to 20"))
    # Bandwidth cap for reads and writes on this tier, 0 = none.
    rate_limit_mbps: int = field(default=0, metadata=_check(lambda v: v >= 0, "must be 0 or more"))
    # Every copy on this tier is verified at least this often (days; 0 = never required):
    # fast = sealed-bytes hash, no key; deep = decrypt, decompress, re-hash the content.
    scrub_fast_days: int = field(default=7, metadata=_check(lambda v: v >= 0, "must be 0 or more"))
    scrub_deep_days: int = field(default=30, metadata=_check(lambda v: v >= 0, "must be 0 or more"))


class Tiers(dict):
    """The tiers by name. A name no file defines (packs still indexed on a tier whose file
    was removed) is a tier that cannot be reached, not a KeyError deep in a job."""

    def __missing__(self, name: str) -> TierConfig:
        raise TierUnavailable(f"tier {name} is not configured: no file in the tiers directory defines it")


@dataclass(frozen=True)
class Config:
    home: Path
    appliance: ApplianceConfig
    tiers: Tiers

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
    def journal_dir(self) -> Path:
        return self.resolve(self.appliance.store.journal_dir)

    @property
    def remote_aes_path(self) -> Path:
        return self.home / "remote-aes.yaml"

    @property
    def tokens_path(self) -> Path:
        """DICOMweb bearer tokens (their hashes), managed by `appliance token`."""
        return self.home / "dicomweb-tokens.yaml"

    @property
    def audit_dir(self) -> Path:
        return self.home / "audit"

    @property
    def audit_key_file(self) -> Path:
        return self.resolve(self.appliance.audit.key_file)

    def files(self) -> list[Path]:
        """The configuration files whose changes the audit trail records."""
        tiers_dir = self.resolve(self.appliance.tiers_dir)
        return sorted([self.home / CONFIG_FILE, self.remote_aes_path, self.tokens_path, *tiers_dir.glob("*.yaml"),
                       *self.policies_path.glob("*.yaml")])

    @property
    def hot_tier(self) -> TierConfig:
        return self.tiers[self.appliance.store.hot_tier]

    @property
    def cold_tiers(self) -> list[TierConfig]:
        return [t for name, t in self.tiers.items() if name != self.appliance.store.hot_tier]

    @property
    def policies_path(self) -> Path:
        return self.resolve(self.appliance.lifecycle.policies_dir)


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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
            # One parse (libyaml's when built in): the node tree gives each key's line, the
            # data are constructed from it.
            node = yaml.compose(text, Loader=_LOADER)
            self.data = yaml.constructor.SafeConstructor().construct_document(node) if node else None
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
        elif isinstance(node, yaml.SequenceNode):
            for number, item in enumerate(node.value):
                self._index(item, keypath + (number,))

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
        value = _value(hints[f.name], data[f.name], f.default, source, here)
        check = f.metadata.get("check")
        if check and not check[0](value):
            raise source.error(here, check[1])
        values[f.name] = value
    return cls(**values)


def _check_tier(tier: TierConfig, source: _Source) -> None:
    needs = {"filesystem": ("path", tier.path), "ltfs": ("cartridges", tier.cartridges), "s3": ("s3", tier.s3)}
    key, value = needs[tier.kind]
    if not value:
        raise source.error((key,), f"is required for a {tier.kind} tier")
    for other, other_value in needs.items():
        if other != tier.kind and needs[other][1]:
            raise source.error((needs[other][0],), f"does not apply to a {tier.kind} tier")
    if tier.low_watermark_percent > tier.high_watermark_percent:
        raise source.error(("low_watermark_percent",), "must not be above high_watermark_percent")
    labels = [c.label for c in tier.cartridges]
    for number, label in enumerate(labels):
        if labels.index(label) != number:
            raise source.error(("cartridges", number, "label"), f"cartridge {label} is listed twice")


def _value(kind, value: Any, default: Any, source: _Source, here: tuple) -> Any:
    """Check one YAML value against its annotated type: a dataclass, an optional dataclass,
    a tuple of items, bool, int, float or text."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(kind) if arg is not type(None)][0]
        return None if value is None else _value(inner, value, None, source, here)
    if is_dataclass(kind):
        return _build(kind, value, source, here)
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, list):
            raise source.error(here, "must be a list")
        item_kind = typing.get_args(kind)[0]
        return tuple(_value(item_kind, item, None, source, here + (number,)) for number, item in enumerate(value))
    if kind is bool:
        if not isinstance(value, bool):
            raise source.error(here, "must be true or false")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise source.error(here, "must be a whole number")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise source.error(here, "must be a number")
        value = float(value)
    elif kind is str:
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise source.error(here, "must be text (put it in quotes)")
        if value == "" and default != "":
            raise source.error(here, "must be a non-empty text")
        value = str(value)
    return value


def read_list(path: Path, key: str) -> list:
    """The list under `key` of a managed YAML file (remote AEs, DICOMweb tokens); empty when
    the file is not there."""
    if not path.exists():
        return []
    try:
        data = yaml.load(path.read_text("utf-8"), Loader=_LOADER) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"{path}:{mark.line + 1 if mark else 1}: invalid YAML") from None
    if not isinstance(data, dict) or not isinstance(data.get(key) or [], list):
        raise ConfigError(f"{path}: expected a list under {key!r}")
    return data.get(key) or []


# Present while `appliance restore` builds a home: the home is not one until it goes.
RESTORE_MARKER = ".restore-unfinished"


def load(home: Path, path: Path | None = None) -> Config:
    """The home's configuration; `path`: that file instead (a home being made: init, restore)."""
    home = Path(home)
    if path is None and (home / RESTORE_MARKER).exists():
        raise NotInitialised(f"the restore into {home} did not finish: run the same `appliance restore` again")
    path = path or home / CONFIG_FILE
    if not path.exists():
        raise NotInitialised(f"{home} is not an appliance home (no {CONFIG_FILE}); run `appliance init`")
    source = _Source(path)
    appliance = _build(ApplianceConfig, source.data, source)
    tiers = Tiers()
    tiers_dir = Path(appliance.tiers_dir) if Path(appliance.tiers_dir).is_absolute() else home / appliance.tiers_dir
    for tier_file in sorted(tiers_dir.glob("*.yaml")):
        tier_source = _Source(tier_file)
        tier = _build(TierConfig, tier_source.data, tier_source)
        if tier.name in tiers:
            raise tier_source.error(("name",), f"tier '{tier.name}' is defined twice")
        _check_tier(tier, tier_source)
        tiers[tier.name] = tier
    if appliance.store.hot_tier not in tiers:
        raise source.error(("store", "hot_tier"), f"no tier named '{appliance.store.hot_tier}' in {tiers_dir}")
    if tiers[appliance.store.hot_tier].kind != "filesystem":
        raise source.error(("store", "hot_tier"), "the hot tier must be a filesystem tier")
    return Config(home, appliance, tiers)
