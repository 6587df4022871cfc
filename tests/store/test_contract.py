"""The Store contract: one suite, run against every implementation (SQLite and PostgreSQL).

Each test gets a fresh, empty store (``store`` fixture, parametrized over the backends);
``open_store`` opens another instance on the same database, as a second node would.
Where the backends legitimately differ, the test says so.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from mxspool.body import BodyBuffer
from mxspool.envelope import Envelope, MailParams, RcptParams, Recipient
from mxspool.ids import new_queue_id
from mxspool.store import create_store
from mxspool.store.base import (
    ClientInfo,
    Conflict,
    DeliveryJob,
    DestinationDeferral,
    Domain,
    DomainChanges,
    DomainMode,
    IncomingMessage,
    NotFound,
    QueueFilter,
    RecipientOutcome,
    RecipientState,
    Route,
    Store,
    StoreError,
    TlsMode,
)
from tests.store.conftest import StoreFactory
from tests.waiting import eventually, still

RELAY = "relay.test"
HELD = "held.test"
LEASE = 60.0


def make_message(
    recipients: list[str],
    data: bytes | None = None,
    *,
    spill_threshold: int = 1 << 20,
    mail_from: str = "sender@src.test",
    mail_params: MailParams | None = None,
    rcpt_params: RcptParams | None = None,
    queue_id: str | None = None,
    received_at: float | None = None,
    message_id: str | None = "<m@src.test>",
) -> IncomingMessage:
    queue_id = queue_id or new_queue_id()
    if data is None:
        data = f"Subject: {queue_id}\r\nMessage-ID: <{queue_id}@src.test>\r\n\r\nhi\r\n".encode()
    body = BodyBuffer(spill_threshold)
    # Written in pieces, as the intake does.
    for start in range(0, len(data), 65536):
        body.write(data[start : start + 65536])
    return IncomingMessage(
        id=queue_id,
        envelope=Envelope(
            mail_from=mail_from,
            mail_params=mail_params or MailParams(),
            recipients=tuple(Recipient(r, rcpt_params or RcptParams()) for r in recipients),
        ),
        client=ClientInfo(address="192.0.2.1", helo="client.src.test"),
        received_at=received_at if received_at is not None else time.time(),
        message_id=message_id,
        body=body,
    )


async def put(store: Store, recipients: list[str], **kwargs: Any) -> str:
    message = make_message(recipients, **kwargs)
    await store.accept_message(message)
    return message.id


async def add_domain(store: Store, name: str, mode: DomainMode = DomainMode.RELAY) -> Domain:
    domain = Domain(name=name, mode=mode, routes=(Route("127.0.0.1", 2526),), tls=TlsMode.OFF)
    await store.add_domain(domain)
    return domain


async def read_all(store: Store, message_id: str) -> bytes:
    return b"".join([piece async for piece in store.read_body(message_id)])


def claimed_ids(jobs: list[DeliveryJob]) -> list[int]:
    return [r.id for job in jobs for r in job.recipients]


async def claim(
    store: Store, domain: str, owner: str = "node-a", now: float | None = None, limit: int = 100
) -> list[DeliveryJob]:
    return await store.claim_due(owner, now or time.time(), LEASE, limit, domain)


async def claim_the_rest(
    store: Store, owner: str, limit: int, domain: str = RELAY, rounds: int = 10_000
) -> list[DeliveryJob]:
    """What concurrent claimers left: a message two concurrent claims split is left by both
    for the next claim (``claim_statement``), so under contention an empty claim does not mean
    nothing is due; one claimer alone never splits, and its empty claim does."""
    jobs: list[DeliveryJob] = []
    for _ in range(rounds):
        got = await store.claim_due(owner, time.time(), LEASE, limit, domain)
        if not got:
            return jobs
        jobs += got
    raise AssertionError(f"still claiming after {rounds} rounds")


# -- intake ----------------------------------------------------------------------------------
async def test_accept_small_message_round_trips(store: Store) -> None:
    await add_domain(store, RELAY, DomainMode.HOLD)
    data = b"Subject: hello\r\n\r\nbody with \x00 and \xff bytes\r\n.\r\n"
    params = MailParams(size=len(data), body="8BITMIME", smtputf8=True, ret="HDRS", envid="e+2B1")
    rparams = RcptParams(notify=("SUCCESS", "FAILURE"), orcpt="rfc822;a@relay.test")
    message = make_message(
        ["a@relay.test", "B@Relay.Test"],
        data,
        mail_params=params,
        rcpt_params=rparams,
        message_id="<x@src.test>",
    )
    message.tags = ("probe", "canary")
    await store.accept_message(message)

    stored = await store.get_message(message.id)
    assert stored is not None
    assert stored.mail_from == "sender@src.test"
    assert stored.mail_params == params
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.message_id == "<x@src.test>"
    assert stored.client == ClientInfo(address="192.0.2.1", helo="client.src.test")
    assert stored.tags == ("probe", "canary")
    assert stored.received_at == pytest.approx(message.received_at)
    assert [r.address for r in stored.recipients] == ["a@relay.test", "B@Relay.Test"]
    assert [r.domain for r in stored.recipients] == ["relay.test", "relay.test"]
    assert all(r.params == rparams for r in stored.recipients)
    assert all(r.state is RecipientState.PENDING and r.held for r in stored.recipients)
    assert all(r.attempts == 0 and r.delivered_at is None for r in stored.recipients)
    assert await read_all(store, message.id) == data
    assert await store.get_message("NOSUCHID") is None


async def test_accept_spilled_message_is_byte_exact_and_read_in_pieces(store: Store) -> None:
    data = bytes(range(256)) * (14 * 1024) + b"tail\r\n"  # 3.5 MiB, not a multiple of 1 MiB
    message = make_message(["a@relay.test"], data, spill_threshold=4096)
    assert message.body.spilled
    await store.accept_message(message)
    pieces = [piece async for piece in store.read_body(message.id)]
    assert len(pieces) > 1
    assert max(len(piece) for piece in pieces) <= 1 << 20
    joined = b"".join(pieces)
    assert joined == data
    stored = await store.get_message(message.id)
    assert stored is not None
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()


async def test_accept_empty_body(store: Store) -> None:
    message_id = await put(store, ["a@relay.test"], data=b"")
    assert await read_all(store, message_id) == b""


async def test_read_small_bodies_in_one_call(store: Store) -> None:
    small = [await put(store, ["a@relay.test"], data=f"small {n}\r\n".encode()) for n in range(3)]
    large = await put(store, ["a@relay.test"], data=b"x" * 5000)
    bodies = await store.read_small_bodies([*small, large, "NOSUCHID"], 1000)
    assert set(bodies) == set(small)
    for n, message_id in enumerate(small):
        assert bodies[message_id] == f"small {n}\r\n".encode()
        assert bodies[message_id] == await read_all(store, message_id)
    assert await store.read_small_bodies([], 1000) == {}


async def test_read_body_of_unknown_message_raises_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        await read_all(store, "NOSUCHID")


async def test_concurrent_accepts_all_succeed(store: Store) -> None:
    """Group commit: 200 accepts waiting together all succeed and all are visible."""
    await add_domain(store, RELAY, DomainMode.HOLD)
    messages = [make_message([f"u{i}@relay.test"]) for i in range(200)]
    started = time.perf_counter()
    await asyncio.gather(*(store.accept_message(m) for m in messages))
    elapsed = time.perf_counter() - started
    print(f"200 concurrent accepts: {elapsed * 1000:.0f} ms")
    (status,) = await store.status(time.time())
    assert status.held == 200
    for message in messages[::37]:
        assert await read_all(store, message.id) == message.body.getvalue()


async def test_a_failing_accept_does_not_fail_the_others(store: Store) -> None:
    """One bad accept in a batch (a duplicate queue id) fails alone; nothing of it shows."""
    first = make_message(["a@relay.test"])
    await store.accept_message(first)
    duplicate = make_message(["b@relay.test", "c@relay.test"], queue_id=first.id)
    others = [make_message([f"u{i}@relay.test"]) for i in range(20)]
    results = await asyncio.gather(
        *(store.accept_message(m) for m in [*others[:10], duplicate, *others[10:]]),
        return_exceptions=True,
    )
    assert [r for i, r in enumerate(results) if i != 10] == [None] * 20
    assert isinstance(results[10], StoreError)
    stored = await store.get_message(first.id)
    assert stored is not None
    assert [r.address for r in stored.recipients] == ["a@relay.test"]
    assert len(await store.list_queue(limit=1000)) == 21


async def test_submit_message_calls_back_on_the_loop(store: Store) -> None:
    """The intake's callback path: called on the loop, after the commit, with the error if any."""
    loop = asyncio.get_running_loop()
    done: asyncio.Queue[tuple[str, BaseException | None]] = asyncio.Queue()
    first = make_message(["a@relay.test", "b@relay.test"])
    duplicate = make_message(["c@relay.test"], queue_id=first.id)
    returned = False

    def on_done(message_id: str, error: BaseException | None) -> None:
        assert returned, "called back before submit_message returned"
        assert asyncio.get_running_loop() is loop
        done.put_nowait((message_id, error))

    store.submit_message(first, lambda error: on_done(first.id, error))
    returned = True
    assert await asyncio.wait_for(done.get(), 10) == (first.id, None)
    assert await read_all(store, first.id) == first.body.getvalue()
    returned = False
    store.submit_message(duplicate, lambda error: on_done("duplicate", error))
    returned = True
    message_id, error = await asyncio.wait_for(done.get(), 10)
    assert message_id == "duplicate"
    assert isinstance(error, StoreError)
    stored = await store.get_message(first.id)
    assert stored is not None
    assert [r.address for r in stored.recipients] == ["a@relay.test", "b@relay.test"]


async def test_deliver_ready_calls_back_only_finished_commits_once(store: Store) -> None:
    """``deliver_ready`` (the intake calls it at every event) may call back finished commits
    early, never one twice or one not yet submitted; the rest come through the loop."""
    calls: list[tuple[str, BaseException | None]] = []
    store.deliver_ready()  # nothing submitted: nothing to call
    messages = [make_message([f"u{i}@relay.test"]) for i in range(30)]
    for i, message in enumerate(messages):
        store.submit_message(message, lambda error, m=message: calls.append((m.id, error)))
        store.deliver_ready()
        if i == 14:  # the loop turns until the first half is in: its own path calls back too
            await eventually(lambda: len(calls) >= 15, 10, "the first half's callbacks")
    await eventually(lambda: len(calls) >= len(messages), 10, "every commit's callback")
    store.deliver_ready()  # nothing is left: nothing more is called, now or later
    await still(lambda: len(calls) == len(messages), 0.2, "one callback per commit")
    assert sorted(calls) == sorted((m.id, None) for m in messages)


# -- domains ---------------------------------------------------------------------------------
async def test_domains_add_get_list_update_remove(store: Store) -> None:
    generation = await store.domains_generation()
    domain = Domain(
        name="Example.TEST",
        mode=DomainMode.HOLD,
        routes=(Route("mx1.target.test"), Route("2001:db8::1", 2525)),
        use_mx=True,
        tls=TlsMode.REQUIRE,
        rate=2.5,
        profile="exchange-online",
        created_at=1000.0,
    )
    await store.add_domain(domain)
    assert await store.domains_generation() != generation
    generation = await store.domains_generation()

    got = await store.get_domain("example.test")
    assert got is not None
    assert got.name == "example.test"
    assert (got.mode, got.routes, got.use_mx, got.tls) == (
        DomainMode.HOLD,
        domain.routes,
        True,
        TlsMode.REQUIRE,
    )
    assert (got.rate, got.profile, got.created_at, got.released_at) == (
        2.5,
        "exchange-online",
        1000.0,
        None,
    )
    assert await store.get_domain("EXAMPLE.test") == got
    assert await store.get_domain("other.test") is None

    with pytest.raises(Conflict):
        await store.add_domain(domain)
    assert await store.domains_generation() == generation
    await add_domain(store, "a.test")
    assert [d.name for d in await store.list_domains()] == ["a.test", "example.test"]
    generation = await store.domains_generation()

    updated = await store.update_domain(
        "EXAMPLE.test",
        DomainChanges(
            mode=DomainMode.RELAY, routes=(Route("new.test", 26),), tls=TlsMode.OFF, released_at=5.0
        ),
    )
    assert updated.mode is DomainMode.RELAY
    assert updated.routes == (Route("new.test", 26),)
    assert (updated.tls, updated.released_at, updated.rate, updated.use_mx) == (
        TlsMode.OFF,
        5.0,
        2.5,
        True,
    )
    assert await store.get_domain("example.test") == updated
    assert await store.domains_generation() != generation
    generation = await store.domains_generation()

    cleared = await store.update_domain(
        "example.test", DomainChanges(clear_rate=True, use_mx=False, profile="")
    )
    assert (cleared.rate, cleared.use_mx, cleared.profile) == (None, False, None)
    assert await store.domains_generation() != generation
    with pytest.raises(NotFound):
        await store.update_domain("nope.test", DomainChanges(mode=DomainMode.HOLD))

    generation = await store.domains_generation()
    await store.remove_domain("A.test")
    assert await store.get_domain("a.test") is None
    assert await store.domains_generation() != generation
    with pytest.raises(NotFound):
        await store.remove_domain("a.test")


async def test_remove_domain_refuses_while_mail_is_open_unless_forced(store: Store) -> None:
    await add_domain(store, HELD, DomainMode.HOLD)
    message_id = await put(store, ["a@held.test"])
    with pytest.raises(Conflict):
        await store.remove_domain(HELD)
    assert await store.get_domain(HELD) is not None
    await store.remove_domain(HELD, force=True)
    assert await store.get_domain(HELD) is None
    # The mail stays in the store.
    assert await store.get_message(message_id) is not None

    await add_domain(store, RELAY)
    done = await put(store, ["b@relay.test"])
    await store.discard(done)
    await store.remove_domain(RELAY)  # only final rows left: no force needed


# -- canary, queue, message operations -----------------------------------------------------
async def test_release_recipient_lets_one_recipient_go(store: Store) -> None:
    await add_domain(store, HELD, DomainMode.HOLD)
    first = await put(store, ["canary@held.test", "other@held.test"])
    second = await put(store, ["Canary@Held.Test"])
    assert await claim(store, HELD) == []

    assert await store.release_recipient("HELD.test", "CANARY@held.test") == 2
    assert await store.release_recipient(HELD, "nobody@held.test") == 0
    jobs = await claim(store, HELD)
    assert [(j.message_id, [r.address for r in j.recipients]) for j in jobs] == [
        (first, ["canary@held.test"]),
        (second, ["Canary@Held.Test"]),
    ]
    (status,) = await store.status(time.time())
    assert (status.held, status.delivering, status.pending) == (1, 2, 0)
    stored = await store.get_message(first)
    assert stored is not None
    assert [(r.state, r.held) for r in stored.recipients] == [
        (RecipientState.DELIVERING, False),
        (RecipientState.PENDING, True),
    ]


async def test_list_queue_filters_and_cursor(store: Store) -> None:
    await add_domain(store, HELD, DomainMode.HOLD)
    await add_domain(store, RELAY)
    held_ids = [await put(store, [f"h{i}@held.test"]) for i in range(5)]
    relay_id = await put(store, ["r@relay.test"], mail_from="findme@src.test")
    parked_id = await put(store, ["p@relay.test"])
    jobs = await claim(store, RELAY)
    by_msg = {j.message_id: j.recipients[0].id for j in jobs}
    await store.record_outcomes(
        "node-a",
        [
            RecipientOutcome(by_msg[parked_id], RecipientState.PARKED, "550 no", "mx:25"),
            RecipientOutcome(
                by_msg[relay_id], RecipientState.PENDING, "451 later", "mx:25", time.time() + 600
            ),
        ],
    )

    everything = await store.list_queue()
    assert [e.message_id for e in everything] == [*held_ids, relay_id, parked_id]
    assert [e.state for e in everything] == ["held"] * 5 + ["pending", "parked"]
    entry = everything[-2]
    assert (entry.rcpt, entry.domain, entry.mail_from, entry.attempts) == (
        "r@relay.test",
        RELAY,
        "findme@src.test",
        1,
    )
    assert entry.last_reply == "451 later"
    assert entry.size > 0

    assert [e.message_id for e in await store.list_queue(QueueFilter(state="held"))] == held_ids
    assert [e.message_id for e in await store.list_queue(QueueFilter(state="pending"))] == [
        relay_id
    ]
    assert [e.message_id for e in await store.list_queue(QueueFilter(state="parked"))] == [
        parked_id
    ]
    assert await store.list_queue(QueueFilter(state="delivered")) == []
    assert len(await store.list_queue(QueueFilter(domain="HELD.test"))) == 5
    assert [e.message_id for e in await store.list_queue(QueueFilter(search="findme"))] == [
        relay_id
    ]
    assert [e.rcpt for e in await store.list_queue(QueueFilter(search="h3@"))] == ["h3@held.test"]

    page1 = await store.list_queue(limit=3)
    page2 = await store.list_queue(limit=3, after=page1[-1].recipient_id)
    page3 = await store.list_queue(limit=3, after=page2[-1].recipient_id)
    assert [e.recipient_id for e in page1 + page2 + page3] == [e.recipient_id for e in everything]
    assert len(page3) == 1
    assert await store.list_queue(after=page3[-1].recipient_id) == []


async def test_discard_bounce_and_retry(store: Store) -> None:
    await add_domain(store, RELAY)
    discarded = await put(store, ["a@relay.test", "b@relay.test"])
    assert await store.discard(discarded) == 2
    assert await store.discard(discarded) == 0
    with pytest.raises(NotFound):
        await store.discard("NOSUCHID")

    bounced = await put(store, ["c@relay.test"])
    assert await store.mark_bounced(bounced, "550 5.1.1 unknown") == 1
    stored = await store.get_message(bounced)
    assert stored is not None
    assert stored.recipients[0].state is RecipientState.BOUNCED
    assert stored.recipients[0].last_reply == "550 5.1.1 unknown"
    with pytest.raises(NotFound):
        await store.mark_bounced("NOSUCHID", "x")

    await add_domain(store, "other.test")
    parked = [await put(store, [f"p{i}@relay.test"]) for i in range(2)]
    parked_other = await put(store, ["p@other.test"])
    for domain in (RELAY, "other.test"):
        jobs = await claim(store, domain)
        await store.record_outcomes(
            "node-a",
            [
                RecipientOutcome(r.id, RecipientState.PARKED, "550 not yet", "mx:25")
                for j in jobs
                for r in j.recipients
            ],
        )
    assert await store.retry(parked[0]) == 1
    assert await store.retry(parked[0]) == 0
    with pytest.raises(NotFound):
        await store.retry("NOSUCHID")
    assert await store.retry(domain="other.test") == 1
    assert await store.retry() == 1  # every parked one left: parked[1]
    entries = {e.message_id: e for e in await store.list_queue()}
    assert {entries[m].state for m in (*parked, parked_other)} == {"pending"}
    assert entries[parked[0]].attempts == 1  # retry keeps the count
    assert len(claimed_ids(await claim(store, RELAY))) == 2  # due again at once


async def test_status_counts_and_derived_held(store: Store) -> None:
    now = time.time()
    await add_domain(store, HELD, DomainMode.HOLD)
    await add_domain(store, RELAY)
    await add_domain(store, "empty.test")
    for i in range(3):
        await put(store, [f"h{i}@held.test"], received_at=now - 100)
    ids = [await put(store, [f"r{i}@relay.test"], received_at=now - 50) for i in range(5)]
    await store.discard(ids[4])
    await store.mark_bounced(ids[3], "5xx")
    jobs = await claim(store, RELAY, limit=3)
    assert len(jobs) == 3
    await store.record_outcomes(
        "node-a",
        [
            RecipientOutcome(jobs[0].recipients[0].id, RecipientState.DELIVERED, "250", "mx"),
            RecipientOutcome(jobs[1].recipients[0].id, RecipientState.PARKED, "550", "mx"),
        ],
    )
    statuses = {s.domain: s for s in await store.status(time.time())}
    assert sorted(statuses) == ["empty.test", HELD, RELAY]
    held = statuses[HELD]
    assert (held.mode, held.held, held.pending, held.delivering) == (DomainMode.HOLD, 3, 0, 0)
    assert held.oldest_pending_age_s == pytest.approx(100, abs=5)
    relay = statuses[RELAY]
    assert (relay.held, relay.pending, relay.delivering, relay.delivered) == (0, 0, 1, 1)
    assert (relay.parked, relay.bounced, relay.discarded) == (1, 1, 1)
    assert relay.delivered_last_minute == 1
    assert relay.oldest_pending_age_s == pytest.approx(50, abs=5)  # the delivering one
    empty = statuses["empty.test"]
    assert (empty.held, empty.pending, empty.oldest_pending_age_s) == (0, 0, None)

    # Releasing the domain turns held into pending at once: hold is the domain's property.
    await store.update_domain(HELD, DomainChanges(mode=DomainMode.RELAY))
    statuses = {s.domain: s for s in await store.status(time.time())}
    assert (statuses[HELD].held, statuses[HELD].pending) == (0, 3)


async def test_report_has_one_row_per_recipient(store: Store) -> None:
    await add_domain(store, HELD, DomainMode.HOLD)
    await add_domain(store, RELAY)
    data = b"Subject: r\r\n\r\nreport\r\n"
    held = await put(store, ["a@held.test", "b@held.test"], data=data, message_id="<r@src>")
    relay = await put(store, ["c@relay.test"])
    (job,) = await claim(store, RELAY)
    await store.record_outcomes(
        "node-a",
        [RecipientOutcome(job.recipients[0].id, RecipientState.DELIVERED, "250 2.0.0 ok", "mx")],
    )
    rows = [row async for row in store.report()]
    assert [(r.id, r.rcpt, r.state) for r in rows] == [
        (held, "a@held.test", "held"),
        (held, "b@held.test", "held"),
        (relay, "c@relay.test", "delivered"),
    ]
    first = rows[0]
    assert (first.message_id, first.mail_from, first.size) == (
        "<r@src>",
        "sender@src.test",
        len(data),
    )
    assert first.sha256 == hashlib.sha256(data).hexdigest()
    assert (first.attempts, first.delivered_at, first.remote_reply) == (0, None, None)
    last = rows[-1]
    assert (last.attempts, last.remote_reply) == (1, "250 2.0.0 ok")
    assert last.delivered_at == pytest.approx(time.time(), abs=30)
    assert [r.rcpt async for r in store.report(domain="RELAY.test")] == ["c@relay.test"]


async def test_report_pages_through_many_rows(store: Store) -> None:
    await asyncio.gather(*(put(store, [f"u{i}@relay.test"]) for i in range(1100)))
    rows = [row async for row in store.report()]
    assert len(rows) == 1100
    assert len({row.rcpt for row in rows}) == 1100


async def test_audit(store: Store) -> None:
    assert await store.list_audit() == []
    for i in range(5):
        await store.record_audit("cli", "domain.hold", f"d{i}.test", f"detail {i}")
    await store.record_audit("api", "queue.discard", "X")
    entries = await store.list_audit()
    assert [e.target for e in entries] == [
        "X",
        "d4.test",
        "d3.test",
        "d2.test",
        "d1.test",
        "d0.test",
    ]
    assert (entries[0].actor, entries[0].action, entries[0].detail) == ("api", "queue.discard", "")
    assert entries[1].detail == "detail 4"
    assert entries[0].at == pytest.approx(time.time(), abs=30)
    assert len(await store.list_audit(limit=2)) == 2


# -- delivery --------------------------------------------------------------------------------
async def test_claim_due_oldest_first_grouped_by_message(store: Store) -> None:
    await add_domain(store, RELAY)
    await add_domain(store, "other.test")
    mail_params = MailParams(size=10, body="8BITMIME")
    first = await put(
        store, ["a@relay.test", "x@other.test", "b@relay.test"], mail_params=mail_params
    )
    second = await put(store, ["c@relay.test"])
    third = await put(store, ["d@relay.test"])

    jobs = await claim(store, "RELAY.test", limit=3)
    assert [(j.message_id, [r.address for r in j.recipients]) for j in jobs] == [
        (first, ["a@relay.test", "b@relay.test"]),
        (second, ["c@relay.test"]),
    ]
    job = jobs[0]
    assert (job.domain, job.mail_from, job.mail_params) == (RELAY, "sender@src.test", mail_params)
    assert job.size > 0
    assert all(r.attempts == 0 and r.params == RcptParams() for r in job.recipients)
    # Leased rows are not claimed again, by anyone, while the lease runs.
    rest = await claim(store, RELAY, owner="node-b")
    assert [j.message_id for j in rest] == [third]
    assert await claim(store, RELAY, owner="node-b") == []
    assert [j.message_id for j in await claim(store, "other.test")] == [first]
    assert await claim(store, "unknown.test") == []


async def test_claim_due_respects_hold_and_next_attempt(store: Store) -> None:
    now = time.time()
    await add_domain(store, HELD, DomainMode.HOLD)
    await put(store, ["a@held.test"])
    assert await claim(store, HELD, now=now) == []
    assert await store.due_domains(now) == []
    assert await store.next_due_at(HELD) is None

    await store.update_domain(HELD, DomainChanges(mode=DomainMode.RELAY))
    assert await store.due_domains(now) == [HELD]
    assert await store.next_due_at(HELD) == 0.0
    (job,) = await claim(store, HELD, now=now)
    later = now + 300
    await store.record_outcomes(
        "node-a",
        [RecipientOutcome(job.recipients[0].id, RecipientState.PENDING, "451", "mx", later)],
    )
    assert await store.next_due_at(HELD) == pytest.approx(later)
    assert await claim(store, HELD, now=now + 1) == []
    assert await store.due_domains(now + 1) == []
    assert await store.due_domains(later) == [HELD]
    (again,) = await claim(store, HELD, now=later)
    assert again.recipients[0].attempts == 1


async def test_expired_lease_is_claimed_by_another_owner(store: Store) -> None:
    now = time.time()
    await add_domain(store, RELAY)
    await put(store, ["a@relay.test", "b@relay.test"])
    (job,) = await store.claim_due("node-a", now, 10.0, 10, RELAY)
    ids = [r.id for r in job.recipients]
    assert await store.claim_due("node-b", now + 5, 10.0, 10, RELAY) == []
    assert await store.due_domains(now + 5) == []
    assert await store.next_due_at(RELAY) == pytest.approx(now + 10)
    assert await store.due_domains(now + 11) == [RELAY]

    (taken,) = await store.claim_due("node-b", now + 11, 10.0, 10, RELAY)
    assert [r.id for r in taken.recipients] == ids
    # The first owner's late results no longer apply: its lease moved on.
    await store.record_outcomes(
        "node-a", [RecipientOutcome(i, RecipientState.DELIVERED, "250 a", "mx") for i in ids]
    )
    stored = await store.get_message(job.message_id)
    assert stored is not None
    assert {r.state for r in stored.recipients} == {RecipientState.DELIVERING}
    assert await store.attempts(job.message_id) == []
    await store.record_outcomes(
        "node-b", [RecipientOutcome(i, RecipientState.DELIVERED, "250 b", "mx") for i in ids]
    )
    stored = await store.get_message(job.message_id)
    assert stored is not None
    assert {(r.state, r.last_reply) for r in stored.recipients} == {
        (RecipientState.DELIVERED, "250 b")
    }


async def test_renew_leases(store: Store) -> None:
    now = time.time()
    await add_domain(store, RELAY)
    await put(store, ["a@relay.test"])
    (job,) = await store.claim_due("node-a", now, 10.0, 10, RELAY)
    ids = [r.id for r in job.recipients]
    await store.renew_leases("node-b", ids, now + 1000)  # not the owner: no effect
    await store.renew_leases("node-a", [], now + 1000)
    assert await store.next_due_at(RELAY) == pytest.approx(now + 10)
    await store.renew_leases("node-a", ids, now + 100)
    assert await store.next_due_at(RELAY) == pytest.approx(now + 100)
    assert await store.claim_due("node-b", now + 50, 10.0, 10, RELAY) == []
    assert len(await store.claim_due("node-b", now + 101, 10.0, 10, RELAY)) == 1


async def test_record_outcomes_and_attempts(store: Store) -> None:
    await add_domain(store, RELAY)
    message_id = await put(store, ["a@relay.test", "b@relay.test", "c@relay.test", "d@relay.test"])
    (job,) = await claim(store, RELAY)
    a, b, c, d = (r.id for r in job.recipients)
    retry_at = time.time() + 900
    await store.record_outcomes("node-a", [])
    await store.record_outcomes(
        "node-a",
        [
            RecipientOutcome(a, RecipientState.DELIVERED, "250 2.0.0 ok", "mx1:25"),
            RecipientOutcome(b, RecipientState.PENDING, "451 4.7.0 later", "mx1:25", retry_at),
            RecipientOutcome(c, RecipientState.PARKED, "550 5.1.1 unknown", "mx2:25"),
            RecipientOutcome(
                d, RecipientState.PENDING, "shutting down", "mx1:25", 0.0, count_attempt=False
            ),
        ],
    )
    stored = await store.get_message(message_id)
    assert stored is not None
    rows = {r.id: r for r in stored.recipients}
    assert rows[a].state is RecipientState.DELIVERED
    assert rows[a].delivered_at == pytest.approx(time.time(), abs=30)
    assert (rows[a].attempts, rows[a].last_reply) == (1, "250 2.0.0 ok")
    assert (rows[b].state, rows[b].attempts) == (RecipientState.PENDING, 1)
    assert rows[b].next_attempt_at == pytest.approx(retry_at)
    assert rows[b].delivered_at is None
    assert (rows[c].state, rows[c].attempts) == (RecipientState.PARKED, 1)
    assert (rows[d].state, rows[d].attempts) == (RecipientState.PENDING, 0)
    attempts = await store.attempts(message_id)
    assert [(x.recipient, x.destination, x.outcome, x.reply) for x in attempts] == [
        ("a@relay.test", "mx1:25", "delivered", "250 2.0.0 ok"),
        ("b@relay.test", "mx1:25", "pending", "451 4.7.0 later"),
        ("c@relay.test", "mx2:25", "parked", "550 5.1.1 unknown"),
    ]
    assert attempts[0].at == pytest.approx(time.time(), abs=30)
    assert await store.attempts("NOSUCHID") == []
    # Outcomes for rows no longer leased (already final) change nothing.
    await store.record_outcomes("node-a", [RecipientOutcome(a, RecipientState.PARKED, "x", "mx")])
    stored = await store.get_message(message_id)
    assert stored is not None
    assert {r.id: r for r in stored.recipients}[a].state is RecipientState.DELIVERED
    # A discarded row is final, even for its (former) leaseholder.
    (job2,) = await claim(store, RELAY)
    assert [r.id for r in job2.recipients] == [d]
    await store.discard(message_id)
    await store.record_outcomes("node-a", [RecipientOutcome(d, RecipientState.DELIVERED, "", "")])
    stored = await store.get_message(message_id)
    assert stored is not None
    assert {r.id: r for r in stored.recipients}[d].state is RecipientState.DISCARDED


async def test_due_domains_and_next_due_at(store: Store) -> None:
    now = time.time()
    await add_domain(store, HELD, DomainMode.HOLD)
    await add_domain(store, RELAY)
    await add_domain(store, "idle.test")
    assert await store.due_domains(now) == []
    assert await store.next_due_at(RELAY) is None
    await put(store, ["a@held.test", "b@held.test"])
    await put(store, ["c@relay.test"])
    assert await store.due_domains(now) == [RELAY]
    await store.release_recipient(HELD, "a@held.test")
    assert sorted(await store.due_domains(now)) == [HELD, RELAY]
    assert await store.next_due_at(HELD) == 0.0
    assert await store.next_due_at("idle.test") is None
    assert await store.next_due_at("unknown.test") is None


async def test_claims_from_two_instances_never_overlap(open_store: StoreFactory) -> None:
    """Two store instances (two nodes) claiming concurrently never get the same recipient."""
    first = await open_store()
    second = await open_store()
    await add_domain(first, RELAY)
    await asyncio.gather(
        *(put(first, [f"u{i}a@relay.test", f"u{i}b@relay.test"]) for i in range(150))
    )
    got: dict[str, list[int]] = {"a": [], "b": []}

    async def worker(store: Store, owner: str) -> None:
        while True:
            jobs = await store.claim_due(owner, time.time(), LEASE, 7, RELAY)
            if not jobs:
                return
            got[owner] += claimed_ids(jobs)
            await asyncio.sleep(0)

    await asyncio.gather(
        worker(first, "a"), worker(second, "b"), worker(first, "a"), worker(second, "b")
    )
    concurrent = len(got["a"]) + len(got["b"])
    got["a"] += claimed_ids(await claim_the_rest(first, "a", 7))
    assert concurrent >= 250  # the concurrent claims did the work, the sweep the rest
    everything = got["a"] + got["b"]
    assert len(everything) == 300
    assert len(set(everything)) == 300


# -- cluster-wide pacing (both stores) ---------------------------------------------------------


async def test_take_tokens_is_a_token_bucket(store: Store) -> None:
    pacing = store
    now = 1_000_000.0
    assert await pacing.take_tokens("mx.test", 2.0, 5.0, 3, now) == 3  # starts full
    assert await pacing.take_tokens("mx.test", 2.0, 5.0, 3, now) == 2
    assert await pacing.take_tokens("mx.test", 2.0, 5.0, 1, now) == 0
    assert await pacing.take_tokens("mx.test", 2.0, 5.0, 10, now + 1.0) == 2  # refilled 2
    assert await pacing.take_tokens("mx.test", 2.0, 5.0, 10, now + 0.5) == 0  # clock behind
    assert await pacing.take_tokens("mx.test", 2.0, 5.0, 10, now + 100) == 5  # capped at burst
    assert await pacing.take_tokens("other.test", 2.0, 5.0, 1, now) == 1  # its own bucket
    assert await pacing.take_tokens("mx.test", 2.0, 5.0, 0, now + 200) == 0


async def test_slots_limit_concurrency(store: Store) -> None:
    pacing = store
    assert await pacing.acquire_slot("mx.test", "n1-1", 2, 30.0)
    assert await pacing.acquire_slot("mx.test", "n2-1", 2, 30.0)
    assert not await pacing.acquire_slot("mx.test", "n1-2", 2, 30.0)
    assert await pacing.acquire_slot("mx.test", "n1-1", 2, 30.0)  # renew own slot
    assert await pacing.acquire_slot("other.test", "n1-2", 2, 30.0)
    await pacing.release_slot("mx.test", "n2-1")
    await pacing.release_slot("mx.test", "n2-1")  # twice is fine
    assert await pacing.acquire_slot("mx.test", "n1-2", 2, 30.0)
    # A slot not renewed within its ttl expires (its node died).
    assert await pacing.acquire_slot("exp.test", "dead", 1, 0.2)
    assert not await pacing.acquire_slot("exp.test", "alive", 1, 30.0)
    await eventually(
        lambda: pacing.acquire_slot("exp.test", "alive", 1, 30.0), 10, "the dead slot to expire"
    )


# -- migration toolkit: recipient lists and tags ---------------------------------------------


async def test_recipient_lists_add_replace_clear_and_bump_generation(store: Store) -> None:
    await store.add_domain(Domain(RELAY, DomainMode.RELAY, (Route("127.0.0.1", 2526),)))
    await store.add_domain(Domain(HELD, DomainMode.HOLD, (Route("127.0.0.1", 2526),)))
    assert await store.recipient_list(RELAY) == []
    assert await store.recipient_lists() == {}
    before = await store.domains_generation()
    count = await store.add_recipients(RELAY, [f"Alice@{RELAY}", f"bob@{RELAY}"])
    assert count == 2
    assert await store.domains_generation() != before
    assert await store.recipient_list(RELAY) == [f"alice@{RELAY}", f"bob@{RELAY}"]
    # Adding merges (duplicates, in any case, count once); replace starts over.
    assert await store.add_recipients(RELAY, [f"ALICE@{RELAY}", f"carol@{RELAY}"]) == 3
    await store.add_recipients(HELD, [f"dave@{HELD}"])
    assert await store.recipient_lists() == {
        RELAY: frozenset({f"alice@{RELAY}", f"bob@{RELAY}", f"carol@{RELAY}"}),
        HELD: frozenset({f"dave@{HELD}"}),
    }
    assert await store.add_recipients(RELAY, [f"erin@{RELAY}"], replace=True) == 1
    assert await store.recipient_list(RELAY) == [f"erin@{RELAY}"]
    generation = await store.domains_generation()
    assert await store.clear_recipients(RELAY) == 1
    assert await store.domains_generation() != generation
    assert await store.recipient_list(RELAY) == []
    assert set(await store.recipient_lists()) == {HELD}


async def test_recipient_list_of_unknown_domain_and_removed_domain(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.add_recipients("nowhere.test", ["a@nowhere.test"])
    await store.add_domain(Domain(RELAY, DomainMode.RELAY, (Route("127.0.0.1", 2526),)))
    await store.add_recipients(RELAY, [f"a@{RELAY}"])
    await store.remove_domain(RELAY)
    # The list goes with its domain: re-adding the domain does not resurrect it.
    await store.add_domain(Domain(RELAY, DomainMode.RELAY, (Route("127.0.0.1", 2526),)))
    assert await store.recipient_list(RELAY) == []


async def test_add_tag_and_list_queue_by_tag(store: Store) -> None:
    await store.add_domain(Domain(RELAY, DomainMode.RELAY, (Route("127.0.0.1", 2526),)))
    plain = await put(store, [f"a@{RELAY}"])
    probe = await put(store, [f"b@{RELAY}"])
    await store.add_tag(probe, "probe")
    await store.add_tag(probe, "probe")  # idempotent
    await store.add_tag(probe, "probed-again")
    message = await store.get_message(probe)
    assert message is not None and message.tags == ("probe", "probed-again")
    tagged = await store.list_queue(QueueFilter(tag="probe"))
    assert [entry.message_id for entry in tagged] == [probe]
    assert {entry.message_id for entry in await store.list_queue()} == {plain, probe}
    # A tag is matched whole: "probe" does not match "probed-again" alone, nor "rob".
    assert await store.list_queue(QueueFilter(tag="rob")) == []
    with pytest.raises(NotFound):
        await store.add_tag("no-such-id", "probe")


async def test_queue_search_takes_like_wildcards_literally(store: Store) -> None:
    """``%``, ``_``, backslash and ``!`` in a search are text, not LIKE syntax, on every
    backend (SQLite once matched ``a_b`` to ``axb``); ASCII case is still ignored."""
    await add_domain(store, RELAY, DomainMode.HOLD)
    locals_ = ["axb", "a_b", "a%b", "ab", "a\\b", "a!b", "a!!b", "aXXb"]
    for local in locals_:
        await put(store, [f"{local}@{RELAY}"])

    async def found(text: str) -> set[str]:
        entries = await store.list_queue(QueueFilter(search=text), limit=1000)
        return {entry.rcpt.split("@")[0] for entry in entries}

    assert await found(f"b@{RELAY}") == set(locals_)  # positive control: search works at all
    assert await found("a_b") == {"a_b"}
    assert await found("A_B@") == {"a_b"}
    assert await found("a%b") == {"a%b"}
    assert await found("a\\b") == {"a\\b"}
    assert await found("a!b") == {"a!b"}
    assert await found("a!!b") == {"a!!b"}
    assert await found("%") == {"a%b"}
    assert await found("_") == {"a_b"}
    assert await found("axb") == {"axb"}
    # The sender and the Message-ID are searched the same way.
    sender = await put(store, [f"s@{RELAY}"], mail_from="x_y@src.test", message_id="<p%q@src>")
    assert {e.message_id for e in await store.list_queue(QueueFilter(search="x_y@"))} == {sender}
    assert await store.list_queue(QueueFilter(search="xzy@")) == []
    assert {e.message_id for e in await store.list_queue(QueueFilter(search="<p%q"))} == {sender}
    assert await store.list_queue(QueueFilter(search="<pzq")) == []


async def test_queue_tag_filter_takes_like_wildcards_literally(store: Store) -> None:
    await add_domain(store, RELAY)
    tagged = await put(store, [f"a@{RELAY}"])
    await store.add_tag(tagged, "probe")
    assert [e.message_id for e in await store.list_queue(QueueFilter(tag="probe"))] == [tagged]
    assert await store.list_queue(QueueFilter(tag="pr_be")) == []
    assert await store.list_queue(QueueFilter(tag="pr%")) == []


# -- dead destinations -----------------------------------------------------------------------
DEAD_REPLY = "4.4.1 destination dead: refused (3 consecutive connection failures)"


def _dead(now: float, until: float, **kwargs: Any) -> DestinationDeferral:
    return DestinationDeferral(until=until, reply=DEAD_REPLY, now=now, **kwargs)


async def _rows(store: Store, message_ids: list[str]) -> list[Any]:
    found = []
    for message_id in message_ids:
        message = await store.get_message(message_id)
        assert message is not None
        found += message.recipients
    return found


async def test_defer_destination_defers_the_whole_queue_but_not_live_claims(
    open_store: StoreFactory,
) -> None:
    store = await open_store()
    other = await open_store()  # another node
    await add_domain(store, RELAY)
    await add_domain(store, HELD, DomainMode.HOLD)
    now = time.time()
    ids = [await put(store, [f"u{n}@{RELAY}"]) for n in range(6)]
    held = await put(store, [f"h@{HELD}"])
    # u0: claimed by a live node; u1: tried once, its own retry time an hour away;
    # u2: claimed by a node whose lease has expired.
    (live,) = await other.claim_due("node-b", now, LEASE, 1, RELAY)
    (tried,) = await store.claim_due("node-a", now, LEASE, 1, RELAY)
    (tried_rcpt,) = tried.recipients
    later = RecipientOutcome(
        tried_rcpt.id, RecipientState.PENDING, "451 4.2.0 later", "mx:25", now + 3600
    )
    await store.record_outcomes("node-a", [later])
    (stale,) = await store.claim_due("node-gone", now - 100, 1.0, 1, RELAY)

    until = now + 600
    assert await store.defer_destination(RELAY, _dead(now, until)) == 5
    rows = {r.address: r for r in await _rows(store, ids)}
    assert rows[f"u0@{RELAY}"].state is RecipientState.DELIVERING  # left to its live worker
    assert rows[f"u0@{RELAY}"].last_reply is None
    for n in range(1, 6):
        row = rows[f"u{n}@{RELAY}"]
        assert (row.state, row.last_reply) == (RecipientState.PENDING, DEAD_REPLY)
        assert row.next_attempt_at == pytest.approx(until)  # also u1's later own retry time
        # No attempt is counted or logged for a destination-level deferral.
        assert row.attempts == (1 if n == 1 else 0)
    assert [a.reply for a in await store.attempts(ids[1])] == ["451 4.2.0 later"]
    assert await store.attempts(ids[3]) == []
    (held_row,) = await _rows(store, [held])
    assert (held_row.last_reply, held_row.next_attempt_at) == (None, 0.0)  # held: untouched
    # Again with the same probe time: nothing to rewrite. An unknown domain: nothing.
    assert await store.defer_destination(RELAY, _dead(now, until)) == 0
    assert await store.defer_destination("nowhere.test", _dead(now, until)) == 0

    # The live claim was never disturbed: its worker's outcome still lands.
    (live_rcpt,) = live.recipients
    delivered = RecipientOutcome(live_rcpt.id, RecipientState.DELIVERED, "250 ok", "mx:25")
    await other.record_outcomes("node-b", [delivered])
    (u0,) = await _rows(store, [ids[0]])
    assert (u0.id, u0.state) == (live_rcpt.id, RecipientState.DELIVERED)
    assert stale.recipients[0].address == f"u2@{RELAY}"

    assert await store.due_domains(now + 1) == []
    assert await store.next_due_at(RELAY) == pytest.approx(until)
    assert await claim(store, RELAY, now=until - 1) == []
    # At the probe time the whole queue is due at once, oldest first.
    due = await claim(store, RELAY, now=until)
    assert [r.address for job in due for r in job.recipients] == [
        f"u{n}@{RELAY}" for n in range(1, 6)
    ]


async def test_defer_destination_parks_what_is_past_max_age(store: Store) -> None:
    await add_domain(store, RELAY)
    now = time.time()
    old = await put(store, [f"old@{RELAY}"], received_at=now - 1000)
    young = await put(store, [f"young@{RELAY}"], received_at=now - 10)
    deferral = _dead(
        now, now + 60, expire_received_before=now - 500, expired_reply="expired: " + DEAD_REPLY
    )
    assert await store.defer_destination(RELAY, deferral) == 2
    (old_row,) = await _rows(store, [old])
    (young_row,) = await _rows(store, [young])
    assert (old_row.state, old_row.last_reply) == (RecipientState.PARKED, "expired: " + DEAD_REPLY)
    assert (young_row.state, young_row.last_reply) == (RecipientState.PENDING, DEAD_REPLY)
    assert old_row.attempts == young_row.attempts == 0
    assert await store.defer_destination(RELAY, deferral) == 0  # parked is not pending


async def test_defer_destination_in_a_held_domain_takes_only_canaries(store: Store) -> None:
    await add_domain(store, HELD, DomainMode.HOLD)
    message_id = await put(store, [f"canary@{HELD}", f"other@{HELD}"])
    await store.release_recipient(HELD, f"canary@{HELD}")
    now = time.time()
    assert await store.defer_destination(HELD, _dead(now, now + 60)) == 1
    rows = {r.address: r for r in await _rows(store, [message_id])}
    assert rows[f"canary@{HELD}"].last_reply == DEAD_REPLY
    assert rows[f"other@{HELD}"].last_reply is None
    assert rows[f"other@{HELD}"].held


async def test_defer_destination_and_a_concurrent_claim_never_share_a_row(
    open_store: StoreFactory,
) -> None:
    """Another node claims while this one defers: every row is either the claim's (left
    alone, its outcome lands) or deferred, never both."""
    one = await open_store()
    two = await open_store()
    await add_domain(one, RELAY)
    await asyncio.gather(*(one.accept_message(make_message([f"u{n}@{RELAY}"])) for n in range(300)))
    now = time.time()
    until = now + 600
    for _ in range(3):
        claimed, _changed = await asyncio.gather(
            two.claim_due("node-b", now, LEASE, 100, RELAY),
            one.defer_destination(RELAY, _dead(now, until)),
        )
        mine = {r.id for job in claimed for r in job.recipients}
        outcomes = [
            RecipientOutcome(rid, RecipientState.DELIVERED, "250 ok", "mx:25") for rid in mine
        ]
        await two.record_outcomes("node-b", outcomes)
        for row in await one.list_queue(QueueFilter(domain=RELAY), limit=1000):
            if row.recipient_id in mine:
                assert row.state == "delivered", row
            elif row.state != "delivered":  # delivered in an earlier round
                assert (row.state, row.last_reply) == ("pending", DEAD_REPLY), row
        now, until = until, until + 600  # everything left is due again: race once more


# -- counters: after every operation of every scenario above, they equal a recount -----------


class _Recounting:
    """A store that, after each of its operations, asserts its recipient counters equal a
    recount of the rows (``check_counters``): every scenario of this suite checks them."""

    _UNCHECKED = frozenset({"open", "close", "check_counters", "submit_message", "free_bytes"})

    def __init__(self, inner: Store) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name in self._UNCHECKED or name.startswith("_"):
            return value
        if not inspect.iscoroutinefunction(value):
            return value  # async iterators (report, read_body, notifications), attributes

        async def checked(*args: Any, **kwargs: Any) -> Any:
            try:
                return await value(*args, **kwargs)
            finally:
                drift = await self._inner.check_counters()
                assert drift == [], f"counters drifted after {name}: {drift}"

        return checked


@pytest.fixture
async def open_store(open_store: StoreFactory, store_url: str) -> AsyncIterator[StoreFactory]:
    """The conftest factory, its stores checking the counters after each operation; and once
    the test is done, a fresh instance recounts the whole store."""

    async def make() -> Store:
        return cast(Store, _Recounting(await open_store()))

    yield make
    after = create_store(store_url)
    await after.open()
    try:
        assert await after.check_counters() == []
    finally:
        await after.close()
