"""Which DNS server mxspool asks: ``[delivery] resolver`` ("host:port"), or the system's.

One home for turning that setting into dnspython's resolvers, blocking (``dns.resolver``, for
the libraries that call DNS from threads: pyspf, dkimpy) and asynchronous (``dns.asyncresolver``,
for delivery's MX and address lookups and the intake's reverse lookups), so every part of the
server asks the same place.

Raises dnspython's ``NoResolverConfiguration``, ``OSError`` or ``ValueError`` when no resolver
can be set up (no /etc/resolv.conf, a bad "host:port"); each caller says what that means for it.
"""

from __future__ import annotations

from typing import TypeVar

import dns.asyncresolver
import dns.nameserver
import dns.resolver

from mxspool.config import split_host_port

R = TypeVar("R", dns.resolver.Resolver, dns.asyncresolver.Resolver)


def configure(kind: type[R], nameserver: str) -> R:
    """A ``kind`` resolver on ``nameserver`` ("host:port", port 53 if left out), or on the
    system's configuration when it is empty."""
    if not nameserver:
        return kind()
    host, port = split_host_port(nameserver, 53)
    resolver = kind(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)]
    return resolver
