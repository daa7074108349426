"""The backend contract every tier implements.

A backend stores opaque, immutable objects under names it is given (sealed
blobs today; packs later). Rules:

- `create(name)` is an atomic put: the object appears whole under `name` when
  the context exits without an exception, and is durable by then; on an
  exception nothing appears and nothing is left behind. Creating a name that
  exists replaces it atomically (used by repair).
- `open(name)` returns a readable binary file; it may be called any number of
  times. A missing object raises `BlobMissing`, never returns an empty file.
- `size(name)` returns the stored size, `BlobMissing` when absent.
- `delete(name)` is idempotent: deleting a missing object is not an error.
- `list()` yields every stored name exactly once, in no particular order.
- A full volume raises `OutOfSpace`; other I/O errors propagate as OSError.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import BinaryIO, Iterator, Protocol


class Backend(Protocol):
    name: str

    def create(self, name: str) -> AbstractContextManager[BinaryIO]: ...

    def open(self, name: str) -> BinaryIO: ...

    def size(self, name: str) -> int: ...

    def delete(self, name: str) -> None: ...

    def list(self) -> Iterator[str]: ...
