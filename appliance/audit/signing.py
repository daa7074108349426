"""Signed checkpoints: Ed25519 over (seq, hash, time, key) of a point in the chain; the key file."""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.audit.chain import canonical, utc
from appliance.errors import KeyFileError
from appliance.fsutil import write_file_atomic

_SIGNED_LABEL = b"pacs-vault audit checkpoint v1\n"


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def sign_checkpoint(key: Ed25519PrivateKey, seq: int, digest: str, now: float) -> dict:
    body = {"seq": seq, "hash": digest, "time": utc(now), "key": public_hex(key)}
    return body | {"sig": key.sign(_SIGNED_LABEL + canonical(body)).hex()}


def checkpoint_signed(checkpoint: dict) -> bool:
    try:
        body = {k: checkpoint[k] for k in ("seq", "hash", "time", "key")}
        signature = bytes.fromhex(checkpoint["sig"])
        if signature.hex() != checkpoint["sig"]:  # only the canonical spelling: any edited byte shows
            return False
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(checkpoint["key"])).verify(
            signature, _SIGNED_LABEL + canonical(body))
        return True
    except (KeyError, ValueError, TypeError, InvalidSignature):
        return False


def generate_key(path: Path) -> str:
    """Write a new Ed25519 signing key (PEM, mode 0640: every operator's command signs its
    records); return its public key in hex."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, pem, mode=0o640)
    return public_hex(key)


def load_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise KeyFileError(f"audit key {path} is missing: nothing can be recorded, so nothing is done; "
                           "put it back from the key backup") from None
    except (OSError, ValueError, TypeError):
        raise KeyFileError(f"audit key {path} is not an Ed25519 private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"audit key {path} is not an Ed25519 private key")
    return key
