"""The verification worker processes of authentication at arrival (``intake.authwork``).

A ``concurrent.futures.ProcessPoolExecutor`` on the "forkserver" context: workers are forked
from a small clean server process (started once, with ``authwork`` preloaded), never from the
intake itself, which has threads and an event loop that a forked child must not inherit.
``size`` workers (``[smtp] authentication_workers``; 0 means one less than the CPUs, at least
one), each under SCHED_IDLE (``authwork.lower_priority``): they run only on CPU time the
intake leaves idle.

Jobs wait while the intake is busy: while a new message arrived (``arrived``, which the
intake calls on a SQLite store; it also holds its messages' jobs until ``wait`` says so) less
than ``IDLE_GAP`` seconds ago, unless the oldest job has waited ``hold_max`` seconds. SCHED_IDLE
alone was not enough: a worker still ran in the gaps of a burst, on the other hardware thread
of the intake's core or between its wake-ups, and cost 15-25% of the accept rate (measured
with ``bench/accept.py``). So a burst is accepted first and verified right after it; a
steady trickle of mail, which leaves such gaps all the time, is verified at once.

Jobs go in batches (``authwork.verify_many``): while ``size`` + 1 batches are with the
workers, new jobs wait here and leave together as the next batch (at most ``BATCH_MAX``); the
intake's idleness is checked again before each batch, so a new burst stops the flow within a
batch. A
round trip to a worker costs the intake ~0.1 ms of CPU (pickling, the executor's threads, the
wake-up of the event loop); under load it is shared by the batch, and an idle intake sends
each job at once.

A worker that dies (killed, out of memory, a crash in a C extension) breaks the pool: every job
in it fails with ``BrokenProcessPool``. The pool is then rebuilt (once per breakage, whoever
notices first) and each of those jobs is tried once more, alone in its batch (so a message
that kills its worker takes no other with it); a job that fails again raises ``WorkerFailed``
(the message records temperror). ``close`` and ``stopped`` end the workers:
idle ones at once, a busy one after its job, at most ``STOP_TIMEOUT`` seconds, then killed.
The forkserver process ends with the intake (it watches a pipe from it); a worker watches its
parent too (``authwork``), so nothing outlives a killed intake either.

Workers are started in a thread, never on the event loop: ``executor.submit`` starts a worker
when none is idle, and the first one starts the forkserver and waits for its preload import
(0.3 s on an idle machine, over a second on a busy one), during which the loop would answer
no client and see no domain change. Jobs wait in the queue until the pool's workers are up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import time
from concurrent.futures.process import BrokenProcessPool

from mxspool import metrics
from mxspool.intake import authwork

log = logging.getLogger(__name__)

STOP_TIMEOUT = 5.0
"""Seconds ``stopped`` waits for a busy worker to finish before killing it."""
BATCH_MAX = 32
"""Jobs sent to a worker in one round trip, at most."""
IDLE_GAP = 0.02
"""Seconds without a new message (``arrived``) after which the intake counts as idle and queued
jobs go to the workers."""
HOLD_MAX = 5.0
"""Seconds a job waits for the intake to be idle, at most; then it goes regardless (the
intake passes half its ``authentication_timeout``: a relayed message, which waits that long
plus a second for its verdict, still leaves that half for the verification)."""


class WorkerFailed(Exception):
    """A job's worker died twice (or the pool is shut down): no verdict from a worker."""


def default_size() -> int:
    """One worker less than the CPUs (the intake keeps one), at least one."""
    return max(1, (os.cpu_count() or 2) - 1)


class WorkerPool:
    """Verification worker processes; see the module docstring."""

    def __init__(
        self,
        size: int = 0,
        *,
        nameserver: str = "",
        nice: int = authwork.NICE,
        hold_max: float = HOLD_MAX,
    ) -> None:
        self.size = size if size > 0 else default_size()
        self.hold_max = hold_max
        self._nameserver = nameserver
        self._nice = nice
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._starting: asyncio.Task[list[concurrent.futures.Future[int]]] | None = None
        """Starting the current executor's workers (in a thread); jobs wait until it is done."""
        self._retiring: list[asyncio.Task[list[concurrent.futures.Future[int]]]] = []
        """Starts of retired executors still under way (``stopped`` waits for them)."""
        self._generation = 0
        self._closed = False
        self._stopping: list[multiprocessing.process.BaseProcess] = []
        self._pids: set[int] = set()
        self._queue: list[_Queued] = []
        self._outstanding = 0
        self._arrived = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.restarts = 0
        """Times the pool was rebuilt after a worker died."""

    def _current(self) -> tuple[int, concurrent.futures.ProcessPoolExecutor]:
        if self._closed:
            raise WorkerFailed("shutting down")
        if self._executor is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["mxspool.intake.authwork"])
            try:
                self._executor = concurrent.futures.ProcessPoolExecutor(
                    self.size,
                    mp_context=context,
                    initializer=authwork.initialize,
                    initargs=(self._nameserver, self._nice, os.getpid()),
                )
            except OSError as exc:  # its queues' locks are POSIX semaphores, in /dev/shm
                raise WorkerFailed(
                    f"cannot create the verification worker pool ({exc}): it needs a writable "
                    "/dev/shm (a container: mount a tmpfs there); until then verdicts are "
                    "temperror, or set [smtp] authentication = false"
                ) from None
            self._starting = asyncio.get_running_loop().create_task(
                asyncio.to_thread(_start_workers, self._executor, self.size)
            )
            self._starting.add_done_callback(self._started)
        return self._generation, self._executor

    def _started(self, task: asyncio.Task[list[concurrent.futures.Future[int]]]) -> None:
        if task.cancelled():
            return
        task.exception()  # retrieved; a failure shows again at the next submit, handled there
        if not self._closed:
            self._pump()  # the jobs that waited for the workers

    def _workers_up(self) -> bool:
        """True when jobs can go to the workers now; else their start is under way (in a
        thread) and ``_started`` pumps the queue when it ends."""
        try:
            self._current()
        except WorkerFailed:
            return True  # closed: _send fails the batch
        return self._starting is None or self._starting.done()

    def _rebuild(self, generation: int) -> None:
        if generation != self._generation or self._executor is None:
            return  # another job noticed first
        log.warning("an authentication worker process died; starting a new one")
        self._retire(self._executor)
        self._executor = None
        self._generation += 1
        self.restarts += 1
        metrics.auth_worker_restarted()

    def _retire(self, executor: concurrent.futures.ProcessPoolExecutor) -> None:
        starting = self._starting
        if starting is not None and not starting.done() and executor is self._executor:
            # its workers are still being started: retire it once they are (``stopped`` waits)
            self._starting = None
            self._retiring.append(starting)
            starting.add_done_callback(lambda _task: self._retire_started(executor))
            return
        self._retire_started(executor)

    def _retire_started(self, executor: concurrent.futures.ProcessPoolExecutor) -> None:
        processes = getattr(executor, "_processes", None) or {}
        self._stopping.extend(processes.values())
        executor.shutdown(wait=False, cancel_futures=True)

    async def run(self, job: authwork.Job) -> authwork.Outcome:
        """``authwork.verify(job)`` in a worker; tried again, alone, if a worker dies under it.

        Raises WorkerFailed."""
        return await self.submit([job])[0]

    def submit(self, jobs: list[authwork.Job]) -> list[asyncio.Future[authwork.Outcome]]:
        """Queue ``jobs`` (sent together when a worker is free); a future for each, which may
        raise WorkerFailed. Call on the event loop."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[authwork.Outcome]] = []
        for job in jobs:
            future: asyncio.Future[authwork.Outcome] = loop.create_future()
            if self._closed:
                future.set_exception(WorkerFailed("shutting down"))
            else:
                self._queue.append(_Queued(job, future))
            futures.append(future)
        self._pump()
        return futures

    def arrived(self) -> None:
        """A message arrived (the intake is busy): queued jobs wait for a pause, see above."""
        self._arrived = time.monotonic()

    def wait(self, oldest: float) -> float:
        """Seconds until jobs the oldest of which was queued at ``oldest`` (``time.monotonic``)
        may go to the workers (0: now)."""
        now = time.monotonic()
        return max(0.0, min(self._arrived + IDLE_GAP - now, oldest + self.hold_max - now))

    def _timed_pump(self) -> None:
        self._timer = None
        self._pump()

    def _pump(self) -> None:
        while self._queue and self._outstanding <= self.size:
            if not self._workers_up():
                return
            wait = self.wait(self._queue[0].queued)
            if wait > 0:  # the timer checks again (a later arrival postpones it once more)
                if self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(wait, self._timed_pump)
                return
            if self._queue[0].retried:
                batch = [self._queue.pop(0)]
            else:
                count = 0
                while count < min(BATCH_MAX, len(self._queue)) and not self._queue[count].retried:
                    count += 1
                batch, self._queue = self._queue[:count], self._queue[count:]
            batch = [item for item in batch if not item.future.done()]  # cancelled: dropped
            if batch:
                self._send(batch)

    def _send(self, batch: list[_Queued]) -> None:
        try:
            generation, executor = self._current()
            sent = executor.submit(authwork.verify_many, [item.job for item in batch])
        except (BrokenProcessPool, RuntimeError, WorkerFailed) as exc:
            self._failed(batch, -1, exc)
            return
        self._outstanding += 1
        loop = asyncio.get_running_loop()

        def done(sent: concurrent.futures.Future[list[authwork.Outcome]]) -> None:
            try:
                loop.call_soon_threadsafe(self._returned, batch, generation, sent)
            except RuntimeError:  # the loop is gone
                pass

        sent.add_done_callback(done)

    def _returned(
        self,
        batch: list[_Queued],
        generation: int,
        sent: concurrent.futures.Future[list[authwork.Outcome]],
    ) -> None:
        self._outstanding -= 1
        error = sent.exception() if not sent.cancelled() else WorkerFailed("shutting down")
        if error is not None:
            self._failed(batch, generation, error)
        else:
            for item, outcome in zip(batch, sent.result(), strict=True):
                self._seen(outcome.pid)
                if not item.future.done():
                    item.future.set_result(outcome)
        self._pump()

    def _failed(self, batch: list[_Queued], generation: int, error: BaseException) -> None:
        broken = isinstance(error, BrokenProcessPool)
        if broken and generation >= 0:
            self._rebuild(generation)
        elif broken and self._executor is not None:
            self._rebuild(self._generation)
        for item in batch:
            if item.future.done():
                continue
            if broken and not item.retried and not self._closed:
                item.retried = True
                self._queue.append(item)
            elif broken:
                item.future.set_exception(WorkerFailed("the verification worker died twice"))
            elif isinstance(error, WorkerFailed | RuntimeError):
                item.future.set_exception(WorkerFailed(str(error) or "shutting down"))
            else:
                item.future.set_exception(error)

    async def _spawned(self) -> None:
        """Start the worker processes (the forkserver and its preload import take ~0.3 s) and
        wait until they exist."""
        try:
            self._current()
            if self._starting is not None:
                await asyncio.shield(self._starting)
        except (BrokenProcessPool, RuntimeError, WorkerFailed) as exc:
            log.warning("could not start an authentication worker process: %s", exc)

    async def warm(self) -> None:
        """Start the workers and wait until each has answered (``authwork.ready``: they take
        their SCHED_IDLE priority only after it, so a busy machine does not hold this up); their
        pids go to the log."""
        await self._spawned()
        starting = self._starting
        if starting is None or not starting.done() or starting.cancelled():
            return
        if starting.exception() is not None:
            return
        for started in starting.result():
            try:
                self._seen(await asyncio.wrap_future(started))
            except (BrokenProcessPool, RuntimeError, concurrent.futures.CancelledError):
                return  # the pool broke or closed meanwhile: the jobs say so

    def _seen(self, pid: int) -> None:
        if pid in self._pids:
            return
        if len(self._pids) > 1000:
            self._pids.clear()
        self._pids.add(pid)
        log.info(
            "authentication: verifying in worker process %d (pool of %d, %s)",
            pid,
            self.size,
            self.priority,
        )

    @property
    def priority(self) -> str:
        """How the workers are scheduled (``authwork.lower_priority``), for the log."""
        if not self._nice:
            return "same priority as the intake"
        if hasattr(os, "SCHED_IDLE"):
            return f"SCHED_IDLE, else nice +{authwork.FALLBACK_NICE}"
        return f"nice +{authwork.FALLBACK_NICE}"

    def close(self) -> None:
        """No more jobs; queued ones are cancelled. ``stopped`` waits for the workers."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queued, self._queue = self._queue, []
        for item in queued:
            if not item.future.done():
                item.future.set_exception(WorkerFailed("shutting down"))
        if self._executor is not None:
            self._retire(self._executor)
            self._executor = None

    async def stopped(self) -> None:
        """Wait until every worker of this pool (and of retired ones) has exited."""
        starting, self._retiring = self._retiring, []
        if starting:  # their executors are retired by a done callback, which runs before this
            await asyncio.wait(starting)
            await asyncio.sleep(0)
        processes, self._stopping = self._stopping, []
        if processes:
            await asyncio.to_thread(_end, processes)


class _Queued:
    __slots__ = ("future", "job", "queued", "retried")

    def __init__(self, job: authwork.Job, future: asyncio.Future[authwork.Outcome]) -> None:
        self.job = job
        self.future = future
        self.retried = False
        self.queued = time.monotonic()


def _start_workers(
    executor: concurrent.futures.ProcessPoolExecutor, size: int
) -> list[concurrent.futures.Future[int]]:
    """In a thread: start ``size`` workers (a submit starts one while none is idle; the first
    also starts the forkserver); the futures of their ``authwork.ready`` jobs (their pids)."""
    return [executor.submit(authwork.ready) for _ in range(size)]


def _end(processes: list[multiprocessing.process.BaseProcess]) -> None:
    for process in processes:
        process.join(STOP_TIMEOUT)
        if process.is_alive():
            log.warning("authentication worker %s did not stop; killing it", process.pid)
            process.kill()
            process.join(1.0)
