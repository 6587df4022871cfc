"""The harness itself: the shim sees every write, and the harness catches what it must catch.

- Positive control: a clean run of `mxspool serve` under the shim leaves nothing for a power
  cut to undo (the database is unchanged by the cut), and undoing *everything* the log
  recorded gives back the database as it was before the run, byte for byte: no write to it
  escaped the shim.
- Negative controls, each a program that acknowledges before its data is durable, which
  kill -9 cannot tell from a correct one and the power cut must: a tiny writer that fsyncs
  after acknowledging; the store with PRAGMA synchronous = OFF; and the commit thread built
  with a coalescing VFS that syncs before it writes out its buffer.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import wait_for_port
from tests.powerloss import harness, powercut
from tests.powerloss.ledger_writer import RECORD, record

HERE = Path(__file__).parent


def test_shim_records_every_write_of_a_clean_run(shim: Path, tmp_path: Path) -> None:
    zygote = harness.Zygote(shim)
    try:
        chain = harness.Chain(
            tmp_path,
            zygote,
            python_writer=False,
            sizes=[300, 30000],
            seed=7,
            smtp={"spill_threshold": "20KiB"},
        )
        db = chain.node.db
        before = db.read_bytes()
        log = tmp_path / "clean.log"
        pid = zygote.spawn(chain.request(0, log))
        wait_for_port(chain.node.port, timeout=20)
        stop = threading.Event()
        clients = [
            threading.Thread(
                target=harness.client_loop,
                args=(
                    chain.node.port,
                    chain.ledger,
                    f"c{n}",
                    chain.sizes,
                    random.Random(n),
                    stop,
                    time.monotonic() + 1.0,
                ),
            )
            for n in range(3)
        ]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(timeout=30)
        os.kill(pid, signal.SIGTERM)
        assert zygote.wait(pid) == 0
    finally:
        zygote.close()
    acknowledged = len(chain.ledger.acknowledged())
    after = db.read_bytes()
    recorded = powercut.read_log(log)
    kinds = {(r.type, os.path.basename(r.path)) for r in recorded.records}
    for expected in (
        (powercut.WRITE, "spool.db"),
        (powercut.WRITE, "spool.db-wal"),
        (powercut.CREATE, "spool.db-wal"),
        (powercut.SYNC, "spool.db"),
        (powercut.SYNC, "spool.db-wal"),
        (powercut.SYNC, "data"),  # SQLite syncs the directory once it created the WAL
    ):
        assert expected in kinds, f"the shim did not record {expected}"
    assert recorded.crashed_at is None
    assert acknowledged > 20
    # Everything the clean shutdown wrote to the database, it synced.
    assert [r for r in powercut.pending(recorded) if r.path == str(db.resolve())] == []
    powercut.cut_power(recorded, random.Random(1))
    assert db.read_bytes() == after
    # Undo all of it: the database as it was before the run, so every write was recorded.
    writes = sum(1 for r in recorded.records if r.type == powercut.WRITE)
    powercut.cut_power(recorded, random.Random(1), everything=True)
    assert db.read_bytes() == before, f"{writes} writes undone, yet the file differs"
    assert len(after) > len(before)  # the run did change it


def _ledger_run(shim: Path, directory: Path, mode: str, crash_at: int) -> tuple[int, int]:
    """(acknowledged, acknowledged but lost) for one crash of ledger_writer.py."""
    directory.mkdir()
    target = directory / "ledger"
    target.touch()  # created and made durable beforehand: the control is about the data
    log = directory.parent / f"{directory.name}.log"
    result = subprocess.run(
        [sys.executable, str(HERE / "ledger_writer.py"), str(target), "40", mode],
        env={
            **os.environ,
            "LD_PRELOAD": str(shim),
            "MXSPOOL_POWERLOSS_DIR": str(directory),
            "MXSPOOL_POWERLOSS_LOG": str(log),
            "MXSPOOL_POWERLOSS_CRASH_AT": str(crash_at),
        },
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    acked = [int(line.split()[1]) for line in result.stdout.decode().splitlines()]
    before = target.read_bytes()
    assert all(before[n * RECORD : (n + 1) * RECORD] == record(n) for n in acked)  # kill -9
    powercut.cut_power(powercut.read_log(log), random.Random(crash_at))
    data = target.read_bytes()
    lost = [n for n in acked if data[n * RECORD : (n + 1) * RECORD] != record(n)]
    return len(acked), len(lost)


def test_harness_catches_acknowledging_before_fsync(shim: Path, tmp_path: Path) -> None:
    good = [_ledger_run(shim, tmp_path / f"good{n}", "good", n) for n in (3, 9, 17, 30)]
    bad = [_ledger_run(shim, tmp_path / f"bad{n}", "bad", n) for n in (2, 3, 5, 8)]
    assert all(
        acked >= crash_at - 1 for (acked, _), crash_at in zip(good, (3, 9, 17, 30), strict=True)
    )
    assert [lost for _, lost in good] == [0, 0, 0, 0]
    assert all(lost > 0 for _, lost in bad), bad


def test_harness_catches_synchronous_off(shim: Path, tmp_path: Path) -> None:
    """The store with its fsyncs turned off: kill -9 loses nothing, a power cut does."""
    from mxspool.store.sqlite import _WRITER_PRAGMAS

    pragmas = [p.replace("synchronous = FULL", "synchronous = OFF") for p in _WRITER_PRAGMAS]
    assert pragmas != list(_WRITER_PRAGMAS)
    zygote = harness.Zygote(shim)
    try:
        chain = harness.Chain(
            tmp_path, zygote, python_writer=True, sizes=[300, 3000], seed=3, pragmas=pragmas
        )
        killed = chain.run_point(0, seconds=0.6, cut=False)
        assert killed.sync_points == 0 and killed.acknowledged > 20
        assert killed.problems == []  # kill -9 cannot see it
        cut = chain.run_point(0, seconds=0.6)
    finally:
        zygote.close()
    assert cut.acknowledged > killed.acknowledged
    # Acknowledged mail lost, or the database itself torn ("malformed"): either way, caught.
    assert cut.problems


def test_harness_catches_a_vfs_that_syncs_before_writing(shim: Path, tmp_path: Path) -> None:
    """The commit thread with _coalesce.c's xSync mutated to flush its buffer after the sync."""
    mutant = harness.build_mutant_groupcommit(tmp_path / "mutant")
    zygote = harness.Zygote(shim, groupcommit=mutant)
    try:
        chain = harness.Chain(
            tmp_path / "spool", zygote, python_writer=False, sizes=[300, 3000, 30000], seed=11
        )
        found = []
        for crash_at in (40, 25, 60, 33, 51, 70):
            found += chain.run_point(crash_at).problems
            if found:
                break
    finally:
        zygote.close()
    assert found, "six crash points with a broken VFS and nothing found"
