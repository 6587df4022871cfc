"""The ACME task of ``mxspool serve``: obtain at start when there is no good certificate,
then look twice a day (``[acme] check_interval``) and renew ``renew_before`` ahead of expiry.

Orders block (HTTP, polling), so each runs in a daemon thread: the event loop keeps serving
SMTP, and a stopping node does not wait for an order in flight (nothing is installed until the
CA has issued, and installing is one rename). A failed order is logged as an ERROR with what to
check and retried after ``retry_after``, doubling up to ``check_interval``; it never stops the
node, which meanwhile serves the certificate it has (or no STARTTLS, if it has none yet).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from mxspool.tls.certinfo import CertSummary
from mxspool.tls.issuer import AcmeSettings, obtain, renewal_reason

log = logging.getLogger("mxspool.tls")

T = TypeVar("T")


async def in_daemon_thread(work: Callable[[], T]) -> T:
    """Run ``work`` in a daemon thread; cancelling the caller abandons (does not join) it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)  # type: ignore[arg-type]

    def body() -> None:
        try:
            value = work()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, value, None)

    threading.Thread(target=body, name="acme-order", daemon=True).start()
    return await future


async def renew_forever(
    settings: AcmeSettings,
    installed: Callable[[CertSummary], None],
    *,
    check_interval: float,
    retry_after: float,
) -> None:
    """Keep a certificate for ``settings.names`` until cancelled; ``installed`` is called
    (on the loop) after each new one is in place."""
    backoff = retry_after
    while True:
        wait = check_interval
        try:
            reason = await asyncio.to_thread(renewal_reason, settings)
            if reason is not None:
                log.info("ACME: a new certificate is needed: %s", reason)
                summary = await in_daemon_thread(lambda: obtain(settings))
                installed(summary)
            backoff = retry_after
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            wait = backoff
            backoff = min(backoff * 2, check_interval)
            log.error(
                "ACME: could not obtain a certificate for %s from %s: %s. Serving the current "
                "certificate meanwhile; retrying in %.0f s. Check [acme] (directory, "
                "http_listen reachable on port 80 from the Internet, or dns_hook), or run "
                "'mxspool acme issue' to see the error directly",
                ", ".join(settings.names),
                settings.directory,
                exc,
                wait,
            )
        await asyncio.sleep(wait)
