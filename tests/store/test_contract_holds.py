"""Recipient holds, queue flush and the release plan's per-recipient backlog, on every store
(the contract fixtures of ``test_contract``: SQLite with and without the C commit thread, and
PostgreSQL, counters rechecked after every operation).

A recipient hold keeps one mailbox's rows (and its sub-addresses') out of every claim while its
domain relays, new mail for it included, until the hold is released; each "not claimed" check
has a claim of another recipient beside it that must succeed.
"""

from __future__ import annotations

import time

from mxspool.store.base import (
    HELD_UNTIL,
    DeliveryJob,
    DestinationDeferral,
    DomainChanges,
    DomainMode,
    RecipientHold,
    RecipientOutcome,
    RecipientState,
    Store,
)
from tests.store import test_contract
from tests.store.test_contract import RELAY, add_domain, claim, put

open_store = test_contract.open_store
"""The contract's fixture: stores that recheck their counters after every operation."""

BOB = f"bob@{RELAY}"


def _hold(address: str = BOB, prefix: str = "bob+") -> RecipientHold:
    # prefix: local part and plus separator; its sub-addresses are held too.
    return RecipientHold(address, RELAY, prefix, f"@{RELAY}", time.time(), "alice")


def _claimed(jobs: list[DeliveryJob]) -> list[str]:
    return sorted(r.address for job in jobs for r in job.recipients)


async def _rows(store: Store, message_id: str) -> dict[str, float]:
    message = await store.get_message(message_id)
    assert message is not None
    return {r.address: r.next_attempt_at for r in message.recipients}


async def test_a_held_recipient_is_never_claimed_until_released(store: Store) -> None:
    await add_domain(store, RELAY)
    before = await put(store, [BOB, f"carol@{RELAY}"])
    sub = await put(store, [f"Bob+News@{RELAY}"])
    assert await store.hold_recipient(_hold()) == 2  # bob and bob+news; carol not
    after = await put(store, [f"BOB@{RELAY}", f"dave@{RELAY}"])  # new mail: held at arrival
    other_sub = await put(store, [f"bobby@{RELAY}"])  # not a sub-address of bob
    rows = await _rows(store, after)
    assert rows[f"BOB@{RELAY}"] == HELD_UNTIL
    assert rows[f"dave@{RELAY}"] < HELD_UNTIL

    # Positive control: the others are claimed, in the same claims that leave bob's rows.
    jobs = await claim(store, RELAY, now=time.time() + 3600)
    assert _claimed(jobs) == [f"bobby@{RELAY}", f"carol@{RELAY}", f"dave@{RELAY}"]
    assert await claim(store, RELAY, owner="node-b", now=time.time() + 3600) == []
    assert RELAY not in await store.due_domains(time.time() + 3600)

    [listed] = await store.recipient_holds()
    assert (listed.address, listed.domain, listed.held, listed.actor) == (BOB, RELAY, 3, "alice")
    assert await store.recipient_holds("other.test") == []

    assert await store.release_recipient_hold(f"Bob@{RELAY}") == 3
    assert await store.recipient_holds() == []
    assert RELAY in await store.due_domains(time.time())
    released = await claim(store, RELAY, owner="node-b")
    assert _claimed(released) == sorted([BOB, f"BOB@{RELAY}", f"Bob+News@{RELAY}"])
    assert {job.message_id for job in released} == {before, sub, after}
    assert other_sub not in {job.message_id for job in released}
    # Released: new mail for bob is no longer held, and a second release finds no hold.
    assert (await _rows(store, await put(store, [BOB])))[BOB] < HELD_UNTIL
    assert await store.release_recipient_hold(BOB) is None


async def test_holding_a_sub_address_holds_only_itself(store: Store) -> None:
    await add_domain(store, RELAY)
    await put(store, [f"bob+x@{RELAY}", BOB, f"bob+y@{RELAY}"])
    hold = RecipientHold(f"bob+x@{RELAY}", RELAY, "", f"@{RELAY}", time.time(), "alice")
    assert await store.hold_recipient(hold) == 1
    assert _claimed(await claim(store, RELAY)) == sorted([BOB, f"bob+y@{RELAY}"])


async def test_a_dead_destination_deferral_and_a_flush_leave_held_rows_held(store: Store) -> None:
    now = time.time()
    await add_domain(store, RELAY)
    message_id = await put(store, [BOB, f"carol@{RELAY}"])
    await store.hold_recipient(_hold())
    until = now + 600
    dead = DestinationDeferral(until=until, reply="4.4.1 destination dead", now=now)
    assert await store.defer_destination(RELAY, dead) == 1  # carol only
    assert await _rows(store, message_id) == {BOB: HELD_UNTIL, f"carol@{RELAY}": until}
    assert await store.flush_queue(now + 1) == 1
    assert await _rows(store, message_id) == {BOB: HELD_UNTIL, f"carol@{RELAY}": now + 1}


async def test_flush_makes_deferred_mail_due_now_but_not_held_mail(store: Store) -> None:
    now = time.time()
    await add_domain(store, RELAY)
    await add_domain(store, "other.test")
    await add_domain(store, "later.test")
    deferred = await put(store, [f"a@{RELAY}", "b@other.test"])
    held = await put(store, ["c@later.test"])
    jobs = [
        *await claim(store, RELAY, now=now),
        *await claim(store, "other.test", now=now),
        *await claim(store, "later.test", now=now),
    ]
    later = now + 3600
    await store.record_outcomes(
        "node-a",
        [
            RecipientOutcome(r.id, RecipientState.PENDING, "451 4.3.0 later", "x", later)
            for job in jobs
            for r in job.recipients
        ],
    )
    assert await claim(store, RELAY, now=now + 1) == []  # deferred: not due
    # A domain put on hold since: its deferred mail stays held through a flush.
    await store.update_domain("later.test", DomainChanges(mode=DomainMode.HOLD))

    assert await store.flush_queue(now + 1, RELAY) == 1  # one domain only
    assert await _rows(store, deferred) == {f"a@{RELAY}": now + 1, "b@other.test": later}
    assert _claimed(await claim(store, RELAY, now=now + 1)) == [f"a@{RELAY}"]
    assert await store.flush_queue(now + 2) == 1  # all domains: other.test's row
    assert await store.flush_queue(now + 2) == 0  # nothing deferred is left
    assert await _rows(store, held) == {"c@later.test": later}
    assert await claim(store, "later.test", now=now + 3) == []


async def test_recipient_backlog_groups_by_recipient(store: Store) -> None:
    await add_domain(store, RELAY)
    await store.add_recipients(RELAY, [BOB, f"carol@{RELAY}"], max_sizes={BOB: 100})
    for n in range(3):
        await put(store, [BOB, f"Carol@{RELAY}"], data=b"x" * (50 + 50 * n))  # 50, 100, 150
    await put(store, [f"dave@{RELAY}"], data=b"y" * 10)
    await store.hold_recipient(_hold(f"dave@{RELAY}", "dave+"))
    rows = {row.address: row for row in await store.recipient_backlog(RELAY, 120)}
    assert set(rows) == {BOB, f"carol@{RELAY}", f"dave@{RELAY}"}
    bob, carol, dave = rows[BOB], rows[f"carol@{RELAY}"], rows[f"dave@{RELAY}"]
    assert (bob.messages, bob.size, bob.too_big, bob.held, bob.max_size) == (3, 300, 1, 0, 100)
    # carol: no mailbox limit known; the domain's 120 bytes makes the 150-byte one too big.
    assert (carol.messages, carol.too_big, carol.max_size) == (3, 1, None)
    assert (dave.messages, dave.size, dave.held) == (1, 10, 1)
    # Without a domain limit only the mailbox's counts.
    assert {r.address: r.too_big for r in await store.recipient_backlog(RELAY, None)} == {
        BOB: 1,
        f"carol@{RELAY}": 0,
        f"dave@{RELAY}": 0,
    }
    assert await store.recipient_backlog("other.test", None) == []


async def test_recipient_backlog_counts_the_busiest_sender(store: Store) -> None:
    await add_domain(store, RELAY)
    for _ in range(4):
        await put(store, [BOB], mail_from="news@src.test")
    await put(store, [BOB], mail_from="NEWS@src.test")  # the same sender, other case
    await put(store, [BOB], mail_from="alice@src.test")
    await put(store, [f"carol@{RELAY}"], mail_from="alice@src.test")
    rows = {row.address: row for row in await store.recipient_backlog(RELAY, None)}
    assert (rows[BOB].messages, rows[BOB].busiest_pair) == (6, 5)
    assert (rows[f"carol@{RELAY}"].messages, rows[f"carol@{RELAY}"].busiest_pair) == (1, 1)


def test_the_drain_estimate_takes_the_slower_of_recipient_and_pair_limits() -> None:
    from mxspool.delivery import exchange

    # 30 messages from one sender: the recipient limit (3,600/h) lets them all go in its burst,
    # the pair limit (1,200/h, one every 3 s) does not.
    alone = exchange.recipient_drain_seconds(30, 3600)
    one_sender = exchange.recipient_drain_seconds(30, 3600, busiest_pair=30)
    assert alone == 0.0  # control: within the recipient burst
    assert 20 < one_sender < 40
    # Many senders: the recipient limit decides again.
    assert exchange.recipient_drain_seconds(600, 3600, busiest_pair=5) == (
        exchange.recipient_drain_seconds(600, 3600)
    )
