"""The verification worker process of authentication at arrival: the CPU-heavy part, off the
intake's GIL.

Why a process: DKIM verification is mostly pure Python in dkimpy (parsing the message,
canonicalizing header and body; ~0.5 ms of CPU for a 10 KiB message). In a thread of the
intake it competes for the GIL with the event loop that accepts mail, and halved the accept
rate under load. In a worker process it uses another core, or (the worker runs under Linux's
SCHED_IDLE policy, ``lower_priority``) only the time the intake leaves idle: a burst of mail
wins the CPU and the verdicts catch up right after.

What a worker is given (``Job``): the message bytes, or for a spilled body the path of the
intake's open spill file (``/proc/<pid>/fd/<n>``: the file is unlinked; the intake keeps it
open until the job is done), the records of the names the message needs (resolved by the
intake, which shares one cache for every message: ``authcheck.names_needed``), and a DNS
budget. It returns the DKIM results and the DMARC record (``authcheck.DmarcPolicy``); the
intake adds SPF's result and aligns (``authcheck.dmarc_verdict``), which takes microseconds.

DNS in the worker: only for a name it was not given (a signature the intake's quick parse
read differently); then through its own resolver and cache (``intake.authdns``, set up by
``initialize`` from the same ``[delivery] resolver``), within the job's budget. A worker never
outlives the intake: a thread watches its parent and exits when the parent is gone.

Everything here runs in the worker; nothing here touches the store or the event loop.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from mxspool.intake import authcheck, authdns
from mxspool.intake.authcheck import DkimResult, DmarcPolicy

NICE = 5
"""Niceness steps a worker adds to its own (os.nice); it matters only where SCHED_IDLE is
refused (then ``FALLBACK_NICE`` is used instead)."""
FALLBACK_NICE = 19
"""Niceness of a worker that may not use SCHED_IDLE."""
PARENT_CHECK = 1.0
"""Seconds between a worker's checks that its parent (the intake, or the forkserver that forked
it and ends with the intake) is still there."""

_settings: dict[str, str] = {"nameserver": ""}

Records = dict[str, "list[bytes] | str"]
"""Prefetched TXT records by ``authcheck.dns_key``: the records, or the DNS error's text."""


@dataclass(frozen=True, slots=True)
class Job:
    """One message to verify. ``data`` is its bytes (for a large one only the start, with
    ``size`` the whole size) or ``path`` a file holding them."""

    data: bytes | None
    path: str | None
    size: int
    records: Records
    budget: float


@dataclass(frozen=True, slots=True)
class Outcome:
    dkim: tuple[DkimResult, ...]
    dmarc: DmarcPolicy
    pid: int
    cpu: float


def initialize(nameserver: str, nice: int) -> None:
    """The worker's initializer: DNS settings, scheduling (``lower_priority``), and the parent
    watch."""
    _settings["nameserver"] = nameserver
    lower_priority(nice)
    parent = os.getppid()
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def lower_priority(nice: int) -> str:
    """Run this process only on CPU time the intake does not want: SCHED_IDLE (Linux), plus
    ``nice`` steps; where SCHED_IDLE is refused or missing, nice +``FALLBACK_NICE``. Returns
    what was applied: "idle", "nice" or "" (nothing permitted)."""
    policy = ""
    idle = getattr(os, "SCHED_IDLE", None)
    if idle is not None and nice:
        try:
            os.sched_setscheduler(0, idle, os.sched_param(0))
            policy = "idle"
        except (OSError, AttributeError):
            pass
    steps = nice if policy or not nice else max(nice, FALLBACK_NICE)
    if steps:
        try:
            os.nice(steps)
            policy = policy or "nice"
        except OSError:
            pass
    return policy


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(PARENT_CHECK)
        if os.getppid() != parent:
            os._exit(0)


def verify(job: Job) -> Outcome:
    """DKIM results and the DMARC record of one message (blocking; in a worker process)."""
    started = time.process_time()
    data = job.data if job.data is not None else _read(job.path or "")
    deadline = time.monotonic() + job.budget
    lookup = _lookup(job.records, deadline)
    dkim = authcheck.check_dkim(data, lookup, job.size)
    dmarc = authcheck.dmarc_policy(data, lookup)
    return Outcome(dkim, dmarc, os.getpid(), time.process_time() - started)


def verify_many(jobs: list[Job]) -> list[Outcome]:
    """``verify`` of each job: one round trip to the worker for a batch of messages."""
    return [verify(job) for job in jobs]


def ready() -> int:
    """A no-op job that starts a worker ahead of the first message; its pid."""
    return os.getpid()


def _read(path: str) -> bytes:
    """A spilled body's bytes, up to MAX_DKIM_SIZE + 1 (enough to tell it is too large)."""
    with open(path, "rb") as file:
        return file.read(authcheck.MAX_DKIM_SIZE + 1)


def _lookup(records: Records, deadline: float) -> authcheck.Lookup:
    def lookup(name: str) -> list[bytes]:
        found = records.get(authcheck.dns_key(name))
        if isinstance(found, str):
            raise authdns.TempError(found)
        if found is not None:
            return found
        return authdns.txt(_settings["nameserver"], name, deadline - time.monotonic())

    return lookup
