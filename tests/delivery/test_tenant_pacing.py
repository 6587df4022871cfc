"""Domains of one target tenant share one pacing bucket: two domains released together at
--rate R deliver at about R in total, not R each (Exchange Online limits per tenant)."""

from __future__ import annotations

import pytest

from mxspool.migrate import migration as mig
from mxspool.store.base import Migration
from mxspool.store.sqlite import SqliteStore
from tests.delivery.conftest import EngineFactory, add_domain, put_message
from tests.delivery.target import Target
from tests.waiting import eventually

RATE = 6.0  # messages per second for the tenant
PER_DOMAIN = 10


async def _released_rate(store: SqliteStore, target: Target, engine: EngineFactory) -> float:
    """Release migration "move" at RATE with the engine running; the delivered rate."""
    for name in ("one.test", "two.test"):
        for number in range(PER_DOMAIN):
            await put_message(store, [f"u{number}@{name}"])
    engine(concurrency=4)
    await mig.release(store, "move", rate=f"{RATE * 60:g}/min")
    total = 2 * PER_DOMAIN
    await eventually(lambda: len(target.recorder.received) == total, 30, "every message")
    times = sorted(item.at for item in target.recorder.received)
    return (total - 1) / (times[-1] - times[0])


@pytest.mark.parametrize("shared", [True, False], ids=["one-tenant", "two-tenants"])
async def test_one_target_tenant_shares_the_rate(
    store: SqliteStore, target: Target, engine: EngineFactory, shared: bool
) -> None:
    for name in ("one.test", "two.test"):
        await add_domain(store, target.port, name=name)
    # The control: the same migration and release without a target tenant label, so each
    # domain is paced on its own at RATE (about twice RATE in total).
    tenant = "fabrikam.onmicrosoft.com" if shared else None
    await store.add_migration(Migration("move", ("one.test", "two.test"), target_tenant=tenant))
    rate = await _released_rate(store, target, engine)
    if shared:
        assert RATE * 0.6 < rate < RATE * 1.25, rate
    else:
        assert rate > RATE * 1.5, rate
