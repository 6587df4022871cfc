"""Test helpers for authentication at arrival: DKIM keys and signing (dkimpy), a zone that
publishes them with SPF and DMARC records, and a DNS server that never answers."""

from __future__ import annotations

import base64
import socket
import time

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import free_port

HEADERS = [b"from", b"subject", b"to"]


class Key:
    """A 1024-bit RSA DKIM key (dkimpy's minimum; one TXT string holds its public half)."""

    def __init__(self) -> None:
        private = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        self.pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        der = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public = base64.b64encode(der).decode()

    def record(self, selector: str, domain: str) -> str:
        """The zone line publishing this key."""
        return f'{selector}._domainkey.{domain}. 60 IN TXT "v=DKIM1; k=rsa; p={self.public}"'

    def sign(
        self, message: bytes, domain: str, selector: str = "sel", expire_in: int | None = None
    ) -> bytes:
        """``message`` with a DKIM-Signature on top (``x=`` now + ``expire_in`` when given)."""
        if expire_in is not None:
            return _sign_with_expiry(message, domain, selector, self.pem, expire_in) + message
        signature: bytes = dkim.DKIM(message).sign(
            selector.encode(), domain.encode(), self.pem, include_headers=HEADERS
        )
        return signature + message


def _sign_with_expiry(
    message: bytes, domain: str, selector: str, pem: bytes, expire_in: int
) -> bytes:
    """A signature with x= now + ``expire_in`` (negative: already expired). dkimpy's sign()
    writes no x=, so its header builder gets one added to the tag list it signs."""
    signer = dkim.DKIM(message)
    now = int(time.time())
    original = dkim.DKIM.gen_header  # type: ignore[attr-defined]

    def gen_header(self: dkim.DKIM, fields: list[tuple[bytes, bytes]], *args: object) -> bytes:
        fields = [f for f in fields if f[0] != b"x"]
        at = next((i for i, f in enumerate(fields) if f[0] == b"t"), len(fields) - 1)
        fields.insert(at + 1, (b"x", str(now + expire_in).encode()))
        return original(self, fields, *args)  # type: ignore[no-any-return]

    dkim.DKIM.gen_header = gen_header  # type: ignore[attr-defined]
    try:
        result: bytes = signer.sign(
            selector.encode(), domain.encode(), pem, include_headers=HEADERS
        )
    finally:
        dkim.DKIM.gen_header = original  # type: ignore[attr-defined]
    return result


def message(from_address: str, subject: str = "auth test", body: str = "Hello.\r\n") -> bytes:
    return (
        f"From: {from_address}\r\nTo: user@example.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{time.monotonic_ns()}@test>\r\n\r\n{body}"
    ).encode()


class SilentDns:
    """A UDP port on 127.0.0.1 that takes queries and never answers them."""

    def __init__(self) -> None:
        self.port = free_port()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", self.port))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.sock.close()
