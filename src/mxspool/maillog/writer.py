"""The mail log's writer thread: entries queue up on the event loop, one thread writes them.

The event loop never touches the disk for a log line: ``put`` appends the entry to a deque
(bounded by ``capacity``) and returns; only when the thread is idle, waiting for a first entry,
does ``put`` wake it (an Event). The thread takes what has queued up, formats it and writes it
with one ``write`` and one ``flush`` per batch, then waits ``INTERVAL`` before the next: under
load the thread wakes ten times a second, not once per line, and the cost per line is
formatting plus a share of a system call. A line reaches the file within ~0.1 s. (A
``queue.Queue`` did the same with a lock, a size check and a notify in Python per line: ~3 us
of the event loop's time each, two lines per message.)

This is the stdlib's QueueHandler/QueueListener pattern without ``logging``'s LogRecord per line
(a record, a copy and a format on the loop per message, measurably slower at thousands of
messages a second) and with two things it lacks: a bound (a stuck disk must cost lines, counted
in ``dropped`` and shown as ``mxspool_maillog_dropped_lines``, not memory), and batching.

Files are opened for append and reopened when the path no longer names the open file (moved or
deleted by logrotate), checked once per batch: WatchedFileHandler's rule, so logrotate needs
neither ``copytruncate`` nor a signal. An empty path writes to stderr (journald).
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from mxspool.maillog.lines import Entry

CAPACITY = 8192
"""Entries waiting for the thread at most; beyond it new entries are dropped and counted."""
BATCH = 1024
"""Entries written per write() at most."""
INTERVAL = 0.1
"""Seconds the thread waits after a write before it takes the next batch."""


class LogFileError(Exception):
    """The log file cannot be opened for append; the message says which and why."""


class Writer:
    def __init__(self, path: str, render: Callable[[Entry], str], capacity: int = CAPACITY) -> None:
        self.path = path
        self._render = render
        self._capacity = capacity
        self._entries: collections.deque[Entry] = collections.deque()
        self._idle = False  # the thread waits on _wake for a first entry
        self._wake = threading.Event()
        self._closing = False
        self.dropped = 0
        self.write_errors = 0
        self._file: TextIO | None = None
        self._identity: tuple[int, int] | None = None
        if path:
            self._open()  # fails at start, not at the first message
        self._thread = threading.Thread(target=self._run, name="maillog", daemon=True)
        self._thread.start()

    def put(self, entry: Entry) -> None:
        """Queue ``entry`` for the thread; never blocks (a full queue drops it, counted).

        Safe from any thread: the deque's append is atomic, and the thread marks itself idle
        before its last look at the deque, so it either sees the entry or is woken for it."""
        entries = self._entries
        if len(entries) >= self._capacity or self._closing:
            self.dropped += 1
            return
        entries.append(entry)
        if self._idle:
            self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (waiting at most ``timeout``), then stop and close the file."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)
        if self._file is not None and not self._thread.is_alive():
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        queued, take = self._entries, self._entries.popleft
        while True:
            if not queued:
                if self._closing:
                    return
                # Idle: say so before looking again, so that a put() after the look wakes us.
                self._idle = True
                if not queued and not self._closing:
                    self._wake.wait()
                self._idle = False
                self._wake.clear()
                continue
            batch = [take() for _ in range(min(len(queued), BATCH))]
            self._write("".join(self._render(entry) + "\n" for entry in batch), len(batch))
            if not self._closing:
                # Let lines gather: one wake-up, write and flush per interval under load instead
                # of one per line (a thread switch per message cost the loop ~25% of its CPU).
                time.sleep(INTERVAL)

    def _write(self, text: str, count: int) -> None:
        try:
            stream = self._stream()
            stream.write(text)
            stream.flush()
        except (OSError, ValueError) as exc:
            self.write_errors += 1
            self.dropped += count
            if self.write_errors == 1 or self.write_errors % 1000 == 0:
                print(f"mxspool: cannot write the mail log {self.path}: {exc}", file=sys.stderr)
            self._identity = None  # try a fresh open next time

    def _stream(self) -> TextIO:
        if not self.path:
            return sys.stderr
        try:
            stat = os.stat(self.path)
            moved = (stat.st_dev, stat.st_ino) != self._identity
        except FileNotFoundError:
            moved = True
        if moved or self._file is None:
            self._open()
        assert self._file is not None
        return self._file

    def _open(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        try:
            handle = open(self.path, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
        except OSError as exc:
            raise LogFileError(
                f"cannot open the mail log [log] file = {self.path!r} for append: "
                f"{exc.strerror or exc}; create its directory, fix its permissions, or set "
                'file = "" to log to stderr'
            ) from exc
        stat = os.fstat(handle.fileno())
        self._file, self._identity = handle, (stat.st_dev, stat.st_ino)
