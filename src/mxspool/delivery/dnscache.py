"""DNS lookups for delivery: dnspython's async resolver behind a small TTL cache.

Only two questions are asked: MX of a domain, and the addresses (A, then AAAA) of a host; with
``[delivery] address_family`` limited to one IP version, only A or only AAAA.
Answers are cached for their TTL, capped, so a release of a million messages to one domain asks
DNS a few times, not a million. Negative answers (no such name, no records of that type) are
cached briefly. Temporary failures are never cached: the next attempt asks again.

Results are reported with the project's exceptions: ``NameNotFound`` for NXDOMAIN (a fact
about the name) and ``RoutingError`` for everything temporary (timeouts, SERVFAIL).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from mxspool import nameservers
from mxspool.config import AddressFamily, is_ip_address
from mxspool.delivery.errors import RoutingError, RoutingRefused

MAX_TTL = 300.0
"""Longest we trust an answer; an operator changing MX mid-migration waits at most this."""
NEGATIVE_TTL = 30.0
QUERY_LIFETIME = 10.0


class NameNotFound(RoutingRefused):
    """NXDOMAIN: the name does not exist."""


@dataclass(frozen=True, slots=True)
class MxRecord:
    preference: int
    exchange: str
    """Host name without the trailing dot; "." (kept as is) is the RFC 7505 null MX."""


def is_ip_literal(host: str) -> bool:
    """An address, bracketed ("[192.0.2.1]", an address literal) or not."""
    return is_ip_address(host.strip("[]"))


_Entry = tuple[float, tuple[object, ...] | NameNotFound]


def make_resolver(nameserver: str, lifetime: float) -> dns.asyncresolver.Resolver:
    """dnspython's resolver on ``[delivery] resolver`` ("host:port"), or the system's.

    Raises RoutingError (with what to do) when none can be set up.
    """
    try:
        resolver = nameservers.configure(dns.asyncresolver.Resolver, nameserver)
    except (dns.resolver.NoResolverConfiguration, OSError, ValueError) as exc:
        raise RoutingError(
            f'no DNS resolver available ({exc}); set [delivery] resolver = "host:port"'
        ) from exc
    resolver.lifetime = lifetime
    return resolver


class DnsCache:
    """MX and address lookups with a TTL cache.

    ``nameserver`` is ``[delivery] resolver`` ("host:port", or "" for the system's). Address
    lookups go through the system resolver (getaddrinfo: /etc/hosts, nscd) when no nameserver
    is configured, like Postfix's ``smtp_host_lookup = native``; MX always uses DNS.
    """

    def __init__(self, nameserver: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self._nameserver = nameserver
        self._clock = clock
        self._cache: dict[tuple[str, str], _Entry] = {}
        self._resolver: dns.asyncresolver.Resolver | None = None

    def _get_resolver(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            self._resolver = make_resolver(self._nameserver, QUERY_LIFETIME)
        return self._resolver

    def _cached(self, key: tuple[str, str]) -> tuple[object, ...] | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= self._clock():
            del self._cache[key]
            return None
        if isinstance(value, NameNotFound):
            raise value
        return value

    def _store(
        self, key: tuple[str, str], value: tuple[object, ...] | NameNotFound, ttl: float
    ) -> None:
        if len(self._cache) > 10_000:
            # A crude bound: delivery talks to a handful of destinations; never grow without end.
            self._cache.clear()
        self._cache[key] = (self._clock() + min(ttl, MAX_TTL), value)

    async def _query(self, name: str, rdtype: str) -> tuple[tuple[str, ...], float]:
        """(records as text, ttl); empty with NEGATIVE_TTL when the name has none of that type."""
        try:
            answer = await self._get_resolver().resolve(name, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            raise NameNotFound(f"{name} does not exist (DNS NXDOMAIN)") from None
        except dns.exception.Timeout:
            raise RoutingError(f"DNS timeout looking up {rdtype} of {name}") from None
        except dns.resolver.NoNameservers as exc:
            raise RoutingError(f"DNS failure looking up {rdtype} of {name}: {exc}") from None
        except (dns.exception.DNSException, OSError) as exc:
            raise RoutingError(f"DNS error looking up {rdtype} of {name}: {exc}") from None
        if answer.rrset is None:
            return (), NEGATIVE_TTL
        return tuple(rdata.to_text() for rdata in answer.rrset), float(answer.rrset.ttl)

    async def mx(self, name: str) -> tuple[MxRecord, ...]:
        """MX records of ``name`` (empty when it has none); raises NameNotFound/RoutingError."""
        key = (name.lower().rstrip("."), "MX")
        cached = self._cached(key)
        if cached is not None:
            return tuple(item for item in cached if isinstance(item, MxRecord))
        try:
            texts, ttl = await self._query(key[0], "MX")
        except NameNotFound as exc:
            self._store(key, exc, NEGATIVE_TTL)
            raise
        records = []
        for text in texts:
            preference, _, exchange = text.partition(" ")
            exchange = exchange if exchange == "." else exchange.rstrip(".").lower()
            records.append(MxRecord(int(preference), exchange))
        self._store(key, tuple(records), ttl)
        return tuple(records)

    async def addresses(self, host: str, family: AddressFamily = "any") -> tuple[str, ...]:
        """IPv4 then IPv6 addresses of ``host`` (IP literals as themselves); with ``family``
        "ipv4" or "ipv6" only that version is asked for (A or AAAA alone)."""
        if is_ip_literal(host):
            return (host.strip("[]"),)
        key = (host.lower().rstrip("."), _ADDRESS_KEYS[family])
        cached = self._cached(key)
        if cached is not None:
            return tuple(str(item) for item in cached)
        try:
            if self._nameserver:
                found, ttl = await self._dns_addresses(key[0], _QUESTIONS[family])
            else:
                found, ttl = await _system_addresses(key[0], family), MAX_TTL
        except NameNotFound as exc:
            self._store(key, exc, NEGATIVE_TTL)
            raise
        self._store(key, found, ttl if found else NEGATIVE_TTL)
        return found

    async def _dns_addresses(
        self, name: str, questions: tuple[str, ...]
    ) -> tuple[tuple[str, ...], float]:
        results = await asyncio.gather(
            *(self._query(name, rdtype) for rdtype in questions), return_exceptions=True
        )
        found: list[str] = []
        ttls: list[float] = []
        failure: BaseException | None = None
        for result in results:
            if isinstance(result, BaseException):
                failure = failure if isinstance(failure, NameNotFound) else result
            else:
                found.extend(result[0])
                ttls.append(result[1])
        if found:
            return tuple(found), min(ttls)
        if failure is not None:
            raise failure
        return (), NEGATIVE_TTL


_ADDRESS_KEYS: dict[AddressFamily, str] = {"any": "ADDR", "ipv4": "A", "ipv6": "AAAA"}
_QUESTIONS: dict[AddressFamily, tuple[str, ...]] = {
    "any": ("A", "AAAA"),
    "ipv4": ("A",),
    "ipv6": ("AAAA",),
}
_SOCKET_FAMILIES: dict[AddressFamily, int] = {
    "any": socket.AF_UNSPEC,
    "ipv4": socket.AF_INET,
    "ipv6": socket.AF_INET6,
}


async def _system_addresses(name: str, family: AddressFamily = "any") -> tuple[str, ...]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(
            name, None, family=_SOCKET_FAMILIES[family], type=socket.SOCK_STREAM
        )
    except socket.gaierror as exc:
        if family != "any" and exc.errno in _NO_DATA:
            return ()  # the name may exist with the other family: not "no such name"
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise NameNotFound(f"{name} does not exist ({exc.strerror})") from None
        raise RoutingError(f"cannot resolve {name}: {exc.strerror}") from None
    v4 = [str(info[4][0]) for info in infos if info[0] == socket.AF_INET]
    v6 = [str(info[4][0]) for info in infos if info[0] == socket.AF_INET6]
    return tuple(dict.fromkeys(v4 + v6))


_NO_DATA = (
    socket.EAI_NONAME,
    getattr(socket, "EAI_NODATA", socket.EAI_NONAME),
    getattr(socket, "EAI_ADDRFAMILY", socket.EAI_NONAME),
)
