"""Who gets an association slot, and how refusals reach the audit trail without flooding it.

Only accepted associations hold slots: a connection that has not yet sent a complete
A-ASSOCIATE-RQ costs a descriptor in the server's lobby and nothing else (server.py).
Slots are limited in all, per calling AE title and per source address, so that one
misbehaving peer cannot take every slot. Refused associations and dropped connections
are audited one record per source address and reason per interval: the first at once,
the rest counted into one summary record when the interval ends.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from appliance.audit.chain import utc
from appliance.audit.events import EventID, EventType, event


class Admission:
    """Association slots: in all, per calling AE title, per source address. Thread-safe."""

    def __init__(self, total: int, per_ae: int, per_address: int):
        self._limits = (total, per_ae, per_address)
        self._lock = threading.Lock()
        self._total = 0
        self._by_ae: Counter = Counter()
        self._by_address: Counter = Counter()

    def admit(self, ae_title: str, address: str) -> str:
        """Take a slot; "" when taken, else why not (the association is refused)."""
        total, per_ae, per_address = self._limits
        with self._lock:
            if self._total >= total:
                return "every association slot is taken"
            if self._by_ae[ae_title] >= per_ae:
                return "the calling AE holds as many associations as it may"
            if self._by_address[address] >= per_address:
                return "this address holds as many associations as it may"
            self._total += 1
            self._by_ae[ae_title] += 1
            self._by_address[address] += 1
            return ""

    def release(self, ae_title: str, address: str) -> None:
        with self._lock:
            self._total -= 1
            self._by_ae[ae_title] -= 1
            self._by_address[address] -= 1
            if not self._by_ae[ae_title]:
                del self._by_ae[ae_title]
            if not self._by_address[address]:
                del self._by_address[address]

    @property
    def active(self) -> int:
        with self._lock:
            return self._total


@dataclass
class _Seen:
    first: float
    count: int = 0  # occurrences after the one recorded at once
    last: float = 0.0
    callers: set = field(default_factory=set)


class Refusals:
    """Refused associations and dropped connections, audited per (address, reason) and
    interval. `record(entry)` appends an audit event; `clock()` is the time."""

    def __init__(self, record: Callable[[dict], None], interval_s: float = 60.0,
                 clock: Callable[[], float] = time.time):
        self._record, self._interval, self._clock = record, interval_s, clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str, str], _Seen] = {}

    def note(self, address: str, reason: str, *, calling_ae: str = "", op: str = "association") -> bool:
        """Count one refusal; True when it was recorded at once (the first of its interval)."""
        now = self._clock()
        with self._lock:
            key = (address, reason, op)
            seen = self._seen.get(key)
            if seen is not None:
                seen.count += 1
                seen.last = now
                if len(seen.callers) < 10 and calling_ae:
                    seen.callers.add(calling_ae)
                return False
            self._seen[key] = _Seen(now)
        self._record(event(EventID.SECURITY_ALERT, type=EventType.NODE_AUTHENTICATION, op=op, outcome=4,
                           user=calling_ae or "-", host=address, reason=reason))
        return True

    def flush(self, final: bool = False) -> None:
        """Close the intervals that are over (all of them when `final`): one summary record for
        each source that was refused again in its interval."""
        now = self._clock()
        with self._lock:
            over = [(key, seen) for key, seen in self._seen.items() if final or now - seen.first >= self._interval]
            for key, _ in over:
                del self._seen[key]
        for (address, reason, op), seen in over:
            if seen.count:
                self._record(event(
                    EventID.SECURITY_ALERT, type=EventType.NODE_AUTHENTICATION, op=op, outcome=4,
                    user=",".join(sorted(seen.callers)) or "-", host=address, reason=reason, repeated=seen.count,
                    since=utc(seen.first), until=utc(seen.last)))
