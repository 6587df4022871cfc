"""The mail log's writer thread: entries queue up on the event loop, one thread writes them.

The event loop never touches the disk for a log line: ``put`` appends the entry to a bounded
``queue.Queue`` (a lock and a notify) and returns. The thread takes what has queued up, formats
it and writes it with one ``write`` and one ``flush`` per batch, then waits ``INTERVAL`` before
the next: under load the thread wakes ten times a second, not once per line, and the cost per
line is formatting plus a share of a system call. A line reaches the file within ~0.1 s.

This is the stdlib's QueueHandler/QueueListener pattern without ``logging``'s LogRecord per line
(a record, a copy and a format on the loop per message, measurably slower at thousands of
messages a second) and with two things it lacks: a bound (a stuck disk must cost lines, counted
in ``dropped`` and shown as ``mxspool_maillog_dropped_lines``, not memory), and batching.

Files are opened for append and reopened when the path no longer names the open file (moved or
deleted by logrotate), checked once per batch: WatchedFileHandler's rule, so logrotate needs
neither ``copytruncate`` nor a signal. An empty path writes to stderr (journald).
"""

from __future__ import annotations

import contextlib
import os
import queue
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
        self._queue: queue.Queue[Entry | None] = queue.Queue(capacity)
        self.dropped = 0
        self.write_errors = 0
        self._file: TextIO | None = None
        self._identity: tuple[int, int] | None = None
        if path:
            self._open()  # fails at start, not at the first message
        self._thread = threading.Thread(target=self._run, name="maillog", daemon=True)
        self._thread.start()

    def put(self, entry: Entry) -> None:
        """Queue ``entry`` for the thread; never blocks (a full queue drops it, counted)."""
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (waiting at most ``timeout``), then stop and close the file."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        if self._file is not None and not self._thread.is_alive():
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        while True:
            batch = [get()]
            with contextlib.suppress(queue.Empty):
                while len(batch) < BATCH and batch[-1] is not None:
                    batch.append(get_nowait())
            stop = batch[-1] is None
            entries = [entry for entry in batch if entry is not None]
            if entries:
                self._write("".join(self._render(entry) + "\n" for entry in entries), len(entries))
            if stop:
                return
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
