"""The SMTP listener: asyncio Protocol glue between sockets, the sans-IO core and the store.

Theory of operation
-------------------
Each connection owns one ``ServerConnection`` (the sans-IO core). Bytes from the socket go
into it; events come out. Most events are decided on the spot (MAIL: sender policy and the disk
budget; RCPT: relay policy against the in-memory domain table; DATA: start a body buffer with our
Received: header on top). The commit is handed to the store with a callback
(``Store.submit_message``), not awaited in a task: one loop serves every session, and a task per
message costs CPU and one more loop iteration before the 250 leaves.

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

DATA pieces stream into a ``BodyBuffer`` that spills to a temporary file past a threshold, so
memory per connection stays small whatever the message size.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from typing import cast

from mxspool import metrics
from mxspool.body import BodyBuffer
from mxspool.config import SmtpConfig
from mxspool.ids import new_queue_id
from mxspool.intake.budget import Claim, DiskBudget
from mxspool.intake.domains import DomainTable
from mxspool.intake.policy import relay_refusal, sender_refusal, unknown_recipient
from mxspool.intake.received import protocol_name, received_header
from mxspool.intake.slots import Slots
from mxspool.intake.spf import SpfCheck, SpfChecker
from mxspool.smtp import events
from mxspool.smtp.replies import (
    INSUFFICIENT_STORAGE,
    RECIPIENT_UNKNOWN,
    STORAGE_ERROR,
    TOO_MANY_CONNECTIONS,
    Reply,
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
        spf: SpfChecker | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.domains = domains
        self.min_free_space = min_free_space
        self.spill_dir = spill_dir
        self.ssl_context = ssl_context
        self.spf = spf
        """SPF at arrival (``intake.spf``); None checks nothing."""
        self.slots = Slots(
            config.max_connections, config.max_connections_per_ip, config.ipv6_prefix_length
        )
        self.budget = DiskBudget(store.free_bytes, min_free_space)
        self.connections: set[SmtpSession] = set()
        self.core_config = ServerConfig(
            hostname=config.hostname,
            max_message_size=config.max_message_size,
            max_recipients=config.max_recipients,
            bare_newlines=config.bare_newlines,
            tls_available=ssl_context is not None,
            hard_error_limit=config.hard_error_limit,
        )

    def protocol_factory(self) -> SmtpSession:
        return SmtpSession(self)

    def close_all(self) -> None:
        for session in list(self.connections):
            session.abort()


class SmtpSession(asyncio.Protocol):
    """One SMTP connection."""

    def __init__(self, intake: Intake) -> None:
        self.intake = intake
        self.transport: asyncio.Transport | None = None
        self.core = ServerConnection(intake.core_config)
        self.peer = "unknown"
        self.helo = ""
        self.extended = False
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None
        self.body: BodyBuffer | None = None
        self.queue_id = ""
        self.slot: str | None = None  # the client key whose connection slot we hold
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
        self.loop = asyncio.get_running_loop()

    # -- connection lifecycle -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else "unknown"
        intake = self.intake
        config = intake.config
        key = intake.slots.key(self.peer)
        if not intake.slots.take(key):
            metrics.rejected("too_many_connections")
            self.transport.write(TOO_MANY_CONNECTIONS.to_bytes())
            self._close()
            return
        self.slot = key
        intake.connections.add(self)
        metrics.session_opened()
        self.transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        self.transport.write(self.core.greeting())
        self._schedule(min(config.idle_timeout, config.command_timeout))

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.timer, self.delay_timer, self.close_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.delay_timer = self.close_timer = None
        self._drop_body()
        self._release_claim()
        if self.slot is not None:
            metrics.session_closed()
            intake = self.intake
            intake.connections.discard(self)
            intake.slots.give_back(self.slot)
            self.slot = None
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
        self.last_activity = time.monotonic()
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
            elif not self._claim(event.params.size):
                metrics.rejected("insufficient_storage")
                core.respond(INSUFFICIENT_STORAGE)
            else:
                core.accept()
                spf = self.intake.spf  # SPF at arrival, in the background (intake/spf.py)
                sender = event.path.address
                self.spf_check = spf.start(self.peer, sender, self.helo) if spf else None
        elif isinstance(event, events.RcptTo):
            refusal = relay_refusal(event.path, self.intake.domains)
            if refusal is not None:
                metrics.rejected("relay_denied")
                core.respond(refusal)
            elif unknown_recipient(event.path, self.intake.domains.recipients) is not None:
                metrics.rejected("recipient_unknown")
                core.respond(RECIPIENT_UNKNOWN)
            else:
                core.accept()
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
            self.in_data = False
            self._drop_body()
            self._release_claim()
        elif isinstance(event, events.StartTLS):
            self._start_tls()
        elif isinstance(event, events.Reset):
            self._drop_body()
            self._release_claim()
        elif isinstance(event, events.Quit):
            if core.closed_for_errors:
                metrics.rejected("too_many_errors")
            self._flush()
            self._close()

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
                client_hostname=None,
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
            return
        core = self.core
        message = IncomingMessage(
            id=self.queue_id,
            envelope=core.envelope(),
            client=ClientInfo(
                address=self.peer,
                helo=self.helo,
                tls_version=self.tls_version,
                tls_cipher=self.tls_cipher,
            ),
            received_at=time.time(),
            message_id=event.message_id,
            body=body,
            tags=self.spf_check.tags() if self.spf_check else (),
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
        message.body.close()
        self._release_claim(stored=error is None)
        if error is None:
            metrics.message_accepted(
                (r.address for r in message.envelope.recipients), time.perf_counter() - started
            )
            self.core.respond(queued(message.id))
            if self.spf_check is not None:  # a result not in yet is tagged when it comes
                self.spf_check.settle(self.intake.store, message.id)
        else:
            if isinstance(error, StoreError):
                log.error("could not store message %s: %s", message.id, error)
            else:
                log.error("unexpected error storing message %s", message.id, exc_info=error)
            metrics.rejected("storage_error")
            self.core.respond(STORAGE_ERROR)
        self._release(COMMIT)

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
