"""Write backpressure: a client that pipelines and never reads cannot grow the server's memory.

The hostile client sends ``EHLO a`` / ``NOOP`` pairs from a socket with a tiny receive buffer and
never reads. The server must stop reading from it once its unsent replies pass a small limit (so
the sender blocks), keep serving everyone else, and still answer every command in order once the
client reads.
"""

from __future__ import annotations

import socket
import threading
import time

import psutil

from tests.conftest import Spooler
from tests.smtp_client import RawClient

UNIT = b"EHLO a\r\nNOOP\r\n"
FLOOD_LIMIT = 20 * 1024 * 1024
MIB = 1024 * 1024


def _rss(node: Spooler) -> int:
    assert node.proc is not None
    return int(psutil.Process(node.proc.pid).memory_info().rss)


def flooder(port: int) -> socket.socket:
    """A connected non-blocking socket that will hardly accept anything we do not read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def flood(
    socks: list[socket.socket], *, limit: int, seconds: float, stall: float = 1.0
) -> list[int]:
    """Send UNIT repeatedly on every socket without reading, until each has sent ``limit``
    bytes, made no progress for ``stall`` seconds or was reset, or ``seconds`` pass. Bytes
    sent each."""
    payload = UNIT * (65536 // len(UNIT))
    sent = [0] * len(socks)
    progress = [time.monotonic()] * len(socks)
    done = [False] * len(socks)
    deadline = time.monotonic() + seconds
    while not all(done) and time.monotonic() < deadline:
        moved = False
        for i, sock in enumerate(socks):
            if done[i]:
                continue
            offset = sent[i] % len(payload)  # the stream stays whole units, repeated
            try:
                n = sock.send(payload[offset:])
            except BlockingIOError:
                n = 0
            except (ConnectionResetError, BrokenPipeError):
                done[i] = True  # the server gave up on it already (its idle_timeout ran out)
                continue
            now = time.monotonic()
            if n:
                sent[i] += n
                progress[i] = now
                moved = True
            if sent[i] >= limit or now - progress[i] > stall:
                done[i] = True
        if not moved:
            time.sleep(0.005)
    return sent


def _read_exactly(sock: socket.socket, size: int, seconds: float) -> bytes:
    sock.setblocking(True)
    deadline = time.monotonic() + seconds
    data = bytearray()
    while len(data) < size:
        left = deadline - time.monotonic()
        assert left > 0, f"read {len(data)} of {size} bytes in {seconds}s"
        sock.settimeout(left)
        chunk = sock.recv(1 << 20)
        assert chunk, f"connection closed after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def test_a_client_that_never_reads_cannot_grow_server_memory(spooler: Spooler) -> None:
    # Warm up the allocator with one normal session, then measure.
    control = RawClient(spooler.port)
    greeting = control.sock.recv(4096)
    assert greeting.startswith(b"220 ")
    control.send(b"EHLO control.client\r\n")
    ehlo_code, _ = control.reply()
    assert ehlo_code == 250
    control.close()
    before = _rss(spooler)

    hostile = flooder(spooler.port)
    started = time.monotonic()
    (sent,) = flood([hostile], limit=FLOOD_LIMIT, seconds=8.0)
    after = _rss(spooler)
    print(
        f"flood: {sent / MIB:.2f} MiB sent in {time.monotonic() - started:.1f}s; "
        f"server RSS {before / MIB:.0f} -> {after / MIB:.0f} MiB"
    )
    # The server stopped reading (the sender blocked), and its memory stayed put.
    assert sent < FLOOD_LIMIT, "the server read everything a non-reading client sent"
    assert after - before < 20 * MIB, f"RSS grew by {(after - before) / MIB:.0f} MiB"

    # Positive control: meanwhile a normal client is served, a whole message included.
    client = RawClient(spooler.port, timeout=5)
    assert client.reply()[0] == 220
    client.send(b"EHLO control.client\r\n")
    ehlo_reply = client.sock.recv(4096)
    assert ehlo_reply.startswith(b"250-mx.test.local\r\n") and ehlo_reply.endswith(b"\r\n")
    client.send(b"MAIL FROM:<a@src.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n")
    assert [code for code, _ in client.replies(3)] == [250, 250, 354]
    client.send(b"Subject: control\r\n\r\nserved during the flood\r\n.\r\n")
    assert client.reply()[0] == 250
    client.close()

    # The hostile client now reads: every command is answered, in order, then QUIT closes.
    # (It sends the rest of its last command and QUIT from a thread: the server reads them
    # only as the replies before them are read.)
    remainder = -sent % len(UNIT)
    hostile.setblocking(True)
    tail = threading.Thread(
        target=hostile.sendall, args=(UNIT[len(UNIT) - remainder :] + b"QUIT\r\n",)
    )
    tail.start()
    units = (sent + remainder) // len(UNIT)
    # HELO name differs from the control's, but the EHLO reply does not depend on it.
    expected = greeting + (ehlo_reply + b"250 2.0.0 Ok\r\n") * units + b"221 2.0.0 Bye\r\n"
    received = _read_exactly(hostile, len(expected), seconds=30.0)
    tail.join(timeout=10)
    assert received == expected
    hostile.settimeout(5.0)
    assert hostile.recv(100) == b"", "the server did not close after QUIT"
    hostile.close()
