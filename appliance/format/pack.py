"""Packs: how a study's sealed blobs live on a cold tier (tape, object storage, any disk).

A pack is readable and verifiable on its own, without the index:

    sealed blob 0 | sealed blob 1 | ... | sealed trailer | footer (48 bytes)

    footer   offset size field
             0      8    magic "PVPACK\\r\\n"
             8      4    format version (big-endian u32), 1
             12     4    number of blobs
             16     8    trailer offset
             24     8    trailer length
             32     16   xxh3-128 of every byte before the footer

The blobs are the very bytes of the hot copies (sealed.py), so each one keeps its
own authentication. The trailer is a sealed blob too, under the study's data key:
its plaintext is msgpack {"version": 1, "study": StudyInstanceUID, "entries":
[{"ca", "offset", "length", "xxh3", "sop"}]} and its content address is the
SHA-256 of that plaintext. So:

- key-less check: the footer's xxh3 covers blobs and trailer; the index also keeps
  the xxh3-128 of the whole pack and of every blob in it;
- with the key: the trailer says which instance each blob holds, and every blob
  decrypts and re-hashes to its content address; the index can be rebuilt from packs;
- once the study's key is destroyed, the trailer is as unreadable as the blobs.

Pack names are random ids: no UID, name or plaintext hash is visible on the tier.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, NamedTuple

import msgpack
import xxhash

from appliance.errors import IntegrityError
from appliance.format import sealed

MAGIC = b"PVPACK\r\n"
VERSION = 1
FOOTER = struct.Struct(">8sIIQQ16s")
FOOTER_SIZE = FOOTER.size  # 48
_COPY = 1 << 20


@dataclass(frozen=True)
class PackEntry:
    ca: bytes
    offset: int
    length: int
    xxh3: bytes
    sop: str


@dataclass(frozen=True)
class PackInfo:
    size: int
    xxh3: bytes  # of the whole pack, footer included
    entries: list[PackEntry]


class _HashingWriter:
    def __init__(self, dst: BinaryIO):
        self.dst, self.size, self.xxh = dst, 0, xxhash.xxh3_128()

    def write(self, data) -> int:
        self.dst.write(data)
        self.xxh.update(data)
        self.size += len(data)
        return len(data)


class PackSource(NamedTuple):
    """A sealed blob to put in a pack: what it must read as, and how to open its copy."""

    ca: bytes
    sealed_size: int
    xxh3: bytes
    sop: str
    opener: Callable[[], BinaryIO]


def write_pack(dst: BinaryIO, blobs: Iterable[PackSource], *, study_uid: str, data_key: bytes,
               key_id: bytes) -> PackInfo:
    """Write a pack of sealed blobs.

    Every copied blob is checked against its size and sealed-bytes hash on the way:
    a rotten source copy fails the pack instead of being archived."""
    out = _HashingWriter(dst)
    entries = []
    for source in blobs:
        start, blob_hash = out.size, xxhash.xxh3_128()
        with source.opener() as src:
            while chunk := src.read(_COPY):
                blob_hash.update(chunk)
                out.write(chunk)
        length = out.size - start
        if length != source.sealed_size or blob_hash.digest() != source.xxh3:
            raise IntegrityError(f"the source copy of instance {source.sop} does not verify; not packed")
        entries.append(PackEntry(source.ca, start, length, source.xxh3, source.sop))
    plaintext = msgpack.packb({"version": VERSION, "study": study_uid,
                               "entries": [{"ca": e.ca, "offset": e.offset, "length": e.length,
                                            "xxh3": e.xxh3, "sop": e.sop} for e in entries]})
    trailer_offset = out.size
    sealed.seal_bytes(plaintext, out, data_key=data_key, key_id=key_id)
    trailer_length = out.size - trailer_offset
    body_hash = out.xxh.digest()
    out.write(FOOTER.pack(MAGIC, VERSION, len(entries), trailer_offset, trailer_length, body_hash))
    return PackInfo(out.size, out.xxh.digest(), entries)


@dataclass(frozen=True)
class Footer:
    count: int
    trailer_offset: int
    trailer_length: int
    body_xxh3: bytes


def read_footer(fp: BinaryIO) -> Footer:
    size = fp.seek(0, os.SEEK_END)
    if size < FOOTER_SIZE:
        raise IntegrityError("pack is too short to hold a footer")
    fp.seek(size - FOOTER_SIZE)
    magic, version, count, offset, length, body = FOOTER.unpack(fp.read(FOOTER_SIZE))
    if magic != MAGIC:
        raise IntegrityError("not a pack (bad footer magic)")
    if version != VERSION:
        raise IntegrityError(f"pack format version {version} is not supported")
    if offset + length != size - FOOTER_SIZE:
        raise IntegrityError("pack footer does not match the pack's size (truncated or extended)")
    return Footer(count, offset, length, body)


def verify_keyless(fp: BinaryIO) -> tuple[int, bytes]:
    """Check a pack on its own without a key (footer and its body hash); return (size, xxh3 of all)."""
    footer = read_footer(fp)
    fp.seek(0)
    whole, body = xxhash.xxh3_128(), xxhash.xxh3_128()
    remaining, size = footer.trailer_offset + footer.trailer_length, 0
    while chunk := fp.read(_COPY):
        whole.update(chunk)
        if remaining > 0:
            body.update(chunk[:remaining])
            remaining -= len(chunk)
        size += len(chunk)
    if body.digest() != footer.body_xxh3:
        raise IntegrityError("pack bytes do not match the hash in its footer")
    return size, whole.digest()


def read_trailer(fp: BinaryIO, key_for: Callable[[bytes], bytes]) -> tuple[str, list[PackEntry]]:
    """(StudyInstanceUID, entries) from the sealed trailer; raises KeyMissing once the study is shredded."""
    footer = read_footer(fp)
    _, _, chunks = sealed.open_sealed(Slice(fp, footer.trailer_offset, footer.trailer_length), key_for)
    try:
        trailer = msgpack.unpackb(b"".join(chunks))
        entries = [PackEntry(e["ca"], e["offset"], e["length"], e["xxh3"], e["sop"]) for e in trailer["entries"]]
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"pack trailer is not readable: {exc}") from None
    if len(entries) != footer.count:
        raise IntegrityError("pack trailer and footer disagree on the number of blobs")
    return trailer["study"], entries


class Slice(io.RawIOBase):
    """A read-only view of `length` bytes at `offset` of a seekable file: one blob of a pack."""

    def __init__(self, fp: BinaryIO, offset: int, length: int):
        self._fp, self._start, self._length, self._pos = fp, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(0, base + offset), self._length)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        want = min(len(buffer), self._length - self._pos)
        if want <= 0:
            return 0
        self._fp.seek(self._start + self._pos)
        data = self._fp.read(want)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)
