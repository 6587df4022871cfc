"""Server CPU per message for ``accept.py``: the CPU time of ``mxspool serve`` and of its child
processes (the authentication workers) over one run, with psutil (an mxspool dependency).

With authentication on, the verdicts may still be computed after smtp-source has finished
(the workers run under SCHED_IDLE, and a burst is left to the background pass), so
``wait_for_verdicts`` waits (bounded) until every message of a SQLite spool has its verdict
before the CPU is read: the figure then covers all the work the messages caused.
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


def snapshot(pid: int) -> CpuSnapshot:
    """CPU seconds (user + system) of ``pid`` and of each live descendant."""
    process = psutil.Process(pid)
    times = process.cpu_times()
    children: dict[int, float] = {}
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child_times = child.cpu_times()
            children[child.pid] = child_times.user + child_times.system
    return CpuSnapshot(times.user + times.system, children)


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


def wait_for_worker(log: Path, timeout: float = 60.0) -> None:
    """Until serve has logged its authentication worker's start (serve starts it at once)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if log.exists() and "verifying in worker process" in log.read_text(errors="replace"):
            return
        time.sleep(0.05)
