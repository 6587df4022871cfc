"""Bounded memory: many concurrent large messages do not grow the server with their size."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import Spooler

SESSIONS = 40
MESSAGE_MIB = 20
LINE = b"x" * 998 + b"\r\n"


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


async def _send_large(port: int, index: int) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> tuple[int, str]:
        line = await reader.readline()
        while line[3:4] == b"-":
            line = await reader.readline()
        return int(line[:3]), line[4:].decode().strip()

    await reply()
    writer.write(b"EHLO big.client\r\n")
    await reply()
    writer.write(
        f"MAIL FROM:<big{index}@src.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n".encode()
    )
    for _ in range(3):
        await reply()
    header = f"Subject: large {index}\r\n\r\n".encode()
    writer.write(header)
    lines_per_piece = 256
    total = MESSAGE_MIB * 1024 * 1024
    sent = len(header)
    while sent < total:
        writer.write(LINE * lines_per_piece)
        sent += len(LINE) * lines_per_piece
        await writer.drain()
    writer.write(b".\r\n")
    result = await reply()
    writer.close()
    return result


@pytest.mark.slow
def test_concurrent_large_messages_stay_under_300_mib(spooler: Spooler) -> None:
    async def run() -> list[tuple[int, str]]:
        return await asyncio.gather(*(_send_large(spooler.port, i) for i in range(SESSIONS)))

    results = asyncio.run(run())
    assert spooler.proc is not None
    peak = _peak_rss_mib(spooler.proc.pid)
    print(f"\n{SESSIONS} concurrent {MESSAGE_MIB} MiB messages: server peak RSS {peak:.0f} MiB")
    assert all(code == 250 for code, _ in results), results
    assert peak < 300
    conn = sqlite3.connect(spooler.db)
    try:
        rows = conn.execute("SELECT seq, size, sha256 FROM messages").fetchall()
        assert len(rows) == SESSIONS
        seq, size, digest = rows[0]
        blob = conn.execute("SELECT data FROM bodies WHERE seq = ?", (seq,)).fetchone()[0]
        assert len(blob) == size > MESSAGE_MIB * 1024 * 1024
        assert hashlib.sha256(blob).hexdigest() == digest
    finally:
        conn.close()
