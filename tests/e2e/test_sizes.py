"""Sizes at intake: refuse only what the target would refuse, and say so at once.

Real `mxspool serve`, real smtplib. ``client.mail``/``rcpt``/``data`` are called one by one:
``sendmail`` would add SIZE= on its own, and the tests need to choose.
"""

from __future__ import annotations

import json
import re
import smtplib
from pathlib import Path
from typing import Any

import pytest

from tests.waiting import wait_until

ROUTE = ("--route", "127.0.0.1:9", "--tls", "off", "--hold")
KIB = 1024

CSV = (
    "#TYPE Deserialized.Microsoft.Exchange.Data.Directory.Management.Mailbox\n"
    '"PrimarySmtpAddress","EmailAddresses","MaxReceiveSize"\n'
    '"tiny@mbx.test","SMTP:tiny@mbx.test;smtp:t@mbx.test","16 KB (16,384 bytes)"\n'
    '"roomy@mbx.test","SMTP:roomy@mbx.test","Unlimited"\n'
    '"std@mbx.test","SMTP:std@mbx.test","36 MB (37,748,736 bytes)"\n'
    '"also@mbx.test","SMTP:also@mbx.test",""\n'
)


def _session(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    client.ehlo("client.test")
    return client


def _body(size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    return b"Subject: size\r\n\r\n" + line * (size // len(line) + 1)


def _queue(node: Any, *args: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(
        node.cli("queue", "list", "--json", "--limit", "1000", *args).stdout
    )
    return rows


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.conftest import Spooler

    root = tmp_path_factory.mktemp("sizes")
    spooler = Spooler(root)
    spooler.cli("domain", "add", "big.test", *ROUTE, "--max-size", "64KiB")
    spooler.cli("domain", "add", "small.test", *ROUTE, "--max-size", "32KiB")
    spooler.cli("domain", "add", "mbx.test", *ROUTE, "--profile", "exchange-online")
    export = root / "mailboxes.csv"
    export.write_text(CSV, encoding="utf-8")
    spooler.cli("recipients", "import", "mbx.test", str(export))
    spooler.start()
    yield spooler
    spooler.stop()


def test_size_is_advertised_and_mail_from_refuses_what_fits_no_domain(node: Any) -> None:
    # mbx.test's exchange-online profile caps at 150 MB, which is also [smtp]'s default.
    with _session(node.port) as client:
        assert client.esmtp_features["size"] == str(150 * 1024 * 1024)
    node.cli("domain", "route", "mbx.test", "--max-size", "48KiB")
    try:

        def advertised() -> str:
            with _session(node.port) as client:
                return client.esmtp_features["size"]

        wait_until(lambda: advertised() == str(64 * KIB), 5, "SIZE of the largest domain")
        with _session(node.port) as client:
            code, text = client.mail("s@src.test", [f"SIZE={64 * KIB + 1}"])
            assert (code, text) == (552, b"5.3.4 Message too big")
            assert client.mail("s@src.test", [f"SIZE={40 * KIB}"])[0] == 250
            code, text = client.rcpt("a@small.test")
            assert code == 552 and text.startswith(b"5.2.3"), text
            assert client.rcpt("a@big.test")[0] == 250
    finally:
        node.cli("domain", "route", "mbx.test", "--max-size", "none")
    wait_until(lambda: advertised() == str(150 * 1024 * 1024), 5, "the profile's 150 MB again")


def test_mailbox_limits_from_the_csv_at_rcpt(node: Any) -> None:
    with _session(node.port) as client:
        assert client.mail("s@src.test", [f"SIZE={40 * 1024 * 1024}"])[0] == 250
        assert client.rcpt("std@mbx.test")[0] == 552  # 36 MB (37,748,736 bytes)
        assert client.rcpt("roomy@mbx.test")[0] == 250  # Unlimited: the profile's 150 MB
        assert client.rcpt("also@mbx.test")[0] == 250  # no value: the same
        client.rset()
        assert client.mail("s@src.test", [f"SIZE={20 * KIB}"])[0] == 250
        code, text = client.rcpt("T+x@mbx.test")  # a proxy, with a plus tag: the same mailbox
        assert code == 552 and b"16384" in text, text
        assert client.rcpt("std@mbx.test")[0] == 250
        client.rset()
        assert client.mail("s@src.test", [f"SIZE={8 * KIB}"])[0] == 250
        assert client.rcpt("tiny@mbx.test")[0] == 250


def test_without_size_the_too_small_mailbox_is_parked_at_once(node: Any) -> None:
    with _session(node.port) as client:
        assert client.mail("s@src.test")[0] == 250
        assert client.rcpt("tiny@mbx.test")[0] == 250
        assert client.rcpt("roomy@mbx.test")[0] == 250
        code, text = client.data(_body(20 * KIB))
    assert code == 250, text
    queue_id = text.decode().rsplit(" ", 1)[-1]
    rows = {row["rcpt"]: row for row in _queue(node) if row["id"] == queue_id}
    assert rows["roomy@mbx.test"]["state"] == "held"
    tiny = rows["tiny@mbx.test"]
    assert tiny["state"] == "parked" and tiny["attempts"] == 0
    assert re.search(
        r"552 5\.2\.3 .*larger than this recipient takes \(16384 bytes\)", tiny["last_reply"]
    )
    assert [row["id"] for row in _queue(node, "--state", "parked")].count(queue_id) == 1
    status = node.domain_status("mbx.test")
    assert status["parked"] >= 1 and status["held"] >= 1
    report = node.cli("report", "--domain", "mbx.test", "--format", "json").stdout
    assert "larger than this recipient takes" in report


def test_larger_than_every_recipient_is_refused_and_nothing_stored(node: Any) -> None:
    before = len(_queue(node))
    with _session(node.port) as client:
        assert client.mail("s@src.test")[0] == 250
        assert client.rcpt("tiny@mbx.test")[0] == 250
        assert client.rcpt("a@small.test")[0] == 250
        code, text = client.data(_body(40 * KIB))  # over 16 KiB and over 32 KiB
        assert (code, text) == (552, b"5.3.4 Message too big")
        # Positive control: the same session stores a message that fits one of them.
        assert client.mail("s@src.test")[0] == 250
        assert client.rcpt("tiny@mbx.test")[0] == 250
        assert client.rcpt("a@small.test")[0] == 250
        assert client.data(_body(20 * KIB))[0] == 250
    rows = _queue(node)
    assert len(rows) == before + 2
    assert sorted(row["state"] for row in rows[before:]) == ["held", "parked"]


def test_recipient_csv_forms_are_parsed(tmp_path: Path) -> None:
    from mxspool.migrate.recipients import parse_max_size, parse_recipient_file

    assert parse_max_size("36 MB (37,748,736 bytes)") == 37_748_736
    assert parse_max_size("150 MB (157,286,400 bytes)") == 157_286_400
    assert parse_max_size("Unlimited") is None and parse_max_size("") is None
    assert parse_max_size("37748736") == 37_748_736 and parse_max_size("36 MB") == 37_748_736
    with pytest.raises(ValueError):
        parse_max_size("lots")
    parsed = parse_recipient_file(CSV.encode("utf-16"), "mbx.test")
    assert parsed.max_sizes == {
        "tiny@mbx.test": 16_384,
        "t@mbx.test": 16_384,
        "std@mbx.test": 37_748_736,
    }
    assert set(parsed.addresses) == {*parsed.max_sizes, "roomy@mbx.test", "also@mbx.test"}
    bad = parse_recipient_file(CSV.replace('"Unlimited"', '"huge"').encode(), "mbx.test")
    assert any("MaxReceiveSize 'huge'" in warning for warning in bad.warnings)
    assert "roomy@mbx.test" in bad.addresses and "roomy@mbx.test" not in bad.max_sizes
