"""Instance metadata kept for the next request: viewers ask for a study's metadata each time
they open it, and computing it means unsealing every instance and parsing its header.

Entries are the DICOM JSON bytes of one instance, keyed by the content address of the
stored version and the base URL its BulkDataURIs were written for. A stored version never
changes (another version has another address), so an entry is never stale and nothing has
to invalidate it. The entries are in memory only, bounded in bytes, least recently used
first out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class MetadataCache:
    def __init__(self, max_bytes: int):
        self._max = max_bytes
        self._entries: OrderedDict[tuple[bytes, str], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, content_address: bytes, base: str) -> bytes | None:
        with self._lock:
            value = self._entries.get((content_address, base))
            if value is not None:
                self._entries.move_to_end((content_address, base))
            return value

    def put(self, content_address: bytes, base: str, value: bytes) -> None:
        if len(value) > self._max:
            return
        with self._lock:
            old = self._entries.pop((content_address, base), None)
            self._bytes += len(value) - (len(old) if old is not None else 0)
            self._entries[(content_address, base)] = value
            while self._bytes > self._max:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= len(evicted)

    @property
    def size(self) -> int:
        """The bytes held."""
        with self._lock:
            return self._bytes
