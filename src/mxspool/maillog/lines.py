"""One mail-log entry, rendered as a text line (Postfix-like ``key=value``) or a JSON object.

An entry is what happened to one message (or one SMTP session) at one moment: when, which part
of mxspool (``smtpd``, ``deliver``, ``admin``), the queue id (``NOQUEUE`` when there is none),
what happened (``queued``, ``attempt``...) and its fields. Values come from clients (HELO names,
addresses) and from remote servers (replies), so nothing they send may break a line: in text
every character that is not printable (CR, LF, other C0/C1 controls, U+2028...) is written as a
``\\xNN``/``\\uNNNN`` escape, a value with a space, a comma or a quote is quoted, and ``\\`` and
``"`` are escaped; JSON escapes controls itself, and the Unicode line separators are escaped
too, so one entry is always exactly one line whatever reads it.
"""

from __future__ import annotations

import json
import os
import time
from typing import NamedTuple

Value = str | int | float | list[str] | None
"""A field's value: None leaves the field out; a list repeats the key (text) or is an array."""

NOQUEUE = "NOQUEUE"


class Entry(NamedTuple):
    at: float
    """time.time() when it happened."""
    component: str
    event: str
    queue_id: str
    fields: dict[str, Value]


_PID = os.getpid()


def _pid() -> int:
    return _PID


def _after_fork() -> None:
    global _PID
    _PID = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


_last_second: tuple[int, str] = (-1, "")


def timestamp(at: float) -> str:
    """ISO 8601 in UTC with milliseconds: 2025-06-01T10:00:00.123Z."""
    global _last_second
    seconds = int(at)
    millis = int((at - seconds) * 1000)
    cached, text = _last_second  # most lines share their second with the one before
    if cached != seconds:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _last_second = (seconds, text)
    return f"{text}.{millis:03d}Z"


def _escape_char(char: str) -> str:
    if char == "\\":
        return "\\\\"
    if char == '"':
        return '\\"'
    if char.isprintable():
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def text_value(value: str) -> str:
    """``value`` as one token: escaped, and quoted when it holds a space, a comma or a quote."""
    if value.isprintable() and "\\" not in value and '"' not in value:
        if value and " " not in value and "," not in value:
            return value
        return f'"{value}"'
    escaped = "".join(_escape_char(char) for char in value)
    return f'"{escaped}"'


def _text_field(key: str, value: Value) -> str:
    if isinstance(value, float):
        return f"{key}={value:.3f}"
    if isinstance(value, int):
        return f"{key}={value}"
    if isinstance(value, list):
        return ", ".join(f"{key}={text_value(item)}" for item in value)
    return f"{key}={text_value(str(value))}"


def text_line(entry: Entry) -> str:
    """``2025-06-01T10:00:00.123Z mxspool/smtpd[812]: QUEUEID: queued: from=<a@b>, size=..``"""
    fields = ", ".join(_text_field(k, v) for k, v in entry.fields.items() if v is not None)
    return (
        f"{timestamp(entry.at)} mxspool/{entry.component}[{_pid()}]: "
        f"{text_value(entry.queue_id)}: {entry.event}: {fields}"
    )


def json_line(entry: Entry) -> str:
    """One JSON object: time, component, pid, queue_id, event, then the fields."""
    data: dict[str, object] = {
        "time": timestamp(entry.at),
        "component": entry.component,
        "pid": _pid(),
        "queue_id": entry.queue_id,
        "event": entry.event,
    }
    for key, value in entry.fields.items():
        if value is not None:
            data[key] = round(value, 3) if isinstance(value, float) else value
    line = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    # json escapes C0 controls but not these, which some readers take for line ends.
    if "\u2028" in line or "\u2029" in line or "\x85" in line:
        line = line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
        line = line.replace("\x85", "\\u0085")
    return line


def text_queue_id(line: str) -> str | None:
    """The queue id of a text line (the token after ``mxspool/component[pid]: ``), or None."""
    _, sep, rest = line.partition("]: ")
    if not sep:
        return None
    queue_id, sep, _ = rest.partition(": ")
    return queue_id if sep else None
