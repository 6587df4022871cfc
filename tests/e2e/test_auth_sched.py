"""How the verification workers of authentication at arrival are scheduled
(``authwork.lower_priority``): under SCHED_IDLE, so they run only on CPU time the intake leaves
idle (a burst is accepted first, verified right after), with nice +19 where SCHED_IDLE is
refused; and messages the intake defers during a burst are judged by the background pass at
once, not after the startup recovery's wait."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from typing import Any

import psutil

from tests.delivery.dnsserver import DnsServer
from tests.e2e.test_auth_pool import all_judged, dns, send, started, worker_pids
from tests.waiting import wait_until

__all__ = ["dns"]  # the fixture, used by name

PROBE = """
import os, sys
from mxspool.intake import authwork
if sys.argv[1] == "refused":
    def refuse(*args):
        raise PermissionError("not permitted")
    os.sched_setscheduler = refuse
start = os.nice(0)
applied = authwork.lower_priority(int(sys.argv[2]))
print(applied or "-", os.sched_getscheduler(0) == os.SCHED_IDLE, os.nice(0) - start)
"""


def probe(mode: str, nice: int) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode, str(nice)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.split()


def test_lower_priority_uses_sched_idle_else_nice_19() -> None:
    assert probe("normal", 5) == ["idle", "True", "5"]
    assert probe("refused", 5) == ["nice", "False", "19"]
    assert probe("normal", 0) == ["-", "False", "0"]  # 0: same priority as the intake


def test_the_worker_of_serve_runs_under_sched_idle(spooler_factory: Any, dns: DnsServer) -> None:
    node = started(spooler_factory, dns)
    assert node.proc is not None
    send(node)
    assert set(all_judged(node, 1).values()) == {"spf=pass,dkim=pass,dmarc=pass"}
    pid = wait_until(lambda: worker_pids(node), 10, "the worker's log line")[-1]
    assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    assert os.sched_getscheduler(node.proc.pid) == os.SCHED_OTHER  # the intake is not
    assert psutil.Process(pid).nice() == psutil.Process(node.proc.pid).nice() + 5


def test_deferred_messages_are_judged_during_the_startup_recovery_wait(
    spooler_factory: Any, dns: DnsServer
) -> None:
    # The recovery waits authentication_timeout (60 s here) before it looks at the store; the
    # messages deferred meanwhile (in-flight limit 1, four senders at once) must not wait for it.
    node = started(
        spooler_factory,
        dns,
        authentication_timeout="60s",
        authentication_max_in_flight=1,
    )
    with concurrent.futures.ThreadPoolExecutor(4) as senders:
        list(senders.map(lambda _: send(node, 10), range(4)))
    judged = all_judged(node, 40, within=30.0)
    assert set(judged.values()) == {"spf=pass,dkim=pass,dmarc=pass"}
    assert "get their verdict from the background pass" in node.log.read_text(errors="replace")
