"""The serve lock: how a running ``mxspool serve`` marks the SQLite spool it uses.

``mxspool restore`` replaces the spool file, which must never happen under a running server
(its open connections would keep writing to the old, unlinked file, and acknowledged mail would
vanish with it). A server holds an exclusive ``flock`` on ``<spool>.lock`` for its lifetime, with
its pid written inside for the error message; ``restore`` takes the same lock without waiting and
refuses when it is held. The kernel drops the lock when the process dies, ``kill -9`` included,
so a crash never leaves a stale lock behind. The lock file itself is never deleted: deleting it
while someone waits on it would let two holders lock two different files.

PostgreSQL stores have no such file: several nodes share them, and restoring one is pg_restore's
business (see ``mxspool.store.backup``).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mxspool.store.base import StoreError


def lock_path(spool: Path) -> Path:
    """The lock file of the spool file ``spool``."""
    return spool.with_name(spool.name + ".lock")


class SpoolBusy(StoreError):
    """Another process (a server, a restore) holds the spool's lock."""


class SpoolLock:
    """An exclusive, non-waiting lock on a SQLite spool; ``release`` (or exit) frees it."""

    def __init__(self, spool: Path, holder: str) -> None:
        self.path = lock_path(spool)
        self.holder = holder
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise SpoolBusy naming who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise SpoolBusy(
                f"the spool {self.path.with_suffix('')} is in use by {other}; stop it first "
                "(e.g. systemctl stop mxspool) and try again"
            ) from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.holder} (pid {os.getpid()})\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> SpoolLock:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()
