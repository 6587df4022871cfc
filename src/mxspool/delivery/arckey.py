"""The ARC sealing key: loading it, making one, and the DNS record that publishes it.

The spooler seals released mail (``delivery.arc``) with a private key whose public half is
published like a DKIM key, at ``<selector>._domainkey.<domain>`` (RFC 8617 section 4.1.3
reuses RFC 6376's key records). The key file is PEM, as OpenSSL and ``mxspool arc keygen``
write it: RSA, PKCS#1 or PKCS#8, at least 1024 bits (2048 recommended). It is read with
``cryptography`` and handed to dkimpy as the PKCS#1 PEM dkimpy takes, so every mistake
(unreadable, encrypted, another key type, too short) is found at start with a message that
names the file and says what to do.

ARC signs with rsa-sha256 only (RFC 8617 section 4.1.3 defines no other algorithm, and dkimpy
and Exchange Online verify no other): an Ed25519 key, usable for DKIM (RFC 8463), is refused
with that reason.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

MIN_RSA_BITS = 1024
"""RFC 8301: verifiers refuse shorter RSA keys (dkimpy's default minimum too)."""
DEFAULT_RSA_BITS = 2048
TXT_STRING_LIMIT = 255
"""The longest character-string in a TXT record (RFC 1035 section 3.3)."""


class ArcKeyError(Exception):
    """The ARC key cannot be used; the message names the file and says what to do."""


@dataclass(frozen=True, slots=True)
class ArcKey:
    private: bytes
    """The private key as dkimpy's signer takes it (PKCS#1 PEM)."""
    public: bytes
    """The p= value: the base64 SubjectPublicKeyInfo."""
    bits: int

    @property
    def dns_record(self) -> str:
        """The TXT record's value: ``v=DKIM1; k=rsa; p=MIIB...``."""
        return f"v=DKIM1; k=rsa; p={self.public.decode('ascii')}"


def txt_strings(value: str) -> list[str]:
    """``value`` cut into character-strings of at most 255 bytes (a 2048-bit key's record
    is longer than one string can hold; resolvers join them)."""
    return [value[i : i + TXT_STRING_LIMIT] for i in range(0, len(value), TXT_STRING_LIMIT)]


def zone_line(selector: str, domain: str, key: ArcKey) -> str:
    """The record as a zone-file line: ``S._domainkey.D. IN TXT "..." "..."``."""
    strings = " ".join(f'"{part}"' for part in txt_strings(key.dns_record))
    return f"{selector}._domainkey.{domain}. IN TXT {strings}"


def _from_private(private: object, where: str) -> ArcKey:
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < MIN_RSA_BITS:
            raise ArcKeyError(
                f"{where}: the RSA key has {private.key_size} bits; receivers refuse keys "
                f"under {MIN_RSA_BITS} bits: make a new one with 'mxspool arc keygen'"
            )
        pkcs1 = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        spki = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return ArcKey(pkcs1, base64.b64encode(spki), private.key_size)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        raise ArcKeyError(
            f"{where}: the key is Ed25519; ARC seals are RSA only (RFC 8617 defines "
            "rsa-sha256 alone): make an RSA key with 'mxspool arc keygen'"
        )
    raise ArcKeyError(
        f"{where}: the key is a {type(private).__name__.removeprefix('_')}, not RSA or "
        "Ed25519; make an RSA key with 'mxspool arc keygen'"
    )


def load_key(path: str | Path) -> ArcKey:
    """The key in the PEM file ``path``; raises ArcKeyError saying what is wrong."""
    where = f"[arc] key_file {path}"
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ArcKeyError(
            f"{where}: cannot read it ({exc.strerror or exc}); check the path and that the "
            "user running mxspool can read it (mode 0600, owned by that user)"
        ) from None
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ArcKeyError(
            f"{where}: the key is encrypted; store it without a passphrase "
            "(openssl pkey -in KEY -out KEY.plain), readable only by mxspool"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ArcKeyError(
            f"{where}: not a PEM private key ({exc}); give the file that "
            "'mxspool arc keygen' wrote (-----BEGIN PRIVATE KEY-----)"
        ) from None
    return _from_private(private, where)


def generate(bits: int = DEFAULT_RSA_BITS) -> tuple[bytes, ArcKey]:
    """A new RSA key: (its PKCS#8 PEM, the ArcKey)."""
    if bits < MIN_RSA_BITS:
        raise ArcKeyError(f"--bits {bits}: receivers refuse RSA keys under {MIN_RSA_BITS} bits")
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, _from_private(private, "the new key")


def write_new_key(path: str | Path, bits: int = DEFAULT_RSA_BITS) -> ArcKey:
    """Make a key and write it to ``path``, mode 0600; never overwrites (ArcKeyError)."""
    pem, key = generate(bits)
    try:
        # O_EXCL: an existing key (perhaps the one published in DNS) is never replaced.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ArcKeyError(
            f"{path} exists; mxspool never overwrites a key (its public half may be in DNS). "
            "Choose another --out, or remove the file yourself if it is unused"
        ) from None
    except OSError as exc:
        raise ArcKeyError(f"cannot create {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
        out.flush()
        os.fsync(out.fileno())
    return key
