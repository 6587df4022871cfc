"""A raw SMTP client for tests: exact bytes out, replies parsed back. No dot-stuffing help."""

from __future__ import annotations

import socket
import ssl
import time


class RawClient:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection((host, port), timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """One reply (all lines of a multi-line reply), as (code, joined text)."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"connection closed; had {self.buffer!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]), "\n".join(item[4:] for item in lines)

    def replies(self, count: int) -> list[tuple[int, str]]:
        return [self.reply() for _ in range(count)]

    def command(self, line: str | bytes) -> tuple[int, str]:
        data = line if isinstance(line, bytes) else line.encode()
        self.send(data + b"\r\n")
        return self.reply()

    def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        assert not self.buffer, f"unexpected plaintext after STARTTLS: {self.buffer!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)

    def quiet_for(self, seconds: float) -> bool:
        """Wait ``seconds`` for the server to say anything: True when it sent nothing and kept
        the connection open all that time (pair with a positive control)."""
        previous = self.sock.gettimeout()
        self.sock.settimeout(seconds)
        try:
            self.sock.recv(1, socket.MSG_PEEK)  # bytes or end of stream: it was not quiet
        except TimeoutError:
            return not self.buffer
        except OSError:
            return False
        finally:
            self.sock.settimeout(previous)
        return False

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionError, TimeoutError, OSError):
            return True
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def split_received(stored: bytes) -> tuple[bytes, bytes]:
    """Our Received: field (with its folded lines) and the rest of the stored message."""
    assert stored.startswith(b"Received: "), stored[:80]
    pos = 0
    while True:
        end = stored.index(b"\r\n", pos) + 2
        if stored[end : end + 1] not in (b" ", b"\t"):
            return stored[:end], stored[end:]
        pos = end
