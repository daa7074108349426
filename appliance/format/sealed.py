"""Sealed blob: what an instance looks like on any disk, tape or bucket.

Order of operations (borg's rule): hash the plaintext (the content address),
compress, encrypt. A sealed blob is a fixed 80-byte header followed by the
encrypted payload in fixed-size segments (streaming AEAD, the STREAM
construction as in Tink's AES-GCM-HKDF streaming AEAD). Format version 2 is
written as the bytes arrive, before their length or hash is known (a C-STORE
streams into it PDV by PDV); version 1, which needed both up front, is still read.

    offset  size  field
    0       8     magic 89 50 56 42 0D 0A 1A 0A ("\\x89PVB\\r\\n\\x1a\\n"; catches
                  text-mode and 7-bit transfers like PNG's signature does)
    8       1     format version: 2 (1 still read, see below)
    9       1     compression id: 0 none, 1 zstd (one frame over the whole body),
                  2 zstd over the byte-shuffled P10 bytes (see below)
    10      1     cipher id: 1 AES-256-GCM with an HKDF-SHA256 per-blob subkey
    11      1     reserved, 0
    12      16    key id: the study's data key (see keys.py)
    28      32    salt: random, HKDF salt of the per-blob subkey
    60      7     nonce prefix: random
    67      1     reserved, 0
    68      4     segment size S (big-endian u32): body bytes per segment
    72      8     version 2: 0 (the length is in the footer); version 1: the plaintext length
    80            body segment 0, 1, ... n-1, then the footer segment

    body      = zstd(P10) if compression id is 1, zstd(shuffle(P10)) if 2, else the P10
                bytes themselves (P10: the Part 10 bytes as received)
    shuffle   = per block of 1 MiB of P10 bytes (the last one shorter): the bytes at even
                offsets in the block, then those at odd offsets. 16-bit pixels become a
                plane of low bytes and a plane of high bytes: zstd then compresses CT
                several times faster and smaller (the high plane is mostly redundant, the
                noisy low plane is stored near raw at once).
    segment i = AES-256-GCM(subkey, nonce(i, 0), body[i*S:(i+1)*S], aad)
              = ciphertext || 16-byte tag; every body segment holds S bytes except the
                last, which holds 1..S; an empty body has no body segment
    footer    = AES-256-GCM(subkey, nonce(n, 1), content address (32) || plaintext length
                (big-endian u64), aad): the last 56 bytes of the blob
    subkey    = HKDF-SHA256(ikm=data key, salt=salt, info="pacs-vault blob v1" || key id)
    nonce(i, last) = nonce prefix (7) || i (big-endian u32) || last (1 byte)
    aad       = the 80 header bytes

    version 1: the payload is content address (32) || body, cut into segments of S
    bytes, the last segment (1..S bytes) with last = 1 in its nonce; no footer.

The content address (SHA-256 of the P10 bytes) is authenticated and encrypted
rather than passed as associated data: on disk it stays secret (a plain SHA-256
of an instance would identify it to anyone holding the same file), and
`fsck --rebuild-index` recovers it from the blob and the key alone. A reader that
expects a given address decrypts the footer first (its place follows from the
blob's size) and checks the address before releasing any byte; a source that
cannot seek is read in order and checked at the end.

What this buys: any changed header or body byte, a reordered, dropped,
duplicated, truncated or appended segment, a blob swapped for another one (its
content address differs) or sealed under another key fails before a single
byte is released, except that a tampered later segment of a blob larger than
one read chunk is found when it is reached (the earlier chunks have passed their
own tags). The per-blob subkey means nonces never repeat under one key, however
many blobs a study has. Memory stays bounded by a few segments whatever the size
of the instance. The xxh3-128 of all sealed bytes, kept in the index, lets any
copy be checked without a key.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

import numpy as np
import xxhash
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.errors import IntegrityError, InvalidInstance

MAGIC = b"\x89PVB\r\n\x1a\n"
VERSION = 2
READABLE_VERSIONS = (1, 2)
COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
COMPRESSION_ZSTD_SHUFFLED = 2
SHUFFLE_BLOCK = 1 << 20
CIPHER_AES256GCM_HKDF = 1
HEADER = struct.Struct(">8sBBBB16s32s7sBIQ")
HEADER_SIZE = HEADER.size  # 80
TAG_SIZE = 16
ADDRESS_SIZE = 32
FOOTER = struct.Struct(">32sQ")
FOOTER_SEGMENT_SIZE = FOOTER.size + TAG_SIZE  # 56
DEFAULT_SEGMENT_SIZE = 1 << 20
MIN_SEGMENT_SIZE = 16
READ_SIZE = 1 << 20
# Compression must save at least this share of the first 1 MiB to be kept.
MIN_COMPRESSION_GAIN = 0.05
_SUBKEY_INFO = b"pacs-vault blob v1"

assert HEADER_SIZE == 80


@dataclass(frozen=True)
class Header:
    compression: int
    key_id: bytes
    salt: bytes
    nonce_prefix: bytes
    segment_size: int
    plaintext_length: int  # version 1 only; 0 in version 2
    version: int = VERSION

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, self.version, self.compression, CIPHER_AES256GCM_HKDF, 0, self.key_id,
                           self.salt, self.nonce_prefix, 0, self.segment_size, self.plaintext_length)

    @classmethod
    def unpack(cls, raw: bytes) -> "Header":
        if len(raw) < HEADER_SIZE:
            raise IntegrityError("sealed blob is shorter than its header")
        magic, version, compression, cipher, _, key_id, salt, prefix, _, seg, length = HEADER.unpack(raw)
        if magic != MAGIC:
            raise IntegrityError("not a sealed blob (bad magic)")
        if version not in READABLE_VERSIONS:
            raise IntegrityError(f"sealed blob format version {version} is not supported")
        if cipher != CIPHER_AES256GCM_HKDF or compression not in (COMPRESSION_NONE, COMPRESSION_ZSTD,
                                                                  COMPRESSION_ZSTD_SHUFFLED):
            raise IntegrityError("sealed blob names an unknown cipher or compression")
        if seg < MIN_SEGMENT_SIZE:
            raise IntegrityError("sealed blob has an invalid segment size")
        return cls(compression, key_id, salt, prefix, seg, length, version)


@dataclass(frozen=True)
class SealResult:
    sealed_size: int
    sealed_xxh3: bytes  # xxh3-128 digest of every sealed byte, header included
    compression: int
    content_address: bytes  # SHA-256 of the plaintext
    plaintext_length: int


def _subkey(data_key: bytes, header: Header) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=header.salt, info=_SUBKEY_INFO + header.key_id)
    return AESGCM(hkdf.derive(data_key))


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    if index >= 1 << 32:
        raise IntegrityError("sealed blob has too many segments")
    return prefix + struct.pack(">IB", index, 1 if last else 0)


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # ZstdCompressor must not be shared between threads: one per thread and level.
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


class _SegmentWriter:
    """Cuts the body into segments, encrypts each, writes and hashes the sealed bytes."""

    def __init__(self, dst: BinaryIO, aead: AESGCM, header_bytes: bytes, header: Header):
        self._dst, self._aead, self._aad, self._header = dst, aead, header_bytes, header
        self._buffer = bytearray()
        self._index = 0
        self._xxh = xxhash.xxh3_128()
        self.size = 0
        self._emit_raw(header_bytes)

    def _emit_raw(self, data) -> None:
        self._dst.write(data)
        self._xxh.update(data)
        self.size += len(data)

    def _emit(self, body, last: bool) -> None:
        nonce = _nonce(self._header.nonce_prefix, self._index, last)
        self._emit_raw(self._aead.encrypt(nonce, body, self._aad))
        self._index += 1

    def write(self, data) -> None:
        seg = self._header.segment_size
        if not self._buffer and len(data) < seg:
            self._buffer += data
            return
        self._buffer += data
        full = len(self._buffer) - len(self._buffer) % seg
        if full:
            with memoryview(self._buffer) as view:
                for at in range(0, full, seg):
                    self._emit(view[at:at + seg], last=False)
            del self._buffer[:full]

    def close(self, content_address: bytes, length: int) -> bytes:
        if self._buffer:
            self._emit(bytes(self._buffer), last=False)
            self._buffer = bytearray()
        self._emit(FOOTER.pack(content_address, length), last=True)
        return self._xxh.digest()


def shuffle(block) -> bytes:
    """Even-offset bytes, then odd-offset bytes (numpy's transpose: ~7x Python's slicing)."""
    pairs = np.frombuffer(block, dtype=np.uint8, count=len(block) & ~1).reshape(-1, 2).T
    if len(block) % 2 == 0:
        return pairs.tobytes()
    return pairs[0].tobytes() + bytes(block[-1:]) + pairs[1].tobytes()


def unshuffle(data: bytes) -> bytes:
    if len(data) % 2 == 0:  # two strided copies: about twice as fast as a transpose
        planes = np.frombuffer(data, dtype=np.uint8).reshape(2, -1)
        out = np.empty((planes.shape[1], 2), dtype=np.uint8)
        out[:, 0], out[:, 1] = planes[0], planes[1]
        return out.tobytes()
    out = bytearray(len(data))
    half = (len(data) + 1) // 2
    out[0::2] = data[:half]
    out[1::2] = data[half:]
    return bytes(out)


class Sealer:
    """Seals P10 bytes as they arrive (format version 2), in bounded memory.

    `write()` any number of times; `start()` once the data key and what the
    instance is (pixel data compressed already? 16-bit?) are known: until then the
    bytes are held in memory (`buffered` says how many: the caller bounds it). Then
    `finish()`. The content address is computed here, over exactly the bytes
    written. zstd is kept only when it saves at least 5% on the first 1 MiB; level
    0 or `try_compression` False stores the body uncompressed."""

    def __init__(self, dst: BinaryIO, *, level: int = 3, segment_size: int = DEFAULT_SEGMENT_SIZE):
        if segment_size < MIN_SEGMENT_SIZE or segment_size >= 1 << 32:
            raise ValueError("segment size out of range")
        self._dst, self._level, self._segment_size = dst, level, segment_size
        self._sha = hashlib.sha256()
        self.length = 0
        self._pending = bytearray()  # plaintext not yet through compression
        self._key: tuple[bytes, bytes] | None = None
        self._try_compression = False
        self._shuffled = False
        self._writer: _SegmentWriter | None = None  # made once the compression is chosen
        self._cobj = None
        self._compression = COMPRESSION_NONE

    @property
    def buffered(self) -> int:
        return len(self._pending)

    @property
    def started(self) -> bool:
        return self._key is not None

    def write(self, data) -> None:
        self._sha.update(data)
        self.length += len(data)
        if self._writer is not None and self._cobj is None:
            self._writer.write(data)  # stored as is: no need to hold it
            return
        self._pending += data
        if self._key is not None:
            self._drain(final=False)

    def start(self, *, data_key: bytes, key_id: bytes, try_compression: bool = True,
              shuffled: bool = False) -> None:
        if self._key is not None:
            raise ValueError("the sealer is started already")
        self._key = (data_key, key_id)
        self._try_compression = try_compression and self._level > 0
        self._shuffled = shuffled
        self._drain(final=False)

    def finish(self) -> SealResult:
        if self._key is None:
            raise ValueError("the sealer was never started")
        self._drain(final=True)
        if self._cobj is not None:
            self._writer.write(self._cobj.flush())
        digest = self._sha.digest()
        sealed_xxh3 = self._writer.close(digest, self.length)
        return SealResult(self._writer.size, sealed_xxh3, self._compression, digest, self.length)

    def _transform(self, block):
        return shuffle(block) if self._shuffled else block

    def _choose_compression(self) -> None:
        """Compress the first 1 MiB; keep zstd only if it pays. Then the header is final."""
        probe = bytes(self._pending[:SHUFFLE_BLOCK])
        first = b""
        if self._try_compression and probe:
            cobj = _compressor(self._level).compressobj()
            compressed = cobj.compress(self._transform(probe)) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
            if len(compressed) <= len(probe) * (1 - MIN_COMPRESSION_GAIN):
                self._cobj, first = cobj, compressed
                self._compression = COMPRESSION_ZSTD_SHUFFLED if self._shuffled else COMPRESSION_ZSTD
                del self._pending[:len(probe)]
        data_key, key_id = self._key
        header = Header(self._compression, key_id, os.urandom(32), os.urandom(7), self._segment_size, 0)
        header_bytes = header.pack()
        self._writer = _SegmentWriter(self._dst, _subkey(data_key, header), header_bytes, header)
        self._writer.write(first)

    def _drain(self, final: bool) -> None:
        if self._writer is None:
            if len(self._pending) < SHUFFLE_BLOCK and not final:
                return
            self._choose_compression()
        if self._cobj is None:
            self._writer.write(self._pending)
            self._pending = bytearray()
        elif self._shuffled:
            # Whole 1 MiB blocks counted from the first byte: the shuffle is defined on them.
            whole = len(self._pending) if final else len(self._pending) - len(self._pending) % SHUFFLE_BLOCK
            with memoryview(self._pending) as view:
                for at in range(0, whole, SHUFFLE_BLOCK):
                    self._writer.write(self._cobj.compress(shuffle(view[at:min(at + SHUFFLE_BLOCK, whole)])))
            del self._pending[:whole]
        else:
            self._writer.write(self._cobj.compress(bytes(self._pending)))
            self._pending = bytearray()


def seal(src: BinaryIO, length: int, dst: BinaryIO, *, data_key: bytes, key_id: bytes,
         content_address: bytes, level: int = 3, try_compression: bool = True, shuffled: bool = False,
         segment_size: int = DEFAULT_SEGMENT_SIZE) -> SealResult:
    """Seal `length` bytes read from `src`, which must hash to `content_address` (the
    caller read them before: a file that changed meanwhile is refused)."""
    if len(content_address) != ADDRESS_SIZE:
        raise ValueError("content address must be a SHA-256 digest")
    sealer = Sealer(dst, level=level, segment_size=segment_size)
    sealer.start(data_key=data_key, key_id=key_id, try_compression=try_compression, shuffled=shuffled)
    while sealer.length < length:
        chunk = src.read(min(READ_SIZE, length - sealer.length))
        if not chunk:
            raise InvalidInstance("input ended before its announced length (changed while reading?)")
        sealer.write(chunk)
    if src.read(1):
        raise InvalidInstance("input is longer than its announced length (changed while reading?)")
    result = sealer.finish()
    if result.content_address != content_address:
        raise InvalidInstance("input changed while it was read (its hash differs)")
    return result


def seal_bytes(data: bytes, dst: BinaryIO, *, data_key: bytes, key_id: bytes) -> SealResult:
    """Seal a small in-memory payload (a pack trailer, a manifest); its content address is its SHA-256."""
    sealer = Sealer(dst)
    sealer.start(data_key=data_key, key_id=key_id)
    sealer.write(data)
    return sealer.finish()


class _DecryptingReader(io.RawIOBase):
    """File-like view of the decrypted body; every byte it returns has passed its GCM tag.

    Version 2: body segments (last = 0) then the footer, the final 56 bytes; only the last
    segment before it may be short. Version 1: the last segment has last = 1. Once the
    body is read, `footer` holds (content address, plaintext length) for version 2."""

    def __init__(self, src: BinaryIO, aead: AESGCM, header: Header, aad: bytes):
        self._src, self._aead, self._header, self._aad = src, aead, header, aad
        self._record = header.segment_size + TAG_SIZE
        # Bytes read but not yet decrypted: more than a record plus the footer can always be
        # decrypted as a full body segment; what is left at the end is sized by the end.
        self._tail = b""
        self._eof = False
        self._index = 0
        self._pending = b""
        self._done = False
        self.footer: tuple[bytes, int] | None = None

    def readable(self) -> bool:
        return True

    def _fill(self, want: int) -> None:
        while not self._eof and len(self._tail) < want:
            more = self._src.read(max(want - len(self._tail), self._record))
            if not more:
                self._eof = True
            self._tail += more

    def _decrypt(self, segment: bytes, last: bool) -> bytes:
        try:
            plain = self._aead.decrypt(_nonce(self._header.nonce_prefix, self._index, last), segment, self._aad)
        except InvalidTag:
            raise IntegrityError("sealed blob failed authentication (tampered, truncated, extended, "
                                 "swapped or wrong key)") from None
        self._index += 1
        return plain

    def _advance(self) -> None:
        if self._header.version == 1:
            self._fill(self._record + 1)
            segment, self._tail = self._tail[:self._record], self._tail[self._record:]
            if len(segment) < TAG_SIZE:
                raise IntegrityError("sealed blob is truncated")
            last = not self._tail
            self._pending, self._done = self._decrypt(segment, last), last
            return
        self._fill(self._record + FOOTER_SEGMENT_SIZE + 1)
        if len(self._tail) > self._record + FOOTER_SEGMENT_SIZE:
            segment, self._tail = self._tail[:self._record], self._tail[self._record:]
            self._pending = self._decrypt(segment, last=False)
            return
        body, footer = self._tail[:-FOOTER_SEGMENT_SIZE], self._tail[-FOOTER_SEGMENT_SIZE:]
        self._tail = b""
        if len(footer) < FOOTER_SEGMENT_SIZE or 0 < len(body) <= TAG_SIZE:
            raise IntegrityError("sealed blob is truncated")
        self._pending = self._decrypt(body, last=False) if body else b""
        self.footer = FOOTER.unpack(self._decrypt(footer, last=True))
        self._done = True

    def readinto(self, buffer) -> int:
        while not self._pending:
            if self._done:
                return 0
            self._advance()
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def read_header(src: BinaryIO) -> Header:
    return Header.unpack(src.read(HEADER_SIZE))


def _footer_first(src: BinaryIO, aead: AESGCM, header: Header, aad: bytes) -> tuple[bytes, int] | None:
    """(content address, length) of a version 2 blob read from its footer, when the source
    can seek (its size tells where the footer is and which segment number it has); None
    when it cannot."""
    try:
        if not src.seekable():
            return None
        start = src.tell()
        size = src.seek(0, io.SEEK_END) - start + HEADER_SIZE
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    record = header.segment_size + TAG_SIZE
    body = size - HEADER_SIZE - FOOTER_SEGMENT_SIZE
    if body < 0 or (body % record and body % record <= TAG_SIZE):
        raise IntegrityError("sealed blob is truncated or extended")
    src.seek(start + body)
    raw = src.read(FOOTER_SEGMENT_SIZE)
    src.seek(start)
    segments = -(-body // record)
    try:
        plain = aead.decrypt(_nonce(header.nonce_prefix, segments, True), raw, aad)
    except InvalidTag:
        raise IntegrityError("sealed blob failed authentication (tampered, truncated, extended, "
                             "swapped or wrong key)") from None
    return FOOTER.unpack(plain)


def open_sealed(src: BinaryIO, key_for: Callable[[bytes], bytes],
                chunk_size: int = READ_SIZE) -> tuple[Header, bytes | None, Iterator[bytes]]:
    """Open a sealed blob: (header, content address, iterator of the original bytes).

    The content address comes from the footer (version 2, a seekable source) or the
    first segment (version 1); it is None for a version 2 blob read from a source that
    cannot seek (the iterator checks it at the end). The iterator checks every
    segment's tag before yielding from it, and holds the last chunk back until the
    length and the SHA-256 of everything have been checked. `key_for(key_id)`
    returns the data key.
    """
    return _open(src, key_for, chunk_size, expected_address=None)


def unseal(src: BinaryIO, *, key_for: Callable[[bytes], bytes], content_address: bytes,
           chunk_size: int = READ_SIZE) -> Iterator[bytes]:
    """The original bytes of the blob that must hold `content_address`, verified (see open_sealed)."""
    return _open(src, key_for, chunk_size, expected_address=content_address)[2]


_SWAPPED = "sealed blob holds another instance (swapped or misfiled copy)"


def _open(src: BinaryIO, key_for: Callable[[bytes], bytes], chunk_size: int,
          expected_address: bytes | None) -> tuple[Header, bytes | None, Iterator[bytes]]:
    raw_header = src.read(HEADER_SIZE)
    header = Header.unpack(raw_header)
    aead = _subkey(key_for(header.key_id), header)
    footer = _footer_first(src, aead, header, raw_header) if header.version == 2 else None
    reader = _DecryptingReader(src, aead, header, raw_header)
    payload = io.BufferedReader(reader, buffer_size=header.segment_size)
    if header.version == 1:
        address = payload.read(ADDRESS_SIZE)
        if len(address) != ADDRESS_SIZE:
            raise IntegrityError("sealed blob has no content address")
        footer = (address, header.plaintext_length)
    if footer is not None and expected_address is not None and footer[0] != expected_address:
        raise IntegrityError(_SWAPPED)
    claims = (lambda: footer) if footer is not None else (lambda: reader.footer)
    chunks = _plaintext(payload, header, claims, footer[1] if footer else None, chunk_size, expected_address)
    return header, footer[0] if footer else None, chunks


def _plaintext(payload: BinaryIO, header: Header, claims: Callable[[], tuple[bytes, int] | None],
               known_length: int | None, chunk_size: int, expected_address: bytes | None) -> Iterator[bytes]:
    """The decompressed bytes; the last chunk only once the length and SHA-256 match what
    the blob claims (`claims()`: its content address and length) and what is expected."""
    reader: BinaryIO = payload
    if header.compression in (COMPRESSION_ZSTD, COMPRESSION_ZSTD_SHUFFLED):
        reader = zstandard.ZstdDecompressor().stream_reader(payload, read_size=header.segment_size,
                                                            read_across_frames=False)
    if header.compression == COMPRESSION_ZSTD_SHUFFLED:
        chunk_size = SHUFFLE_BLOCK  # whole blocks, each unshuffled on its own
    sha = hashlib.sha256()
    total = 0
    held = b""
    while True:
        want = chunk_size if known_length is None else min(chunk_size, max(known_length - total, 1))
        try:
            chunk = _read_full(reader, want)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"sealed blob payload does not decompress: {exc}") from None
        if not chunk:
            break
        if header.compression == COMPRESSION_ZSTD_SHUFFLED:
            chunk = unshuffle(chunk)
        total += len(chunk)
        if known_length is not None and total > known_length:
            raise IntegrityError("sealed blob holds more bytes than it says")
        sha.update(chunk)
        if held:
            yield held
        held = chunk
    if payload.read(1):
        raise IntegrityError("sealed blob has bytes after its compressed payload")
    claimed = claims()
    if claimed is None:
        raise IntegrityError("sealed blob has no footer")
    if total != claimed[1]:
        raise IntegrityError("sealed blob holds fewer or more bytes than it says")
    if sha.digest() != claimed[0]:
        raise IntegrityError("content address mismatch after decryption")
    if expected_address is not None and claimed[0] != expected_address:
        raise IntegrityError(_SWAPPED)
    if held:
        yield held


def unseal_whole(blob, *, key_for: Callable[[bytes], bytes], content_address: bytes) -> bytes | memoryview:
    """The original bytes of a whole sealed blob held in memory (`blob`: bytes-like), verified
    exactly as `unseal` verifies them, in one pass with no streaming machinery: each segment
    decrypted once, one zstd call into a buffer of the known length, one SHA-256. About
    twice as cheap in CPU as `unseal` on a CT instance (a retrieve prefetches this way)."""
    view = memoryview(blob)
    header_bytes = bytes(view[:HEADER_SIZE])
    header = Header.unpack(header_bytes)
    if header.version == 1:  # the content address leads the payload: the streaming reader
        return b"".join(unseal(io.BytesIO(blob), key_for=key_for, content_address=content_address))
    aead = _subkey(key_for(header.key_id), header)
    record = header.segment_size + TAG_SIZE
    body = len(view) - HEADER_SIZE - FOOTER_SEGMENT_SIZE
    if body < 0 or (body % record and body % record <= TAG_SIZE):
        raise IntegrityError("sealed blob is truncated or extended")
    segments = -(-body // record)

    def decrypt(index: int, piece, last: bool) -> bytes:
        try:
            return aead.decrypt(_nonce(header.nonce_prefix, index, last), piece, header_bytes)
        except InvalidTag:
            raise IntegrityError("sealed blob failed authentication (tampered, truncated, extended, "
                                 "swapped or wrong key)") from None

    address, length = FOOTER.unpack(decrypt(segments, view[HEADER_SIZE + body:], True))
    if address != content_address:
        raise IntegrityError(_SWAPPED)
    parts = [decrypt(i, view[HEADER_SIZE + i * record:HEADER_SIZE + min((i + 1) * record, body)], False)
             for i in range(segments)]
    payload = parts[0] if len(parts) == 1 else b"".join(parts)
    if header.compression == COMPRESSION_NONE:
        plain = payload
    else:
        try:
            plain = zstandard.ZstdDecompressor().decompress(payload, max_output_size=max(length, 1),
                                                            allow_extra_data=False) if payload else b""
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"sealed blob payload does not decompress: {exc}") from None
        if header.compression == COMPRESSION_ZSTD_SHUFFLED:
            plain = _unshuffle_blocks(plain)
    if len(plain) != length:
        raise IntegrityError("sealed blob holds fewer or more bytes than it says")
    if hashlib.sha256(plain).digest() != address:
        raise IntegrityError("content address mismatch after decryption")
    return plain


def _unshuffle_blocks(data: bytes) -> memoryview:
    """unshuffle() of every SHUFFLE_BLOCK block of `data`, into one new buffer (not copied
    again into a bytes object: a fresh half-megabyte allocation costs more than the shuffle)."""
    source = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(len(data), dtype=np.uint8)
    for at in range(0, len(data), SHUFFLE_BLOCK):
        block = source[at:at + SHUFFLE_BLOCK]
        half = (len(block) + 1) // 2
        out[at:at + len(block):2] = block[:half]
        out[at + 1:at + len(block):2] = block[half:]
    return memoryview(out)


def _read_full(reader: BinaryIO, size: int) -> bytes:
    """`size` bytes, fewer only at the end of the stream."""
    chunk = reader.read(size)
    while chunk and len(chunk) < size:
        more = reader.read(size - len(chunk))
        if not more:
            break
        chunk += more
    return chunk


def sealed_digest(src: BinaryIO) -> tuple[int, bytes]:
    """Size and xxh3-128 of every byte of a sealed copy: the key-less check."""
    xxh = xxhash.xxh3_128()
    size = 0
    while chunk := src.read(READ_SIZE):
        xxh.update(chunk)
        size += len(chunk)
    return size, xxh.digest()
