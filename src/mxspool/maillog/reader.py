"""``mxspool log ID``: the mail-log lines of one message, in the order they were written.

The file is streamed line by line (a log grows to gigabytes; it is never read whole). A line is
split on ``\\n`` only, as the writer never puts another line end in one (see ``lines``). Text and
JSON lines are told apart per line, so a file that changed format midway is read whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from mxspool.maillog.lines import text_queue_id


def lines_of(path: Path, queue_id: str) -> Iterator[str]:
    """Every line of ``path`` about ``queue_id`` (without its line end); OSError if unreadable."""
    needle = queue_id.encode()
    with path.open("rb") as handle:
        for raw in handle:
            if needle not in raw:  # the cheap test first: most lines are about other mail
                continue
            line = raw.rstrip(b"\n").decode("utf-8", errors="backslashreplace")
            if _queue_id(line) == queue_id:
                yield line


def _queue_id(line: str) -> str | None:
    if line.startswith("{"):
        try:
            data = json.loads(line)
        except ValueError:
            return None
        found = data.get("queue_id") if isinstance(data, dict) else None
        return found if isinstance(found, str) else None
    return text_queue_id(line)
