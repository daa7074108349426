"""Copies of a study on cold tiers: write packs, verify them, drop hot copies, recall.

Every step is safe to interrupt and to repeat:

- pack_study: before a pack is put, its id is recorded in the study's job (`pending`),
  so a run killed mid-upload deletes the orphan next time; the pack counts only after
  it was read back from the tier and its bytes hashed (size + xxh3-128), and only then
  is it recorded in the index. Blobs that already have a copy on the tier are skipped.
- drop_hot: only copies whose versions have a verified copy on every required tier are
  forgotten (index first, files after; a crash in between leaves files fsck reclaims).
- recall: copies come back to the hot tier from the first cold tier that can deliver
  them, each checked against its sealed-bytes hash on the way; a bad cold copy is
  skipped for the next tier's copy.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Callable, Protocol

import xxhash

from appliance.backends.base import Backend
from appliance.backends.filesystem import FilesystemBackend
from appliance.config import Config
from appliance.errors import ApplianceError, CartridgeOffline, IntegrityError, NotFound, TierUnavailable
from appliance.format import pack
from appliance.fsutil import raise_if_out_of_space
from appliance.store.catalog import Blob, Catalog, Pack
from appliance.store.catalog.records import PackCopy
from appliance.store.keys import Keyring


class Archive(Protocol):
    """What tiering works on (store/archive.py's Archive is one): the parts of a home it reads and
    writes, named here so that tiering does not depend on the archive facade that calls it."""

    config: Config
    hot: FilesystemBackend
    catalog: Catalog
    keyring: Keyring

    def tier(self, name: str) -> Backend: ...

    def recall_study(self, study_uid: str, on_wait=None) -> int: ...

# Which cold tier is read first (recall, replication): the quickest to answer.
_READ_PREFERENCE = {"filesystem": 0, "ltfs": 1, "s3": 2}


def by_read_preference(config, tiers) -> list[str]:
    """Cold tier names, quickest to read first (a disk, then tape, then object storage)."""
    return sorted(tiers, key=lambda name: (_READ_PREFERENCE[config.tiers[name].kind], name)
                  if name in config.tiers else (len(_READ_PREFERENCE), name))


def _tier_error(exc: ApplianceError, tier: str) -> ApplianceError:
    exc.tier = tier  # lifecycle raises its alarm per tier
    return exc


def _groups(blobs: list[Blob], limit: int) -> list[list[Blob]]:
    groups, current, size = [], [], 0
    for blob in blobs:
        if current and size + blob.sealed_size > limit:
            groups.append(current)
            current, size = [], 0
        current.append(blob)
        size += blob.sealed_size
    if current:
        groups.append(current)
    return groups


def pack_study(archive: "Archive", study_uid: str, tier_name: str, *,
               remember_pending: Callable[[str | None], None]) -> int:
    """Give every version of a study a verified copy on `tier_name`; returns bytes written.

    `remember_pending(pack_id)` durably notes the pack about to be written (None: done)."""
    tier = archive.config.tiers[tier_name]
    backend = archive.tier(tier_name)
    with archive.catalog.read() as view:
        if view.study(study_uid) is None:
            raise NotFound(f"no study {study_uid}")
        todo = [blob for blob in view.study_blobs(study_uid) if tier_name not in blob.copies]
        key_id = view.study_key(study_uid)
    if not todo:
        return 0
    if any(blob.hot(archive.hot.name) is None for blob in todo):
        archive.recall_study(study_uid)
        return pack_study(archive, study_uid, tier_name, remember_pending=remember_pending)
    written = 0
    spool = archive.config.resolve(archive.config.appliance.lifecycle.spool_dir)
    spool.mkdir(parents=True, exist_ok=True)
    for group in _groups(todo, tier.pack_size_mb << 20):
        pack_id = os.urandom(16).hex()
        remember_pending(pack_id)
        try:
            with tempfile.TemporaryFile(dir=spool) as staged:  # sealed bytes only, gone on close or crash
                sources = [pack.PackSource(blob.ca, blob.sealed_size, blob.xxh3, blob.sop,
                                           lambda blob=blob: archive.hot.open(blob.hot(archive.hot.name).name))
                           for blob in group]
                info = pack.write_pack(staged, sources, study_uid=study_uid,
                                       data_key=archive.keyring.data_key(key_id), key_id=key_id)
                staged.flush()
                staged.seek(0)
                backend.put(pack_id, staged)
        except OSError as exc:
            raise_if_out_of_space(exc)
            raise
        except TierUnavailable as exc:
            raise _tier_error(exc, tier_name)
        verify_pack(archive, tier_name, pack_id, info.size, info.xxh3)
        now = int(time.time())
        archive.catalog.add_pack(Pack(pack_id, tier_name, study_uid, info.size, info.xxh3, backend.locate(pack_id), now,
                                      now, 0, tuple(e.ca for e in info.entries)), info.entries)
        remember_pending(None)
        written += info.size
    return written


def discard_if_unrecorded(archive: "Archive", tier_name: str, pack_id: str) -> None:
    """A pack noted as pending but never recorded in the index is the remains of a killed
    write (a migration or a scrub repair): remove it from its tier."""
    with archive.catalog.read() as view:
        if view.pack(pack_id) is not None:
            return
    try:
        archive.tier(tier_name).delete(pack_id)
    except TierUnavailable as exc:
        raise _tier_error(exc, tier_name)


def verify_pack(archive: "Archive", tier_name: str, pack_id: str, size: int, digest: bytes) -> None:
    """Read a pack back from its tier and check its bytes (key-less); raise IntegrityError if not."""
    backend = archive.tier(tier_name)
    try:
        with backend.open(pack_id) as fp:
            found_size, found = pack.verify_keyless(fp)
    except TierUnavailable as exc:
        raise _tier_error(exc, tier_name)
    if (found_size, found) != (size, digest):
        raise IntegrityError(f"pack {pack_id} on {tier_name} does not read back as written")


def drop_hot(archive: "Archive", study_uid: str, required: list[str]) -> int:
    """Forget and delete the study's hot copies, if every version has a copy on each `required`
    tier (at least one cold copy when `required` is empty). Returns the number dropped."""
    names = archive.catalog.drop_hot_copies(study_uid, archive.hot.name, required)
    for name in names:
        archive.hot.delete(name)
    return len(names)


def recall(archive: "Archive", study_uid: str, *, on_wait: Callable[[str], None] | None = None) -> int:
    """Bring every version of a study without a hot copy back to the hot tier. Returns the count.

    A cartridge that is not loaded is waited for (up to lifecycle.recall_wait_s), `on_wait`
    told which one to load; any other unavailable tier is tried next in line."""
    wait_s = archive.config.appliance.lifecycle.recall_wait_s
    deadline = time.monotonic() + wait_s
    waited_for = None
    while True:
        try:
            count, cartridges = _recall_once(archive, study_uid)
        except CartridgeOffline as exc:
            # The alarm stays until a recall that needed the cartridge succeeds.
            if waited_for != exc.label:
                waited_for = exc.label
                archive.catalog.raise_alarm(f"recall:{exc.label}", f"a recall needs cartridge {exc.label}",
                                            f"load cartridge {exc.label} (tier {getattr(exc, 'tier', '?')})")
            if time.monotonic() >= deadline:
                raise
            if on_wait is not None:
                on_wait(f"load cartridge {exc.label}")
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
            continue
        for label in cartridges:  # the cartridge a recall asked for has been loaded
            archive.catalog.clear_alarm(f"recall:{label}")
        return count


def _recall_once(archive: "Archive", study_uid: str) -> tuple[int, set[str]]:
    """(versions restored, cartridges read)"""
    hot = archive.hot.name
    with archive.catalog.read() as view:
        if view.study(study_uid) is None:
            raise NotFound(f"no study {study_uid}")
        missing = {blob.ca: blob for blob in view.study_blobs(study_uid) if blob.hot(hot) is None}
        pack_ids = {copy.pack for blob in missing.values() for copy in blob.copies.values()
                    if isinstance(copy, PackCopy)}
        packs = {pack_id: view.pack(pack_id) for pack_id in pack_ids}
    restored: dict[bytes, str] = {}
    cartridges: set[str] = set()
    errors: list[ApplianceError] = []
    tiers = by_read_preference(archive.config, {rec.tier for rec in packs.values() if rec})
    for tier_name in tiers:
        wanted = {ca: blob for ca, blob in missing.items() if ca not in restored and tier_name in blob.copies}
        if not wanted:
            continue
        backend = archive.tier(tier_name)
        by_pack: dict[str, list[bytes]] = {}
        for ca, blob in wanted.items():
            by_pack.setdefault(blob.copies[tier_name].where, []).append(ca)
        for pack_id in backend.read_order(by_pack):
            where = packs[pack_id].where if packs.get(pack_id) else ""
            try:
                with backend.open(pack_id) as fp:
                    for ca in by_pack[pack_id]:
                        restored[ca] = restore_blob(archive, fp, wanted[ca], tier_name)
                if where:
                    cartridges.add(where)
            except CartridgeOffline as exc:
                where = where or exc.label
                errors.append(_tier_error(CartridgeOffline(
                    f"load cartridge {where} (tier {tier_name}) to recall study {study_uid}", where), tier_name))
            except (TierUnavailable, IntegrityError) as exc:  # BlobMissing included: try the next tier
                errors.append(_tier_error(exc, tier_name))
    if restored:
        _record_hot_copies(archive, study_uid, restored)
    left = len(missing) - len(restored)
    if left:
        offline = [e for e in errors if isinstance(e, CartridgeOffline)]
        if offline:
            raise offline[0]
        reason = errors[0] if errors else NotFound("no cold copy is indexed")
        if isinstance(reason, TierUnavailable):
            raise reason
        raise IntegrityError(f"{left} instances of study {study_uid} could not be recalled: {reason}")
    return len(restored), cartridges


def restore_blob(archive: "Archive", fp, blob: Blob, tier_name: str) -> str:
    """Copy a version out of its pack (`fp`, open) into a new hot file, checked against its
    sealed-bytes hash on the way; returns the file's name (not yet in the catalog)."""
    copy = blob.copies[tier_name]
    if not isinstance(copy, PackCopy):
        raise IntegrityError(f"the copy of instance {blob.sop} on {tier_name} is not in a pack")
    name = os.urandom(16).hex()
    source = pack.Slice(fp, copy.offset, copy.length)
    digest, size = xxhash.xxh3_128(), 0
    with archive.hot.create(name) as dst:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
            dst.write(chunk)
        if (size, digest.digest()) != (blob.sealed_size, blob.xxh3):
            raise IntegrityError(f"the copy of instance {blob.sop} on {tier_name} does not verify")
    return name


def _record_hot_copies(archive: "Archive", study_uid: str, restored: dict[bytes, str]) -> None:
    for name in archive.catalog.record_recalled(study_uid, archive.hot.name, restored, int(time.time())):
        archive.hot.delete(name)


def forget_pack(archive: "Archive", pack_id: str) -> None:
    """Drop a pack nothing refers to any more: from the index, then from its tier (a tier that
    cannot be reached now keeps an unindexed object; nothing reads it)."""
    record = archive.catalog.forget_pack(pack_id)
    if record is not None:
        delete_packs(archive, {pack_id: (record.tier, record.where)})


def delete_packs(archive: "Archive", packs: dict[str, tuple[str, str]]) -> list[dict]:
    """Delete packs (id -> (tier, where: cartridge label or "")) from their tiers; return those
    that could not be removed now: {tier, pack, where, error}."""
    unremoved = []
    for pack_id, (tier, where) in packs.items():
        try:
            archive.tier(tier).delete(pack_id)
        except (TierUnavailable, OSError) as exc:
            unremoved.append({"tier": tier, "pack": pack_id, "where": where, "error": str(exc)})
    return unremoved
