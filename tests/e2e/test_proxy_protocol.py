"""PROXY protocol behind a real HAProxy (Debian's `haproxy`, run in the foreground): the client's
own address is the one in the Received: line, the stored client address and the per-IP slots
(issue 13, point 4). HAProxy connects to mxspool from 127.0.0.2, the only address in proxy_from;
clients bind their own loopback source address (127.0.0.5, 127.0.0.6) before connecting."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from mxspool.config import SmtpConfig
from mxspool.intake.slots import Slots, in_networks
from mxspool.smtp.proxyproto import V2_SIGNATURE, build_v1, build_v2
from mxspool.store.base import ClientInfo
from mxspool.store.sqlite import SqliteStore
from tests.conftest import Spooler, free_port
from tests.smtp_client import RawClient, split_received
from tests.waiting import wait_until

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
BALANCER = "127.0.0.2"  # HAProxy's source address towards mxspool: listed in proxy_from


class Client(RawClient):
    """A RawClient whose socket is bound to a chosen loopback source address."""

    def __init__(self, port: int, source: str, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout, (source, 0))
        self.buffer = b""


class HAProxy:
    """`haproxy -db` with one TCP frontend on 127.0.0.1 and one backend server: mxspool."""

    def __init__(self, root: Path, backend_port: int, option: str, source: str) -> None:
        assert Path(HAPROXY).exists(), "haproxy is missing: apt-get install -y haproxy"
        self.port = free_port()
        self.config = root / f"haproxy-{self.port}.cfg"
        self.config.write_text(
            "global\n  maxconn 200\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n"
            "  timeout server 30s\n"
            f"frontend smtp\n  bind 127.0.0.1:{self.port}\n  default_backend mx\n"
            f"backend mx\n  server mx 127.0.0.1:{backend_port} source {source} {option}\n"
        )
        self.log = root / f"haproxy-{self.port}.log"
        self.proc = subprocess.Popen(
            [HAPROXY, "-f", str(self.config), "-db"],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        wait_until(self._listening, 10, f"haproxy listening on 127.0.0.1:{self.port}")

    def _listening(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        probe = socket.socket()
        try:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0
        finally:
            probe.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Any]:
    started: list[HAProxy] = []

    def make(backend_port: int, option: str = "send-proxy", source: str = BALANCER) -> HAProxy:
        proxy = HAProxy(tmp_path, backend_port, option, source)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


def _node(spooler_factory: Any, **smtp: Any) -> Spooler:
    smtp = {"proxy_from": [f"{BALANCER}/32"], "proxy_timeout": "1s", **smtp}
    node: Spooler = spooler_factory(smtp=smtp)
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--hold")
    node.start()
    return node


def _send(client: RawClient, subject: str) -> str:
    """One message over a greeted session; its queue id."""
    assert client.command("EHLO client.example")[0] == 250
    client.send(b"MAIL FROM:<a@src.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n")
    assert [code for code, _ in client.replies(3)] == [250, 250, 354]
    client.send(f"Subject: {subject}\r\n\r\nhello\r\n.\r\n".encode())
    code, text = client.reply()
    assert code == 250, text
    return text.rsplit(" ", 1)[-1]


def stored_client(node: Spooler, queue_id: str) -> tuple[ClientInfo, bytes]:
    """The stored client record and our Received: line of a message, read from the store."""

    async def read() -> tuple[ClientInfo, bytes]:
        store = SqliteStore(f"sqlite:///{node.db}")
        await store.open()
        try:
            message = await store.get_message(queue_id)
            assert message is not None
            body = b"".join([piece async for piece in store.read_body(queue_id)])
            return message.client, split_received(body)[0]
        finally:
            await store.close()

    return asyncio.run(read())


def _stored_address(node: Spooler, queue_id: str) -> tuple[str, bytes]:
    client, received = stored_client(node, queue_id)
    return client.address, received


def test_the_real_client_address_via_haproxy_v1_and_v2(spooler_factory: Any, haproxy: Any) -> None:
    node = _node(spooler_factory)
    v1 = haproxy(node.port, "send-proxy")
    v2 = haproxy(node.port, "send-proxy-v2")
    plain = haproxy(node.port, "", source="127.0.0.3")  # no PROXY: the positive control
    sent = {}
    for name, proxy in (("v1", v1), ("v2", v2), ("plain", plain)):
        client = Client(proxy.port, "127.0.0.5")
        assert client.reply()[0] == 220
        sent[name] = _send(client, name)
        assert client.command("QUIT")[0] == 221
        client.close()
    for name in ("v1", "v2"):
        address, received = _stored_address(node, sent[name])
        assert address == "127.0.0.5", name
        assert b"from client.example ([127.0.0.5])" in received, received
    # Without the PROXY protocol the balancer's address is all there is.
    address, received = _stored_address(node, sent["plain"])
    assert address == "127.0.0.3"
    assert b"[127.0.0.3]" in received and b"127.0.0.5" not in received
    # A v2 LOCAL header (a health check) names no client: the connection's own address counts.
    client = Client(node.port, BALANCER)
    client.send(build_v2(None))
    assert client.reply()[0] == 220
    address, received = _stored_address(node, _send(client, "local"))
    assert address == BALANCER
    assert f"[{BALANCER}]".encode() in received
    client.close()


def test_per_ip_slots_count_the_real_clients(spooler_factory: Any, haproxy: Any) -> None:
    node = _node(spooler_factory, max_connections_per_ip=1)
    proxy = haproxy(node.port, "send-proxy-v2")
    first = Client(proxy.port, "127.0.0.5")
    second = Client(proxy.port, "127.0.0.6")  # the same balancer, another client: served
    assert first.reply()[0] == 220
    assert second.reply()[0] == 220
    again = Client(proxy.port, "127.0.0.5")  # the first client's second connection: refused
    assert again.reply() == (421, "4.7.0 Too many connections")
    assert again.closed_by_peer()
    again.close()
    _send(second, "second client")
    # Once the first client leaves, its address gets a session again.
    assert first.command("QUIT")[0] == 221
    first.close()

    def greeted() -> bool:
        client = Client(proxy.port, "127.0.0.5")
        try:
            return client.reply()[0] == 220
        finally:
            client.close()

    wait_until(greeted, 10, "a session for 127.0.0.5 after its first one quit")
    second.close()


def _unlisted_address_is_refused(node: Spooler) -> None:
    v2 = build_v2(("192.0.2.7", 1234), ("127.0.0.1", 25))
    for pieces in (
        [build_v1(("192.0.2.7", 1234), ("127.0.0.1", 25))],
        [v2],
        [v2[:5], v2[5:]],  # a beginning too short to tell waits for the next bytes
    ):
        client = Client(node.port, "127.0.0.1")
        assert client.reply()[0] == 220
        for piece in pieces:
            client.send(piece)
        code, text = client.reply()
        assert (code, text) == (
            421,
            "4.7.0 mx.test.local PROXY protocol not accepted here, closing",
        )
        assert client.closed_by_peer()
        client.close()
    # Positive control: the same address is served when it speaks SMTP.
    client = Client(node.port, "127.0.0.1")
    assert client.reply()[0] == 220
    _send(client, "direct")
    client.close()
    assert "not in [smtp] proxy_from" in node.log.read_text()


def _silent_close(client: RawClient, within: float) -> tuple[bytes, float]:
    """Everything the server sent until it closed, and how long that took (at most within)."""
    client.sock.settimeout(within)
    started = time.monotonic()
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := client.sock.recv(4096):
            got += chunk
    return got, time.monotonic() - started


def test_headers_only_from_proxy_from_and_only_valid_ones(spooler_factory: Any) -> None:
    node = _node(spooler_factory)  # proxy_timeout 1s
    _unlisted_address_is_refused(node)

    def dropped(reason: str) -> float:
        return node.metric("mxspool_smtp_rejected_total", reason=reason)

    # Silent: closed once proxy_timeout has passed, without a 220.
    started = time.monotonic()
    silent = Client(node.port, BALANCER)
    got, _ = _silent_close(silent, within=10)
    taken = time.monotonic() - started
    assert got == b""
    assert 1.0 <= taken < 6.0, taken
    assert (dropped("proxy_timeout"), dropped("proxy_header")) == (1.0, 0.0)
    silent.close()
    # Plain SMTP, garbage, a v1 line too long, a v2 header too large: closed at once, no 220,
    # for the header (not the timeout, which a loaded machine could make look the same).
    for number, data in enumerate(
        (
            b"EHLO client.example\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"PROXY TCP4 " + b"1" * 120,
            V2_SIGNATURE + b"\x21\x11\xff\xff",
        ),
        start=1,
    ):
        client = Client(node.port, BALANCER)
        client.send(data)
        got, taken = _silent_close(client, within=10)
        assert got == b"", data
        assert taken < 5.0, (data, taken)
        assert (dropped("proxy_timeout"), dropped("proxy_header")) == (1.0, number), data
        client.close()
    # Positive control: the same address with a header is greeted and served.
    client = Client(node.port, BALANCER)
    client.send(build_v1(("198.51.100.9", 4000), ("127.0.0.1", node.port)))
    assert client.reply()[0] == 220
    address, _ = _stored_address(node, _send(client, "after the bad ones"))
    assert address == "198.51.100.9"
    client.close()
    log = node.log.read_text()
    assert "no whole PROXY header within 1s" in log
    assert "closing the connection from load balancer 127.0.0.2" in log


def test_a_client_behind_the_balancer_cannot_send_its_own_header(spooler_factory: Any) -> None:
    node = _node(spooler_factory)
    client = Client(node.port, BALANCER)
    # The balancer's header, then the client's first bytes: another header.
    client.send(build_v1(("198.51.100.9", 4000), ("127.0.0.1", 25)))
    assert client.reply()[0] == 220
    client.send(build_v1(("203.0.113.1", 4000), ("127.0.0.1", 25)))
    assert client.reply()[0] == 421
    assert client.closed_by_peer()
    client.close()
    assert "refusing a PROXY protocol header from 127.0.0.2" in node.log.read_text()


# -- the pieces: configuration and slots ----------------------------------------------------


def test_proxy_from_takes_networks_only() -> None:
    assert SmtpConfig(proxy_from=["10.0.0.0/24", "2001:db8::/32", "192.0.2.1"]).proxy_from
    with pytest.raises(ValidationError, match="is not a network: write an address or a CIDR"):
        SmtpConfig(proxy_from=["10.0.0.0/33"])
    with pytest.raises(ValidationError):
        SmtpConfig(proxy_timeout="0s")


def test_slots_for_a_client_named_later() -> None:
    slots = Slots(total=2, per_client=1, ipv6_prefix_length=64)
    assert slots.take_unknown() and slots.take_unknown()
    assert not slots.take_unknown()  # the balancer's connections count in the total
    assert slots.name_client("192.0.2.1")
    assert not slots.name_client("192.0.2.1")  # that client's limit; nothing counted
    slots.give_back(None)  # the one refused gives back its place in the total
    assert slots.per_key == {"192.0.2.1": 1}
    slots.give_back("192.0.2.1")
    assert slots.open == 0 and not slots.per_key


def test_in_networks() -> None:
    networks = [ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("2001:db8::/32")]
    assert in_networks("10.0.0.9", networks)
    assert in_networks("::ffff:10.0.0.9", networks)  # a dual-stack socket's IPv4 client
    assert in_networks("2001:db8::1", networks)
    assert not in_networks("10.0.1.9", networks)
    assert not in_networks("unknown", networks)
    assert not in_networks("10.0.0.9", [])
