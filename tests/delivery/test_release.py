"""Hold, release, relay: the engine against a real SMTP target over 127.0.0.1."""

from __future__ import annotations

import asyncio
import time

from mxspool.store.sqlite import SqliteStore
from tests.delivery.conftest import (
    DOMAIN,
    EngineFactory,
    add_domain,
    delivered_control,
    message_bytes,
    put_message,
    release,
    rows,
    states,
    wait_for,
)
from tests.delivery.target import Target


async def test_hold_then_release_delivers_each_message_once_with_exact_bytes(
    store: SqliteStore, target: Target, engine: EngineFactory, control: Target
) -> None:
    await add_domain(store, target.port, hold=True)
    sent: dict[str, bytes] = {}
    for number in range(200):
        _queue_id, data = await put_message(
            store, [f"user{number}@{DOMAIN}"], message_bytes(number, size=400 + number * 37)
        )
        sent[f"user{number}@{DOMAIN}"] = data
    engine(concurrency=4)
    await delivered_control(store, control)  # the engine runs and sends relay mail...
    assert target.recorder.received == [], "held mail must not leave"  # ...but not held mail
    assert target.recorder.mail_commands == 0

    await release(store)
    await wait_for(lambda: len(target.recorder.received) >= 200, within=30)
    await wait_for(lambda: _all_delivered(store, 200))
    # Every row is final: a duplicate would need a claim, and there is nothing left to claim;
    # one more poll round (the control) shows nothing extra was on its way.
    await delivered_control(store, control)
    got = target.recorder.deliveries()
    assert len(got) == 200
    assert dict(got) == sent  # each recipient once, bytes as stored
    for row in await rows(store):
        assert row.remote_reply is not None
        assert row.remote_reply.startswith("250 2.0.0 Ok: queued as T")
        assert row.delivered_at is not None
        assert row.attempts == 1


async def _all_delivered(store: SqliteStore, count: int) -> bool:
    return (await states(store)).get("delivered", 0) == count


async def test_relay_mode_mail_leaves_within_one_second(
    store: SqliteStore, target: Target, engine: EngineFactory
) -> None:
    await add_domain(store, target.port, hold=False)
    scheduler = engine()
    scheduler._poll_interval = 0.25  # the production interval, not the tests' faster one
    latencies = []
    for number in range(5):
        accepted_at = time.time()
        await put_message(store, [f"r{number}@{DOMAIN}"])
        await wait_for(lambda n=number: len(target.recorder.received) > n, within=5)
        latencies.append(target.recorder.received[number].at - accepted_at)
        # Scenario pacing: the next message arrives at another point of the poll cycle.
        await asyncio.sleep(0.15)
    # Typically within one second; one stalled moment of a loaded machine may not be.
    assert sorted(latencies)[len(latencies) // 2] < 1.0 and max(latencies) < 5.0, latencies


async def test_canary_delivers_only_that_recipient_while_domain_holds(
    store: SqliteStore, target: Target, engine: EngineFactory, control: Target
) -> None:
    await add_domain(store, target.port, hold=True)
    for number in range(5):
        await put_message(store, [f"canary@{DOMAIN}", f"other{number}@{DOMAIN}"])
    await put_message(store, [f"other@{DOMAIN}"])
    engine()
    assert await store.release_recipient(DOMAIN, f"Canary@{DOMAIN}") == 5
    await wait_for(lambda: len(target.recorder.deliveries()) >= 5)
    await delivered_control(store, control)  # a later poll round: the others stayed held
    assert [rcpt for rcpt, _ in target.recorder.deliveries()] == [f"canary@{DOMAIN}"] * 5
    counts = await states(store)
    assert counts == {"delivered": 5, "held": 6}


async def test_message_with_450_recipients_is_split_at_200(
    store: SqliteStore, target: Target, engine: EngineFactory
) -> None:
    await add_domain(store, target.port, hold=True)
    recipients = [f"u{number}@{DOMAIN}" for number in range(450)]
    _, data = await put_message(store, recipients)
    engine(concurrency=1)
    await release(store)
    await wait_for(lambda: len(target.recorder.deliveries()) >= 450)
    sizes = sorted(len(item.rcpt_tos) for item in target.recorder.received)
    assert max(sizes) <= 200
    assert sizes == [50, 200, 200]
    assert sorted(r for r, _ in target.recorder.deliveries()) == sorted(recipients)
    assert {body for _, body in target.recorder.deliveries()} == {data}
