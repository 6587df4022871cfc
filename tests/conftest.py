"""Fixtures that run the real thing: `mxspool serve` in a subprocess on loopback ports."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests import loopback_guard
from tests.waiting import wait_until

if TYPE_CHECKING:
    from tests.delivery.dnsserver import DnsServer

BIN = Path(sys.executable).parent
MXSPOOL = str(BIN / "mxspool") if (BIN / "mxspool").exists() else shutil.which("mxspool") or ""


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports: the sockets are held together while the kernel
    picks, so two calls in a row cannot hand out the same port."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def free_port() -> int:
    return free_ports(1)[0]


_QUIET_DNS: list[DnsServer] = []


def quiet_dns() -> DnsServer:
    """This test process's own DNS server (dnslib on 127.0.0.1) that knows no name: every query
    is NXDOMAIN. A node a test starts without ``[delivery] resolver`` asks it, not the machine's
    resolver, so what serve looks up in the background (DMARC for arriving mail, MX for a
    domain without a route) is answered the same on every machine. Started on first use."""
    if not _QUIET_DNS:
        from tests.delivery.dnsserver import DnsServer  # it imports this module

        _QUIET_DNS.append(DnsServer("").start())
    return _QUIET_DNS[0]


def quiet_resolver() -> str:
    """``[delivery] resolver`` for the quiet server."""
    return quiet_dns().address


def wait_for_port(
    port: int,
    timeout: float = 15.0,
    proc: subprocess.Popen[bytes] | None = None,
    *,
    greeting: bool = True,
) -> None:
    """Until 127.0.0.1:``port`` accepts a connection and (``greeting``, an SMTP listener) says
    something; without ``greeting`` (an HTTP listener) the accepted connection is enough."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                if greeting:
                    sock.recv(100)
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Spooler:
    """An `mxspool serve` process with its own config, data directory and ports."""

    def __init__(self, root: Path, **sections: dict[str, Any]) -> None:
        self.root = root
        self.port, self.admin_port = free_ports(2)
        self.db = root / "data" / "spool.db"
        self.log = root / "serve.log"
        config: dict[str, dict[str, Any]] = {
            "smtp": {"listen": [f"127.0.0.1:{self.port}"], "hostname": "mx.test.local"},
            "store": {"url": f"sqlite:///{self.db}", "min_free_space": "10MiB"},
            "admin": {"listen": f"127.0.0.1:{self.admin_port}"},
            "delivery": {"resolver": quiet_resolver()},  # a test's own resolver replaces it
        }
        for name, values in sections.items():
            config.setdefault(name, {}).update(values)
        self.config = root / "mxspool.toml"
        self.config.write_text(_toml(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(
        self,
        extra_env: dict[str, str] | None = None,
        preexec: Any = None,
        *,
        wait_admin: bool = True,
        timeout: float = 15.0,
    ) -> None:
        """Start serve and wait (up to ``timeout`` seconds) for its SMTP greeting; with
        ``wait_admin``, also for its admin port (serve makes it listen before SMTP:
        tests/e2e/test_listener.py shows it without this wait)."""
        env = {**os.environ, **(extra_env or {})}
        self.proc = subprocess.Popen(
            [MXSPOOL, "--config", str(self.config), "serve"],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
            env=env,
            preexec_fn=preexec,  # noqa: PLW1509 (the test process starts it before threads)
        )
        wait_for_port(self.port, timeout, proc=self.proc)
        if wait_admin and f'"127.0.0.1:{self.admin_port}"' in self.config.read_text():
            wait_for_port(self.admin_port, proc=self.proc, greeting=False)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def cli(
        self, *args: str, check: bool = True, binary: bool = False
    ) -> subprocess.CompletedProcess[Any]:
        result = subprocess.run(
            [MXSPOOL, "--config", str(self.config), *args],
            capture_output=True,
            text=not binary,
            timeout=60,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"mxspool {' '.join(args)} failed: {result.stderr!r}")
        return result

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.cli("status", "--json").stdout)
        return data

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the ``/metrics`` samples called ``name`` with these labels (0.0 when there
        are none); waits up to 10 s for the admin plane to answer."""
        url = f"http://127.0.0.1:{self.admin_port}/metrics"

        def text() -> str | None:
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    return str(answer.read().decode())
            except OSError:
                return None

        total = 0.0
        for line in wait_until(text, within=10, what="the admin plane to answer").splitlines():
            if not line.startswith((name + "{", name + " ")):
                continue
            if all(f'{key}="{value}"' in line for key, value in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def domain_status(self, domain: str) -> dict[str, Any]:
        for row in self.status()["domains"]:
            if row["domain"] == domain:
                return dict(row)
        raise KeyError(domain)

    def deliver_control(self, port: int, received: Any, within: float = 30.0) -> None:
        """Positive control for "nothing happened" checks: send one message for a relay domain
        routed to 127.0.0.1:``port`` through the running server and wait until ``received()``
        (that target's count of messages) grows. Once this returns, the server has accepted,
        polled, claimed and sent since the call."""
        if "control.test" not in self.cli("domain", "list").stdout:
            route = f"127.0.0.1:{port}"
            self.cli("domain", "add", "control.test", "--route", route, "--tls", "off")
        before = received()

        def send() -> bool:  # refused until the intake has read the new domain (within 1 s)
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
                refused = client.sendmail(
                    "control@src.test", [f"c{before}@control.test"], b"Subject: control\r\n\r\n."
                )
                return not refused

        wait_until(lambda: _accepted(send), within, "the control message accepted")
        wait_until(lambda: received() > before, within, "the control message at its target")


def _accepted(send: Any) -> bool:
    try:
        return bool(send())
    except smtplib.SMTPRecipientsRefused:
        return False


def _toml(config: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def pytest_configure(config: pytest.Config) -> None:
    loopback_guard.install()  # a wildcard bind in the test process fails (tests/loopback_guard.py)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """After the test's body, while its servers still run: none of them, in this process or
    any it started, listens on a wildcard address (tests/loopback_guard.py)."""
    result = yield
    loopback_guard.fail_if_wildcard_sockets()
    return result


@pytest.fixture(autouse=True)
def _loopback_only() -> Iterator[None]:
    """Fails the test that bound (or sent from) a wildcard address, even if it caught the
    error: tests listen on loopback only."""
    loopback_guard.take()
    yield
    loopback_guard.fail_if_refused()


@pytest.fixture
def spooler_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Spooler] = []

    def make(**sections: dict[str, Any]) -> Spooler:
        root = tmp_path / f"node{len(started)}"
        root.mkdir()
        spooler = Spooler(root, **sections)
        started.append(spooler)
        return spooler

    yield make
    for spooler in started:
        spooler.stop()


@pytest.fixture
def spooler(spooler_factory: Any) -> Spooler:
    """A running spooler with example.test and example.org held."""
    node: Spooler = spooler_factory()
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--tls", "off", "--hold")
    node.cli("domain", "add", "example.org", "--route", "127.0.0.1:2526", "--tls", "off", "--hold")
    node.start()
    return node
