"""The catalog's instance records: patients, studies, series, instances and their versions
(blobs), with the secondary keys C-FIND plans with, kept in step. Run inside one index
transaction (`Txn`); only the catalog calls them."""

from __future__ import annotations

import time

from appliance.format.p10 import InstanceInfo
from appliance.store.index import SECONDARY, Txn, patient_key, secondary_key


def read_counters(t: Txn) -> dict:
    return t.get("meta", b"counters") or {"instances": 0, "versions": 0, "received_bytes": 0, "stored_bytes": 0}


def _add_secondary(t: Txn, field: str, value: str, study_uid: str) -> None:
    key = secondary_key(field, value)
    if key:  # LMDB has no empty keys; a name of empty components ("^^") is found by scanning
        t.dup_add(SECONDARY[field], key, study_uid)


def _remove_secondary(t: Txn, field: str, value: str, study_uid: str) -> None:
    key = secondary_key(field, value)
    if key:
        t.dup_remove(SECONDARY[field], key, study_uid)


def record_instance(t: Txn, info: InstanceInfo, blob: dict, tier: str, source: str = "import") -> str:
    """Index one sealed instance. Returns "stored", "new_version" or "duplicate".

    "duplicate": the same bytes are indexed already, the caller's blob is surplus.
    A new version of an existing SOP Instance UID becomes current; previous
    versions stay listed (and their blobs kept) until retention removes them.
    """
    ca = info.content_address
    if t.get("blobs", ca) is not None:
        return "duplicate"
    now = int(time.time())
    t.put("blobs", ca, {**blob, "sop": info.sop_uid, "size": info.length, "stored": now,
                        "copies": {tier: {"name": blob["name"], "verified": now}}})
    counters = read_counters(t)
    counters["versions"] += 1
    counters["received_bytes"] += info.length
    counters["stored_bytes"] += blob["sealed_size"]

    previous = t.get("instances", info.sop_uid)
    outcome = "stored"
    versions = [ca]
    if previous is not None:
        outcome = "new_version"
        versions = previous["versions"] + [ca]
        if (previous["study"], previous["series"]) != (info.study_uid, info.series_uid):
            _unlink_instance(t, info.sop_uid, previous)
            previous = None
    t.put("instances", info.sop_uid, {**info.instance, "study": info.study_uid, "series": info.series_uid,
                                      "transfer_syntax": info.transfer_syntax,
                                      "charset": info.specific_character_set, "current": ca,
                                      "versions": versions})
    study = t.get("studies", info.study_uid)
    if previous is None:
        counters["instances"] += 1
        study = _link_instance(t, info, study)
    study["received_bytes"] += info.length
    study["stored_bytes"] += blob["sealed_size"]
    study["last_stored"] = now
    if source not in study.setdefault("source_aes", []):
        study["source_aes"].append(source)
    t.put("studies", info.study_uid, study)
    t.put("meta", b"counters", counters)
    return outcome


def _link_instance(t: Txn, info: InstanceInfo, study: dict | None) -> dict:
    """Hang a new instance under its series, study and patient, creating them as needed."""
    study_uid, series_uid = info.study_uid, info.series_uid
    if study is None:
        pkey = patient_key(info.patient)
        patient = t.get("patients", pkey) or {**info.patient, "studies": 0}
        patient["studies"] += 1
        t.put("patients", pkey, patient)
        t.dup_add("patient_studies", pkey, study_uid)
        study = {**info.study, "patient": pkey, "series": 0, "instances": 0, "modalities": [],
                 "sop_classes": [], "received_bytes": 0, "stored_bytes": 0, "first_stored": int(time.time())}
        for field in ("PatientID", "PatientName"):
            _add_secondary(t, field, info.patient.get(field, ""), study_uid)
        for field in ("StudyDate", "AccessionNumber"):
            _add_secondary(t, field, info.study.get(field, ""), study_uid)
    series = t.get("series", series_uid)
    if series is None:
        series = {**info.series, "study": study_uid, "instances": 0}
        study["series"] += 1
        t.dup_add("study_series", study_uid, series_uid)
        modality = info.series.get("Modality", "")
        if modality and modality not in study["modalities"]:
            study["modalities"].append(modality)
            _add_secondary(t, "Modality", modality, study_uid)
    series["instances"] += 1
    t.put("series", series_uid, series)
    t.dup_add("series_instances", series_uid, info.sop_uid)
    study["instances"] += 1
    sop_class = info.instance.get("SOPClassUID", "")
    if sop_class and sop_class not in study["sop_classes"]:
        study["sop_classes"].append(sop_class)
    return study


def _unlink_instance(t: Txn, sop_uid: str, record: dict) -> None:
    """Take an instance out of its series (a new version moved it elsewhere)."""
    t.dup_remove("series_instances", record["series"], sop_uid)
    series = t.get("series", record["series"])
    series["instances"] -= 1
    t.put("series", record["series"], series)
    study = t.get("studies", record["study"])
    study["instances"] -= 1
    t.put("studies", record["study"], study)
    counters = read_counters(t)
    counters["instances"] -= 1
    t.put("meta", b"counters", counters)


def drop_version(t: Txn, sop_uid: str, ca: bytes) -> dict:
    """Forget a previous (not current) version of an instance; return its copies."""
    blob = t.get("blobs", ca)
    instance = t.get("instances", sop_uid)
    if instance["current"] == ca:
        raise ValueError("the current version cannot be dropped")
    instance["versions"].remove(ca)
    t.put("instances", sop_uid, instance)
    t.delete("blobs", ca)
    counters = read_counters(t)
    counters["versions"] -= 1
    counters["received_bytes"] -= blob["size"]
    counters["stored_bytes"] -= blob["sealed_size"]
    t.put("meta", b"counters", counters)
    return blob["copies"]


def study_key_ids(t: Txn, study_uid: str) -> list[bytes]:
    """Every data key a study's blobs are sealed under, and the study's own."""
    key_ids = {blob["key_id"] for _, blob in study_blobs(t, study_uid)}
    own = t.get("study_keys", study_uid)
    if own is not None:
        key_ids.add(own)
    return sorted(key_ids)


def remove_study(t: Txn, study_uid: str) -> tuple[dict[bytes, dict], dict[str, dict]]:
    """Drop a study and everything under it from the index; return ({content address: copies},
    {pack id: pack record}) so the caller can delete every copy (its keys: study_key_ids,
    destroyed before this). Versions of the study's instances that were stored under other
    studies go with it."""
    study = t.get("studies", study_uid)
    if study is None:
        return {}, {}
    packs = {}
    for pack_ids in study.get("packs", {}).values():
        for pack_id in pack_ids:
            record = t.get("packs", pack_id)
            if record is not None:
                packs[pack_id] = record
                t.delete("packs", pack_id)
    blobs: dict[bytes, dict] = {}
    counters = read_counters(t)
    for series_uid in t.dup_values("study_series", study_uid):
        series = t.get("series", series_uid)
        for sop_uid in t.dup_values("series_instances", series_uid):
            instance = t.get("instances", sop_uid)
            for ca in instance["versions"]:
                blob = t.get("blobs", ca)
                if blob is None:
                    continue
                blobs[ca] = blob["copies"]
                counters["versions"] -= 1
                counters["received_bytes"] -= blob["size"]
                counters["stored_bytes"] -= blob["sealed_size"]
                t.delete("blobs", ca)
            t.delete("instances", sop_uid)
            counters["instances"] -= 1
        t.dup_clear("series_instances", series_uid)
        t.delete("series", series_uid)
        _remove_secondary(t, "Modality", series.get("Modality", ""), study_uid)
    t.dup_clear("study_series", study_uid)
    pkey = study["patient"]
    patient = t.get("patients", pkey)
    if patient is not None:
        _remove_secondary(t, "PatientID", patient.get("PatientID", ""), study_uid)
        _remove_secondary(t, "PatientName", patient.get("PatientName", ""), study_uid)
        patient["studies"] -= 1
        if patient["studies"] <= 0:
            t.delete("patients", pkey)
        else:
            t.put("patients", pkey, patient)
        t.dup_remove("patient_studies", pkey, study_uid)
    for field in ("StudyDate", "AccessionNumber"):
        _remove_secondary(t, field, study.get(field, ""), study_uid)
    if t.get("study_keys", study_uid) is not None:
        t.delete("study_keys", study_uid)
    t.delete("studies", study_uid)
    t.put("meta", b"counters", counters)
    return blobs, packs


def study_blobs(t: Txn, study_uid: str) -> list[tuple[bytes, dict]]:
    """Every stored version (current and previous) of every instance of a study."""
    out = []
    for series_uid in t.dup_values("study_series", study_uid):
        for sop_uid in t.dup_values("series_instances", series_uid):
            for ca in t.get("instances", sop_uid)["versions"]:
                blob = t.get("blobs", ca)
                if blob is not None:
                    out.append((ca, blob))
    return out


