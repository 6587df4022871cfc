"""STARTTLS's certificate in ``mxspool serve``: the reloader, SIGHUP and the ACME task wired
for the listener. :mod:`mxspool.service` asks this module for the first context and the tasks
to run; the listener gets every new context through ``Intake.set_ssl_context``.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable

from mxspool.config import Config
from mxspool.tls.certinfo import CertSummary
from mxspool.tls.files import served_paths
from mxspool.tls.issuer import AcmeSettings
from mxspool.tls.reloader import CertificateReloader
from mxspool.tls.renewal import renew_forever

log = logging.getLogger("mxspool.tls")


class ServerTls:
    """Created before the listener; ``start`` once the listener exists."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.reloader: CertificateReloader | None = None
        self._apply: Callable[[ssl.SSLContext], None] = lambda _context: None
        paths = served_paths(config)
        if paths is not None:
            self.reloader = CertificateReloader(
                paths,
                self._hand_over,
                warn_before=config.smtp.tls_expiry_warning,
                hostname=config.smtp.hostname,
                required=not config.acme.enabled,
            )

    def initial_context(self) -> ssl.SSLContext | None:
        """The context to start with; CertificateError when the configured pair is unusable."""
        return self.reloader.load_initial() if self.reloader is not None else None

    def start(self, apply: Callable[[ssl.SSLContext], None]) -> list[Awaitable[None]]:
        """The work to run beside the listener; ``apply`` hands a new context to it."""
        self._apply = apply
        work: list[Awaitable[None]] = []
        if self.reloader is not None:
            work.append(self.reloader.run(self.config.smtp.tls_reload_interval))
        if self.config.acme.enabled:
            work.append(
                renew_forever(
                    AcmeSettings.from_config(self.config),
                    self._installed,
                    check_interval=self.config.acme.check_interval,
                    retry_after=self.config.acme.retry_after,
                )
            )
        return work

    def reload_now(self) -> None:
        """SIGHUP: load the files at once, whether or not they look changed."""
        if self.reloader is None:
            log.info("SIGHUP: no TLS certificate is configured; nothing to reload")
            return
        self.reloader.reload("SIGHUP")

    def _hand_over(self, context: ssl.SSLContext) -> None:
        self._apply(context)

    def _installed(self, summary: CertSummary) -> None:
        reloader = self.reloader
        if reloader is None:
            return
        if reloader.current is None or reloader.current.serial != summary.serial:
            reloader.reload(f"ACME issued serial {summary.serial}")  # the poll has not yet
