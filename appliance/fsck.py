"""`appliance fsck`: does the index match the blobs, and can the index be rebuilt from them.

check: every stored version in the index has its copy on the hot tier with the
right size and sealed-bytes hash (xxh3-128, no key needed) and a data key in the
keyring; every instance points at indexed versions; every blob file on the hot
tier is indexed. With the home to itself (exclusive lock), fsck also removes
blob files nothing references (left by a store that was killed before its
index commit) and temp files of dead writers.

rebuild: the index is moved aside and rebuilt from the sealed blobs and the
keyring alone: each blob is opened with its study's data key, verified in full,
and its attributes are read again from the decrypted bytes, which live only in
memory (memfd), never on a persistent disk.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from appliance.config import Config
from appliance.errors import ApplianceError, IntegrityError, KeyMissing
from appliance.fsutil import HomeLock
from appliance.store import index as ix
from appliance.store import p10, sealed
from appliance.store.archive import Archive, hot_backend, verify_blob_file
from appliance.store.index import Index
from appliance.store.keys import Keyring


@dataclass
class FsckReport:
    versions_checked: int = 0
    files_seen: int = 0
    errors: list[str] = field(default_factory=list)
    unreferenced: list[str] = field(default_factory=list)
    reclaimed: int = 0
    temp_files_removed: int = 0

    @property
    def clean(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict:
        return {"clean": self.clean, "versions_checked": self.versions_checked, "files_seen": self.files_seen,
                "errors": self.errors, "unreferenced": len(self.unreferenced), "reclaimed": self.reclaimed,
                "temp_files_removed": self.temp_files_removed}


def check(archive: Archive, *, repair: bool) -> FsckReport:
    """Check index against blobs. `repair` (needs the exclusive lock) reclaims unreferenced files."""
    report = FsckReport()
    hot = archive.hot
    referenced: set[str] = set()
    with archive.index.read() as t:
        for ca, blob in t.items("blobs"):
            report.versions_checked += 1
            copy = blob["copies"].get(hot.name)
            label = f"version {ca.hex()[:16]} of instance {blob['sop']}"
            if copy is None:
                report.errors.append(f"{label}: no copy on tier {hot.name}")
                continue
            referenced.add(copy["name"])
            try:
                verify_blob_file(hot, copy["name"], blob)
            except IntegrityError as exc:
                report.errors.append(f"{label}: {exc}")
            if not archive.keyring.has(blob["key_id"]):
                report.errors.append(f"{label}: its data key is not in the keyring")
        for sop_key, instance in t.items("instances"):
            for ca in instance["versions"]:
                if t.get("blobs", ca) is None:
                    report.errors.append(f"instance {sop_key.decode()}: version {ca.hex()[:16]} is not indexed")
    for name in hot.list():
        report.files_seen += 1
        if name not in referenced:
            report.unreferenced.append(name)
    if repair:
        report.temp_files_removed = hot.sweep_incoming()
        for name in report.unreferenced:
            hot.delete(name)
            report.reclaimed += 1
    return report


@dataclass
class RebuildReport:
    blobs: int = 0
    instances: int = 0
    shredded: int = 0
    errors: list[str] = field(default_factory=list)
    old_index: str = ""


def rebuild(config: Config) -> RebuildReport:
    """Move the index aside and rebuild it from the hot tier's blobs and the keyring."""
    report = RebuildReport()
    with HomeLock(config.home, exclusive=True):
        index_path = config.index_path
        if index_path.exists():
            stamp = time.strftime('%Y%m%dT%H%M%S')
            aside = index_path.with_name(f"{index_path.name}.old-{stamp}")
            number = 1
            while aside.exists():  # never overwrite an earlier index kept aside
                number += 1
                aside = index_path.with_name(f"{index_path.name}.old-{stamp}-{number}")
            os.replace(index_path, aside)
            report.old_index = str(aside)
        keyring = Keyring(config.keyring_path, config.key_file)
        index = Index(index_path, map_size=config.appliance.index.initial_map_size_mb << 20, create=True)
        try:
            archive_hot = hot_backend(config)
            names = sorted(archive_hot.list(), key=lambda n: archive_hot.path(n).stat().st_mtime)
            for name in names:
                report.blobs += 1
                try:
                    _reindex_blob(archive_hot, name, keyring, index)
                    report.instances += 1
                except KeyMissing:
                    report.shredded += 1  # its study was deleted: unreadable by design
                except ApplianceError as exc:
                    report.errors.append(f"blob {name}: {exc}")
        finally:
            index.close()
            keyring.close()
    return report


def _reindex_blob(hot, name: str, keyring: Keyring, index: Index) -> None:
    fd = os.memfd_create("pacs-vault-rebuild", os.MFD_CLOEXEC)
    try:
        with hot.open(name) as fp:
            header, ca, chunks = sealed.open_sealed(fp, keyring.data_key)
            with os.fdopen(os.dup(fd), "wb") as plain:
                for chunk in chunks:
                    plain.write(chunk)
        with hot.open(name) as fp:
            sealed_size, digest = sealed.sealed_digest(fp)
        info = p10.inspect(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    if info.content_address != ca:
        raise IntegrityError("decrypted bytes do not match the content address inside the blob")
    blob = {"name": name, "sealed_size": sealed_size, "xxh3": digest, "key_id": header.key_id,
            "compression": header.compression}

    def record(t: ix.Txn) -> None:
        if t.get("study_keys", info.study_uid) is None:
            t.put("study_keys", info.study_uid, header.key_id)
        ix.record_instance(t, info, blob, hot.name)

    index.write(record)
