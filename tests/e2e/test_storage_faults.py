"""Storage faults answer 451/452, store nothing, and leave the server serving."""

from __future__ import annotations

import resource
import sqlite3
from typing import Any

from tests.conftest import Spooler
from tests.smtp_client import RawClient


def _send(port: int, body: bytes, rcpt: str = "u@example.test") -> list[tuple[int, str]]:
    client = RawClient(port)
    client.reply()
    client.command("EHLO faults.client")
    replies = [client.command("MAIL FROM:<a@src.test>")]
    if replies[-1][0] == 250:
        replies.append(client.command(f"RCPT TO:<{rcpt}>"))
        replies.append(client.command("DATA"))
        if replies[-1][0] == 354:
            client.send(body + b".\r\n")
            replies.append(client.reply())
    replies.append(client.command("NOOP"))
    client.close()
    return replies


def _stored(spooler: Spooler) -> int:
    conn = sqlite3.connect(spooler.db)
    try:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    finally:
        conn.close()


def _prepare(spooler_factory: Any, **smtp: Any) -> Spooler:
    node: Spooler = spooler_factory(smtp={"spill_threshold": "16MiB", **smtp})
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--hold")
    return node


def test_low_free_space_answers_452_at_mail_from(spooler_factory: Any) -> None:
    node: Spooler = spooler_factory(store={"min_free_space": "1000TiB"})
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--hold")
    node.start()
    replies = _send(node.port, b"Subject: x\r\n\r\nhello\r\n")
    assert replies[0][0] == 452 and replies[0][1].startswith("4.3.1"), replies
    assert replies[-1][0] == 250  # the session goes on
    assert _stored(node) == 0


def _limit_file_size(limit: int) -> Any:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_failing_commit_answers_451_and_stores_nothing(spooler_factory: Any) -> None:
    # A file-size limit on the server process makes SQLite's WAL writes fail with EFBIG:
    # a real I/O error on the commit path, like a full disk.
    node = _prepare(spooler_factory)
    node.start(preexec=_limit_file_size(2 << 20))
    small = b"Subject: small\r\n\r\n" + b"x" * 900 + b"\r\n"
    big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 3000  # 3 MB
    assert _send(node.port, small)[-2][0] == 250
    replies = _send(node.port, big)
    assert replies[-2][0] == 451 and replies[-2][1].startswith("4.3.0"), replies
    assert replies[-1][0] == 250
    # The server keeps serving, and what failed is not there.
    assert _send(node.port, small)[-2][0] == 250
    assert node.proc is not None and node.proc.poll() is None
    node.stop()
    assert _stored(node) == 2
    assert node.status()["totals"]["held"] == 2


def test_failing_spool_file_answers_451(spooler_factory: Any) -> None:
    node = _prepare(spooler_factory, spill_threshold="64KiB")
    node.start(preexec=_limit_file_size(1 << 20))
    big = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 2000  # 2 MB: the temp file fails
    replies = _send(node.port, big)
    assert replies[-2][0] == 451, replies
    assert replies[-1][0] == 250
    small = b"Subject: small\r\n\r\nok\r\n"
    assert _send(node.port, small)[-2][0] == 250
    node.stop()
    assert _stored(node) == 1
