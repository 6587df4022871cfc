"""``accept.py --auth on``: make authentication at arrival really evaluate during the benchmark.

The client is smtp-source on 127.0.0.1, which the intake does not SPF-check (an internal
relay) and whose generated message carries no DKIM signature. So this sets up what a real
outside sender brings: a local DNS server (dnslib, 127.0.0.1 only) publishing the sender
domain's SPF record, DKIM key and DMARC policy; ``spf_check_private`` so the loopback client is
checked; and a message file of the case's size, DKIM-signed (dkimpy), that smtp-source sends
with ``-F``. Every message then costs one SPF check (cached per client and sender), a DKIM
verification (the key from the resolver's cache after the first) and a DMARC evaluation.
"""

from __future__ import annotations

import base64
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dnslib import RCODE, RR, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

SENDER = "a@src.test"
DOMAIN = "src.test"


class _Zone(BaseResolver):  # type: ignore[misc]
    def __init__(self, zone: str) -> None:
        self.records = RR.fromZone(zone)

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        known = False
        for record in self.records:
            if record.rname == request.q.qname:
                known = True
                if record.rtype == request.q.qtype:
                    reply.add_answer(record)
        if not known:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class AuthSetup:
    """A DNS server and a signed message file; ``smtp_options`` and ``toml`` for mxspool."""

    def __init__(self) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        public = base64.b64encode(
            key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).decode()
        # A 2048-bit key does not fit one 255-byte TXT string: split it as publishers do.
        record = f"v=DKIM1; k=rsa; p={public}"
        strings = " ".join(f'"{record[i : i + 250]}"' for i in range(0, len(record), 250))
        zone = "\n".join(
            [
                f"sel._domainkey.{DOMAIN}. 3600 IN TXT {strings}",
                f'{DOMAIN}. 3600 IN TXT "v=spf1 ip4:127.0.0.1 -all"',
                f'_dmarc.{DOMAIN}. 3600 IN TXT "v=DMARC1; p=reject"',
            ]
        )
        self.port = _free_port()
        self._server = DNSServer(
            _Zone(zone), port=self.port, address="127.0.0.1", logger=DNSLogger(logf=lambda _: None)
        )
        self._server.start_thread()
        self._dir = tempfile.TemporaryDirectory(prefix="mxspool-bench-auth-")
        self._files: dict[int, Path] = {}

    @property
    def smtp_options(self) -> dict[str, str | int | bool]:
        return {"authentication": True, "spf_check_private": True}

    @property
    def toml(self) -> str:
        return f'\n[delivery]\nresolver = "127.0.0.1:{self.port}"\n'

    def message_file(self, size: int) -> str:
        """A DKIM-signed message with a body of about ``size`` bytes, for smtp-source -F."""
        if size not in self._files:
            line = "x" * 76 + "\r\n"
            body = (line * max(1, size // len(line))).encode()
            message = (
                f"From: {SENDER}\r\nTo: u@example.test\r\nSubject: bench\r\n"
                f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
                f"Message-ID: <bench-{size}@{DOMAIN}>\r\n\r\n"
            ).encode() + body
            signature = dkim.DKIM(message).sign(
                b"sel", DOMAIN.encode(), self._pem, include_headers=[b"from", b"to", b"subject"]
            )
            path = Path(self._dir.name) / f"signed-{size}.eml"
            # smtp-source appends CRLF to each line it reads: store LF line ends.
            path.write_bytes((signature + message).replace(b"\r\n", b"\n"))
            self._files[size] = path
        return str(self._files[size])

    def close(self) -> None:
        self._server.stop()
        self._dir.cleanup()


def check(setup: AuthSetup, db_path: str) -> str:
    """The tags of one stored message of a run: proof that it was really evaluated."""
    import sqlite3

    with sqlite3.connect(db_path) as conn:
        row = conn.execute("SELECT tags FROM messages WHERE auth_at IS NOT NULL LIMIT 1").fetchone()
    return str(row[0]) if row else "(no verdict stored)"
