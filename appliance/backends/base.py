"""The backend contract every tier implements.

A backend stores opaque, immutable objects (sealed blobs on the hot tier, packs on
cold tiers) under names it is given: lower-case hex, never a UID or a plaintext hash.

- `put(name, src)` is an atomic put from a readable, seekable binary file: the object
  appears whole under `name` and durable when it returns; on an exception nothing
  new is visible under `name`. Putting a name that exists replaces it atomically.
- `open(name)` returns a readable, seekable binary file; it may be called any number
  of times (idempotent get).
- `size(name)` is the stat: the stored size in bytes.
- `delete(name)` is idempotent: deleting a missing object is not an error.
- `list()` yields every stored name exactly once, in no particular order.
- `read_order(names)` returns the names in the order that reads them fastest
  (on-tape position for tape; unchanged elsewhere).
- `locate(name)` says where the object is in words a person can act on (the
  cartridge label on tape), or "" when the tier is one place.

Failures look the same on every backend:
- not found: `BlobMissing` from open/size;
- retry later: `TierUnavailable` (server down, timeout, throttled, restore pending),
  or its subclass `CartridgeOffline` naming the cartridge to load;
- full: `OutOfSpace`; anything else is a bug or a broken medium and propagates.
Retries with backoff and rate limiting are wrappers (wrappers.py), not code in backends.
"""

from __future__ import annotations

from typing import BinaryIO, Iterable, Iterator, Protocol


class Backend(Protocol):
    name: str

    def put(self, name: str, src: BinaryIO) -> None: ...

    def open(self, name: str) -> BinaryIO: ...

    def size(self, name: str) -> int: ...

    def delete(self, name: str) -> None: ...

    def list(self) -> Iterator[str]: ...

    def read_order(self, names: Iterable[str]) -> list[str]: ...

    def locate(self, name: str) -> str: ...
