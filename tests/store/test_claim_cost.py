"""A claim reads what it takes, not the backlog behind it.

Releasing a million held messages is a long run of claims; if each claim reads the domain's
whole backlog, the release crawls (it did: ~270 messages a second at a million, every claim
sorting every due row). So on every store, a claim's cost must not grow with the rows ahead
of the due ones: held by the domain, deferred to later, kept by a recipient hold, or in
flight under another worker's lease. Each test builds two domains with the same due mail,
one of them with ``BACKLOG`` such rows in front, and compares what the claim cost in each:

- SQLite: virtual-machine instructions on the store's writer connection (a progress handler
  counting every ``STEP``-th instruction); the scheduler's reads (``due_domains``,
  ``next_due_at``) are counted the same way on a reader connection.
- PostgreSQL: rows the claim statement read from recipients (``EXPLAIN ANALYZE``: rows each
  scan returned plus rows its filter removed), run in a transaction that is rolled back, on
  a table that was never analyzed.

Before the claim lanes (issue 11's regression) SQLite's claims cost 7-21 times as much behind
the backlog here, and its scheduler reads walked a held one; PostgreSQL's claim walked every
deferred, held or in-flight row ahead of the first due one.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mxspool.store import postgres
from mxspool.store.base import (
    DeliveryJob,
    DestinationDeferral,
    DomainMode,
    RecipientHold,
    Store,
)
from mxspool.store.postgres import PostgresStore
from mxspool.store.sqlite import SqliteStore
from tests.store.test_contract import LEASE, add_domain, put

BACKLOG = 3000
"""Rows in front of the due mail in the big domain."""
PER_MESSAGE = 500
DUE = 10
"""Due one-recipient messages in each domain; the claims take them all (limit ``DUE``)."""
STEP = 10
RATIO = 3.0
"""The big domain's claim may cost at most this many times the small one's."""

BIG = "big.test"
SMALL = "small.test"


async def _backlog(store: Store, domain: str, local: str = "x") -> None:
    for batch in range(BACKLOG // PER_MESSAGE):
        await put(store, [f"{local}+{batch}.{n}@{domain}" for n in range(PER_MESSAGE)])


async def _due(store: Store, domain: str, local: str = "due") -> list[str]:
    return [await put(store, [f"{local}{n}@{domain}"]) for n in range(DUE)]


def _taken(jobs: list[DeliveryJob]) -> list[str]:
    return [job.message_id for job in jobs]


async def _claim_cost(store: Store, domain: str, now: float) -> tuple[list[DeliveryJob], float]:
    """The claim's jobs and what it cost (see the module docstring)."""
    if isinstance(store, SqliteStore):
        count = [0]

        def tick() -> int:
            count[0] += STEP
            return 0

        await store._write(lambda conn: conn.set_progress_handler(tick, STEP))
        try:
            jobs = await store.claim_due("node-a", now, LEASE, DUE, domain)
        finally:
            await store._write(lambda conn: conn.set_progress_handler(None, STEP))
        return jobs, count[0]
    assert isinstance(store, PostgresStore)
    found = await store.get_domain(domain)
    assert found is not None
    mode = found.mode
    params = {"domain": domain, "now": now, "limit": DUE, "owner": "node-a", "until": now + LEASE}
    with psycopg.connect(store.url, autocommit=False) as conn:
        # No ANALYZE: the claim must not depend on statistics (autovacuum may be off, as it is
        # on the test machines, or not have run yet after a large fill).
        (plan,) = conn.execute(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + postgres.claim_statement(mode == DomainMode.RELAY),
            params,
        ).fetchone() or (None,)
        conn.rollback()
    rows_read = _recipient_rows(plan if isinstance(plan, list) else json.loads(plan))
    return await store.claim_due("node-a", now, LEASE, DUE, domain), rows_read


def _recipient_rows(plan: Any) -> float:
    """Rows every scan of recipients returned or filtered out, over a JSON plan."""
    total = 0.0
    nodes = [node["Plan"] for node in plan]
    while nodes:
        node = nodes.pop()
        nodes.extend(node.get("Plans", []))
        if node.get("Relation Name") == "recipients":
            loops = node.get("Actual Loops", 1)
            total += (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * loops
    return total


async def _compare(store: Store, now: float) -> None:
    big_due, small_due = await _due(store, BIG), await _due(store, SMALL)
    small_jobs, small_cost = await _claim_cost(store, SMALL, now)
    big_jobs, big_cost = await _claim_cost(store, BIG, now)
    # Positive control: both claims took exactly their due mail, oldest first.
    assert _taken(small_jobs) == small_due
    assert _taken(big_jobs) == big_due
    assert small_cost > 0
    assert big_cost <= RATIO * small_cost, (
        f"a claim behind {BACKLOG} rows cost {big_cost:.0f} against {small_cost:.0f} "
        "without them: it reads the backlog"
    )


async def test_due_mail_behind_costs_the_claim_nothing(store: Store) -> None:
    # The release of a large hold: everything is due, the claim takes the oldest few.
    await add_domain(store, BIG)
    await add_domain(store, SMALL)
    big_due, small_due = await _due(store, BIG), await _due(store, SMALL)
    await _backlog(store, BIG)
    small_jobs, small_cost = await _claim_cost(store, SMALL, time.time())
    big_jobs, big_cost = await _claim_cost(store, BIG, time.time())
    assert _taken(small_jobs) == small_due
    assert _taken(big_jobs) == big_due
    assert 0 < big_cost <= RATIO * small_cost, (big_cost, small_cost)


async def test_deferred_rows_ahead_cost_the_claim_nothing(store: Store) -> None:
    now = time.time()
    await add_domain(store, BIG)
    await add_domain(store, SMALL)
    await _backlog(store, BIG)
    deferred = await store.defer_destination(
        BIG, DestinationDeferral(until=now + 3600, reply="451 4.7.500 Server busy", now=now)
    )
    assert deferred == BACKLOG
    await _compare(store, now)


async def test_recipient_held_rows_ahead_cost_the_claim_nothing(store: Store) -> None:
    await add_domain(store, BIG)
    await add_domain(store, SMALL)
    await _backlog(store, BIG, local="late")
    marked = await store.hold_recipient(
        RecipientHold(address=f"late@{BIG}", domain=BIG, prefix="late+", suffix=f"@{BIG}")
    )
    assert marked == BACKLOG
    await _compare(store, time.time())


async def test_mail_in_flight_ahead_costs_the_claim_nothing(store: Store) -> None:
    await add_domain(store, BIG)
    await add_domain(store, SMALL)
    await _backlog(store, BIG)
    taken = await store.claim_due("node-b", time.time(), LEASE, BACKLOG, BIG)
    assert sum(len(job.recipients) for job in taken) == BACKLOG
    await _compare(store, time.time())


async def test_a_held_domains_canaries_are_claimed_without_reading_its_backlog(
    store: Store,
) -> None:
    await add_domain(store, BIG, DomainMode.HOLD)
    await add_domain(store, SMALL, DomainMode.HOLD)
    await _backlog(store, BIG)
    for domain in (BIG, SMALL):
        for n in range(DUE):
            assert await store.release_recipient(domain, f"due{n}@{domain}") == 0
    # The canaries are released once their mail has arrived: _compare puts it first.
    big_due, small_due = await _due(store, BIG), await _due(store, SMALL)
    for domain in (BIG, SMALL):
        for n in range(DUE):
            assert await store.release_recipient(domain, f"due{n}@{domain}") == 1
    now = time.time()
    small_jobs, small_cost = await _claim_cost(store, SMALL, now)
    big_jobs, big_cost = await _claim_cost(store, BIG, now)
    assert _taken(small_jobs) == small_due
    assert _taken(big_jobs) == big_due
    assert 0 < big_cost <= RATIO * small_cost, (big_cost, small_cost)


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """SQLite only: PostgreSQL's probes are LATERAL ... LIMIT 1 reads (store/postgres.py)
    that stop at their first row by construction."""
    store = SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await store.open()
    yield store
    await store.close()


async def test_the_schedulers_reads_do_not_walk_a_held_backlog(
    sqlite_store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = sqlite_store
    await add_domain(store, BIG, DomainMode.HOLD)
    await add_domain(store, SMALL, DomainMode.HOLD)
    await _backlog(store, BIG)
    await _backlog(store, SMALL)
    count = [0]

    def tick() -> int:
        count[0] += STEP
        return 0

    conn = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True, check_same_thread=False)
    conn.set_progress_handler(tick, STEP)
    monkeypatch.setattr(store, "_reader", lambda: conn)

    async def cost(read: Callable[[], Awaitable[Any]]) -> tuple[Any, int]:
        count[0] = 0
        result = await read()
        return result, count[0]

    now = time.time()
    try:
        held, held_cost = await cost(lambda: store.due_domains(now))
        assert held == []
        assert (await cost(lambda: store.next_due_at(BIG)))[0] is None
        # The same reads with a little mail due, for the baseline.
        await store.release_recipient(SMALL, f"x+0.0@{SMALL}")
        due, due_cost = await cost(lambda: store.due_domains(now + 1))
        assert due == [SMALL]
        next_small, next_cost = await cost(lambda: store.next_due_at(SMALL))
        _, next_big_cost = await cost(lambda: store.next_due_at(BIG))
    finally:
        conn.close()
    assert next_small is not None
    # Less than one instruction per row of the backlog: no read walked it (a walk costs tens
    # of instructions a row). The probes themselves cost the same with mail due or not.
    assert max(held_cost, next_big_cost) < BACKLOG, (held_cost, next_big_cost)
    assert next_big_cost <= RATIO * next_cost, (next_big_cost, next_cost)
    assert due_cost > 0
