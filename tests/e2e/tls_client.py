"""STARTTLS from the test side: which certificate does a new connection get?"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

from cryptography import x509

HOST = "127.0.0.1"


@dataclass
class TlsSession:
    """An SMTP session after STARTTLS, kept open to show that it survives a reload."""

    sock: ssl.SSLSocket
    cert: x509.Certificate

    def command(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\r\n")
        return _reply(self.sock)

    def close(self) -> None:
        try:
            self.command("QUIT")
        except OSError:
            pass
        self.sock.close()


def _reply(sock: socket.socket) -> str:
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"connection closed; got {data!r}")
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and len(lines[-2]) >= 4 and lines[-2][3:4] == b" ":
            return data.decode()


def starttls(
    port: int, *, cafile: str | None = None, server_hostname: str = "mx.test.local"
) -> TlsSession:
    """Connect, EHLO, STARTTLS; verify against ``cafile`` (chain and name) when given."""
    if cafile:
        context = ssl.create_default_context(cafile=cafile)
    else:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection((HOST, port), timeout=10)
    try:
        assert _reply(raw).startswith("220"), "no greeting"
        raw.sendall(b"EHLO client.test\r\n")
        ehlo = _reply(raw)
        assert "STARTTLS" in ehlo, f"STARTTLS not offered: {ehlo!r}"
        raw.sendall(b"STARTTLS\r\n")
        assert _reply(raw).startswith("220"), "STARTTLS refused"
        sock = context.wrap_socket(raw, server_hostname=server_hostname)
    except BaseException:
        raw.close()
        raise
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    session = TlsSession(sock, x509.load_der_x509_certificate(der))
    assert session.command("EHLO client.test").startswith("250")
    return session


def served_serial(port: int) -> int | None:
    """The serial of the certificate a new STARTTLS gets (None while STARTTLS is not offered)."""
    try:
        session = starttls(port)
    except AssertionError:
        return None
    try:
        return session.cert.serial_number
    finally:
        session.close()
