"""``check recipients`` and Exchange Online's 4xx (issue 11, point 6a).

Exchange Online answers ``451 4.7.500 Server busy`` at RCPT to senders it does not know yet:
that says nothing about the mailbox, so it is "unknown, check again", never "not ready: create
them at the target". Exit status: 0 all ready, 1 some not ready (5xx), 3 none refused but some
unknown (2 stays usage and configuration errors). A local target answers per recipient.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from click.testing import Result

from tests.conftest import free_port
from tests.delivery.identity_target import IdentityTarget
from tests.migrate.conftest import Cli
from tests.migrate.test_check_route import _put_held

DOMAIN = "example.test"
BUSY = "451 4.7.500 Server busy. Please try again later from [127.0.0.1]. (S77714)"
NOT_READY = "550 5.4.1 Recipient address rejected: Access denied"


@pytest.fixture
def target() -> Iterator[IdentityTarget]:
    server = IdentityTarget(
        rcpt_replies={f"bob@{DOMAIN}": BUSY, f"carol@{DOMAIN}": NOT_READY}
    ).start()
    yield server
    server.stop()


def _check(cli: Cli, code: int) -> tuple[dict[str, object], Result]:
    data = json.loads(
        cli("check", "recipients", DOMAIN, "--json", "--rate", "50/s", code=code).stdout
    )
    text = cli("check", "recipients", DOMAIN, "--rate", "50/s", code=code)
    return data, text


def _states(data: dict[str, object]) -> dict[str, str]:
    items = data["recipients"]
    assert isinstance(items, list)
    return {item["address"]: item["state"] for item in items}


def test_busy_is_unknown_not_not_ready(mxcli: Cli, target: IdentityTarget) -> None:
    mxcli("domain", "add", DOMAIN, "--route", f"127.0.0.1:{target.port}", "--tls", "off", "--hold")
    _put_held(mxcli, [[f"alice@{DOMAIN}", f"bob@{DOMAIN}"], [f"carol@{DOMAIN}"]])
    # 250, 451 4.7.500 and 550 5.4.1: one of each; the 5xx decides the exit status (1).
    data, text = _check(mxcli, 1)
    assert _states(data) == {
        f"alice@{DOMAIN}": "ready",
        f"bob@{DOMAIN}": "unknown",
        f"carol@{DOMAIN}": "not ready",
    }
    assert (data["checked"], data["ready"], data["not_ready"], data["unknown"]) == (3, 1, 1, 1)
    bob = next(i for i in data["recipients"] if i["address"].startswith("bob"))  # type: ignore[attr-defined]
    assert "throttling" in bob["hint"] and "check again later" in bob["hint"]
    assert "1 of 3 recipients ready at the target, 1 not ready, 1 unknown" in text.output
    assert "1 not ready (refused with 5xx): create them at the target" in text.stderr
    assert "1 unknown" in text.stderr and "again later" in text.stderr
    # Only the throttled one left: exit 3, and no advice to create mailboxes.
    target.rcpt_replies.pop(f"carol@{DOMAIN}")
    data, text = _check(mxcli, 3)
    assert (data["ready"], data["not_ready"], data["unknown"]) == (2, 0, 1)
    assert "create them" not in text.stderr and "again later" in text.stderr
    # Control: once the target takes bob too, all ready and exit 0.
    target.rcpt_replies.clear()
    data, text = _check(mxcli, 0)
    assert (data["ready"], data["not_ready"], data["unknown"]) == (3, 0, 0)
    assert text.stderr == ""


def test_failure_before_rcpt_is_unknown(mxcli: Cli) -> None:
    # A 4xx to MAIL FROM: no RCPT was answered, so nothing is known about the mailboxes.
    busy = IdentityTarget(mail_reply="451 4.7.500 Server busy").start()
    try:
        mxcli(
            "domain", "add", DOMAIN, "--route", f"127.0.0.1:{busy.port}", "--tls", "off", "--hold"
        )
        _put_held(mxcli, [[f"alice@{DOMAIN}"], [f"bob@{DOMAIN}"]])
        data, text = _check(mxcli, 3)
        assert set(_states(data).values()) == {"unknown"} and data["not_ready"] == 0
        assert [s.rcpts for s in busy.sessions] == [[], []]  # asked, refused before RCPT
    finally:
        busy.stop()
    # No connection at all (a closed port): unknown as well.
    mxcli("domain", "route", DOMAIN, "--route", f"127.0.0.1:{free_port()}", "--tls", "off")
    data, text = _check(mxcli, 3)
    assert set(_states(data).values()) == {"unknown"}
    assert "check again later" in text.output
