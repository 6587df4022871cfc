"""Connection slots: how many SMTP sessions are open, in all and per client network.

``max_connections_per_ip`` counts an IPv4 client per address, but an IPv6 client per prefix
(``ipv6_prefix_length``, a /64 by default): one host usually holds a whole /64 and can pick a new
source address for every connection, so counting exact IPv6 addresses would let it fill every
slot. An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, what a dual-stack socket reports for an
IPv4 client) counts as the IPv4 address it carries.

Behind a load balancer that sends the PROXY protocol the client is known only once the header is
read: the connection takes its place in the total at once (:meth:`Slots.take_unknown`) and its
place under the client's key when the header names the client (:meth:`Slots.name_client`).
"""

from __future__ import annotations

import functools
import ipaddress
from collections import Counter
from collections.abc import Sequence


@functools.lru_cache(maxsize=4096)
def client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client's address as an IP: no zone index (``fe80::1%eth0``), an IPv4-mapped IPv6
    address as the IPv4 address it carries; None when it is not an IP address (a Unix socket,
    "unknown"). Cached: each session asks several times (its slot, ``proxy_from``, its PTR
    lookup, SPF), and most mail comes from clients that came before."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=4096)
def client_key(address: str, ipv6_prefix_length: int) -> str:
    """The name under which ``address`` is counted: itself for IPv4, its network for IPv6."""
    ip = client_ip(address)
    if ip is None:
        return address  # not an IP address (a Unix socket, "unknown"): counted as it is
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, ipv6_prefix_length), strict=False))
    return str(ip)


def in_networks(
    address: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    """Whether ``address`` (IPv4-mapped IPv6 as its IPv4 address) is in one of ``networks``."""
    if not networks:
        return False
    ip = client_ip(address)
    return ip is not None and any(ip in network for network in networks)


class Slots:
    """Open sessions, in all and per :func:`client_key`."""

    def __init__(self, total: int, per_client: int, ipv6_prefix_length: int) -> None:
        self.total = total
        self.per_client = per_client
        self.ipv6_prefix_length = ipv6_prefix_length
        self.open = 0
        self.per_key: Counter[str] = Counter()

    def key(self, address: str) -> str:
        return client_key(address, self.ipv6_prefix_length)

    def take(self, key: str) -> bool:
        """Take a slot for a client counted as ``key``; False when a limit is reached."""
        if self.open >= self.total or self.per_key[key] >= self.per_client:
            return False
        self.open += 1
        self.per_key[key] += 1
        return True

    def take_unknown(self) -> bool:
        """Take a slot, counted in the total only, for a client not known yet (a load balancer's
        connection before its PROXY header); False when max_connections is reached."""
        if self.open >= self.total:
            return False
        self.open += 1
        return True

    def name_client(self, key: str) -> bool:
        """Count a slot taken by :meth:`take_unknown` under ``key`` too; False (and nothing
        counted under ``key``) when that client has its limit already."""
        if self.per_key[key] >= self.per_client:
            return False
        self.per_key[key] += 1
        return True

    def give_back(self, key: str | None) -> None:
        """Give back a slot; ``key`` None for one counted in the total only."""
        self.open -= 1
        if key is None:
            return
        self.per_key[key] -= 1
        if self.per_key[key] <= 0:
            del self.per_key[key]
