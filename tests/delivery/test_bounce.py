"""queue bounce: an RFC 3464 DSN to the reverse-path, with MAIL FROM:<>, never to <>."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterator

import pytest

from mxspool.config import Config
from mxspool.delivery.bounce import BounceError, bounce_message, build_dsn, read_original_headers
from mxspool.envelope import MailParams, RcptParams
from mxspool.store.base import Route, TlsMode
from mxspool.store.sqlite import SqliteStore
from tests.delivery.conftest import DOMAIN, add_domain, put_message, rows
from tests.delivery.dnsserver import DnsServer
from tests.delivery.target import Target


async def test_dsn_structure(store: SqliteStore) -> None:
    await add_domain(store, 1, hold=True)
    queue_id, data = await put_message(
        store,
        [f"a@{DOMAIN}", f"b@{DOMAIN}", f"quiet@{DOMAIN}"],
        params=MailParams(size=100, envid="ENV+2B1"),
    )
    message = await store.get_message(queue_id)
    assert message is not None
    headers = await read_original_headers(store, queue_id)
    assert headers == data[: data.index(b"\r\n\r\n") + 2]
    dsn = build_dsn(message, headers, "mx.test.local")
    parsed = email.message_from_bytes(dsn, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    assert parsed["To"].addresses[0].addr_spec == "sender@src.test"
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    status = dsn.decode()
    assert "Reporting-MTA: dns; mx.test.local" in status
    assert "Original-Envelope-Id: ENV+1" in status
    assert f"Final-Recipient: rfc822; a@{DOMAIN}" in status
    assert "Action: failed" in status and "Status: 5.0.0" in status
    assert "Subject: message" in status and ".starts with a dot" not in status  # no body


async def test_diagnostic_code_from_the_last_reply(store: SqliteStore) -> None:
    import time

    await add_domain(store, 1, hold=False)
    queue_id, _ = await put_message(store, [f"a@{DOMAIN}"])
    (job,) = await store.claim_due("me", time.time(), 30, 10, DOMAIN)
    from mxspool.store.base import RecipientOutcome, RecipientState

    await store.record_outcomes(
        "me",
        [
            RecipientOutcome(
                job.recipients[0].id, RecipientState.PARKED, "550 5.1.1 no such user", "x"
            )
        ],
    )
    message = await store.get_message(queue_id)
    assert message is not None
    dsn = build_dsn(message, b"Subject: x\r\n", "mx.test.local").decode()
    assert "Status: 5.1.1" in dsn
    assert "Diagnostic-Code: smtp; 550 5.1.1 no such user" in dsn


async def test_never_to_the_null_sender(store: SqliteStore) -> None:
    await add_domain(store, 1, hold=True)
    queue_id, _ = await put_message(store, [f"a@{DOMAIN}"], mail_from="")
    message = await store.get_message(queue_id)
    assert message is not None
    with pytest.raises(BounceError, match="null reverse-path"):
        build_dsn(message, b"", "mx.test.local")


async def test_notify_never_is_respected(store: SqliteStore) -> None:
    await add_domain(store, 1, hold=True)
    queue_id, _ = await put_message(
        store, [f"a@{DOMAIN}"], rcpt_params=RcptParams(notify=("NEVER",))
    )
    message = await store.get_message(queue_id)
    assert message is not None
    with pytest.raises(BounceError, match="NOTIFY"):
        build_dsn(message, b"", "mx.test.local")


@pytest.fixture
def sender_side() -> Iterator[Target]:
    server = Target().start()
    yield server
    server.stop()


async def test_bounce_sends_with_null_mail_from_via_the_senders_mx(
    store: SqliteStore, sender_side: Target
) -> None:
    dns = DnsServer("src.test. 60 IN MX 10 mx.src.test.\nmx.src.test. 60 IN A 127.0.0.1\n")
    dns.start()
    try:
        await add_domain(store, 1, hold=True)
        queue_id, _ = await put_message(store, [f"a@{DOMAIN}"])
        config = Config.model_validate(
            {"smtp": {"hostname": "mx.test.local"}, "delivery": {"resolver": dns.address}}
        )
        # The sender's MX listens on a test port: route its domain through ours to reach it.
        await add_domain(
            store,
            sender_side.port,
            name="src.test",
            routes=(Route("src.test", sender_side.port),),
            use_mx=True,
            tls=TlsMode.OPPORTUNISTIC,
        )
        result = await bounce_message(config, store, queue_id)
    finally:
        dns.stop()
    assert result.recipient == "sender@src.test"
    (received,) = sender_side.recorder.received
    assert received.mail_from in ("", "<>")  # MAIL FROM:<>
    assert received.rcpt_tos == ["sender@src.test"]
    assert b"report-type=delivery-status" in received.data
    states = {row.rcpt: row.state for row in await rows(store)}
    assert states == {f"a@{DOMAIN}": "bounced"}
