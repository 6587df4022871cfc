"""A recording target (``tests.delivery.target``) that answers as Exchange Online does when
busy or handed too many recipients: ``451 4.7.500 Server busy`` to a share of MAIL, RCPT and
DATA commands at random (seeded), or to every one while ``busy_all`` is set, and
``452 4.5.3`` to every recipient past ``max_recipients`` in one transaction."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

from tests.delivery.target import Recorder, Target

BUSY = "451 4.7.500 Server busy. Please try again later from [127.0.0.1]. (AS761)"
TOO_MANY = "452 4.5.3 Too many recipients (AS780090)"


class ExoRecorder(Recorder):
    def __init__(self, *, busy_share: float = 0.0, max_recipients: int = 0, seed: int = 1):
        super().__init__()
        self.busy_share = busy_share
        self.busy_all = False
        self.max_recipients = max_recipients
        self.mail_times: list[float] = []
        """Every MAIL FROM seen, busy or not: the attempts the spooler made."""
        self.busy_given = 0
        self.too_many_given = 0
        self._random = random.Random(seed)
        self._busy_lock = threading.Lock()

    def _busy(self) -> bool:
        with self._busy_lock:
            busy = self.busy_all or self._random.random() < self.busy_share
            self.busy_given += busy
            return busy

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.mail_times.append(time.time())
        if self._busy():
            return BUSY
        return await super().handle_MAIL(server, session, envelope, address, options)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.max_recipients and len(envelope.rcpt_tos) >= self.max_recipients:
            self.too_many_given += 1
            return TOO_MANY
        if self._busy():
            return BUSY
        return await super().handle_RCPT(server, session, envelope, address, options)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self._busy():
            return BUSY
        return await super().handle_DATA(server, session, envelope)


class ExoTarget(Target):
    """An aiosmtpd target on 127.0.0.1 whose recorder is an ``ExoRecorder``."""

    def __init__(self, *, busy_share: float = 0.0, max_recipients: int = 0, seed: int = 1):
        super().__init__()
        self.exo = ExoRecorder(busy_share=busy_share, max_recipients=max_recipients, seed=seed)
        self.recorder = self.exo
        self.controller.handler = self.exo
