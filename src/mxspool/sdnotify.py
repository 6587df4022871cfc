"""systemd's service notification protocol (sd_notify(3)): READY, STOPPING, WATCHDOG, STATUS.

With ``Type=notify`` systemd counts the service as started only when it says ``READY=1``, so
units ordered after mxspool (and ``systemctl start``) wait until port 25 really accepts; with
``WatchdogSec=`` it restarts a node whose event loop stopped turning. The protocol is one
datagram of ``KEY=value`` lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or
``@name`` in the abstract namespace); it is documented as a stable interface and systemd
invites services to implement it themselves. It is written here (some forty lines) rather
than taken from the ``sdnotify`` package, which is unmaintained since 2017 and would add a
dependency and a thread-unsafe global for what is one ``sendto``.

Without ``$NOTIFY_SOCKET`` (not under systemd, or ``Type=simple``) everything here is a no-op.
Sending never raises and never blocks: the socket is non-blocking, and a failed send is logged
once and dropped, since a lost notification must not take a mail server down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

MAX_STATUS = 200
"""Characters of a STATUS= text kept (``systemctl status`` shows one line)."""


class Notifier:
    """Sends notifications to the service manager named by ``$NOTIFY_SOCKET``, if any."""

    def __init__(self, address: str | None) -> None:
        self.address: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._warned = False
        if not address:
            return
        if address.startswith("@"):
            self.address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self.address = address
        else:
            log.warning("NOTIFY_SOCKET %r is not a path or @name; not notifying systemd", address)
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one datagram; False if not sent (never raises)."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at NOTIFY_SOCKET: %s", exc.strerror or exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *_status(status))

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.send(*_status(text))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str) -> list[str]:
    """A STATUS= field on one line, or nothing for an empty text."""
    line = " ".join(text.split())[:MAX_STATUS]
    return [f"STATUS={line}"] if line else []


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between two WATCHDOG=1 (half of ``$WATCHDOG_USEC``), or None when the watchdog
    is off or meant for another process (``$WATCHDOG_PID`` set and not ours)."""
    pid = environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    return int(usec) / 2e6


async def keep_alive(notifier: Notifier, interval: float) -> None:
    """Send WATCHDOG=1 every ``interval`` seconds until cancelled: from the event loop itself,
    so a loop that stops turning stops the pings and systemd restarts the node."""
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


def start_watchdog(
    notifier: Notifier, environ: Mapping[str, str] = os.environ
) -> asyncio.Task[None] | None:
    """The keep-alive task when systemd asked for a watchdog, else None."""
    interval = watchdog_interval(environ)
    if not notifier.enabled or interval is None:
        return None
    return asyncio.create_task(keep_alive(notifier, interval), name="watchdog")
