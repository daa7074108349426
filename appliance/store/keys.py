"""Envelope keys: one key-encryption key (KEK) in a key file, one data key per study.

Key file (text, mode 0600, kept outside the data directories, never
replicated with the data, never logged):

    pacs-vault key-encryption key v1
    id: <32 hex digits, 16 random bytes; not secret>
    key: <base64 of 32 random bytes>

Keyring: an LMDB environment of its own (`HOME/keyring`), apart from the index
so the index can be thrown away and rebuilt from the blobs and the keyring.

    db "meta"       b"kek_id"    -> 16 bytes, the KEK every data key is wrapped under
                    b"kek_check" -> HMAC-SHA256(KEK, "pacs-vault kek check v1"), 32 bytes
                    b"kek_created" -> 8 bytes big-endian, unix seconds (init or last rotation)
    db "data_keys"  key id (16)  -> msgpack {"w": nonce (12) || AES-256-GCM(KEK, data key) (48),
                                             "k": KEK id (16), "c": created, unix seconds}
                    the wrap's associated data is key id || KEK id, so a wrapped key
                    cannot be moved to another id.

Destroying a data key (crypto-shredding) deletes its record: every copy of every
blob sealed under it, on any tier or off-site, becomes unreadable.

Rotation (`keys rotate`) writes the new KEK to `<key file>.new`, re-wraps every
data key under it in one synced transaction, then retires the old key file to
`retired-keys/kek-<id>.key` beside it (older off-site keyring snapshots still
need it) and moves the new one in place. An interrupted rotation is finished or
undone the next time the keyring opens, whichever the keyring says.
"""

from __future__ import annotations

import base64
import hmac
import os
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb
import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.errors import KeyFileError, KeyMissing
from appliance.fsutil import fsync_dir, write_file_atomic
from appliance.store.index import data_file

_FIRST_LINE = "pacs-vault key-encryption key v1"
_CHECK_LABEL = b"pacs-vault kek check v1"
_KEYRING_MAP_SIZE = 1 << 30


@dataclass(frozen=True)
class Kek:
    key_id: bytes
    key: bytes = b""

    def __repr__(self) -> str:  # never print key material
        return f"Kek(id={self.key_id.hex()})"

    @property
    def check(self) -> bytes:
        return hmac.new(self.key, _CHECK_LABEL, "sha256").digest()

    @classmethod
    def generate(cls) -> "Kek":
        return cls(os.urandom(16), os.urandom(32))

    def serialise(self) -> bytes:
        return (f"{_FIRST_LINE}\nid: {self.key_id.hex()}\n"
                f"key: {base64.b64encode(self.key).decode()}\n").encode()


def _derive(kek: Kek, salt: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=salt, info=info).derive(kek.key)


def snapshot_key(kek: Kek) -> bytes:
    """The key that seals what goes off-site besides the blobs (index snapshot, keyring copy,
    manifests): derived from the KEK, so the key file alone opens them at restore."""
    return _derive(kek, kek.key_id, b"pacs-vault off-site v1")


def write_key_file(path: Path, kek: Kek) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, kek.serialise(), mode=0o600)


def read_key_file(path: Path) -> Kek:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} is missing: the appliance cannot read its data without it; "
                           "put back the key file from your key backup") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise KeyFileError(f"key file {path} can be read by group or others "
                           f"(mode {stat.S_IMODE(st.st_mode):o}): run chmod 600 on it")
    try:
        lines = path.read_text("ascii").splitlines()
        fields = dict(line.split(": ", 1) for line in lines[1:] if line)
        if lines[0] != _FIRST_LINE:
            raise ValueError
        kek = Kek(bytes.fromhex(fields["id"]), base64.b64decode(fields["key"], validate=True))
        if len(kek.key_id) != 16 or len(kek.key) != 32:
            raise ValueError
    except (OSError, ValueError, KeyError, IndexError, UnicodeDecodeError):
        raise KeyFileError(f"key file {path} is not a pacs-vault key file") from None
    return kek


def _wrap(kek: Kek, key_id: bytes, data_key: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(kek.key).encrypt(nonce, data_key, key_id + kek.key_id)


def _unwrap(kek: Kek, key_id: bytes, wrapped: bytes) -> bytes:
    try:
        return AESGCM(kek.key).decrypt(wrapped[:12], wrapped[12:], key_id + kek.key_id)
    except InvalidTag:
        raise KeyFileError(f"data key {key_id.hex()} does not unwrap under the key file "
                           "(wrong key file or damaged keyring)") from None


class Keyring:
    """Wrapped data keys under one KEK. Thread-safe; unwrapped keys are cached in memory only."""

    def __init__(self, path: Path, kek_file: Path, *, create: bool = False):
        self._path, self._kek_file = Path(path), Path(kek_file)
        if not create and not data_file(self._path).exists():
            raise KeyFileError(f"keyring {self._path} is missing")
        self._path.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(str(self._path), max_dbs=4, map_size=_KEYRING_MAP_SIZE, sync=True,
                              metasync=True, subdir=True)
        self._meta = self._env.open_db(b"meta")
        self._keys = self._env.open_db(b"data_keys")
        self._cache: dict[bytes, bytes] = {}
        self._lock = threading.Lock()
        if create:
            self._create()
        self._kek = self._open_kek()

    def close(self) -> None:
        self._cache.clear()
        self._env.close()

    def _create(self) -> None:
        with self._env.begin() as txn:
            if txn.get(b"kek_id", db=self._meta):
                raise KeyFileError(f"keyring {self._path} exists already")
        kek = Kek.generate()
        write_key_file(self._kek_file, kek)
        with self._env.begin(write=True) as txn:
            txn.put(b"kek_id", kek.key_id, db=self._meta)
            txn.put(b"kek_check", kek.check, db=self._meta)
            txn.put(b"kek_created", struct.pack(">Q", int(time.time())), db=self._meta)

    def _stored_kek(self) -> tuple[bytes, bytes]:
        with self._env.begin() as txn:
            kek_id, check = txn.get(b"kek_id", db=self._meta), txn.get(b"kek_check", db=self._meta)
        if not kek_id:
            raise KeyFileError(f"keyring {self._path} is not initialised")
        return bytes(kek_id), bytes(check)

    def _open_kek(self) -> Kek:
        kek_id, check = self._stored_kek()
        pending = self._kek_file.with_name(self._kek_file.name + ".new")
        if pending.exists():
            new = read_key_file(pending)
            if new.key_id == kek_id and hmac.compare_digest(new.check, check):
                self._retire_and_install(pending)  # the rotation committed: finish it
            else:
                pending.unlink()  # the rotation never committed: undo it
                fsync_dir(pending.parent)
        kek = read_key_file(self._kek_file)
        if kek.key_id != kek_id:
            raise KeyFileError(f"key file {self._kek_file} holds KEK {kek.key_id.hex()[:8]}..., but the "
                               f"keyring is wrapped under KEK {kek_id.hex()[:8]}...: wrong key file")
        if not hmac.compare_digest(kek.check, check):
            raise KeyFileError(f"key file {self._kek_file} has the right id but not the right key "
                               "(damaged or edited)")
        return kek

    def snapshot_key(self) -> tuple[bytes, bytes]:
        """(KEK id, key) for sealing off-site snapshots and manifests."""
        return self._kek.key_id, snapshot_key(self._kek)

    def journal_key(self, journal_id: bytes) -> bytes:
        """The key sealing one ingest journal's records (store/journal.py), derived from the KEK."""
        return _derive(self._kek, journal_id, b"pacs-vault journal v1")

    def copy_to(self, directory: Path) -> None:
        """A consistent copy of the keyring (wrapped keys only) into an empty directory."""
        self._env.copy(str(directory), compact=True)

    @property
    def kek_id(self) -> bytes:
        return self._kek.key_id

    @property
    def kek_created(self) -> int:
        """When the KEK was made (init or the last rotation), unix seconds."""
        with self._env.begin() as txn:
            raw = txn.get(b"kek_created", db=self._meta)
        return struct.unpack(">Q", raw)[0] if raw else int(self._kek_file.stat().st_mtime)

    def new_data_key(self) -> bytes:
        """Create, wrap and durably store a fresh data key; return its id."""
        key_id, data_key = os.urandom(16), os.urandom(32)
        record = {"w": _wrap(self._kek, key_id, data_key), "k": self._kek.key_id, "c": int(time.time())}
        with self._env.begin(write=True) as txn:
            txn.put(key_id, msgpack.packb(record), db=self._keys, overwrite=False)
        with self._lock:
            self._cache[key_id] = data_key
        return key_id

    def data_key(self, key_id: bytes) -> bytes:
        with self._lock:
            cached = self._cache.get(key_id)
        if cached is not None:
            return cached
        with self._env.begin() as txn:
            raw = txn.get(key_id, db=self._keys)
        if raw is None:
            raise KeyMissing(f"data key {key_id.hex()} is not in the keyring (study deleted and shredded?)")
        data_key = _unwrap(self._kek, key_id, msgpack.unpackb(raw)["w"])
        with self._lock:
            self._cache[key_id] = data_key
        return data_key

    def has(self, key_id: bytes) -> bool:
        with self._env.begin() as txn:
            return txn.get(key_id, db=self._keys) is not None

    def destroy(self, key_ids: list[bytes]) -> None:
        """Crypto-shred: delete the wrapped keys, durably."""
        with self._env.begin(write=True) as txn:
            for key_id in key_ids:
                txn.delete(key_id, db=self._keys)
        with self._lock:
            for key_id in key_ids:
                self._cache.pop(key_id, None)

    def count(self) -> int:
        with self._env.begin() as txn:
            return txn.stat(self._keys)["entries"]

    def key_ids(self) -> list[bytes]:
        with self._env.begin() as txn:
            return [bytes(k) for k in txn.cursor(db=self._keys).iternext(values=False)]

    def rotate(self) -> tuple[bytes, bytes, int]:
        """Re-wrap every data key under a new KEK; return (old id, new id, keys re-wrapped).

        Blobs are not touched. The caller must hold the home's exclusive lock."""
        old = self._kek
        new = Kek.generate()
        pending = self._kek_file.with_name(self._kek_file.name + ".new")
        write_key_file(pending, new)
        count = 0
        with self._env.begin(write=True) as txn:
            cursor = txn.cursor(db=self._keys)
            for key_id, raw in list(cursor.iternext()):
                record = msgpack.unpackb(raw)
                data_key = _unwrap(old, bytes(key_id), record["w"])
                record["w"], record["k"] = _wrap(new, bytes(key_id), data_key), new.key_id
                txn.put(key_id, msgpack.packb(record), db=self._keys)
                count += 1
            txn.put(b"kek_id", new.key_id, db=self._meta)
            txn.put(b"kek_check", new.check, db=self._meta)
            txn.put(b"kek_created", struct.pack(">Q", int(time.time())), db=self._meta)
        self._retire_and_install(pending)
        self._kek = new
        return old.key_id, new.key_id, count

    def _retire_and_install(self, pending: Path) -> None:
        retired_dir = self._kek_file.parent / "retired-keys"
        retired_dir.mkdir(mode=0o700, exist_ok=True)
        if self._kek_file.exists():
            old = read_key_file(self._kek_file)
            retired = retired_dir / f"kek-{old.key_id.hex()}.key"
            os.replace(self._kek_file, retired)
            os.chmod(retired, 0o400)
            fsync_dir(retired_dir)
        os.replace(pending, self._kek_file)
        fsync_dir(self._kek_file.parent)
