"""`hold --recipient`: one mailbox's mail stays held while its domain is released, through a
real serve and a real SMTP target, until `domain release --only` lets it go.

Positive controls: the other mailbox's mail (old and new) arrives at the target while the held
one's does not; then the release delivers every held message, the one that arrived after the
hold included.
"""

from __future__ import annotations

import json
import smtplib
from collections.abc import Iterator
from typing import Any

import pytest

from tests import waiting
from tests.conftest import Spooler
from tests.delivery.target import Target

DOMAIN = "late.test"
LATE = f"late@{DOMAIN}"
EARLY = f"early@{DOMAIN}"


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target().start()
    yield server
    server.stop()


def _send(spooler: Spooler, address: str, tag: str) -> None:
    with smtplib.SMTP("127.0.0.1", spooler.port, timeout=30) as client:
        assert not client.sendmail("s@src.test", [address], f"Subject: {tag}\r\n\r\n{tag}\r\n")


def _arrived(target: Target, address: str) -> int:
    return sum(rcpt.lower() == address for rcpt, _ in target.recorder.deliveries())


def test_a_held_mailbox_waits_while_its_domain_is_released(
    spooler_factory: Any, target: Target
) -> None:
    spooler: Spooler = spooler_factory(delivery={"retry_schedule": ["1s"]})
    route = f"127.0.0.1:{target.port}"
    spooler.cli("domain", "add", DOMAIN, "--route", route, "--tls", "off", "--hold")
    spooler.start()
    for n in range(2):
        _send(spooler, LATE, f"late-{n}")
        _send(spooler, EARLY, f"early-{n}")
    _send(spooler, f"late+news@{DOMAIN}", "late-sub")

    made = json.loads(spooler.cli("hold", "--recipient", "Late@Late.Test", "--json").stdout)
    assert (made["address"], made["held"], made["sub_addresses"]) == (LATE, 3, True)
    spooler.cli("domain", "release", DOMAIN)
    _send(spooler, LATE, "late-after")  # new mail for the held mailbox: held at arrival
    _send(spooler, EARLY, "early-after")

    waiting.wait_until(lambda: _arrived(target, EARLY) == 3, 30, "early's mail at the target")
    waiting.stays(lambda: _arrived(target, LATE) == 0, 2.0, "late's mail held")
    assert not any("late+news" in rcpt for rcpt, _ in target.recorder.deliveries())
    [listed] = json.loads(spooler.cli("hold", "--list", "--json").stdout)
    assert (listed["address"], listed["held"]) == (LATE, 4)
    assert spooler.status()["recipient_holds"][0]["held"] == 4

    released = spooler.cli("domain", "release", DOMAIN, "--only", LATE).stdout
    assert "released 4 recipients" in released
    waiting.wait_until(lambda: _arrived(target, LATE) == 3, 30, "late's mail at the target")
    waiting.wait_until(
        lambda: any("late+news" in rcpt for rcpt, _ in target.recorder.deliveries()),
        30,
        "the sub-address's mail at the target",
    )
    assert json.loads(spooler.cli("hold", "--list", "--json").stdout) == []


def test_hold_refuses_an_address_outside_the_configured_domains(spooler_factory: Any) -> None:
    spooler: Spooler = spooler_factory()
    result = spooler.cli("hold", "--recipient", "someone@nowhere.test", check=False)
    assert result.returncode == 1
    assert "not a configured domain" in result.stderr
    assert spooler.cli("hold", check=False).returncode == 2
