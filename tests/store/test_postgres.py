"""What only the PostgreSQL store does: concurrent migrations, several nodes, NOTIFY, commit
failures shared by a group-commit batch, cluster-wide pacing under contention."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

import mxspool.store
from mxspool.store import create_store
from mxspool.store.base import DomainChanges, DomainMode, StoreError
from mxspool.store.postgres import RESYNC, PostgresStore
from tests.store.test_contract import (
    RELAY,
    add_domain,
    claim_the_rest,
    claimed_ids,
    make_message,
    put,
)


def terminate(url: str, listeners_only: bool = False) -> int:
    """Kill this test's server connections (named after its schema), as a failover would."""
    with psycopg.connect(url, autocommit=True) as conn:
        name = conn.execute("SELECT current_setting('application_name')").fetchone()
        assert name is not None
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s"
            " AND pid <> pg_backend_pid() AND (NOT %s OR query ILIKE 'LISTEN%%')",
            (name[0], listeners_only),
        ).fetchall()
        return len(rows)


async def opened(url: str) -> PostgresStore:
    store = PostgresStore(url)
    await store.open()
    return store


@pytest.fixture
async def pg_store(pg_url: str) -> AsyncIterator[PostgresStore]:
    store = await opened(pg_url)
    yield store
    await store.close()


def test_create_store_picks_postgres(pg_url: str) -> None:
    assert isinstance(create_store(pg_url), PostgresStore)
    assert isinstance(create_store("postgres://u@h/db"), PostgresStore)


async def test_nodes_opening_together_on_an_empty_schema_both_succeed(pg_url: str) -> None:
    """The advisory lock serializes the migrations: none fails, each is applied once."""
    stores = [PostgresStore(pg_url) for _ in range(4)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
        with psycopg.connect(pg_url) as conn:
            versions = conn.execute(
                "SELECT version FROM schema_version ORDER BY version"
            ).fetchall()
            shipped = sorted(
                int(path.name.split("_", 1)[0])
                for path in (Path(mxspool.store.__file__).parent / "migrations" / "postgres").glob(
                    "*.sql"
                )
            )
            assert versions == [(version,) for version in shipped]
            # Tables went into the test's own schema, through the URL's search_path.
            schema = conn.execute("SELECT current_schema()").fetchone()
            assert schema is not None
            found = conn.execute(
                "SELECT count(*) FROM information_schema.tables "
                "WHERE table_schema = %s AND table_name = 'recipients'",
                (schema[0],),
            ).fetchone()
            assert found == (1,)
        # Re-opening an up-to-date schema changes nothing.
        again = await opened(pg_url)
        await again.close()
    finally:
        for store in stores:
            await store.close()


async def test_open_fails_clearly_without_a_schema(pg_server: str) -> None:
    store = PostgresStore(f"{pg_server}?options=-csearch_path%3Dno_such_schema_here")
    with pytest.raises(StoreError, match="search_path"):
        await store.open()


async def test_open_fails_clearly_when_the_server_is_unreachable() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/test?connect_timeout=2")
    with pytest.raises(StoreError, match="cannot connect"):
        await store.open()


async def test_two_nodes_claiming_one_domain_never_share_a_recipient(pg_url: str) -> None:
    nodes = [await opened(pg_url), await opened(pg_url)]
    try:
        await add_domain(nodes[0], RELAY)
        await asyncio.gather(
            *(put(nodes[i % 2], [f"u{i}@relay.test", f"v{i}@relay.test"]) for i in range(500))
        )
        got: list[list[int]] = [[], []]

        async def worker(index: int) -> None:
            while True:
                jobs = await nodes[index].claim_due(f"node{index}", time.time(), 60.0, 5, RELAY)
                if not jobs:
                    return
                got[index] += claimed_ids(jobs)

        await asyncio.gather(*(worker(i % 2) for i in range(8)))
        concurrent = len(got[0]) + len(got[1])
        got[0] += claimed_ids(await claim_the_rest(nodes[0], "sweep", 5))
        assert concurrent >= 900  # the concurrent claims did the work, the sweep the rest
        assert len(got[0]) + len(got[1]) == 1000  # every recipient claimed once...
        assert len(set(got[0]) | set(got[1])) == 1000  # ...and none by both nodes
        assert got[0]
        assert got[1]
    finally:
        for node in nodes:
            await node.close()


async def _next_payloads(stream: AsyncIterator[str], count: int) -> list[str]:
    payloads: list[str] = []
    async with asyncio.timeout(10):
        while len(payloads) < count:
            payloads.append(await anext(stream))
    return payloads


async def test_notifications_wake_other_nodes(pg_url: str, pg_store: PostgresStore) -> None:
    other = await opened(pg_url)
    stream = other.notifications()
    try:
        assert await _next_payloads(stream, 1) == [RESYNC]
        await add_domain(pg_store, "held.test", DomainMode.HOLD)
        assert await _next_payloads(stream, 1) == ["domains"]
        await add_domain(pg_store, RELAY)
        assert sorted(await _next_payloads(stream, 2)) == ["domains", f"mail:{RELAY}"]
        # Accepts NOTIFY for relay domains only (held mail has nothing to wake).
        await put(pg_store, ["a@held.test"])
        await put(pg_store, ["b@relay.test"])
        assert await _next_payloads(stream, 1) == [f"mail:{RELAY}"]
        # Group commit: one batch NOTIFYs once per domain.
        await asyncio.gather(*(put(pg_store, [f"c{i}@relay.test"]) for i in range(20)))
        first = await _next_payloads(stream, 1)
        assert first == [f"mail:{RELAY}"]
        await pg_store.release_recipient("held.test", "a@held.test")
        payloads = await _next_payloads(stream, 1)
        while payloads == [f"mail:{RELAY}"]:  # a second batch of the gather, if it split
            payloads = await _next_payloads(stream, 1)
        assert payloads == ["mail:held.test"]
        await pg_store.update_domain("held.test", DomainChanges(mode=DomainMode.RELAY))
        assert sorted(await _next_payloads(stream, 2)) == ["domains", "mail:held.test"]
        await pg_store.notify("custom")
        assert await _next_payloads(stream, 1) == ["custom"]
        # A lost listener reconnects by itself and says it may have missed something.
        assert terminate(pg_url, listeners_only=True) == 1
        assert await _next_payloads(stream, 1) == [RESYNC]
        await add_domain(pg_store, "after.test")
        assert await _next_payloads(stream, 1) == ["domains"]
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
        await other.close()


async def test_a_failed_commit_fails_the_whole_batch(pg_url: str, pg_store: PostgresStore) -> None:
    """A COMMIT that fails (here: a deferred constraint trigger) fails every accept of its
    batch with StoreError, and none of them is visible."""
    poison = make_message(["x@relay.test"])
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.id = '{poison.id}' THEN RAISE EXCEPTION 'refused at commit'; END IF; "
            "RETURN NULL; END $$"
        )
        conn.execute(
            "CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON messages "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
    others = [make_message([f"u{i}@relay.test"]) for i in range(10)]
    batch = [*others[:5], poison, *others[5:]]
    results = await asyncio.gather(
        *(pg_store.accept_message(m) for m in batch), return_exceptions=True
    )
    assert isinstance(results[5], StoreError)
    failed = 0
    for message, result in zip(batch, results, strict=True):
        stored = await pg_store.get_message(message.id)
        if result is None:
            assert stored is not None
        else:
            assert isinstance(result, StoreError)
            assert stored is None
            failed += 1
    assert failed > 1  # the poison's batch-mates shared its fate
    # The writer carries on.
    await pg_store.accept_message(make_message(["y@relay.test"]))


async def test_accept_fails_with_store_error_when_the_database_goes_away(
    pg_url: str, pg_store: PostgresStore
) -> None:
    await put(pg_store, ["a@relay.test"])
    terminate(pg_url)
    # The pooled connections are dead: the first use fails (451 at the SMTP level) or the
    # pool replaces them; either way no message is silently lost and the store recovers.
    outcomes = []
    for i in range(5):
        try:
            await put(pg_store, [f"b{i}@relay.test"])
            outcomes.append("ok")
        except StoreError:
            outcomes.append("error")
    assert outcomes[-1] == "ok"
    queued = {e.rcpt for e in await pg_store.list_queue()}
    assert {f"b{i}@relay.test" for i, o in enumerate(outcomes) if o == "ok"} <= queued


async def test_token_bucket_holds_across_nodes(pg_url: str) -> None:
    nodes = [await opened(pg_url), await opened(pg_url)]
    try:
        rate, burst = 50.0, 10.0
        # A clock of our own, 10 ms further on each call, so that the bounds do not depend on
        # how fast this machine makes the calls (a stall would let the burst cap waste tokens).
        start = time.time()
        clock = [start]
        taken = 0

        async def taker(node: PostgresStore) -> None:
            nonlocal taken
            while clock[0] - start < 1.0:
                now = clock[0]
                clock[0] += 0.01
                got = await node.take_tokens("mx.target.test", rate, burst, 3, now)
                taken += got  # not `taken += await ...`: that reads `taken` before awaiting

        await asyncio.gather(*(taker(nodes[i % 2]) for i in range(6)))
        elapsed = clock[0] - start
        assert taken <= burst + rate * elapsed + 1
        assert taken >= rate * 0.8  # and the bucket is not starved either
    finally:
        for node in nodes:
            await node.close()


async def test_slots_hold_across_nodes(pg_url: str) -> None:
    nodes = [await opened(pg_url), await opened(pg_url)]
    try:
        results = await asyncio.gather(
            *(nodes[i % 2].acquire_slot("mx.target.test", f"n{i}", 3, 30.0) for i in range(20))
        )
        assert sum(results) == 3
    finally:
        for node in nodes:
            await node.close()
