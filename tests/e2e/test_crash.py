"""Crash safety: SIGKILL `mxspool serve` at random moments while clients keep sending."""

from __future__ import annotations

import asyncio
import hashlib
import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from mxspool.store.sqlite import SqliteStore
from tests.conftest import Spooler
from tests.smtp_client import RawClient, split_received

KILLS = 20
CLIENTS = 8
MAX_SECONDS = 150.0


def _message(tag: str, rng: random.Random) -> bytes:
    size = rng.choice([300, 4000, 60000, 400000])  # the last one spills to disk
    line = (tag + " ").encode() * 12
    body = (line[:90] + b"\r\n") * (size // 92 + 1)
    return f"Message-ID: <{tag}@crash.test>\r\nSubject: {tag}\r\n\r\n".encode() + body


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_message(spooler: Spooler) -> None:
    acknowledged: dict[str, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()
    attempts = [0]

    def client_loop(worker: int) -> None:
        rng = random.Random(worker)
        n = 0
        deadline = time.monotonic() + MAX_SECONDS
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                client = RawClient(spooler.port, timeout=10)
                client.reply()
                client.command(f"EHLO crash{worker}")
                while not stop.is_set() and time.monotonic() < deadline:
                    tag = f"w{worker}n{n}"
                    n += 1
                    body = _message(tag, rng)
                    client.send(
                        f"MAIL FROM:<{tag}@src.test>\r\nRCPT TO:<u{worker}@example.test>\r\n"
                        "DATA\r\n".encode()
                    )
                    if [code for code, _ in client.replies(3)] != [250, 250, 354]:
                        break
                    with lock:
                        attempts[0] += 1
                    client.send(body + b".\r\n")
                    code, text = client.reply()
                    if code == 250:
                        with lock:
                            acknowledged[text.rsplit(" ", 1)[-1]] = body
                client.close()
            except OSError:
                time.sleep(0.05)  # the server is down; try again

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    rng = random.Random(2026)
    kills = 0
    started = time.monotonic()
    try:
        while kills < KILLS and time.monotonic() - started < MAX_SECONDS - 10:
            time.sleep(rng.uniform(0.2, 1.5))
            spooler.kill()
            kills += 1
            spooler.start()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert kills == KILLS
    spooler.stop()

    stored = _verify_store(spooler.db)
    lost = [queue_id for queue_id in acknowledged if queue_id not in stored]
    changed = [
        queue_id
        for queue_id, body in acknowledged.items()
        if queue_id in stored and split_received(stored[queue_id])[1] != body
    ]
    print(
        f"\ncrash test: {kills} SIGKILLs, {attempts[0]} messages sent, "
        f"{len(acknowledged)} acknowledged, {len(stored)} stored, "
        f"{len(lost)} acknowledged but lost, {len(changed)} altered"
    )
    assert len(acknowledged) > 100
    assert not lost
    assert not changed


def _verify_store(db: Path) -> dict[str, bytes]:
    """Every stored message is whole: bytes match size and sha256, recipients present."""
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        orphans = conn.execute(
            "SELECT count(*) FROM messages m WHERE NOT EXISTS "
            "(SELECT 1 FROM recipients r WHERE r.message_seq = m.seq) "
            "OR NOT EXISTS (SELECT 1 FROM bodies b WHERE b.seq = m.seq)"
        ).fetchone()[0]
        assert orphans == 0
        ids = [row[0] for row in conn.execute("SELECT id FROM messages")]
    finally:
        conn.close()

    async def read() -> dict[str, bytes]:
        store = SqliteStore(f"sqlite:///{db}")
        await store.open()
        try:
            # The status counters came through every crash in step with the rows.
            assert await store.check_counters() == []
            result = {}
            for queue_id in ids:
                message = await store.get_message(queue_id)
                assert message is not None
                data = b"".join([piece async for piece in store.read_body(queue_id)])
                assert len(data) == message.size
                assert hashlib.sha256(data).hexdigest() == message.sha256
                result[queue_id] = data
            return result
        finally:
            await store.close()

    return asyncio.run(read())
