"""Behaviour layered on any backend: retries with backoff, and a bandwidth cap.

Both take their clock and sleep as arguments so tests drive them without waiting. Each
holds the backend it wraps as `inner` (what base.unwrap walks).
"""

from __future__ import annotations

import builtins
import io
import threading
import time
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from appliance.errors import CartridgeOffline, TierUnavailable


class RetryingBackend:
    """Retries calls that failed with TierUnavailable, waiting base, 2*base, 4*base ... seconds.

    A cartridge that is not loaded is not retried: only a person can fix that."""

    def __init__(self, inner, retries: int, *, base_delay: float = 0.5, sleep: Callable[[float], None] = time.sleep):
        self.inner, self.name = inner, inner.name
        self._retries, self._base, self._sleep = retries, base_delay, sleep

    def _call(self, fn, *args):
        for attempt in range(self._retries + 1):
            try:
                return fn(*args)
            except CartridgeOffline:
                raise
            except TierUnavailable:
                if attempt == self._retries:
                    raise
                self._sleep(self._base * 2 ** attempt)

    def put(self, name: str, src: BinaryIO) -> None:
        start = src.tell()

        def attempt():
            src.seek(start)
            self.inner.put(name, src)
        self._call(attempt)

    def open(self, name: str) -> BinaryIO:
        return self._call(self.inner.open, name)

    def size(self, name: str) -> int:
        return self._call(self.inner.size, name)

    def delete(self, name: str) -> None:
        self._call(self.inner.delete, name)

    def list(self) -> Iterator[str]:
        return iter(self._call(lambda: list(self.inner.list())))

    def read_order(self, names: Iterable[str]) -> builtins.list[str]:
        return self.inner.read_order(names)

    def locate(self, name: str) -> str:
        return self.inner.locate(name)

    def check(self) -> None:
        self.inner.check()


class TokenBucket:
    """At most `rate` bytes per second on average, bursts up to one second's worth.
    Shared by threads: each waits for its own share."""

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate, self._clock, self._sleep = float(rate), clock, sleep
        self._tokens = self.rate
        self._last = clock()
        self._lock = threading.Lock()

    def take(self, amount: int) -> None:
        """Account for `amount` bytes, sleeping first as long as the rate requires."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= amount
            wait = -self._tokens / self.rate if self._tokens < 0 else 0
        if wait:
            self._sleep(wait)


class Throttled(io.RawIOBase):
    """A reader whose bytes are paid for from a TokenBucket. `owns_raw`: closing it closes `raw`
    (a file it opened); a file it was handed stays open, for the caller's retry."""

    def __init__(self, raw: BinaryIO, bucket: TokenBucket, *, owns_raw: bool = True):
        self._raw: Any = raw  # a raw binary stream: it has readinto
        self._bucket, self._owns_raw = bucket, owns_raw

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._raw.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def readinto(self, buffer) -> int:
        count = self._raw.readinto(buffer)
        if count:
            self._bucket.take(count)
        return count

    def close(self) -> None:
        if self._owns_raw:
            self._raw.close()
        super().close()


class RateLimitedBackend:
    """Caps the bytes read from and written to a tier (one bucket shared by both)."""

    def __init__(self, inner, bytes_per_second: float, *, bucket: TokenBucket | None = None):
        self.inner, self.name = inner, inner.name
        self.bucket = bucket or TokenBucket(bytes_per_second)

    def put(self, name: str, src: BinaryIO) -> None:
        self.inner.put(name, io.BufferedReader(Throttled(src, self.bucket, owns_raw=False), 1 << 20))

    def open(self, name: str) -> BinaryIO:
        return io.BufferedReader(Throttled(self.inner.open(name), self.bucket), 1 << 20)

    def size(self, name: str) -> int:
        return self.inner.size(name)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def list(self) -> Iterator[str]:
        return self.inner.list()

    def read_order(self, names: Iterable[str]) -> builtins.list[str]:
        return self.inner.read_order(names)

    def locate(self, name: str) -> str:
        return self.inner.locate(name)

    def check(self) -> None:
        self.inner.check()
