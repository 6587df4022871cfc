"""The SMTP client's host name: reverse DNS, forward-confirmed, for the Received: field and the
mail log.

Postfix looks up every client's name (``smtpd_peername_lookup = yes``) and shows it as
``name[IP]``, or ``unknown[IP]`` when the address has no PTR record or none of its PTR names
resolves back to the address: a PTR record alone says only what the owner of the address block
wrote, so a name is used only when forward-confirmed (FCrDNS). mxspool does the same without
waiting for it: the lookup starts as soon as the client's address is known (at connect, or when
a load balancer's PROXY header names it), and the session reads the name when it needs it (the
Received: field at DATA, the mail log lines, the stored client record); until the answer is
there the client is ``unknown``. The name is information only: nothing is refused on it.

Nothing a client or a DNS server does can grow memory or hold anything here: sessions from one
address share one lookup; at most ``MAX_IN_FLIGHT`` lookups run at once (beyond that a new
client is ``unknown``, counted in ``mxspool_reverse_lookups_total{result="busy"}``); at most
``MAX_NAMES`` PTR names are tried, each only if it is a syntactically valid host name (it goes
into a header); each lookup has ``[smtp] reverse_lookup_timeout`` in all; answers are cached
per address for their TTL (at most ``MAX_TTL``; no name: ``NEGATIVE_TTL``) in at most
``CACHE_SIZE`` entries, the oldest dropped first. Loopback clients are this host: not looked up.
Lookups go to ``[delivery] resolver`` when it is set, else the system's resolver.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable

import dns.asyncresolver
import dns.exception
import dns.resolver
import dns.reversename

from mxspool import metrics, nameservers
from mxspool.config import Config
from mxspool.intake.slots import client_ip

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 256
"""Lookups running at once, at most."""
MAX_NAMES = 4
"""PTR names tried for forward confirmation, at most (an address may have several)."""
CACHE_SIZE = 10_000
"""Addresses whose answer is kept."""
MAX_TTL = 3600.0
NEGATIVE_TTL = 300.0
"""Seconds "no name" (no PTR, or none confirmed) is kept."""
FAILURE_TTL = 60.0
"""Seconds a failed lookup (timeout, SERVFAIL) is kept, so a dead DNS is not asked per session."""

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")

Listener = Callable[[str], None]
"""Called with the confirmed name once it is known (never for "unknown")."""


def valid_hostname(name: str) -> bool:
    """A host name fit for a header and a log: letters, digits, ``-`` and ``_`` in labels of
    at most 63 octets, at most 253 in all, not all-numeric (a name that looks like an address,
    as Postfix's ``valid_hostname`` refuses)."""
    if not name or len(name) > 253 or not _HOSTNAME.fullmatch(name):
        return False
    return not name.rsplit(".", 1)[-1].isdigit()


class ReverseNames:
    """Forward-confirmed client names with a cache; see the module docstring."""

    @classmethod
    def from_config(cls, config: Config) -> ReverseNames | None:
        """None when ``[smtp] reverse_lookup`` is off."""
        if not config.smtp.reverse_lookup:
            return None
        return cls(config.delivery.resolver, config.smtp.reverse_lookup_timeout)

    def __init__(
        self,
        nameserver: str = "",
        timeout: float = 5.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nameserver = nameserver
        self._timeout = timeout
        self._clock = clock
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._cache: OrderedDict[str, tuple[float, str | None]] = OrderedDict()
        self._running: dict[str, tuple[asyncio.Task[None], list[Listener]]] = {}

    def look_up(self, address: str, listener: Listener) -> None:
        """Start finding ``address``'s name; ``listener(name)`` is called when one is confirmed
        (at once when it is cached). Call ``forget`` when the answer is no longer wanted."""
        ip = client_ip(address)
        if ip is None or ip.is_loopback or ip.is_unspecified:
            return
        key = str(ip)
        cached = self._cache.get(key)
        if cached is not None:
            expires, name = cached
            if expires > self._clock():
                self._cache.move_to_end(key)
                if name is not None:
                    listener(name)
                return
            del self._cache[key]
        running = self._running.get(key)
        if running is not None:
            running[1].append(listener)
            return
        if len(self._running) >= MAX_IN_FLIGHT:
            metrics.reverse_lookup("busy")
            return
        task = asyncio.get_running_loop().create_task(self._run(key, ip))
        self._running[key] = (task, [listener])

    def forget(self, address: str, listener: Listener) -> None:
        """``listener`` no longer wants the answer (its session ended); the lookup goes on for
        the cache and the other sessions from that address."""
        ip = client_ip(address)
        running = self._running.get(str(ip)) if ip is not None else None
        if running is not None and listener in running[1]:
            running[1].remove(listener)

    def close(self) -> None:
        """Stop every lookup (shutdown)."""
        for task, _listeners in self._running.values():
            task.cancel()
        self._running.clear()

    async def _run(self, key: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        name: str | None = None
        ttl = FAILURE_TTL
        try:
            async with asyncio.timeout(self._timeout):
                name, ttl, result = await self._confirmed_name(ip)
        except TimeoutError:
            result = "timeout"
        except (dns.exception.DNSException, OSError, ValueError) as exc:
            log.debug("reverse lookup of %s failed: %s", key, exc)
            result = "failed"
        finally:
            _task, listeners = self._running.pop(key, (None, []))
        metrics.reverse_lookup(result)
        self._cache[key] = (self._clock() + min(ttl, MAX_TTL), name)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        if name is not None:
            for listener in listeners:
                listener(name)

    async def _confirmed_name(
        self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> tuple[str | None, float, str]:
        """(name, TTL, result): the first PTR name whose A (AAAA) records include ``ip``."""
        resolver = self._get_resolver()
        try:
            answer = await resolver.resolve(dns.reversename.from_address(str(ip)), "PTR")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None, NEGATIVE_TTL, "no_name"
        if answer.rrset is None:  # resolve raises NoAnswer instead; for the type checker
            return None, NEGATIVE_TTL, "no_name"
        rdtype = "A" if ip.version == 4 else "AAAA"
        ptr_ttl = answer.rrset.ttl
        names = [str(record.target.to_text(omit_final_dot=True)).lower() for record in answer.rrset]
        for name in [name for name in names if valid_hostname(name)][:MAX_NAMES]:
            try:
                forward = await resolver.resolve(name, rdtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
                continue
            rrset = forward.rrset
            if rrset is not None and ip in [client_ip(record.address) for record in rrset]:
                return name, float(min(ptr_ttl, rrset.ttl)), "confirmed"
        log.debug("no PTR name of %s resolves back to it: %s", ip, ", ".join(names[:MAX_NAMES]))
        return None, NEGATIVE_TTL, "not_confirmed"

    def _get_resolver(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            self._resolver = nameservers.configure(dns.asyncresolver.Resolver, self._nameserver)
            self._resolver.lifetime = self._timeout
        return self._resolver
