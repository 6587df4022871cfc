"""Store contract for the recipient gate (issue 11): domain limits, recipient MaxReceiveSize and
recipients stored parked at once. Same fixtures as test_contract.py: every backend."""

from __future__ import annotations

import dataclasses
import time

import pytest

from mxspool.store.base import DomainChanges, DomainMode, NotFound, QueueFilter, Store
from tests.store.test_contract import add_domain, make_message

REASON = "552 5.2.3 not attempted: the message (20480 bytes) is larger than this recipient takes"


async def test_domain_gate_fields_round_trip_and_change(store: Store) -> None:
    plain = await add_domain(store, "plain.test")
    assert (plain.max_size, plain.subdomains, plain.plus_separator) == (None, False, "+")
    got = await store.get_domain("plain.test")
    assert got is not None and (got.max_size, got.subdomains, got.plus_separator) == (
        None,
        False,
        "+",
    )
    gated = dataclasses.replace(plain, name="gated.test", max_size=37_748_736, subdomains=True)
    await store.add_domain(dataclasses.replace(gated, plus_separator=""))
    listed = {domain.name: domain for domain in await store.list_domains()}
    assert (listed["gated.test"].max_size, listed["gated.test"].subdomains) == (37_748_736, True)
    assert listed["gated.test"].plus_separator == ""

    before = await store.domains_generation()
    changed = await store.update_domain(
        "gated.test", DomainChanges(max_size=1024, subdomains=False, plus_separator="-")
    )
    assert (changed.max_size, changed.subdomains, changed.plus_separator) == (1024, False, "-")
    assert await store.domains_generation() != before
    # Leaving fields out leaves them; clear_max_size clears.
    same = await store.update_domain("gated.test", DomainChanges(mode=DomainMode.HOLD))
    assert (same.max_size, same.plus_separator) == (1024, "-")
    cleared = await store.update_domain("gated.test", DomainChanges(clear_max_size=True))
    assert cleared.max_size is None and cleared.plus_separator == "-"


async def test_recipient_max_sizes_are_kept_and_replaced(store: Store) -> None:
    await add_domain(store, "mbx.test")
    sizes = {"tiny@mbx.test": 16_384, "std@mbx.test": 37_748_736}
    addresses = ["tiny@mbx.test", "std@mbx.test", "roomy@mbx.test"]
    assert await store.add_recipients("mbx.test", addresses, max_sizes=sizes) == 3
    assert await store.recipient_max_sizes() == sizes
    assert await store.recipient_lists() == {"mbx.test": frozenset(addresses)}
    # Imported again with a new limit: the new value wins; without sizes, none is kept.
    await store.add_recipients("mbx.test", ["tiny@mbx.test"], max_sizes={"tiny@mbx.test": 1})
    assert (await store.recipient_max_sizes())["tiny@mbx.test"] == 1
    await store.add_recipients("mbx.test", ["std@mbx.test"], replace=True)
    assert await store.recipient_max_sizes() == {}
    assert await store.recipient_list("mbx.test") == ["std@mbx.test"]
    with pytest.raises(NotFound):
        await store.add_recipients("none.test", ["a@none.test"], max_sizes={"a@none.test": 5})


async def test_addresses_fold_ascii_and_idn_once(store: Store) -> None:
    await add_domain(store, "xn--bcher-kva.test")
    await store.add_recipients(
        "xn--bcher-kva.test", ["Alice@BÜCHER.test", "bob@xn--bcher-kva.test"]
    )
    # "BÜCHER" is no valid U-label: it is not stored at all, rather than under a wrong name.
    assert await store.recipient_list("xn--bcher-kva.test") == ["bob@xn--bcher-kva.test"]
    await store.add_recipients("xn--bcher-kva.test", ["Carol@bücher.test"])
    assert "carol@xn--bcher-kva.test" in await store.recipient_list("xn--bcher-kva.test")


@pytest.mark.parametrize("spill", [False, True], ids=["in-memory", "spilled"])
async def test_accept_stores_parked_recipients_and_parent_domains(
    store: Store, spill: bool
) -> None:
    await add_domain(store, "sub.test", DomainMode.HOLD)
    message = make_message(
        ["tiny@sub.test", "x@a.sub.test", "roomy@sub.test"],
        spill_threshold=8 if spill else 1 << 20,
    )
    message.domains = ("sub.test", "sub.test", "sub.test")
    message.parked = {0: REASON}
    await store.accept_message(message)
    stored = await store.get_message(message.id)
    assert stored is not None
    rows = {r.address: r for r in stored.recipients}
    assert rows["tiny@sub.test"].state.value == "parked"
    assert rows["tiny@sub.test"].last_reply == REASON
    assert rows["tiny@sub.test"].attempts == 0
    assert rows["x@a.sub.test"].domain == "sub.test"  # held and routed with its parent
    assert rows["x@a.sub.test"].state.value == "pending" and rows["x@a.sub.test"].held
    assert rows["roomy@sub.test"].last_reply is None

    status = {entry.domain: entry for entry in await store.status(time.time())}
    assert (status["sub.test"].parked, status["sub.test"].held) == (1, 2)
    parked = await store.list_queue(QueueFilter(domain="sub.test", state="parked"))
    assert [(entry.rcpt, entry.last_reply) for entry in parked] == [("tiny@sub.test", REASON)]
    # A parked-at-arrival recipient is retried like any parked one.
    assert await store.retry(message.id) == 1
    assert await store.check_counters() == []


async def test_many_accepts_with_and_without_parked_rows(store: Store) -> None:
    """The batched accept paths (one statement for many messages) keep each row's state."""
    import asyncio

    await add_domain(store, "batch.test", DomainMode.HOLD)
    messages = [make_message([f"a{i}@batch.test", f"b{i}@batch.test"]) for i in range(40)]
    for index, message in enumerate(messages):
        if index % 3 == 0:
            message.parked = {1: REASON}
    await asyncio.gather(*(store.accept_message(message) for message in messages))
    status = {entry.domain: entry for entry in await store.status(time.time())}
    assert (status["batch.test"].parked, status["batch.test"].held) == (14, 66)
    for index in (0, 1, 3):
        stored = await store.get_message(messages[index].id)
        assert stored is not None
        states = [r.state.value for r in stored.recipients]
        assert states == (["pending", "parked"] if index % 3 == 0 else ["pending", "pending"])
