"""The next hop in tests: a real aiosmtpd server on 127.0.0.1 that records what it receives and
can be told to misbehave (451/550 replies, refused recipients, dropped connections, hidden
extensions, slow DATA)."""

from __future__ import annotations

import asyncio
import itertools
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from tests.conftest import free_port


@dataclass
class Received:
    session: int
    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    rcpt_options: list[list[str]]
    data: bytes
    at: float
    tls: bool
    helo: str = ""
    """The client's EHLO name: which node delivered it, when nodes use different names."""


@dataclass
class Behaviour:
    data_replies: list[str] = field(default_factory=list)
    """Replies to the next DATAs, in order (then 250)."""
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    drop_in_data: int = 0
    """This many DATAs end with the connection closed instead of a reply."""
    hidden_extensions: set[str] = field(default_factory=set)
    data_delay: float = 0.0


class Recorder:
    """The aiosmtpd handler: records envelopes and bytes; misbehaves on request."""

    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self.received: list[Received] = []
        self.mail_commands = 0
        self.rcpts: list[tuple[float, str, str]] = []
        """Every RCPT TO seen: (time, address, the reply given)."""
        self.refused_data: list[tuple[float, str]] = []
        """Every DATA answered with something other than 250: (time, reply)."""
        self.active = 0
        self.max_active = 0
        self.sessions = 0
        self.lock = threading.Lock()
        self._ids = itertools.count(1)

    def reset_counters(self) -> None:
        with self.lock:
            self.max_active = self.active
            self.sessions = 0

    def opened(self) -> None:
        with self.lock:
            self.active += 1
            self.sessions += 1
            self.max_active = max(self.max_active, self.active)

    def closed(self) -> None:
        with self.lock:
            self.active -= 1

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        hidden = {name.upper() for name in self.behaviour.hidden_extensions}
        # aiosmtpd handles pipelined commands (it reads line by line) but does not say so;
        # real targets (Postfix, Exchange Online) do, so the pipelined path is the one tested.
        responses = [*responses[:-1], "250-PIPELINING", responses[-1]]
        kept = [r for r in responses if r[4:].split(" ")[0].upper() not in hidden]
        # The last line must use "250 " (no dash).
        kept = [r.replace("250 ", "250-", 1) for r in kept[:-1]] + ["250 " + kept[-1][4:]]
        return kept

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        with self.lock:
            self.mail_commands += 1
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        envelope.rcpt_options_list = []
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = self.behaviour.rcpt_replies.get(address)
        with self.lock:
            self.rcpts.append((time.time(), address, reply or "250"))
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options_list.append(list(options))
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        behaviour = self.behaviour
        if behaviour.data_delay:
            await asyncio.sleep(behaviour.data_delay)
        if behaviour.drop_in_data > 0:
            behaviour.drop_in_data -= 1
            server.transport.close()
            return "421 4.3.0 dropped"
        if behaviour.data_replies:
            reply = behaviour.data_replies.pop(0)
            if not reply.startswith("250"):
                self.refused_data.append((time.time(), reply))
                return reply
        number = next(self._ids)
        self.received.append(
            Received(
                session=id(server),
                mail_from=envelope.mail_from,
                mail_options=list(envelope.mail_options),
                rcpt_tos=list(envelope.rcpt_tos),
                rcpt_options=list(envelope.rcpt_options_list),
                data=bytes(envelope.original_content),
                at=time.time(),
                tls=server._tls_protocol is not None,
                helo=str(session.host_name),
            )
        )
        return f"250 2.0.0 Ok: queued as T{number}"

    # -- views ----------------------------------------------------------------------------
    def bodies(self) -> list[bytes]:
        return [item.data for item in self.received]

    def deliveries(self) -> list[tuple[str, bytes]]:
        """(recipient, bytes) for every recipient of every accepted transaction."""
        return [(rcpt, item.data) for item in self.received for rcpt in item.rcpt_tos]


class _CountingSMTP(SMTP):  # type: ignore[misc]
    recorder: Recorder

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.recorder.opened()
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.recorder.closed()
        super().connection_lost(error)


class _Controller(Controller):  # type: ignore[misc]
    def factory(self) -> SMTP:
        server = _CountingSMTP(self.handler, **self.SMTP_kwargs)
        server.recorder = self.handler
        return server


class Target:
    """An aiosmtpd server on 127.0.0.1:<free port> (STARTTLS when given a context)."""

    def __init__(self, tls_context: ssl.SSLContext | None = None, smtputf8: bool = True) -> None:
        self.recorder = Recorder()
        self.port = free_port()
        kwargs: dict[str, Any] = {"enable_SMTPUTF8": smtputf8, "decode_data": False}
        if tls_context is not None:
            kwargs["tls_context"] = tls_context
        self.controller = _Controller(self.recorder, hostname="127.0.0.1", port=self.port, **kwargs)

    def start(self) -> Target:
        self.controller.start()
        self.recorder.reset_counters()
        return self

    def stop(self) -> None:
        self.controller.stop()

    @property
    def behaviour(self) -> Behaviour:
        return self.recorder.behaviour
