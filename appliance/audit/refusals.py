"""Refusals reach the audit trail without flooding it: refused associations, dropped
connections (the DICOM front) and refused requests (the DICOMweb front) are audited one
record per source address and reason per interval: the first at once, the rest counted
into one summary record when the interval ends."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from appliance.audit.chain import utc
from appliance.audit.events import EventID, EventType, event


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
