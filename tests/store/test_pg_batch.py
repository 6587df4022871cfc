"""The PostgreSQL accept batch (one JSON text plus the bodies, decoded by the server) stores
exactly what the one-message path stores, whatever the envelope holds; a message the batch
cannot carry fails alone; and the writer's own connection is replaced when its server
process goes away.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from mxspool.envelope import Envelope, MailParams, RcptParams, Recipient
from mxspool.store import postgres
from mxspool.store.base import ClientInfo, IncomingMessage, StoreError
from mxspool.store.postgres import PostgresStore
from tests.store.test_contract import make_message

DEADLINE = 30.0


@pytest.fixture
async def pg_store(pg_url: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(pg_url)
    await store.open()
    yield store
    await store.close()


_ROW_SQL = (
    "SELECT m.received_at, m.mail_from, m.mail_params, m.size, m.sha256, m.message_id,"
    " m.client_address, m.client_name, m.helo, m.tls_version, m.tls_cipher, m.tags,"
    " (SELECT array_agg(ARRAY[r.rcpt, r.domain, r.params, r.updated_at::text] ORDER BY r.id)"
    "  FROM recipients r WHERE r.message_seq = m.seq),"
    " (SELECT string_agg(b.data, ''::bytea ORDER BY b.chunk) FROM bodies b"
    "  WHERE b.message_seq = m.seq)"
    " FROM messages m WHERE m.id = %s"
)


def awkward(queue_id: str | None = None) -> IncomingMessage:
    """Everything JSON must escape or keep exact: quotes, backslashes, control characters,
    non-ASCII (SMTPUTF8), absent values, DSN parameters and a received_at with all digits."""
    message = make_message(
        ['"quo\\ted"@relay.test', "usér@Relay.TEST", "z@held.test"],
        b"Subject: \xe9\x00\r\n\r\nbody \\ \" ' \x01\r\n" * 300,
        mail_from='o"dd\\\tsender@src.test',
        mail_params=MailParams(size=9, body="8BITMIME", smtputf8=True, ret="HDRS", envid="a+2B"),
        rcpt_params=RcptParams(notify=("SUCCESS", "FAILURE"), orcpt="rfc822;x+2Bq@y"),
        queue_id=queue_id,
        received_at=1764605123.1234567,
        message_id=None,
    )
    message.client = ClientInfo(
        address="2001:db8::1", helo='hé\\lo "x"', hostname=None, tls_version="TLSv1.3"
    )
    message.tags = ("canary", "ü")
    return message


def stored_row(url: str, queue_id: str) -> tuple[object, ...]:
    with psycopg.connect(url) as conn:
        row = conn.execute(_ROW_SQL, (queue_id,)).fetchone()
    assert row is not None, queue_id
    return tuple(row)


async def test_the_batch_stores_what_the_single_path_stores(
    pg_url: str, pg_store: PostgresStore
) -> None:
    batched = [awkward() for _ in range(6)]
    # All queued before the writer runs: one batch through the JSON statement.
    results = await asyncio.wait_for(
        asyncio.gather(*(pg_store.accept_message(m) for m in batched)), DEADLINE
    )
    assert results == [None] * len(batched)
    # The reference: the one-message path (the replay and large-message path), no JSON.
    single = awkward()
    async with pg_store._connection() as conn, conn.transaction():
        await postgres._insert_message(conn, single)
    expected = stored_row(pg_url, single.id)
    assert expected[0] == 1764605123.1234567
    for message in batched:
        assert stored_row(pg_url, message.id) == expected
        stored = await pg_store.get_message(message.id)
        assert stored is not None
        assert stored.recipients[0].address == '"quo\\ted"@relay.test'
        assert stored.client.helo == 'hé\\lo "x"'


async def test_a_message_the_batch_cannot_carry_fails_alone(
    pg_url: str, pg_store: PostgresStore
) -> None:
    good = [make_message([f"u{i}@relay.test"]) for i in range(6)]
    bad = make_message(["nul@relay.test"])
    # PostgreSQL text holds no NUL: the JSON statement fails and the batch is replayed.
    bad.envelope = dataclasses.replace(bad.envelope, mail_from="a\x00b@src.test")
    batch = [*good[:3], bad, *good[3:]]
    results = await asyncio.wait_for(
        asyncio.gather(*(pg_store.accept_message(m) for m in batch), return_exceptions=True),
        DEADLINE,
    )
    assert isinstance(results[3], StoreError), results
    assert [r for i, r in enumerate(results) if i != 3] == [None] * len(good)
    for message in good:
        assert await pg_store.get_message(message.id) is not None  # positive control
    assert await pg_store.get_message(bad.id) is None


@pytest.mark.parametrize("kill", ["writer", "none"])
async def test_the_writer_replaces_its_connection_when_the_server_drops_it(
    pg_url: str, pg_store: PostgresStore, kill: str
) -> None:
    await pg_store.accept_message(make_message(["first@relay.test"]))
    writer = pg_store._writer_conn
    assert writer is not None
    if kill == "writer":
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (writer.info.backend_pid,))
    outcomes: list[str] = []
    for i in range(3):
        try:
            await asyncio.wait_for(
                pg_store.accept_message(make_message([f"n{i}@relay.test"])), DEADLINE
            )
            outcomes.append("ok")
        except StoreError:
            outcomes.append("error")
    # At most the batch in flight on the dead connection fails; then a fresh one carries on.
    assert outcomes in (["error", "ok", "ok"], ["ok", "ok", "ok"]), outcomes
    assert (pg_store._writer_conn is writer) == (kill == "none")
    assert pg_store._writer_conn is not None and not pg_store._writer_conn.closed


def test_an_envelope_is_what_the_json_row_carries() -> None:
    """The JSON row is the messages columns in order, then the recipients."""
    message = make_message(["a@relay.test"], queue_id="Q1", received_at=1.5)
    message.envelope = Envelope(
        mail_from="s@src.test",
        mail_params=MailParams(),
        recipients=(Recipient("a@relay.test", RcptParams()),),
    )
    params = postgres._batch_params([message])
    assert params["batch"].startswith('[["Q1",1.5,"s@src.test",')
    assert params["bodies"] == message.body.getvalue()
    assert params["domains"] == '["relay.test"]'


def test_no_code_path_deletes_messages_behind_the_schemas_back() -> None:
    """Migration 4 dropped the foreign keys from bodies and recipients to messages (their
    per-row checks cost 5-12% of PostgreSQL's CPU per accept) and with them ON DELETE
    CASCADE. Nothing deletes messages today; whoever adds a path that does must delete the
    message's bodies and recipients in the same transaction, and say so here."""
    sources = Path(postgres.__file__).parents[1]
    deleting = [
        path.relative_to(sources)
        for path in sources.rglob("*.py")
        if re.search(r"DELETE\s+FROM\s+messages\b", path.read_text(encoding="utf-8"), re.I)
    ]
    assert deleting == []
    # Positive control: the scan finds the deletes that do exist.
    assert re.search(r"DELETE\s+FROM\s+delivery_slots\b", Path(postgres.__file__).read_text())


async def test_the_schema_keeps_only_the_foreign_keys_that_cascade(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    await store.open()
    await store.close()
    with psycopg.connect(pg_url) as conn:
        keys = conn.execute(
            "SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint"
            " WHERE contype = 'f' AND connamespace = current_schema()::regnamespace"
            " ORDER BY 1"
        ).fetchall()
    # None on the accept path (messages, bodies, recipients); the rest cascade from small tables.
    assert keys == [
        ("attempts", "recipients"),
        ("migration_domains", "migrations"),
        ("recipient_checks", "domains"),
        ("recipient_lists", "domains"),
    ]
