"""`domain release --dry-run` shows each recipient's readiness from the last `check recipients`.

Through a real serve and a real SMTP target answering per recipient at RCPT: 250 (ready),
550 5.4.1 (not ready: create the mailbox) and 451 4.7.500 (Exchange Online's "server busy":
unknown, check again). Before the check every recipient is "unknown" (the control); after
it, the plan shows the verdict, the reply and the check's age; a recipient that arrived after
the check is "unknown" again; a check older than a day is marked stale.
"""

from __future__ import annotations

import contextlib
import json
import smtplib
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Spooler
from tests.delivery.target import Target

DOMAIN = "ready.test"
NOT_READY = "550 5.4.1 Recipient address rejected: Access denied"
BUSY = "451 4.7.500 Server busy. Please try again later"


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target().start()
    server.behaviour.rcpt_replies = {f"bob@{DOMAIN}": NOT_READY, f"cy@{DOMAIN}": BUSY}
    yield server
    server.stop()


def _send(spooler: Spooler, addresses: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", spooler.port, timeout=30) as client:
        for address in addresses:
            assert not client.sendmail("s@src.test", [address], "Subject: r\r\n\r\nr\r\n")


def _plan(spooler: Spooler) -> dict[str, dict[str, Any]]:
    plan = json.loads(spooler.cli("domain", "release", DOMAIN, "--dry-run", "--json").stdout)
    [domain] = plan["domains"]
    return {row["address"]: row for row in domain["recipients"]}


def test_dry_run_shows_the_readiness_of_the_last_check(
    spooler_factory: Any, target: Target
) -> None:
    spooler: Spooler = spooler_factory()
    route = f"127.0.0.1:{target.port}"
    spooler.cli("domain", "add", DOMAIN, "--route", route, "--tls", "off", "--hold")
    spooler.start()
    ann, bob, cy = (f"{name}@{DOMAIN}" for name in ("ann", "bob", "cy"))
    _send(spooler, [ann, bob, bob, cy])

    # Control: never checked, nothing known.
    for row in _plan(spooler).values():
        assert (row["readiness"], row["checked_at"], row["check_age_s"]) == ("unknown", None, None)

    checked = spooler.cli("check", "recipients", DOMAIN, "--rate", "50/s", check=False)
    assert checked.returncode == 1, checked.stderr  # one refused with 5xx
    assert {rcpt for _, rcpt, _ in target.recorder.rcpts} == {ann, bob, cy}  # really probed
    assert not target.recorder.received  # RCPT only, never DATA

    _send(spooler, [f"dave@{DOMAIN}"])  # arrived after the check: not known
    rows = _plan(spooler)
    assert {address: row["readiness"] for address, row in rows.items()} == {
        ann: "ready",
        bob: "not ready",
        cy: "unknown",
        f"dave@{DOMAIN}": "unknown",
    }
    assert rows[ann]["readiness_reply"].startswith("250")
    assert "5.4.1" in rows[bob]["readiness_reply"] and rows[bob]["messages"] == 2
    assert "4.7.500" in rows[cy]["readiness_reply"]
    assert rows[f"dave@{DOMAIN}"]["checked_at"] is None
    for address in (ann, bob, cy):
        assert rows[address]["checked_at"].endswith("Z")
        assert 0 <= rows[address]["check_age_s"] < 60
        assert rows[address]["readiness_stale"] is False

    table = spooler.cli("domain", "release", DOMAIN, "--dry-run")
    assert "not ready" in table.stdout and " ago" in table.stdout
    assert "1 recipient not ready" in table.stderr and "hold --recipient" in table.stderr
    assert "STALE" not in table.stdout

    # A day later the result is shown, marked stale (mailboxes get created meanwhile).
    with contextlib.closing(sqlite3.connect(spooler.db, timeout=10)) as conn, conn:
        conn.execute("UPDATE recipient_checks SET checked_at = ?", (time.time() - 25 * 3600,))
    rows = _plan(spooler)
    assert rows[bob]["readiness"] == "not ready" and rows[bob]["readiness_stale"] is True
    assert rows[bob]["check_age_s"] > 24 * 3600
    table = spooler.cli("domain", "release", DOMAIN, "--dry-run")
    assert "STALE" in table.stdout and "is stale" in table.stderr

    # The dry run changed nothing; a new check replaces the old results.
    assert spooler.domain_status(DOMAIN)["held"] == 5
    target.behaviour.rcpt_replies.clear()
    spooler.cli("check", "recipients", DOMAIN, "--rate", "50/s")
    rows = _plan(spooler)
    assert {row["readiness"] for row in rows.values()} == {"ready"}
    assert not any(row["readiness_stale"] for row in rows.values())
