"""``mxspool purge --delivered-older-than AGE`` on a real node: mail delivered by ``serve`` to a
real SMTP target, aged (its rows' times moved back 40 days), then purged: bodies gone, report
rows kept and marked, ``report --check`` still passing, held mail untouched, SQLite pages freed
for reuse, the purge audited; ``--dry-run`` changes nothing."""

from __future__ import annotations

import json
import smtplib
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Spooler
from tests.delivery.target import Target
from tests.waiting import wait_until

DAY = 86400.0
BIG = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 100  # overflow pages: ~100 KB


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target().start()
    yield server
    server.stop()


def send(node: Spooler, rcpt: str) -> str:
    with smtplib.SMTP("127.0.0.1", node.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("a@src.test")
        assert client.rcpt(rcpt)[0] == 250
        code, reply = client.data(BIG)
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[-1]


def freelist(node: Spooler) -> int:
    conn = sqlite3.connect(f"file:{node.db}?mode=ro", uri=True)
    try:
        return int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    finally:
        conn.close()


def test_purge_drops_old_delivered_bodies_and_keeps_the_ledger(
    spooler_factory: Any, target: Target
) -> None:
    node: Spooler = spooler_factory()
    route = f"127.0.0.1:{target.port}"
    node.cli("domain", "add", "relay.test", "--route", route, "--tls", "off")
    node.cli("domain", "add", "held.test", "--route", route, "--tls", "off", "--hold")
    node.start()
    delivered = [send(node, f"u{i}@relay.test") for i in range(3)]
    send(node, "h@held.test")  # held: its report row stays unmarked
    wait_until(lambda: node.domain_status("relay.test")["delivered"] == 3, 30, "3 delivered")

    conn = sqlite3.connect(node.db, timeout=10)  # beside the running server's writer
    with conn:
        conn.execute(
            "UPDATE recipients SET updated_at = updated_at - ?, delivered_at = delivered_at - ? "
            "WHERE state = 'delivered'",
            (40 * DAY, 40 * DAY),
        )
    conn.close()

    dry = node.cli("purge", "--delivered-older-than", "30d", "--dry-run")
    assert "would drop the bodies of 3 messages" in dry.stdout
    assert node.cli("queue", "export", delivered[0], binary=True).stdout.endswith(b"y\r\n")

    free_before = freelist(node)
    done = node.cli("purge", "--delivered-older-than", "30d")
    assert "dropped the bodies of 3 messages" in done.stdout
    assert "VACUUM" in done.stderr  # how to shrink the file, if wanted
    gone = node.cli("queue", "export", delivered[0], check=False)
    assert gone.returncode == 1 and "purged" in gone.stderr

    rows = json.loads(node.cli("report", "--format", "json").stdout)
    marked = {row["id"] for row in rows if row["purged"]}
    assert marked == set(delivered)
    assert {row["state"] for row in rows if row["id"] in marked} == {"delivered"}
    node.cli("report", "--domain", "relay.test", "--check")  # still passes (exit 0)
    csv_head = node.cli("report").stdout.splitlines()[0]
    assert csv_head.endswith(",purged")

    # Freed pages are kept for reuse (wait: the checkpoint moves them into the file).
    wait_until(lambda: freelist(node) > free_before, 10, "pages on the free list")
    assert "store.purge" in node.cli("audit").stdout


def test_purge_refuses_a_bad_age(spooler_factory: Any) -> None:
    node: Spooler = spooler_factory()
    for age in ("soon", "10m"):
        result = node.cli("purge", "--delivered-older-than", age, check=False)
        assert result.returncode == 2 and "--delivered-older-than" in result.stderr
    assert node.cli("purge", "--delivered-older-than", "2h").returncode == 0  # control


def test_serve_purges_by_itself_with_purge_delivered_after(
    spooler_factory: Any, target: Target
) -> None:
    node: Spooler = spooler_factory(store={"purge_delivered_after": "30d"})
    node.cli("domain", "add", "relay.test", "--route", f"127.0.0.1:{target.port}", "--tls", "off")
    node.start()
    old, young = send(node, "old@relay.test"), send(node, "young@relay.test")
    wait_until(lambda: node.domain_status("relay.test")["delivered"] == 2, 30, "2 delivered")
    conn = sqlite3.connect(node.db, timeout=10)
    with conn:
        conn.execute(
            "UPDATE recipients SET updated_at = updated_at - ? WHERE rcpt = 'old@relay.test'",
            (40 * DAY,),
        )
    conn.close()
    node.stop()
    node.start()  # retention runs at start, then hourly

    def purged() -> dict[str, Any]:
        rows = json.loads(node.cli("report", "--format", "json").stdout)
        return {row["id"]: row["purged"] for row in rows}

    wait_until(lambda: purged()[old], 30, "the old message purged by serve")
    assert purged()[young] is None  # delivered just now: kept (control)
    assert "retention" in node.cli("audit").stdout


def test_purge_delivered_after_under_an_hour_is_a_configuration_error(
    spooler_factory: Any,
) -> None:
    node: Spooler = spooler_factory(store={"purge_delivered_after": "10m"})
    result = node.cli("status", check=False)
    assert result.returncode == 2 and "purge_delivered_after" in result.stderr
