"""Store contract: ``purge_delivered`` drops the bodies of old delivered mail and keeps its rows
(every backend). A cutoff in the future makes what was just delivered "old enough"."""

from __future__ import annotations

import time

import pytest

from mxspool.store import purge
from mxspool.store.base import (
    DomainMode,
    NotFound,
    RecipientOutcome,
    RecipientState,
    ReportRow,
    Store,
)
from tests.store.test_contract import HELD, RELAY, add_domain, claim, put, read_all

LATER = 3600.0


async def deliver(store: Store, states: dict[str, RecipientState]) -> None:
    """Claim the relay domain's due rows and record ``states`` (by address; default delivered)."""
    outcomes = [
        RecipientOutcome(r.id, states.get(r.address, RecipientState.DELIVERED), "250 ok", "t")
        for job in await claim(store, RELAY, limit=1000)
        for r in job.recipients
    ]
    await store.record_outcomes("node-a", outcomes)


async def report(store: Store) -> list[ReportRow]:
    return [row async for row in store.report()]


async def test_purge_drops_delivered_bodies_and_keeps_the_ledger(store: Store) -> None:
    await add_domain(store, RELAY)
    await add_domain(store, HELD, DomainMode.HOLD)
    done = await put(store, [f"a@{RELAY}", f"b@{RELAY}"])
    half = await put(store, [f"c@{RELAY}", f"d@{RELAY}"])  # d stays pending: kept
    parked = await put(store, [f"e@{RELAY}"])  # parked: kept
    mixed = await put(store, [f"f@{RELAY}", f"g@{RELAY}"])  # delivered + discarded: goes
    held = await put(store, [f"h@{HELD}"])  # held: kept
    await deliver(
        store,
        {
            f"d@{RELAY}": RecipientState.PENDING,
            f"e@{RELAY}": RecipientState.PARKED,
            f"g@{RELAY}": RecipientState.PENDING,
        },
    )
    await store.discard(mixed)  # g: pending -> discarded
    before_rows = await report(store)
    kept = {half: await read_all(store, half), parked: await read_all(store, parked)}

    # Positive control of the cutoff: delivered just now is not older than an hour ago.
    recent = await store.purge_delivered(time.time() - LATER)
    assert recent.messages == 0
    assert len(await read_all(store, done)) > 0

    dry = await store.purge_delivered(time.time() + LATER, dry_run=True)
    assert dry.messages == 2 and dry.dry_run
    assert len(await read_all(store, done)) > 0  # a dry run drops nothing

    result = await store.purge_delivered(time.time() + LATER)
    assert (result.messages, result.dry_run) == (2, False)
    assert result.bytes == dry.bytes > 0
    for message_id in (done, mixed):
        with pytest.raises(NotFound, match="purged"):
            await read_all(store, message_id)
        stored = await store.get_message(message_id)
        assert stored is not None and purge.purged_at(stored.tags)
    for message_id, body in kept.items():
        assert await read_all(store, message_id) == body
    assert len(await read_all(store, held)) > 0

    after_rows = await report(store)
    assert [(r.id, r.rcpt, r.state, r.sha256) for r in after_rows] == [
        (r.id, r.rcpt, r.state, r.sha256) for r in before_rows
    ]
    purged = {r.rcpt for r in after_rows if purge.purged_at(r.tags)}
    assert purged == {f"a@{RELAY}", f"b@{RELAY}", f"f@{RELAY}", f"g@{RELAY}"}

    again = await store.purge_delivered(time.time() + LATER)
    assert again.messages == 0  # nothing twice


async def test_purge_works_in_bounded_batches(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(purge, "BATCH", 3)
    monkeypatch.setattr(purge, "SCAN_WINDOW", 4)
    await add_domain(store, RELAY)
    ids = [await put(store, [f"r{i}@{RELAY}"]) for i in range(11)]
    await deliver(store, {})
    result = await store.purge_delivered(time.time() + LATER)
    assert result.messages == 11
    for message_id in ids:
        with pytest.raises(NotFound):
            await read_all(store, message_id)
    assert {r.state for r in await report(store)} == {"delivered"}
