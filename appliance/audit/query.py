"""Reading records for people (pure): which are about a patient, study or AE; who did what."""

from __future__ import annotations

import json


def matches(record: dict, *, patient: str = "", study: str = "", ae: str = "", since: str = "") -> bool:
    """Whether a record is about this patient / study / AE (any that are given), at or after `since`."""
    if since and record["time"] < since:
        return False
    keys = record.get("detail", {}).get("keys", {})
    if patient and patient not in (record.get("patient"), keys.get("PatientID")):
        return False
    if study and study != record.get("study") and study not in str(keys.get("StudyInstanceUID", "")).split("\\"):
        return False
    if ae and ae not in (record.get("user"), record.get("dest", "").split("@")[0]):
        return False
    return True


def access_summary(records: list[dict]) -> list[dict]:
    """Who did what: one row per (user, host, event, op) with counts and first/last time."""
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (r.get("user", ""), r.get("host", ""), r["event"], r["op"])
        row = rows.setdefault(key, {"user": key[0], "host": key[1], "event": key[2], "op": key[3], "records": 0,
                                    "instances": 0, "failures": 0, "first": r["time"], "last": r["time"]})
        row["records"] += 1
        row["instances"] += r.get("instances") or 0
        row["failures"] += bool(r.get("outcome"))
        row["last"] = r["time"]
    return sorted(rows.values(), key=lambda row: (row["user"], row["event"], row["op"]))


def describe(record: dict) -> str:
    """One line for people."""
    parts = [record["op"]]
    if record.get("instances") is not None:
        parts.append(f"{record['instances']} instances")
    if record.get("dest"):
        parts.append(f"to {record['dest']}")
    detail = record.get("detail", {})
    for name in ("reason", "line", "command", "keys", "matches", "changed"):
        if name in detail:
            value = detail[name]
            parts.append(f"{name}: {value if isinstance(value, (str, int)) else json.dumps(value)}")
    return ", ".join(parts)
