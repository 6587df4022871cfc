"""The SMTP listener: asyncio Protocol glue between sockets, the sans-IO core and the store.

Theory of operation
-------------------
Each connection owns one ``ServerConnection`` (the sans-IO core). Bytes from the socket go
into it; events come out. Most events are decided on the spot (MAIL: free space; RCPT: relay
policy against the in-memory domain table; DATA: start a body buffer with our Received:
header on top). Two events need the loop to wait: end of data (the durable commit) and
STARTTLS (the handshake). While one of those is in flight the transport stops reading, so a
pipelining client cannot make us buffer without bound, and the core stays PAUSED so replies go
out in command order. The commit is handed to the store with a callback
(``Store.submit_message``), not awaited in a task: one loop serves every session, and a task per
message costs CPU and one more loop iteration before the 250 leaves.

DATA pieces stream into a ``BodyBuffer`` that spills to a temporary file past a threshold, so
memory per connection stays small whatever the message size.

Idle time is checked by one timer per connection that re-arms itself lazily, not by a timer
reset on every read: a command or a DATA piece that does not arrive within ``idle_timeout``
ends the session with 421.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections import Counter
from typing import cast

from mxspool import metrics
from mxspool.body import BodyBuffer
from mxspool.config import SmtpConfig
from mxspool.ids import new_queue_id
from mxspool.intake.domains import DomainTable
from mxspool.intake.policy import relay_refusal, unknown_recipient
from mxspool.intake.received import protocol_name, received_header
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
    ) -> None:
        self.config = config
        self.store = store
        self.domains = domains
        self.min_free_space = min_free_space
        self.spill_dir = spill_dir
        self.ssl_context = ssl_context
        self.per_ip: Counter[str] = Counter()
        self.connections: set[SmtpSession] = set()
        self.core_config = ServerConfig(
            hostname=config.hostname,
            max_message_size=config.max_message_size,
            max_recipients=config.max_recipients,
            bare_newlines=config.bare_newlines,
            tls_available=ssl_context is not None,
        )
        self._free_checked_at = 0.0
        self._free_ok = True

    def protocol_factory(self) -> SmtpSession:
        return SmtpSession(self)

    def has_free_space(self) -> bool:
        """Whether the spool has room; measured at most once a second (statvfs is a syscall)."""
        now = time.monotonic()
        if now - self._free_checked_at >= 1.0:
            free = self.store.free_bytes()
            self._free_ok = free is None or free >= self.min_free_space
            self._free_checked_at = now
        return self._free_ok

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
        self.counted = False
        self.waiting = False
        self.last_activity = time.monotonic()
        self.idle_timer: asyncio.TimerHandle | None = None
        self.handshake: asyncio.Task[None] | None = None
        self.loop = asyncio.get_running_loop()

    # -- connection lifecycle -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else "unknown"
        intake = self.intake
        config = intake.config
        if (
            len(intake.connections) >= config.max_connections
            or intake.per_ip[self.peer] >= config.max_connections_per_ip
        ):
            metrics.rejected("too_many_connections")
            self.transport.write(TOO_MANY_CONNECTIONS.to_bytes())
            self.transport.close()
            return
        self.counted = True
        intake.connections.add(self)
        intake.per_ip[self.peer] += 1
        metrics.session_opened()
        self.transport.write(self.core.greeting())
        self._arm_idle_timer(config.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self._drop_body()
        if self.counted:
            self.counted = False
            metrics.session_closed()
            intake = self.intake
            intake.connections.discard(self)
            intake.per_ip[self.peer] -= 1
            if intake.per_ip[self.peer] <= 0:
                del intake.per_ip[self.peer]
        self.transport = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _arm_idle_timer(self, delay: float) -> None:
        self.idle_timer = self.loop.call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        timeout = self.intake.config.idle_timeout
        idle = time.monotonic() - self.last_activity
        if self.waiting or idle < timeout:
            # A commit in flight is our delay, not the client's.
            self._arm_idle_timer(timeout - idle if not self.waiting else timeout)
            return
        if self.transport is not None:
            self.transport.write(self.core.timeout_reply().to_bytes())
            self.transport.close()

    # -- input --------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        self.core.receive_data(data)
        self._process()

    def eof_received(self) -> bool | None:
        return None

    def _flush(self) -> None:
        out = self.core.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)

    def _process(self) -> None:
        core = self.core
        while not self.waiting and self.transport is not None:
            event = core.next_event()
            if event is NEED_DATA or event is PAUSED:
                break
            if isinstance(event, events.DataChunk):
                self._write_body(event.data)
                continue
            self._handle(event)
        # One write per batch of input: pipelined replies leave in one segment.
        self._flush()

    def _handle(self, event: object) -> None:
        core = self.core
        if isinstance(event, events.Hello):
            self.helo = event.name
            self.extended = event.extended
        elif isinstance(event, events.MailFrom):
            if not self.intake.has_free_space():
                metrics.rejected("insufficient_storage")
                core.respond(INSUFFICIENT_STORAGE)
            else:
                core.accept()
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
        elif isinstance(event, events.MessageComplete):
            self._commit(event)
        elif isinstance(event, events.MessageRejected):
            metrics.rejected(f"data_{event.reply.code}")
            self._drop_body()
        elif isinstance(event, events.StartTLS):
            self._start_tls()
        elif isinstance(event, events.Reset):
            self._drop_body()
        elif isinstance(event, events.Quit):
            self._flush()
            if self.transport is not None:
                self.transport.close()

    # -- DATA ---------------------------------------------------------------------------
    def _start_body(self) -> None:
        self._drop_body()
        intake = self.intake
        self.queue_id = new_queue_id()
        recipients = self.core.recipients
        params = self.core.mail_params
        body = BodyBuffer(intake.config.spill_threshold, intake.spill_dir)
        body.write(
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
        self.body = body

    def _write_body(self, data: bytes) -> None:
        if self.body is None:
            return
        try:
            self.body.write(data)
        except OSError as exc:
            # A full or failing spool disk: keep reading to the end of DATA, then answer 451.
            log.error("could not spool DATA of %s to disk: %s", self.queue_id, exc)
            self._drop_body()

    def _drop_body(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None

    def _commit(self, event: events.MessageComplete) -> None:
        body = self.body
        self.body = None
        if body is None:  # the spool file failed on the way in
            metrics.rejected("storage_error")
            self.core.respond(STORAGE_ERROR)
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
        )
        # The store calls back on the loop when the commit is durable; no task per message.
        self._pause()
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
        if error is None:
            metrics.message_accepted(
                (r.address for r in message.envelope.recipients), time.perf_counter() - started
            )
            self.core.respond(queued(message.id))
        else:
            if isinstance(error, StoreError):
                log.error("could not store message %s: %s", message.id, error)
            else:
                log.error("unexpected error storing message %s", message.id, exc_info=error)
            metrics.rejected("storage_error")
            self.core.respond(STORAGE_ERROR)
        self._carry_on()

    # -- waiting on the loop ------------------------------------------------------------
    def _pause(self) -> None:
        """Stop reading while the loop works on our behalf (a commit, a TLS handshake)."""
        self.waiting = True
        if self.transport is not None:
            self.transport.pause_reading()

    def _carry_on(self) -> None:
        """The wait is over: send what the core has to say and read again."""
        self.waiting = False
        self.last_activity = time.monotonic()
        if self.transport is None or self.transport.is_closing():
            return
        self._flush()
        self.transport.resume_reading()
        self._process()

    # -- STARTTLS -----------------------------------------------------------------------
    def _start_tls(self) -> None:
        context = self.intake.ssl_context
        if context is None or self.transport is None:
            self.core.respond(Reply(454, "4.7.0", "TLS not available"))
            return
        self.core.accept()
        self._flush()
        self._pause()
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
        self._carry_on()


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS for STARTTLS: TLS 1.2 or newer, the certificate and key from the configuration."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context
