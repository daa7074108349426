"""The ingest journal's files, byte by byte (pure codec; the journal itself: store/journal.py).

    file header (64 bytes)
    offset size field
    0      8    magic "PVJRNL\\r\\n"
    8      2    format version (big-endian u16), 1
    10     6    reserved, 0
    16     16   KEK id the journal key is derived from
    32     16   journal id (random; the same in every file of one journal)
    48     8    when the journal was started (big-endian u64, unix seconds)
    56     8    reserved, 0

    record
    0      4    magic "PVJR"
    4      4    L, length of the sealed body (big-endian u32)
    8      8    record number n (big-endian u64): 1, 2, ... across the journal's files
    16     L    AES-256-GCM(journal key, nonce = 4 zero bytes || n, msgpack body,
                associated data = the 16 bytes before it)
    journal key = HKDF-SHA256(KEK, salt = journal id, info = "pacs-vault journal v1")


The body is what the applier needs to redo the store (the index attributes, the blob
record, the inline sealed bytes, the audit entry): patient data like the index's,
encrypted here so that the journal holds none in the clear. Reading a file stops at the
first record that is cut short, does not authenticate, or does not carry the number
after the one before it (older records of a file written again): its batch's fdatasync
never returned, so neither it nor anything after it was acknowledged.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.errors import ApplianceError

FILE_MAGIC = b"PVJRNL\r\n"
VERSION = 1
FILE_HEADER = struct.Struct(">8sH6s16s16sQ8s")
RECORD_MAGIC = b"PVJR"
RECORD_HEADER = struct.Struct(">4sIQ")
TAG_SIZE = 16
# A record never holds more than a journal file does.
MAX_RECORD_BYTES = 32 << 20

assert FILE_HEADER.size == 64 and RECORD_HEADER.size == 16


class JournalError(ApplianceError):
    """The journal cannot be written: nothing more is acknowledged until a restart."""

    exit_code = 74
    dicom_status = 0xA700


@dataclass(frozen=True)
class Record:
    journal_id: bytes
    number: int
    body: dict
    started: int = 0  # when its journal was started, unix seconds

    @property
    def place(self) -> str:
        """Where the record is, as audit entries name it (`detail.jrn`)."""
        return f"{self.journal_id.hex()}:{self.number}"


def record_nonce(number: int) -> bytes:
    return b"\0\0\0\0" + struct.pack(">Q", number)


def journal_aead(journal_key: Callable[[bytes], bytes], journal_id: bytes) -> AESGCM:
    return AESGCM(journal_key(journal_id))


def encode_record(aead: AESGCM, number: int, body: dict) -> list[bytes]:
    plain = msgpack.packb(body)
    length = len(plain) + TAG_SIZE
    header = RECORD_HEADER.pack(RECORD_MAGIC, length, number)
    return [header, aead.encrypt(record_nonce(number), plain, header)]


def read_records(path: Path, journal_key: Callable[[bytes], bytes],
                 kek_id: bytes) -> tuple[bytes, Iterator[Record]]:
    """(journal id, its records in order) of one journal file, up to the first record that is
    cut short or does not authenticate (never acknowledged)."""
    fp = open(path, "rb")
    head = fp.read(FILE_HEADER.size)
    if len(head) < FILE_HEADER.size:
        fp.close()
        return b"", iter(())  # created, never written: nothing in it was acknowledged
    magic, version, _, file_kek, journal_id, started, _ = FILE_HEADER.unpack(head)
    if magic != FILE_MAGIC or version != VERSION:
        fp.close()
        raise JournalError(f"{path} is not a pacs-vault journal")
    if file_kek != kek_id:
        fp.close()
        raise JournalError(f"{path} was written under another key-encryption key: replay it with that key file")
    aead = journal_aead(journal_key, journal_id)

    def records() -> Iterator[Record]:
        expected = None
        with fp:
            while True:
                header = fp.read(RECORD_HEADER.size)
                if len(header) < RECORD_HEADER.size:
                    return
                magic, length, number = RECORD_HEADER.unpack(header)
                if magic != RECORD_MAGIC or (expected is not None and number != expected) or length > MAX_RECORD_BYTES:
                    return
                expected = number + 1
                sealed = fp.read(length)
                try:
                    plain = aead.decrypt(record_nonce(number), sealed, header)
                except (InvalidTag, ValueError):
                    return
                yield Record(journal_id, number, msgpack.unpackb(plain), started)

    return journal_id, records()


