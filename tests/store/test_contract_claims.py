"""Claims take whole messages: a message's due recipients for one destination are never cut
between claims, so it goes to the next hop in one transaction (or, past 200 recipients, in
200-recipient transactions one after the other), on every store (the contract fixtures of
``test_contract``: SQLite and PostgreSQL, counters rechecked after every operation)."""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections import Counter

from mxspool.delivery.dnscache import DnsCache
from mxspool.delivery.engine import DrainSettings
from mxspool.delivery.outcomes import RetryPolicy
from mxspool.delivery.routing import Router
from mxspool.delivery.scheduler import Scheduler, new_owner_id
from mxspool.delivery.smtpclient import SmtpConnector
from mxspool.store.base import (
    DeliveryJob,
    Domain,
    DomainChanges,
    DomainMode,
    RecipientOutcome,
    RecipientState,
    Route,
    Store,
    TlsMode,
)
from tests.delivery.exo_target import TOO_MANY, ExoTarget
from tests.store import test_contract
from tests.store.conftest import StoreFactory
from tests.store.test_contract import (
    LEASE,
    RELAY,
    add_domain,
    claim,
    claim_the_rest,
    claimed_ids,
    put,
)
from tests.waiting import eventually

open_store = test_contract.open_store
"""The contract's fixture: stores that recheck their counters after every operation."""


def _shape(jobs: list[DeliveryJob]) -> list[tuple[str, list[str]]]:
    return [(job.message_id, [r.address for r in job.recipients]) for job in jobs]


async def test_a_message_the_limit_would_cut_is_claimed_whole(store: Store) -> None:
    await add_domain(store, RELAY)
    await add_domain(store, "other.test")
    first = await put(store, ["a@relay.test", "b@relay.test"])
    second = await put(store, ["c@relay.test", "x@other.test", "d@relay.test", "e@relay.test"])
    third = await put(store, ["f@relay.test"])

    # A limit of 3 reaches into the second message: it comes whole, its other domain's
    # recipient stays for that domain's claim.
    jobs = await claim(store, RELAY, limit=3)
    assert _shape(jobs) == [
        (first, ["a@relay.test", "b@relay.test"]),
        (second, ["c@relay.test", "d@relay.test", "e@relay.test"]),
    ]
    assert _shape(await claim(store, RELAY, owner="node-b", limit=3)) == [(third, ["f@relay.test"])]
    assert await claim(store, RELAY, owner="node-b") == []
    assert _shape(await claim(store, "other.test", limit=1)) == [(second, ["x@other.test"])]


async def test_a_message_larger_than_the_limit_is_claimed_whole(store: Store) -> None:
    await add_domain(store, RELAY)
    big = await put(store, [f"u{n}@relay.test" for n in range(450)])
    after = await put(store, ["z@relay.test"])
    (job,) = await claim(store, RELAY, limit=200)
    assert job.message_id == big
    assert [r.address for r in job.recipients] == [f"u{n}@relay.test" for n in range(450)]
    # Positive control: the next claim does find the next message.
    assert _shape(await claim(store, RELAY, limit=200)) == [(after, ["z@relay.test"])]


async def test_only_the_due_recipients_of_a_message_are_claimed(store: Store) -> None:
    now = time.time()
    await add_domain(store, RELAY)
    message = await put(store, ["a@relay.test", "b@relay.test", "c@relay.test"])
    (job,) = await claim(store, RELAY, now=now)
    a, b, c = (r.id for r in job.recipients)
    await store.record_outcomes(
        "node-a",
        [
            RecipientOutcome(a, RecipientState.DELIVERED, "250 ok", "mx"),
            RecipientOutcome(b, RecipientState.PENDING, "451 later", "mx", now + 300),
            RecipientOutcome(c, RecipientState.PENDING, "451 now", "mx", now),
        ],
    )
    assert _shape(await claim(store, RELAY, now=now + 1, limit=1)) == [(message, ["c@relay.test"])]
    await store.record_outcomes("node-a", [RecipientOutcome(c, RecipientState.DELIVERED, "", "")])
    assert _shape(await claim(store, RELAY, now=now + 301, limit=1)) == [
        (message, ["b@relay.test"])
    ]


async def test_concurrent_claimers_never_share_or_cut_a_message(open_store: StoreFactory) -> None:
    """Two nodes (two store instances), two claimers each, a limit that cuts most messages:
    no recipient is claimed twice, and every message goes whole to one claim."""
    first = await open_store()
    second = await open_store()
    await add_domain(first, RELAY)
    count = 90
    await asyncio.gather(
        *(put(first, [f"m{i}-{k}@relay.test" for k in range(3)]) for i in range(count))
    )
    jobs: dict[str, list[DeliveryJob]] = {"a": [], "b": []}

    async def claimer(store: Store, owner: str) -> None:
        # A few rounds each: together they take well under half of the messages, so every
        # claimer finds work whatever order the threads run in (the control below).
        for _ in range(5):
            got = await store.claim_due(owner, time.time(), LEASE, 7, RELAY)
            if not got:
                return
            jobs[owner] += got

    await asyncio.gather(
        claimer(first, "a"), claimer(second, "b"), claimer(first, "a"), claimer(second, "b")
    )
    # What two claims raced for is left by both, for a later claim (the drain's next poll).
    jobs["a"] += await claim_the_rest(first, "a", 7)
    everything = claimed_ids(jobs["a"]) + claimed_ids(jobs["b"])
    assert len(everything) == 3 * count
    assert len(set(everything)) == 3 * count
    per_message = Counter(job.message_id for job in jobs["a"] + jobs["b"])
    assert len(per_message) == count
    assert set(per_message.values()) == {1}, "a message was cut between claims"
    assert all(len(job.recipients) == 3 for job in jobs["a"] + jobs["b"])
    # Positive control: both nodes did claim (they really ran concurrently).
    assert jobs["a"] and jobs["b"]


def _refused_past(port: int, count: int) -> list[int]:
    """RCPT codes of one transaction of ``count`` recipients, over smtplib."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("control.test")
        client.mail("control@src.test")
        codes = [client.rcpt(f"c{n}@{RELAY}")[0] for n in range(count)]
        client.rset()
    return codes


async def test_450_recipients_go_in_200_200_50_transactions(store: Store) -> None:
    """Over real SMTP, to a target that answers 452 4.5.3 past 200 recipients (Exchange
    Online); a smaller message first makes the claim limit fall inside the big one."""
    target = ExoTarget(max_recipients=200).start()
    task: asyncio.Task[None] | None = None
    try:
        # Positive control: the target does refuse the 201st recipient of a transaction.
        codes = await asyncio.to_thread(_refused_past, target.port, 201)
        assert codes == [250] * 200 + [int(TOO_MANY[:3])]
        target.exo.too_many_given = 0
        await store.add_domain(
            Domain(
                name=RELAY,
                mode=DomainMode.HOLD,
                routes=(Route("127.0.0.1", target.port),),
                tls=TlsMode.OFF,
            )
        )
        small = await put(store, ["s1@relay.test", "s2@relay.test"])
        big = await put(store, [f"u{n}@relay.test" for n in range(450)])
        scheduler = Scheduler(
            store,
            Router(DnsCache("")),
            SmtpConnector(local_hostname="mx.test.local", connect_timeout=5.0, ca_file=""),
            DrainSettings(
                owner=new_owner_id(),
                concurrency=4,
                default_rate=0.0,
                policy=RetryPolicy((0.2,), 3600.0),
                claim_limit=200,
            ),
            poll_interval=0.1,
        )
        task = asyncio.create_task(scheduler.run())
        await store.update_domain(RELAY, DomainChanges(mode=DomainMode.RELAY))
        received = target.recorder.received
        await eventually(lambda: sum(len(r.rcpt_tos) for r in received) == 452, 30, "delivery")
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        target.stop()
    by_message: dict[str, list[int]] = {}
    sessions: dict[str, set[int]] = {}
    for item in received:
        queue_id = small if f"Subject: {small}".encode() in item.data else big
        by_message.setdefault(queue_id, []).append(len(item.rcpt_tos))
        sessions.setdefault(queue_id, set()).add(item.session)
    assert by_message == {small: [2], big: [200, 200, 50]}
    assert len(sessions[big]) == 1  # one worker, one session, one transaction after another
    assert target.exo.too_many_given == 0
    assert sorted(r for item in received for r in item.rcpt_tos) == sorted(
        [f"u{n}@relay.test" for n in range(450)] + ["s1@relay.test", "s2@relay.test"]
    )
