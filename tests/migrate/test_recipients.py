"""Recipient lists: parsing Exchange Online exports, the CLI, and 550 5.1.1 from a live spooler."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from mxspool.migrate.recipients import RecipientFileError, parse_recipient_file
from tests.smtp_client import RawClient

DOMAIN = "example.test"

# As Get-Recipient | Select PrimarySmtpAddress,@{n='EmailAddresses';e={...-join ';'}} |
# Export-Csv writes it in Windows PowerShell 5.1 (with its #TYPE line), plus a row whose
# proxies are space-separated, a mail contact of another domain and a room mailbox.
GET_RECIPIENT_CSV = (
    "#TYPE Selected.Microsoft.Exchange.Data.Directory.Management.ReducedRecipient\r\n"
    '"Name","RecipientType","PrimarySmtpAddress","EmailAddresses"\r\n'
    '"Alice Example","UserMailbox","Alice@example.test",'
    '"SMTP:Alice@example.test;smtp:alice.smith@example.test;'
    "smtp:alice@example.onmicrosoft.com;X500:/o=ExchangeLabs/ou=x/cn=Recipients/cn=alice;"
    'SIP:alice@example.test"\r\n'
    '"Bob","UserMailbox","bob@example.test","SMTP:bob@example.test smtp:robert@example.test"\r\n'
    '"Partner","MailContact","someone@partner.test","SMTP:someone@partner.test"\r\n'
    '"Room 1","UserMailbox","room1@example.test",""\r\n'
)


def test_parse_get_recipient_csv() -> None:
    parsed = parse_recipient_file(GET_RECIPIENT_CSV.encode("utf-8-sig"), DOMAIN)
    assert parsed.format == "csv"
    assert parsed.rows == 4
    assert parsed.addresses == (
        "alice.smith@example.test",
        "alice@example.test",
        "bob@example.test",
        "robert@example.test",
        "room1@example.test",
    )
    # onmicrosoft.com and partner.test addresses are not this domain's.
    assert parsed.skipped_other_domains == 2


def test_parse_utf16_csv_and_unexpanded_proxy_column() -> None:
    text = (
        '"PrimarySmtpAddress","EmailAddresses"\r\n'
        '"carol@example.test","Microsoft.Exchange.Data.ProxyAddressCollection"\r\n'
    )
    parsed = parse_recipient_file(text.encode("utf-16"), DOMAIN)
    assert parsed.addresses == ("carol@example.test",)
    assert any("EmailAddresses" in warning for warning in parsed.warnings)


def test_parse_plain_list_and_reject_garbage() -> None:
    parsed = parse_recipient_file(
        b"# exported by hand\nDave@Example.test\n\n<erin@example.test>\nx@other.test\n", DOMAIN
    )
    assert parsed.format == "list"
    assert parsed.addresses == ("dave@example.test", "erin@example.test")
    assert parsed.skipped_other_domains == 1
    with pytest.raises(RecipientFileError, match="line 2"):
        parse_recipient_file(b"ok@example.test\nnot an address\n", DOMAIN)
    with pytest.raises(RecipientFileError, match="no addresses"):
        parse_recipient_file(b"\n\n", DOMAIN)


def _rcpt(port: int, address: str) -> tuple[int, str]:
    client = RawClient(port)
    try:
        client.reply()
        client.command("EHLO client.test")
        client.command("MAIL FROM:<sender@src.test>")
        return client.command(f"RCPT TO:<{address}>")
    finally:
        client.close()


def _wait_for(port: int, address: str, code: int) -> tuple[int, str]:
    deadline = time.monotonic() + 10
    while True:
        reply = _rcpt(port, address)
        if reply[0] == code or time.monotonic() > deadline:
            return reply
        time.sleep(0.1)


def test_import_csv_then_unknown_recipients_get_550_5_1_1(spooler: Any, tmp_path: Path) -> None:
    # Before any list every address of the domain is accepted.
    assert _rcpt(spooler.port, "nobody@example.test")[0] == 250
    export = tmp_path / "recipients.csv"
    export.write_text(GET_RECIPIENT_CSV, encoding="utf-8")
    result = spooler.cli("recipients", "import", DOMAIN, str(export), "--json")
    summary = json.loads(result.stdout)
    assert summary["found"] == 5 and summary["total"] == 5

    started = time.monotonic()
    code, text = _wait_for(spooler.port, "nobody@example.test", 550)
    assert (code, text) == (550, "5.1.1 Recipient unknown")
    # The intake reads the domains' generation four times a second; a loaded machine may stall
    # it for a moment, so the bound here is looser than the design's quarter second.
    assert time.monotonic() - started < 5.0, "the intake must see a new list within seconds"
    # Listed addresses, primary or proxy, in any case, are accepted.
    for address in ("alice@example.test", "ALICE.Smith@Example.Test", "robert@example.test"):
        assert _rcpt(spooler.port, address)[0] == 250, address
    # Other domains are not affected by example.test's list.
    assert _rcpt(spooler.port, "nobody@example.org")[0] == 250
    # Outside the configured domains the answer stays "relaying denied".
    assert _rcpt(spooler.port, "someone@partner.test")[0] == 550

    listed = json.loads(spooler.cli("recipients", "list", DOMAIN, "--json").stdout)
    assert "bob@example.test" in listed and len(listed) == 5
    cleared = spooler.cli("recipients", "clear", DOMAIN)
    assert "removed 5 addresses" in cleared.stdout
    assert _wait_for(spooler.port, "nobody@example.test", 250)[0] == 250
    actions = [entry["action"] for entry in json.loads(spooler.cli("audit", "--json").stdout)]
    assert "recipients.import" in actions and "recipients.clear" in actions


def test_import_errors_say_what_to_do(spooler_factory: Any, tmp_path: Path) -> None:
    node = spooler_factory()
    missing = node.cli("recipients", "import", "unknown.test", str(tmp_path / "x.csv"), check=False)
    assert missing.returncode == 1 and "mxspool domain add" in missing.stderr
    node.cli("domain", "add", DOMAIN, "--route", "127.0.0.1:2526", "--tls", "off")
    unreadable = node.cli("recipients", "import", DOMAIN, str(tmp_path / "x.csv"), check=False)
    assert unreadable.returncode == 2 and "cannot read" in unreadable.stderr
    other = tmp_path / "other.txt"
    other.write_text("a@other.test\n")
    empty = node.cli("recipients", "import", DOMAIN, str(other), check=False)
    assert empty.returncode == 1 and "no address in example.test" in empty.stderr
