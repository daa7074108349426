"""The hash chain (pure): canonical JSON lines, each carrying the SHA-256 of the one before."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Iterable

GENESIS = "0" * 64


def canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def link(line: bytes) -> str:
    """The hash the next record carries as `prev`: SHA-256 of the line, newline included."""
    return hashlib.sha256(line).hexdigest()


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def chain(entries: Iterable[dict], seq: int, prev: str, now: float) -> tuple[list[bytes], int, str]:
    """Lines for `entries` continuing a chain whose last record is (seq, hash prev)."""
    lines = []
    for entry in entries:
        seq += 1
        line = canonical({"seq": seq, "time": utc(now), "prev": prev} | entry) + b"\n"
        prev = link(line)
        lines.append(line)
    return lines, seq, prev


def parse_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
