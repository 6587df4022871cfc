"""Error limits (issue 14, item 6): past soft_error_limit every reply waits error_delay; at
hard_error_limit the session gets 421 and is closed, and the metrics count it."""

from __future__ import annotations

import re
import time
import urllib.request
from typing import Any

from tests.conftest import Spooler
from tests.smtp_client import RawClient
from tests.waiting import wait_until

DELAY = 0.3


def _metrics_text(node: Spooler) -> str | None:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{node.admin_port}/metrics", timeout=5
        ) as response:
            return response.read().decode()
    except OSError:
        return None


def _metric(node: Spooler, reason: str) -> float:
    text = wait_until(lambda: _metrics_text(node), within=10, what="the admin plane to answer")
    match = re.search(rf'^mxspool_smtp_rejected_total{{reason="{reason}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def _timed(client: RawClient, line: str) -> tuple[int, str, float]:
    started = time.monotonic()
    code, text = client.command(line)
    return code, text, time.monotonic() - started


def test_error_limits(spooler_factory: Any) -> None:
    node: Spooler = spooler_factory(
        smtp={"soft_error_limit": 10, "hard_error_limit": 20, "error_delay": f"{DELAY}s"}
    )
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--hold")
    node.start()
    assert _metric(node, "too_many_errors") == 0.0

    harvester = RawClient(node.port, timeout=10)
    assert harvester.reply()[0] == 220
    assert harvester.command("EHLO harvest.client")[0] == 250
    assert harvester.command("MAIL FROM:<h@src.test>")[0] == 250
    timings = []
    for n in range(1, 21):
        code, text, seconds = _timed(harvester, f"RCPT TO:<user{n}@elsewhere.test>")
        assert (code, text) == (550, "5.7.1 Relaying denied"), n
        timings.append(seconds)
    # The 20th error is followed at once by the 421, and the server closes.
    assert harvester.reply() == (421, "4.7.0 mx.test.local Error: too many errors")
    assert harvester.closed_by_peer()
    print("reply times:", " ".join(f"{t:.2f}" for t in timings))
    # No delay up to the 10th error; every reply after it waited error_delay.
    assert max(timings[:10]) < DELAY / 2, timings
    assert min(timings[10:]) >= DELAY * 0.9, timings
    assert _metric(node, "too_many_errors") == 1.0

    # A well-behaved session with a few errors of its own is neither delayed nor closed.
    client = RawClient(node.port, timeout=10)
    assert client.reply()[0] == 220
    assert client.command("EHLO good.client")[0] == 250
    assert client.command("MAIL FROM:<g@src.test>")[0] == 250
    for n in range(3):
        assert _timed(client, f"RCPT TO:<typo{n}@elsewhere.test>")[0] == 550
    for n in range(5):
        code, _, seconds = _timed(client, f"RCPT TO:<user{n}@example.test>")
        assert code == 250 and seconds < DELAY / 2
    assert client.command("DATA")[0] == 354
    client.send(b"Subject: fine\r\n\r\nhello\r\n.\r\n")
    assert client.reply()[0] == 250
    assert client.command("QUIT")[0] == 221
    assert _metric(node, "too_many_errors") == 1.0
