"""Client host names (``intake.ptr``): forward-confirmed reverse DNS against a real DNS server
on loopback (tests/delivery/dnsserver.py), with its limits: a silent DNS server, too many
lookups at once, the cache's size, names unfit for a header, loopback clients."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from mxspool import metrics
from mxspool.intake import ptr
from mxspool.intake.ptr import ReverseNames, valid_hostname
from tests.delivery.dnsserver import DnsServer
from tests.e2e.authkit import SilentDns
from tests.waiting import eventually

ZONE = """
10.2.0.192.in-addr.arpa. 120 IN PTR Mail.Sender.Test.
mail.sender.test. 60 IN A 192.0.2.10
11.2.0.192.in-addr.arpa. 60 IN PTR liar.test.
liar.test. 60 IN A 192.0.2.99
13.2.0.192.in-addr.arpa. 60 IN PTR 192.0.2.13.
13.2.0.192.in-addr.arpa. 60 IN PTR second.sender.test.
second.sender.test. 60 IN A 192.0.2.13
5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa. 60 IN PTR v6.sender.test.
v6.sender.test. 60 IN AAAA 2001:db8::5
"""


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as server:
        yield server


@pytest.fixture
def silent() -> Iterator[str]:
    """A UDP port on loopback that takes DNS queries and never answers."""
    server = SilentDns()
    yield server.address
    server.close()


def counted(result: str) -> float:
    value = metrics.REGISTRY.get_sample_value("mxspool_reverse_lookups_total", {"result": result})
    return value or 0.0


async def name_of(names: ReverseNames, address: str, within: float = 5.0) -> str | None:
    """The name ``look_up`` reports for ``address``, None if the lookup ends without one."""
    got: list[str] = []
    names.look_up(address, got.append)
    running = names._running.get(address)
    if running is not None:
        await asyncio.wait_for(asyncio.shield(running[0]), within)
    return got[0] if got else None


async def test_a_name_is_used_only_when_it_resolves_back(dns: DnsServer) -> None:
    names = ReverseNames(dns.address, 3.0)
    confirmed = counted("confirmed")
    assert await name_of(names, "192.0.2.10") == "mail.sender.test"  # lowercased
    assert counted("confirmed") == confirmed + 1
    assert await name_of(names, "2001:db8::5") == "v6.sender.test"
    assert await name_of(names, "::ffff:192.0.2.10") == "mail.sender.test"  # v4-mapped
    unconfirmed = counted("not_confirmed")
    assert await name_of(names, "192.0.2.11") is None  # liar.test points elsewhere
    assert counted("not_confirmed") == unconfirmed + 1
    no_name = counted("no_name")
    assert await name_of(names, "192.0.2.12") is None  # no PTR at all
    assert counted("no_name") == no_name + 1
    # A numeric PTR name is not a host name; the next one is tried and confirmed.
    assert await name_of(names, "192.0.2.13") == "second.sender.test"


async def test_answers_are_cached_and_shared(dns: DnsServer) -> None:
    names = ReverseNames(dns.address, 3.0)
    first: list[str] = []
    second: list[str] = []
    names.look_up("192.0.2.10", first.append)
    names.look_up("192.0.2.10", second.append)  # a second session from the same address
    assert len(names._running) == 1
    await eventually(lambda: first and second, 5, "both sessions named")
    assert first == second == ["mail.sender.test"]
    dns.stop()  # from the cache now: no DNS needed, the answer comes at once
    cached: list[str] = []
    names.look_up("192.0.2.10", cached.append)
    assert cached == ["mail.sender.test"]
    assert not names._running


async def test_a_forgotten_listener_is_not_called(dns: DnsServer) -> None:
    names = ReverseNames(dns.address, 3.0)
    gone: list[str] = []
    control: list[str] = []
    names.look_up("192.0.2.10", gone.append)
    names.look_up("192.0.2.10", control.append)
    names.forget("192.0.2.10", gone.append)
    await eventually(lambda: control, 5, "the control session named")
    assert gone == []


async def test_a_silent_dns_server_costs_the_timeout_once(silent: str, dns: DnsServer) -> None:
    names = ReverseNames(silent, 0.3)
    timeouts = counted("timeout")
    started = time.monotonic()
    assert await name_of(names, "192.0.2.10") is None
    assert 0.25 < time.monotonic() - started < 3.0
    assert counted("timeout") == timeouts + 1
    names.look_up("192.0.2.10", lambda _name: None)  # kept as a failure for FAILURE_TTL
    assert not names._running
    # Positive control: the same address through a DNS server that answers.
    assert await name_of(ReverseNames(dns.address, 3.0), "192.0.2.10") == "mail.sender.test"


async def test_lookups_at_once_are_bounded(silent: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ptr, "MAX_IN_FLIGHT", 3)
    names = ReverseNames(silent, 5.0)
    busy = counted("busy")
    for host in range(1, 6):
        names.look_up(f"192.0.2.{100 + host}", lambda _name: None)
    assert len(names._running) == 3
    assert counted("busy") == busy + 2
    names.close()
    assert not names._running


async def test_the_cache_is_bounded(dns: DnsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ptr, "CACHE_SIZE", 3)
    names = ReverseNames(dns.address, 3.0)
    for host in range(20, 26):
        await name_of(names, f"192.0.2.{host}")
    assert list(names._cache) == ["192.0.2.23", "192.0.2.24", "192.0.2.25"]  # oldest dropped


async def test_cache_entries_expire(dns: DnsServer) -> None:
    now = [1000.0]
    names = ReverseNames(dns.address, 3.0, clock=lambda: now[0])
    assert await name_of(names, "192.0.2.10") == "mail.sender.test"
    assert names._cache["192.0.2.10"][0] == 1060.0  # the shorter of the two TTLs
    now[0] = 1061.0
    names.look_up("192.0.2.10", lambda _name: None)
    assert "192.0.2.10" in names._running  # asked again
    names.close()


async def test_loopback_and_garbage_are_not_looked_up(dns: DnsServer) -> None:
    names = ReverseNames(dns.address, 3.0)
    for address in ("127.0.0.1", "::1", "127.9.9.9", "unknown", ""):
        names.look_up(address, lambda _name: None)
    assert not names._running
    names.look_up("192.0.2.10", lambda _name: None)  # positive control
    assert names._running
    names.close()


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("mail.example.com", True),
        ("a", True),
        ("host_1.example", True),
        ("x" * 63 + ".example", True),
        ("x" * 64 + ".example", False),
        (".".join(["abcdefghi"] * 26), False),  # 259 octets
        ("-bad.example", False),
        ("bad-.example", False),
        ("a..b", False),
        ("192.0.2.1", False),
        ("mail example.com", False),
        ("mail\r\nX-Injected: yes", False),
        ("mäil.example", False),
        ("", False),
    ],
)
def test_valid_hostname(name: str, valid: bool) -> None:
    assert valid_hostname(name) is valid
