"""Two nodes (two schedulers, two store connections) on one PostgreSQL store: the destination's
connection limit and rate hold for the pair, measured at the target; notifications wake a node
at once."""

from __future__ import annotations

import time

import pytest

from mxspool.store.base import QueueFilter, Store
from tests.delivery.conftest import (
    DOMAIN,
    EngineFactory,
    add_domain,
    delivered_control,
    put_message,
    release,
)
from tests.delivery.conftest import wait_for as wait_until
from tests.delivery.target import Target
from tests.store.conftest import StoreFactory, open_store, pg_server, pg_url  # noqa: F401


@pytest.fixture
def store_url(pg_url: str) -> str:  # noqa: F811
    """open_store (tests/store/conftest.py) opens every node's store on this one database."""
    return pg_url


async def _pending(store: Store) -> int:
    pending = QueueFilter(domain=DOMAIN, state="pending")
    return len(await store.list_queue(pending, limit=10_000))


async def test_two_nodes_share_the_connection_limit(
    open_store: StoreFactory,  # noqa: F811
    target: Target,
    engine: EngineFactory,
) -> None:
    target.behaviour.data_delay = 0.03
    one, two = await open_store(), await open_store()
    await add_domain(one, target.port, hold=True)  # type: ignore[arg-type]
    for number in range(90):
        await put_message(one, [f"u{number}@{DOMAIN}"])  # type: ignore[arg-type]
    # Small claims, so that both nodes hold some of the backlog (a real one has thousands).
    for node, name in ((one, "node1.test"), (two, "node2.test")):
        engine(on=node, concurrency=3, shared_pacing=True, helo=name, lease=3.0, claim_limit=10)
    await release(one)  # type: ignore[arg-type]
    await wait_until(lambda: len(target.recorder.received) == 90, within=40)
    assert target.recorder.max_active <= 3, target.recorder.max_active
    assert target.recorder.max_active == 3  # and it did fan out
    assert {item.helo for item in target.recorder.received} == {"node1.test", "node2.test"}
    assert sorted(r for r, _ in target.recorder.deliveries()) == sorted(
        f"u{number}@{DOMAIN}" for number in range(90)
    )


async def test_two_nodes_share_the_rate(
    open_store: StoreFactory,  # noqa: F811
    target: Target,
    engine: EngineFactory,
) -> None:
    rate, count = 25.0, 100
    one, two = await open_store(), await open_store()
    await add_domain(one, target.port, hold=True, rate=rate)  # type: ignore[arg-type]
    for number in range(count):
        await put_message(one, [f"u{number}@{DOMAIN}"])  # type: ignore[arg-type]
    for node, name in ((one, "node1.test"), (two, "node2.test")):
        engine(on=node, concurrency=4, shared_pacing=True, helo=name, claim_limit=10)
    await release(one)  # type: ignore[arg-type]
    await wait_until(lambda: len(target.recorder.received) == count, within=30)
    times = sorted(item.at for item in target.recorder.received)
    measured = (count - 1) / (times[-1] - times[0])
    print(f"cluster rate {measured:.2f}/s for a limit of {rate:.0f}/s")
    # Never faster than the limit (two nodes each pacing alone would send about twice it); a
    # loaded machine stalling both nodes (one process) may make it slower.
    assert 0.6 * rate <= measured <= 1.1 * rate, measured
    # Each second holds at most the rate plus the bucket's small start-up allowance.
    for index, start in enumerate(times):
        assert sum(1 for t in times[index:] if t - start < 1.0) <= rate * 1.2
    helos = [item.helo for item in target.recorder.received]
    # Both nodes delivered under the shared limit: each at least one whole claim batch (10);
    # how the other batches split between them is up to scheduling.
    assert helos.count("node1.test") >= 10 and helos.count("node2.test") >= 10, helos


async def test_notification_wakes_the_other_node_at_once(
    open_store: StoreFactory,  # noqa: F811
    target: Target,
    engine: EngineFactory,
) -> None:
    one, two = await open_store(), await open_store()
    await add_domain(one, target.port, hold=True)  # type: ignore[arg-type]
    await put_message(one, [f"a@{DOMAIN}"])  # type: ignore[arg-type]
    scheduler = engine(on=two, helo="node2.test")
    scheduler._poll_interval = 30.0  # polling would take far too long: only a wake-up helps
    notes: list[str] = []
    notified = scheduler._notified

    def record(note: str) -> None:
        notes.append(note)
        notified(note)

    scheduler._notified = record  # type: ignore[method-assign]
    await wait_until(lambda: "resync" in notes, within=10)  # the listener is connected
    released_at = time.time()
    await release(one)  # type: ignore[arg-type]  # on the other node's connection
    await wait_until(lambda: len(target.recorder.received) == 1, within=15)
    assert target.recorder.received[0].at - released_at < 10.0  # polling would take 30 s
    assert await _pending(two) == 0


async def test_slots_of_a_dead_node_expire(
    open_store: StoreFactory,  # noqa: F811
    target: Target,
    engine: EngineFactory,
    control: Target,
) -> None:
    one = await open_store()
    await add_domain(one, target.port, hold=False)  # type: ignore[arg-type]
    # A node took every connection slot of the destination, then died without a word.
    ttl = 6.0  # room for the control on a loaded machine before the slots expire
    taken_at = time.monotonic()
    for number in range(2):
        assert await one.acquire_slot(DOMAIN, f"dead-node/{number}", 2, ttl)
    await put_message(one, [f"a@{DOMAIN}"])  # type: ignore[arg-type]
    engine(on=one, concurrency=2, shared_pacing=True)
    await delivered_control(one, control)  # type: ignore[arg-type]  # the engine sends...
    sessions, elapsed = target.recorder.sessions, time.monotonic() - taken_at
    assert elapsed < ttl, "too slow to tell: the slots expired meanwhile"
    assert sessions == 0  # ...but not here: the cluster's limit is still taken
    await wait_until(lambda: len(target.recorder.received) == 1, within=ttl + 10)
