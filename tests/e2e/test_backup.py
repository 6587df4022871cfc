"""``mxspool backup`` and ``restore`` against a real ``mxspool serve``.

The backup is taken while Postfix's smtp-source sends 5,000 messages: it must open, pass
``PRAGMA integrity_check`` and hold every message committed (hence acknowledged) before it
started, while intake keeps accepting (more messages after the backup than before). Restore
refuses while the server runs, and replaces the spool once it is stopped.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Spooler
from tests.waiting import wait_until

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
TOTAL = 200_000
"""More than smtp-source can send while the backup runs, however slow the machine: it is
stopped once the backup is done (its messages so far all answered 250)."""

pytestmark = pytest.mark.skipif(
    not Path(SMTP_SOURCE).exists(), reason="Postfix's smtp-source is not installed"
)


def message_ids(db: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {row[0] for row in conn.execute("SELECT id FROM messages")}
    finally:
        conn.close()


def count(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    finally:
        conn.close()


@pytest.fixture
def stopped(spooler_factory: Any) -> Spooler:
    """A spool with one held domain, no server running."""
    spooler: Spooler = spooler_factory()
    spooler.cli("domain", "add", "dest.test", "--route", "127.0.0.1:9", "--tls", "off", "--hold")
    return spooler


@pytest.fixture
def node(stopped: Spooler) -> Spooler:
    stopped.start()
    return stopped


def test_backup_during_intake_holds_everything_acknowledged(node: Spooler, tmp_path: Path) -> None:
    source = subprocess.Popen(
        [SMTP_SOURCE, "-s", "10", "-m", str(TOTAL), "-c", "-l", "1024", "-f", "a@src.test",
         "-t", "u@dest.test", f"127.0.0.1:{node.port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_until(lambda: count(node.db) >= 300, 60, "300 messages accepted")
        acknowledged = message_ids(node.db)  # committed, hence answered 250
        backup = tmp_path / "spool-backup.db"
        started = time.monotonic()
        result = node.cli("backup", str(backup))
        took = time.monotonic() - started
        after = count(node.db)
        assert source.poll() is None, "smtp-source ended before the backup did"
    finally:
        if source.poll() is None:
            source.terminate()
        source.wait(timeout=30)
    # No 4xx/5xx meanwhile (smtp-source would have stopped with a fatal error and said so).
    complaints = source.stderr.read().decode() if source.stderr else ""
    assert "fatal" not in complaints and "error" not in complaints, complaints
    print(f"backup of {len(acknowledged)}+ messages took {took:.2f} s: {result.stdout.strip()}")
    assert "backed up" in result.stdout and str(backup) in result.stdout
    # Intake went on meanwhile (positive control for "the backup did not stop it").
    assert after > len(acknowledged)
    conn = sqlite3.connect(f"file:{backup}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        in_backup = {row[0] for row in conn.execute("SELECT id FROM messages")}
        bodies = conn.execute("SELECT count(*) FROM bodies").fetchone()[0]
    finally:
        conn.close()
    missing = acknowledged - in_backup
    assert not missing, f"{len(missing)} acknowledged messages missing from the backup"
    assert bodies == len(in_backup)
    assert count(node.db) >= after  # the live spool lost nothing either


def test_backup_refuses_to_overwrite_unless_forced(stopped: Spooler, tmp_path: Path) -> None:
    node = stopped
    target = tmp_path / "exists.db"
    target.write_bytes(b"keep me")
    refused = node.cli("backup", str(target), check=False)
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert target.read_bytes() == b"keep me"
    forced = node.cli("backup", str(target), "--force")  # positive control
    assert "backed up" in forced.stdout
    assert target.read_bytes()[:16] == b"SQLite format 3\x00"


def test_restore_refuses_while_serving_then_replaces_the_spool(
    node: Spooler, tmp_path: Path
) -> None:
    node.cli("domain", "add", "before.test", "--route", "127.0.0.1:9", "--tls", "off")
    backup = tmp_path / "b.db"
    node.cli("backup", str(backup))
    node.cli("domain", "add", "after.test", "--route", "127.0.0.1:9", "--tls", "off")

    busy = node.cli("restore", str(backup), check=False)
    assert busy.returncode == 1
    assert "in use by mxspool serve" in busy.stderr and "stop it first" in busy.stderr
    assert "after.test" in node.cli("domain", "list").stdout  # nothing replaced

    node.stop()
    done = node.cli("restore", str(backup))
    assert "restored" in done.stdout and "next:" in done.stdout
    domains = node.cli("domain", "list").stdout
    assert "before.test" in domains and "after.test" not in domains
    aside = list(node.db.parent.glob("spool.db.before-restore-*"))
    assert len(aside) == 1 and count(aside[0]) == 0
    node.start()  # the restored spool serves
    assert node.cli("status", "--json").returncode == 0


def test_restore_checks_the_file(stopped: Spooler, tmp_path: Path) -> None:
    node = stopped
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    refused = node.cli("restore", str(junk), check=False)
    assert refused.returncode == 1 and "not" in refused.stderr
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    refused = node.cli("restore", str(other), check=False)
    assert refused.returncode == 1 and "not an mxspool spool" in refused.stderr
    assert "dest.test" in node.cli("domain", "list").stdout  # the spool is untouched
