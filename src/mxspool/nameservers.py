"""Which DNS server mxspool asks: ``[delivery] resolver`` ("host:port"), or the system's.

One home for turning that setting into dnspython's resolvers, blocking (``dns.resolver``, for
the libraries that call DNS from threads: pyspf, dkimpy) and asynchronous (``dns.asyncresolver``,
for delivery's MX and address lookups and the intake's reverse lookups), so every part of the
server asks the same place.

Raises dnspython's ``NoResolverConfiguration``, ``OSError`` or ``ValueError`` when no resolver
can be set up (no /etc/resolv.conf, a bad "host:port"); each caller says what that means for it.

Queries leave from the address the route to the nameserver uses (from 127.0.0.1 to a local
unbound on 127.0.0.1:53, configured or in /etc/resolv.conf; from the host's own address to a
remote one). dnspython sends UDP from an unconnected socket, which the kernel binds to every
address (0.0.0.0:<port>): the port a reply is awaited on would take datagrams sent to any of
the host's addresses, which is what off-path spoofing aims at, and none of that is needed.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, TypeVar

import dns.asyncresolver
import dns.message
import dns.nameserver
import dns.resolver

from mxspool.config import is_ip_address, split_host_port

R = TypeVar("R", dns.resolver.Resolver, dns.asyncresolver.Resolver)


def configure(kind: type[R], nameserver: str) -> R:
    """A ``kind`` resolver on ``nameserver`` ("host:port", port 53 if left out), or on the
    system's configuration when it is empty."""
    if nameserver:
        host, port = split_host_port(nameserver, 53)
        resolver = kind(configure=False)
        resolver.nameservers, resolver.port = [host], port
    else:
        resolver = kind()
    return _sourced(resolver)


def _sourced(resolver: R) -> R:
    """``resolver`` with each nameserver given as an address (the configured one, or those of
    /etc/resolv.conf) asked through ``_Do53``; others (DoH URLs) are left as they are."""
    resolver.nameservers = [
        _Do53(server, resolver.nameserver_ports.get(server, resolver.port))
        if isinstance(server, str) and is_ip_address(server)
        else server
        for server in resolver.nameservers
    ]
    return resolver


class _Do53(dns.nameserver.Do53Nameserver):
    """A DNS server over UDP/TCP whose queries leave from the address of the route to it, not
    from a socket bound to every address (see the module docstring)."""

    def _source(self) -> str | None:
        """The source address of the route to this server, asked afresh for each query (routes
        and addresses change); a UDP connect sends nothing. None, dnspython's own choice, when
        there is no route or the address is IPv6 link-local (binding it needs a scope)."""
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((self.address, self.port))
                source = str(probe.getsockname()[0])
        except OSError:
            return None
        return None if ipaddress.ip_address(source).is_link_local else source

    def query(  # noqa: PLR0917  (dnspython's signature, overridden)
        self,
        request: dns.message.QueryMessage,
        timeout: float,
        source: str | None,
        source_port: int,
        max_size: bool,
        one_rr_per_rrset: bool = False,
        ignore_trailing: bool = False,
    ) -> dns.message.Message:
        return super().query(
            request,
            timeout,
            source or self._source(),
            source_port,
            max_size,
            one_rr_per_rrset,
            ignore_trailing,
        )

    async def async_query(  # noqa: PLR0917  (dnspython's signature, overridden)
        self,
        request: dns.message.QueryMessage,
        timeout: float,  # noqa: ASYNC109
        source: str | None,
        source_port: int,
        max_size: bool,
        backend: Any,
        one_rr_per_rrset: bool = False,
        ignore_trailing: bool = False,
    ) -> dns.message.Message:
        return await super().async_query(
            request,
            timeout,
            source or self._source(),
            source_port,
            max_size,
            backend,
            one_rr_per_rrset,
            ignore_trailing,
        )
