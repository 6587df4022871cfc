"""Where a domain's mail goes: the ordered list of hops to try.

Static routes are tried in the configured order, every address of each host. MX routing
(``Domain.use_mx``) looks up the MX records of each route host, or of the domain itself when it
has no routes: lowest preference first (equal preferences shuffled, RFC 5321 section 5.1), the
domain's own addresses when it has no MX (the implicit MX), and a null MX (RFC 7505) means the
destination takes no mail at all, which parks the recipients instead of retrying for days.

Only addresses of the IP version the outbound identity allows for the domain are used
(``identity.OutboundIdentity.family_for``: ``[delivery] address_family``, narrowed to IPv4 by the
``exchange-online`` profile); with one version allowed, only that version is looked up. A host
that has addresses, but none of the allowed version, is a temporary routing error whose reason
says so (deferred, not parked: the fix is a configuration or DNS change).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mxspool.config import AddressFamily
from mxspool.delivery.dnscache import DnsCache, MxRecord, is_ip_literal
from mxspool.delivery.errors import DeliveryError, RoutingError, RoutingRefused
from mxspool.delivery.identity import NO_IDENTITY, OutboundIdentity, allowed
from mxspool.store.base import Domain

MAX_HOPS = 10
"""Bound on connection attempts per delivery round, like Postfix's smtp_mx_address_limit."""


@dataclass(frozen=True, slots=True)
class Hop:
    """One address to connect to, with the host name a certificate must match."""

    name: str
    address: str
    port: int

    def __str__(self) -> str:
        address = f"[{self.address}]"
        if self.name == self.address:
            return f"{address}:{self.port}"
        return f"{self.name}{address}:{self.port}"


class Router:
    """Turns a domain's routing configuration into hops, using ``DnsCache``."""

    def __init__(self, dns: DnsCache, identity: OutboundIdentity = NO_IDENTITY) -> None:
        self.dns = dns
        self.identity = identity

    async def hops(self, domain: Domain) -> list[Hop]:
        """Hops in the order to try; raises RoutingRefused (park) or RoutingError (retry)."""
        family = self.identity.family_for(domain.profile)
        if family is None:
            raise RoutingError(
                f"no IP version allowed for {domain.name}: the {domain.profile} profile delivers "
                "over IPv4 only (the target's inbound connector lists the spooler's IPv4 "
                f'address) but [delivery] address_family = "{self.identity.family}"; set it to '
                '"any" or "ipv4", or configure tls_client_cert so the connector recognises the '
                "spooler by its certificate"
            )
        if domain.use_mx:
            targets = [(route.host, route.port) for route in domain.routes]
            targets = targets or [(domain.name, 25)]
            return await self._collect([(host, port, True) for host, port in targets], family)
        if not domain.routes:
            raise RoutingError(
                f"domain {domain.name} has no route; set one with "
                f"'mxspool domain route {domain.name} --route HOST[:PORT]' (or --mx)"
            )
        return await self._collect(
            [(route.host, route.port, False) for route in domain.routes], family
        )

    async def mx_hops(self, name: str, port: int = 25) -> list[Hop]:
        """Hops for mail to the domain ``name`` by its MX records (used for DSNs too)."""
        return await self._collect([(name, port, True)], self.identity.family)

    async def _collect(
        self, targets: list[tuple[str, int, bool]], family: AddressFamily
    ) -> list[Hop]:
        hops: list[Hop] = []
        errors: list[DeliveryError] = []
        for host, port, by_mx in targets:
            try:
                if by_mx:
                    found = await self._by_mx(host, port, family)
                else:
                    found = await self._by_host(host, port, family)
            except DeliveryError as exc:
                errors.append(exc)
                continue
            hops.extend(hop for hop in found if hop not in hops)
        if hops:
            return hops[:MAX_HOPS]
        reason = "; ".join(str(error) for error in errors) or "no hop found"
        if errors and all(error.permanent for error in errors):
            raise RoutingRefused(reason)
        raise RoutingError(reason)

    async def _addresses(self, host: str, family: AddressFamily) -> tuple[str, ...]:
        """The host's addresses of ``family``; raises RoutingError when it has addresses,
        but none of that family (empty only when it has none at all)."""
        found = tuple(a for a in await self.dns.addresses(host, family) if allowed(a, family))
        if found or family == "any":
            return found
        others = await self.dns.addresses(host)
        if not others:
            return ()
        version = "IPv4" if family == "ipv4" else "IPv6"
        raise RoutingError(
            f"{host} has no {version} address ({', '.join(others[:4])} not used): delivery "
            f"may use {version} only ([delivery] address_family, or the domain's profile); "
            f"route to a host with an {version} address or change address_family"
        )

    async def _by_host(self, host: str, port: int, family: AddressFamily) -> list[Hop]:
        addresses = await self._addresses(host, family)
        if not addresses:
            raise RoutingError(f"{host} has no A or AAAA record")
        name = host.strip("[]") if is_ip_literal(host) else host
        return [Hop(name, address, port) for address in addresses]

    async def _by_mx(self, name: str, port: int, family: AddressFamily) -> list[Hop]:
        if is_ip_literal(name):
            return await self._by_host(name, port, family)
        records = await self.dns.mx(name)
        if not records:
            # RFC 5321 section 5.1: no MX means the domain itself is the (implicit) MX.
            addresses = await self._addresses(name, family)
            if not addresses:
                raise RoutingRefused(f"{name} has no MX and no A/AAAA record; it takes no mail")
            return [Hop(name, address, port) for address in addresses]
        usable = [record for record in records if record.exchange not in (".", "")]
        if not usable:
            raise RoutingRefused(
                f"{name} publishes a null MX (RFC 7505): it accepts no mail; check the domain "
                "name or re-route with 'mxspool domain route'"
            )
        hops: list[Hop] = []
        errors: list[str] = []
        for record in _ordered(usable):
            try:
                addresses = await self._addresses(record.exchange, family)
            except DeliveryError as exc:
                errors.append(str(exc))
                continue
            hops.extend(Hop(record.exchange, address, port) for address in addresses)
        if not hops:
            detail = "; ".join(errors) or "no addresses"
            # An MX host without address is usually a DNS change in progress: retry later.
            raise RoutingError(f"no MX host of {name} has an address ({detail})")
        return hops


def _ordered(records: list[MxRecord]) -> list[MxRecord]:
    """Lowest preference first; equal preferences in random order to spread load."""
    shuffled = records[:]
    random.shuffle(shuffled)
    return sorted(shuffled, key=lambda record: record.preference)
