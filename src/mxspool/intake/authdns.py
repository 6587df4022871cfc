"""DNS for authentication at arrival: one blocking resolver per nameserver, with a shared cache.

SPF (pyspf), DKIM key lookups (dkimpy) and DMARC policy lookups all run in threads of the
intake (``intake.auth`` resolves a message's names before its verification worker process
needs them; a worker process has its own resolver and cache for a name it was not given) and
ask through here, so they go to the same place: ``[delivery] resolver`` when set, else the
system's resolver (dnspython reads /etc/resolv.conf). Answers are cached by dnspython's
thread-safe LRU cache, which honours each record's TTL (negative answers too): a busy sender's
DKIM key, DMARC record and SPF record are fetched once per TTL, not once per message.

Every lookup is given a lifetime (the time left of its message's budget); a timeout, SERVFAIL
or no answering nameserver raises ``TempError``, which the checks record as ``temperror``.
"""

from __future__ import annotations

import functools

import dns.exception
import dns.rdatatype
import dns.resolver

from mxspool import nameservers

CACHE_SIZE = 8192
"""Cached DNS answers (records and negative answers), shared by every check of the process."""
NEGATIVE_TTL = 60.0
"""Seconds ``txt_ttl`` reports for "no such record" (its caller may keep the answer as long)."""


class TempError(Exception):
    """A DNS failure that may pass: the check's result is ``temperror``."""


@functools.cache
def make_resolver(nameserver: str) -> dns.resolver.Resolver:
    """A blocking, caching resolver on ``nameserver`` ("host:port"), or the system's when empty.

    Raises (ValueError, dnspython's NoResolverConfiguration) when it cannot be set up; called in
    a worker, where that makes the check a temperror instead of stopping the server.
    """
    resolver = nameservers.configure(dns.resolver.Resolver, nameserver)
    resolver.cache = dns.resolver.LRUCache(CACHE_SIZE)
    return resolver


def txt(nameserver: str, name: str, lifetime: float) -> list[bytes]:
    """The TXT records at ``name``, each one's strings joined; [] when there are none.

    Raises TempError when DNS does not give an answer within ``lifetime`` seconds.
    """
    return txt_ttl(nameserver, name, lifetime)[0]


def txt_ttl(nameserver: str, name: str, lifetime: float) -> tuple[list[bytes], float]:
    """``txt`` and the answer's TTL in seconds (``NEGATIVE_TTL`` when there is no record)."""
    if lifetime <= 0:
        raise TempError(f"no time left to look up {name}")
    try:
        resolver = make_resolver(nameserver)
        answer = resolver.resolve(name, "TXT", lifetime=lifetime, raise_on_no_answer=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return [], NEGATIVE_TTL
    except (dns.exception.DNSException, ValueError) as exc:
        raise TempError(f"DNS lookup of {name} TXT failed: {exc}") from None
    if answer.rrset is None:
        return [], NEGATIVE_TTL
    records = [
        b"".join(rdata.strings) for rdata in answer.rrset if rdata.rdtype == dns.rdatatype.TXT
    ]
    return records, float(answer.rrset.ttl)
