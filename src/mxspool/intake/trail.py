"""What one SMTP session tells the mail log (mxspool.maillog): a line per transaction and a
line when the session ends.

The listener reports the facts as they happen (MAIL FROM and its reply, each RCPT and its
reply, how DATA ended); a transaction's line is written when it ends: ``queued`` only after the
durable commit (the 250 has just been made), ``rejected`` when its DATA was refused,
``abandoned`` when RSET, QUIT or a lost connection ends it before DATA. Replies the SMTP core
makes on its own (syntax errors, commands out of order, over max_recipients) are not seen here;
the session line counts the transactions and says how the session ended.
"""

from __future__ import annotations

import time
from typing import Protocol

from mxspool import maillog
from mxspool.smtp.replies import MAIL_OK, RCPT_OK, Reply

SMTPD = "smtpd"


class SessionFacts(Protocol):
    """What the listener's session knows about its client (SmtpSession)."""

    peer: str
    client_name: str | None
    helo: str
    proxy: str | None
    tls_version: str | None
    tls_cipher: str | None


def _reply(reply: Reply) -> str:
    return str(reply)


def _client(session: SessionFacts) -> dict[str, maillog.Value]:
    """client=name[IP] (``unknown`` until a forward-confirmed name is known: intake.ptr),
    HELO, TLS, the load balancer."""
    tls = None
    if session.tls_version is not None:
        tls = f"{session.tls_version}:{session.tls_cipher or '?'}"
    return {
        "client": f"{session.client_name or 'unknown'}[{session.peer}]",
        "proxy": session.proxy,
        "helo": session.helo or None,
        "tls": tls,
    }


class Trail:
    """One session's open transaction and counts."""

    __slots__ = ("accepted", "end", "mail_from", "messages", "rcpts", "since", "started")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.since = 0.0  # when the open transaction's MAIL FROM came
        self.mail_from: str | None = None  # None: no transaction open
        self.rcpts: list[str] = []  # "<address> reply", in order
        self.accepted = 0  # recipients answered 2xx
        self.messages = 0
        self.end = "lost"
        """How the session ended: quit, lost (closed by the client), a timeout's name..."""

    def mail(self, session: SessionFacts, address: str, reply: Reply | None = None) -> None:
        """MAIL FROM answered (None: accepted with the usual 250); a refusal is logged now."""
        self.abandon(session, "mail")
        reply = reply or MAIL_OK
        if reply.code >= 400:
            fields = _client(session) | {"from": f"<{address}>", "reply": _reply(reply)}
            maillog.emit(SMTPD, "rejected", maillog.NOQUEUE, fields)
            return
        self.mail_from, self.rcpts, self.accepted = address, [], 0
        self.since = time.monotonic()

    def rcpt(self, address: str, reply: Reply | None = None) -> None:
        if self.mail_from is not None:
            reply = reply or RCPT_OK
            self.rcpts.append(f"<{address}> {_reply(reply)}")
            self.accepted += reply.code < 300

    def done(
        self, session: SessionFacts, queue_id: str, size: int | None, reply: Reply, queued: bool
    ) -> None:
        """DATA answered: ``queued`` (after the commit) or refused."""
        if queued:
            self.messages += 1
        self._emit(session, "queued" if queued else "rejected", queue_id, size, reply)

    def abandon(self, session: SessionFacts, why: str) -> None:
        """The open transaction (if any) ends without DATA: RSET, a new MAIL, QUIT, lost."""
        if self.mail_from is not None:
            self._emit(session, "abandoned", maillog.NOQUEUE, None, None, why=why)

    def close(self, session: SessionFacts) -> None:
        """The connection is gone: the open transaction, then the session line."""
        self.abandon(session, self.end)
        fields = _client(session) | {
            "messages": self.messages,
            "end": self.end,
            "elapsed": time.monotonic() - self.started,
        }
        maillog.emit(SMTPD, "disconnect", maillog.NOQUEUE, fields)

    def _emit(
        self,
        session: SessionFacts,
        event: str,
        queue_id: str,
        size: int | None,
        reply: Reply | None,
        *,
        why: str | None = None,
    ) -> None:
        if maillog.enabled():
            fields = _client(session) | {
                "from": f"<{self.mail_from or ''}>",
                "rcpt": self.rcpts,
                "nrcpt": self.accepted,
                "size": size,
                "reply": _reply(reply) if reply is not None else None,
                "why": why,
                "elapsed": time.monotonic() - self.since,
            }
            maillog.emit(SMTPD, event, queue_id, fields)
        self.mail_from, self.rcpts = None, []
