"""`queue flush`: a recipient deferred for an hour is delivered right after the flush (as
`postqueue -f` does), through a real serve and a real SMTP target."""

from __future__ import annotations

import contextlib
import smtplib
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest

from tests import waiting
from tests.conftest import Spooler
from tests.delivery.target import Target

DOMAIN = "flush.test"


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target().start()
    yield server
    server.stop()


def _rows(spooler: Spooler) -> list[tuple[str, int]]:
    """(state, attempts) of every recipient, read from the spool file (a CLI call a look
    would make the polls slow)."""
    with contextlib.closing(sqlite3.connect(f"file:{spooler.db}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT state, attempts FROM recipients ORDER BY id").fetchall()


def test_a_deferred_recipient_goes_right_after_a_flush(
    spooler_factory: Any, target: Target
) -> None:
    spooler: Spooler = spooler_factory(delivery={"retry_schedule": ["1h"]})
    spooler.cli("domain", "add", DOMAIN, "--route", f"127.0.0.1:{target.port}", "--tls", "off")
    spooler.start()
    target.behaviour.data_replies = ["451 4.3.0 try again later"]
    with smtplib.SMTP("127.0.0.1", spooler.port, timeout=30) as client:
        assert not client.sendmail("s@src.test", [f"a@{DOMAIN}"], "Subject: f\r\n\r\nf\r\n")
    waiting.wait_until(lambda: _rows(spooler) == [("pending", 1)], 30, "the deferral")
    # Deferred for an hour: it stays put (control: the target took nothing else either).
    waiting.stays(lambda: not target.recorder.received, 1.0, "the deferred message waits")

    flushed = spooler.cli("queue", "flush", "--domain", DOMAIN).stdout
    assert "1 deferred recipient due now" in flushed
    waiting.wait_until(lambda: target.recorder.received, 15, "the message at the target")
    waiting.wait_until(lambda: _rows(spooler) == [("delivered", 2)], 15, "delivered")
    bad = spooler.cli("queue", "flush", "--domain", "nowhere.test", check=False)
    assert bad.returncode == 1
