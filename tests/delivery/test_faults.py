"""Faults at the target: temporary and permanent replies, drops, TLS refusals, mixed results."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from mxspool.envelope import MailParams
from mxspool.store.base import QueueFilter, TlsMode
from mxspool.store.sqlite import SqliteStore
from tests.conftest import free_port
from tests.delivery.conftest import (
    CLIENTS,
    DOMAIN,
    EngineFactory,
    add_domain,
    delivered_control,
    put_message,
    release,
    rows,
    states,
    wait_for,
)
from tests.delivery.target import Target
from tests.waiting import still


@pytest.fixture(params=CLIENTS)
def client(request: pytest.FixtureRequest) -> str:
    """Every fault is checked against both transports: the same wire, the same outcomes."""
    return str(request.param)


async def _state_of(store: SqliteStore, rcpt: str) -> str:
    return next(row.state for row in await rows(store) if row.rcpt == rcpt)


async def test_451_then_accepted_is_delivered_later(
    store: SqliteStore, target: Target, engine: EngineFactory
) -> None:
    target.behaviour.data_replies = ["451 4.3.0 try again later"] * 2
    await add_domain(store, target.port, hold=False)
    _, data = await put_message(store, [f"a@{DOMAIN}"])
    engine(retry=(0.2,))
    await wait_for(lambda: len(target.recorder.received) == 1)
    assert target.recorder.deliveries() == [(f"a@{DOMAIN}", data)]
    await wait_for(lambda: _state_is(store, "delivered"))
    (row,) = await rows(store)
    assert row.attempts == 3
    attempts = await store.attempts(row.id)
    assert [a.outcome for a in attempts] == ["pending", "pending", "delivered"]
    assert attempts[0].reply == "451 4.3.0 try again later"
    assert attempts[0].destination == f"[127.0.0.1]:{target.port}"


async def _state_is(store: SqliteStore, state: str) -> bool:
    return set((await states(store)).keys()) == {state}


async def test_550_parks_without_bounce_then_retry_delivers(
    store: SqliteStore, target: Target, engine: EngineFactory, control: Target
) -> None:
    target.behaviour.data_replies = ["550 5.7.1 mailbox not ready"]
    await add_domain(store, target.port, hold=False)
    _queue_id, data = await put_message(store, [f"a@{DOMAIN}"])
    engine(retry=(0.2,))
    await wait_for(lambda: _state_is(store, "parked"))
    (row,) = await rows(store)
    assert row.remote_reply == "550 5.7.1 mailbox not ready"
    # Parked stays parked: no retry (a deferral would be back within 0.2 s), and no DSN
    # anywhere, while the engine keeps polling and sending (the control).
    await delivered_control(store, control)
    await still(lambda: target.recorder.mail_commands == 1, 0.6, "no retry of parked mail")
    assert target.recorder.received == []
    # The operator fixes the target and retries.
    assert await store.retry(domain=DOMAIN) == 1
    await wait_for(lambda: _state_is(store, "delivered"))
    assert target.recorder.deliveries() == [(f"a@{DOMAIN}", data)]
    assert all(item.mail_from != "" for item in target.recorder.received)


async def test_disconnect_during_data_is_retried(
    store: SqliteStore, target: Target, engine: EngineFactory
) -> None:
    target.behaviour.drop_in_data = 2
    await add_domain(store, target.port, hold=False)
    _, data = await put_message(store, [f"a@{DOMAIN}"])
    _, data2 = await put_message(store, [f"b@{DOMAIN}"])
    engine(retry=(0.2,), concurrency=1)
    await wait_for(lambda: _state_is(store, "delivered"))
    assert sorted(target.recorder.deliveries()) == sorted(
        [(f"a@{DOMAIN}", data), (f"b@{DOMAIN}", data2)]
    )
    replies = [a.reply for row in await rows(store) for a in await store.attempts(row.id)]
    assert any("Connection" in reply or "EOF" in reply for reply in replies), replies


async def test_mixed_recipient_results_in_one_transaction(
    store: SqliteStore, target: Target, engine: EngineFactory
) -> None:
    target.behaviour.rcpt_replies = {
        f"gone@{DOMAIN}": "550 5.1.1 no such user",
        f"busy@{DOMAIN}": "452 4.2.2 mailbox full",
    }
    await add_domain(store, target.port, hold=False)
    _, _data = await put_message(
        store, [f"ok1@{DOMAIN}", f"gone@{DOMAIN}", f"busy@{DOMAIN}", f"ok2@{DOMAIN}"]
    )
    engine(retry=(30.0,))
    await wait_for(lambda: len(target.recorder.received) == 1)
    await wait_for(lambda: _no_delivering(store))
    assert target.recorder.received[0].rcpt_tos == [f"ok1@{DOMAIN}", f"ok2@{DOMAIN}"]
    by_rcpt = {row.rcpt: row for row in await rows(store)}
    assert by_rcpt[f"ok1@{DOMAIN}"].state == "delivered"
    assert by_rcpt[f"ok2@{DOMAIN}"].state == "delivered"
    assert by_rcpt[f"gone@{DOMAIN}"].state == "parked"
    assert by_rcpt[f"gone@{DOMAIN}"].remote_reply == "550 5.1.1 no such user"
    assert by_rcpt[f"busy@{DOMAIN}"].state == "pending"
    assert by_rcpt[f"busy@{DOMAIN}"].remote_reply == "452 4.2.2 mailbox full"


async def _no_delivering(store: SqliteStore) -> bool:
    return "delivering" not in await states(store)


async def test_all_recipients_refused_then_next_message_uses_rset(
    store: SqliteStore, target: Target, engine: EngineFactory
) -> None:
    target.behaviour.rcpt_replies = {f"gone@{DOMAIN}": "550 5.1.1 no such user"}
    await add_domain(store, target.port, hold=True)
    await put_message(store, [f"gone@{DOMAIN}"])
    _, data = await put_message(store, [f"ok@{DOMAIN}"])
    engine(concurrency=1)
    await release(store)
    await wait_for(lambda: _no_pending(store))
    assert target.recorder.deliveries() == [(f"ok@{DOMAIN}", data)]
    assert target.recorder.sessions == 1  # one reused session for both messages


async def _no_pending(store: SqliteStore) -> bool:
    counts = await states(store)
    return "pending" not in counts and "delivering" not in counts


async def test_unreachable_target_defers_with_next_attempt(
    store: SqliteStore, engine: EngineFactory
) -> None:
    await add_domain(store, free_port(), hold=False)
    for number in range(5):
        await put_message(store, [f"r{number}@{DOMAIN}"])
    engine(retry=(60.0,), concurrency=3)
    await wait_for(lambda: _no_delivering_all_tried(store))
    queue = await store.list_queue(QueueFilter(domain=DOMAIN))
    assert all(entry.state == "pending" for entry in queue)
    assert all(
        "Connect" in (entry.last_reply or "") or "refused" in (entry.last_reply or "")
        for entry in queue
    ), [entry.last_reply for entry in queue]
    assert await store.next_due_at(DOMAIN) is not None


async def _no_delivering_all_tried(store: SqliteStore) -> bool:
    data = await rows(store)
    return all(row.state == "pending" and row.remote_reply for row in data)


async def test_expired_after_max_age_is_parked_not_dropped(
    store: SqliteStore, engine: EngineFactory
) -> None:
    await add_domain(store, free_port(), hold=False)
    await put_message(store, [f"a@{DOMAIN}"])
    engine(retry=(0.1,), max_age=2.0)  # room for several attempts on a loaded machine
    await wait_for(lambda: _state_is(store, "parked"))
    (row,) = await rows(store)
    assert row.remote_reply is not None and row.remote_reply.startswith("expired")
    assert row.attempts >= 2


async def test_8bit_message_to_hop_without_8bitmime_is_parked(
    store: SqliteStore, target: Target, engine: EngineFactory
) -> None:
    target.behaviour.hidden_extensions = {"8BITMIME"}
    await add_domain(store, target.port, hold=False)
    await put_message(store, [f"a@{DOMAIN}"], params=MailParams(size=100, body="8BITMIME"))
    _, data = await put_message(store, [f"b@{DOMAIN}"], params=MailParams(size=100, body="7BIT"))
    engine()
    await wait_for(lambda: _no_pending(store))
    by_rcpt = {row.rcpt: row for row in await rows(store)}
    assert by_rcpt[f"a@{DOMAIN}"].state == "parked"
    assert "8BITMIME" in (by_rcpt[f"a@{DOMAIN}"].remote_reply or "")
    assert by_rcpt[f"b@{DOMAIN}"].state == "delivered"
    assert target.recorder.deliveries() == [(f"b@{DOMAIN}", data)]


async def test_envelope_parameters_are_kept(
    store: SqliteStore, target: Target, engine: EngineFactory
) -> None:
    await add_domain(store, target.port, hold=False)
    await put_message(
        store, [f"a@{DOMAIN}"], params=MailParams(size=1234, body="8BITMIME", smtputf8=True)
    )
    engine()
    await wait_for(lambda: len(target.recorder.received) == 1)
    options = target.recorder.received[0].mail_options
    assert "BODY=8BITMIME" in options and "SMTPUTF8" in options
    assert any(option.startswith("SIZE=") for option in options)


# -- TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def _server_context(ca: trustme.CA, name: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return context


@pytest.fixture
def tls_target(ca: trustme.CA) -> Iterator[Target]:
    server = Target(tls_context=_server_context(ca, "127.0.0.1")).start()
    yield server
    server.stop()


@pytest.fixture
def wrong_name_target(ca: trustme.CA) -> Iterator[Target]:
    server = Target(tls_context=_server_context(ca, "other.example")).start()
    yield server
    server.stop()


async def test_verify_with_valid_certificate_delivers_over_tls(
    store: SqliteStore, tls_target: Target, engine: EngineFactory, ca_file: str
) -> None:
    await add_domain(store, tls_target.port, hold=False, tls=TlsMode.VERIFY)
    await put_message(store, [f"a@{DOMAIN}"])
    engine(ca_file=ca_file)
    await wait_for(lambda: len(tls_target.recorder.received) == 1)
    assert tls_target.recorder.received[0].tls


async def test_verify_without_starttls_sends_nothing_in_clear(
    store: SqliteStore, target: Target, engine: EngineFactory, ca_file: str
) -> None:
    await add_domain(store, target.port, hold=False, tls=TlsMode.VERIFY)
    await put_message(store, [f"a@{DOMAIN}"])
    engine(ca_file=ca_file, retry=(0.2,))
    await wait_for(lambda: _tried_twice(store))
    assert target.recorder.mail_commands == 0
    (row,) = await rows(store)
    assert row.state == "pending"
    assert "STARTTLS" in (row.remote_reply or "")


async def _tried_twice(store: SqliteStore) -> bool:
    data = await rows(store)
    return bool(data) and data[0].attempts >= 2 and data[0].state == "pending"


async def test_verify_with_certificate_for_another_name_sends_nothing(
    store: SqliteStore, wrong_name_target: Target, engine: EngineFactory, ca_file: str
) -> None:
    await add_domain(store, wrong_name_target.port, hold=False, tls=TlsMode.VERIFY)
    await put_message(store, [f"a@{DOMAIN}"])
    engine(ca_file=ca_file, retry=(0.2,))
    await wait_for(lambda: _tried_twice(store))
    assert wrong_name_target.recorder.mail_commands == 0
    (row,) = await rows(store)
    assert row.state == "pending"
    assert "certificate" in (row.remote_reply or "").lower(), row.remote_reply


async def test_require_accepts_any_certificate(
    store: SqliteStore, wrong_name_target: Target, engine: EngineFactory
) -> None:
    await add_domain(store, wrong_name_target.port, hold=False, tls=TlsMode.REQUIRE)
    await put_message(store, [f"a@{DOMAIN}"])
    engine()
    await wait_for(lambda: len(wrong_name_target.recorder.received) == 1)
    assert wrong_name_target.recorder.received[0].tls


async def test_opportunistic_without_starttls_delivers_in_clear(
    store: SqliteStore, target: Target, engine: EngineFactory
) -> None:
    await add_domain(store, target.port, hold=False, tls=TlsMode.OPPORTUNISTIC)
    await put_message(store, [f"a@{DOMAIN}"])
    engine()
    await wait_for(lambda: len(target.recorder.received) == 1)
    assert not target.recorder.received[0].tls
