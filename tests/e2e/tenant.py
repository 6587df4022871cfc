"""Stand-in tenants for the migration end-to-end test (tests/e2e/test_migration_e2e.py).

A tenant here is the recording SMTP target of ``tests.delivery.exo_target`` on 127.0.0.1 (it
answers as Exchange Online does: ``452 4.5.3`` past 200 recipients in a transaction) that can
also enforce a per-recipient limit the way Exchange Online's "3,600 messages an hour per
recipient" works, scaled down to a short window: at most ``per_recipient`` messages for one
recipient in any sliding ``window`` seconds; past that, RCPT gets ``451 4.7.500``-style
throttling (``LIMITED``) and the refusal is recorded in ``limited``. A message counts at RCPT
(when the recipient is accepted), so two sessions racing for the same recipient cannot both
slip under the limit.

The test checks that a release paced by mxspool never meets the limit (``limited`` stays
empty) while an unpaced burst would (``check_limit``: the positive control, against the real
server, before the test uses it).
"""

from __future__ import annotations

import smtplib
import time
from collections import deque
from typing import Any

from tests.delivery.exo_target import ExoRecorder, ExoTarget

LIMITED = "451 4.7.550 Recipient rate limit exceeded, try again later (test tenant)"


class TenantRecorder(ExoRecorder):
    """An ``ExoRecorder`` with a per-recipient sliding-window limit (0: no limit)."""

    def __init__(self, *, per_recipient: int = 0, window: float = 0.0) -> None:
        super().__init__()
        self.per_recipient = per_recipient
        self.window = window
        self.limited: list[tuple[float, str]] = []
        """Every RCPT refused for the limit: (time, address)."""
        self._taken: dict[str, deque[float]] = {}

    def _over_limit(self, address: str, now: float) -> bool:
        if not self.per_recipient:
            return False
        with self.lock:
            times = self._taken.setdefault(address.lower(), deque())
            while times and times[0] <= now - self.window:
                times.popleft()
            if len(times) >= self.per_recipient:
                self.limited.append((now, address))
                return True
            times.append(now)
            return False

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self._over_limit(address, time.monotonic()):
            with self.lock:
                self.rcpts.append((time.time(), address, LIMITED))
            return LIMITED
        return await super().handle_RCPT(server, session, envelope, address, options)

    def forget(self) -> None:
        """Drop what was received and counted so far (after the positive control)."""
        with self.lock:
            self.received.clear()
            self.rcpts.clear()
            self.limited.clear()
            self._taken.clear()
            self.mail_times.clear()

    def max_in_window(self, address: str) -> int:
        """The most messages ``address`` received within any ``window`` seconds."""
        times = sorted(r.at for r in self.received for rcpt in r.rcpt_tos if rcpt == address)
        best = 0
        start = 0
        for end, at in enumerate(times):
            while at - times[start] >= self.window:
                start += 1
            best = max(best, end - start + 1)
        return best


class Tenant(ExoTarget):
    """A stand-in tenant: an aiosmtpd server on 127.0.0.1 recording into a ``TenantRecorder``."""

    def __init__(self, name: str, *, per_recipient: int = 0, window: float = 0.0) -> None:
        super().__init__()
        self.name = name
        self.tenant = TenantRecorder(per_recipient=per_recipient, window=window)
        self.exo = self.tenant
        self.recorder = self.tenant
        self.controller.handler = self.tenant

    def start(self) -> Tenant:
        super().start()
        return self

    def deliveries(self) -> list[tuple[str, bytes]]:
        return self.tenant.deliveries()

    def check_limit(self, address: str) -> None:
        """Positive control: an unpaced burst of ``per_recipient + 1`` messages to ``address``
        meets the limit at the last one; then everything recorded is forgotten."""
        assert self.tenant.per_recipient > 0
        refused = None
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
            for n in range(self.tenant.per_recipient + 1):
                try:
                    client.sendmail("burst@src.test", [address], f"Subject: b{n}\r\n\r\n.".encode())
                except smtplib.SMTPRecipientsRefused as exc:
                    refused = (n, exc.recipients[address][0])
                    break
        assert refused == (self.tenant.per_recipient, 451), refused
        assert len(self.tenant.limited) == 1
        self.tenant.forget()
