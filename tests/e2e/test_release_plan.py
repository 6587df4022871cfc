"""`domain release --dry-run`: the release plan against a known backlog, through a real serve.

50 messages for one mailbox and 5 for each of three others, Exchange Online's per-recipient
limit scaled down to 60 an hour: the big mailbox takes ~50 minutes (the pacer's own burst and
interval), the others ~4, the global rate (600/min) ~7 s; the overall ETA is the maximum,
not a sum. The dry run changes nothing: the domain stays in hold and nothing is delivered.
"""

from __future__ import annotations

import json
import smtplib
from typing import Any

from tests.conftest import Spooler

DOMAIN = "plan.test"


def _send(spooler: Spooler, counts: dict[str, int], size: int = 200) -> None:
    with smtplib.SMTP("127.0.0.1", spooler.port, timeout=30) as client:
        for address, count in counts.items():
            for n in range(count):
                lines = "\r\n".join("x" * 99 for _ in range(size // 101 + 1))
                body = f"Subject: {n}\r\n\r\n{lines}\r\n".encode()
                assert not client.sendmail("s@src.test", [address], body)


def test_dry_run_plans_per_recipient_and_the_overall_eta_is_the_maximum(
    spooler_factory: Any,
) -> None:
    spooler: Spooler = spooler_factory(delivery={"per_recipient_hourly_limit": 60})
    spooler.cli(
        "domain", "add", DOMAIN, "--route", "127.0.0.1:9", "--tls", "off", "--hold",
        "--profile", "exchange-online",
    )  # fmt: skip
    spooler.start()
    big = f"big@{DOMAIN}"
    small = [f"s{n}@{DOMAIN}" for n in range(3)]
    _send(spooler, {big: 50, **dict.fromkeys(small, 5)})
    _send(spooler, {f"huge@{DOMAIN}": 1}, size=5000)
    # The target's limit learned after arrival: the 5,000-byte message will not fit.
    spooler.cli(
        "domain", "route", DOMAIN, "--route", "127.0.0.1:9", "--tls", "off", "--max-size", "4KB"
    )

    result = spooler.cli("domain", "release", DOMAIN, "--dry-run", "--rate", "600/min", "--json")
    plan = json.loads(result.stdout)
    [domain] = plan["domains"]
    assert domain["messages"] == 66
    assert domain["per_recipient_hourly_limit"] == 60
    assert domain["too_big"] == 1
    rows = {row["address"]: row for row in domain["recipients"]}
    assert domain["recipients"][0]["address"] == big  # slowest first
    assert rows[big]["messages"] == 50
    assert rows[big]["readiness"] == "unknown"
    assert 48 * 60 <= rows[big]["eta_s"] <= 52 * 60  # ~50 minutes at 60/h
    for address in small:
        assert rows[address]["messages"] == 5
        assert 3 * 60 <= rows[address]["eta_s"] <= 5 * 60
    assert rows[f"huge@{DOMAIN}"]["too_big"] == 1
    assert abs(domain["rate_eta_s"] - 66 / 10) < 0.5  # 600/min = 10/s
    assert plan["eta_s"] == domain["eta_s"] == rows[big]["eta_s"]  # the maximum, not a sum

    # The table says the same for people.
    table = spooler.cli("domain", "release", DOMAIN, "--dry-run", "--rate", "600/min").stdout
    assert big in table
    assert "per-recipient limit 60/h" in table
    # Nothing changed: still in hold, every message still held, no release audited.
    status = spooler.domain_status(DOMAIN)
    assert (status["mode"], status["held"]) == ("hold", 66)
    assert "domain.release" not in spooler.cli("audit", "--json").stdout
