"""The mail log: one line per SMTP session and transaction at intake, per delivery attempt, and
per operator action that changes a message's fate, so "did the message from X arrive, and where
did it go?" has an answer in a file, as with Postfix's maillog.

Parts: ``lines`` (an entry and its text/JSON line), ``writer`` (the thread that writes them,
bounded, never blocking the event loop), ``reader`` (``mxspool log ID``). The intake and the
delivery engine call ``emit``; ``start`` (``mxspool serve``) decides where lines go, from the
``[log]`` section; management commands (``cli_support.run``) start it too when the log is a
file, so an operator's action from the command line (``queue discard``...) is logged where the
server logs (appended whole lines: the two processes' lines do not mix). Before ``start``
``emit`` does nothing but count (``unwritten``).

Lines for accepted messages and delivery outcomes are emitted after their store commit: the log
never says "queued" or "delivered" for something the ledger does not hold.
"""

from __future__ import annotations

import time

from mxspool.config import LogConfig
from mxspool.maillog.lines import NOQUEUE, Entry, Value, json_line, text_line, timestamp
from mxspool.maillog.writer import LogFileError, Writer

__all__ = [
    "NOQUEUE",
    "Entry",
    "LogFileError",
    "Value",
    "dropped",
    "emit",
    "enabled",
    "start",
    "stop",
    "timestamp",
    "unwritten",
]

_writer: Writer | None = None
_dropped_before = 0
_unwritten = 0


def start(config: LogConfig) -> None:
    """Send the mail log where ``config`` says (raises LogFileError if the file cannot be
    opened); a second call replaces the first."""
    global _writer
    stop()
    if config.enabled:
        render = json_line if config.format == "json" else text_line
        _writer = Writer(config.file, render)


def stop() -> None:
    """Write out what is queued and stop; ``emit`` does nothing afterwards."""
    global _writer, _dropped_before
    writer, _writer = _writer, None
    if writer is not None:
        writer.close()
        _dropped_before += writer.dropped


def enabled() -> bool:
    return _writer is not None


def emit(component: str, event: str, queue_id: str, fields: dict[str, Value]) -> None:
    """Log one entry (never blocks; dropped and counted if the writer is far behind)."""
    global _unwritten
    writer = _writer
    if writer is not None:
        writer.put(Entry(time.time(), component, event, queue_id, fields))
    else:
        _unwritten += 1


def unwritten() -> int:
    """Entries emitted while no log was started (mail log off, or not opened)."""
    return _unwritten


def dropped() -> int:
    """Entries lost so far (queue full, or the file could not be written)."""
    writer = _writer
    return _dropped_before + (writer.dropped if writer is not None else 0)
