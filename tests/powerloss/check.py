"""What must hold of a spool after a power cut: the acknowledged mail, whole; nothing half-made.

- SQLite's own checks pass (integrity_check, foreign_key_check).
- Every message row has its body and at least one recipient; no body or recipient row is
  without its message; size and sha256 match the stored bytes.
- Every message a client was told "250 queued as ID" is there under ID, with exactly the
  bytes it sent (after our Received: field) and every recipient, in order; also when read
  through the project's own store (SqliteStore, as a restarted server would).
- Every other stored message is one a client sent, whole (committed, but the server died
  before its 250 went out): never a torn one.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from mxspool.store.sqlite import SqliteStore
from tests.smtp_client import split_received

STORE_SAMPLE = 40


class SentMessage(Protocol):
    tag: str
    recipients: list[str]
    body: bytes
    queue_id: str | None


def _tag(data: bytes) -> str | None:
    marker = b"Message-ID: <"
    start = data.find(marker)
    if start < 0:
        return None
    end = data.find(b"@", start)
    return data[start + len(marker) : end].decode()


def check_spool(
    db: Path, sent: Mapping[str, SentMessage], acknowledged: Mapping[str, SentMessage]
) -> list[str]:
    """The problems found (empty: the spool is sound)."""
    problems: list[str] = []
    try:
        stored = _check_sql(db, problems)
    except sqlite3.Error as exc:
        return [f"the spool does not open: {exc}"]
    for queue_id, item in acknowledged.items():
        row = stored.get(queue_id)
        if row is None:
            problems.append(f"acknowledged {queue_id} ({item.tag}) is lost")
            continue
        data, recipients = row
        if split_received(data)[1] != item.body:
            problems.append(f"acknowledged {queue_id} ({item.tag}): body differs")
        if recipients != item.recipients:
            problems.append(f"acknowledged {queue_id} ({item.tag}): recipients {recipients}")
    for queue_id, (data, recipients) in stored.items():
        if queue_id in acknowledged:
            continue
        tag = _tag(data)
        origin = sent.get(tag or "")
        if origin is None:
            if tag != "final":
                problems.append(f"stored {queue_id} was never sent")
        elif split_received(data)[1] != origin.body or recipients != origin.recipients:
            problems.append(f"unacknowledged {queue_id} ({tag}) is stored half-written")
    if not problems:
        problems += _check_store(db, acknowledged)
    return problems


def _check_sql(db: Path, problems: list[str]) -> dict[str, tuple[bytes, list[str]]]:
    """Structural checks; returns id: (stored bytes, recipients in order)."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        result = conn.execute("PRAGMA integrity_check").fetchall()
        if result != [("ok",)]:
            problems.append(f"integrity_check: {result[:5]}")
        keys = conn.execute("PRAGMA foreign_key_check").fetchall()
        if keys:
            problems.append(f"foreign_key_check: {keys[:5]}")
        for what, sql in (
            (
                "message rows without a body",
                "SELECT count(*) FROM messages m WHERE NOT EXISTS "
                "(SELECT 1 FROM bodies b WHERE b.seq = m.seq)",
            ),
            (
                "message rows without recipients",
                "SELECT count(*) FROM messages m WHERE NOT "
                "EXISTS (SELECT 1 FROM recipients r WHERE r.message_seq = m.seq)",
            ),
            (
                "bodies without a message",
                "SELECT count(*) FROM bodies b WHERE NOT EXISTS "
                "(SELECT 1 FROM messages m WHERE m.seq = b.seq)",
            ),
            (
                "recipients without a message",
                "SELECT count(*) FROM recipients r WHERE NOT "
                "EXISTS (SELECT 1 FROM messages m WHERE m.seq = r.message_seq)",
            ),
        ):
            count = conn.execute(sql).fetchone()[0]
            if count:
                problems.append(f"{count} {what}")
        stored: dict[str, tuple[bytes, list[str]]] = {}
        rows = conn.execute(
            "SELECT m.seq, m.id, m.size, m.sha256, b.data FROM messages m "
            "JOIN bodies b ON b.seq = m.seq ORDER BY m.seq"
        )
        recipients: dict[int, list[str]] = {}
        for seq, rcpt in conn.execute("SELECT message_seq, rcpt FROM recipients ORDER BY id"):
            recipients.setdefault(seq, []).append(rcpt)
        for seq, queue_id, size, sha256, data in rows:
            if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
                problems.append(f"stored {queue_id}: size or sha256 does not match its bytes")
            stored[queue_id] = (bytes(data), recipients.get(seq, []))
        return stored
    finally:
        conn.close()


def _check_store(db: Path, acknowledged: Mapping[str, SentMessage]) -> list[str]:
    """The acknowledged messages as the project's store reads them."""

    async def read() -> list[str]:
        store = SqliteStore(f"sqlite:///{db}")
        await store.open()
        problems = []
        try:
            # The newest ones: the SQL checks above already cover them all.
            for queue_id, item in list(acknowledged.items())[-STORE_SAMPLE:]:
                message = await store.get_message(queue_id)
                if message is None:
                    problems.append(f"store: acknowledged {queue_id} not found")
                    continue
                data = b"".join([piece async for piece in store.read_body(queue_id)])
                if hashlib.sha256(data).hexdigest() != message.sha256:
                    problems.append(f"store: {queue_id} body does not match its sha256")
                if [r.address for r in message.recipients] != item.recipients:
                    problems.append(f"store: {queue_id} recipients differ")
            drift = await store.check_counters()
            if drift:
                problems.append(f"store: recipient counters differ from the rows: {drift[:5]}")
        finally:
            await store.close()
        return problems

    return asyncio.run(read())
