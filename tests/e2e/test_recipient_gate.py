"""The recipient gate over real SMTP: what Exchange Online would accept, we accept.

One `mxspool serve` with several domains, each set up for one rule (plus addressing on, off or
with another separator; subdomains; an IDN), checked with smtplib RCPT commands, and what was
queued checked with `queue list --json`.
"""

from __future__ import annotations

import json
import smtplib
from pathlib import Path
from typing import Any

import pytest

from tests.waiting import wait_until

ROUTE = ("--route", "127.0.0.1:9", "--tls", "off", "--hold")  # held: nothing is delivered
LIST = "alice@{d}\nbob@{d}\n"


def _rcpt(port: int, address: str, *, utf8: bool = False) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        if utf8:
            client.command_encoding = "utf-8"
        code, _ = client.mail("sender@src.test", ["SMTPUTF8"] if utf8 else [])
        assert code == 250
        code, text = client.rcpt(address)
        return code, text.decode("utf-8", "replace")


def _send(port: int, recipients: list[str], *, utf8: bool = False) -> str:
    """Send one message; the queue id from the 250."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        if utf8:
            client.command_encoding = "utf-8"
        assert client.mail("sender@src.test", ["SMTPUTF8"] if utf8 else [])[0] == 250
        for address in recipients:
            code, text = client.rcpt(address)
            assert code == 250, (address, code, text)
        code, text = client.data(b"Subject: gate\r\n\r\nhello\r\n")
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[-1]


def _queued(spooler: Any, queue_id: str) -> list[tuple[str, str, str]]:
    rows = json.loads(spooler.cli("queue", "list", "--json", "--limit", "1000").stdout)
    return [(row["rcpt"], row["domain"], row["state"]) for row in rows if row["id"] == queue_id]


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.conftest import Spooler

    root = tmp_path_factory.mktemp("gate")
    node = Spooler(root)
    cli = node.cli
    for name, extra in (
        ("test.local", ()),  # the spooler's hostname is mx.test.local: <Postmaster> goes here
        ("gate.test", ()),
        ("noplus.test", ("--no-plus-addressing",)),
        ("dash.test", ("--plus-separator", "-")),
        ("sub.test", ("--subdomains",)),
        ("listsub.test", ("--subdomains",)),
        ("nosub.test", ()),
        ("kelvin.test", ()),
        ("bücher.test", ()),
    ):
        cli("domain", "add", name, *ROUTE, *extra)
    (root / "listsub.txt").write_text("alice@listsub.test\nbob@eu.listsub.test\n")
    cli("recipients", "import", "listsub.test", str(root / "listsub.txt"))
    for name in ("gate.test", "noplus.test", "dash.test", "test.local"):
        listing = root / f"{name}.txt"
        listing.write_text(LIST.format(d=name))
        cli("recipients", "import", name, str(listing))
    node.start()
    yield node
    node.stop()


def test_plus_addressing_is_accepted_and_queued_as_written(gate: Any) -> None:
    assert _rcpt(gate.port, "carol@gate.test")[0] == 550  # control: not on the list
    queue_id = _send(gate.port, ["alice+news@gate.test", "Bob+a+b@GATE.test"])
    assert sorted(_queued(gate, queue_id)) == [
        ("Bob+a+b@GATE.test", "gate.test", "held"),
        ("alice+news@gate.test", "gate.test", "held"),
    ]
    assert _rcpt(gate.port, "carol+news@gate.test")[0] == 550  # the base must be listed
    assert _rcpt(gate.port, "+news@gate.test")[0] == 550  # an empty base is no address


def test_plus_addressing_off_and_another_separator(gate: Any) -> None:
    assert _rcpt(gate.port, "alice@noplus.test")[0] == 250  # control
    assert _rcpt(gate.port, "alice+news@noplus.test") == (550, "5.1.1 Recipient unknown")
    assert _rcpt(gate.port, "alice-news@dash.test")[0] == 250
    assert _rcpt(gate.port, "alice+news@dash.test")[0] == 550  # "+" is not dash.test's
    # Switched on again at run time: the intake sees it within a second.
    gate.cli("domain", "route", "noplus.test", "--plus-separator", "+")
    wait_until(lambda: _rcpt(gate.port, "alice+news@noplus.test")[0] == 250, 5, "plus on")
    gate.cli("domain", "route", "noplus.test", "--no-plus-addressing")
    wait_until(lambda: _rcpt(gate.port, "alice+news@noplus.test")[0] == 550, 5, "plus off")


def test_postmaster_is_always_accepted(gate: Any) -> None:
    assert _rcpt(gate.port, "dave@gate.test")[0] == 550  # control: the list applies
    for address in ("postmaster@gate.test", "PostMaster@noplus.test", "postmaster@sub.test"):
        assert _rcpt(gate.port, address)[0] == 250, address
    queue_id = _send(gate.port, ["Postmaster"])  # RFC 5321 4.5.1: "<Postmaster>", no domain
    assert _queued(gate, queue_id) == [("postmaster@test.local", "test.local", "held")]
    assert _rcpt(gate.port, "Postmaster@")[0] != 250  # still no other domain-less form
    assert _rcpt(gate.port, "abuse")[0] != 250


def test_local_parts_compare_case_insensitively(gate: Any) -> None:
    for address in ("ALICE@gate.test", "Alice@Gate.Test", "bOb+X@GATE.TEST"):
        assert _rcpt(gate.port, address)[0] == 250, address
    assert _rcpt(gate.port, "alicia@gate.test")[0] == 550


def test_subdomains_only_with_the_option(gate: Any) -> None:
    queue_id = _send(gate.port, ["x@a.sub.test", "y@b.c.SUB.test"])
    assert sorted(_queued(gate, queue_id)) == [
        ("x@a.sub.test", "sub.test", "held"),  # routed and held like the parent
        ("y@b.c.SUB.test", "sub.test", "held"),
    ]
    assert _rcpt(gate.port, "x@nosub.test")[0] == 250  # control
    assert _rcpt(gate.port, "x@a.nosub.test") == (550, "5.7.1 Relaying denied")
    assert _rcpt(gate.port, "x@asub.test")[0] == 550  # a suffix is not a subdomain
    gate.cli("domain", "route", "nosub.test", "--subdomains")
    wait_until(lambda: _rcpt(gate.port, "x@a.nosub.test")[0] == 250, 5, "subdomains on")
    gate.cli("domain", "route", "nosub.test", "--no-subdomains")
    wait_until(lambda: _rcpt(gate.port, "x@a.nosub.test")[0] == 550, 5, "subdomains off")


def test_a_listed_domain_with_subdomains_keeps_their_addresses(gate: Any) -> None:
    # The import keeps a subdomain's addresses (proxy addresses such as bob@eu.listsub.test).
    assert _rcpt(gate.port, "bob@eu.listsub.test")[0] == 250
    assert _rcpt(gate.port, "Bob+x@EU.listsub.test")[0] == 250
    assert _rcpt(gate.port, "alice@listsub.test")[0] == 250
    assert _rcpt(gate.port, "carol@eu.listsub.test")[0] == 550  # control: the list applies
    assert _rcpt(gate.port, "alice@eu.listsub.test")[0] == 550  # another domain's mailbox


def test_domains_fold_ascii_only_and_idn_by_a_label(gate: Any) -> None:
    assert _rcpt(gate.port, "user@KELVIN.test")[0] == 250  # control: ASCII case folds
    # U+212A KELVIN SIGN lowercases to "k" in Python, but it is not "k" to the DNS.
    assert _rcpt(gate.port, "user@\u212aelvin.test", utf8=True) == (550, "5.7.1 Relaying denied")
    queue_id = _send(gate.port, ["user@bücher.test", "other@xn--bcher-kva.test"], utf8=True)
    assert sorted(_queued(gate, queue_id)) == [
        ("other@xn--bcher-kva.test", "xn--bcher-kva.test", "held"),
        ("user@bücher.test", "xn--bcher-kva.test", "held"),
    ]
    assert _rcpt(gate.port, "user@BÜCHER.test", utf8=True)[0] == 550  # not a valid U-label


def test_domain_json_shows_the_gate(gate: Any, tmp_path: Path) -> None:
    shown = json.loads(gate.cli("domain", "show", "dash.test", "--json").stdout)
    assert (shown["plus_separator"], shown["subdomains"], shown["max_size"]) == ("-", False, None)
    bad = gate.cli("domain", "route", "dash.test", "--plus-separator", "@", check=False)
    assert bad.returncode == 2 and "--no-plus-addressing" in bad.stderr
