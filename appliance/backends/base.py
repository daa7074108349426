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
- `check()` is the cheapest call that proves the tier can be reached now (a stat, one
  request); it raises what the other calls would. Wrappers never retry it: it answers
  "now", for `appliance status`.

Failures look the same on every backend:
- not found: `BlobMissing` from open/size;
- retry later: `TierUnavailable` (server down, timeout, throttled, restore pending),
  or its subclass `CartridgeOffline` naming the cartridge to load;
- full: `OutOfSpace`; anything else is a bug or a broken medium and propagates.
Retries with backoff and rate limiting are wrappers (wrappers.py), not code in backends.
A wrapper holds the backend it wraps as `inner`; `unwrap(backend, LtfsBackend)` finds the
concrete backend under any stack of wrappers (restic's AsBackend), and nothing else reaches
through a wrapper.
"""

from __future__ import annotations

import builtins
from typing import BinaryIO, Iterable, Iterator, Protocol, TypeVar


class Backend(Protocol):
    name: str

    def put(self, name: str, src: BinaryIO) -> None: ...

    def open(self, name: str) -> BinaryIO: ...

    def size(self, name: str) -> int: ...

    def delete(self, name: str) -> None: ...

    def list(self) -> Iterator[str]: ...

    def read_order(self, names: Iterable[str]) -> builtins.list[str]: ...

    def locate(self, name: str) -> str: ...

    def check(self) -> None: ...


B = TypeVar("B")


def unwrap(backend, kind: type[B]) -> B:
    """The `kind` backend under any stack of wrappers; TypeError when there is none."""
    layer = backend
    while not isinstance(layer, kind):
        layer = getattr(layer, "inner", None)
        if layer is None:
            raise TypeError(f"no {kind.__name__} under {type(backend).__name__}")
    return layer
