"""The mail log's lines and writer thread, in process: escaping, logrotate, the bound."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from mxspool.maillog.lines import Entry, json_line, text_line, text_queue_id
from mxspool.maillog.reader import lines_of
from mxspool.maillog.writer import Writer
from tests.waiting import wait_until

HOSTILE = "evil\r\n2025-01-01T00:00:00.000Z mxspool/smtpd[1]: FAKE: queued: \x00\x1b\x85\u2028x"


def _entry(queue_id: str = "ID1", **fields: str) -> Entry:
    return Entry(1_700_000_000.5, "smtpd", "queued", queue_id, {"helo": HOSTILE, **fields})


def test_no_value_can_start_a_new_line() -> None:
    text = text_line(_entry())
    assert text.splitlines() == [text]  # also U+2028 and NEL, which splitlines() splits on
    assert 'helo="evil\\x0d\\x0a2025' in text and "\\x00\\x1b\\x85\\u2028x" in text
    assert text_queue_id(text) == "ID1"
    line = json_line(_entry())
    assert line.splitlines() == [line]
    assert json.loads(line)["helo"] == HOSTILE  # escaped on the way out, intact on the way in
    assert text_line(_entry(q="a b")).endswith('q="a b"')
    assert text_line(_entry(q="plain")).endswith("q=plain")


def test_writer_follows_logrotate_and_reader_streams(tmp_path: Path) -> None:
    path = tmp_path / "mail.log"
    writer = Writer(str(path), text_line)
    try:
        writer.put(_entry("A1"))
        wait_until(lambda: path.exists() and path.read_text().count("\n") == 1, 10, "line 1")
        path.rename(tmp_path / "mail.log.1")  # what logrotate does (no copytruncate)
        writer.put(_entry("A2"))
        writer.put(_entry("A1"))
        wait_until(lambda: path.exists() and path.read_text().count("\n") == 2, 10, "new file")
    finally:
        writer.close()
    assert (tmp_path / "mail.log.1").read_text().count("\n") == 1
    assert [text_queue_id(line) for line in lines_of(path, "A1")] == ["A1"]
    assert list(lines_of(path, "A3")) == []
    assert writer.dropped == 0


def test_a_stuck_writer_drops_and_counts_instead_of_growing(tmp_path: Path) -> None:
    gate = threading.Event()
    started = threading.Event()

    def slow(entry: Entry) -> str:
        started.set()
        gate.wait(10)
        return text_line(entry)

    path = tmp_path / "mail.log"
    writer = Writer(str(path), slow, capacity=2)
    try:
        writer.put(_entry("B0"))  # taken by the thread, which then blocks in slow()
        assert started.wait(10)
        for index in range(1, 6):  # two fit in the queue; three are dropped
            writer.put(_entry(f"B{index}"))
        assert writer.dropped == 3
    finally:
        gate.set()
        writer.close()
    # The positive control: what was queued was written, in order.
    ids = [text_queue_id(line) for line in path.read_text().splitlines()]
    assert ids == ["B0", "B1", "B2"]
