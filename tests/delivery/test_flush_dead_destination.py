"""`queue flush` means "try now" (`postqueue -f`), also for a destination held for dead.

Dead-destination state lives in the running serve's memory (delivery/health.py): without the
flush noticed, a CLI flush would make the rows due and the serve would defer them again until
its next probe, an hour away here (retry_schedule ["1h"]). A real `mxspool serve`, two routes
that reset every connection (so both domains go dead), then a real SMTP target comes up on
the first one's port: nothing is delivered without a flush (control), `queue flush --domain`
delivers within seconds, and the other dead domain is not probed until it is flushed too.
"""

from __future__ import annotations

import contextlib
import smtplib
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest

from tests import waiting
from tests.conftest import Spooler, free_port
from tests.delivery.test_dead_destination import ResettingPort, TargetOn

DOMAIN = "flushdead.test"
OTHER = "otherdead.test"
MESSAGES = 5


@pytest.fixture
def ports() -> Iterator[tuple[ResettingPort, ResettingPort]]:
    first, second = ResettingPort(free_port()), ResettingPort(free_port())
    yield first, second
    first.close()
    second.close()


def _dead(spooler: Spooler, domain: str) -> int:
    """Recipients of ``domain`` waiting for the dead destination's probe (read from the file)."""
    with contextlib.closing(sqlite3.connect(f"file:{spooler.db}?mode=ro", uri=True)) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM recipients WHERE domain = ? AND state = 'pending'"
            " AND last_reply LIKE '4.4.1 destination dead:%'",
            (domain,),
        ).fetchone()
    return int(count)


def test_a_flush_probes_a_dead_destination_at_once(
    spooler_factory: Any, ports: tuple[ResettingPort, ResettingPort]
) -> None:
    dead, other = ports
    spooler: Spooler = spooler_factory(
        delivery={"retry_schedule": ["1h"], "dead_after_failures": 3, "connect_timeout": "5s"}
    )
    for name, port in ((DOMAIN, dead), (OTHER, other)):
        spooler.cli("domain", "add", name, "--route", f"127.0.0.1:{port.port}", "--tls", "off")
    spooler.start()
    with smtplib.SMTP("127.0.0.1", spooler.port, timeout=30) as client:
        for n in range(MESSAGES):
            for name in (DOMAIN, OTHER):
                assert not client.sendmail(
                    "s@src.test", [f"u{n}@{name}"], f"Subject: {n}\r\n\r\nx\r\n"
                )
    for name in (DOMAIN, OTHER):
        waiting.wait_until(lambda n=name: _dead(spooler, n) == MESSAGES, 20, f"{name} dead")
    assert dead.accepted >= 3 and other.accepted >= 3  # really tried, then held for dead

    # The destination is back, but the serve holds it for dead until its probe in an hour.
    dead.close()
    target = TargetOn(dead.port).start()
    try:
        waiting.stays(lambda: not target.recorder.received, 2.0, "nothing goes before the flush")
        assert _dead(spooler, DOMAIN) == MESSAGES

        tried_other = other.accepted
        flushed = spooler.cli("queue", "flush", "--domain", DOMAIN).stdout
        assert f"{MESSAGES} deferred recipients due now" in flushed, flushed
        waiting.wait_until(
            lambda: len(target.recorder.deliveries()) == MESSAGES, 5, "delivered after the flush"
        )
        # Only the flushed domain was forgotten: the other is not probed before its time...
        waiting.stays(lambda: other.accepted == tried_other, 1.0, "the other stays dead")
        assert _dead(spooler, OTHER) == MESSAGES
        # ...until it is flushed too (all domains): probed at once, and dead again.
        spooler.cli("queue", "flush")
        waiting.wait_until(lambda: other.accepted > tried_other, 5, "the other probed")
        waiting.wait_until(lambda: _dead(spooler, OTHER) == MESSAGES, 10, "the other dead again")
    finally:
        target.stop()
