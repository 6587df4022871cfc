"""Bare CR / LF in DATA, sans-IO: "normalize" (the default) and "reject", C and Python scanners.

Only a raw <CRLF>.<CRLF> ends DATA in either mode. In "normalize" a bare CR or LF is read as a
CRLF: the stored content is CRLF text, every line's first dot is stuffing, and a lone dot next
to a bare line end (the fake end of an SMTP smuggling attempt) is dropped. What is stored must
survive delivery: dot-stuffed again, no receiver, however lenient, may see an early end.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smtp_driver import codes, content, run

from mxspool.config import SmtpConfig
from mxspool.delivery.dotstuff import DotStuffer
from mxspool.smtp import data
from mxspool.smtp import events as ev
from mxspool.smtp import replies as R
from mxspool.smtp.data import AFTER_BARE, AFTER_CRLF, MID_LINE, DataReader, process_region_py
from mxspool.smtp.server import ServerConfig

scanners = pytest.mark.usefixtures("scanner")  # once with the C DATA scanner, once with Python

# Every ending of the smuggling family that is not <CRLF>.<CRLF>, and what "normalize" stores
# for b"before" + form + b"after\r\n".
SMUGGLE_FORMS: dict[bytes, bytes] = {
    b"\n.\n": b"before\r\nafter\r\n",
    b"\r.\r": b"before\r\nafter\r\n",
    b"\n.\r\n": b"before\r\nafter\r\n",
    b"\r.\r\n": b"before\r\nafter\r\n",
    b"\r\n.\n": b"before\r\nafter\r\n",
    b"\r\n.\r": b"before\r\nafter\r\n",
    b"\n.\r": b"before\r\nafter\r\n",
    b"\r.\n": b"before\r\nafter\r\n",
    b"\r\r\n.\r\r\n": b"before\r\n\r\n\r\nafter\r\n",
    b"\n\n.\n\n": b"before\r\n\r\n\r\nafter\r\n",
    b"\r\n\x00.\r\n": b"before\r\n\x00.\r\nafter\r\n",
    b"\r\n.\x00\r\n": b"before\r\n\x00\r\nafter\r\n",
    b"\n.\x00\n": b"before\r\n\x00\r\nafter\r\n",
    b"\r\n..\n": b"before\r\n.\r\nafter\r\n",
}
SECOND = b"MAIL FROM:<evil@smuggler.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
SECOND_BODY = b"Subject: smuggled\r\n\r\nevil\r\n"


def smuggling_session(form: bytes) -> bytes:
    """One transaction whose body holds a fake end and a would-be second transaction."""
    return (
        b"EHLO c.example\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"
        b"Subject: t\r\n\r\nbefore" + form + SECOND + SECOND_BODY + b".\r\nQUIT\r\n"
    )


_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def bytewise(raw: bytes) -> list[bytes]:
    return [raw[i : i + 1] for i in range(len(raw))]


def well_formed(text: bytes) -> bool:
    crlf = text.count(b"\r\n")
    return text.count(b"\r") == crlf == text.count(b"\n")


def lenient_receiver(wire: bytes) -> list[bytes]:
    """The messages a receiver that ends lines at any CR or LF would take from ``wire``."""
    messages, lines = [], []
    for line in re.split(rb"\r\n|\r|\n", wire):
        if line == b".":
            messages.append(b"\r\n".join(lines))
            lines = []
        else:
            lines.append(line[1:] if line.startswith(b".") else line)
    return messages


def stuffed(stored: bytes) -> bytes:
    stuffer = DotStuffer()
    return stuffer.feed(stored) + stuffer.finish()


# -- the default ---------------------------------------------------------------------------------


def test_normalize_is_the_default() -> None:
    assert SmtpConfig().bare_newlines == "normalize"
    assert ServerConfig(hostname="mx.example").bare_newlines == "normalize"
    reader = DataReader(1000)
    assert reader.feed(b"a\nb\r\n.\r\n") == (b"a\r\nb\r\n", 8, True)


# -- the smuggling family, through the connection ------------------------------------------------


@scanners
@pytest.mark.parametrize("form", list(SMUGGLE_FORMS), ids=repr)
@pytest.mark.parametrize("mode", ["normalize", "reject"])
def test_smuggling_form_is_one_transaction(form: bytes, mode: str) -> None:
    raw = smuggling_session(form)
    for chunks in ([raw], bytewise(raw)):
        events, out, _ = run(chunks, bare_newlines=mode)
        mails = [e for e in events if isinstance(e, ev.MailFrom)]
        assert [m.path.address for m in mails] == ["s@example.org"]  # nothing ran as a command
        assert codes(out)[-1] == 221  # QUIT, right after the one reply to the content
        stored = content(events)
        assert stored.startswith(b"Subject: t\r\n\r\nbefore")
        assert stored.endswith(SECOND + SECOND_BODY)  # the smuggled text stays body text
        if mode == "reject" and _BARE.search(form):
            assert ev.MessageRejected(R.BARE_NEWLINE) in events
            assert codes(out)[-2:] == [500, 221]
            assert b"500 5.5.2 Bare CR or LF not allowed\r\n" in out
        else:
            complete = [e for e in events if isinstance(e, ev.MessageComplete)]
            assert len(complete) == 1 and codes(out)[-2:] == [250, 221]
            expected = b"Subject: t\r\n\r\n" + SMUGGLE_FORMS[form].replace(
                b"after\r\n", SECOND + SECOND_BODY
            )
            if mode == "normalize":
                assert stored == expected
                assert well_formed(stored)
                assert complete[0].size == len(stored)  # size = the stored bytes


@scanners
@pytest.mark.parametrize("form", list(SMUGGLE_FORMS), ids=repr)
def test_stored_smuggling_form_survives_delivery(form: bytes) -> None:
    """Dot-stuffed for the next hop, the stored bytes are one message for a strict receiver
    and for a lenient one (ending lines at bare CR or LF), with the content unchanged."""
    events, _, _ = run([smuggling_session(form)], bare_newlines="normalize")
    stored = content(events)
    wire = stuffed(stored)
    assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")
    assert lenient_receiver(wire) == [stored[:-2]]


# -- dots, in "normalize" ------------------------------------------------------------------------


@scanners
@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        (b"a\n..b\n.c\r\n", b"a\r\n.b\r\nc\r\n"),  # stuffing after a bare LF is removed too
        (b"a\r..b\r.c\r\n", b"a\r\n.b\r\nc\r\n"),  # and after a bare CR
        (b"a\n..\n..\r\n", b"a\r\n.\r\n.\r\n"),  # a stuffed lone dot is content
        (b"a\n.\n.\n.\nb\r\n", b"a\r\nb\r\n"),  # consecutive fake ends all go
        (b"a\r.\r\n\nb\r\n", b"a\r\n\r\nb\r\n"),  # a dropped line never joins CR and LF
        (b".\nb\r\n", b"b\r\n"),  # the first line, ended by a bare LF
        (b"..\nb\r\n", b".\r\nb\r\n"),
        (b"\n\r\r\n", b"\r\n\r\n\r\n"),
    ],
)
def test_dot_rules(raw: bytes, stored: bytes) -> None:
    for pieces in ([raw + b".\r\n"], bytewise(raw + b".\r\n")):
        reader = DataReader(10_000, "normalize")
        out = []
        for piece in pieces:
            got, _, done = reader.feed(piece)
            out.append(got)
        assert done and b"".join(out) == stored and reader.size == len(stored)


@scanners
def test_bare_lf_only_message_is_accepted_and_stored_as_crlf() -> None:
    """Lines ended by LF alone, then the genuine end (what a client that writes the body
    with LF but ends DATA by the book sends): an empty last line, as Postfix stores it."""
    body = b"Subject: unix\nX-A: b\n\nline\n..dot\n"
    raw = (
        b"EHLO c\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"
        + body
        + b"\r\n.\r\nNOOP\r\n"
    )
    events, out, _ = run([raw], bare_newlines="normalize")
    assert codes(out)[-2:] == [250, 250]
    stored = content(events)
    assert stored == b"Subject: unix\r\nX-A: b\r\n\r\nline\r\n.dot\r\n\r\n"  # one more CRLF
    complete = next(e for e in events if isinstance(e, ev.MessageComplete))
    assert complete.size == len(stored)
    assert complete.header == b"Subject: unix\r\nX-A: b\r\n"
    events, out, _ = run([raw], bare_newlines="reject")
    assert codes(out)[-2:] == [500, 250]


@scanners
def test_bare_lf_message_without_a_genuine_end_never_completes() -> None:
    """With <LF>.<LF> as its only end the message stays open (no reply), as with Postfix."""
    raw = b"EHLO c\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<a@example.com>\r\nDATA\r\nx\n.\n"
    first, out, conn = run([raw, b"NOOP\r\n"], bare_newlines="normalize")
    assert codes(out) == [250, 250, 250, 354]
    assert not any(isinstance(e, ev.MessageComplete) for e in first)
    then, out, _ = run([b".\r\n"], conn=conn)  # positive control: the genuine end
    assert codes(out) == [250]
    assert content(first) + content(then) == b"x\r\nNOOP\r\n"


# -- BDAT ----------------------------------------------------------------------------------------


def test_bdat_is_not_offered() -> None:
    """Documented choice: no CHUNKING, so bare-newline rules only concern DATA."""
    raw = b"EHLO c\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<a@example.com>\r\nBDAT 3 LAST\r\n"
    _, out, _ = run([raw], bare_newlines="normalize")
    assert b"CHUNKING" not in out
    assert codes(out)[-1] == 502


# -- C and Python agree, including a region that starts after a bare line end ---------------------

PIECES = st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"\r\n.", b"x", b"\x00", b"\r\n.\r"])
RAW = st.lists(st.one_of(PIECES, st.binary(max_size=4)), max_size=40).map(b"".join)


def oracle(region: bytes, sol: int) -> bytes:
    """The "normalize" rules one line at a time (slow, obviously right)."""
    parts = re.split(rb"(\r\n|\r|\n)", region)
    out = bytearray()
    at_start, bare_before = sol != MID_LINE, sol == AFTER_BARE
    for i in range(0, len(parts), 2):
        line, end = parts[i], parts[i + 1] if i + 1 < len(parts) else b""
        if not line and not end:
            continue
        bare = end in (b"\r", b"\n")
        if at_start and line.startswith(b"."):
            if line == b"." and end and (bare or bare_before):
                bare_before = bare
                continue
            line = line[1:]
        out += line + (b"\r\n" if end else b"")
        at_start, bare_before = bool(end), bare
    return bytes(out)


@settings(max_examples=500, deadline=None)
@given(region=RAW, sol=st.sampled_from([MID_LINE, AFTER_CRLF, AFTER_BARE]))
def test_normalize_matches_the_oracle_and_c(region: bytes, sol: int) -> None:
    expected = process_region_py(region, sol, True, True, 0)
    assert expected[0] == oracle(region, sol)
    if data.ACCELERATED and data._scan is not None:
        assert data._scan.process(region, sol, True, True, 0) == expected


@settings(max_examples=300, deadline=None)
@given(body=RAW, cuts=st.lists(st.integers(0, 200), max_size=5))
def test_any_chunking_reads_the_same(body: bytes, cuts: list[int]) -> None:
    stream = body + b"\r\n.\r\n"
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    results = []
    for accelerated in [True, False] if data.ACCELERATED else [False]:
        for pieces in (chunks, [stream]):
            reader = DataReader(100_000, "normalize", accelerated=accelerated)
            out, used = [], 0
            for piece in pieces:
                got, consumed, done = reader.feed(piece)
                out.append(got)
                used += consumed
                if done:
                    break
            results.append((b"".join(out), used, reader.size, reader.bare_newline))
    assert all(r == results[0] for r in results)
    stored = results[0][0]
    assert well_formed(stored)
    assert lenient_receiver(stuffed(stored))[:1] == [stored[:-2] if stored else b""]
