"""Routing: static routes and MX (order, implicit MX, null MX, NXDOMAIN) via a local DNS server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mxspool.delivery.dnscache import DnsCache
from mxspool.delivery.errors import RoutingError, RoutingRefused
from mxspool.delivery.routing import Hop, Router
from mxspool.store.base import Domain, DomainMode, Route
from mxspool.store.sqlite import SqliteStore
from tests.delivery.conftest import (
    DOMAIN,
    EngineFactory,
    add_domain,
    put_message,
    rows,
    wait_for,
)
from tests.delivery.dnsserver import DnsServer
from tests.delivery.target import Target

ZONE = """
mx-target.test.   60 IN MX 20 backup.test.
mx-target.test.   60 IN MX 10 primary.test.
primary.test.     60 IN A 127.0.0.1
backup.test.      60 IN A 127.0.0.1
dead-first.test.  60 IN MX 10 dead.test.
dead-first.test.  60 IN MX 20 primary.test.
dead.test.        60 IN A 127.0.0.2
implicit.test.    60 IN A 127.0.0.1
nullmx.test.      0  IN MX 0 .
dualstack.test.   60 IN A 127.0.0.1
dualstack.test.   60 IN AAAA ::1
example.test.     60 IN MX 5 primary.test.
noaddr-mx.test.   60 IN MX 10 nowhere.test.
nowhere.test.     60 IN TXT "no address here"
"""


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    server = DnsServer(ZONE).start()
    yield server
    server.stop()


def _domain(routes: tuple[Route, ...], use_mx: bool, name: str = DOMAIN) -> Domain:
    return Domain(name=name, mode=DomainMode.RELAY, routes=routes, use_mx=use_mx)


async def test_mx_in_preference_order(dns: DnsServer) -> None:
    router = Router(DnsCache(dns.address))
    hops = await router.hops(_domain((Route("mx-target.test", 2600),), True))
    assert hops == [Hop("primary.test", "127.0.0.1", 2600), Hop("backup.test", "127.0.0.1", 2600)]


async def test_mx_of_the_domain_itself_when_no_route(dns: DnsServer) -> None:
    router = Router(DnsCache(dns.address))
    assert await router.hops(_domain((), True)) == [Hop("primary.test", "127.0.0.1", 25)]


async def test_implicit_mx_uses_the_domains_addresses(dns: DnsServer) -> None:
    router = Router(DnsCache(dns.address))
    hops = await router.hops(_domain((Route("implicit.test", 2600),), True))
    assert hops == [Hop("implicit.test", "127.0.0.1", 2600)]


async def test_null_mx_is_a_permanent_refusal(dns: DnsServer) -> None:
    router = Router(DnsCache(dns.address))
    with pytest.raises(RoutingRefused, match="null MX"):
        await router.hops(_domain((Route("nullmx.test", 25),), True))


async def test_nxdomain_is_a_permanent_refusal(dns: DnsServer) -> None:
    router = Router(DnsCache(dns.address))
    with pytest.raises(RoutingRefused, match="does not exist"):
        await router.hops(_domain((Route("missing.test", 25),), True))


async def test_mx_host_without_address_is_temporary(dns: DnsServer) -> None:
    router = Router(DnsCache(dns.address))
    with pytest.raises(RoutingError) as info:
        await router.hops(_domain((Route("noaddr-mx.test", 25),), True))
    assert not info.value.permanent


async def test_static_route_every_address_ipv4_first(dns: DnsServer) -> None:
    router = Router(DnsCache(dns.address))
    hops = await router.hops(
        _domain((Route("dualstack.test", 2600), Route("192.0.2.7", 26)), False)
    )
    assert hops == [
        Hop("dualstack.test", "127.0.0.1", 2600),
        Hop("dualstack.test", "::1", 2600),
        Hop("192.0.2.7", "192.0.2.7", 26),
    ]


async def test_dns_timeout_is_temporary() -> None:
    from tests.conftest import free_port

    cache = DnsCache(f"127.0.0.1:{free_port()}")  # nothing answers there
    cache._get_resolver().lifetime = 0.5
    with pytest.raises(RoutingError) as info:
        await Router(cache).hops(_domain((Route("mx-target.test", 25),), True))
    assert not info.value.permanent


async def test_answers_are_cached() -> None:
    own = DnsServer(ZONE).start()
    cache = DnsCache(own.address)
    first = await cache.mx("mx-target.test")
    own.stop()
    assert await cache.mx("mx-target.test") == first


async def test_delivery_by_mx_skips_a_dead_first_mx(
    store: SqliteStore, target: Target, engine: EngineFactory, dns: DnsServer
) -> None:
    await add_domain(
        store, 0, hold=False, routes=(Route("dead-first.test", target.port),), use_mx=True
    )
    _, data = await put_message(store, [f"a@{DOMAIN}"])
    engine(resolver=dns.address)
    await wait_for(lambda: len(target.recorder.received) == 1)
    assert target.recorder.deliveries() == [(f"a@{DOMAIN}", data)]
    await wait_for(lambda: _delivered(store))
    (row,) = await rows(store)
    attempts = await store.attempts(row.id)
    assert attempts[-1].destination == f"primary.test[127.0.0.1]:{target.port}"


async def _delivered(store: SqliteStore) -> bool:
    return all(row.state == "delivered" for row in await rows(store))


async def test_null_mx_parks_with_reason(
    store: SqliteStore, engine: EngineFactory, dns: DnsServer
) -> None:
    await add_domain(store, 0, hold=False, routes=(Route("nullmx.test", 25),), use_mx=True)
    await put_message(store, [f"a@{DOMAIN}"])
    engine(resolver=dns.address)
    await wait_for(lambda: _parked(store))
    (row,) = await rows(store)
    assert "null MX" in (row.remote_reply or "")


async def _parked(store: SqliteStore) -> bool:
    data = await rows(store)
    return bool(data) and all(row.state == "parked" for row in data)
