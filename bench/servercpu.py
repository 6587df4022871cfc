"""Server CPU per message for ``accept.py``: the CPU time of ``mxspool serve`` and of its child
processes (the authentication workers) over one run, with psutil (an mxspool dependency).

With authentication on, the verdicts may still be computed after smtp-source has finished
(the workers run under SCHED_IDLE, and a burst is left to the background pass), so
``wait_for_verdicts`` waits (bounded) until every message of a SQLite spool has its verdict
before the CPU is read, and then (``settle``) until serve is quiet, with authentication on or
off: the figure then covers all the work the messages caused (the checkpoint of the burst's
WAL too).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class CpuSnapshot:
    serve: float
    children: dict[int, float]
    loop: float = 0.0
    """CPU seconds of serve's main thread alone: the event loop, which every SMTP session
    shares (the commit thread, the checkpoint thread and the others are in ``serve``)."""


def snapshot(pid: int) -> CpuSnapshot:
    """CPU seconds (user + system) of ``pid``, of its main thread and of each live descendant."""
    process = psutil.Process(pid)
    times = process.cpu_times()
    loop = sum(t.user_time + t.system_time for t in process.threads() if t.id == pid)
    children: dict[int, float] = {}
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child_times = child.cpu_times()
            children[child.pid] = child_times.user + child_times.system
    return CpuSnapshot(times.user + times.system, children, loop)


def used(before: CpuSnapshot, after: CpuSnapshot) -> tuple[float, float]:
    """(serve's, its children's) CPU seconds between two snapshots (children that exited in
    between are not counted: the workers live as long as serve)."""
    children = sum(cpu - before.children.get(pid, 0.0) for pid, cpu in after.children.items())
    return after.serve - before.serve, children


def wait_for_verdicts(db_path: str, timeout: float = 300.0) -> float | None:
    """Seconds until no message of the SQLite spool lacks a verdict; None if ``timeout``
    passes first."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as conn:
            (missing,) = conn.execute(
                "SELECT count(*) FROM messages WHERE auth_at IS NULL"
            ).fetchone()
        if missing == 0:
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def settle(pid: int, timeout: float = 15.0, quiet: float = 0.005) -> float:
    """Seconds until serve and its children use less than ``quiet`` CPU seconds in half a
    second (the burst's WAL checkpoint, the verdicts' writes done), at most ``timeout``: both
    systems' figures then cover the work their messages caused, not only what was done by the
    time smtp-source (or the last verdict) ended."""
    started = time.monotonic()
    last = snapshot(pid)
    while time.monotonic() - started < timeout:
        time.sleep(0.5)
        now = snapshot(pid)
        serve, children = used(last, now)
        if serve + children < quiet:
            break
        last = now
    return time.monotonic() - started


def wait_for_worker(log: Path, timeout: float = 60.0) -> None:
    """Until serve has logged its authentication worker's start (serve starts it at once)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if log.exists() and "verifying in worker process" in log.read_text(errors="replace"):
            return
        time.sleep(0.05)
