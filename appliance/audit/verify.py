"""Checking a trail (pure): every edit, deletion, insertion, reordering or cut tail, named."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable

from appliance.audit.chain import GENESIS, link
from appliance.audit.signing import checkpoint_signed


@dataclass
class Verification:
    records: int = 0
    last_seq: int = 0
    checkpoints: int = 0
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"intact": self.intact, "records": self.records, "last_seq": self.last_seq,
                "checkpoints": self.checkpoints, "keys": self.keys, "problems": self.problems}


def verify(lines: Iterable[tuple[str, bytes]], head: dict | None, checkpoints: Iterable[bytes],
           pinned: Iterable[str] = (), offsite: dict | None = None) -> Verification:
    """Check a trail: `lines` = (where, line bytes incl. newline) in order; `head` the signed
    head; `checkpoints` the lines of checkpoints.log; `pinned` public keys the auditor trusts;
    `offsite` the signed head of the trail in the latest off-site copy (the local trail must
    still hold what it signed). Every problem names the record (seq) or line it is about."""
    result = Verification()
    wanted: dict[int, list[dict]] = {}
    parsed_checkpoints = []
    for number, raw in enumerate(checkpoints, 1):
        try:
            cp = json.loads(raw)
            wanted.setdefault(int(cp["seq"]), []).append(cp)
            parsed_checkpoints.append(cp)
        except (ValueError, KeyError, TypeError):
            result.problems.append(f"checkpoint line {number}: not a checkpoint (edited or damaged)")
    if head is not None:
        try:
            wanted.setdefault(int(head["seq"]), []).append(head)
        except (KeyError, ValueError, TypeError):
            result.problems.append("the signed head is not a checkpoint (edited or damaged)")
            head = None
    if offsite is not None:
        wanted.setdefault(int(offsite["seq"]), []).append(offsite)
    hashes: dict[int, str] = {}
    expected, prev = 1, GENESIS
    for where, line in lines:
        result.records += 1
        try:
            record = json.loads(line)
            seq, record_prev = int(record["seq"]), record["prev"]
            if not line.endswith(b"\n"):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            result.problems.append(f"{where}: not a whole record (edited, damaged or cut off) after record "
                                   f"{expected - 1}")
            prev, expected = link(line), expected + 1
            continue
        if seq > expected:
            result.problems.append(f"records {expected} to {seq - 1} are missing (deleted) before record {seq}")
        elif seq < expected:
            result.problems.append(f"record {seq} appears after record {expected - 1}: reordered or inserted")
        elif record_prev != prev:
            result.problems.append(f"record {seq} does not link to record {seq - 1}: one of them was edited, "
                                   "or a record was inserted")
        announced = record.get("detail", {}).get("audit_key") if isinstance(record, dict) else None
        if announced and announced not in result.keys:
            result.keys.append(announced)
        prev, expected = link(line), seq + 1
        result.last_seq = seq
        if seq in wanted:
            hashes[seq] = prev
    # Pinned keys, when given, are the only ones trusted (after a restore, pin the old and the new key);
    # otherwise every key a record announces.
    pins = set(pinned)
    trusted = pins or set(result.keys)
    if pins and not pins & set(result.keys):
        result.problems.append("no record announces the pinned public key: the trail was signed by another key")
    named = [(f"the checkpoint at record {cp['seq']}", cp) for cp in parsed_checkpoints]
    named += [("the signed head", head)] if head is not None else []
    named += [(f"the off-site copy's head (record {offsite['seq']})", offsite)] if offsite is not None else []
    for name, cp in named:
        if not checkpoint_signed(cp):
            result.problems.append(f"{name}: bad signature (edited or forged)")
        elif cp["key"] not in trusted:
            result.problems.append(f"{name}: signed by a key {'not pinned' if pins else 'no record announces'}")
        elif cp["seq"] > result.last_seq:
            result.problems.append(f"{name} covers records up to {cp['seq']} but the trail ends at "
                                   f"{result.last_seq}: records {result.last_seq + 1} to {cp['seq']} were removed")
        elif hashes.get(cp["seq"]) != cp["hash"]:
            result.problems.append(f"{name}: record {cp['seq']} is not the record that was signed (edited)")
    result.checkpoints = len(parsed_checkpoints)
    if head is None:
        result.problems.append("the signed head is missing: the end of the trail cannot be checked")
    elif isinstance(head.get("seq"), int) and head["seq"] < result.last_seq:
        result.problems.append(f"records {head['seq'] + 1} to {result.last_seq} come after the signed head: "
                               "added without the audit key (or by a writer killed before signing)")
    seqs = [cp["seq"] for cp in parsed_checkpoints if isinstance(cp.get("seq"), int)]
    if seqs != sorted(seqs):
        result.problems.append("the checkpoints are out of order")
    return result
