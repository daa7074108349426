"""Sealing what is not a blob for the off-site copy: the index and keyring snapshots, the audit
trail, manifests, under a key derived from the KEK (keys.snapshot_key): useless without the
key file, which never goes with them."""

from __future__ import annotations

import hashlib
from pathlib import Path

from appliance.errors import IntegrityError, KeyFileError
from appliance.format import sealed


def seal_file(src: Path, dst: Path, key_id: bytes, key: bytes) -> None:
    digest = hashlib.sha256()
    with open(src, "rb") as fp:
        while chunk := fp.read(1 << 20):
            digest.update(chunk)
    with open(src, "rb") as fp, open(dst, "wb") as out:
        sealed.seal(fp, src.stat().st_size, out, data_key=key, key_id=key_id, content_address=digest.digest())


def unseal_file(src: Path, dst: Path, kek_id: bytes, key: bytes) -> None:
    with open(src, "rb") as fp, open(dst, "wb") as out:
        header_id = sealed.read_header(fp).key_id
        if header_id != kek_id:
            raise KeyFileError(f"this off-site copy is sealed under KEK {header_id.hex()[:8]}, "
                               f"the key file holds KEK {kek_id.hex()[:8]}: wrong key file")
        fp.seek(0)
        try:
            _, _, chunks = sealed.open_sealed(fp, lambda _: key)
            for chunk in chunks:
                out.write(chunk)
        except IntegrityError as exc:
            raise KeyFileError(f"the key file does not open this off-site copy ({exc})") from None
