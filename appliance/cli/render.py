"""What commands show people: progress for long-running commands (a bar on a TTY, structured
log lines otherwise), in the units of appliance.human.

Log lines are JSON objects, one per line, on stderr:
    {"ts": "2026-11-24T15:04:05Z", "event": "import.stored", ...}
"""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, what: str, total_items: int, total_bytes: int, stream: TextIO | None = None,
                 unit: str = "files"):
        self._stream = stream or sys.stderr
        self._unit = unit
        self._tty = self._stream.isatty()
        self._what, self._total_items, self._total_bytes = what, total_items, total_bytes
        self._items = self._bytes = 0
        self._start = time.monotonic()
        self._last_draw = 0.0

    def event(self, event: str, **fields) -> None:
        """A structured log line (not shown on a TTY, where the bar stands for it)."""
        if not self._tty:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self._stream.write(json.dumps({"ts": stamp, "event": event, **fields}) + "\n")
            self._stream.flush()

    def set_total(self, items: int, nbytes: int) -> None:
        self._total_items, self._total_bytes = items, nbytes

    def advance(self, nbytes: int) -> None:
        self._items += 1
        self._bytes += nbytes
        now = time.monotonic()
        if self._tty and (now - self._last_draw > 0.1 or self._items == self._total_items):
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-6)
        rate = self._bytes / elapsed
        share = self._bytes / self._total_bytes if self._total_bytes else 1.0
        eta = (self._total_bytes - self._bytes) / rate if rate else 0
        bar = "#" * int(share * 30)
        self._stream.write(f"\r{self._what} [{bar:<30}] {self._items}/{self._total_items} {self._unit} "
                           f"{self._bytes / 1e6:,.1f}/{self._total_bytes / 1e6:,.1f} MB "
                           f"{rate / 1e6:,.1f} MB/s ETA {eta:,.0f}s ")
        self._stream.flush()

    def close(self) -> None:
        if self._tty and self._items:
            self._stream.write("\n")
            self._stream.flush()
