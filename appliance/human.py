"""Numbers and times for people: the one byte formatter and the one time formatter that every
command, report line and page uses."""

from __future__ import annotations

import time


def human_bytes(count: float) -> str:
    """Bytes for people: "16.8 MB", "1.2 TB"; below a megabyte still in MB ("0.26 MB")."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count / 1e6:,.2f} MB"


def local_time(ts: float, *, date_only: bool = False) -> str:
    """A moment in the machine's local time: "2026-12-07 14:05" (or "2026-12-07")."""
    return time.strftime("%Y-%m-%d" if date_only else "%Y-%m-%d %H:%M", time.localtime(ts))
