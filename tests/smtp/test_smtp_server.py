from __future__ import annotations

import pytest
from smtp_driver import codes, config, run

from mxspool.smtp import events as ev
from mxspool.smtp import replies as R
from mxspool.smtp.server import NEED_DATA, PAUSED, ServerConnection, State

EHLO = b"EHLO client.example\r\n"
MAIL = b"MAIL FROM:<s@example.org>\r\n"
RCPT = b"RCPT TO:<r@example.com>\r\n"


def replies_for(raw: bytes, **kw: object) -> bytes:
    return run([raw], **kw)[1]


def last_reply(raw: bytes, **kw: object) -> bytes:
    out = replies_for(raw, **kw)
    lines = out.split(b"\r\n")[:-1]
    return lines[-1] + b"\r\n"


def test_greeting() -> None:
    conn = ServerConnection(config())
    assert conn.greeting() == b"220 mx.example.net ESMTP mxspool\r\n"


def test_ehlo_advertises_in_order() -> None:
    out = replies_for(EHLO)
    assert out == (
        b"250-mx.example.net\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250-8BITMIME\r\n"
        b"250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250 STARTTLS\r\n"
    )
    assert b"STARTTLS" not in replies_for(EHLO, tls_available=False)


def test_helo() -> None:
    events, out, conn = run([b"HELO client.example\r\n"])
    assert out == b"250 mx.example.net\r\n"
    assert events == [ev.Hello("client.example", extended=False)]
    assert conn.state is State.READY and not conn.extended


@pytest.mark.parametrize("cmd", [b"EHLO\r\n", b"HELO \r\n", b"EHLO a\tb\r\n"])
def test_hello_syntax(cmd: bytes) -> None:
    assert last_reply(cmd).startswith(b"501 5.5.4 ")


def test_helo_forbids_esmtp_params() -> None:
    raw = b"HELO c\r\nMAIL FROM:<a@b.example> SIZE=10\r\nMAIL FROM:<a@b.example>\r\n"
    out = replies_for(raw)
    assert codes(out) == [250, 555, 250]


@pytest.mark.parametrize(
    ("raw", "reply"),
    [
        (b"NOOP\r\n", b"250 2.0.0 Ok\r\n"),
        (b"noop anything\r\n", b"250 2.0.0 Ok\r\n"),
        (b"VRFY root\r\n", R.CANNOT_VRFY.to_bytes()),
        (b"EXPN staff\r\n", b"502 5.5.1 EXPN not available\r\n"),
        (b"HELP\r\n", R.HELP.to_bytes()),
        (b"AUTH PLAIN AAAA\r\n", b"502 5.5.1 AUTH not available\r\n"),
        (b"BDAT 10 LAST\r\n", b"502 5.5.1 Command not implemented\r\n"),
        (b"FOO\r\n", b"500 5.5.1 Command unrecognized\r\n"),
        (b"\r\n", R.EMPTY_COMMAND.to_bytes()),
        (b"NO\x00OP\r\n", R.NUL_NOT_ALLOWED.to_bytes()),
        (b"MAIL FROM:<a@b.example>\r\n", b"503 5.5.1 Send HELO/EHLO first\r\n"),
        (EHLO + RCPT, b"503 5.5.1 Need MAIL command\r\n"),
        (EHLO + b"DATA\r\n", b"503 5.5.1 Need MAIL command\r\n"),
        (EHLO + MAIL + b"DATA\r\n", b"503 5.5.1 Need RCPT command\r\n"),
        (EHLO + MAIL + MAIL, b"503 5.5.1 Nested MAIL command\r\n"),
        (EHLO + MAIL + RCPT + b"DATA x\r\n", b"501 5.5.4 Syntax: DATA\r\n"),
        (EHLO + b"RSET x\r\n", b"501 5.5.4 Syntax: RSET\r\n"),
        (b"VRFY\r\n", b"501 5.5.4 Syntax: VRFY address\r\n"),
        (EHLO + b"MAIL FROM:<a@@b>\r\n", b"501 5.1.7 Bad sender address syntax\r\n"),
        (EHLO + MAIL + b"RCPT TO:<>\r\n", b"501 5.1.3 Bad recipient address syntax\r\n"),
        (EHLO + b"MAIL TO:<a@b>\r\n", b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
        (EHLO + b"MAIL FROM:<a@b> SIZE=-1\r\n", b"501 5.5.4 Bad parameter: SIZE\r\n"),
        (EHLO + b"MAIL FROM:<a@b> FOO=1\r\n", b"555 5.5.4 Unsupported parameter: FOO\r\n"),
        (
            EHLO + b"MAIL FROM:<a@b> BODY=BINARYMIME\r\n",
            b"555 5.5.4 Unsupported parameter: BODY=BINARYMIME\r\n",
        ),
        (EHLO + b"MAIL FROM:<a@b\x00>\r\n", R.NUL_NOT_ALLOWED.to_bytes()),
        (EHLO + b"MAIL FROM:<a@b\x01>\r\n", b"501 5.1.7 Bad sender address syntax\r\n"),
        (EHLO + b"MAIL FROM:<\xff@b>\r\n", b"501 5.5.4 Invalid UTF-8 in command\r\n"),
        (b"QUIT\r\n", b"221 2.0.0 Bye\r\n"),
    ],
)
def test_command_replies(raw: bytes, reply: bytes) -> None:
    assert last_reply(raw) == reply


def test_mail_rcpt_data_flow_and_accept_defaults() -> None:
    events, out, conn = run([EHLO + b"MAIL FROM: <>\r\n" + RCPT + b"DATA\r\nhi\r\n.\r\n"])
    assert out.endswith(
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        b"250 2.0.0 Ok: queued\r\n"
    )
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Hello", "MailFrom", "RcptTo", "DataStart", "DataChunk", "MessageComplete"]
    mail = events[1]
    assert isinstance(mail, ev.MailFrom) and mail.path.null
    assert conn.state is State.READY


def test_utf8_requires_smtputf8() -> None:
    utf8_rcpt = "RCPT TO:<jörg@bücher.example>\r\n".encode()
    out = replies_for(EHLO + "MAIL FROM:<jörg@bücher.example>\r\n".encode())
    assert out.endswith(b"553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n")
    out = replies_for(EHLO + MAIL + utf8_rcpt)
    assert out.endswith(b"553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n")
    _events, out, conn = run(
        [EHLO + "MAIL FROM:<jörg@bücher.example> SMTPUTF8\r\n".encode() + utf8_rcpt]
    )
    assert codes(out) == [250, 250, 250]
    assert conn.mail_params.smtputf8 and conn.recipients[0].address == "jörg@bücher.example"


def test_rcpt_params_and_source_route_reach_app() -> None:
    raw = (
        EHLO
        + MAIL
        + b"RCPT TO:<@relay.example:u@c.example> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;u+40c\r\n"
    )
    events, _, conn = run([raw])
    rcpt = events[-1]
    assert isinstance(rcpt, ev.RcptTo) and rcpt.path.source_route
    assert rcpt.params.notify == ("SUCCESS", "DELAY")
    assert conn.recipients[0].params.orcpt == "rfc822;u+40c"


def test_malformed_mail_does_not_change_state() -> None:
    _, out, conn = run([EHLO + b"MAIL FROM:<bad\r\n" + b"MAIL FROM:<a@b> SIZE=x\r\n"])
    assert codes(out) == [250, 501, 501]
    assert conn.state is State.READY and conn.mail_from is None
    assert conn.errors == 2


def test_rejected_mail_and_rcpt() -> None:
    responses = {ev.MailFrom: R.INSUFFICIENT_STORAGE}
    _, out, conn = run([EHLO + MAIL + RCPT], responses=responses)
    assert codes(out) == [250, 452, 503]
    responses2 = {ev.RcptTo: R.RELAY_DENIED}
    _, out, conn = run([EHLO + MAIL + RCPT + b"DATA\r\n"], responses=responses2)
    assert codes(out) == [250, 250, 550, 554]
    assert out.endswith(b"554 5.5.1 No valid recipients\r\n")
    assert conn.errors == 2  # the app's 550 and the core's 554


def test_max_recipients() -> None:
    rcpts = b"".join(b"RCPT TO:<u%d@example.com>\r\n" % i for i in range(7))
    events, out, conn = run([EHLO + MAIL + rcpts], max_recipients=5)
    assert codes(out) == [250, 250] + [250] * 5 + [452, 452]
    assert b"452 4.5.3 Too many recipients\r\n" in out
    assert len(conn.recipients) == 5
    assert sum(isinstance(e, ev.RcptTo) for e in events) == 5


def test_rejected_rcpt_not_counted_toward_limit() -> None:
    conn = ServerConnection(config(max_recipients=2))
    conn.receive_data(EHLO + MAIL + RCPT * 4)
    answers = [R.RECIPIENT_UNKNOWN, R.RCPT_OK, R.RCPT_OK]
    for _ in range(20):
        event = conn.next_event()
        if event is NEED_DATA:
            break
        if isinstance(event, ev.RcptTo):
            conn.respond(answers.pop(0))
        elif isinstance(event, ev.DECISION_EVENTS):
            conn.accept()
    assert codes(conn.data_to_send()) == [250, 250, 550, 250, 250, 452]


def test_rset_and_implicit_reset() -> None:
    events, out, conn = run([EHLO + MAIL + RCPT + b"RSET\r\n" + MAIL + RCPT + EHLO])
    assert codes(out)[-4:] == [250, 250, 250, 250]
    kinds = [type(e).__name__ for e in events]
    assert kinds[-2:] == ["Reset", "Hello"]
    assert "Reset" in kinds[:6]
    assert conn.recipients == [] and conn.mail_from is None


def test_pipelining_pauses_and_keeps_order() -> None:
    conn = ServerConnection(config())
    conn.receive_data(EHLO + MAIL + b"NOOP\r\n" + RCPT + b"FOO\r\n")
    assert isinstance(conn.next_event(), ev.Hello)
    assert isinstance(conn.next_event(), ev.MailFrom)
    assert conn.next_event() is PAUSED
    assert conn.next_event() is PAUSED
    ehlo_reply = conn.data_to_send()
    assert ehlo_reply.startswith(b"250-mx.example.net")
    assert conn.data_to_send() == b""  # NOOP not answered before MAIL
    conn.respond(R.MAIL_OK)
    assert isinstance(conn.next_event(), ev.RcptTo)  # NOOP answered on the way
    assert conn.data_to_send() == b"250 2.1.0 Ok\r\n250 2.0.0 Ok\r\n"
    assert conn.next_event() is PAUSED
    conn.respond(R.RELAY_DENIED)
    event = conn.next_event()
    assert isinstance(event, ev.ProtocolError) and event.reply == R.UNRECOGNIZED
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"550 5.7.1 Relaying denied\r\n500 5.5.1 Command unrecognized\r\n"


def test_respond_without_pending_raises() -> None:
    conn = ServerConnection(config())
    with pytest.raises(RuntimeError):
        conn.respond(R.OK)
    with pytest.raises(RuntimeError):
        conn.accept()


def test_starttls_discards_pipelined_commands() -> None:
    conn = ServerConnection(config())
    conn.receive_data(EHLO + b"STARTTLS\r\nMAIL FROM:<evil@x.example>\r\n")
    assert isinstance(conn.next_event(), ev.Hello)
    assert isinstance(conn.next_event(), ev.StartTLS)
    conn.receive_data(RCPT)  # arrives while the application decides
    assert conn.next_event() is PAUSED
    conn.accept()
    assert conn.data_to_send().endswith(b"220 2.0.0 Ready to start TLS\r\n")
    assert conn.tls_active and conn.state is State.INIT
    assert conn.next_event() is NEED_DATA
    conn.receive_data(MAIL)  # "after the handshake": EHLO is needed again
    event = conn.next_event()
    assert isinstance(event, ev.ProtocolError) and event.reply == R.NEED_HELO
    conn.receive_data(EHLO)
    assert isinstance(conn.next_event(), ev.Hello)
    assert b"STARTTLS" not in conn.data_to_send()


def test_starttls_refused_cases() -> None:
    assert last_reply(b"STARTTLS\r\n", tls_available=False) == R.STARTTLS_NOT_OFFERED.to_bytes()
    assert last_reply(EHLO + MAIL + b"STARTTLS\r\n") == R.TRANSACTION_IN_PROGRESS.to_bytes()
    assert last_reply(b"STARTTLS now\r\n").startswith(b"501 5.5.4")
    # the application refuses: the plaintext session goes on, nothing discarded
    responses = {ev.StartTLS: R.Reply(454, "4.7.0", "TLS not available")}
    _, out, conn = run([EHLO + b"STARTTLS\r\nNOOP\r\n"], responses=responses)
    assert codes(out) == [250, 454, 250] and not conn.tls_active
    _, out, _ = run([EHLO + b"STARTTLS\r\nNOOP\r\n", b"EHLO x\r\nSTARTTLS\r\n"])
    assert codes(out) == [250, 220, 250, 503]  # the pipelined NOOP was never answered
    assert out.endswith(R.TLS_ALREADY_ACTIVE.to_bytes())


def test_quit_ignores_further_input() -> None:
    events, out, conn = run([b"QUIT\r\nNOOP\r\n", b"NOOP\r\n"])
    assert out == b"221 2.0.0 Bye\r\n" and events == [ev.Quit()]
    assert conn.state is State.CLOSED


def test_timeout_reply() -> None:
    conn = ServerConnection(config())
    reply = conn.timeout_reply()
    assert reply.code == 421 and reply.enhanced == "4.4.2"
    conn.receive_data(b"NOOP\r\n")
    assert conn.next_event() is NEED_DATA and conn.data_to_send() == b""


def test_command_line_limits() -> None:
    ok = b"NOOP " + b"x" * 505 + b"\r\n"  # 512 octets
    assert last_reply(ok) == b"250 2.0.0 Ok\r\n"
    long = b"NOOP " + b"x" * 506 + b"\r\n"
    assert last_reply(long) == b"500 5.5.2 Line too long\r\n"
    mail = b"MAIL FROM:<a@b.example>" + b" " * 980 + b"\r\n"
    assert len(mail) <= 1012
    assert last_reply(EHLO + mail) == b"250 2.1.0 Ok\r\n"
    huge = b"MAIL FROM:<a@b.example>" + b" " * 2000 + b"\r\nNOOP\r\n"
    assert codes(replies_for(EHLO + huge)) == [250, 500, 250]


def test_long_line_split_across_chunks_is_skipped() -> None:
    chunks = [b"NOOP " + b"x" * 600, b"y" * 600, b"z\r\nNOOP\r\n"]
    _events, out, conn = run(chunks)
    assert codes(out) == [500, 250]
    assert conn.errors == 1


@pytest.mark.parametrize("raw", [b"NOOP\n", b"NO\rOP\r\n", b"NOOP\r\r\n"])
def test_bare_newline_in_command_reject(raw: bytes) -> None:
    assert last_reply(raw + b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"
    out = replies_for(raw)
    assert out == b"500 5.5.2 Bare CR or LF not allowed\r\n"


def test_bare_newline_in_command_normalize() -> None:
    out = replies_for(b"NOOP\nNOOP\rHELP\r\n", bare_newlines="normalize")
    assert codes(out) == [250, 250, 214]
    conn = ServerConnection(config(bare_newlines="normalize"))
    conn.receive_data(b"NOOP\r")
    assert conn.next_event() is NEED_DATA  # CRLF or bare CR: undecided
    conn.receive_data(b"\nNOOP\r\n")
    assert conn.next_event() is NEED_DATA
    assert codes(conn.data_to_send()) == [250, 250]


def test_data_rejected_by_app_keeps_transaction() -> None:
    responses = {ev.DataStart: R.Reply(451, "4.3.0", "Try later")}
    _, out, conn = run([EHLO + MAIL + RCPT + b"DATA\r\n"], responses=responses)
    assert codes(out) == [250, 250, 250, 451]
    assert conn.state is State.MAIL and len(conn.recipients) == 1


def test_message_complete_storage_error_resets() -> None:
    responses = {ev.MessageComplete: R.STORAGE_ERROR}
    _, out, conn = run([EHLO + MAIL + RCPT + b"DATA\r\nx\r\n.\r\n" + RCPT], responses=responses)
    assert codes(out) == [250, 250, 250, 354, 451, 503]
    assert conn.state is State.READY
