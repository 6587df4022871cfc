"""The Ed25519 key that signs ledgers: made once, kept private, its public half handed out.

``mxspool ledger keygen`` writes the private key as PKCS#8 PEM (mode 0600, never over an
existing file) and its public half beside it (``FILE.pub``, SubjectPublicKeyInfo PEM, the form
``openssl pkeyutl -verify -pubin`` reads). The fingerprint names a key in one short line, the
way OpenSSH does: ``SHA256:`` and the unpadded base64 of the SHA-256 of the 32 raw public key
bytes. A customer compares it with the one the manifest and ``ledger verify`` print.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MAX_KEY_FILE = 64 * 1024
"""A key file larger than this is not a key: refused before it is read."""


class LedgerKeyError(Exception):
    """A key could not be made, read or parsed; the message says what to do."""


def raw_public(key: Ed25519PublicKey) -> bytes:
    """The 32 bytes of the public key (RFC 8032)."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def fingerprint(key: Ed25519PublicKey) -> str:
    """``SHA256:<unpadded base64>`` of the raw public key, as ``ssh-keygen -l`` shows keys."""
    digest = hashlib.sha256(raw_public(key)).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def write_new_key(path: Path) -> Ed25519PrivateKey:
    """A new key at ``path`` (0600) and its public half at ``path.pub``; refuses to overwrite."""
    public_path = path.with_name(path.name + ".pub")
    for existing in (path, public_path):
        if existing.exists():
            raise LedgerKeyError(
                f"{existing} exists; a ledger key is never overwritten (ledgers signed with it "
                "could no longer be matched to it). Choose another --out, or move it away first"
            )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise LedgerKeyError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public_path.write_text(public_pem(key.public_key()))
    return key


def _read_small(path: Path, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_KEY_FILE:
            raise LedgerKeyError(f"{path} is {size} bytes, too large for {what}")
        return path.read_bytes()
    except FileNotFoundError:
        raise LedgerKeyError(
            f"no {what} at {path}; make one with 'mxspool ledger keygen --out {path}'"
            if what == "a private key"
            else f"no {what} at {path}"
        ) from None
    except OSError as exc:
        raise LedgerKeyError(f"cannot read {path}: {exc.strerror}") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in the PEM file ``path`` (as ``ledger keygen`` writes it)."""
    data = _read_small(path, "a private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise LedgerKeyError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerKeyError(f"{path} is not an Ed25519 key; make one with 'mxspool ledger keygen'")
    return key


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A public key from PEM text or the base64 of its 32 raw bytes."""
    stripped = text.strip()
    if stripped.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(stripped.encode("ascii"))
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise LedgerKeyError(f"not a PEM public key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise LedgerKeyError("the public key is not an Ed25519 key")
        return key
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise LedgerKeyError(
            "the public key is neither PEM nor the base64 of 32 bytes; give the .pub file "
            "'mxspool ledger keygen' wrote"
        ) from None
    if len(raw) != 32:
        raise LedgerKeyError(f"an Ed25519 public key is 32 bytes, not {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_public_key(value: str) -> Ed25519PublicKey:
    """``--public-key``: a file (PEM, or base64 raw) or the base64 text itself."""
    path = Path(value)
    if path.is_file():
        data = _read_small(path, "a public key")
        try:
            return parse_public_key(data.decode("ascii"))
        except UnicodeDecodeError:
            raise LedgerKeyError(f"{path} is not a PEM or base64 public key") from None
    try:
        return parse_public_key(value)
    except LedgerKeyError as exc:
        raise LedgerKeyError(f"no public key file {value}, and as text: {exc}") from None
