"""A look at one SMTP hop without sending mail: EHLO, STARTTLS, certificate, SIZE, RCPT probes.

The delivery engine's ``Session`` runs whole transactions on purpose (it only knows how to
deliver); a preflight needs the opposite: every RCPT reply, then ``RSET`` and never ``DATA``.
So this module drives aiosmtplib directly, with the null reverse-path (``MAIL FROM:<>``) so a
probe can never cause a bounce, and maps every failure to a result rather than an exception.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib

from mxspool.delivery.routing import Hop
from mxspool.store.base import TlsMode

_FAILURES = (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError)


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

    def __init__(self, *, local_hostname: str, timeout: float = 30.0, ca_file: str = "") -> None:
        self.local_hostname = local_hostname
        self.timeout = timeout
        self._verify = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if ca_file:
            self._verify.load_verify_locations(cafile=ca_file)
        self._any = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self._any.check_hostname = False
        self._any.verify_mode = ssl.CERT_NONE

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
        smtp = await self._connect(report, tls, verify=True)
        if smtp is None and report.cert_verified is False:
            # The certificate did not verify: look again without verification, so the report
            # still says what the hop would answer (and whether a "require" route works).
            smtp = await self._connect(report, tls, verify=False)
        if smtp is None:
            report.total_ms = (time.perf_counter() - started) * 1000
            return report
        try:
            for start in range(0, len(rcpts), batch):
                await self._rcpt_batch(smtp, report, rcpts[start : start + batch], pace)
        except _Broken as exc:
            report.error = f"the session broke during RCPT probes: {exc}"
            seen = {result.address for result in report.rcpts}
            report.rcpts += [
                RcptResult(a, 0, "not checked: the session broke") for a in rcpts if a not in seen
            ]
        finally:
            try:
                await smtp.quit(timeout=5.0)
            except _FAILURES:
                smtp.close()
        report.total_ms = (time.perf_counter() - started) * 1000
        return report

    async def _connect(
        self, report: HopReport, tls: TlsMode, *, verify: bool
    ) -> aiosmtplib.SMTP | None:
        hop = report.hop
        smtp = aiosmtplib.SMTP(
            hostname=hop.address,
            port=hop.port,
            local_hostname=self.local_hostname,
            timeout=self.timeout,
            start_tls=False,
            use_tls=False,
        )
        began = time.perf_counter()
        try:
            banner = await smtp.connect()
            report.connect_ms = (time.perf_counter() - began) * 1000
            report.banner = f"{banner.code} {banner.message}"
            await smtp.ehlo(timeout=self.timeout)
        except _FAILURES as exc:
            smtp.close()
            report.error = f"connect/EHLO failed: {_describe(exc)}"
            return None
        report.connected = True
        report.starttls_offered = smtp.supports_extension("starttls")
        size = smtp.esmtp_extensions.get("size")
        if size is not None:
            report.size_limit = int(size) if size.strip().isdigit() else 0
        if tls is TlsMode.OFF or not report.starttls_offered:
            return smtp
        context = self._verify if verify else self._any
        try:
            await smtp.starttls(server_hostname=hop.name, tls_context=context)
            await smtp.ehlo(timeout=self.timeout)
        except _FAILURES as exc:
            smtp.close()
            # aiosmtplib raises the ssl error itself or wraps it, depending on the version.
            cause = exc if isinstance(exc, ssl.SSLError) else exc.__cause__ or exc.__context__
            if verify and isinstance(cause, ssl.SSLCertVerificationError):
                report.cert_verified = False
                report.cert_error = cause.verify_message or str(cause)
            else:
                report.error = f"STARTTLS failed: {_describe(exc)}"
            return None
        ssl_object = smtp.get_transport_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            report.tls_version = ssl_object.version()
            cipher = ssl_object.cipher()
            report.tls_cipher = cipher[0] if cipher else None
            if verify:
                report.cert_verified = True
                cert: dict[str, Any] = dict(ssl_object.getpeercert() or {})
                report.cert_subject = _name(cert.get("subject"))
                report.cert_issuer = _name(cert.get("issuer"))
                names: tuple[tuple[str, str], ...] = cert.get("subjectAltName", ())
                report.cert_names = tuple(value for kind, value in names if kind == "DNS")
                report.cert_not_after = str(cert.get("notAfter", ""))
        # After STARTTLS the hop may advertise a different SIZE (RFC 3207: forget the first).
        size = smtp.esmtp_extensions.get("size")
        if size is not None:
            report.size_limit = int(size) if size.strip().isdigit() else 0
        return smtp

    async def _rcpt_batch(
        self,
        smtp: aiosmtplib.SMTP,
        report: HopReport,
        rcpts: Sequence[str],
        pace: Callable[[], Awaitable[None]] | None,
    ) -> None:
        try:
            mail = await smtp.execute_command(b"MAIL", b"FROM:<>", timeout=self.timeout)
            report.mail_reply = f"{mail.code} {mail.message}"
            if mail.code >= 400:
                refused = f"MAIL refused: {report.mail_reply}"
                report.rcpts += [RcptResult(a, 0, refused) for a in rcpts]
                await smtp.execute_command(b"RSET", timeout=self.timeout)
                return
            for address in rcpts:
                if pace is not None:
                    await pace()
                reply = await smtp.execute_command(
                    b"RCPT", b"TO:<" + address.encode() + b">", timeout=self.timeout
                )
                report.rcpts.append(RcptResult(address, reply.code, reply.message))
            # Never DATA: the transaction is abandoned, nothing is sent.
            await smtp.execute_command(b"RSET", timeout=self.timeout)
        except (*_FAILURES, ValueError) as exc:
            seen = {result.address for result in report.rcpts}
            report.rcpts += [
                RcptResult(a, 0, f"no reply: {_describe(exc)}") for a in rcpts if a not in seen
            ]
            raise _Broken(str(exc)) from exc


class _Broken(Exception):
    """The session broke during RCPT probes; the remaining addresses were not checked."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {exc.message}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
