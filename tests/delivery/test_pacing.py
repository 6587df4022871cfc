"""Concurrency and rate limits, measured at the target; the token bucket on its own."""

from __future__ import annotations

import pytest

from mxspool.delivery.pacing import TokenBucket
from mxspool.store.base import DomainChanges
from mxspool.store.sqlite import SqliteStore
from tests.delivery.conftest import (
    DOMAIN,
    EngineFactory,
    add_domain,
    put_message,
    release,
    wait_for,
)
from tests.delivery.target import Target

SHARED = pytest.mark.parametrize("shared", [False, True], ids=["in-process", "via-store"])
"""One node on SQLite may pace in memory or through the store's buckets and slots: the limits
measured at the target must be the same."""


@SHARED
async def test_sessions_never_exceed_concurrency(
    store: SqliteStore, target: Target, engine: EngineFactory, shared: bool
) -> None:
    target.behaviour.data_delay = 0.02
    await add_domain(store, target.port, hold=True)
    for number in range(120):
        await put_message(store, [f"u{number}@{DOMAIN}"])
    engine(concurrency=3, shared_pacing=shared)
    await release(store)
    await wait_for(lambda: len(target.recorder.received) == 120, within=30)
    assert target.recorder.max_active <= 3
    assert target.recorder.max_active == 3  # and the backlog did fan out
    assert target.recorder.sessions <= 6  # sessions are reused, not one per message


@SHARED
async def test_rate_limit_holds_at_the_target(
    store: SqliteStore, target: Target, engine: EngineFactory, shared: bool
) -> None:
    await add_domain(store, target.port, hold=True, rate=20.0)
    for number in range(60):
        await put_message(store, [f"u{number}@{DOMAIN}"])
    engine(concurrency=5, shared_pacing=shared)
    await release(store)
    await wait_for(lambda: len(target.recorder.received) == 60, within=30)
    times = sorted(item.at for item in target.recorder.received)
    assert times[-1] - times[0] >= 2.5, times[-1] - times[0]
    # No window of one second saw more than the rate, plus one for the window's edge and, at
    # most, one send per connection: each of the 5 holds one reserved turn, and if this process
    # stalls past those turns (a loaded CI machine), they go out together when it resumes.
    # Unpaced, all 60 would arrive within a fraction of a second.
    for index, start in enumerate(times):
        in_window = sum(1 for t in times[index:] if t - start < 1.0)
        assert in_window <= 20 + 1 + 5, (index, in_window)


async def test_rate_change_mid_drain_applies(
    store: SqliteStore, target: Target, engine: EngineFactory
) -> None:
    await add_domain(store, target.port, hold=True, rate=5.0)
    for number in range(40):
        await put_message(store, [f"u{number}@{DOMAIN}"])
    engine(concurrency=2)
    await release(store)
    await wait_for(lambda: len(target.recorder.received) >= 6, within=10)  # the drain runs
    times = sorted(item.at for item in target.recorder.received)
    assert times[5] - times[0] >= 0.6, times  # paced: six messages at 5/s take about a second
    await store.update_domain(DOMAIN, DomainChanges(rate=0.0, clear_rate=False))
    await wait_for(lambda: len(target.recorder.received) == 40, within=5)


def test_token_bucket_spaces_acquisitions() -> None:
    now = [0.0]
    bucket = TokenBucket(10.0, clock=lambda: now[0])
    assert bucket.reserve() == 0.0
    assert abs(bucket.reserve() - 0.1) < 1e-9
    assert abs(bucket.reserve() - 0.2) < 1e-9
    now[0] = 1.0  # long idle: at most one token banked (no burst)
    assert bucket.reserve() == 0.0
    assert abs(bucket.reserve() - 0.1) < 1e-9
    bucket.set_rate(0.0)
    assert bucket.reserve() == 0.0
