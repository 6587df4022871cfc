"""A look at one SMTP hop without sending mail: EHLO, STARTTLS, certificate, SIZE, RCPT probes.

The delivery engine's ``Session.send`` runs whole transactions on purpose (it only knows how to
deliver); a preflight needs the opposite: every RCPT reply, then ``RSET`` and never ``DATA``.
So this module drives the same client (``delivery.smtpclient``) one step at a time, with the
null reverse-path (``MAIL FROM:<>``) so a probe can never cause a bounce, and maps every
failure to a result rather than an exception.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mxspool.delivery.errors import DeliveryError, TlsFailed
from mxspool.delivery.identity import NO_IDENTITY, OutboundIdentity
from mxspool.delivery.routing import Hop
from mxspool.delivery.smtpclient import SmtpConnector, SmtpSession
from mxspool.store.base import TlsMode


@dataclass(frozen=True, slots=True)
class RcptResult:
    address: str
    code: int
    """The reply code; 0 when no reply came (connection lost, MAIL refused...)."""
    reply: str


@dataclass(slots=True)
class HopReport:
    hop: Hop
    connected: bool = False
    error: str = ""
    banner: str = ""
    connect_ms: float | None = None
    """Connection, greeting and EHLO."""
    total_ms: float | None = None
    starttls_offered: bool = False
    tls_version: str | None = None
    tls_cipher: str | None = None
    cert_verified: bool | None = None
    """True valid chain and name, False invalid, None no TLS or not checked."""
    cert_error: str = ""
    cert_subject: str = ""
    cert_issuer: str = ""
    cert_names: tuple[str, ...] = ()
    cert_not_after: str = ""
    size_limit: int | None = None
    """SIZE from EHLO (0: advertised without a limit); None: not advertised."""
    local_address: str | None = None
    """The address the spooler connected from (as bound here, before any NAT)."""
    client_cert_presented: bool = False
    """A client certificate was configured and the TLS session with it was established (it is
    sent when the hop asks for one; whether it asked is not observable)."""
    mail_reply: str = ""
    rcpts: list[RcptResult] = field(default_factory=list)


def _name(parts: Any) -> str:
    # getpeercert() gives ((("commonName", "x"),), ...); keep CN or O, the readable parts.
    for rdn in parts or ():
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    for rdn in parts or ():
        for key, value in rdn:
            if key == "organizationName":
                return str(value)
    return ""


class SmtpProber:
    """Opens probing sessions to hops; one instance per command run."""

    def __init__(
        self,
        *,
        local_hostname: str,
        timeout: float = 30.0,
        ca_file: str = "",
        identity: OutboundIdentity = NO_IDENTITY,
    ) -> None:
        self.local_hostname = local_hostname
        self.timeout = timeout
        self.identity = identity
        self._client = SmtpConnector(
            local_hostname=local_hostname,
            connect_timeout=timeout,
            ca_file=ca_file,
            command_timeout=timeout,
            final_timeout=timeout,
            identity=identity,
        )

    async def examine(
        self,
        hop: Hop,
        tls: TlsMode,
        rcpts: Sequence[str] = (),
        batch: int = 50,
        pace: Callable[[], Awaitable[None]] | None = None,
    ) -> HopReport:
        """Connect, EHLO, STARTTLS (unless tls is off), then RCPT-probe ``rcpts``.

        ``pace`` is awaited before each RCPT (a rate limit shared by concurrent probes).
        """
        report = HopReport(hop)
        started = time.perf_counter()
        session = await self._connect(report, tls, verify=True)
        if session is None and report.cert_verified is False:
            # The certificate did not verify: look again without verification, so the report
            # still says what the hop would answer (and whether a "require" route works).
            session = await self._connect(report, tls, verify=False)
        if session is None:
            report.total_ms = (time.perf_counter() - started) * 1000
            return report
        try:
            for start in range(0, len(rcpts), batch):
                await self._rcpt_batch(session, report, rcpts[start : start + batch], pace)
        except _Broken as exc:
            report.error = f"the session broke during RCPT probes: {exc}"
            seen = {result.address for result in report.rcpts}
            report.rcpts += [
                RcptResult(a, 0, "not checked: the session broke") for a in rcpts if a not in seen
            ]
        finally:
            await session.close()
        report.total_ms = (time.perf_counter() - started) * 1000
        return report

    async def _connect(
        self, report: HopReport, tls: TlsMode, *, verify: bool
    ) -> SmtpSession | None:
        hop = report.hop
        began = time.perf_counter()
        try:
            session = await self._client.connect(hop)
        except DeliveryError as exc:
            report.error = f"connect/EHLO failed: {exc}"
            return None
        report.connect_ms = (time.perf_counter() - began) * 1000
        report.local_address = session.local_address
        report.banner = str(session.greeting)
        report.connected = True
        report.starttls_offered = session.offers("starttls")
        _size(report, session)
        if tls is TlsMode.OFF or not report.starttls_offered:
            return session
        try:
            await self._client.starttls(session, verify=verify)
        except TlsFailed as exc:
            cause = exc.__cause__
            if verify and isinstance(cause, ssl.SSLCertVerificationError):
                report.cert_verified = False
                report.cert_error = cause.verify_message or str(cause)
            else:
                report.error = f"STARTTLS failed: {exc}"
            return None
        tls_object = session.ssl_object
        if tls_object is not None:
            report.client_cert_presented = self.identity.client_cert is not None
            report.tls_version = tls_object.version()
            cipher = tls_object.cipher()
            report.tls_cipher = cipher[0] if cipher else None
            if verify:
                report.cert_verified = True
                cert: dict[str, Any] = dict(tls_object.getpeercert() or {})
                report.cert_subject = _name(cert.get("subject"))
                report.cert_issuer = _name(cert.get("issuer"))
                names: tuple[tuple[str, str], ...] = cert.get("subjectAltName", ())
                report.cert_names = tuple(value for kind, value in names if kind == "DNS")
                report.cert_not_after = str(cert.get("notAfter", ""))
        # After STARTTLS the hop may advertise a different SIZE (RFC 3207: forget the first).
        _size(report, session)
        return session

    async def _rcpt_batch(
        self,
        session: SmtpSession,
        report: HopReport,
        rcpts: Sequence[str],
        pace: Callable[[], Awaitable[None]] | None,
    ) -> None:
        try:
            mail = await session.command(b"MAIL", b"FROM:<>")
            report.mail_reply = str(mail)
            if mail.code >= 400:
                refused = f"MAIL refused: {report.mail_reply}"
                report.rcpts += [RcptResult(a, 0, refused) for a in rcpts]
                await session.command(b"RSET")
                return
            for address in rcpts:
                if pace is not None:
                    await pace()
                reply = await session.command(b"RCPT", b"TO:<" + address.encode() + b">")
                report.rcpts.append(RcptResult(address, reply.code, reply.message))
            # Never DATA: the transaction is abandoned, nothing is sent.
            await session.command(b"RSET")
        except DeliveryError as exc:
            seen = {result.address for result in report.rcpts}
            report.rcpts += [RcptResult(a, 0, f"no reply: {exc}") for a in rcpts if a not in seen]
            raise _Broken(str(exc)) from exc


def _size(report: HopReport, session: SmtpSession) -> None:
    """SIZE from the last EHLO, when advertised (0: advertised without a limit)."""
    size = session.extensions.get("size")
    if size is not None:
        report.size_limit = int(size) if size.strip().isdigit() else 0


class _Broken(Exception):
    """The session broke during RCPT probes; the remaining addresses were not checked."""
