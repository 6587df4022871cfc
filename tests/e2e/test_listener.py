"""Listener behaviour: IPv6, live domain changes, normalisation mode, global connection cap."""

from __future__ import annotations

import json
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from typing import Any

from tests.conftest import Spooler, free_port
from tests.smtp_client import RawClient, split_received
from tests.waiting import wait_until


def _deliver(client: RawClient, rcpt: str, body: bytes) -> tuple[int, str]:
    client.send(f"MAIL FROM:<a@src.test>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
    replies = client.replies(3)
    if replies[-1][0] != 354:
        return replies[1]
    client.send(body + b".\r\n")
    return client.reply()


def test_ipv6_listener(spooler_factory: Any) -> None:
    v6_port = free_port()
    node: Spooler = spooler_factory()
    node.config.write_text(
        node.config.read_text().replace(
            f'listen = ["127.0.0.1:{node.port}"]',
            f'listen = ["127.0.0.1:{node.port}", "[::1]:{v6_port}"]',
        )
    )
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--hold")
    node.start()
    sock = socket.create_connection(("::1", v6_port), timeout=10)
    client = RawClient.__new__(RawClient)
    client.sock, client.buffer = sock, b""
    assert client.reply()[0] == 220
    client.command("EHLO v6.client")
    code, _ = _deliver(client, "u@example.test", b"Subject: v6\r\n\r\nhi\r\n")
    assert code == 250
    client.close()
    exported = node.cli("queue", "list", "--json").stdout
    assert "u@example.test" in exported


def _readyz(port: int) -> tuple[int, dict[str, Any]]:
    """GET /readyz once: its status and body (a refused connection raises URLError)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:  # 503: not ready yet, still an answer
        return exc.code, json.loads(exc.read())


def test_admin_plane_answers_as_soon_as_smtp_greets(spooler_factory: Any) -> None:
    """serve makes the admin port listen before any SMTP listener opens: whoever has seen a
    greeting (a health check, an orchestrator) is answered on /readyz, never refused."""
    node: Spooler = spooler_factory()
    # Control: nothing is listening on the admin port yet, and a request is refused.
    try:
        _readyz(node.admin_port)
    except urllib.error.URLError as exc:
        assert isinstance(exc.reason, ConnectionRefusedError), exc
    else:
        raise AssertionError("something answered on the admin port before serve started")
    node.start(wait_admin=False)  # returns at the first SMTP greeting
    status, body = _readyz(node.admin_port)  # once, no retry: it must not be refused
    assert status in (200, 503), body
    assert body["checks"]["listeners"]["ok"] is True, body
    # And it becomes ready (the delivery loop's first turn may come just after the greeting).
    wait_until(lambda: _readyz(node.admin_port)[0] == 200, 15, "/readyz to answer 200")


def test_domain_changes_reach_a_running_server_within_a_second(spooler_factory: Any) -> None:
    node: Spooler = spooler_factory()
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--hold")
    node.start()
    client = RawClient(node.port)
    client.reply()
    client.command("EHLO live.client")
    client.command("MAIL FROM:<a@src.test>")
    assert client.command("RCPT TO:<u@late.test>")[0] == 550
    node.cli("domain", "add", "late.test", "--route", "127.0.0.1:2526", "--hold")
    added = time.monotonic()
    while client.command("RCPT TO:<u@late.test>")[0] != 250:
        assert time.monotonic() - added < 1.0, "the server did not see the new domain in 1 s"
        time.sleep(0.05)
    node.cli("domain", "remove", "late.test")
    removed = time.monotonic()
    while client.command("RCPT TO:<v@late.test>")[0] != 550:
        assert time.monotonic() - removed < 1.0, "the server still accepts a removed domain"
        time.sleep(0.05)
    client.close()


def test_normalize_mode_stores_crlf_and_keeps_reading_to_the_real_end(
    spooler_factory: Any,
) -> None:
    node: Spooler = spooler_factory(smtp={"bare_newlines": "normalize"})
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--hold")
    node.start()
    client = RawClient(node.port)
    client.reply()
    client.command("EHLO norm.client")
    body = b"Subject: norm\nX-A: b\r\n\r\nline one\nline two\r\n.\nMAIL FROM:<evil@x.test>\r\n"
    code, text = _deliver(client, "u@example.test", body)
    assert code == 250, text
    queue_id = text.rsplit(" ", 1)[-1]
    client.close()
    stored = node.cli("queue", "export", queue_id, binary=True).stdout
    _, rest = split_received(stored)
    # The lone-dot line ended by a bare LF is neither the end nor content: it is dropped, as
    # Postfix's "normalize" does; the end marker is only a genuine <CRLF>.<CRLF>.
    assert rest == (
        b"Subject: norm\r\nX-A: b\r\n\r\nline one\r\nline two\r\nMAIL FROM:<evil@x.test>\r\n"
    )
    conn = sqlite3.connect(node.db)
    try:
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
    finally:
        conn.close()


def test_global_connection_cap(spooler_factory: Any) -> None:
    node: Spooler = spooler_factory(smtp={"max_connections": 2, "max_connections_per_ip": 10})
    node.start()
    first = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    # A second loopback address counts as another client.
    second = socket.create_connection(
        ("127.0.0.1", node.port), timeout=10, source_address=("127.0.0.2", 0)
    )
    third = socket.create_connection(
        ("127.0.0.1", node.port), timeout=10, source_address=("127.0.0.3", 0)
    )
    try:
        assert first.recv(100).startswith(b"220")
        assert second.recv(100).startswith(b"220")
        assert third.recv(100) == b"421 4.7.0 Too many connections\r\n"
    finally:
        for sock in (first, second, third):
            sock.close()
