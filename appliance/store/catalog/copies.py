"""The catalog's copies: packs on cold tiers and the copies of each version on every tier.
Run inside one index transaction (`Txn`); only the catalog calls them."""

from __future__ import annotations

from appliance.store.catalog.instances import study_blobs
from appliance.store.index import Txn


def add_pack(t: Txn, pack_id: str, record: dict, entries: list) -> None:
    """Record a written and verified pack and the cold copies it holds."""
    t.put("packs", pack_id, record)
    for entry in entries:
        blob = t.get("blobs", entry.ca)
        if blob is None:
            continue  # the version was dropped meanwhile; the pack's copy of it is surplus
        blob["copies"][record["tier"]] = {"pack": pack_id, "offset": entry.offset, "length": entry.length,
                                          "verified": record["verified"]}
        t.put("blobs", entry.ca, blob)
    study = t.get("studies", record["study"])
    if study is not None:
        listed = study.setdefault("packs", {}).setdefault(record["tier"], [])
        if pack_id not in listed:  # recorded again (fsck, a repeated apply): listed once
            listed.append(pack_id)
        t.put("studies", record["study"], study)


def drop_tier_copies(t: Txn, study_uid: str, tier: str) -> list[str]:
    """Forget a study's copies on `tier`; return their object names. Refuses (ValueError) to
    drop a copy that is the last one of its version."""
    names = []
    for ca, blob in study_blobs(t, study_uid):
        copy = blob["copies"].get(tier)
        if copy is None:
            continue
        if len(blob["copies"]) < 2:
            raise ValueError(f"the copy on {tier} of instance {blob['sop']} is its only copy")
        del blob["copies"][tier]
        t.put("blobs", ca, blob)
        names.append(copy["name"])
    return names
