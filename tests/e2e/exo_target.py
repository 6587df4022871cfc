"""A fake Exchange Online tenant for the drill (tests/e2e/test_drill.py): the recording target
of ``tests.delivery.exo_target`` (``451 4.7.500 Server busy`` to a seeded share of MAIL, RCPT
and DATA, ``452 4.5.3`` past N recipients in a transaction) plus what a tenant does during a
migration: a mailbox that is not created yet is refused with ``550 5.4.1 Recipient address
rejected: Access denied`` (Directory-Based Edge Blocking) until the test creates it, and a
plus address belongs to its mailbox. ``cut_in_data`` closes that many connections in the
middle of the message text (after its first line; the inherited ``drop_in_data`` closes them
after the whole text, before the reply). Every MAIL FROM is kept (null reverse-paths included),
so "no NDR reached the tenant" is checked on what was offered, not only on what was taken.
"""

from __future__ import annotations

import threading
from typing import Any

from aiosmtpd.smtp import SMTP

from tests.delivery.exo_target import ExoRecorder, ExoTarget
from tests.delivery.target import _Controller, _CountingSMTP

NOT_CREATED = "550 5.4.1 Recipient address rejected: Access denied. AS(201806281)"


def mailbox_of(address: str) -> str:
    """The mailbox a recipient address reaches: lowercased, the ``+tag`` removed."""
    local, _, domain = address.rpartition("@")
    return f"{local.split('+', 1)[0]}@{domain}".lower()


class TenantRecorder(ExoRecorder):
    def __init__(self, *, busy_share: float, max_recipients: int, seed: int) -> None:
        super().__init__(busy_share=busy_share, max_recipients=max_recipients, seed=seed)
        self.missing: set[str] = set()
        """Mailboxes (``mailbox_of`` form) that do not exist at the tenant yet."""
        self.senders: list[str] = []
        """The reverse-path of every MAIL FROM seen, answered busy or not."""
        self.not_created_given: list[str] = []
        self.cut_in_data = 0
        """This many DATAs end with the connection closed after the first line of text."""
        self._mailboxes = threading.Lock()

    def create(self, address: str) -> None:
        with self._mailboxes:
            self.missing.discard(mailbox_of(address))

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.senders.append(address)
        return await super().handle_MAIL(server, session, envelope, address, options)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        with self._mailboxes:
            missing = mailbox_of(address) in self.missing
        if missing:
            self.not_created_given.append(address)
            return NOT_CREATED
        return await super().handle_RCPT(server, session, envelope, address, options)


class _CuttingSMTP(_CountingSMTP):
    recorder: TenantRecorder

    async def smtp_DATA(self, arg: str) -> None:
        if self.recorder.cut_in_data <= 0 or self.envelope is None or not self.envelope.rcpt_tos:
            await super().smtp_DATA(arg)
            return
        self.recorder.cut_in_data -= 1
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        await self._reader.readuntil(b"\r\n")
        if self.transport is not None:
            self.transport.close()


class _TenantController(_Controller):
    def factory(self) -> SMTP:
        server = _CuttingSMTP(self.handler, **self.SMTP_kwargs)
        server.recorder = self.handler
        return server


class TenantTarget(ExoTarget):
    """An aiosmtpd target on 127.0.0.1 whose recorder is a ``TenantRecorder``."""

    def __init__(self, *, busy_share: float, max_recipients: int = 200, seed: int = 7) -> None:
        super().__init__(busy_share=busy_share, max_recipients=max_recipients, seed=seed)
        self.tenant = TenantRecorder(
            busy_share=busy_share, max_recipients=max_recipients, seed=seed
        )
        self.exo = self.tenant
        self.recorder = self.tenant
        self.controller = _TenantController(
            self.tenant, hostname="127.0.0.1", port=self.port, enable_SMTPUTF8=True,
            decode_data=False,
        )  # fmt: skip
