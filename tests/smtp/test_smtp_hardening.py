"""Issue 14 hardening of the SMTP core: no control character from the client reaches a DSN or a
header (items 3), bounded and printable echoes, STARTTLS only after EHLO (item 9), and the hard
error limit (item 6): sans-IO probes, plus one end-to-end probe through `mxspool serve`."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import Spooler
from tests.smtp.listening import Listening, listening_intake
from tests.smtp.smtp_driver import codes, config, run
from tests.smtp_client import RawClient
from tests.waiting import eventually

from mxspool import metrics
from mxspool.config import SmtpConfig
from mxspool.delivery.bounce import build_dsn, read_original_headers
from mxspool.envelope import MailParams, RcptParams
from mxspool.intake.domains import DomainTable
from mxspool.smtp import events as ev
from mxspool.smtp import replies as R
from mxspool.smtp.server import NEED_DATA, PAUSED, ServerConnection, State
from mxspool.store.base import (
    ClientInfo,
    RecipientRecord,
    RecipientState,
    StoredMessage,
)
from mxspool.store.sqlite import SqliteStore

EHLO = b"EHLO client.example\r\n"
MAIL = b"MAIL FROM:<s@example.org>\r\n"
RCPT = b"RCPT TO:<u@example.com>\r\n"
PROBE = b"MAIL FROM:<a@b.example> ENVID=abc+0D+0AX-Injected:+20yes\r\n"
TOO_MANY = b"421 4.7.0 mx.example.net Error: too many errors\r\n"


def reply_lines(out: bytes) -> list[bytes]:
    assert out.endswith(b"\r\n"), out
    return out[:-2].split(b"\r\n")


def assert_safe_replies(out: bytes) -> None:
    """Every reply line: <= 512 octets with its CRLF, printable US-ASCII, no bare CR/LF."""
    for line in reply_lines(out):
        assert len(line) + 2 <= 512, len(line)
        assert all(0x20 <= b <= 0x7E for b in line), line


# -- item 3: control characters never reach a DSN or a header --------------------------------


def test_envid_header_injection_probe_refused() -> None:
    events, out, conn = run([EHLO + PROBE + MAIL])
    assert reply_lines(out)[-2] == (
        b"501 5.5.4 Bad ENVID parameter: the decoded value must be printable US-ASCII "
        b"(no control characters)"
    )
    mails = [e for e in events if isinstance(e, ev.MailFrom)]
    assert [m.path.address for m in mails] == ["s@example.org"]  # only the clean MAIL
    assert conn.mail_params.envid is None and conn.errors == 1


@pytest.mark.parametrize("code", [0x00, 0x09, 0x0A, 0x0D, 0x1B, 0x1F, 0x7F, 0x85, 0xFF])
def test_envid_with_any_encoded_control_refused(code: int) -> None:
    line = b"MAIL FROM:<a@b.example> ENVID=x+%02Xy\r\n" % code
    _, out, conn = run([EHLO + line])
    assert out.endswith(
        b"501 5.5.4 Bad ENVID parameter: the decoded value must be printable "
        b"US-ASCII (no control characters)\r\n"
    )
    assert conn.state is State.READY


def test_legal_envid_and_orcpt_accepted_as_received() -> None:
    line = b"MAIL FROM:<a@b.example> ENVID=id+20with+2Bplus RET=HDRS\r\n"
    rcpt = b"RCPT TO:<u@example.com> ORCPT=rfc822;u+40example.com NOTIFY=FAILURE\r\n"
    _, out, conn = run([EHLO + line + rcpt])
    assert codes(out) == [250, 250, 250]
    assert conn.mail_params.envid == "id+20with+2Bplus"  # stored still xtext-encoded
    assert conn.recipients[0].params.orcpt == "rfc822;u+40example.com"


@pytest.mark.parametrize(
    "orcpt",
    [
        b"rfc822;u+0D+0AX-Injected:+20yes@example.com",
        b"rfc822;u+00@example.com",
        b"rfc822;u+7F@example.com",
        b"rfc822;u+C3+A9@example.com",  # decoded bytes outside US-ASCII
        b"utf-8;u\\x{0D}\\x{0A}X-Injected@example.com",  # RFC 6533 escapes of CR LF
        b"utf-8;u\\x{85}@example.com",
    ],
)
def test_orcpt_with_control_refused(orcpt: bytes) -> None:
    _, out, conn = run([EHLO + MAIL + b"RCPT TO:<u@example.com> ORCPT=" + orcpt + b"\r\n"])
    assert out.endswith(
        b"501 5.5.4 Bad ORCPT parameter: the decoded value must be printable "
        b"US-ASCII (no control characters)\r\n"
    )
    assert conn.recipients == []


@pytest.mark.parametrize(
    "name",
    [b"a\x01b", b"a\tb", b"a\x7fb", b"a\x1b[2Jb", b"a\xc2\x85b", b"a\xe2\x80\xa8b", b"a\xc2\x9bb"],
)
def test_helo_names_with_controls_refused(name: bytes) -> None:
    for verb in (b"EHLO ", b"HELO "):
        events, out, conn = run([verb + name + b"\r\n"])
        assert out == R.HELO_CONTROL_CHARACTER.to_bytes()
        assert conn.helo_name is None and conn.state is State.INIT
        assert not any(isinstance(e, ev.Hello) for e in events)
    # positive control: a UTF-8 name without controls is taken
    _, out, conn = run([b"EHLO h\xc3\xa9.example\r\n"])
    assert codes(out) == [250] and conn.helo_name == "hé.example"


@pytest.mark.parametrize(
    "path",
    [
        b"<a\x01@b.example>",
        b"<a@b\x7f.example>",
        b'<"a\x0bb"@b.example>',
        b"<a@[1.2.3.4\x00]>",
        b"<a\xc2\x85@b.example>",
        b"<a\xe2\x80\xa8@b.example>",
        b"<a@b\xe2\x80\xa9.example>",
    ],
)
def test_addresses_with_controls_refused(path: bytes) -> None:
    _, out, conn = run([EHLO + b"MAIL FROM:" + path + b" SMTPUTF8\r\n"])
    assert codes(out)[-1] in (500, 501), out  # NUL is refused for the whole line (500)
    assert conn.state is State.READY
    _, out, conn = run([EHLO + b"MAIL FROM:<> SMTPUTF8\r\nRCPT TO:" + path + b"\r\n"])
    assert codes(out)[-1] in (500, 501) and conn.recipients == []


def test_dsn_keeps_a_legal_envid_and_escapes_a_stored_hostile_one() -> None:
    def message(envid: str, orcpt: str) -> StoredMessage:
        recipient = RecipientRecord(
            1, "u@example.test", "example.test", RcptParams(orcpt=orcpt),
            RecipientState.PARKED, False, 1, 0.0, "550 5.1.1 no such user", None, 0.0,
        )  # fmt: skip
        return StoredMessage(
            "Q1", 0.0, "s@src.test", MailParams(envid=envid), 10, "", None,
            ClientInfo("127.0.0.1", "c"), (), (recipient,),
        )  # fmt: skip

    dsn = build_dsn(message("legal+20id+2Bx", "rfc822;u+40example.test"), b"Subject: x\r\n", "mx")
    assert b"\r\nOriginal-Envelope-Id: legal id+x\r\n" in dsn
    assert b"\r\nOriginal-Recipient: rfc822; u@example.test\r\n" in dsn
    # A value stored before the core refused controls (or by another path) stays on its line.
    hostile = build_dsn(
        message("abc+0D+0AX-Injected:+20yes", "rfc822;u+0D+0AX-Orcpt:+20yes"), b"S: x\r\n", "mx"
    )
    assert b"\r\nOriginal-Envelope-Id: abc+0D+0AX-Injected: yes\r\n" in hostile
    assert b"\r\nOriginal-Recipient: rfc822; u+0D+0AX-Orcpt: yes\r\n" in hostile
    report = email.message_from_bytes(hostile, policy=email.policy.default)
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    text = status.as_bytes()
    assert b"\nX-Injected" not in text and b"\nX-Orcpt" not in text


# -- item 9: bounded, printable echoes; STARTTLS needs EHLO ----------------------------------


def test_unknown_parameter_echo_is_truncated() -> None:
    keyword = b"X" * 900
    _, out, _ = run([EHLO + b"MAIL FROM:<a@b.example> " + keyword + b"=1\r\n"])
    last = reply_lines(out)[-1]
    assert last == b"555 5.5.4 Unsupported parameter: " + b"X" * 64 + b"..."
    assert_safe_replies(out)


@pytest.mark.parametrize(
    "command",
    [
        b"MAIL FROM:<a@b.example> " + b"K" * 980,  # over-long unknown keyword
        b"MAIL FROM:<a@b.example> " + b"\x01\x1b[31m\x7f=1",  # controls in a bad keyword
        b"MAIL FROM:<a@b.example> SIZE=1 " + b"Z" * 900 + b" " + b"Z" * 900,  # one line
        b"MAIL FROM:<a@b.example> " + b"D" * 490 + b" " + b"D" * 490,  # duplicate keyword
        b"MAIL FROM:<a@b.example> \xc3\xa9\xe2\x80\xa8=1",  # non-ASCII keyword
        b"RCPT TO:<u@example.com> " + b"R" * 980 + b"=\x01",
        b"EHLO " + b"\x01" * 500,
        b"\x1b[2J" * 100,
    ],
)
def test_replies_never_echo_controls_or_exceed_512(command: bytes) -> None:
    prefix = EHLO + MAIL if command.startswith(b"RCPT") else EHLO
    _, out, _ = run([prefix + command + b"\r\n"])
    assert codes(out)[-1] in (500, 501, 555), out[-200:]
    assert_safe_replies(out)


def test_starttls_before_ehlo_refused() -> None:
    _, out, conn = run([b"STARTTLS\r\n"])
    assert out == b"503 5.5.1 Send EHLO first\r\n" and not conn.tls_active
    _, out, conn = run([b"HELO c.example\r\nSTARTTLS\r\n"])  # HELO advertises nothing
    assert codes(out) == [250, 503] and not conn.tls_active
    events, out, conn = run([b"STARTTLS\r\n" + EHLO + b"STARTTLS\r\n"])
    assert codes(out) == [503, 250, 220] and conn.tls_active
    assert sum(isinstance(e, ev.StartTLS) for e in events) == 1
    # not offered at all: still 502, whatever was said before
    _, out, _ = run([b"STARTTLS\r\n"], tls_available=False)
    assert out == R.STARTTLS_NOT_OFFERED.to_bytes()


# -- item 6: hard error limit -------------------------------------------------------------


def drain(conn: ServerConnection, decide: Any = None) -> list[object]:
    out: list[object] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return out
        assert event is not PAUSED
        out.append(event)
        if isinstance(event, ev.DECISION_EVENTS):
            reply = decide(event) if decide else None
            conn.respond(reply) if reply else conn.accept()


def test_error_limit_closes_after_the_twentieth_error_and_runs_nothing_after() -> None:
    conn = ServerConnection(config())
    assert conn.config.hard_error_limit == 20
    conn.receive_data(EHLO + b"BOGUS\r\n" * 19 + b"NOOP\r\nBOGUS\r\n" + MAIL + b"NOOP\r\n")
    events = drain(conn)
    out = conn.data_to_send()
    assert codes(out) == [250] + [500] * 19 + [250, 500, 421]
    assert out.endswith(b"500 5.5.1 Command unrecognized\r\n" + TOO_MANY)
    assert conn.closed_for_errors and conn.state is State.CLOSED
    assert isinstance(events[-1], ev.Quit)
    assert not any(isinstance(e, ev.MailFrom) for e in events)  # the pipelined MAIL never ran
    conn.receive_data(b"NOOP\r\n")
    assert drain(conn) == [] and conn.data_to_send() == b""


def test_error_limit_positive_control_nineteen_errors_keep_the_session() -> None:
    _, out, conn = run([EHLO + b"BOGUS\r\n" * 19 + MAIL + RCPT])
    assert codes(out) == [250] + [500] * 19 + [250, 250]
    assert not conn.closed_for_errors and conn.state is State.MAIL and conn.errors == 19


def test_error_limit_counts_application_refusals_including_4xx() -> None:
    """Recipient harvesting: the application's 550/450 to RCPT count (respond() path)."""
    conn = ServerConnection(config(hard_error_limit=5))
    replies = iter([R.RELAY_DENIED, R.Reply(450, "4.2.0", "Try later")] * 3)

    def decide(event: object) -> R.Reply | None:
        return next(replies) if isinstance(event, ev.RcptTo) else None

    rcpts = b"".join(b"RCPT TO:<u%d@example.com>\r\n" % i for i in range(8))
    conn.receive_data(EHLO + MAIL + rcpts)
    events = drain(conn, decide)
    out = conn.data_to_send()
    assert codes(out) == [250, 250, 550, 450, 550, 450, 550, 421]
    assert conn.closed_for_errors and isinstance(events[-1], ev.Quit)
    assert sum(isinstance(e, ev.RcptTo) for e in events) == 5  # the rest never asked


def test_error_limit_ignores_recipient_overshoot_and_resets_on_a_delivered_message() -> None:
    rcpts = b"".join(b"RCPT TO:<u%d@example.com>\r\n" % i for i in range(12))
    body = b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n"
    _, out, conn = run([EHLO + MAIL + rcpts + body], max_recipients=5, hard_error_limit=3)
    assert codes(out) == [250, 250] + [250] * 5 + [452] * 7 + [354, 250]
    assert not conn.closed_for_errors
    # two errors, a delivered message forgives them, two more: still open; a third closes
    session = EHLO + b"BOGUS\r\n" * 2 + MAIL + RCPT + body + b"BOGUS\r\n" * 2
    _, out, conn = run([session], hard_error_limit=3)
    assert codes(out) == [250, 500, 500, 250, 250, 354, 250, 500, 500]
    assert not conn.closed_for_errors and conn.errors == 2
    _, out, conn = run([session + b"BOGUS\r\n"], hard_error_limit=3)
    assert out.endswith(TOO_MANY) and conn.closed_for_errors


def test_error_limit_counts_refused_content_and_zero_disables() -> None:
    body = b"DATA\r\nbare\nlf\r\n.\r\n"
    _, out, conn = run([EHLO + (MAIL + RCPT + body) * 2], hard_error_limit=2)
    assert codes(out) == [250, 250, 250, 354, 500, 250, 250, 354, 500, 421]
    assert conn.closed_for_errors
    _, out, conn = run([EHLO + b"BOGUS\r\n" * 100 + b"NOOP\r\n"], hard_error_limit=0)
    assert codes(out) == [250] + [500] * 100 + [250] and not conn.closed_for_errors


def test_error_limit_in_a_later_input_piece_and_while_paused() -> None:
    """The 421 also comes when the limit is reached by respond() with input still buffered."""
    conn = ServerConnection(config(hard_error_limit=2))
    conn.receive_data(EHLO + b"BOGUS\r\n" + MAIL)
    assert isinstance(conn.next_event(), ev.Hello)
    assert isinstance(conn.next_event(), ev.ProtocolError)
    assert isinstance(conn.next_event(), ev.MailFrom)
    conn.receive_data(RCPT + b"DATA\r\n")  # arrives while the application decides
    conn.respond(R.INSUFFICIENT_STORAGE)
    assert isinstance(conn.next_event(), ev.Quit)
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send().endswith(b"452 4.3.1 Insufficient storage\r\n" + TOO_MANY)


# -- end to end through `mxspool serve` ---------------------------------------------------


def _stored(node: Spooler) -> list[tuple[str, str]]:
    conn = sqlite3.connect(node.db)
    try:
        return [(r[0], r[1]) for r in conn.execute("SELECT mail_from, mail_params FROM messages")]
    finally:
        conn.close()


async def test_end_to_end_injection_refused_and_legal_envid_reaches_the_dsn(
    spooler: Spooler,
) -> None:
    client = RawClient(spooler.port)
    assert client.reply()[0] == 220
    assert client.command("EHLO probe.client")[0] == 250
    code, text = client.command(b"MAIL FROM:<evil@src.test> ENVID=abc+0D+0AX-Injected:+20yes")
    assert (code, text) == (
        501,
        "5.5.4 Bad ENVID parameter: the decoded value must be printable US-ASCII "
        "(no control characters)",
    )
    # the session goes on: RCPT has no transaction, ORCPT injection refused as well
    assert client.command("RCPT TO:<u@example.test>")[0] == 503
    assert client.command("MAIL FROM:<good@src.test> ENVID=legal+2Bid")[0] == 250
    code, text = client.command(b"RCPT TO:<u@example.test> ORCPT=rfc822;x+0D+0AX-Bad:+20y")
    assert code == 501 and text.startswith("5.5.4 Bad ORCPT parameter")
    assert client.command("RCPT TO:<u@example.test> ORCPT=rfc822;u+40example.test")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(b"Subject: legal\r\n\r\nbody\r\n.\r\n")
    code, text = client.reply()
    assert code == 250, text
    queue_id = text.rsplit(" ", 1)[-1]
    assert client.command("QUIT")[0] == 221
    client.close()
    stored = _stored(spooler)
    assert [sender for sender, _ in stored] == ["good@src.test"]  # nothing of the probe
    assert "Injected" not in repr(stored)
    store = SqliteStore(f"sqlite:///{spooler.db}")
    await store.open()
    try:
        message = await store.get_message(queue_id)
        assert message is not None
        dsn = build_dsn(message, await read_original_headers(store, queue_id), "mx.test.local")
    finally:
        await store.close()
    assert b"\r\nOriginal-Envelope-Id: legal+id\r\n" in dsn
    assert b"\r\nOriginal-Recipient: rfc822; u@example.test\r\n" in dsn


# -- an internal error while a connection is set up: 421 4.3.0, never a silent close ----------

INTERNAL_ERROR = "4.3.0 mx.test.local Error: internal error, try again later"


@pytest.fixture
async def listening(tmp_path: Path) -> AsyncIterator[Listening]:
    config = SmtpConfig(hostname="mx.test.local", max_connections_per_ip=1)
    async with listening_intake(tmp_path, config) as served:
        yield served


def _rejected(reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value("mxspool_smtp_rejected_total", {"reason": reason})
    return value or 0.0


def _refused(port: int) -> tuple[tuple[int, str], bool]:
    """Connect: the first reply, and whether the server then closed the connection."""
    client = RawClient(port)
    try:
        return client.reply(), client.closed_by_peer()
    finally:
        client.close()


def _deliver(port: int, during: Any = None) -> str:
    """A whole session, greeting to QUIT, that queues one message; its queue id.
    ``during`` is called while the session is open."""
    client = RawClient(port)
    try:
        assert client.reply()[0] == 220
        if during is not None:
            during()
        assert client.command("EHLO probe.client")[0] == 250
        assert client.command("MAIL FROM:<s@src.test>")[0] == 250
        assert client.command("RCPT TO:<u@example.test>")[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(b"Subject: after the fault\r\n\r\nbody\r\n.\r\n")
        code, text = client.reply()
        assert code == 250, text
        assert client.command("QUIT")[0] == 221
        return text.rsplit(" ", 1)[-1]
    finally:
        client.close()


class _UnreadableTable(DomainTable):
    """A domain table whose generation cannot be read: building a session fails."""

    @property  # type: ignore[override]
    def generation(self) -> int:
        raise RuntimeError("session_config is broken")

    @generation.setter
    def generation(self, value: int) -> None:
        pass


def _setup_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "mxspool.intake.listener" and "internal error setting up" in r.getMessage()
    ]


async def test_a_session_that_cannot_be_built_answers_421_and_the_next_one_is_served(
    listening: Listening, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    intake = listening.intake
    # The fault is planted in the domain table (interpreted), which every new session's
    # configuration reads: the intake itself may be compiled (mypyc), and its methods cannot
    # be replaced on a compiled object.
    monkeypatch.setattr(intake, "domains", _UnreadableTable())
    before = _rejected("internal_error")
    caplog.set_level(logging.ERROR, "mxspool.intake.listener")
    reply, closed = await asyncio.to_thread(_refused, listening.port)
    assert reply == (421, INTERNAL_ERROR)
    assert closed  # end of stream right after the 421
    assert _rejected("internal_error") == before + 1
    [record] = _setup_errors(caplog)  # logged once, with the traceback and what to do
    assert record.exc_info is not None and "session_config is broken" in str(record.exc_info[1])
    assert "421 4.3.0" in record.getMessage() and "report" in record.getMessage()
    assert intake.slots.open == 0 and not intake.connections  # no slot was ever held

    monkeypatch.undo()  # positive control: the fault gone, the next client is served
    queue_id = await asyncio.to_thread(_deliver, listening.port)
    assert await listening.store.get_message(queue_id) is not None
    assert _rejected("internal_error") == before + 1
    assert len(_setup_errors(caplog)) == 1


async def test_a_failure_after_the_slot_is_taken_answers_421_and_gives_the_slot_back(
    listening: Listening, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    intake = listening.intake
    names = intake.names
    assert names is not None and intake.config.max_connections_per_ip == 1
    held: list[tuple[int, dict[str, int], bool]] = []

    def broken(address: str, listener: Any) -> None:
        held.append((intake.slots.open, dict(intake.slots.per_key), bool(intake.connections)))
        raise RuntimeError("reverse lookup is broken")

    monkeypatch.setattr(names, "look_up", broken)
    before = _rejected("internal_error")
    caplog.set_level(logging.ERROR, "mxspool.intake.listener")
    reply, closed = await asyncio.to_thread(_refused, listening.port)
    assert reply == (421, INTERNAL_ERROR)
    assert closed
    assert held == [(1, {"127.0.0.1": 1}, True)]  # it failed while holding the slot
    assert _rejected("internal_error") == before + 1
    [record] = _setup_errors(caplog)
    assert record.exc_info is not None and "reverse lookup is broken" in str(record.exc_info[1])
    assert "127.0.0.1" in record.getMessage() and "421 4.3.0" in record.getMessage()

    def given_back() -> bool:
        return intake.slots.open == 0 and not intake.slots.per_key and not intake.connections

    await eventually(given_back, what="the slot given back")

    # Positive control, with max_connections_per_ip = 1: the next client is served, and while
    # it is, exactly one slot is counted (a slot given back twice would show 0 here).
    monkeypatch.undo()
    during: list[tuple[int, dict[str, int]]] = []
    queue_id = await asyncio.to_thread(
        _deliver,
        listening.port,
        lambda: during.append((intake.slots.open, dict(intake.slots.per_key))),
    )
    assert during == [(1, {"127.0.0.1": 1})]
    assert await listening.store.get_message(queue_id) is not None
    await eventually(given_back, what="the second slot given back")
    assert len(_setup_errors(caplog)) == 1


# -- found by the fuzzer (test_smtp_stateful.py) --------------------------------------------


def test_normalize_over_long_line_ends_at_a_bare_cr() -> None:
    """In "normalize" mode a bare CR ends a line, also an over-long one: the core used to skip
    an over-long line through the next LF, swallowing the command after a bare CR when the CR
    came later than 512 octets in (and only then)."""
    for length in (505, 600, 2000):
        for pieces in ([b"X" * length + b"\rNOOP\r\n"], [b"X" * length + b"\r", b"NOOP\r\n"]):
            _, out, _ = run(pieces, bare_newlines="normalize")
            assert codes(out) == [500, 250], (length, pieces[-1])
    # a CRLF that arrives split after an over-long line is one line end, not an empty command
    _, out, _ = run([b"X" * 600 + b"\r", b"\nNOOP\r\n"], bare_newlines="normalize")
    assert codes(out) == [500, 250]
    _, out, _ = run([b"X" * 600 + b"\rNOOP\r\n"], bare_newlines="reject")
    assert codes(out) == [500]  # reject mode: one line through the LF, as before


def _faulted(port: int, data_ends: bool) -> tuple[tuple[int, str], bool]:
    """A session up to RCPT (or, with ``data_ends``, to the end of DATA): the reply there, and
    whether the server then closed the connection."""
    client = RawClient(port)
    try:
        assert client.reply()[0] == 220
        assert client.command("EHLO probe.client")[0] == 250
        assert client.command("MAIL FROM:<s@src.test>")[0] == 250
        if not data_ends:
            return client.command("RCPT TO:<u@example.test>"), client.closed_by_peer()
        assert client.command("RCPT TO:<u@example.test>")[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(b"Subject: committed\r\n\r\nbody\r\n.\r\n")
        return client.reply(), client.closed_by_peer()
    finally:
        client.close()


@pytest.mark.parametrize("where", ["serving", "answering the commit"])
async def test_a_fault_in_a_session_answers_421_and_the_next_one_is_served(
    listening: Listening,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:
    # A defect of ours at RCPT (handling input) or after the durable commit (answering it):
    # 421 4.3.0 and a close, not asyncio's silent close nor a session left waiting for its 250
    # (and holding its slot) forever.
    intake = listening.intake

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{where} is broken")

    # Planted in what the (possibly compiled) session calls through an interpreted object: the
    # domain table at RCPT, the metrics module once the commit is durable.
    if where == "serving":
        monkeypatch.setattr(intake.domains, "find", broken)
    else:
        monkeypatch.setattr(metrics, "message_accepted", broken)
    before = _rejected("internal_error")
    caplog.set_level(logging.ERROR, "mxspool.intake.listener")
    reply, closed = await asyncio.to_thread(_faulted, listening.port, where != "serving")
    assert reply == (421, INTERNAL_ERROR)
    assert closed
    assert _rejected("internal_error") == before + 1
    [record] = [r for r in caplog.records if f"{where} is broken" in str(r.exc_info)]
    assert "421 4.3.0" in record.getMessage() and "127.0.0.1" in record.getMessage()

    def given_back() -> bool:
        return intake.slots.open == 0 and not intake.connections

    await eventually(given_back, what="the slot given back")
    queued = await listening.store.list_queue()
    # After the commit the message is stored (the sender retries: at worst it arrives twice).
    assert len(queued) == (0 if where == "serving" else 1)

    monkeypatch.undo()  # positive control: the next client is served
    queue_id = await asyncio.to_thread(_deliver, listening.port)
    assert await listening.store.get_message(queue_id) is not None
    assert _rejected("internal_error") == before + 1
