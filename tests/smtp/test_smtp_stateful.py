"""Hypothesis fuzzing of the sans-IO SMTP core (issue 14).

``SmtpSession`` is a RuleBasedStateMachine: each rule appends one client action (a valid or
malformed command, junk bytes, an over-long line, a line with bare CR/LF, a DATA body with
dots and fake end markers, STARTTLS with plaintext pipelined after it, RSET, BDAT, QUIT) to
the bytes the client has sent, and a *model* of RFC 5321 predicts the reply code of every
command and the content of every message. The bytes reach ``ServerConnection`` in random
pieces that lag behind and cut anywhere (pipelining, end markers split across pieces); the
application answers each decision event at random, sometimes only after more input arrived.

Checked after every step: every reply line is ``NNN[ -]text<CRLF>``, at most 512 octets, with
no bare CR or LF; the reply codes are exactly the model's, one per command, in order (a prefix
while input lags, all of them once it is fed); each message's DataChunks join to the body the
reference un-dot-stuffer computes (the same whatever the pieces); nothing happens after QUIT
or the 421 of the error limit; the core's state is the model's; nothing raises.

The default run is short. For a long run::

    MXSPOOL_FUZZ_EXAMPLES=20000 .venv/bin/pytest -p no:cacheprovider \\
        tests/smtp/test_smtp_stateful.py
"""

from __future__ import annotations

import os
import re
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from mxspool.envelope import MailParams, RcptParams
from mxspool.smtp import data as data_module
from mxspool.smtp import events as ev
from mxspool.smtp import replies as R
from mxspool.smtp.address import parse_path, split_argument
from mxspool.smtp.params import parse_mail_params, parse_rcpt_params, printable_xtext, xtext_decode
from mxspool.smtp.replies import CommandError
from mxspool.smtp.server import NEED_DATA, PAUSED, ServerConfig, ServerConnection, State

EXAMPLES = int(os.environ.get("MXSPOOL_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    stateful_step_count=int(os.environ.get("MXSPOOL_FUZZ_STEPS", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    report_multiple_bugs=False,
)
_REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -][\x20-\x7e]*")
MAX_LINE = 998


# -- the reference: how a server must unstuff and judge DATA content -------------------------


def reference_content(raw: bytes, normalize: bool, max_size: int) -> tuple[bytes, int | None]:
    """(content, core reply code or None when clean) for ``raw``: the bytes after the 354
    through the CRLF before the end marker (b"" for an empty message).

    One genuine CRLF-terminated line at a time: a leading dot is dropped; a CR or LF inside
    is a bare one: kept (and refused) in "reject" mode. When normalizing every CR, LF and CRLF
    ends a line and becomes CRLF, every line's leading dot is dropped, and a line holding only
    a dot next to a bare line end is dropped with its line end (as Postfix 3.9 does)."""
    assert raw == b"" or raw.endswith(b"\r\n")
    out = bytearray()
    bare = False
    if normalize:
        parts = re.split(rb"(\r\n|\r|\n)", raw)  # line, end, line, end, ..., b""
        bare_before = False
        for line, end in zip(parts[0::2], parts[1::2], strict=False):
            bare = bare or end != b"\r\n"
            if line == b"." and (end != b"\r\n" or bare_before):
                bare_before = end != b"\r\n"
                continue
            out += (line[1:] if line.startswith(b".") else line) + b"\r\n"
            bare_before = end != b"\r\n"
    else:
        for raw_line in raw.split(b"\r\n")[:-1]:
            line = raw_line[1:] if raw_line.startswith(b".") else raw_line
            bare = bare or b"\r" in line or b"\n" in line
            out += line + b"\r\n"
    content = bytes(out)
    lines = re.split(rb"\r\n|\r|\n", content)
    if bare and not normalize:
        code: int | None = 500
    elif len(content) > max_size:
        code = 552
    elif any(len(line) > MAX_LINE for line in lines):
        code = 500
    else:
        code = None
    return content[:max_size], code


def stuff(lines: list[bytes]) -> bytes:
    """What a client sends for these lines: dot-stuffed, CRLF-joined, then the end marker."""
    return b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines) + b".\r\n"


# -- the model ------------------------------------------------------------------------------


@dataclass
class Model:
    config: ServerConfig
    state: State = State.INIT
    helo: bool = False
    extended: bool = False
    tls: bool = False
    smtputf8: bool = False
    recipients: int = 0
    rcpt_attempted: bool = False
    errors: int = 0
    codes: list[int] = field(default_factory=list)
    contents: list[bytes] = field(default_factory=list)

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def reply(self, code: int, *, overshoot: bool = False) -> None:
        """One expected reply; counts errors as the core does (Postfix error count)."""
        self.codes.append(code)
        if code >= 400 and not overshoot:
            self.errors += 1
            limit = self.config.hard_error_limit
            if limit and self.errors >= limit:
                self.codes.append(421)
                self.state = State.CLOSED

    def reset(self) -> None:
        self.smtputf8 = False
        self.recipients = 0
        self.rcpt_attempted = False


# -- the client's vocabulary ------------------------------------------------------------------

NAMES = st.sampled_from(
    [b"client.example", b"[192.0.2.1]", b"h\xc3\xa9.example", b"", b"a\x01b", b"a\x7f", b"x\tz"]
)
# (bytes, category): "ok", "ascii" only without SMTPUTF8, "bad" grammar, "unclosed" path
SENDERS = st.sampled_from(
    [
        (b"<s@example.org>", "ok"),
        (b"<>", "ok"),
        (b'<"q d"@example.org>', "ok"),
        (b"<@relay.example:s@example.org>", "ok"),
        (b"<s@[192.0.2.7]>", "ok"),
        (b"<\xc3\xbc@example.org>", "utf8"),
        (b"<s\x01@example.org>", "bad"),
        (b"<s@example.org\x7f>", "bad"),
        (b"<s@@example.org>", "bad"),
        (b"<s\xe2\x80\xa8@example.org>", "bad"),
        (b"<s@example.org", "unclosed"),
        (b"s@example.org", "unclosed"),
    ]
)
RECIPIENTS = st.sampled_from(
    [
        (b"<u@example.com>", "ok"),
        (b"<Postmaster>", "ok"),
        (b"<\xc3\xbc@example.com>", "utf8"),
        (b"<>", "bad"),
        (b"<u\x00@example.com>", "nul"),
        (b"<u@exa mple.com>", "bad"),
        (b"<u@example.com", "unclosed"),
    ]
)


def declared_size(words: bytes) -> int:
    """The SIZE= a MAIL parameter list declares (0 without one): over the limit is 552."""
    for word in words.split():
        key, _, value = word.partition(b"=")
        if key.upper() == b"SIZE" and value.isdigit():
            return int(value)
    return 0


# (parameter words, expected code when it decides the outcome, or None for accepted;
# SIZE=N is 552 when N is over the configured max_message_size, see declared_size)
MAIL_PARAMS = st.sampled_from(
    [
        (b"", None),
        (b" SIZE=100", None),
        (b" SIZE=999999999", 552),
        (b" BODY=8BITMIME RET=HDRS", None),
        (b" SMTPUTF8", None),
        (b" ENVID=id+2Bok+20x", None),
        (b" ENVID=a+0D+0AX-Injected:+20y", 501),
        (b" ENVID=a+00", 501),
        (b" RET=FULL RET=HDRS", 501),
        (b" BODY=BINARYMIME", 555),
        (b" " + b"K" * 300 + b"=1", 555),
        (b" \x1b[31m=1", 501),
        (b" SIZE=", 501),
    ]
)
RCPT_PARAMS = st.sampled_from(
    [
        (b"", None),
        (b" NOTIFY=SUCCESS,FAILURE", None),
        (b" NOTIFY=NEVER ORCPT=rfc822;u+40example.com", None),
        (b" ORCPT=rfc822;u+0D+0AX:+20y", 501),
        (b" ORCPT=utf-8;u\\x{0A}", 501),
        (b" NOTIFY=BOGUS", 501),
        (b" FROB=1", 555),
    ]
)
# application answers to decision events
MAIL_ANSWERS = st.sampled_from([R.MAIL_OK, R.MAIL_OK, R.INSUFFICIENT_STORAGE, R.RELAY_DENIED])
RCPT_ANSWERS = st.sampled_from(
    [R.RCPT_OK, R.RCPT_OK, R.RELAY_DENIED, R.Reply(450, "4.2.0", "Try later")]
)
DATA_ANSWERS = st.sampled_from([R.START_DATA, R.START_DATA, R.Reply(451, "4.3.0", "Later")])
END_ANSWERS = st.sampled_from([R.queued("Q1"), R.queued("Q2"), R.STORAGE_ERROR, R.MAIL_LOOP])
TLS_ANSWERS = st.sampled_from([R.READY_FOR_TLS, R.Reply(454, "4.7.0", "TLS not available")])
BODY_LINE = (
    st.lists(
        st.sampled_from(
            [
                b".",
                b"..",
                b"\r",
                b"\n",
                b"a",
                b"X",
                b" ",
                b"\x00",
                b"\xff",
                b"Received: x",
                b"a" * 999,
            ]
        ),
        max_size=6,
    )
    .map(b"".join)
    .filter(lambda line: b"\r\n" not in line)
)
JUNK = st.binary(max_size=40).map(lambda b: b"X" + b.replace(b"\r", b"").replace(b"\n", b""))
SEGMENT = st.one_of(JUNK, st.integers(400, 1200).map(lambda n: b"X" * n))


class SmtpSession(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.saved_accelerated = data_module.ACCELERATED

    @initialize(
        bare=st.sampled_from(["reject", "normalize"]),
        tls=st.booleans(),
        limit=st.sampled_from([0, 3, 7, 20]),
        max_size=st.sampled_from([40, 600, 5000]),
        accelerated=st.booleans() if data_module.ACCELERATED else st.just(False),
    )
    def start(self, bare: str, tls: bool, limit: int, max_size: int, accelerated: bool) -> None:
        data_module.ACCELERATED = accelerated
        config = ServerConfig(
            hostname="mx.example.net",
            max_message_size=max_size,
            max_recipients=3,
            bare_newlines=bare,  # type: ignore[arg-type]
            tls_available=tls,
            max_received_headers=10**6,
            hard_error_limit=limit,
        )
        self.conn = ServerConnection(config)
        self.model = Model(config)
        self.pending = bytearray()  # sent by the client, not yet received by the core
        self.out = bytearray(self.conn.greeting())
        self.decisions: deque[tuple[type, R.Reply]] = deque()
        self.waiting: object = None  # a decision event the application has not answered yet
        self.body: bytearray | None = None
        self.contents: list[bytes] = []
        self.quit_seen = False

    def teardown(self) -> None:
        data_module.ACCELERATED = self.saved_accelerated

    # -- feeding -------------------------------------------------------------------------
    def _answer(self, event: object) -> None:
        kind, reply = self.decisions.popleft()
        assert isinstance(event, kind), (event, kind)
        self.conn.respond(reply)
        self.out += self.conn.data_to_send()
        if isinstance(event, ev.DataStart) and reply.code == 354:
            self.body = bytearray()

    def _drain(self, draw: st.DataObject, *, now: bool) -> None:
        conn = self.conn
        if self.waiting is not None:
            if not now and draw.draw(st.booleans(), "answer later"):
                return
            event, self.waiting = self.waiting, None
            self._answer(event)
        while True:
            event = conn.next_event()
            self.out += conn.data_to_send()
            if event is NEED_DATA:
                return
            assert event is not PAUSED  # every decision is answered or held in self.waiting
            assert not self.quit_seen, f"{event} after Quit"
            if isinstance(event, ev.DataChunk):
                assert self.body is not None and event.data
                self.body += event.data
            elif isinstance(event, ev.MessageComplete | ev.MessageRejected):
                assert self.body is not None
                self.contents.append(bytes(self.body))
                self.body = None
            elif isinstance(event, ev.Quit):
                self.quit_seen = True
            if isinstance(event, ev.DECISION_EVENTS):
                if isinstance(event, ev.StartTLS):
                    # A client pipelining plaintext after STARTTLS: all of it arrives before
                    # the handshake starts, and the core must drop it.
                    self.conn.receive_data(bytes(self.pending))
                    self.pending.clear()
                elif not now and draw.draw(st.booleans(), "decide later"):
                    self.waiting = event
                    return
                self._answer(event)

    def _feed(self, draw: st.DataObject, *, flush: bool = False) -> None:
        """Hand the core a random prefix of what was sent (all of it when flushing), cut into
        pieces at a few random points, often right around a CR or LF (so line ends and end
        markers split across pieces), draining events between pieces."""
        total = len(self.pending)
        if total and not flush:
            total = draw.draw(st.integers(0, total), "bytes now")
        cuts: set[int] = set()
        if total > 1:
            breaks = [m.start() for m in re.finditer(rb"[\r\n]", self.pending[:total])][:40]
            near = (
                st.tuples(st.sampled_from(breaks), st.integers(-2, 3)).map(sum) if breaks else None
            )
            anywhere = st.integers(1, total - 1)
            where = st.one_of(near, anywhere) if near is not None else anywhere
            cuts = {c for c in draw.draw(st.lists(where, max_size=8), "cuts") if 0 < c < total}
        start = 0
        for end in [*sorted(cuts), total]:
            piece = bytes(self.pending[: end - start])
            del self.pending[: end - start]
            start = end
            if piece:
                self.conn.receive_data(piece)
                self._drain(draw, now=flush)
        self._drain(draw, now=flush)
        if flush:
            assert self.waiting is None and not self.pending

    def _send(self, data: bytes, draw: st.DataObject, *, flush: bool = False) -> None:
        self.pending += data
        self._feed(draw, flush=flush)

    def _decide(self, kind: type, reply: R.Reply) -> R.Reply:
        self.decisions.append((kind, reply))
        return reply

    # -- rules: one client action each -----------------------------------------------------
    @rule(draw=st.data(), verb=st.sampled_from([b"EHLO", b"HELO", b"ehlo"]), name=NAMES)
    def hello(self, draw: st.DataObject, verb: bytes, name: bytes) -> None:
        m = self.model
        if not m.closed:
            if not name or re.search(rb"[\x00-\x1f\x7f]", name):
                m.reply(501)
            else:
                m.reply(250)
                m.reset()
                m.state, m.helo, m.extended = State.READY, True, verb.upper() == b"EHLO"
        self._send(verb + b" " + name + b"\r\n", draw)

    @rule(draw=st.data(), sender=SENDERS, params=MAIL_PARAMS, answer=MAIL_ANSWERS)
    def mail(
        self,
        draw: st.DataObject,
        sender: tuple[bytes, str],
        params: tuple[bytes, int | None],
        answer: R.Reply,
    ) -> None:
        m = self.model
        (path, kind), (words, code) = sender, params
        if not m.closed:
            utf8 = b"SMTPUTF8" in words
            if m.state is State.INIT or m.state is State.MAIL:
                m.reply(503)
            elif kind == "unclosed":
                m.reply(501)
            elif words and not m.extended:
                m.reply(555)
            elif code is not None and code != 552:
                m.reply(code)
            elif kind == "bad":
                m.reply(501)
            elif kind == "utf8" and not utf8:
                m.reply(553)
            elif declared_size(words) > m.config.max_message_size:
                m.reply(552)
            else:
                reply = self._decide(ev.MailFrom, answer)
                m.reply(reply.code)
                if reply.code == 250:
                    m.reset()
                    m.state, m.smtputf8 = State.MAIL, utf8
        self._send(b"MAIL FROM:" + path + words + b"\r\n", draw)

    @rule(draw=st.data(), rcpt=RECIPIENTS, params=RCPT_PARAMS, answer=RCPT_ANSWERS)
    def rcpt(
        self,
        draw: st.DataObject,
        rcpt: tuple[bytes, str],
        params: tuple[bytes, int | None],
        answer: R.Reply,
    ) -> None:
        m = self.model
        (path, kind), (words, code) = rcpt, params
        if not m.closed:
            if kind == "nul":  # a NUL anywhere refuses the line before anything else
                m.reply(500)
            elif m.state is not State.MAIL:
                m.reply(503)
            else:
                m.rcpt_attempted = True
                if kind == "unclosed":
                    m.reply(501)
                elif words and not m.extended:
                    m.reply(555)
                elif code is not None:
                    m.reply(code)
                elif kind == "bad":
                    m.reply(501)
                elif kind == "utf8" and not m.smtputf8:
                    m.reply(553)
                elif m.recipients >= m.config.max_recipients:
                    m.reply(452, overshoot=True)
                else:
                    reply = self._decide(ev.RcptTo, answer)
                    m.reply(reply.code)
                    m.recipients += reply.code == 250
        self._send(b"RCPT TO:" + path + words + b"\r\n", draw)

    @rule(
        draw=st.data(),
        lines=st.lists(BODY_LINE, max_size=8),
        answer=DATA_ANSWERS,
        end=END_ANSWERS,
    )
    def data(self, draw: st.DataObject, lines: list[bytes], answer: R.Reply, end: R.Reply) -> None:
        m = self.model
        body = stuff(lines)
        send_body = False
        if not m.closed:
            if m.state is not State.MAIL:
                m.reply(503)
            elif not m.recipients:
                m.reply(554 if m.rcpt_attempted else 503)
            else:
                reply = self._decide(ev.DataStart, answer)
                m.reply(reply.code)
                if reply.code == 354:
                    send_body = True
                    content, code = reference_content(
                        body[:-3], m.config.bare_newlines == "normalize", m.config.max_message_size
                    )
                    m.contents.append(content)
                    m.reset()
                    m.state = State.READY
                    if code is not None:
                        m.reply(code)
                    else:
                        end = self._decide(ev.MessageComplete, end)
                        if end.code == 250:
                            m.errors = 0
                        m.reply(end.code)
        # The body only follows a 354 (RFC 2920: DATA ends a pipelined group).
        self._send(b"DATA\r\n" + (body if send_body else b""), draw)

    @rule(draw=st.data(), arg=st.sampled_from([b"", b" now"]), injected=st.lists(JUNK, max_size=3))
    def starttls(self, draw: st.DataObject, arg: bytes, injected: list[bytes]) -> None:
        m = self.model
        accepted = False
        if not m.closed:
            if arg:
                m.reply(501)
            elif m.tls:
                m.reply(503)
            elif not m.config.tls_available:
                m.reply(502)
            elif not m.extended or m.state is State.MAIL:
                m.reply(503)
            else:
                reply = self._decide(ev.StartTLS, draw.draw(TLS_ANSWERS, "tls answer"))
                m.reply(reply.code)
                if reply.code == 220:
                    accepted = True
                    m.tls, m.helo, m.extended, m.state = True, False, False, State.INIT
                    m.reset()
            if not accepted:
                for _ in injected:
                    if not m.closed:
                        m.reply(500)
        self._send(
            b"STARTTLS" + arg + b"\r\n" + b"".join(x + b"\r\n" for x in injected), draw, flush=True
        )

    @rule(draw=st.data(), arg=st.sampled_from([b"", b" x"]))
    def rset(self, draw: st.DataObject, arg: bytes) -> None:
        m = self.model
        if not m.closed:
            if arg:
                m.reply(501)
            else:
                m.reply(250)
                m.reset()
                m.state = State.READY if m.helo else State.INIT
        self._send(b"RSET" + arg + b"\r\n", draw)

    @rule(
        draw=st.data(),
        command=st.sampled_from(
            [
                (b"NOOP", 250),
                (b"HELP", 214),
                (b"VRFY u", 252),
                (b"VRFY", 501),
                (b"EXPN list", 502),
                (b"AUTH PLAIN x", 502),
                (b"BDAT 10 LAST", 502),
                (b"ETRN x", 502),
                (b"", 500),
                (b"DATA junk", 501),
            ]
        ),
    )
    def simple(self, draw: st.DataObject, command: tuple[bytes, int]) -> None:
        if not self.model.closed:
            self.model.reply(command[1])
        self._send(command[0] + b"\r\n", draw)

    @rule(draw=st.data(), junk=st.one_of(JUNK, SEGMENT))
    def junk(self, draw: st.DataObject, junk: bytes) -> None:
        if not self.model.closed:
            self.model.reply(500)
        self._send(junk + b"\r\n", draw)

    @rule(
        draw=st.data(),
        segments=st.lists(SEGMENT, min_size=2, max_size=4),
        separators=st.lists(st.sampled_from([b"\r", b"\n"]), min_size=3, max_size=3),
    )
    def bare_newlines(
        self, draw: st.DataObject, segments: list[bytes], separators: list[bytes]
    ) -> None:
        line = segments[0]
        for sep, segment in zip(separators, segments[1:], strict=False):
            line += sep + segment
        line += b"\r\n"
        m = self.model
        # reject: an LF ends a line (any CR before it makes it bare); normalize: CR, LF, CRLF
        lines = line.count(b"\n") if m.config.bare_newlines == "reject" else len(segments)
        for _ in range(lines):
            if not m.closed:
                m.reply(500)
        self._send(line, draw)

    @rule(draw=st.data())
    def quit(self, draw: st.DataObject) -> None:
        if not self.model.closed:
            self.model.reply(221)
            self.model.state = State.CLOSED
        self._send(b"QUIT\r\n", draw)

    @rule(draw=st.data())
    def flush(self, draw: st.DataObject) -> None:
        self._feed(draw, flush=True)

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def replies_well_formed_and_as_modelled(self) -> None:
        if not hasattr(self, "conn"):
            return
        out = bytes(self.out)
        assert out.endswith(b"\r\n")
        codes = []
        for line in out[:-2].split(b"\r\n"):
            assert len(line) + 2 <= 512, line[:80]
            assert _REPLY_LINE.fullmatch(line), line[:80]
            if line[3:4] == b" ":
                codes.append(int(line[:3]))
        got = codes[1:]  # after the greeting
        want = self.model.codes
        settled = not self.pending and self.waiting is None
        if settled:
            assert got == want, (got, want)
        else:
            assert got == want[: len(got)], (got, want)
        assert self.contents == self.model.contents[: len(self.contents)]
        if settled:
            assert self.contents == self.model.contents
            assert not self.decisions
            assert self.conn.state is self.model.state
            assert self.conn.closed_for_errors == (
                self.model.closed and bool(want) and want[-1] == 421
            )

    @invariant()
    def closed_means_silent(self) -> None:
        if hasattr(self, "conn") and self.conn.state is State.CLOSED:
            assert self.conn.data_to_send() == b""
            assert self.conn.next_event() is NEED_DATA


TestSmtpSession = SmtpSession.TestCase
TestSmtpSession.settings = FUZZ


@pytest.mark.parametrize("normalize", [False, True])
def test_reference_unstuffer_examples(normalize: bool) -> None:
    content, code = reference_content(b"..a\r\nb\r\n", normalize, 100)
    assert (content, code) == (b".a\r\nb\r\n", None)
    content, code = reference_content(b"x\n.\nz\r\n", normalize, 100)
    if normalize:
        assert (content, code) == (b"x\r\nz\r\n", None)
    else:
        assert (content, code) == (b"x\n.\nz\r\n", 500)


# -- property tests of address and parameter parsing ------------------------------------------

PROPERTY = settings(max_examples=max(100, EXAMPLES), deadline=None)
_CONTROL_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
LOCAL_ATOM = st.text(alphabet=ATEXT + "é", min_size=1, max_size=8)
DOT_STRING = st.lists(LOCAL_ATOM, min_size=1, max_size=3).map(".".join)
QUOTED = st.text(alphabet=' !#abc[]~é"\\', max_size=8).map(
    lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"'
)
LABEL = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)
DOMAIN = st.lists(LABEL, min_size=1, max_size=3).map(".".join)
LITERAL = st.one_of(
    st.ip_addresses(v=4).map(lambda a: f"[{a}]"), st.ip_addresses(v=6).map(lambda a: f"[IPv6:{a}]")
)
WILD = st.text(
    alphabet=st.sampled_from(list('<>@"\\.:,[] aZ9é\x00\x01\x7f\x85\u2028\r\n\t')), max_size=40
)


@PROPERTY
@given(text=st.one_of(st.text(max_size=80), WILD, WILD.map(lambda t: f"<{t}>")), rev=st.booleans())
def test_parse_path_never_raises_anything_else(text: str, rev: bool) -> None:
    try:
        path = parse_path(text, reverse=rev)
    except CommandError as exc:
        assert exc.reply.code == 501
    else:
        assert not _CONTROL_TEXT.search(path.address), path
        assert all(not _CONTROL_TEXT.search(hop) for hop in path.route)


@PROPERTY
@given(
    local=st.one_of(DOT_STRING, QUOTED),
    domain=st.one_of(DOMAIN, LITERAL),
    route=st.lists(DOMAIN, max_size=2),
    rev=st.booleans(),
)
def test_parse_path_round_trip(local: str, domain: str, route: list[str], rev: bool) -> None:
    address = f"{local}@{domain}"
    adl = ",".join("@" + hop for hop in route)
    text = f"<{adl}:{address}>" if route else f"<{address}>"
    if len(text.encode()) > 256:
        return
    path = parse_path(text, reverse=rev)
    assert (path.address, path.local_part, path.domain) == (address, local, domain)
    assert path.route == tuple(route) and path.source_route == bool(route)
    assert path.quoted_local == local.startswith('"')
    assert path.address_literal == domain.startswith("[")
    assert path.ascii == text.isascii()
    # split_argument finds the same path followed by the parameter words
    assert split_argument(f"FROM:{text} SIZE=1  BODY=7BIT", "FROM") == (
        text,
        ["SIZE=1", "BODY=7BIT"],
    )


@PROPERTY
@given(arg=st.one_of(st.text(max_size=60), WILD.map(lambda t: "TO:" + t)))
def test_split_argument_never_raises_anything_else(arg: str) -> None:
    try:
        path, words = split_argument(arg, "TO")
    except CommandError as exc:
        assert exc.reply.code == 501
    else:
        assert path.startswith("<") and path.endswith(">") and all(" " not in w for w in words)


def xtext(text: str) -> str:
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in text)


WORD = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "NOTIFY", "ORCPT"]).flatmap(
        lambda k: st.text(max_size=20).map(lambda v: f"{k}={v}")
    ),
    st.binary(max_size=12).map(lambda b: "ENVID=" + "".join(f"+{x:02X}" for x in b)),
    st.text(alphabet="K", min_size=60, max_size=900),
)


@PROPERTY
@given(words=st.lists(WORD, max_size=4))
def test_parameter_parsing_never_raises_anything_else(words: list[str]) -> None:
    for parse in (parse_mail_params, parse_rcpt_params):
        try:
            params = parse(words)
        except CommandError as exc:
            assert exc.reply.code in (501, 555)
            wire = exc.reply.to_bytes()
            assert len(wire) <= 512 and _REPLY_LINE.fullmatch(wire[:-2]), wire
        else:
            for value in (getattr(params, "envid", None), getattr(params, "orcpt", None)):
                if value is not None:
                    assert printable_xtext(value), value


PRINTABLE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)


@PROPERTY
@given(
    size=st.one_of(st.none(), st.integers(0, 10**19)),
    body=st.sampled_from([None, "7BIT", "8BITMIME"]),
    smtputf8=st.booleans(),
    ret=st.sampled_from([None, "FULL", "HDRS"]),
    envid=st.one_of(st.none(), PRINTABLE.filter(lambda t: 0 < len(xtext(t)) <= 100)),
    notify=st.one_of(
        st.none(),
        st.just(("NEVER",)),
        st.lists(st.sampled_from(["SUCCESS", "FAILURE", "DELAY"]), min_size=1, unique=True).map(
            tuple
        ),
    ),
    orcpt=st.one_of(st.none(), PRINTABLE.filter(bool)),
)
def test_parameter_round_trip(
    size: int | None,
    body: str | None,
    smtputf8: bool,
    ret: str | None,
    envid: str | None,
    notify: tuple[str, ...] | None,
    orcpt: str | None,
) -> None:
    encoded = xtext(envid) if envid is not None else None
    mail = MailParams(size=size, body=body, smtputf8=smtputf8, ret=ret, envid=encoded)
    words = [f"SIZE={size}"] if size is not None else []
    words += [f"BODY={body}"] if body else []
    words += ["SMTPUTF8"] if smtputf8 else []
    words += [f"RET={ret}"] if ret else []
    words += [f"ENVID={encoded}"] if encoded is not None else []
    assert parse_mail_params(words) == mail
    assert encoded is None or xtext_decode(encoded) == envid
    rcpt = RcptParams(notify=notify, orcpt=f"rfc822;{xtext(orcpt)}" if orcpt else None)
    words = [f"NOTIFY={','.join(notify)}"] if notify else []
    words += [f"ORCPT={rcpt.orcpt}"] if rcpt.orcpt else []
    assert parse_rcpt_params(words) == rcpt
