"""Who gets an association slot.

Only accepted associations hold slots: a connection that has not yet sent a complete
A-ASSOCIATE-RQ costs a descriptor in the server's lobby and nothing else (server.py).
Slots are limited in all, per calling AE title and per source address, so that one
misbehaving peer cannot take every slot. Refusals reach the audit trail through
appliance.audit.refusals.
"""

from __future__ import annotations

import threading
from collections import Counter


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
