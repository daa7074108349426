"""Sealed blob: what an instance looks like on any disk, tape or bucket.

Order of operations (borg's rule): hash the plaintext (the content address),
compress, encrypt. A sealed blob is a fixed 80-byte header followed by the
encrypted payload in fixed-size segments (streaming AEAD, the STREAM
construction as in Tink's AES-GCM-HKDF streaming AEAD):

    offset  size  field
    0       8     magic 89 50 56 42 0D 0A 1A 0A ("\\x89PVB\\r\\n\\x1a\\n"; catches
                  text-mode and 7-bit transfers like PNG's signature does)
    8       1     format version, 1
    9       1     compression id: 0 none, 1 zstd (one frame over the whole payload),
                  2 zstd over the byte-shuffled P10 bytes (see below)
    10      1     cipher id: 1 AES-256-GCM with an HKDF-SHA256 per-blob subkey
    11      1     reserved, 0
    12      16    key id: the study's data key (see keys.py)
    28      32    salt: random, HKDF salt of the per-blob subkey
    60      7     nonce prefix: random
    67      1     reserved, 0
    68      4     segment size S (big-endian u32): payload bytes per segment
    72      8     plaintext length (big-endian u64): the P10 bytes as received
    80            segment 0, segment 1, ... segment n-1

    payload  = content address (SHA-256 of the P10 bytes, 32) || body
    body     = zstd(P10) if compression id is 1,
               zstd(shuffle(P10)) if 2, else the P10 bytes themselves
    shuffle  = per block of 1 MiB of P10 bytes (the last one shorter): the bytes at even
               offsets in the block, then those at odd offsets. 16-bit pixels become a
               plane of low bytes and a plane of high bytes: zstd then compresses CT
               several times faster and smaller (the high plane is mostly redundant, the
               noisy low plane is stored near raw at once).
    segment i = AES-256-GCM(subkey, nonce_i, payload[i*S:(i+1)*S], aad)
              = ciphertext || 16-byte tag; every segment holds S payload bytes
                except the last, which holds 1..S
    subkey   = HKDF-SHA256(ikm=data key, salt=salt, info="pacs-vault blob v1" || key id)
    nonce_i  = nonce prefix (7) || i (big-endian u32) || 1 if last segment else 0
    aad      = the 80 header bytes

The content address is authenticated and encrypted with the payload rather
than passed as associated data: a reader that expects a given address checks it
in the first segment, before releasing any byte, and `fsck --rebuild-index`
recovers it from the blob and the key alone; on disk it stays secret (a plain
SHA-256 of an instance would identify it to anyone holding the same file).

What this buys: any changed header or payload byte, a reordered, dropped,
duplicated, truncated or appended segment, a blob swapped for another one (its
content address differs) or sealed under another key fails before a single
byte is released, except that a truncated or tampered later segment of a blob
larger than one read chunk is found when it is reached (the earlier chunks
have passed their own tags). The per-blob subkey means nonces never repeat
under one key, however many blobs a study has. Memory stays bounded by a few
segments whatever the size of the instance. The xxh3-128 of all sealed bytes,
kept in the index, lets any copy be checked without a key.
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
VERSION = 1
COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
COMPRESSION_ZSTD_SHUFFLED = 2
SHUFFLE_BLOCK = 1 << 20
CIPHER_AES256GCM_HKDF = 1
HEADER = struct.Struct(">8sBBBB16s32s7sBIQ")
HEADER_SIZE = HEADER.size  # 80
TAG_SIZE = 16
ADDRESS_SIZE = 32
DEFAULT_SEGMENT_SIZE = 1 << 20
MIN_SEGMENT_SIZE = 16
READ_SIZE = 1 << 20
# Compression must save at least this share of the first segment to be kept.
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
    plaintext_length: int

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, VERSION, self.compression, CIPHER_AES256GCM_HKDF, 0, self.key_id,
                           self.salt, self.nonce_prefix, 0, self.segment_size, self.plaintext_length)

    @classmethod
    def unpack(cls, raw: bytes) -> "Header":
        if len(raw) < HEADER_SIZE:
            raise IntegrityError("sealed blob is shorter than its header")
        magic, version, compression, cipher, _, key_id, salt, prefix, _, seg, length = HEADER.unpack(raw)
        if magic != MAGIC:
            raise IntegrityError("not a sealed blob (bad magic)")
        if version != VERSION:
            raise IntegrityError(f"sealed blob format version {version} is not supported")
        if cipher != CIPHER_AES256GCM_HKDF or compression not in (COMPRESSION_NONE, COMPRESSION_ZSTD,
                                                                   COMPRESSION_ZSTD_SHUFFLED):
            raise IntegrityError("sealed blob names an unknown cipher or compression")
        if seg < MIN_SEGMENT_SIZE:
            raise IntegrityError("sealed blob has an invalid segment size")
        return cls(compression, key_id, salt, prefix, seg, length)


@dataclass(frozen=True)
class SealResult:
    sealed_size: int
    sealed_xxh3: bytes  # xxh3-128 digest of every sealed byte, header included
    compression: int


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
    """Cuts the payload into segments, encrypts each, writes and hashes the sealed bytes."""

    def __init__(self, dst: BinaryIO, aead: AESGCM, header_bytes: bytes, header: Header, aad: bytes):
        self._dst, self._aead, self._aad, self._header = dst, aead, aad, header
        self._buffer = bytearray()
        self._index = 0
        self._xxh = xxhash.xxh3_128()
        self.size = 0
        self._emit_raw(header_bytes)

    def _emit_raw(self, data: bytes) -> None:
        self._dst.write(data)
        self._xxh.update(data)
        self.size += len(data)

    def _emit(self, payload: bytes, last: bool) -> None:
        nonce = _nonce(self._header.nonce_prefix, self._index, last)
        self._emit_raw(self._aead.encrypt(nonce, payload, self._aad))
        self._index += 1

    def write(self, data: bytes) -> None:
        self._buffer += data
        seg = self._header.segment_size
        # Hold back at least one byte: the last segment is only known at close().
        while len(self._buffer) > seg:
            self._emit(bytes(self._buffer[:seg]), last=False)
            del self._buffer[:seg]

    def close(self) -> bytes:
        self._emit(bytes(self._buffer), last=True)
        self._buffer = bytearray()
        return self._xxh.digest()


def shuffle(block: bytes) -> bytes:
    """Even-offset bytes, then odd-offset bytes (numpy's transpose: ~7x Python's slicing)."""
    pairs = np.frombuffer(block, dtype=np.uint8, count=len(block) & ~1).reshape(-1, 2).T
    if len(block) % 2 == 0:
        return pairs.tobytes()
    return pairs[0].tobytes() + block[-1:] + pairs[1].tobytes()


def unshuffle(data: bytes) -> bytes:
    if len(data) % 2 == 0:
        return np.frombuffer(data, dtype=np.uint8).reshape(2, -1).T.tobytes()
    out = bytearray(len(data))
    half = (len(data) + 1) // 2
    out[0::2] = data[:half]
    out[1::2] = data[half:]
    return bytes(out)


def _read_exact_stream(src: BinaryIO, length: int) -> Iterator[bytes]:
    """`length` bytes in chunks of exactly SHUFFLE_BLOCK (the last one shorter)."""
    remaining = length
    while remaining:
        chunk = src.read(min(SHUFFLE_BLOCK, remaining))
        if not chunk:
            raise InvalidInstance("input ended before its announced length (changed while reading?)")
        while len(chunk) < min(SHUFFLE_BLOCK, remaining):  # a short read (a pipe): fill the block
            more = src.read(min(SHUFFLE_BLOCK, remaining) - len(chunk))
            if not more:
                raise InvalidInstance("input ended before its announced length (changed while reading?)")
            chunk += more
        remaining -= len(chunk)
        yield chunk
    if src.read(1):
        raise InvalidInstance("input is longer than its announced length (changed while reading?)")


def seal(src: BinaryIO, length: int, dst: BinaryIO, *, data_key: bytes, key_id: bytes,
         content_address: bytes, level: int = 3, try_compression: bool = True, shuffled: bool = False,
         segment_size: int = DEFAULT_SEGMENT_SIZE) -> SealResult:
    """Seal `length` bytes read from `src` into `dst`, in bounded memory.

    `level` 0 or `try_compression` False stores the payload uncompressed (the
    caller knows the pixel data is already compressed). Otherwise zstd is kept
    only when it saves at least 5% on the first segment; `shuffled` compresses the
    byte-shuffled bytes (compression id 2: for 16-bit pixel data).
    """
    if segment_size < MIN_SEGMENT_SIZE or segment_size >= 1 << 32:
        raise ValueError("segment size out of range")
    if len(content_address) != ADDRESS_SIZE:
        raise ValueError("content address must be a SHA-256 digest")
    chunks = _read_exact_stream(src, length)
    probe = bytearray()
    for chunk in chunks:
        probe += chunk
        if len(probe) >= segment_size:
            break
    probe_bytes = bytes(probe)
    compression = COMPRESSION_NONE
    first_payload = probe_bytes
    cobj = None
    transform = shuffle if shuffled else bytes
    if level > 0 and try_compression and probe_bytes:
        cobj = _compressor(level).compressobj(size=length)
        compressed = b"".join(cobj.compress(transform(probe_bytes[at:at + SHUFFLE_BLOCK]))
                              for at in range(0, len(probe_bytes), SHUFFLE_BLOCK))
        if len(probe_bytes) == length:
            compressed += cobj.flush()
        else:
            compressed += cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        if len(compressed) <= len(probe_bytes) * (1 - MIN_COMPRESSION_GAIN):
            compression = COMPRESSION_ZSTD_SHUFFLED if shuffled else COMPRESSION_ZSTD
            first_payload = compressed
        else:
            cobj = None

    header = Header(compression, key_id, os.urandom(32), os.urandom(7), segment_size, length)
    header_bytes = header.pack()
    writer = _SegmentWriter(dst, _subkey(data_key, header), header_bytes, header, header_bytes)
    writer.write(content_address)
    writer.write(first_payload)
    for chunk in chunks:
        writer.write(cobj.compress(transform(chunk)) if cobj else chunk)
    if cobj is not None and len(probe_bytes) < length:
        writer.write(cobj.flush())
    digest = writer.close()
    return SealResult(writer.size, digest, compression)


def seal_bytes(data: bytes, dst: BinaryIO, *, data_key: bytes, key_id: bytes) -> SealResult:
    """Seal a small in-memory payload (a pack trailer, a manifest); its content address is its SHA-256."""
    return seal(io.BytesIO(data), len(data), dst, data_key=data_key, key_id=key_id,
                content_address=hashlib.sha256(data).digest())


class _DecryptingReader(io.RawIOBase):
    """File-like view of the decrypted payload; every byte it returns has passed its GCM tag."""

    def __init__(self, src: BinaryIO, aead: AESGCM, header: Header, aad: bytes):
        self._src, self._aead, self._header, self._aad = src, aead, header, aad
        self._index = 0
        self._pending = b""
        self._next = self._src.read(header.segment_size + TAG_SIZE)
        self._done = False

    def readable(self) -> bool:
        return True

    def _advance(self) -> None:
        current = self._next
        if len(current) < TAG_SIZE:
            raise IntegrityError("sealed blob is truncated")
        self._next = self._src.read(self._header.segment_size + TAG_SIZE)
        last = not self._next
        try:
            self._pending = self._aead.decrypt(_nonce(self._header.nonce_prefix, self._index, last),
                                               current, self._aad)
        except InvalidTag:
            raise IntegrityError("sealed blob failed authentication (tampered, truncated, extended, "
                                 "swapped or wrong key)") from None
        self._index += 1
        self._done = last

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


def open_sealed(src: BinaryIO, key_for: Callable[[bytes], bytes],
                chunk_size: int = READ_SIZE) -> tuple[Header, bytes, Iterator[bytes]]:
    """Open a sealed blob: (header, content address, iterator of the original bytes).

    The content address comes out of the first authenticated segment. The
    iterator checks every segment's tag before yielding from it, and holds the
    last chunk back until the length and the SHA-256 of everything have been
    checked against the header and the content address. `key_for(key_id)`
    returns the data key.
    """
    raw_header = src.read(HEADER_SIZE)
    header = Header.unpack(raw_header)
    aead = _subkey(key_for(header.key_id), header)
    payload = io.BufferedReader(_DecryptingReader(src, aead, header, raw_header),
                                buffer_size=header.segment_size)
    content_address = payload.read(ADDRESS_SIZE)
    if len(content_address) != ADDRESS_SIZE:
        raise IntegrityError("sealed blob has no content address")
    return header, content_address, _plaintext(payload, header, content_address, chunk_size)


def _plaintext(payload: BinaryIO, header: Header, content_address: bytes, chunk_size: int) -> Iterator[bytes]:
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
        try:
            chunk = _read_full(reader, min(chunk_size, max(header.plaintext_length - total, 1)))
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"sealed blob payload does not decompress: {exc}") from None
        if not chunk:
            break
        if header.compression == COMPRESSION_ZSTD_SHUFFLED:
            chunk = unshuffle(chunk)
        total += len(chunk)
        if total > header.plaintext_length:
            raise IntegrityError("sealed blob holds more bytes than its header says")
        sha.update(chunk)
        if held:
            yield held
        held = chunk
    if payload.read(1):
        raise IntegrityError("sealed blob has bytes after its compressed payload")
    if total != header.plaintext_length:
        raise IntegrityError("sealed blob holds fewer bytes than its header says")
    if sha.digest() != content_address:
        raise IntegrityError("content address mismatch after decryption")
    if held:
        yield held


def _read_full(reader: BinaryIO, size: int) -> bytes:
    """`size` bytes, fewer only at the end of the stream."""
    chunk = reader.read(size)
    while chunk and len(chunk) < size:
        more = reader.read(size - len(chunk))
        if not more:
            break
        chunk += more
    return chunk


def unseal(src: BinaryIO, *, key_for: Callable[[bytes], bytes], content_address: bytes,
           chunk_size: int = READ_SIZE) -> Iterator[bytes]:
    """The original bytes of the blob that must hold `content_address`, verified (see open_sealed)."""
    _, found, chunks = open_sealed(src, key_for, chunk_size)
    if found != content_address:
        raise IntegrityError("sealed blob holds another instance (swapped or misfiled copy)")
    return chunks


def sealed_digest(src: BinaryIO) -> tuple[int, bytes]:
    """Size and xxh3-128 of every byte of a sealed copy: the key-less check."""
    xxh = xxhash.xxh3_128()
    size = 0
    while chunk := src.read(READ_SIZE):
        xxh.update(chunk)
        size += len(chunk)
    return size, xxh.digest()
