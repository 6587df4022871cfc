"""``mxspool.nameservers``: a resolver on a loopback address is asked from the loopback address,
never from a socket bound to every address (which the network could aim datagrams at)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path

import dns.asyncresolver
import dns.resolver
import pytest

from mxspool import nameservers
from tests.delivery.dnsserver import DnsServer


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer("a.test. 60 IN A 192.0.2.9\n").start()
    yield server
    server.stop()


def test_blocking_queries_leave_from_loopback(
    dns_server: DnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources: list[str] = []
    sendto = socket.socket.sendto

    def recording(sock: socket.socket, *args: object) -> int:
        sent = sendto(sock, *args)  # type: ignore[call-overload]
        sources.append(sock.getsockname()[0])
        return int(sent)

    monkeypatch.setattr(socket.socket, "sendto", recording)
    resolver = nameservers.configure(dns.resolver.Resolver, dns_server.address)
    assert str(resolver.resolve("a.test", "A")[0]) == "192.0.2.9"
    assert sources and set(sources) == {"127.0.0.1"}  # not 0.0.0.0


async def test_asynchronous_queries_leave_from_loopback(dns_server: DnsServer) -> None:
    resolver = nameservers.configure(dns.asyncresolver.Resolver, dns_server.address)
    (server,) = resolver.nameservers
    assert isinstance(server, nameservers._Do53)
    answer = await asyncio.wait_for(resolver.resolve("a.test", "A"), 10)
    assert str(answer[0]) == "192.0.2.9"
    assert server._source() == "127.0.0.1"


def _route_source(address: str) -> str | None:
    """What the kernel picks to reach ``address`` (None without a route): the control."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((address, 53))
            return str(probe.getsockname()[0])
    except OSError:
        return None


def test_a_remote_resolver_is_asked_from_the_routes_own_address() -> None:
    outside = nameservers.configure(dns.resolver.Resolver, "192.0.2.53:53").nameservers[0]
    assert isinstance(outside, nameservers._Do53)
    source = outside._source()
    assert source == _route_source("192.0.2.53")
    assert source is None or not ipaddress.ip_address(source).is_unspecified
    v6 = nameservers.configure(dns.resolver.Resolver, "[::1]:5353").nameservers[0]
    assert isinstance(v6, nameservers._Do53) and v6._source() == "::1"


def test_the_system_configuration_gets_the_same_rule(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.1\nnameserver 192.0.2.53\nnameserver ::1\n")
    servers = nameservers._sourced(dns.resolver.Resolver(filename=str(conf))).nameservers
    assert all(isinstance(server, nameservers._Do53) for server in servers)
    sources = [server._source() for server in servers]  # type: ignore[union-attr]
    assert sources == ["127.0.0.1", _route_source("192.0.2.53"), "::1"]
    assert [server.port for server in servers] == [53, 53, 53]  # type: ignore[union-attr]
