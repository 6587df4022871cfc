"""The SMTP listener: asyncio Protocol glue between sockets, the sans-IO core and the store.

Theory of operation
-------------------
Each connection owns one ``ServerConnection`` (the sans-IO core). Bytes from the socket go
into it; events come out. Most events are decided on the spot (MAIL: sender policy and the disk
budget; RCPT: relay policy against the in-memory domain table; DATA: start a body buffer with our
Received: header on top). The commit is handed to the store with a callback
(``Store.submit_message``), not awaited in a task: one loop serves every session, and a task per
message costs CPU and one more loop iteration before the 250 leaves. Each connection and each
read also asks the store for commits already finished (``Store.deliver_ready``): the SQLite
store's commit thread wakes the loop through a pipe, which a busy loop reaches only after the
events ahead of it, and every client waiting for its 250 would wait that long (bench/accept.py,
10 sessions on 2 cores: the commit as the client sees it, ~1.85 ms, was ~0.4 ms of that wait).

Not reading. A session stops reading from its socket for any of four reasons, kept as a set
(``holds``); reading resumes only when the last one is gone, so the reasons compose (a drained
write buffer does not resume reading during a commit, nor the end of a commit while replies
are stuck):

- ``commit``: the durable commit of a message is in flight;
- ``handshake``: the STARTTLS handshake is in flight;
- ``write``: the client does not read its replies. The transport's write buffer has a high-water
  mark of 64 KiB (low 16 KiB); past it asyncio calls ``pause_writing`` and we read nothing more
  until ``resume_writing``. Replies to a long pipelined batch are written every 64 events, so the
  mark trips early; what the core still buffers is at most one read (256 KiB) and its replies;
- ``delay``: past ``soft_error_limit`` errors, the replies just made wait ``error_delay``
  (Postfix's smtpd_error_sleep_time): a timer, never a sleep, so the loop serves everyone else.
  The delay applies after each event the core reports (every error reply is one); replies the
  core makes without an event (NOOP, HELP, VRFY) leave with the next delayed batch.

While any hold is on, the core stays unread, so replies go out in command order and a
pipelining client cannot make us buffer without bound. At ``hard_error_limit`` errors the core
itself answers 421 4.7.0 and emits Quit; we count it (``too_many_errors``) and close.

Deadlines. One timer per connection re-arms itself lazily (no timer reset on every read) and
checks three clocks:

- ``idle_timeout``: no byte received for that long. It also runs while we hold for ``write``:
  a client that has not read its replies for ``idle_timeout`` is idle too;
- ``command_timeout``: one whole command line, from when we are ready to read it (a reply just
  written, or reading resumed), as Postfix's smtpd_timeout: a client trickling a byte at a time
  cannot keep a command open, and a client silent between commands gets no more than this;
- ``min_data_rate``: during DATA, bytes received over each complete ``data_rate_window`` (a
  window only counts once it is complete, so a slow start is not punished).

The command and DATA clocks run only while we are reading; the commit, the handshake and our
own error delay stop all three, and every clock restarts when reading resumes. A deadline
answers ``421 4.4.2 <hostname> Error: timeout exceeded`` and closes; if the client had not read
the replies already sent, it will not read this one either, so the connection is aborted at
once. Any close (QUIT, 421) that still has replies unsent after ``CLOSE_GRACE`` is aborted too:
``transport.close()`` alone would keep the socket and its connection slot until the client reads.

Slots. ``max_connections`` and ``max_connections_per_ip`` are counted by ``intake.slots``: IPv4
clients per address, IPv6 clients per ``ipv6_prefix_length`` network (a /64), IPv4-mapped IPv6
as the IPv4 address.

Disk budget (``intake.budget``). MAIL FROM takes a claim on the spool disk's free space: its
SIZE= if declared, else nothing yet; every DATA piece grows the claim to the bytes received
(memory and spilled alike). MAIL FROM is refused with 452 4.3.1 when free space minus every claim
(and its SIZE=) is under ``min_free_space``; a DATA piece that would pass that point stops the
spooling, the rest of the content is read and dropped, and the end of DATA answers 452 4.3.1.
A write error on the spill file (a full disk: ENOSPC) does the same with 451 4.3.0. Either way
nothing is committed, so the spool never holds a partial message. The claim ends with the
transaction (commit, RSET, rejected content, disconnect).

PROXY protocol. A connection from ``proxy_from`` (a load balancer) must first send a PROXY
header (v1 or v2, ``smtp.proxyproto``) within ``proxy_timeout``, before we say anything: until
then it holds a slot in ``max_connections`` only. The client it names becomes ``peer``, the one
address used for the Received: line, the per-IP slot, SPF, logs and the stored client address;
a bad or missing header closes the connection without a reply. A PROXY header from any other
address (or from the client behind the balancer) gets 421 4.7.0 and the connection is closed:
the mail is retried, not lost, once the operator lists the balancer.

Internal errors. An exception of ours in a session (building it: ``Intake.protocol_factory``;
in ``connection_made`` once the slot is taken: the reverse-name lookup, the greeting; handling
its input; answering its commit) is not left to asyncio, which would log it and close the socket
without a word, nor to the commit callback, which would leave the session waiting for its 250
forever. The client gets ``421 4.3.0 <hostname> Error: internal error, try again later`` (4.3.0,
a mail system failure, RFC 3463), so the mail is retried (a message already committed may then
arrive twice, never lost), and the connection is closed as after any 421 (aborted if the reply
is not taken within ``CLOSE_GRACE``); the error is logged once with its traceback and counted as
``internal_error``. A session that could not be built is replaced by ``_Refusal``, which says
just that and holds no slot; any other gives its slot back in ``connection_lost``.

DATA pieces stream into a ``BodyBuffer`` that spills to a temporary file past a threshold, so
memory per connection stays small whatever the message size.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import logging
import ssl
import time
from typing import cast

from mxspool import metrics
from mxspool.body import BodyBuffer
from mxspool.config import SmtpConfig
from mxspool.envelope import Envelope, Recipient
from mxspool.ids import new_queue_id
from mxspool.intake.auth import Authenticator
from mxspool.intake.budget import Claim, DiskBudget
from mxspool.intake.domains import DomainTable
from mxspool.intake.policy import (
    Accepted,
    check_recipient,
    sender_refusal,
    session_max_size,
    too_big_at_end,
)
from mxspool.intake.ptr import ReverseNames
from mxspool.intake.received import protocol_name, received_header
from mxspool.intake.slots import Slots, in_networks
from mxspool.intake.spf import SpfCheck
from mxspool.intake.trail import Trail
from mxspool.smtp import events, proxyproto
from mxspool.smtp.replies import (
    INSUFFICIENT_STORAGE,
    MESSAGE_TOO_BIG,
    RECIPIENT_UNKNOWN,
    RELAY_DENIED,
    STORAGE_ERROR,
    TOO_MANY_CONNECTIONS,
    Reply,
    internal_error,
    queued,
)
from mxspool.smtp.server import NEED_DATA, PAUSED, ServerConfig, ServerConnection
from mxspool.store.base import ClientInfo, IncomingMessage, Store, StoreError

log = logging.getLogger(__name__)

# Reasons to stop reading from a client (SmtpSession.holds); reading resumes when none is left.
COMMIT = "commit"  # the durable commit of a message is in flight
HANDSHAKE = "handshake"  # the STARTTLS handshake is in flight
WRITE = "write"  # the client has not read our replies: over the write buffer's high-water mark
DELAY = "delay"  # past soft_error_limit, the next replies wait error_delay
OUR_TIME = frozenset({COMMIT, HANDSHAKE, DELAY})  # the client's deadlines do not run meanwhile

WRITE_HIGH = 64 * 1024  # unsent reply bytes at which we stop reading (pause_writing)
WRITE_LOW = 16 * 1024  # ... and below which we read again (resume_writing)
FLUSH_EVERY = 64  # replies to pipelined commands are written at least every this many events
CLOSE_GRACE = 5.0  # seconds a closing session has to take its last replies before an abort


class Intake:
    """Server-wide state shared by all SMTP connections of one process."""

    def __init__(
        self,
        config: SmtpConfig,
        store: Store,
        domains: DomainTable,
        *,
        min_free_space: int,
        spill_dir: str | None,
        ssl_context: ssl.SSLContext | None = None,
        auth: Authenticator | None = None,
        names: ReverseNames | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.domains = domains
        self.min_free_space = min_free_space
        self.spill_dir = spill_dir
        self.ssl_context = ssl_context
        self.auth = auth
        """SPF, DKIM and DMARC at arrival (``intake.auth``); None checks nothing."""
        self.names = names
        """Clients' host names (``intake.ptr``); None looks nothing up."""
        self.slots = Slots(
            config.max_connections, config.max_connections_per_ip, config.ipv6_prefix_length
        )
        self.budget = DiskBudget(store.free_bytes, min_free_space)
        self.proxy_from = [ipaddress.ip_network(item, strict=False) for item in config.proxy_from]
        self.connections: set[SmtpSession] = set()
        self.core_config = ServerConfig(
            hostname=config.hostname,
            max_message_size=config.max_message_size,
            max_recipients=config.max_recipients,
            bare_newlines=config.bare_newlines,
            tls_available=ssl_context is not None,
            hard_error_limit=config.hard_error_limit,
        )
        self._config_generation = -2  # the domain generation core_config was made for

    def session_config(self) -> ServerConfig:
        """The core's configuration for a new session: SIZE (advertised, and enforced for
        SIZE= and DATA) is the largest any configured domain takes (intake.policy)."""
        table = self.domains
        if self._config_generation != table.generation:
            size = session_max_size(table, self.config.max_message_size)
            if size != self.core_config.max_message_size:
                self.core_config = dataclasses.replace(self.core_config, max_message_size=size)
            self._config_generation = table.generation
        return self.core_config

    def protocol_factory(self) -> asyncio.Protocol:
        try:
            return SmtpSession(self)
        except Exception:
            log.exception(
                "internal error setting up a new SMTP session; the connection is refused with "
                "421 4.3.0 and the sender will retry later. This is a bug in mxspool: please "
                "report it with this traceback"
            )
            metrics.rejected("internal_error")
            return _Refusal(internal_error(self.config.hostname).to_bytes())

    def set_ssl_context(self, context: ssl.SSLContext | None) -> None:
        """Serve ``context`` from the next STARTTLS on (a certificate reload): sessions already
        encrypted keep theirs; connections from now on offer STARTTLS if there is a context."""
        self.ssl_context = context
        self.core_config = dataclasses.replace(self.core_config, tls_available=context is not None)

    def close_all(self) -> None:
        for session in list(self.connections):
            session.abort()
        if self.names is not None:
            self.names.close()


class SmtpSession(asyncio.Protocol):
    """One SMTP connection."""

    def __init__(self, intake: Intake) -> None:
        self.intake = intake
        self.transport: asyncio.Transport | None = None
        self.core = ServerConnection(intake.session_config())
        self.accepted: list[Accepted] = []  # how each recipient in core.recipients was let in
        self.peer = "unknown"
        self.client_name: str | None = None  # forward-confirmed PTR name, once known
        self.helo = ""
        self.extended = False
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None
        self.body: BodyBuffer | None = None
        self.queue_id = ""
        self.slot: str | None = None  # the client key whose connection slot we hold
        self.counted = False  # we hold a connection slot (under ``slot`` if it is set)
        self.proxy: str | None = None  # the load balancer's address, when behind one
        self.proxy_header: bytes | None = None  # a PROXY header's bytes so far, while awaited
        self.first_bytes: bytes | None = b""  # until we know they do not begin a PROXY header
        self.holds: set[str] = set()  # why reading is paused; see the module docstring
        self.claim: Claim | None = None  # this transaction's share of the disk budget
        self.refusal: Reply | None = None  # why this DATA stopped being spooled (452 / 451)
        now = time.monotonic()
        self.last_activity = now  # the last byte received
        self.command_since = now  # when we became ready to read the current command line
        self.in_data = False  # between 354 and the end of the content
        self.window_start = now  # the current min_data_rate window
        self.window_bytes = 0
        self.timer: asyncio.TimerHandle | None = None  # the next deadline check
        self.timer_due = 0.0
        self.delay_timer: asyncio.TimerHandle | None = None
        self.close_timer: asyncio.TimerHandle | None = None
        self.handshake: asyncio.Task[None] | None = None
        self.spf_check: SpfCheck | None = None
        self.trail = Trail()  # the mail log's facts (intake.trail)
        self.loop = asyncio.get_running_loop()

    # -- connection lifecycle -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        try:
            self._open(self.transport)
        except Exception:
            self._internal_error("setting up")

    def _internal_error(self, doing: str) -> None:
        """A defect of ours in this session (call it from the ``except`` block): 421 4.3.0 so
        that the client retries, then close; logged once with the traceback. A slot taken
        (``counted``) is given back by connection_lost, after the close."""
        log.exception(
            "internal error %s the SMTP session with %s; the connection is closed with "
            "421 4.3.0 and the sender will retry later. This is a bug in mxspool: please "
            "report it with this traceback",
            doing,
            self.peer,
        )
        metrics.rejected("internal_error")
        self.trail.end = "internal_error"
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        try:
            transport.write(internal_error(self.intake.config.hostname).to_bytes())
        finally:
            self._close()

    def _open(self, transport: asyncio.Transport) -> None:
        """Take the connection's slot and greet (or, behind a balancer, await its header)."""
        self.intake.store.deliver_ready()  # as in _receive
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else "unknown"
        intake = self.intake
        if in_networks(self.peer, intake.proxy_from):
            # A load balancer: its PROXY header comes first and names the client (and the
            # slot to count it under); we say nothing until then.
            if not intake.slots.take_unknown():
                self._too_many()
                return
            self.counted = True
            self.proxy, self.proxy_header = self.peer, b""
            intake.connections.add(self)
            metrics.session_opened()
            self.timer = self.loop.call_later(intake.config.proxy_timeout, self._proxy_timeout)
            return
        key = intake.slots.key(self.peer)
        if not intake.slots.take(key):
            self._too_many()
            return
        self.slot, self.counted = key, True
        intake.connections.add(self)
        metrics.session_opened()
        self._look_up_name()
        self._greet()

    def _too_many(self) -> None:
        metrics.rejected("too_many_connections")
        self.trail.end = "too_many_connections"
        if self.transport is not None:
            self.transport.write(TOO_MANY_CONNECTIONS.to_bytes())
        self._close()

    def _greet(self) -> None:
        """220, and the deadlines of the first command start."""
        transport = self.transport
        if transport is None:
            return
        config = self.intake.config
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        transport.write(self.core.greeting())
        self.last_activity = self.command_since = time.monotonic()
        self._schedule(min(config.idle_timeout, config.command_timeout))

    # -- PROXY protocol -----------------------------------------------------------------
    def _read_proxy_header(self, data: bytes) -> None:
        """More of a load balancer's PROXY header; once whole, the session starts for the
        client it names (its bytes after the header are the client's first)."""
        received = (self.proxy_header or b"") + data
        try:
            header = proxyproto.parse(received)  # None below V1_MAX / V2_MAX_LENGTH bytes only
        except proxyproto.ProxyError as exc:
            self._drop_proxy("proxy_header", str(exc))
            return
        if header is None:
            self.proxy_header = received
            return
        self.proxy_header = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if header.source is not None:  # else (LOCAL, UNKNOWN) the balancer is the client
            self.peer = header.source[0]
        log.debug("SMTP client %s via load balancer %s", self.peer, self.proxy)
        key = self.intake.slots.key(self.peer)
        if not self.intake.slots.name_client(key):
            self._too_many()
            return
        self.slot = key
        self._look_up_name()
        self._greet()
        if len(received) > header.length:
            self.data_received(received[header.length :])

    def _look_up_name(self) -> None:
        """Start finding the client's host name (``intake.ptr``); nothing waits for it."""
        if self.intake.names is not None:
            self.intake.names.look_up(self.peer, self._named)

    def _named(self, name: str) -> None:
        self.client_name = name

    def _proxy_timeout(self) -> None:
        self.timer = None
        timeout = self.intake.config.proxy_timeout
        self._drop_proxy("proxy_timeout", f"no whole PROXY header within {timeout:g}s")

    def _drop_proxy(self, reason: str, what: str) -> None:
        """A listed load balancer did not send a valid PROXY header: close without a reply."""
        log.warning(
            "closing the connection from load balancer %s: %s; check that it sends the PROXY "
            "protocol (HAProxy: send-proxy or send-proxy-v2) or remove it from [smtp] proxy_from",
            self.proxy,
            what,
        )
        metrics.rejected(reason)
        self._close()

    def _refuse_proxy(self) -> None:
        """A PROXY header from an address not in proxy_from: 421 (the mail is retried) and close."""
        log.warning(
            "refusing a PROXY protocol header from %s, which is not in [smtp] proxy_from; if it "
            "is your load balancer, add its address or network to proxy_from",
            self.proxy or self.peer,
        )
        metrics.rejected("proxy_not_allowed")
        if self.transport is not None:
            hostname = self.intake.config.hostname
            reply = Reply(421, "4.7.0", f"{hostname} PROXY protocol not accepted here, closing")
            self.transport.write(reply.to_bytes())
        self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.timer, self.delay_timer, self.close_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.delay_timer = self.close_timer = None
        self._drop_body()
        self._release_claim()
        self.trail.close(self)
        if self.intake.names is not None:
            self.intake.names.forget(self.peer, self._named)
        if self.counted:
            metrics.session_closed()
            intake = self.intake
            intake.connections.discard(self)
            intake.slots.give_back(self.slot)
            self.slot, self.counted = None, False
        self.transport = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _close(self) -> None:
        """Close once the unsent replies have left; abort if the client does not take them."""
        transport = self.transport
        if transport is None:
            return
        transport.close()
        if transport.get_write_buffer_size() and self.close_timer is None:
            self.close_timer = self.loop.call_later(CLOSE_GRACE, transport.abort)

    # -- deadlines ----------------------------------------------------------------------
    def _schedule(self, delay: float) -> None:
        """Check the deadlines in ``delay`` seconds, unless a check is due sooner anyway."""
        due = self.loop.time() + delay
        if self.timer is not None:
            if self.timer_due <= due:
                return
            self.timer.cancel()
        self.timer_due = due
        self.timer = self.loop.call_later(delay, self._check_deadlines)

    def _check_deadlines(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        config = self.intake.config
        if self.holds & OUR_TIME:
            # A commit, a handshake or our own error delay: the client's clocks restart after.
            self._schedule(config.idle_timeout)
            return
        now = time.monotonic()
        wait = config.idle_timeout - (now - self.last_activity)
        if wait <= 0:
            self._timeout("idle_timeout")
            return
        if not self.holds:  # we are reading: the command line or DATA clock runs
            if not self.in_data:
                left = config.command_timeout - (now - self.command_since)
                if left <= 0:
                    self._timeout("command_timeout")
                    return
                wait = min(wait, left)
            elif config.min_data_rate:
                elapsed = now - self.window_start
                if elapsed >= config.data_rate_window:
                    if self.window_bytes < config.min_data_rate * elapsed:
                        self._timeout("data_rate")
                        return
                    self.window_start, self.window_bytes, elapsed = now, 0, 0.0
                wait = min(wait, config.data_rate_window - elapsed)
        self._schedule(wait)

    def _timeout(self, reason: str) -> None:
        """421 4.4.2 and close; abort at once if the client has not read what we sent."""
        transport = self.transport
        if transport is None:
            return
        log.info("closing the SMTP session with %s: %s", self.peer, reason.replace("_", " "))
        metrics.rejected(reason)
        self.trail.end = reason
        reply = self.core.timeout_reply().to_bytes()
        if transport.get_write_buffer_size():
            transport.abort()  # it did not read our last replies: it will not read this one
            return
        transport.write(reply)
        self._close()

    # -- reading, and the reasons not to ------------------------------------------------
    def _hold(self, reason: str) -> None:
        """Stop reading for ``reason``; reading resumes when every reason is gone."""
        transport = self.transport
        if not self.holds and transport is not None and not transport.is_closing():
            transport.pause_reading()
        self.holds.add(reason)

    def _release(self, reason: str) -> None:
        """``reason`` is over: send what the core has to say and, if nothing else holds us,
        read and parse again with fresh deadlines."""
        holds = self.holds
        holds.discard(reason)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._flush()
        if holds:
            return
        now = time.monotonic()
        self.last_activity = self.command_since = self.window_start = now
        self.window_bytes = 0
        transport.resume_reading()
        config = self.intake.config
        clock = config.data_rate_window if self.in_data else config.command_timeout
        self._schedule(min(config.idle_timeout, clock))
        self._process()

    def pause_writing(self) -> None:
        """The transport's unsent replies passed WRITE_HIGH: read nothing more until they drain."""
        self._hold(WRITE)

    def resume_writing(self) -> None:
        self._release(WRITE)

    def _delay_replies(self) -> None:
        """Past soft_error_limit: the replies just made leave after error_delay."""
        self._hold(DELAY)
        self.delay_timer = self.loop.call_later(self.intake.config.error_delay, self._delay_over)

    def _delay_over(self) -> None:
        self.delay_timer = None
        self._release(DELAY)

    # -- input --------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        try:
            self._receive(data)
        except Exception:
            self._internal_error("serving")

    def _receive(self, data: bytes) -> None:
        self.intake.store.deliver_ready()  # other sessions' 250s first: their clients wait on them
        self.last_activity = time.monotonic()
        if self.proxy_header is not None:
            self._read_proxy_header(data)
            return
        if self.first_bytes is not None:
            data = self.first_bytes + data
            begins = proxyproto.starts_header(data)  # decided within 12 bytes
            if begins is None:
                self.first_bytes = data
                return
            self.first_bytes = None
            if begins:
                self._refuse_proxy()
                return
        if self.in_data:
            self.window_bytes += len(data)
        self.core.receive_data(data)
        self._process()

    def eof_received(self) -> bool | None:
        return None

    def _flush(self) -> None:
        if DELAY in self.holds:
            return  # these replies wait for the error delay
        out = self.core.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)
            if not self.in_data:
                self.command_since = time.monotonic()  # the next command line's clock

    def _process(self) -> None:
        core = self.core
        config = self.intake.config
        handled = 0
        while not self.holds and self.transport is not None:
            errors = core.errors
            event = core.next_event()
            if event is NEED_DATA or event is PAUSED:
                break
            if isinstance(event, events.DataChunk):
                self._write_body(event.data)
                continue
            self._handle(event)
            transport = self.transport
            delay = errors >= config.soft_error_limit and config.error_delay > 0
            if delay and transport is not None and not transport.is_closing():
                self._delay_replies()  # Postfix smtpd_error_sleep_time
                return
            handled += 1
            if handled == FLUSH_EVERY:
                # A long pipelined batch: write as we go, so that a client that does not read
                # trips pause_writing() within a few replies instead of one read's worth.
                self._flush()
                handled = 0
        # One write per batch of input: pipelined replies leave in one segment.
        self._flush()

    def _handle(self, event: object) -> None:
        core = self.core
        if isinstance(event, events.Hello):
            self.helo = event.name
            self.extended = event.extended
        elif isinstance(event, events.MailFrom):
            refusal = sender_refusal(event.path, self.intake.config)
            if refusal is not None:
                metrics.rejected("sender_literal")
                core.respond(refusal)
                self.trail.mail(self, event.path.address, refusal)
            elif not self._claim(event.params.size):
                metrics.rejected("insufficient_storage")
                core.respond(INSUFFICIENT_STORAGE)
                self.trail.mail(self, event.path.address, INSUFFICIENT_STORAGE)
            else:
                core.accept()
                self.trail.mail(self, event.path.address)
                self.accepted = []
                auth = self.intake.auth  # SPF at arrival, in the background (intake/auth.py)
                sender = event.path.address
                self.spf_check = auth.start(self.peer, sender, self.helo) if auth else None
        elif isinstance(event, events.RcptTo):
            self._rcpt(event)
        elif isinstance(event, events.DataStart):
            self._start_body()
            core.accept()
            self.in_data = True
            self.window_start, self.window_bytes = time.monotonic(), 0
            if self.intake.config.min_data_rate:
                self._schedule(self.intake.config.data_rate_window)
        elif isinstance(event, events.MessageComplete):
            self._commit(event)
        elif isinstance(event, events.MessageRejected):
            metrics.rejected(f"data_{event.reply.code}")
            self.trail.done(self, self.queue_id, None, event.reply, queued=False)
            self.in_data = False
            self._drop_body()
            self._release_claim()
        elif isinstance(event, events.StartTLS):
            self._start_tls()
        elif isinstance(event, events.Reset):
            self.trail.abandon(self, "rset")
            self.accepted = []
            self._drop_body()
            self._release_claim()
        elif isinstance(event, events.Quit):
            self.trail.end = "too_many_errors" if core.closed_for_errors else "quit"
            if core.closed_for_errors:
                metrics.rejected("too_many_errors")
            self._flush()
            self._close()

    def _rcpt(self, event: events.RcptTo) -> None:
        """The recipient gate (intake.policy): relay, recipient list, plus addressing,
        postmaster, subdomains and sizes."""
        intake = self.intake
        verdict = check_recipient(
            event.path,
            intake.domains,
            hostname=intake.config.hostname,
            global_max=intake.config.max_message_size,
            declared_size=self.core.mail_params.size,
        )
        if isinstance(verdict, Accepted):
            self.core.accept()
            self.accepted.append(verdict)
            self.trail.rcpt(event.path.address)
            return
        if verdict is RECIPIENT_UNKNOWN:
            metrics.rejected("recipient_unknown")
        elif verdict.code == 552:
            metrics.rejected("recipient_too_big")
        elif verdict is RELAY_DENIED:
            metrics.rejected("relay_denied")
        else:
            metrics.rejected("postmaster_nowhere")
        self.core.respond(verdict)
        self.trail.rcpt(event.path.address, verdict)

    def _gate_envelope(self, size: int) -> tuple[Envelope, tuple[str, ...], dict[int, str]] | None:
        """The envelope to store (``<Postmaster>`` given its domain), each recipient's
        configured domain and the recipients parked at once for their size; None when the
        message is larger than every recipient takes (552 5.3.4)."""
        envelope = self.core.envelope()
        accepted = self.accepted
        if len(accepted) != len(envelope.recipients):  # cannot happen; store as written
            log.error("recipient gate out of step for %s; storing as received", self.queue_id)
            return envelope, (), {}
        parked = too_big_at_end(accepted, size)
        if parked is None:
            return None
        recipients = tuple(
            Recipient(item.address, rcpt.params) if item.address != rcpt.address else rcpt
            for item, rcpt in zip(accepted, envelope.recipients, strict=True)
        )
        envelope = Envelope(envelope.mail_from, envelope.mail_params, recipients)
        return envelope, tuple(item.domain for item in accepted), parked

    # -- DATA ---------------------------------------------------------------------------
    def _start_body(self) -> None:
        self._drop_body()
        intake = self.intake
        self.queue_id = new_queue_id()
        recipients = self.core.recipients
        params = self.core.mail_params
        self.refusal = None
        self.body = BodyBuffer(intake.config.spill_threshold, intake.spill_dir)
        self._write_body(
            received_header(
                helo=self.helo,
                client_address=self.peer,
                client_hostname=self.client_name,
                hostname=intake.config.hostname,
                protocol=protocol_name(
                    self.extended, self.tls_version is not None, params.smtputf8
                ),
                queue_id=self.queue_id,
                recipient=recipients[0].address if len(recipients) == 1 else None,
                tls_version=self.tls_version,
                tls_cipher=self.tls_cipher,
            )
        )

    def _write_body(self, data: bytes) -> None:
        body = self.body
        if body is None:
            return
        claim = self.claim
        if claim is not None and not claim.grow_to(body.size + len(data)):
            # Over the disk budget: spool no more, read to the end of DATA, answer 452 4.3.1.
            self.refusal = INSUFFICIENT_STORAGE
            self._drop_body()
            return
        try:
            body.write(data)
        except OSError as exc:
            # A full or failing spool disk: keep reading to the end of DATA, then answer 451.
            log.error("could not spool DATA of %s to disk: %s", self.queue_id, exc)
            self.refusal = STORAGE_ERROR
            self._drop_body()

    def _claim(self, size: int | None) -> bool:
        """Take this transaction's share of the disk budget (SIZE= if declared); False when
        there is no room."""
        self._release_claim()
        self.claim = self.intake.budget.claim(size or 0)
        return self.claim is not None

    def _release_claim(self, *, stored: bool = False) -> None:
        if self.claim is not None:
            self.claim.release(stored=stored)
            self.claim = None

    def _drop_body(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None

    def _commit(self, event: events.MessageComplete) -> None:
        body = self.body
        self.body = None
        self.in_data = False
        if body is None:  # over the disk budget, or the spool file failed on the way in
            reply = self.refusal or STORAGE_ERROR
            metrics.rejected(
                "insufficient_storage" if reply is INSUFFICIENT_STORAGE else "storage_error"
            )
            self._release_claim()
            self.core.respond(reply)
            self.trail.done(self, self.queue_id, None, reply, queued=False)
            return
        gated = self._gate_envelope(body.size)
        self.accepted = []
        if gated is None:  # larger than every recipient's mailbox takes: nothing is stored
            body.close()
            metrics.rejected("message_too_big")
            self._release_claim()
            self.core.respond(MESSAGE_TOO_BIG)
            self.trail.done(self, self.queue_id, body.size, MESSAGE_TOO_BIG, queued=False)
            return
        envelope, domains, parked = gated
        message = IncomingMessage(
            id=self.queue_id,
            envelope=envelope,
            client=ClientInfo(
                address=self.peer,
                helo=self.helo,
                hostname=self.client_name,
                tls_version=self.tls_version,
                tls_cipher=self.tls_cipher,
            ),
            received_at=time.time(),
            message_id=event.message_id,
            body=body,
            domains=domains,
            parked=parked,
        )
        # The store calls back on the loop when the commit is durable; no task per message.
        self._hold(COMMIT)
        started = time.perf_counter()
        try:
            self.intake.store.submit_message(
                message, functools.partial(self._stored, message, started)
            )
        except Exception as exc:
            self.loop.call_soon(self._stored, message, started, exc)

    def _stored(
        self, message: IncomingMessage, started: float, error: BaseException | None
    ) -> None:
        """The store's answer to ``submit_message``: 250 (or 451) and read again."""
        try:
            self._answer(message, started, error)
        except Exception:  # else the session would wait for its commit forever
            message.body.close()  # (handing it to the verdict is the answer's last step)
            self._internal_error("answering the commit of a message in")

    def _answer(
        self, message: IncomingMessage, started: float, error: BaseException | None
    ) -> None:
        auth = self.intake.auth if error is None else None
        spf_check = self.spf_check
        if auth is None:
            message.body.close()  # else the verdict reads it, then closes it
        self._release_claim(stored=error is None)
        if error is None:
            metrics.message_accepted(
                (r.address for r in message.envelope.recipients), time.perf_counter() - started
            )
            reply = queued(message.id)
            self.core.respond(reply)
            self.trail.done(self, message.id, message.body.size, reply, queued=True)
        else:
            if isinstance(error, StoreError):
                log.error("could not store message %s: %s", message.id, error)
            else:
                log.error("unexpected error storing message %s", message.id, exc_info=error)
            metrics.rejected("storage_error")
            self.core.respond(STORAGE_ERROR)
            self.trail.done(self, message.id, message.body.size, STORAGE_ERROR, queued=False)
        self._release(COMMIT)
        if auth is not None:  # SPF, DKIM, DMARC once the 250 is written (intake/auth.py)
            auth.submit(message, spf_check)

    # -- STARTTLS -----------------------------------------------------------------------
    def _start_tls(self) -> None:
        context = self.intake.ssl_context
        if context is None or self.transport is None:
            self.core.respond(Reply(454, "4.7.0", "TLS not available"))
            return
        self.core.accept()
        self._flush()
        self._hold(HANDSHAKE)
        self.handshake = self.loop.create_task(self._handshake(context))

    async def _handshake(self, context: ssl.SSLContext) -> None:
        transport = self.transport
        if transport is None:
            return
        try:
            new_transport = await self.loop.start_tls(transport, self, context, server_side=True)
            if new_transport is None:
                raise ConnectionError("TLS handshake did not complete")
        except asyncio.CancelledError:
            self.abort()
            raise
        except Exception as exc:
            log.debug("TLS handshake with %s failed: %s", self.peer, exc)
            self.abort()
            return
        self.transport = new_transport
        ssl_object = new_transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.tls_version = ssl_object.version()
            cipher = ssl_object.cipher()
            self.tls_cipher = cipher[0] if cipher else None
        # A new transport: its own write buffer, which starts empty and not paused.
        new_transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        self.holds.discard(WRITE)
        self._release(HANDSHAKE)


class _Refusal(asyncio.Protocol):
    """A connection whose session could not be built (``Intake.protocol_factory``): the 421
    made for it, then close; abort if the client has not taken it after CLOSE_GRACE. It holds
    no connection slot."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.abort_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = cast(asyncio.Transport, transport)
        writer.write(self.reply)
        writer.close()
        if writer.get_write_buffer_size():
            self.abort_timer = asyncio.get_running_loop().call_later(CLOSE_GRACE, writer.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.abort_timer is not None:
            self.abort_timer.cancel()
            self.abort_timer = None


# TLS 1.2 ciphers: forward secret AEAD only (Mozilla's "intermediate" set less DHE, for which no
# DH parameters are loaded). Python's default list adds CBC with SHA-256/384, which testssl.sh
# rates LOW (LUCKY13). TLS 1.3 keeps OpenSSL's suites (all AEAD).
SERVER_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS for STARTTLS: TLS 1.2 or newer, ECDHE with AES-GCM or ChaCha20 in the server's order,
    no renegotiation, no compression; the certificate and key from the configuration."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(SERVER_CIPHERS)
    # OpenSSL 3 refuses client-initiated renegotiation by default, 1.1.1 does not: say it.
    context.options |= (
        ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
    )
    context.load_cert_chain(cert, key)
    return context
