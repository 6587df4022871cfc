"""Authentication at arrival in worker processes (intake/authpool.py, intake/authwork.py),
against a real `mxspool serve`: the verification runs in a child process of serve (nicer than
serve), a burst beyond the in-flight limit still ends with real verdicts (no temperror for
being busy), a killed worker is replaced, and no worker outlives serve.

DNS comes from a dnslib server on 127.0.0.1 publishing the DKIM key the test signs with.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import signal
import smtplib
import sqlite3
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from tests.conftest import Spooler
from tests.delivery.dnsserver import DnsServer
from tests.e2e.authkit import Key, message
from tests.waiting import wait_until

KEY = Key()
ZONE = "\n".join(
    [
        KEY.record("sel", "signed.test"),
        'signed.test. 60 IN TXT "v=spf1 ip4:127.0.0.1 -all"',
        '_dmarc.signed.test. 60 IN TXT "v=DMARC1; p=reject"',
    ]
)
WORKER_LINE = re.compile(r"verifying in worker process (\d+)")


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer(ZONE).start()
    yield server
    server.stop()


def started(spooler_factory: Any, dns: DnsServer, **smtp: Any) -> Spooler:
    node: Spooler = spooler_factory(
        smtp={"spf_check_private": True, "authentication_timeout": "5s", **smtp},
        delivery={"resolver": dns.address},
    )
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--tls", "off", "--hold")
    node.start()
    return node


def send(node: Spooler, count: int = 1) -> None:
    """``count`` signed messages over one session, each accepted."""
    with smtplib.SMTP("127.0.0.1", node.port, timeout=30) as client:
        client.ehlo("client.test")
        for _ in range(count):
            data = KEY.sign(message("a@signed.test"), "signed.test")
            refused = client.sendmail("a@signed.test", ["user@example.test"], data)
            assert refused == {}, refused


def _last_id(node: Spooler) -> str:
    with contextlib.closing(sqlite3.connect(node.db, timeout=10)) as conn:
        row = conn.execute("SELECT id FROM messages ORDER BY seq DESC LIMIT 1").fetchone()
    return str(row[0])


def tags(node: Spooler) -> dict[str, str | None]:
    """Every stored message's tags (None while it has no verdict)."""
    with contextlib.closing(sqlite3.connect(node.db, timeout=10)) as conn:
        rows = conn.execute("SELECT id, tags, auth_at FROM messages").fetchall()
    return {mid: (tag if at is not None else None) for mid, tag, at in rows}


def all_judged(node: Spooler, count: int, within: float = 30.0) -> dict[str, str | None]:
    def done() -> dict[str, str | None] | None:
        found = tags(node)
        return found if len(found) == count and None not in found.values() else None

    return wait_until(done, within=within, what=f"verdicts of {count} messages")


def worker_pids(node: Spooler) -> list[int]:
    """The worker pids serve logged, in order."""
    return [int(pid) for pid in WORKER_LINE.findall(node.log.read_text(errors="replace"))]


def test_verification_runs_in_a_nicer_child_process_that_ends_with_serve(
    spooler_factory: Any, dns: DnsServer
) -> None:
    node = started(spooler_factory, dns)
    assert node.proc is not None
    serve = psutil.Process(node.proc.pid)
    send(node)
    assert all_judged(node, 1) == {_last_id(node): "spf=pass,dkim=pass,dmarc=pass"}

    pid = wait_until(lambda: worker_pids(node), 10, "the worker's log line")[-1]
    family = serve.children(recursive=True)
    assert pid != serve.pid and pid != os.getpid()
    assert pid in [child.pid for child in family]  # a descendant of serve, alive
    assert psutil.Process(pid).nice() == serve.nice() + 5

    node.stop()
    assert node.proc.returncode == 0

    def gone() -> bool:
        return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family)

    wait_until(gone, 10, "serve's child processes to exit")


def test_a_killed_worker_is_replaced_and_verdicts_continue(
    spooler_factory: Any, dns: DnsServer
) -> None:
    node = started(spooler_factory, dns)
    send(node)
    all_judged(node, 1)
    first = wait_until(lambda: worker_pids(node), 10, "the worker's log line")[-1]

    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(first) or _zombie(first), 10, "the worker killed")
    send(node, 3)
    judged = all_judged(node, 4)
    assert set(judged.values()) == {"spf=pass,dkim=pass,dmarc=pass"}
    replacement = worker_pids(node)[-1]
    assert replacement != first and psutil.pid_exists(replacement)
    assert "authentication worker process died" in node.log.read_text()


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_burst_beyond_the_in_flight_limit_ends_with_real_verdicts(
    spooler_factory: Any, dns: DnsServer
) -> None:
    node = started(spooler_factory, dns, authentication_max_in_flight=1)
    sessions, per_session = 6, 5
    with concurrent.futures.ThreadPoolExecutor(sessions) as pool:
        for future in [pool.submit(send, node, per_session) for _ in range(sessions)]:
            future.result(timeout=60)

    judged = all_judged(node, sessions * per_session, within=40)
    # Every message has a real verdict: DKIM verified, not a temperror for being busy ...
    assert set(judged.values()) == {"spf=pass,dkim=pass,dmarc=pass"}
    # ... although the limit was passed (some went through the background pass).
    assert "get their verdict from the background pass" in node.log.read_text()


def test_nothing_outlives_a_serve_killed_with_sigkill(spooler_factory: Any, dns: DnsServer) -> None:
    # The forkserver lives while any worker holds its "alive" pipe: workers must watch serve
    # itself, or a kill -9 leaves both behind (each crash test leaked three processes).
    node = started(spooler_factory, dns)
    assert node.proc is not None
    serve = psutil.Process(node.proc.pid)
    send(node)
    all_judged(node, 1)
    family = serve.children(recursive=True)
    assert len(family) >= 2  # positive control: the forkserver and its worker, alive
    os.kill(serve.pid, signal.SIGKILL)
    node.proc.wait(10)

    def gone() -> bool:
        return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family)

    wait_until(gone, 15, "serve's child processes to exit after its kill -9")
