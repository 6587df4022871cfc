"""A small SMTP target that records who connected: the peer address and, after STARTTLS, the
client certificate (a Python ssl server with CERT_OPTIONAL or CERT_REQUIRED).

aiosmtpd's Target (tests/delivery/target.py) listens on 127.0.0.1 only and does not expose the
client certificate; this one listens on 127.0.0.1 or ::1, runs in its own thread and event
loop, and answers RCPT from a table (for the 451 4.7.500 / 550 5.4.1 cases).
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

from tests.conftest import free_port

MAX_LINE = 4096


@dataclass
class Seen:
    peer: str
    tls: bool = False
    client_subject: str = ""
    """The client certificate's commonName after STARTTLS ("" when none was presented)."""
    rcpts: list[str] = field(default_factory=list)
    messages: int = 0


class IdentityTarget:
    def __init__(
        self,
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
        rcpt_replies: dict[str, str] | None = None,
        mail_reply: str = "250 2.1.0 Ok",
    ) -> None:
        self.host = host
        self.port = free_port()
        self.tls = tls
        self.rcpt_replies = rcpt_replies or {}
        self.mail_reply = mail_reply
        self.sessions: list[Seen] = []
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> IdentityTarget:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        future.result(5)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._session, self.host, self.port)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        seen = Seen(str(peer[0]))
        self.sessions.append(seen)

        async def say(text: str) -> None:
            writer.write(text.encode() + b"\r\n")
            await writer.drain()

        try:
            await say("220 target.test ESMTP")
            while True:
                line = (await reader.readline())[:MAX_LINE]
                if not line:
                    return
                verb = line.decode(errors="replace").strip()
                upper = verb.upper()
                if upper.startswith(("EHLO", "HELO")):
                    starttls = self.tls is not None and not seen.tls
                    await say(
                        "250-target.test\r\n250-PIPELINING"
                        + ("\r\n250-STARTTLS" if starttls else "")
                        + "\r\n250 8BITMIME"
                    )
                elif upper == "STARTTLS" and self.tls is not None:
                    await say("220 2.0.0 go ahead")
                    await writer.start_tls(self.tls)
                    seen.tls = True
                    cert: dict[str, Any] = writer.get_extra_info("peercert") or {}
                    for rdn in cert.get("subject", ()):
                        for key, value in rdn:
                            if key == "commonName":
                                seen.client_subject = str(value)
                elif upper.startswith("MAIL"):
                    await say(self.mail_reply)
                elif upper.startswith("RCPT"):
                    address = verb.partition("<")[2].partition(">")[0]
                    seen.rcpts.append(address)
                    await say(self.rcpt_replies.get(address, "250 2.1.5 Ok"))
                elif upper == "DATA":
                    await say("354 go ahead")
                    while (await reader.readline()) not in (b".\r\n", b""):
                        pass
                    seen.messages += 1
                    await say("250 2.0.0 Ok: queued")
                elif upper == "RSET":
                    await say("250 2.0.0 Ok")
                elif upper == "QUIT":
                    await say("221 2.0.0 Bye")
                    return
                else:
                    await say("502 5.5.2 not here")
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    @property
    def peers(self) -> list[str]:
        return [seen.peer for seen in self.sessions]
