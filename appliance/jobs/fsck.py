"""`appliance fsck`: does the index match the blobs, and can the index be rebuilt from them.

check: every stored version in the index has at least one copy; its hot copy,
if any, has the right size and sealed-bytes hash (xxh3-128, no key needed); each
cold copy points into a pack the index knows, on a tier that lists it with the
right size (tiers that cannot be reached now are reported, not failed: that is
`status`'s alarm); every version has its data key in the keyring; every
instance points at indexed versions; every blob file on the hot tier is indexed. With the home to itself (exclusive lock), fsck also removes
blob files nothing references (left by a store that was killed before its
index commit) and temp files of dead writers.

rebuild: the index is moved aside and rebuilt from the sealed blobs on the hot
tier, the packs on every cold tier that can be reached, and the keyring alone:
each blob is opened with its study's data key, verified in full, and its
attributes are read again from the decrypted bytes, which live only in memory
(memfd), never on a persistent disk. A pack is checked key-less first (its
footer hash), then its sealed trailer says which instance each blob holds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from appliance.admin.home import open_archive
from appliance.backends import open_tier
from appliance.config import Config
from appliance.errors import ApplianceError, IntegrityError, KeyMissing, NotFound, TierUnavailable
from appliance.format import p10, pack, sealed
from appliance.fsutil import HomeLock
from appliance.store.archive import Archive, hot_backend, verify_blob_file
from appliance.store.catalog import Catalog, Pack
from appliance.store.index import Index
from appliance.store.keys import Keyring


@dataclass
class FsckReport:
    versions_checked: int = 0
    files_seen: int = 0
    packs_checked: int = 0
    unreachable: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unreferenced: list[str] = field(default_factory=list)
    reclaimed: int = 0
    temp_files_removed: int = 0

    @property
    def clean(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict:
        return {"clean": self.clean, "versions_checked": self.versions_checked, "files_seen": self.files_seen,
                "packs_checked": self.packs_checked, "unreachable": self.unreachable,
                "errors": self.errors, "unreferenced": len(self.unreferenced), "reclaimed": self.reclaimed,
                "temp_files_removed": self.temp_files_removed}


def check(archive: Archive, *, repair: bool) -> FsckReport:
    """Check index against blobs. `repair` (needs the exclusive lock) reclaims unreferenced files."""
    report = FsckReport()
    hot = archive.hot
    referenced: set[str] = set()
    with archive.catalog.read() as view:
        for blob in view.blobs():
            report.versions_checked += 1
            copy = blob.hot(hot.name)
            label = f"version {blob.ca.hex()[:16]} of instance {blob.sop}"
            if not blob.copies:
                report.errors.append(f"{label}: no copy on any tier")
            for tier, cold in blob.copies.items():
                if tier != hot.name and view.pack(cold.where) is None:
                    report.errors.append(f"{label}: its copy on {tier} is in pack {cold.where}, "
                                         "which the index does not know")
            if copy is not None:
                referenced.add(copy.name)
                try:
                    verify_blob_file(hot, copy.name, blob)
                except IntegrityError as exc:
                    report.errors.append(f"{label}: {exc}")
            if not archive.keyring.has(blob.key_id):
                report.errors.append(f"{label}: its data key is not in the keyring")
        packs = list(view.packs())
        for instance in view.instances():
            for ca in instance.versions:
                if view.blob(ca) is None:
                    report.errors.append(f"instance {instance.sop_uid}: version {ca.hex()[:16]} is not indexed")
    for record in packs:
        report.packs_checked += 1
        try:
            size = archive.tier(record.tier).size(record.id)
        except TierUnavailable as exc:
            report.unreachable.append(f"pack {record.id} on {record.tier}: {exc}")
            continue
        except IntegrityError as exc:  # BlobMissing
            report.errors.append(f"pack {record.id} of study {record.study}: {exc}")
            continue
        if size != record.size:
            report.errors.append(f"pack {record.id} on {record.tier} has {size} bytes, expected {record.size}")
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
    packs: int = 0
    instances: int = 0
    shredded: int = 0
    errors: list[str] = field(default_factory=list)
    old_index: str = ""


def rebuild(config: Config) -> RebuildReport:
    """Move the index aside and rebuild it from the hot tier's blobs and the keyring."""
    report = RebuildReport()
    try:  # what a crashed writer's journal holds goes into the index (and its blobs to the hot tier) first
        open_archive(config, exclusive=True).close()
    except NotFound:
        pass  # no index to replay into: the next writer to open the home replays into the rebuilt one
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
        catalog = Catalog(index)
        try:
            archive_hot = hot_backend(config)
            # Stored order: the versions of an instance are indexed oldest first (its stored time).
            names = sorted(archive_hot.list(), key=lambda n: archive_hot.path(n).stat().st_mtime_ns)
            for name in names:
                report.blobs += 1
                try:
                    reindex_blob(lambda name=name: archive_hot.open(name), name, archive_hot.name, keyring, catalog)
                    report.instances += 1
                except KeyMissing:
                    report.shredded += 1  # its study was deleted: unreadable by design
                except ApplianceError as exc:
                    report.errors.append(f"blob {name}: {exc}")
            for tier in config.cold_tiers:
                _reindex_tier(open_tier(config, tier), keyring, catalog, report)
        finally:
            index.close()
            keyring.close()
    return report


def _reindex_tier(backend, keyring: Keyring, catalog: Catalog, report: RebuildReport) -> None:
    try:
        names = backend.read_order(list(backend.list()))
    except TierUnavailable as exc:
        report.errors.append(f"tier {backend.name} not read: {exc}")
        return
    for pack_id in names:
        report.packs += 1
        try:
            with backend.open(pack_id) as fp:
                size, digest = pack.verify_keyless(fp)
                study_uid, entries = pack.read_trailer(fp, keyring.data_key)
                for entry in entries:
                    report.blobs += 1
                    try:
                        if reindex_blob(lambda e=entry: pack.Slice(fp, e.offset, e.length), pack_id, backend.name,
                                        keyring, catalog):
                            report.instances += 1
                    except ApplianceError as exc:
                        report.errors.append(f"blob {entry.offset} of pack {pack_id} on {backend.name}: {exc}")
        except KeyMissing:
            report.shredded += 1  # a pack of a deleted study, left on an unreachable medium
            continue
        except ApplianceError as exc:
            report.errors.append(f"pack {pack_id} on {backend.name}: {exc}")
            continue
        now = int(time.time())
        catalog.add_pack(Pack(pack_id, backend.name, study_uid, size, digest, backend.locate(pack_id), now, now, 0,
                              tuple(e.ca for e in entries)), entries)


def reindex_blob(opener, name: str, tier: str, keyring: Keyring, catalog: Catalog) -> bool:
    """Index one sealed blob (on the hot tier, or inside a pack); False if it was indexed already."""
    fd = os.memfd_create("pacs-vault-rebuild", os.MFD_CLOEXEC)
    try:
        with opener() as fp:
            header, ca, chunks = sealed.open_sealed(fp, keyring.data_key)
            with os.fdopen(os.dup(fd), "wb") as plain:
                for chunk in chunks:
                    plain.write(chunk)
        with opener() as fp:
            sealed_size, digest = sealed.sealed_digest(fp)
        info = p10.inspect(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    if info.content_address != ca:
        raise IntegrityError("decrypted bytes do not match the content address inside the blob")
    blob = {"name": name, "sealed_size": sealed_size, "xxh3": digest, "key_id": header.key_id,
            "compression": header.compression}
    return catalog.reindex(info, blob, tier)
