"""Connection slots come back: clients that do not read, trickle bytes or hold a /64 of IPv6
addresses cannot keep a real sender out (issue 14, item 2)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from mxspool.intake.slots import Slots, client_key
from tests.conftest import Spooler
from tests.e2e.test_backpressure import flood, flooder
from tests.smtp_client import RawClient
from tests.waiting import wait_until


def _deliver(client: RawClient, subject: str) -> int:
    client.send(b"MAIL FROM:<a@src.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n")
    assert [code for code, _ in client.replies(3)] == [250, 250, 354]
    client.send(f"Subject: {subject}\r\n\r\nhello\r\n.\r\n".encode())
    return client.reply()[0]


def _node(spooler_factory: Any, **smtp: Any) -> Spooler:
    node: Spooler = spooler_factory(smtp=smtp)
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--hold")
    node.start()
    return node


# -- 2a: an idle client that does not read is aborted, not closed politely ---------------


def test_idle_clients_that_do_not_read_give_their_slots_back(spooler_factory: Any) -> None:
    idle = 2.0
    node = _node(spooler_factory, max_connections=5, max_connections_per_ip=10, idle_timeout="2s")
    socks = [flooder(node.port) for _ in range(5)]
    # Every slot is taken now: a sender is turned away (the control for what follows). It
    # is taken before the flood, not after: the server accepts in the order clients
    # connected, so this is certain, whereas after a flood slowed by a busy machine the
    # first flooder's idle_timeout may already have run out (CI saw 220 here once).
    refused = RawClient(node.port, timeout=5)
    assert refused.reply()[0] == 421
    refused.close()
    sent = flood(socks, limit=8 << 20, seconds=6.0, stall=0.5)
    stalled = time.monotonic()
    assert all(n < 8 << 20 for n in sent), sent  # the server stopped reading each of them
    # Within idle_timeout (plus a margin) of the flood, the slots are free again.
    while True:
        client = RawClient(node.port, timeout=5)
        code, _ = client.reply()
        if code == 220:
            break
        client.close()
        assert time.monotonic() - stalled < idle + 2.0, "no slot came back after idle_timeout"
        time.sleep(0.1)
    print(f"a slot came back {time.monotonic() - stalled:.1f}s after the flood stalled")
    assert client.command("EHLO real.sender")[0] == 250
    assert _deliver(client, "after the flood") == 250
    # Soon the server holds no flooder's socket: only the real sender's stays established.
    assert node.proc is not None
    server = psutil.Process(node.proc.pid)
    while True:
        established = [
            conn
            for conn in server.net_connections(kind="tcp")
            if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == node.port
        ]
        if len(established) == 1:
            break
        assert time.monotonic() - stalled < idle + 2.0, established
        time.sleep(0.1)
    client.close()
    for sock in socks:
        sock.close()


# -- 2b: a deadline per command line and a minimum DATA rate ---------------------------


def _drip(client: RawClient, data: bytes, every: float, limit: float) -> float:
    """Send ``data`` one byte every ``every`` seconds until the server closes; seconds taken
    (or ``limit`` if it never did)."""
    started = time.monotonic()
    for byte in data:
        try:
            client.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started
        time.sleep(every)
        if time.monotonic() - started > limit:
            break
    return time.monotonic() - started


def test_a_command_line_has_a_deadline(spooler_factory: Any) -> None:
    deadline = 3.0
    node = _node(spooler_factory, command_timeout=f"{deadline}s", idle_timeout="1m")
    slow = RawClient(node.port, timeout=10)
    assert slow.reply()[0] == 220
    assert slow.command("EHLO slow.client")[0] == 250
    # Positive control, at the same time: a session longer than command_timeout, every
    # command within it, is served to the end. Its commands come ~0.6 s apart, well inside
    # the deadline even when a loaded machine stalls one of us for a second.
    normal = RawClient(node.port, timeout=10)
    assert normal.reply()[0] == 220
    assert normal.command("EHLO normal.client")[0] == 250
    started = time.monotonic()
    for _ in range(4):
        _drip(slow, b"MA", every=0.3, limit=0.5)
        assert normal.command("NOOP")[0] == 250
    assert _deliver(normal, "in time") == 250
    # The trickling client got 421 within the deadline, though it sent a byte every 0.3 s.
    taken = _drip(slow, b"IL FROM:<still typing the sender address>\r\n", every=0.3, limit=9.0)
    code, text = slow.reply()
    assert (code, text) == (421, "4.4.2 mx.test.local Error: timeout exceeded, closing connection")
    assert slow.closed_by_peer()
    elapsed = time.monotonic() - started
    print(f"trickling client closed after {elapsed:.1f}s (drip stopped after {taken:.1f}s more)")
    assert elapsed < deadline + 3.0  # long before idle_timeout, the only other reason to close
    assert normal.command("QUIT")[0] == 221


def test_data_needs_a_minimum_rate(spooler_factory: Any) -> None:
    # 100 B/s over 3 s windows: one of the fair client's 1 KiB lines covers a window, so it
    # keeps its session even if a loaded machine stalls this test for a second or two.
    node = _node(spooler_factory, min_data_rate=100, data_rate_window="3s", idle_timeout="1m")
    slow, fair = RawClient(node.port, timeout=10), RawClient(node.port, timeout=10)
    for client in (slow, fair):
        assert client.reply()[0] == 220
        assert client.command("EHLO rate.client")[0] == 250
        client.send(b"MAIL FROM:<a@src.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n")
        assert [code for code, _ in client.replies(3)] == [250, 250, 354]
    started = time.monotonic()
    slow.send(b"Subject: slow\r\n\r\n")
    fair.send(b"Subject: fair\r\n\r\n")
    # The fair client sends 1 KiB every 0.5 s (2 KiB/s, over 100 B/s) for longer than a
    # window; the slow one a byte every 0.25 s (4 B/s).
    slow_closed = None
    while time.monotonic() - started < 5.0:
        fair.send(b"x" * 998 + b"\r\n")
        for _ in range(2):
            if slow_closed is None:
                try:
                    slow.send(b"y")
                except (BrokenPipeError, ConnectionResetError):
                    slow_closed = time.monotonic() - started
            time.sleep(0.25)
    fair.send(b".\r\n")
    assert fair.reply()[0] == 250
    code, text = slow.reply()
    assert code == 421 and text.startswith("4.4.2"), (code, text)
    assert slow.closed_by_peer()
    print(f"slow DATA closed; first failed send at {slow_closed}s")
    fair.close()


# -- 2c: IPv6 clients are counted per prefix ----------------------------------------------


def test_client_key() -> None:
    assert client_key("192.0.2.7", 64) == "192.0.2.7"
    assert client_key("2001:db8:1:2:aaaa::1", 64) == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2:bbbb::9", 64) == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1", 64) == "2001:db8:1:3::/64"
    assert client_key("2001:db8:1:3::1", 48) == "2001:db8:1::/48"
    assert client_key("2001:db8:1:3::1", 128) == "2001:db8:1:3::1/128"
    assert client_key("::ffff:192.0.2.7", 64) == "192.0.2.7"
    assert client_key("fe80::1%eth0", 64) == "fe80::/64"
    assert client_key("::1", 64) == "::/64"
    assert client_key("unknown", 64) == "unknown"
    slots = Slots(total=10, per_client=2, ipv6_prefix_length=64)
    keys = [slots.key(f"2001:db8::{n:x}") for n in range(3)]
    assert slots.take(keys[0]) and slots.take(keys[1])
    assert not slots.take(keys[2])  # a third address of the same /64
    assert slots.take(slots.key("2001:db8:0:1::1"))  # the next /64 is another client
    assert slots.take(slots.key("::ffff:192.0.2.7")) and slots.take(slots.key("192.0.2.7"))
    assert not slots.take(slots.key("::ffff:192.0.2.7"))  # the same client, twice already
    slots.give_back(keys[0])
    assert slots.take(keys[2])


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_ipv6_connections_count_per_prefix(spooler_factory: Any) -> None:
    # ::1 is the only IPv6 loopback address, so this shows the per-prefix count against a real
    # listener; that two addresses of one /64 share a key is shown by test_client_key.
    from tests.conftest import free_port

    v6_port = free_port()
    node: Spooler = spooler_factory(smtp={"max_connections_per_ip": 2})
    node.config.write_text(
        node.config.read_text().replace(
            f'listen = ["127.0.0.1:{node.port}"]',
            f'listen = ["127.0.0.1:{node.port}", "[::1]:{v6_port}"]',
        )
    )
    node.start()
    wait_for_port_v6("::1", v6_port)

    def connect() -> RawClient:
        client = RawClient.__new__(RawClient)
        client.sock, client.buffer = socket.create_connection(("::1", v6_port), timeout=10), b""
        return client

    first, second, third = connect(), connect(), connect()
    assert first.reply()[0] == 220 and second.reply()[0] == 220
    assert third.reply() == (421, "4.7.0 Too many connections")
    # IPv4 clients are counted apart.
    v4 = RawClient(node.port)
    assert v4.reply()[0] == 220
    for client in (first, second, third, v4):
        client.close()


def wait_for_port_v6(host: str, port: int, source: str | None = None) -> None:
    """Until a connection to [host]:port gets its greeting (the IPv6 listener starts after the
    IPv4 one that Spooler.start waits for)."""

    def greeted() -> bool:
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                if source is not None:
                    sock.bind((source, 0))
                sock.connect((host, port))
                return sock.recv(100).startswith(b"220")
        except OSError:
            return False

    wait_until(greeted, within=15, what=f"a greeting on [{host}]:{port}")


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def network_namespace_of(pid: int) -> Iterator[None]:
    """Run the body (this thread only) in the network namespace of process ``pid``."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns into the server's network namespace")
        yield
    finally:
        libc.setns(own, CLONE_NEWNET)
        os.close(own)
        os.close(target)


def _can_make_network_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a network namespace with its own IPv6 addresses"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"needs {tool} (util-linux / iproute2)"
    probe = subprocess.run(
        ["unshare", "--net", "ip", "link", "set", "lo", "up"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.decode().strip()}"
    return None


@pytest.mark.skipif(_can_make_network_namespaces() is not None, reason="see the function")
def test_two_addresses_of_one_ipv6_64_count_as_one_client(spooler_factory: Any) -> None:
    # In a network namespace of its own, the loopback interface gets addresses in three /64s:
    # the server listens on fd00:14::1, and clients connect from fd00:14::2, fd00:14::3 (the
    # same /64) and fd00:15::1 (another); the readiness probe comes from fd00:16::1.
    from tests.conftest import MXSPOOL, free_port

    port = free_port()
    node: Spooler = spooler_factory(
        smtp={"listen": [f"[fd00:14::1]:{port}"], "max_connections_per_ip": 1}
    )
    addresses = ["fd00:14::1", "fd00:14::2", "fd00:14::3", "fd00:15::1", "fd00:16::1"]
    setup = " && ".join(
        ["ip link set lo up"] + [f"ip -6 addr add {a}/64 dev lo nodad" for a in addresses]
    )
    node.proc = subprocess.Popen(
        [
            "unshare",
            "--net",
            "sh",
            "-c",
            f'{setup} && exec "$0" --config "$1" serve',
            MXSPOOL,
            str(node.config),
        ],
        stdout=subprocess.DEVNULL,
        stderr=node.log.open("ab"),
    )

    proc = node.proc

    def serving() -> bool:
        """The namespace set-up is over: the process has exec'd mxspool."""
        assert proc.poll() is None, node.log.read_text()
        exe = f"/proc/{proc.pid}/exe"
        return os.path.exists(exe) and not os.readlink(exe).endswith(
            ("unshare", "sh", "dash", "bash")
        )

    wait_until(serving, within=15, what="the namespaced server to exec mxspool")

    def connect(source: str) -> RawClient:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(("fd00:14::1", port))
        client = RawClient.__new__(RawClient)
        client.sock, client.buffer = sock, b""
        return client

    with network_namespace_of(node.proc.pid):
        wait_for_port_v6("fd00:14::1", port, source="fd00:16::1")
        first = connect("fd00:14::2")
        assert first.reply()[0] == 220
        same_64 = connect("fd00:14::3")
        other_64 = connect("fd00:15::1")
    assert same_64.reply() == (421, "4.7.0 Too many connections")
    assert other_64.reply()[0] == 220  # another /64 is another client
    for client in (first, same_64, other_64):
        client.close()
