"""Serve a changed certificate to new connections without a restart.

The pair of files is looked at every ``[smtp] tls_reload_interval`` (one ``stat`` each: device,
inode, size and mtime, following symlinks) and on SIGHUP. A changed pair is read, checked with
:mod:`mxspool.tls.certinfo` and loaded into a NEW ``ssl.SSLContext``, which is then handed to
the listener: STARTTLS handshakes from then on use it, sessions already encrypted keep theirs.
A pair that cannot be served (missing, not PEM, key of another certificate) is refused with one
ERROR line naming the file, and the previous context stays in use, so a half-done copy never
takes STARTTLS down. The files are compared before and after reading: a pair that changed while
it was read is read again.

While the served certificate has less than ``[smtp] tls_expiry_warning`` left, a WARNING line
says so at load and then every few hours; the gauge ``mxspool_tls_certificate_expiry_seconds``
tells monitoring.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Callable

from mxspool import metrics
from mxspool.intake.listener import server_ssl_context
from mxspool.tls.certinfo import CertificateError, CertSummary, covers, read_pair
from mxspool.tls.files import CertPaths

log = logging.getLogger("mxspool.tls")

WARN_EVERY = 6 * 3600.0
"""Seconds between two expiry WARNING lines for the same certificate."""
READ_ATTEMPTS = 3
"""Times a pair that changes while it is read is read again before giving up for this round."""

Signature = tuple[tuple[int, int, int, int], tuple[int, int, int, int]] | None
Apply = Callable[[ssl.SSLContext], None]


def _stat(path: str | os.PathLike[str]) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class CertificateReloader:
    def __init__(
        self,
        paths: CertPaths,
        apply: Apply,
        *,
        warn_before: float,
        hostname: str,
        required: bool = True,
    ) -> None:
        self.paths = paths
        self.apply = apply
        self.warn_before = warn_before
        self.hostname = hostname
        self.required = required
        """False with ACME: no pair yet is normal until the first certificate arrives."""
        self.context: ssl.SSLContext | None = None
        self.current: CertSummary | None = None
        self._seen: Signature = None
        self._last_warning = -float("inf")

    def signature(self) -> Signature:
        try:
            return (_stat(self.paths.cert), _stat(self.paths.key))
        except OSError:
            return None

    def load_initial(self) -> ssl.SSLContext | None:
        """The pair at start; CertificateError when it is required and cannot be served."""
        self._seen = self.signature()
        if self._seen is None and not self.required:
            log.info(
                "no TLS certificate at %s yet; STARTTLS is offered once ACME has one",
                self.paths.cert,
            )
            return None
        context, summary = self._read()
        self._install(context, summary, "at start")
        return context

    def reload(self, reason: str) -> bool:
        """Load the pair now; False (old context kept, ERROR logged) when it cannot be served."""
        self._seen = self.signature()
        try:
            context, summary = self._read()
        except CertificateError as exc:
            metrics.tls_certificate_failed()
            kept = (
                f"still serving the previous certificate (serial {self.current.serial}, "
                f"expires {self.current.not_after:%Y-%m-%d %H:%M}Z)"
                if self.current is not None
                else "STARTTLS stays unavailable"
            )
            log.error(
                "TLS certificate not reloaded (%s): %s; %s. Fix the files (or put the previous "
                "ones back); they are looked at again when they change or on SIGHUP",
                reason,
                exc,
                kept,
            )
            return False
        self._install(context, summary, reason)
        return True

    def poll(self) -> None:
        """Reload if the files changed since they were last looked at."""
        signature = self.signature()
        if signature == self._seen:
            return
        if signature is None and self._seen is not None and self.current is not None:
            self._seen = None
            log.error(
                "TLS certificate files %s / %s are gone; still serving the loaded certificate "
                "(serial %s) until they are back",
                self.paths.cert,
                self.paths.key,
                self.current.serial,
            )
            metrics.tls_certificate_failed()
            return
        if signature is None:
            self._seen = None
            return
        self.reload("the files changed")

    def warn_if_expiring(self, now: float | None = None) -> None:
        summary = self.current
        if summary is None:
            return
        now = time.monotonic() if now is None else now
        left = summary.seconds_left()
        if left >= self.warn_before or now - self._last_warning < WARN_EVERY:
            return
        self._last_warning = now
        if left <= 0:
            log.error(
                "TLS certificate %s EXPIRED at %s: senders that verify refuse STARTTLS; "
                "replace %s and %s (or check ACME: mxspool acme issue)",
                summary.subject,
                f"{summary.not_after:%Y-%m-%d %H:%M}Z",
                self.paths.cert,
                self.paths.key,
            )
            return
        log.warning(
            "TLS certificate %s (serial %s) expires in %.1f days, at %s, below the %.0f-day "
            "warning threshold: renew it and replace %s (checked again every few hours)",
            summary.subject,
            summary.serial,
            left / 86400,
            f"{summary.not_after:%Y-%m-%d %H:%M}Z",
            self.warn_before / 86400,
            self.paths.cert,
        )

    async def run(self, interval: float) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.poll()
                self.warn_if_expiring()
            except Exception:  # a bug here must not stop STARTTLS or the node
                log.exception("TLS certificate poll failed; trying again in %.0f s", interval)

    def _read(self) -> tuple[ssl.SSLContext, CertSummary]:
        for _attempt in range(READ_ATTEMPTS):
            before = self.signature()
            if before is None:
                raise CertificateError(
                    f"certificate {self.paths.cert} or key {self.paths.key} does not exist"
                )
            pair = read_pair(self.paths.cert, self.paths.key)
            try:
                context = server_ssl_context(str(self.paths.cert), str(self.paths.key))
            except (ssl.SSLError, OSError) as exc:
                if self.signature() != before:
                    continue
                raise CertificateError(f"OpenSSL refuses the pair: {exc}") from None
            if self.signature() == before:
                self._seen = before
                return context, pair.leaf
        raise CertificateError("the files kept changing while they were read")

    def _install(self, context: ssl.SSLContext, summary: CertSummary, reason: str) -> None:
        self.context = context
        self.current = summary
        self.apply(context)
        metrics.tls_certificate_loaded(summary.not_after.timestamp())
        log.info(
            "TLS certificate loaded (%s): %s, issuer %s, serial %s, expires %s (%.1f days)",
            reason,
            ", ".join(summary.names) or summary.subject,
            summary.issuer,
            summary.serial,
            f"{summary.not_after:%Y-%m-%d %H:%M}Z",
            summary.seconds_left() / 86400,
        )
        if not covers(summary.names, self.hostname):
            log.warning(
                "TLS certificate names (%s) do not cover [smtp] hostname %s: senders that "
                "verify the name refuse it; see 'mxspool check tls'",
                ", ".join(summary.names) or "none",
                self.hostname,
            )
        self._last_warning = -float("inf")
        self.warn_if_expiring()
