"""Error limits (issue 14, item 6): past soft_error_limit every reply waits error_delay; at
hard_error_limit the session gets 421 and is closed, and the metrics count it."""

from __future__ import annotations

import time
from typing import Any

from tests.conftest import Spooler
from tests.smtp_client import RawClient

DELAY = 1.0
"""error_delay. A reply counts as "not delayed" under 0.9 s: wide enough that a loaded CI machine
stalling a round trip for a few hundred milliseconds does not pass for the delay."""
SOFT, HARD = 10, 13


def _timed(client: RawClient, line: str) -> tuple[int, str, float]:
    started = time.monotonic()
    code, text = client.command(line)
    return code, text, time.monotonic() - started


def test_error_limits(spooler_factory: Any) -> None:
    node: Spooler = spooler_factory(
        smtp={"soft_error_limit": SOFT, "hard_error_limit": HARD, "error_delay": f"{DELAY}s"}
    )
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--hold")
    node.start()
    assert node.metric("mxspool_smtp_rejected_total", reason="too_many_errors") == 0.0

    harvester = RawClient(node.port, timeout=10)
    assert harvester.reply()[0] == 220
    assert harvester.command("EHLO harvest.client")[0] == 250
    assert harvester.command("MAIL FROM:<h@src.test>")[0] == 250
    timings = []
    for n in range(1, HARD + 1):
        code, text, seconds = _timed(harvester, f"RCPT TO:<user{n}@elsewhere.test>")
        assert (code, text) == (550, "5.7.1 Relaying denied"), n
        timings.append(seconds)
    # The last error is followed at once by the 421, and the server closes.
    assert harvester.reply() == (421, "4.7.0 mx.test.local Error: too many errors")
    assert harvester.closed_by_peer()
    print("reply times:", " ".join(f"{t:.2f}" for t in timings))
    # No delay up to the soft limit's error; every reply after it waited error_delay.
    assert max(timings[:SOFT]) < DELAY * 0.9, timings
    assert min(timings[SOFT:]) >= DELAY * 0.9, timings
    assert node.metric("mxspool_smtp_rejected_total", reason="too_many_errors") == 1.0

    # A well-behaved session with a few errors of its own is neither delayed nor closed.
    client = RawClient(node.port, timeout=10)
    assert client.reply()[0] == 220
    assert client.command("EHLO good.client")[0] == 250
    assert client.command("MAIL FROM:<g@src.test>")[0] == 250
    for n in range(3):
        assert _timed(client, f"RCPT TO:<typo{n}@elsewhere.test>")[0] == 550
    for n in range(5):
        code, _, seconds = _timed(client, f"RCPT TO:<user{n}@example.test>")
        assert code == 250 and seconds < DELAY * 0.9
    assert client.command("DATA")[0] == 354
    client.send(b"Subject: fine\r\n\r\nhello\r\n.\r\n")
    assert client.reply()[0] == 250
    assert client.command("QUIT")[0] == 221
    assert node.metric("mxspool_smtp_rejected_total", reason="too_many_errors") == 1.0
