from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from smtp_driver import codes, config, content, run, session

from mxspool.smtp import events as ev
from mxspool.smtp import replies as R
from mxspool.smtp.data import DataReader
from mxspool.smtp.headers import HeaderScanner
from mxspool.smtp.server import ServerConnection

pytestmark = pytest.mark.usefixtures("scanner")  # C and Python DATA scanners


def read_all(
    pieces: list[bytes], **kw: object
) -> tuple[bytes, int, DataReader]:  # content, consumed of the last piece, reader
    reader = DataReader(**kw)  # type: ignore[arg-type]
    out = bytearray()
    consumed = 0
    for piece in pieces:
        data, consumed, done = reader.feed(piece)
        out += data
        if done:
            break
    return bytes(out), consumed, reader


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# -- the reader ----------------------------------------------------------------------------
def test_empty_message() -> None:
    data, consumed, reader = read_all([b".\r\nQUIT\r\n"], max_size=100)
    assert (data, consumed, reader.done, reader.size) == (b"", 3, True, 0)


def test_empty_message_bytewise() -> None:
    data, _, reader = read_all(bytewise(b".\r\n"), max_size=100)
    assert reader.done and data == b""


def test_single_blank_line() -> None:
    data, consumed, _ = read_all([b"\r\n.\r\nX"], max_size=100)
    assert (data, consumed) == (b"\r\n", 5)


@pytest.mark.parametrize("split", [bytewise, lambda b: [b]])
def test_dot_unstuffing(split: object) -> None:
    raw = b"..first\r\nmid\r\n..\r\n...x\r\n.\r\n"
    data, _, reader = read_all(split(raw), max_size=1000)  # type: ignore[operator]
    assert data == b".first\r\nmid\r\n.\r\n..x\r\n"
    assert reader.size == len(data)


def test_consumed_counts_only_this_piece() -> None:
    reader = DataReader(max_size=100)
    assert reader.feed(b"abc\r\n.") == (b"abc", 6, False)
    assert reader.feed(b"\r\nNOOP\r\n") == (b"\r\n", 2, True)


def test_line_length_limit() -> None:
    ok = b"a" * 998 + b"\r\n"
    data, _, reader = read_all([ok + ok + b".\r\n"], max_size=10_000)
    assert not reader.line_too_long and data == ok + ok
    _, _, reader = read_all([ok + b"b" * 999 + b"\r\n.\r\n"], max_size=10_000)
    assert reader.line_too_long
    pieces = [b"x" * 500, b"y" * 499, b"\r\n.\r\n"]  # too long only across the boundary
    _, _, reader = read_all(pieces, max_size=10_000)
    assert reader.line_too_long
    _, _, reader = read_all([b"x" * 500, b"y" * 498, b"\r\n.\r\n"], max_size=10_000)
    assert not reader.line_too_long


def test_size_limit_truncates_output_but_reads_to_marker() -> None:
    data, consumed, reader = read_all(
        [b"a" * 50 + b"\r\n", b"b" * 100 + b"\r\n.\r\nNOOP"], max_size=60
    )
    assert reader.too_big and reader.done and data == b"a" * 50 + b"\r\nbbbbbbbb"
    assert consumed == 105


def test_exact_size_is_allowed() -> None:
    _, _, reader = read_all([b"a" * 8 + b"\r\n.\r\n"], max_size=10)
    assert not reader.too_big and reader.size == 10


@pytest.mark.parametrize(
    "form",
    [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\r\n.\r\r\n"],
)
def test_bare_forms_flagged_in_reject_mode(form: bytes) -> None:
    raw = b"a" + form + b"b\r\n.\r\n"
    data, _, reader = read_all([raw], max_size=1000)
    assert reader.done and reader.bare_newline
    assert data.startswith(b"a") and data.endswith(b"b\r\n")


@pytest.mark.parametrize(
    ("form", "normalized"),
    [
        # A lone dot next to a bare line end is dropped with its line end (Postfix 3.9).
        (b"\n.\n", b"\r\n"),
        (b"\r.\r", b"\r\n"),
        (b"\n.\r\n", b"\r\n"),
        (b"\r.\r\n", b"\r\n"),
        (b"\r\n.\n", b"\r\n"),
        (b"\r\r\n.\r\r\n", b"\r\n\r\n\r\n"),
    ],
)
def test_bare_forms_normalized(form: bytes, normalized: bytes) -> None:
    raw = b"a" + form + b"b\r\n.\r\n"
    for pieces in ([raw], bytewise(raw)):
        data, _, reader = read_all(pieces, max_size=1000, bare_newlines="normalize")
        assert reader.done
        assert data == b"a" + normalized + b"b\r\n"
        crlf = data.count(b"\r\n")
        assert data.count(b"\r") == crlf == data.count(b"\n")


def test_bare_cr_at_piece_boundary_is_not_bare() -> None:
    _, _, reader = read_all([b"abc\r", b"\ndef\r\n.\r\n"], max_size=100)
    assert not reader.bare_newline
    _, _, reader = read_all([b"abc\r", b"def\r\n.\r\n"], max_size=100)
    assert reader.bare_newline


# -- header scanner ------------------------------------------------------------------------
def test_header_scanner_message_id_folded() -> None:
    scanner = HeaderScanner()
    scanner.feed(b"Received: a\r\nMessage-Id:\r\n  <abc@x.example>\r\n")
    scanner.feed(b"\r\nbody\r\nReceived: not a header\r\n")
    assert scanner.done and scanner.received_count == 1
    assert scanner.message_id == "<abc@x.example>"
    assert scanner.header.endswith(b"<abc@x.example>\r\n")


def test_header_scanner_split_end() -> None:
    scanner = HeaderScanner()
    for byte in bytewise(b"RECEIVED : x\r\nreceived:y\r\n\r\nReceived: body\r\n"):
        scanner.feed(byte)
    assert scanner.done and scanner.received_count == 2 and scanner.message_id is None


def test_header_scanner_cap() -> None:
    scanner = HeaderScanner(limit=100)
    scanner.feed(b"Received: x\r\n" * 20)
    assert scanner.done and scanner.too_long and scanner.received_count == 7


def test_no_header_section() -> None:
    scanner = HeaderScanner()
    scanner.feed(b"\r\nReceived: x\r\n")
    assert scanner.done and scanner.header == b"" and scanner.received_count == 0


# The fields as the scanner must find them: a regex search of the whole header, ^ at the start
# and after every LF, any ASCII case (the scanner finds the same with bytes.find).
REFERENCE_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
REFERENCE_MESSAGE_ID = re.compile(
    rb"^message-id[ \t]*:((?:[^\r\n]|\r\n[ \t])*)", re.IGNORECASE | re.MULTILINE
)
HEADER_PIECES = [
    b"Received",
    b"RECEIVED",
    b"received",
    b"ReCeIvEd",
    b"Message-ID",
    b"message-id",
    b"MESSAGE-Id",
    b"Message_ID",
    b"X-Received",
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b":",
    b"<a@b.example>",
    b"x",
    b"\xc3\xa9",
    b"\x00",
]


@given(st.lists(st.sampled_from(HEADER_PIECES), max_size=40))
def test_header_scanner_finds_fields_as_a_regex_search_would(pieces: list[bytes]) -> None:
    header = b"".join(pieces)
    scanner = HeaderScanner()
    scanner._finish(header)
    assert scanner.received_count == len(REFERENCE_RECEIVED.findall(header))
    m = REFERENCE_MESSAGE_ID.search(header)
    expected = m.group(1).replace(b"\r\n", b"").strip().decode("utf-8", "replace") if m else None
    assert scanner.message_id == (expected or None)


def test_header_scanner_second_message_id_line_after_a_non_matching_one() -> None:
    scanner = HeaderScanner()
    scanner.feed(b"Message-IDs: no\r\nmessage-id :<yes@x>\r\nMessage-ID: <later@x>\r\n\r\n")
    assert scanner.message_id == "<yes@x>"


# -- through the connection ----------------------------------------------------------------
SMUGGLE_FORMS = [
    b"\n.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\r\n.\r\r\n",
]
SMUGGLED = b"RSET\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"


def smuggle_session(form: bytes) -> bytes:
    body = b"Subject: t\r\n\r\nbefore" + form + SMUGGLED + b"tail\r\n.\r\nQUIT\r\n"
    return session(body)


@pytest.mark.parametrize("form", SMUGGLE_FORMS)
@pytest.mark.parametrize("mode", ["reject", "normalize"])
def test_smuggling_forms(form: bytes, mode: str) -> None:
    raw = smuggle_session(form)
    for chunks in ([raw], bytewise(raw)):
        events, out, _ = run(chunks, bare_newlines=mode)
        start = next(i for i, e in enumerate(events) if isinstance(e, ev.DataStart))
        after = [e for e in events[start + 1 :] if not isinstance(e, ev.DataChunk)]
        # Nothing between the fake marker and the real one was taken as a command.
        has_nul = b"\x00" in form
        if mode == "reject" and not has_nul:
            assert after == [ev.MessageRejected(R.BARE_NEWLINE), ev.Quit()]
            assert codes(out)[-2:] == [500, 221]
        else:
            assert type(after[0]) is ev.MessageComplete and after[1:] == [ev.Quit()]
            assert codes(out)[-2:] == [250, 221]
        data = content(events)
        assert SMUGGLED in data and data.endswith(b"tail\r\n")
        if mode == "normalize":
            crlf = data.count(b"\r\n")
            assert data.count(b"\r") == crlf == data.count(b"\n")
        else:
            assert form.replace(b"\r\n.", b"\r\n") in data


def test_bare_lf_only_message_reject_then_session_continues() -> None:
    raw = session(b"line\nmore\n.\n\r\n.\r\nNOOP\r\n")
    _events, out, conn = run([raw])
    assert codes(out)[-2:] == [500, 250]
    assert conn.recipients == [] and conn.mail_from is None


def test_overlong_data_line_rejected() -> None:
    raw = session(b"Subject: x\r\n\r\n" + b"z" * 999 + b"\r\n.\r\n")
    events, out, _ = run([raw])
    assert ev.MessageRejected(R.DATA_LINE_TOO_LONG) in events
    assert codes(out)[-1] == 500
    raw = session(b"Subject: x\r\n\r\n" + b"z" * 998 + b"\r\n.\r\n")
    events, out, _ = run([raw])
    assert codes(out)[-1] == 250


def test_size_limit_by_declared_size() -> None:
    raw = b"EHLO c\r\nMAIL FROM:<a@b.example> SIZE=10001\r\nMAIL FROM:<a@b.example> SIZE=10000\r\n"
    events, out, _ = run([raw], max_message_size=10_000)
    assert codes(out) == [250, 552, 250]
    assert b"552 5.3.4 Message too big\r\n" in out
    assert not any(isinstance(e, ev.MailFrom) and e.params.size == 10001 for e in events)


def test_size_limit_by_actual_bytes() -> None:
    body = b"x" * 98 + b"\r\n"
    events, out, _ = run([session(body * 100 + b".\r\n")], max_message_size=10_000)
    assert codes(out)[-1] == 250
    events, out, _ = run([session(body * 101 + b".\r\nNOOP\r\n")], max_message_size=10_000)
    assert ev.MessageRejected(R.MESSAGE_TOO_BIG) in events
    assert codes(out)[-2:] == [552, 250]
    assert len(content(events)) == 10_000


@pytest.mark.parametrize(("count", "rejected"), [(49, False), (50, True)])
def test_received_loop_detection(count: int, rejected: bool) -> None:
    header = b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n" * count
    raw = session(header + b"Subject: loop\r\n\r\nbody\r\n.\r\n")
    events, out, _ = run([raw], max_message_size=100_000)
    if rejected:
        assert ev.MessageRejected(R.MAIL_LOOP) in events
        assert out.endswith(b"554 5.4.6 Mail loop detected\r\n")
    else:
        done = [e for e in events if isinstance(e, ev.MessageComplete)]
        assert done[0].received_count == 49


def test_message_complete_fields() -> None:
    body = b"Message-ID:\r\n\t<folded@example.org>\r\nSubject: s\r\n\r\n.hi\r\n"
    events, _, _conn = run(
        [session(b"Message-ID:\r\n\t<folded@example.org>\r\nSubject: s\r\n\r\n..hi\r\n.\r\n")]
    )
    done = next(e for e in events if isinstance(e, ev.MessageComplete))
    assert done.message_id == "<folded@example.org>"
    assert done.size == len(body) and content(events) == body
    assert done.received_count == 0 and not done.header_too_long


def test_one_data_chunk_per_receive() -> None:
    events, _, _ = run(
        [session(b""), b"a" * 5000 + b"\r\n", b"b" * 5000, b"\r\n.\r\n"], max_message_size=100_000
    )
    chunks = [e for e in events if isinstance(e, ev.DataChunk)]
    assert [len(c.data) for c in chunks] == [5000, 5002, 2]


def test_envelope_available_at_message_complete() -> None:
    conn = ServerConnection(config())
    conn.receive_data(session(b"x\r\n.\r\n", rcpts=2))
    while not isinstance(event := conn.next_event(), ev.MessageComplete):
        if isinstance(event, ev.DECISION_EVENTS):
            conn.accept()
    conn.data_to_send()
    assert conn.paused
    assert conn.mail_from == "s@example.org"
    assert [r.address for r in conn.recipients] == ["u0@example.com", "u1@example.com"]
    env = conn.envelope()
    assert env.mail_from == "s@example.org" and len(env.recipients) == 2
    conn.respond(R.queued("Q1"))
    assert conn.data_to_send() == b"250 2.0.0 Ok: queued as Q1\r\n"
    assert conn.recipients == [] and conn.mail_from is None
