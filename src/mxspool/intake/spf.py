"""SPF (RFC 7208) at arrival: the SPF part of ``intake.auth``, started when MAIL FROM is accepted.

Nothing is refused on SPF: mxspool holds mail for a migration and must not lose any. The result
goes into the message's Authentication-Results (``intake.auth``, which also checks DKIM and
DMARC) and its ``spf=<result>`` tag, which matters to ``queue bounce``: a DSN to a sender whose
SPF failed at arrival would most likely go to a forged address (backscatter), so the bounce
withholds it unless forced.

How it runs: when MAIL FROM is accepted (a non-null sender, a client that is not on a loopback,
private, link-local or otherwise non-global address: internal relays are not listed in anyone's
SPF record), :meth:`SpfChecker.start` submits the check to a small thread pool (pyspf is
blocking) and returns at once; the 250 is never delayed, and the check runs while the client
sends DATA. Results are cached per client and sender for ``CACHE_TTL``; while a check runs,
sessions from the same client with the same sender (a bulk sender's parallel connections) wait
for that check instead of starting their own. ``intake.auth`` collects the result after the
commit (:attr:`SpfCheck.future`); a check never takes longer than ``TIMEOUT`` seconds of DNS
time. :meth:`SpfCheck.tags` and :meth:`SpfCheck.settle` record the result alone, as a tag, for
a caller without ``intake.auth``.

Results are RFC 7208's: ``pass``, ``fail``, ``softfail``, ``neutral``, ``none``, ``temperror``,
``permerror``. A check that cannot start (too many in flight) or breaks records ``temperror``.

DNS goes through ``intake.authdns`` (``[delivery] resolver`` when set, else the system's
resolver; answers cached per TTL). ``[smtp] spf_check_private`` checks internal clients too; it
exists for tests, which connect from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from typing import Any

import dns.exception
import dns.resolver
import spf  # type: ignore[import-untyped]

from mxspool.config import Config
from mxspool.intake.authdns import make_resolver
from mxspool.intake.slots import client_ip
from mxspool.store.base import Store

log = logging.getLogger(__name__)

TIMEOUT = 5.0
"""Seconds of DNS time one check may take in all (RFC 7208 4.6.4 bounds lookups to 10)."""
WORKERS = 4
"""Threads running checks; each spends most of its time waiting on DNS."""
MAX_IN_FLIGHT = 256
"""Checks queued or running at once; beyond this, new ones record temperror at once."""
CACHE_TTL = 60.0
"""A client sending many messages with the same sender is checked once a minute."""
CACHE_SIZE = 4096

RESULTS = frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"})
TAG_PREFIX = "spf="


def tag(result: str) -> str:
    """The message tag for an SPF result: ``spf=fail``."""
    return TAG_PREFIX + result


@functools.lru_cache(maxsize=4096)
def _internal(client: str) -> bool:
    """Whether ``client`` is not a global unicast address (loopback, private, link-local...)."""
    address = client_ip(client)
    if address is None:
        return True  # not an IP at all (a Unix socket, "unknown"): nothing to check
    return not address.is_global or address.is_multicast


# -- DNS for pyspf --------------------------------------------------------------------------
# pyspf looks names up through its module-level ``DNSLookup`` (with dnspython's deprecated
# module-level query, on the system resolver). It is replaced once by ``_lookup``, which uses the
# nameserver the calling worker thread was given: several checkers (tests) can use different ones.

_local = threading.local()
_install_lock = threading.Lock()


def _lookup(name: str, qtype: str, strict: Any = True, timeout: float = TIMEOUT) -> list[Any]:
    found: list[Any] = []
    try:
        resolver = make_resolver(getattr(_local, "nameserver", ""))
        answers = resolver.resolve(name, qtype, lifetime=timeout, raise_on_no_answer=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return found
    except (dns.exception.DNSException, ValueError) as exc:  # timeout, SERVFAIL, no answer
        raise spf.TempError(f"DNS {exc}") from None
    if answers.rrset is None:
        return found
    for rdata in answers.rrset:
        if qtype in ("A", "AAAA"):
            found.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            found.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            found.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            found.append(((name, qtype), rdata.strings))
    return found


def _install() -> None:
    with _install_lock:
        if spf.DNSLookup is not _lookup:
            spf.DNSLookup = _lookup


# -- checks ---------------------------------------------------------------------------------


class SpfCheck:
    """One SPF check of one transaction's sender; its result becomes a message tag."""

    def __init__(
        self, future: concurrent.futures.Future[str], flight: _Flight | None = None
    ) -> None:
        self.future = future
        self.recorded = False
        self._flight = flight

    def tags(self) -> tuple[str, ...]:
        """``("spf=<result>",)`` when the check is done (then it counts as recorded), else ()."""
        if not self.future.done():
            return ()
        self.recorded = True
        return (tag(_outcome(self.future)),)

    def settle(self, store: Store, message_id: str) -> None:
        """After the commit: if the result was not in the message, add it when it comes.

        Call on the event loop; the tag is written by a task, never delaying the session.
        """
        if self.recorded:
            return
        self.recorded = True
        loop = asyncio.get_running_loop()

        def done(future: concurrent.futures.Future[str]) -> None:
            result = _outcome(future)
            try:
                loop.call_soon_threadsafe(_spawn, store, message_id, tag(result))
            except RuntimeError:  # the loop is gone (shutting down): nothing to record into
                pass

        self.future.add_done_callback(done)

    def cancel(self) -> None:
        """The transaction ended without a message (RSET, new MAIL): drop a queued check,
        unless another transaction waits for the same check."""
        flight = self._flight
        if flight is not None:
            self._flight = None
            flight.waiting -= 1
            if flight.waiting > 0:
                return
        self.future.cancel()


class _Flight:
    """A check in flight, and how many transactions wait for it (``SpfChecker.start``)."""

    __slots__ = ("future", "waiting")

    def __init__(self, future: concurrent.futures.Future[str]) -> None:
        self.future = future
        self.waiting = 1


def _outcome(future: concurrent.futures.Future[str]) -> str:
    if future.cancelled():
        return "temperror"
    error = future.exception()
    return "temperror" if error is not None else future.result()


_pending_tags: set[asyncio.Task[None]] = set()


def _spawn(store: Store, message_id: str, value: str) -> None:
    task = asyncio.get_running_loop().create_task(_add_tag(store, message_id, value))
    _pending_tags.add(task)
    task.add_done_callback(_pending_tags.discard)


async def _add_tag(store: Store, message_id: str, value: str) -> None:
    try:
        await store.add_tag(message_id, value)
    except Exception as exc:
        log.warning("could not record %s for message %s: %s", value, message_id, exc)


@functools.cache
def _settled(result: str) -> concurrent.futures.Future[str]:
    """A done future with ``result``, shared by every cached check with that result: a cached
    check costs the intake no future, lock or thread of its own (``cancel`` of a done future
    does nothing)."""
    future: concurrent.futures.Future[str] = concurrent.futures.Future()
    future.set_result(result)
    return future


class SpfChecker:
    """Starts SPF checks for one intake; see the module docstring."""

    def __init__(
        self,
        *,
        resolver: str = "",
        check_private: bool = False,
        timeout: float = TIMEOUT,
        workers: int = WORKERS,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        _install()
        self._nameserver = resolver
        self.check_private = check_private
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="spf")
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], tuple[float, str]] = {}
        self._flights: dict[tuple[str, str], _Flight] = {}
        """The checks queued or running (at most ``max_in_flight``), by client and sender;
        under ``_lock`` (a check ends in a pool thread)."""

    @classmethod
    def from_config(cls, config: Config) -> SpfChecker:
        return cls(resolver=config.delivery.resolver, check_private=config.smtp.spf_check_private)

    def start(self, client: str, sender: str, helo: str) -> SpfCheck | None:
        """Start checking ``sender`` from ``client``; None when no check applies (the null
        sender, an internal client)."""
        if not sender or (_internal(client) and not self.check_private):
            return None
        key = (client, sender.lower())
        cached = self._cache.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return SpfCheck(_settled(cached[1]))
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                # The same sender from the same client in another session, still being
                # checked (a bulk sender's parallel connections): wait for that check.
                flight.waiting += 1
                return SpfCheck(flight.future, flight)
            if len(self._flights) < self.max_in_flight:
                flight = self._flights[key] = _Flight(
                    self._pool.submit(self._check, client, sender, helo)
                )
        if flight is None:
            log.warning("too many SPF checks in flight; %s from %s gets temperror", sender, client)
            return SpfCheck(_settled("temperror"))
        # After the flight is listed: a check already done calls _finished at once, here.
        flight.future.add_done_callback(functools.partial(self._finished, key))
        return SpfCheck(flight.future, flight)

    def _finished(self, key: tuple[str, str], _future: concurrent.futures.Future[str]) -> None:
        with self._lock:
            del self._flights[key]

    def _check(self, client: str, sender: str, helo: str) -> str:
        _local.nameserver = self._nameserver
        try:
            query = spf.query(
                i=client,
                s=sender,
                h=helo or "unknown",
                timeout=self.timeout,
                querytime=self.timeout,
            )
            result, _code, explanation = query.check()
        except Exception as exc:  # pyspf raises on odd input; a result is still owed
            log.info("SPF check of %s from %s failed: %s", sender, client, exc)
            result, explanation = "temperror", str(exc)
        result = str(result).lower()
        if result not in RESULTS:  # pyspf's "ambiguous" and the like
            result = "permerror" if result == "ambiguous" else "temperror"
        log.debug("SPF %s for %s from %s: %s", result, sender, client, explanation)
        if result != "temperror":
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            self._cache[(client, sender.lower())] = (time.monotonic() + CACHE_TTL, result)
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
