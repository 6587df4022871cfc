"""The operator actions shared by the CLI and the admin API, on a real SQLite store."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mxspool import operations as ops
from mxspool.body import BodyBuffer
from mxspool.envelope import Envelope, MailParams, Recipient
from mxspool.ids import new_queue_id
from mxspool.store import create_store
from mxspool.store.base import (
    ClientInfo,
    Conflict,
    DomainMode,
    IncomingMessage,
    NotFound,
    QueueFilter,
    RecipientOutcome,
    RecipientState,
    Route,
    Store,
    TlsMode,
)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = create_store(f"sqlite:///{tmp_path / 'spool.db'}")
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def put_message(
    store: Store,
    *rcpts: str,
    body: bytes = b"Subject: hi\r\n\r\nhello\r\n",
    mail_from: str = "sender@src.test",
    received_at: float | None = None,
) -> str:
    buffer = BodyBuffer(1 << 20)
    buffer.write(body)
    queue_id = new_queue_id()
    await store.accept_message(
        IncomingMessage(
            id=queue_id,
            envelope=Envelope(mail_from, MailParams(), tuple(Recipient(r) for r in rcpts)),
            client=ClientInfo(address="192.0.2.7", helo="client.src.test"),
            received_at=time.time() if received_at is None else received_at,
            message_id=f"<{queue_id}@src.test>",
            body=buffer,
        )
    )
    return queue_id


async def finish(store: Store, domain: str, state: RecipientState, reply: str) -> int:
    """Play the delivery engine: claim what is due in ``domain`` and give it ``state``."""
    jobs = await store.claim_due("test-worker", time.time(), 60.0, 1000, domain)
    outcomes = [
        RecipientOutcome(rcpt.id, state, reply, "mx.target.test:25")
        for job in jobs
        for rcpt in job.recipients
    ]
    await store.record_outcomes("test-worker", outcomes)
    return len(outcomes)


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("  mail.example.co.uk. ", "mail.example.co.uk"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a-b.example", "a-b.example"),
    ],
)
def test_domain_names_are_normalised(given: str, expected: str) -> None:
    assert ops.normalize_domain(given) == expected


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("localhost", "no dot"),
        ("192.0.2.1", "IP address"),
        ("[192.0.2.1]", "IP address"),
        ("2001:db8::1", "IP address"),
        ("bad_name.example", "letters, digits or hyphens"),
        ("-bad.example", "hyphen"),
        ("a..example", "1-63"),
        ("x" * 64 + ".example", "1-63"),
        ("user@example.com", "domain part"),
        ("", "empty"),
        ("example.123", "numeric"),
    ],
)
def test_bad_domain_names_say_what_is_wrong(given: str, says: str) -> None:
    with pytest.raises(ops.OperationError, match=says) as caught:
        ops.normalize_domain(given)
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("mx.example.net", Route("mx.example.net", 25)),
        ("MX.Example.net:2525", Route("mx.example.net", 2525)),
        ("192.0.2.1:26", Route("192.0.2.1", 26)),
        ("[2001:db8::1]:587", Route("2001:db8::1", 587)),
        ("[2001:DB8:0::1]", Route("2001:db8::1", 25)),
        ("relay", Route("relay", 25)),
        ("mx.example.net:65535", Route("mx.example.net", 65535)),
    ],
)
def test_routes_are_parsed(given: str, expected: Route) -> None:
    assert ops.parse_route(given) == expected


@pytest.mark.parametrize(
    "given",
    [
        "mx.example.net:0",
        "mx.example.net:65536",
        "mx:port",
        "2001:db8::1",
        "[mx.example.net]:25",
        "bad_host:25",
        "",
        "[::1",
    ],
)
def test_bad_routes_are_refused(given: str) -> None:
    with pytest.raises(ops.OperationError, match=r"HOST\[:PORT\]|route host|brackets"):
        ops.parse_route(given)


def test_tls_profile_and_state_names_are_checked() -> None:
    assert ops.parse_tls("Opportunistic") is TlsMode.OPPORTUNISTIC
    with pytest.raises(ops.OperationError, match="verify, require, opportunistic, off"):
        ops.parse_tls("strict")
    assert ops.parse_profile("exchange-online") == "exchange-online"
    assert ops.parse_profile("none") is None
    with pytest.raises(ops.OperationError, match="exchange-online"):
        ops.parse_profile("gmail")
    assert ops.parse_state("HELD") == "held"
    with pytest.raises(ops.OperationError, match="pending, held"):
        ops.parse_state("queued")


# -- domains -------------------------------------------------------------------------------


async def test_add_domain_stores_it_and_audits(store: Store) -> None:
    added = await ops.add_domain(
        store,
        "Example.TEST",
        ["mx1.example.net", "[2001:db8::5]:2525"],
        tls="require",
        hold=True,
        profile="exchange-online",
    )
    assert added.name == "example.test"
    assert added.mode is DomainMode.HOLD
    assert added.routes == (Route("mx1.example.net"), Route("2001:db8::5", 2525))
    assert added.tls is TlsMode.REQUIRE
    assert added.profile == "exchange-online"
    assert [d.name for d in await ops.list_domains(store)] == ["example.test"]
    (entry,) = await ops.audit_list(store)
    assert (entry.actor, entry.action, entry.target) == ("cli", "domain.add", "example.test")
    assert "mode=hold" in entry.detail


async def test_add_domain_refuses_bad_input_and_changes_nothing(store: Store) -> None:
    with pytest.raises(ops.OperationError, match="--route HOST"):
        await ops.add_domain(store, "example.test", [])
    with pytest.raises(ops.OperationError, match="bad route"):
        await ops.add_domain(store, "example.test", ["good.example", "bad:0"])
    with pytest.raises(ops.OperationError, match="TLS mode"):
        await ops.add_domain(store, "example.test", ["good.example"], tls="maybe")
    assert await ops.list_domains(store) == []
    assert await ops.audit_list(store) == []
    # MX routing of the domain itself needs no route.
    added = await ops.add_domain(store, "example.test", [], use_mx=True)
    assert added.use_mx and added.routes == ()


async def test_duplicate_domain_is_a_conflict(store: Store) -> None:
    await ops.add_domain(store, "example.test", ["mx.example.net"])
    with pytest.raises(Conflict, match="already exists"):
        await ops.add_domain(store, "EXAMPLE.test", ["other.example.net"])


async def test_route_domain_replaces_routes_and_switches(store: Store) -> None:
    await ops.add_domain(store, "example.test", ["old.example.net"], tls="off")
    changed = await ops.route_domain(store, "example.test", ["new.example.net:2525"])
    assert changed.routes == (Route("new.example.net", 2525),)
    assert changed.tls is TlsMode.OFF  # untouched
    changed = await ops.route_domain(store, "example.test", use_mx=True)
    assert changed.use_mx and changed.routes == (Route("new.example.net", 2525),)
    # New static routes without --mx are the whole answer: MX routing goes off.
    changed = await ops.route_domain(store, "example.test", ["a.example.net"], tls="verify")
    assert not changed.use_mx and changed.tls is TlsMode.VERIFY
    changed = await ops.route_domain(store, "example.test", profile="exchange-online")
    assert changed.profile == "exchange-online"
    changed = await ops.route_domain(store, "example.test", profile="none")
    assert changed.profile is None
    with pytest.raises(ops.OperationError, match="nothing to change"):
        await ops.route_domain(store, "example.test")
    with pytest.raises(NotFound, match="domain list"):
        await ops.route_domain(store, "nowhere.test", ["a.example.net"])
    actions = [entry.action for entry in await ops.audit_list(store)]
    assert actions.count("domain.route") == 5


async def test_hold_and_release(store: Store) -> None:
    await ops.add_domain(store, "example.test", ["mx.example.net"])
    held = await ops.hold_domain(store, "example.test")
    assert held.mode is DomainMode.HOLD
    before = time.time()
    result = await ops.release_domain(store, "example.test", rate="600/min")
    assert result.domain.mode is DomainMode.RELAY
    assert result.domain.rate == pytest.approx(10.0)
    released_at = result.domain.released_at
    assert released_at is not None and released_at >= before
    # Releasing a relaying domain is fine and does not move released_at.
    again = await ops.release_domain(store, "example.test")
    assert again.domain.mode is DomainMode.RELAY
    assert again.domain.released_at == released_at
    assert again.domain.rate == pytest.approx(10.0)
    with pytest.raises(ops.OperationError, match="not a rate"):
        await ops.release_domain(store, "example.test", rate="fast")
    with pytest.raises(NotFound):
        await ops.release_domain(store, "nowhere.test")
    with pytest.raises(NotFound):
        await ops.hold_domain(store, "nowhere.test")
    actions = [(e.action, e.detail) for e in await ops.audit_list(store)]
    assert actions[0] == ("domain.release", "was=relay")
    assert ("domain.release", "was=hold rate=600/min") in actions
    assert ("domain.hold", "was=relay") in actions


async def test_relay_domain_never_released_has_no_released_at(store: Store) -> None:
    await ops.add_domain(store, "example.test", ["mx.example.net"])
    result = await ops.release_domain(store, "example.test")
    assert result.domain.released_at is None


async def test_release_only_is_a_canary(store: Store) -> None:
    await ops.add_domain(store, "example.test", ["mx.example.net"], hold=True)
    await put_message(store, "canary@example.test", "other@example.test")
    await put_message(store, "Canary@Example.test")
    await put_message(store, "other@example.test")
    result = await ops.release_domain(store, "example.test", only="CANARY@example.test")
    assert result.released_recipients == 2
    assert result.canary == "CANARY@example.test"
    assert result.domain.mode is DomainMode.HOLD
    domain = await store.get_domain("example.test")
    assert domain is not None and domain.mode is DomainMode.HOLD and domain.released_at is None
    detail = await ops.show_domain(store, "example.test")
    assert (detail.status.held, detail.status.pending) == (2, 2)
    # Only the canary's rows are due.
    assert await finish(store, "example.test", RecipientState.DELIVERED, "250 ok") == 2
    none = await ops.release_domain(store, "example.test", only="nobody@example.test")
    assert none.released_recipients == 0
    with pytest.raises(ops.OperationError, match="not in domain"):
        await ops.release_domain(store, "example.test", only="canary@elsewhere.test")
    with pytest.raises(ops.OperationError, match="not an address"):
        await ops.release_domain(store, "example.test", only="canary")
    details = [e.detail for e in await ops.audit_list(store) if e.action == "domain.release"]
    assert details == [
        "only=nobody@example.test recipients=0",
        "only=CANARY@example.test recipients=2",
    ]


async def test_remove_refuses_while_mail_is_open(store: Store) -> None:
    await ops.add_domain(store, "example.test", ["mx.example.net"], hold=True)
    await put_message(store, "a@example.test")
    with pytest.raises(Conflict, match="--force"):
        await ops.remove_domain(store, "example.test")
    assert await store.get_domain("example.test") is not None
    await ops.remove_domain(store, "example.test", force=True)
    assert await store.get_domain("example.test") is None
    with pytest.raises(NotFound):
        await ops.remove_domain(store, "example.test")
    (entry, *_) = await ops.audit_list(store)
    assert (entry.action, entry.detail) == ("domain.remove", "force")


# -- queue ---------------------------------------------------------------------------------


async def test_queue_list_show_export(store: Store) -> None:
    await ops.add_domain(store, "example.test", ["mx.example.net"], hold=True)
    await ops.add_domain(store, "example.org", ["mx.example.net"])
    body = b"Subject: bytes\r\n\r\n\x00\xff caf\xc3\xa9\r\n..dot\r\n" + b"x" * 300_000
    first = await put_message(store, "a@example.test", "b@example.org", body=body)
    second = await put_message(store, "c@example.test")
    entries = await ops.queue_list(store)
    assert [(e.message_id, e.rcpt, e.state) for e in entries] == [
        (first, "a@example.test", "held"),
        (first, "b@example.org", "pending"),
        (second, "c@example.test", "held"),
    ]
    held = await ops.queue_list(store, QueueFilter(domain="EXAMPLE.test", state="held"))
    assert [e.rcpt for e in held] == ["a@example.test", "c@example.test"]
    page = await ops.queue_list(store, limit=1, after=entries[0].recipient_id)
    assert [e.rcpt for e in page] == ["b@example.org"]
    with pytest.raises(ops.OperationError, match="unknown state"):
        await ops.queue_list(store, QueueFilter(state="stuck"))
    with pytest.raises(ops.OperationError, match="limit"):
        await ops.queue_list(store, limit=0)

    detail = await ops.queue_show(store, first)
    assert detail.message.size == len(body)
    assert [r.address for r in detail.message.recipients] == ["a@example.test", "b@example.org"]
    data = ops.message_detail_to_dict(detail)
    assert [r["state"] for r in data["recipients"]] == ["held", "pending"]
    assert data["client"]["helo"] == "client.src.test"
    exported = b"".join([piece async for piece in ops.queue_export(store, first)])
    assert exported == body
    with pytest.raises(NotFound, match="queue list"):
        await ops.queue_show(store, "NOSUCHID")
    with pytest.raises(NotFound, match="queue list"):
        async for _ in ops.queue_export(store, "NOSUCHID"):
            pass


async def test_discard_and_retry(store: Store) -> None:
    await ops.add_domain(store, "example.test", ["mx.example.net"])
    parked_id = await put_message(store, "a@example.test", "b@example.test")
    assert await finish(store, "example.test", RecipientState.PARKED, "550 5.1.1 no") == 2
    parked = await ops.queue_list(store, QueueFilter(state="parked"))
    assert len(parked) == 2
    assert await ops.queue_retry(store, parked_id) == 2
    assert await ops.queue_list(store, QueueFilter(state="parked")) == []
    assert await finish(store, "example.test", RecipientState.PARKED, "550 5.1.1 no") == 2
    assert await ops.queue_retry(store, parked=True, domain="other.test") == 0
    assert await ops.queue_retry(store, parked=True, domain="example.test") == 2
    assert len(await ops.queue_list(store, QueueFilter(state="pending"))) == 2
    with pytest.raises(ops.OperationError, match="exactly one"):
        await ops.queue_retry(store)
    with pytest.raises(ops.OperationError, match="exactly one"):
        await ops.queue_retry(store, parked_id, parked=True)
    with pytest.raises(NotFound):
        await ops.queue_retry(store, "NOSUCHID")

    assert await ops.queue_discard(store, parked_id) == 2
    assert {e.state for e in await ops.queue_list(store)} == {"discarded"}
    assert await ops.queue_discard(store, parked_id) == 0
    with pytest.raises(NotFound):
        await ops.queue_discard(store, "NOSUCHID")
    audit = [(e.action, e.target, e.detail) for e in await ops.audit_list(store)]
    assert audit[:4] == [
        ("queue.discard", parked_id, "recipients=0"),
        ("queue.discard", parked_id, "recipients=2"),
        ("queue.retry", "parked@example.test", "recipients=2"),
        ("queue.retry", "parked@other.test", "recipients=0"),
    ]


# -- status, report, audit -----------------------------------------------------------------


async def test_status_shape_and_totals(store: Store) -> None:
    now = time.time()
    await ops.add_domain(store, "example.test", ["mx.example.net"], hold=True)
    await ops.add_domain(store, "example.org", ["mx.example.net"])
    await ops.add_domain(store, "empty.example", ["mx.example.net"])
    await put_message(store, "a@example.test", "b@example.test", received_at=now - 100)
    await put_message(store, "c@example.org", received_at=now - 50)
    await put_message(store, "d@example.org", received_at=now - 10)
    assert await finish(store, "example.org", RecipientState.DELIVERED, "250 ok") == 2
    await put_message(store, "e@example.org", received_at=now - 5)

    data = await ops.status(store, now=time.time())
    assert set(data) == {"domains", "totals"}
    rows = {row["domain"]: row for row in data["domains"]}
    assert set(rows) == {"example.test", "example.org", "empty.example"}
    keys = {
        "domain",
        "mode",
        "held",
        "pending",
        "delivering",
        "delivered",
        "parked",
        "bounced",
        "discarded",
        "oldest_pending_age_s",
        "delivery_rate_per_min",
        "stage",  # the migration stage (mxspool.stage)
    }
    for row in rows.values():
        assert set(row) == keys
    assert rows["example.test"]["mode"] == "hold"
    assert rows["example.test"]["held"] == 2
    assert rows["example.test"]["oldest_pending_age_s"] == pytest.approx(100, abs=2)
    assert rows["example.org"]["delivered"] == 2
    assert rows["example.org"]["pending"] == 1
    assert rows["example.org"]["delivery_rate_per_min"] == 2
    assert rows["empty.example"]["oldest_pending_age_s"] is None
    totals = data["totals"]
    assert set(totals) == keys - {"domain", "mode", "stage"}
    assert totals["held"] == 2 and totals["pending"] == 1 and totals["delivered"] == 2
    assert totals["delivery_rate_per_min"] == 2
    assert totals["oldest_pending_age_s"] == pytest.approx(100, abs=2)


async def test_report_rows_and_check(store: Store) -> None:
    await ops.add_domain(store, "example.test", ["mx.example.net"])
    await ops.add_domain(store, "example.org", ["mx.example.net"], hold=True)
    body = b"Subject: report\r\n\r\nhi\r\n"
    done = await put_message(store, "a@example.test", body=body, received_at=1_700_000_000.5)
    await finish(store, "example.test", RecipientState.DELIVERED, "250 2.0.0 queued as XYZ")
    held = await put_message(store, "b@example.org")
    rows = [row async for row in ops.report(store)]
    assert [tuple(row) for row in rows] == [ops.REPORT_COLUMNS] * 2
    first = rows[0]
    assert first["id"] == done
    assert first["message_id"] == f"<{done}@src.test>"
    assert first["mail_from"] == "sender@src.test"
    assert first["rcpt"] == "a@example.test"
    assert first["size"] == len(body)
    assert len(first["sha256"]) == 64
    assert first["received_at"] == "2023-11-14T22:13:20Z"
    assert first["state"] == "delivered"
    assert first["attempts"] == 1
    assert first["delivered_at"].endswith("Z")
    assert first["remote_reply"] == "250 2.0.0 queued as XYZ"
    assert rows[1]["state"] == "held" and rows[1]["delivered_at"] is None
    only_org = [row async for row in ops.report(store, "example.org")]
    assert [row["id"] for row in only_org] == [held]
    unfinished = [row async for row in ops.report_check(store)]
    assert [row["id"] for row in unfinished] == [held]
    await ops.queue_discard(store, held)
    assert [row async for row in ops.report_check(store)] == []


async def test_actor_is_recorded(store: Store) -> None:
    await ops.add_domain(store, "example.test", ["mx.example.net"], actor="api:alice")
    await ops.hold_domain(store, "example.test", actor="api:alice")
    assert {e.actor for e in await ops.audit_list(store)} == {"api:alice"}
    assert len(await ops.audit_list(store, limit=1)) == 1
    with pytest.raises(ops.OperationError):
        await ops.audit_list(store, limit=0)
