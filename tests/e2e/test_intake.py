"""End to end: real clients over 127.0.0.1 into a real `mxspool serve`, real SQLite file."""

from __future__ import annotations

import asyncio
import json
import random
import smtplib
import threading
from pathlib import Path
from typing import Any

import aiosmtplib

from mxspool.store.sqlite import SqliteStore
from tests.conftest import Spooler
from tests.smtp_client import RawClient, split_received

MESSAGES_PER_CONNECTION = 25
SMTPLIB_CONNECTIONS = 7
AIOSMTPLIB_CONNECTIONS = 7
RAW_CONNECTIONS = 6


def make_message(tag: str, size: int) -> bytes:
    """A message with dot-leading lines and CRLF line ends, about ``size`` bytes."""
    rng = random.Random(tag)
    lines = [
        f"From: sender-{tag}@src.test",
        f"To: rcpt-{tag}@example.test",
        f"Subject: message {tag}",
        f"Message-ID: <{tag}@src.test>",
        "",
        f"Body of {tag}.",
        ".a line that starts with a dot",
        "..two dots",
    ]
    while sum(len(line) + 2 for line in lines) < size:
        lines.append("".join(rng.choice("abcdefghij .,-") for _ in range(rng.randint(1, 200))))
    return ("\r\n".join(lines) + "\r\n").encode()


def stuff(body: bytes) -> bytes:
    """Dot-stuff for the wire (RFC 5321 4.5.2)."""
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def rcpt_for(index: int) -> str:
    return f"user{index % 5}@" + ("example.test" if index % 2 == 0 else "example.org")


def test_500_messages_from_three_kinds_of_client(spooler: Spooler) -> None:
    sent: dict[str, bytes] = {}  # queue id -> message bytes as sent
    lock = threading.Lock()
    errors: list[str] = []

    def record(reply: str, body: bytes) -> None:
        queue_id = reply.rsplit(" ", 1)[-1]
        with lock:
            sent[queue_id] = body

    def smtplib_worker(worker: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", spooler.port, timeout=30) as client:
                client.ehlo("smtplib.client")
                for n in range(MESSAGES_PER_CONNECTION):
                    tag = f"s{worker}-{n}"
                    body = make_message(tag, 2000 + 300 * n)
                    client.mail(f"sender-{tag}@src.test")
                    code, _ = client.rcpt(rcpt_for(n))
                    assert code == 250
                    code, reply = client.data(body)
                    assert code == 250, reply
                    record(reply.decode(), body)
        except Exception as exc:  # collected and asserted on below
            errors.append(f"smtplib {worker}: {exc!r}")

    async def aiosmtplib_worker(worker: int) -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=spooler.port, timeout=30)
        await client.connect()
        try:
            for n in range(MESSAGES_PER_CONNECTION):
                tag = f"a{worker}-{n}"
                body = make_message(tag, 1000 + 5000 * (n % 4))
                response = await client.sendmail(f"sender-{tag}@src.test", [rcpt_for(n + 1)], body)
                assert response[0] == {}, response
                record(response[1], body)
        finally:
            await client.quit()

    def raw_worker(worker: int) -> None:
        try:
            client = RawClient(spooler.port)
            assert client.reply()[0] == 220
            assert client.command(f"EHLO raw{worker}.client")[0] == 250
            pending = b""
            previous = b""
            for n in range(MESSAGES_PER_CONNECTION):
                tag = f"r{worker}-{n}"
                body = make_message(tag, 500 + 700 * n)
                # RFC 2920: the previous message's content and the next MAIL/RCPT/DATA
                # travel in one write.
                client.send(
                    pending
                    + f"MAIL FROM:<sender-{tag}@src.test>\r\nRCPT TO:<{rcpt_for(n)}>\r\n".encode()
                    + b"DATA\r\n"
                )
                if n:
                    code, text = client.reply()
                    assert code == 250, text
                    record(text, previous)
                assert [code for code, _ in client.replies(3)] == [250, 250, 354]
                pending = stuff(body) + b".\r\n"
                previous = body
            client.send(pending + b"QUIT\r\n")
            code, text = client.reply()
            assert code == 250, text
            record(text, previous)
            assert client.reply()[0] == 221
            client.close()
        except Exception as exc:
            errors.append(f"raw {worker}: {exc!r}")

    threads = [
        threading.Thread(target=smtplib_worker, args=(i,)) for i in range(SMTPLIB_CONNECTIONS)
    ] + [threading.Thread(target=raw_worker, args=(i,)) for i in range(RAW_CONNECTIONS)]
    for thread in threads:
        thread.start()

    async def run_async() -> None:
        await asyncio.gather(*(aiosmtplib_worker(i) for i in range(AIOSMTPLIB_CONNECTIONS)))

    asyncio.run(run_async())
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    total = MESSAGES_PER_CONNECTION * (
        SMTPLIB_CONNECTIONS + AIOSMTPLIB_CONNECTIONS + RAW_CONNECTIONS
    )
    assert len(sent) == total == 500

    status = spooler.status()
    held = {row["domain"]: row["held"] for row in status["domains"]}
    # Each message has one recipient: the held count per domain is the count by that domain.
    assert held == _stored_domains(spooler.db, list(sent))
    assert set(held) == {"example.test", "example.org"}
    assert sum(held.values()) == 500
    assert status["totals"]["held"] == 500

    # `queue export` returns exactly what was sent, with our one Received: line on top.
    for queue_id in random.Random(1).sample(sorted(sent), 15):
        exported = spooler.cli("queue", "export", queue_id, binary=True).stdout
        received, rest = split_received(exported)
        assert rest == sent[queue_id]
        assert received.count(b"Received:") == 1
        assert queue_id.encode() in received
    # And every one of the 500, read back through the store.
    stored = _read_all(spooler.db, list(sent))
    for queue_id, body in sent.items():
        received, rest = split_received(stored[queue_id])
        assert rest == body, queue_id


def _stored_domains(db: Path, ids: list[str]) -> dict[str, int]:
    async def work() -> dict[str, int]:
        store = SqliteStore(f"sqlite:///{db}")
        await store.open()
        try:
            counts: dict[str, int] = {}
            for queue_id in ids:
                message = await store.get_message(queue_id)
                assert message is not None
                for recipient in message.recipients:
                    counts[recipient.domain] = counts.get(recipient.domain, 0) + 1
            return counts
        finally:
            await store.close()

    return asyncio.run(work())


def _read_all(db: Path, ids: list[str]) -> dict[str, bytes]:
    async def work() -> dict[str, bytes]:
        store = SqliteStore(f"sqlite:///{db}")
        await store.open()
        try:
            result: dict[str, bytes] = {}
            for queue_id in ids:
                result[queue_id] = b"".join([piece async for piece in store.read_body(queue_id)])
            return result
        finally:
            await store.close()

    return asyncio.run(work())


def test_envelope_and_client_details_are_kept(spooler: Spooler) -> None:
    client = RawClient(spooler.port)
    client.reply()
    client.command("EHLO details.client")
    assert (
        client.command("MAIL FROM:<a@src.test> SIZE=300 BODY=8BITMIME RET=HDRS ENVID=QQ314159")[0]
        == 250
    )
    assert (
        client.command(
            "RCPT TO:<only@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;only@example.test"
        )[0]
        == 250
    )
    assert client.command("DATA")[0] == 354
    client.send(b"Message-ID: <keep-me@src.test>\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    code, text = client.reply()
    assert code == 250
    queue_id = text.rsplit(" ", 1)[-1]
    client.command("QUIT")
    shown: dict[str, Any] = json.loads(spooler.cli("queue", "show", queue_id, "--json").stdout)
    flat = json.dumps(shown)
    needles = ("keep-me@src.test", "details.client", "127.0.0.1", "HDRS", "QQ314159")
    needles += ("8BITMIME", "rfc822;only@example.test", "SUCCESS")
    for needle in needles:
        assert needle in flat, needle
    exported = spooler.cli("queue", "export", queue_id, binary=True).stdout
    received, _ = split_received(exported)
    assert b"from details.client ([127.0.0.1])" in received
    assert b"by mx.test.local (mxspool) with ESMTP" in received
    assert b"for <only@example.test>" in received
