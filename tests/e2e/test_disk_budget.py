"""Disk budget (issue 14, item 10): DATA in flight and SIZE= reservations count against free
space, so the spool disk does not fill; a disk that fills anyway mid-DATA gets 451 and leaves
the spool consistent. On real small filesystems (tmpfs mounts, which need root)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Spooler
from tests.smtp_client import RawClient

MIB = 1024 * 1024
LINE = b"z" * 998 + b"\r\n"


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs as a small real filesystem ({result.stderr.strip()}); "
            "these tests need root (or CAP_SYS_ADMIN)"
        )


@pytest.fixture
def small_disk_node(spooler_factory: Any) -> Iterator[Callable[..., Spooler]]:
    """A spooler whose data directory is a tmpfs of a given size (and, optionally, its
    temporary-file directory another one)."""
    mounts: list[Path] = []
    nodes: list[Spooler] = []

    def make(size: str, tmp_size: str | None = None, **sections: Any) -> Spooler:
        node: Spooler = spooler_factory(**sections)
        nodes.append(node)
        data = node.db.parent
        _mount_tmpfs(data, size)
        mounts.append(data)
        if tmp_size is not None:
            _mount_tmpfs(data / "tmp", tmp_size)
            mounts.append(data / "tmp")
        node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--hold")
        node.start()
        return node

    yield make
    for node in nodes:
        node.stop()
    for path in reversed(mounts):
        subprocess.run(["umount", "-l", str(path)], check=False)


def _free(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _stored(node: Spooler) -> int:
    conn = sqlite3.connect(node.db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    finally:
        conn.close()


def _session(node: Spooler) -> RawClient:
    client = RawClient(node.port, timeout=30)
    assert client.reply()[0] == 220
    assert client.command("EHLO budget.client")[0] == 250
    return client


def _start_data(client: RawClient, size: int | None = None) -> None:
    mail = "MAIL FROM:<a@src.test>" + (f" SIZE={size}" if size is not None else "")
    client.send(f"{mail}\r\nRCPT TO:<u@example.test>\r\nDATA\r\n".encode())
    assert [code for code, _ in client.replies(3)] == [250, 250, 354]


def _send_body(client: RawClient, mib: int) -> None:
    client.send(b"Subject: budget\r\n\r\n")
    block = LINE * 1024  # 1000 KiB-ish pieces
    for _ in range(mib * MIB // len(block)):
        client.send(block)


def test_data_past_the_budget_is_refused_with_452(small_disk_node: Any) -> None:
    # 48 MiB of disk and 24 MiB to keep free: a 30 MiB message (kept in memory until the
    # commit) would fit on the disk but leave it under min_free_space.
    node = small_disk_node(
        "48m", smtp={"spill_threshold": "64MiB"}, store={"min_free_space": "24MiB"}
    )
    client = _session(node)
    _start_data(client)
    _send_body(client, 30)
    client.send(b".\r\n")
    assert client.reply() == (452, "4.3.1 Insufficient storage")
    assert client.command("NOOP")[0] == 250  # the session goes on
    assert _free(node.db.parent) >= 24 * MIB
    # Positive control: a message that fits in the budget is stored.
    _start_data(client)
    _send_body(client, 2)
    client.send(b".\r\n")
    assert client.reply()[0] == 250
    client.close()
    assert _stored(node) == 1


def _mail_until(client: RawClient, size: int, code: int, what: str) -> None:
    """MAIL FROM with SIZE= (and RSET) until the answer is ``code``, within 20 s."""
    deadline = time.monotonic() + 20
    while True:
        answer = client.command(f"MAIL FROM:<b@src.test> SIZE={size}")
        if answer[0] == 250:
            assert client.command("RSET")[0] == 250
        if answer[0] == code:
            return
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_size_reservations_and_data_in_flight_count(small_disk_node: Any) -> None:
    # 64 MiB of disk, 24 MiB to keep free: about 39 MiB to share.
    node = small_disk_node(
        "64m", smtp={"spill_threshold": "64MiB"}, store={"min_free_space": "24MiB"}
    )
    # SIZE= is reserved at MAIL FROM: two 20 MiB declarations do not both fit.
    first, second = _session(node), _session(node)
    assert first.command(f"MAIL FROM:<a@src.test> SIZE={20 * MIB}")[0] == 250
    assert second.command(f"MAIL FROM:<b@src.test> SIZE={20 * MIB}") == (
        452,
        "4.3.1 Insufficient storage",
    )
    assert first.command("RSET")[0] == 250  # gives the reservation back
    assert second.command(f"MAIL FROM:<b@src.test> SIZE={20 * MIB}")[0] == 250
    assert second.command("RSET")[0] == 250

    # DATA in flight without SIZE= counts too: while the first client is 30 MiB into a
    # message, a 15 MiB declaration no longer fits; when that client goes away, it does again.
    _start_data(first)
    _send_body(first, 30)
    _mail_until(second, 15 * MIB, 452, "30 MiB of DATA in flight never counted")
    first.close()
    _mail_until(second, 15 * MIB, 250, "the DATA of a closed session was never given back")
    second.close()
    assert _stored(node) == 0


def test_a_full_disk_mid_data_answers_451_and_keeps_the_spool_whole(
    small_disk_node: Any,
) -> None:
    # The temporary files have a 2 MiB filesystem of their own: the budget (measured on the
    # spool's disk) sees room, and the spill file hits a real ENOSPC.
    node = small_disk_node(
        "48m", tmp_size="2m", smtp={"spill_threshold": "64KiB"}, store={"min_free_space": "1MiB"}
    )
    client = _session(node)
    _start_data(client)
    _send_body(client, 4)
    client.send(b".\r\n")
    assert client.reply() == (451, "4.3.0 Temporary storage error")
    assert client.command("NOOP")[0] == 250
    _start_data(client)
    client.send(b"Subject: small\r\n\r\nfits\r\n.\r\n")
    assert client.reply()[0] == 250
    assert client.command("QUIT")[0] == 221
    # The failed spill file is gone, and the spool holds exactly the message acknowledged.
    assert _free(node.db.parent / "tmp") > MIB
    node.stop()
    assert _stored(node) == 1
    log = node.log.read_text()
    assert "No space left on device" in log
