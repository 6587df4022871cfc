"""Stored ``check recipients`` results and recorded queue flushes, on every store (the contract
fixtures of ``test_contract``: SQLite with and without the C commit thread, and PostgreSQL,
counters rechecked after every operation).

A domain's last ``check recipients`` run is kept per recipient (the release plan's readiness):
a run replaces the previous one's results, an unknown domain is refused, and removing the
domain drops them. A ``queue flush`` is recorded before it changes rows (its generation and the
domains flushed), so a running engine can notice it and probe a dead destination at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from mxspool.store import create_store
from mxspool.store.base import (
    FLUSH_ALL,
    DestinationDeferral,
    NotFound,
    RecipientCheck,
    Store,
)
from tests.store import test_contract
from tests.store.test_contract import HELD, RELAY, add_domain, put

open_store = test_contract.open_store
"""The contract's fixture: stores that recheck their counters after every operation."""


async def test_the_last_check_replaces_the_one_before(store: Store) -> None:
    await add_domain(store, RELAY)
    await add_domain(store, HELD)
    assert await store.recipient_checks(RELAY) == []
    first = [
        RecipientCheck(f"Ann@{RELAY}", "ready", "250 2.1.5 ok", 100.0),
        RecipientCheck(f"bob@{RELAY}", "not ready", "550 5.4.1 Access denied", 100.0),
        RecipientCheck(f"cy@{RELAY}", "unknown", "451 4.7.500 try later", 100.0),
    ]
    await store.record_recipient_checks(RELAY.upper(), first)
    await store.record_recipient_checks(HELD, [RecipientCheck(f"x@{HELD}", "ready", "250", 5.0)])
    got = await store.recipient_checks(RELAY)
    assert got == [
        RecipientCheck(f"ann@{RELAY}", "ready", "250 2.1.5 ok", 100.0),
        RecipientCheck(f"bob@{RELAY}", "not ready", "550 5.4.1 Access denied", 100.0),
        RecipientCheck(f"cy@{RELAY}", "unknown", "451 4.7.500 try later", 100.0),
    ]

    # A later run is the truth: bob is ready now, cy was not probed (no result kept).
    second = [
        RecipientCheck(f"ann@{RELAY}", "ready", "250 2.1.5 ok", 200.0),
        RecipientCheck(f"bob@{RELAY}", "ready", "250 2.1.5 ok", 200.0),
    ]
    await store.record_recipient_checks(RELAY, second)
    assert await store.recipient_checks(RELAY) == second
    # ...of its own domain only.
    assert await store.recipient_checks(HELD) == [RecipientCheck(f"x@{HELD}", "ready", "250", 5.0)]

    # An empty run (nothing held) clears the domain's results.
    await store.record_recipient_checks(RELAY, [])
    assert await store.recipient_checks(RELAY) == []


async def test_checks_of_an_unknown_or_removed_domain(store: Store) -> None:
    with pytest.raises(NotFound, match="mxspool domain list"):
        await store.record_recipient_checks("nowhere.test", [])
    await add_domain(store, HELD)
    await store.record_recipient_checks(HELD, [RecipientCheck(f"x@{HELD}", "ready", "250", 1.0)])
    assert len(await store.recipient_checks(HELD)) == 1  # control
    await store.remove_domain(HELD)
    assert await store.recipient_checks(HELD) == []
    await add_domain(store, HELD)  # added again: nothing of the old checks
    assert await store.recipient_checks(HELD) == []


async def test_a_flush_is_recorded_per_domain_and_for_all(store: Store) -> None:
    await add_domain(store, RELAY)
    await add_domain(store, HELD)
    assert await store.flush_generation() == 0
    assert await store.flushed_domains(0) == []

    # A deferred row (a dead destination's probe an hour away) is made due; the flush is
    # recorded even for a domain with nothing to change (a flush means "try now").
    message = await put(store, [f"a@{RELAY}"])
    now = time.time()
    deferral = DestinationDeferral(now + 3600, "4.4.1 destination dead", now, 0.0, "expired")
    assert await store.defer_destination(RELAY, deferral) == 1
    assert await store.flush_queue(time.time(), RELAY) == 1
    assert await store.flush_queue(time.time(), HELD) == 0
    stored = await store.get_message(message)
    assert stored is not None and stored.recipients[0].next_attempt_at <= time.time()

    first = await store.flush_generation()
    assert first >= 2
    assert await store.flushed_domains(0) == [HELD, RELAY]
    assert await store.flushed_domains(first) == []
    assert await store.flush_queue(time.time()) == 0
    assert await store.flush_generation() > first
    assert await store.flushed_domains(first) == [FLUSH_ALL]
    # Flushed again: the domain's row moves to the new generation, not a second row.
    await store.flush_queue(time.time(), RELAY)
    assert await store.flushed_domains(first) == [FLUSH_ALL, RELAY]


# -- PostgreSQL: the flush is notified before the rows it makes due ---------------------------


@pytest.fixture
async def pg_pair(pg_url: str) -> AsyncIterator[tuple[Store, Store]]:
    first, second = create_store(pg_url), create_store(pg_url)
    await first.open()
    await second.open()
    yield first, second
    await second.close()
    await first.close()


async def test_postgres_notifies_the_flush_before_its_mail(pg_pair: tuple[Store, Store]) -> None:
    store, other = pg_pair
    await add_domain(store, RELAY)
    await put(store, [f"a@{RELAY}"])
    now = time.time()
    deferral = DestinationDeferral(now + 3600, "4.4.1 destination dead", now, 0.0, "expired")
    assert await store.defer_destination(RELAY, deferral) == 1
    stream = other.notifications()
    try:
        async with asyncio.timeout(10):
            assert await anext(stream) == "resync"
            assert await store.flush_queue(time.time(), RELAY) == 1
            assert [await anext(stream), await anext(stream)] == [
                f"flush:{RELAY}",
                f"mail:{RELAY}",
            ]
            await store.flush_queue(time.time())
            assert await anext(stream) == f"flush:{FLUSH_ALL}"
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
