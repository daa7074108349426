"""Creating an appliance home: `appliance init`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from appliance import config as cfg
from appliance.audit.trail import AuditTrail
from appliance.errors import ApplianceError
from appliance.fsutil import HomeLock, fsync_dir, make_dirs, sync_tree, write_file_atomic
from appliance.store.archive import Archive

# The repository's example tiers, copied into every new home.
EXAMPLES = Path(__file__).resolve().parents[2]  # the repository: tiers/ and policies/

APPLIANCE_YAML = """\
# pacs-vault appliance configuration. Paths are relative to this home unless
# absolute. `appliance --home DIR status` shows what the appliance holds.

# The key-encryption key. Keep it outside the data directories and back it up
# apart from the data: without it nothing can be read, with it alone nothing
# can be read either (the data stays where it is).
key_file: kek.key
# Wrapped data keys, one per study (LMDB).
keyring: keyring
# One YAML file per storage tier.
tiers_dir: tiers

index:
  path: index
  # The LMDB map starts at this size and doubles by itself when full.
  initial_map_size_mb: 256

store:
  # The tier every new instance lands on (a name from tiers_dir).
  hot_tier: hot
  # zstd level, 0 turns compression off. Compression is skipped per instance
  # when the pixel data is already compressed or it saves less than 5%.
  compression_level: 3
  # Encryption segment size: memory per stream is a few segments.
  segment_size_kb: 1024
  # A different object under an existing SOP Instance UID becomes the current
  # version; keep the previous versions (true) or drop them once it is stored.
  keep_previous_versions: true

lifecycle:
  # Retention and tiering policies (`appliance policy plan`, `policy apply`).
  policies_dir: policies
  # A recall that needs a tape cartridge loaded waits this long, with an alarm in
  # `appliance status` naming the cartridge, before the request fails.
  recall_wait_s: 300
  # A job that met an unreachable tier is retried by later runs after this delay,
  # doubled after every failure, up to 6 hours.
  retry_backoff_s: 60
  # Packs for object storage are assembled here (sealed bytes only).
  spool_dir: spool

replication:
  # The off-site copy (`appliance replicate`, `appliance restore --from`): a local path
  # (another disk or a NAS mount), rsync://host:port/module/path, or user@host:path (ssh).
  # Only sealed data goes there; the key file never does.
  target: offsite
  ssh_port: 22
  ssh_key: ""
  ssh_known_hosts: ""
  password_file: ""
  bwlimit_kbps: 0
  # Alarm when the oldest instance not yet verified off-site is older than this.
  rpo_hours: 24
  keep_manifests: 30
  timeout_s: 600

audit:
  # Every access and change is appended to a hash-chained trail in audit/
  # (`appliance audit verify|export|report`). Off only for benchmarks: `status`
  # raises an alarm while it is off.
  enabled: true
  # Ed25519 key signing the trail's checkpoints. Keep it apart from the KEK and
  # back it up with it; it is never replicated.
  key_file: audit.key

access:
  # Unix groups. Admins: policy apply (expiry deletes), hold release, keys rotate,
  # restore, ae add/remove, fsck --rebuild-index. Auditors: audit verify|export|report.
  # Root and the home's owner are admins; under sudo, SUDO_USER's groups decide.
  admin_group: pacs-vault-admin
  auditor_group: pacs-vault-audit

metrics:
  # Prometheus metrics from `serve`: GET http://bind_address:port/metrics; 0 turns
  # them off. `appliance metrics --textfile FILE` writes the same gauges for
  # node_exporter's textfile collector.
  port: 0
  bind_address: 127.0.0.1

imports:
  # Files sealed in parallel by `appliance import`: more than the cores, so that
  # one file's fsync overlaps another's compression.
  workers: 4

dicom:
  # The archive's own AE title; callers must use it as the called AE title
  # unless allow_any_called_ae_title is true.
  ae_title: ARCHIVE
  port: 11112
  bind_address: 0.0.0.0
  # Callers must be registered (`appliance ae add`) unless this is true; even
  # then, C-MOVE destinations must be registered.
  allow_unknown_callers: false
  allow_any_called_ae_title: false
  # Accept SOP classes pydicom does not know (private ones), stored as received.
  allow_unknown_sop_classes: false
  # Association slots in all, per calling AE title and per source address: no one
  # peer takes every slot. A connection that has not sent a complete A-ASSOCIATE-RQ
  # within association_request_timeout_s (the TLS handshake included) is dropped;
  # at most max_pending_per_address of those wait at once per address.
  max_associations: 32
  max_associations_per_ae: 8
  max_associations_per_address: 16
  max_pending_per_address: 16
  association_request_timeout_s: 5
  # An association with nothing on the wire for this long is released.
  idle_timeout_s: 120
  # Largest PDU we accept; a large one means fewer round trips.
  max_pdu_kb: 1024
  # TLS: set certificate and private_key (PEM) to turn it on.
  tls:
    certificate: ""
    private_key: ""
    ca_certificates: ""
    require_client_certificate: false

dicomweb:
  # QIDO-RS, WADO-RS and STOW-RS at http(s)://bind_address:port/dicom-web, WADO-URI
  # at /wado, every request with `Authorization: Bearer TOKEN` (`appliance token add`).
  # 0 turns it off; `appliance serve --dicomweb-port N` overrides it.
  port: 0
  bind_address: 127.0.0.1
  # TLS: set certificate and private_key (PEM) to turn it on; ca_certificates and
  # require_client_certificate ask browsers and clients for a certificate too.
  tls:
    certificate: ""
    private_key: ""
    ca_certificates: ""
    require_client_certificate: false
  # Web pages on these origins may call the API from a browser (CORS).
  cors_origins: []
  # The OHIF viewer at /viewer (fetched by `make`), reading this archive.
  viewer: false
  # A STOW-RS request with a larger body is refused (413 Payload Too Large).
  max_request_mb: 16384
"""


def init(home: Path, restored: tuple[bytes, Path, Path, Path | None] | None = None) -> cfg.Config:
    """Create the home; appliance.yaml is written last, so a home that has one is complete.

    `restored` = (key file bytes, keyring directory, index directory, audit directory or None)
    from an off-site copy: the home gets those instead of a new key, keyring, index and trail.
    The audit key is new either way (it never leaves a home): its first record announces it."""
    home = Path(home)
    final = home / cfg.CONFIG_FILE
    if final.exists():
        raise ApplianceError(f"{home} is already an appliance home")
    make_dirs(home)
    with HomeLock(home, exclusive=True):
        for directory in ("tiers", "policies"):
            (home / directory).mkdir(exist_ok=True)
            for example in sorted((EXAMPLES / directory).iterdir()):
                if example.suffix in (".yaml", ".example", ".md"):
                    shutil.copyfile(example, home / directory / example.name)
        draft = home / (cfg.CONFIG_FILE + ".init")
        write_file_atomic(draft, APPLIANCE_YAML.encode())
        config = cfg.load(home, draft)
        for tier in config.tiers.values():
            if tier.kind == "filesystem":
                make_dirs(config.resolve(tier.path))
        if restored is None:
            Archive(config, audit=audit_trail(config), lock=None, create=True).close()
        else:
            key_bytes, keyring, index, audit_dir = restored
            write_file_atomic(config.key_file, key_bytes, mode=0o600)
            os.replace(keyring, config.keyring_path)
            os.replace(index, config.index_path)
            if audit_dir is not None:
                os.replace(audit_dir, config.audit_dir)
        AuditTrail.create(config.audit_dir, config.audit_key_file,
                          reason="restore from an off-site copy" if restored else "appliance init")
        # LMDB never syncs its directories, shutil.copyfile no file: all of it on disk first.
        sync_tree(home)
        draft.rename(final)
        fsync_dir(home)
    config = cfg.load(home, final)
    # What the configuration is now: later changes are recorded.
    AuditTrail(config.audit_dir, config.audit_key_file).note_config_changes(config.files())
    return config


def audit_trail(config: cfg.Config, user: str = "") -> AuditTrail:
    """The audit trail of a home (off when appliance.yaml says so); `user`: who the records name
    (default: who runs this process)."""
    return AuditTrail(config.audit_dir, config.audit_key_file, enabled=config.appliance.audit.enabled, user=user)


def open_archive(config: cfg.Config, *, writer: bool = False, exclusive: bool = False) -> Archive:
    """The archive of a home, recording into its audit trail (see Archive.open)."""
    return Archive.open(config, audit=audit_trail(config), writer=writer, exclusive=exclusive)
