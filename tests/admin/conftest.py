"""Fixtures for admin tests: a real node (SMTP + admin HTTP + delivery) in a subprocess."""

from __future__ import annotations

import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import waiting
from tests.conftest import MXSPOOL, Spooler, wait_for_port
from tests.delivery.target import Target

TOKEN = "admin-test-token-0123456789"


class AdminNode(Spooler):
    """A node (`mxspool serve`: SMTP intake, delivery and the admin plane) with a token."""

    def __init__(self, root: Path, token: str = TOKEN, **sections: dict[str, Any]) -> None:
        admin = {"token": token, **sections.pop("admin", {})}
        super().__init__(root, admin=admin, **sections)
        self.token = token
        self.url = f"http://127.0.0.1:{self.admin_port}"

    def start(self, extra_env: dict[str, str] | None = None, preexec: Any = None) -> None:
        self.proc = subprocess.Popen(
            [MXSPOOL, "--config", str(self.config), "serve"],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        wait_for_port(self.port, proc=self.proc)
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"admin plane did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)

    def wait_accepts(self, rcpt: str, within: float = 10.0) -> None:
        """Wait until the intake has picked up a new domain (it re-reads within a second)."""
        deadline = time.monotonic() + within
        while True:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                smtp.mail("probe@src.test")
                if smtp.rcpt(rcpt)[0] == 250:
                    smtp.rset()
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"the intake does not accept {rcpt}")
            time.sleep(0.1)

    def send(self, mail_from: str, rcpts: list[str], data: bytes) -> str:
        """Send one message over SMTP; the queue id from the 250 reply."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            smtp.mail(mail_from)
            for rcpt in rcpts:
                code, _ = smtp.rcpt(rcpt)
                assert code == 250, (rcpt, code)
            code, reply = smtp.data(data)
            assert code == 250, reply
            return reply.decode().rsplit(" ", 1)[-1]


def message(number: int, to: str) -> bytes:
    return (
        f"From: Sender <sender@src.test>\r\nTo: <{to}>\r\nSubject: test message {number}\r\n"
        f"Message-ID: <m{number}.admin@src.test>\r\n\r\nHello {number}.\r\n"
    ).encode()


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target().start()
    yield server
    server.stop()


@pytest.fixture
def admin_node(tmp_path: Path) -> Iterator[AdminNode]:
    """A running node; domains are added by each test."""
    (tmp_path / "node").mkdir()
    node = AdminNode(tmp_path / "node", delivery={"retry_schedule": ["1s"]})
    node.start()
    yield node
    node.stop()


def wait_until(predicate: Any, within: float = 20.0, what: str = "condition") -> None:
    waiting.wait_until(predicate, within, what)


__all__ = ["TOKEN", "AdminNode", "message", "wait_until"]
