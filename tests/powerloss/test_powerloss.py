"""Power loss, not just kill -9: crash `mxspool serve` at sync points, cut the power, check.

For each write path, chains of crash points (harness.py): SMTP clients send mail while the
shim (shim.c) kills the server at its Nth sync; the harness then undoes every write that no
completed sync made durable, torn at sector granularity (powercut.py), and checks that every
message whose 250 the clients got is there, whole, with every recipient, that nothing
half-written is visible, and that the spool opens and takes new mail (check.py).

- commit-thread: accepted messages with bodies in memory go through the C commit thread and
  its coalescing VFS (_groupcommit.c, _coalesce.c); a few larger ones spill to disk and go
  through the Python writer, taking turns with it.
- python-writer: the store as built without the C thread: in-memory bodies in one multi-row
  INSERT, spilled ones (most, with spill_threshold at 16 KiB) copied in by blob writes.

MXSPOOL_POWERLOSS_POINTS sets the number of crash points per path (default 40, a bounded
sample for `make test`; the long run is several hundred). MXSPOOL_POWERLOSS_SEED picks
another sample; a failure names its seed, chain and point, and keeps the files as the crash
left them (before-cut/) next to the spool.
"""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.powerloss import harness

POINTS = int(os.environ.get("MXSPOOL_POWERLOSS_POINTS", "40"))
SEED = int(os.environ.get("MXSPOOL_POWERLOSS_SEED", "2026"))
# Crash points per spool: a chain's spool grows with every point, and so do its checks.
CHAIN_POINTS = 8

PATHS: dict[str, dict[str, Any]] = {
    "commit-thread": {
        "python_writer": False,
        "smtp": {"spill_threshold": "64KiB"},
        "sizes": [300, 300, 2000, 2000, 8000, 8000, 30000, 30000, 100000],
    },
    "python-writer": {
        "python_writer": True,
        "smtp": {"spill_threshold": "16KiB"},
        "sizes": [300, 2000, 8000, 30000, 100000],
    },
}


@dataclass
class Tally:
    points: int = 0
    crashed: int = 0  # by the shim at their sync point (the others: killed by the harness)
    acknowledged: int = 0
    seconds: float = 0.0
    cut: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def line(self, path: str) -> str:
        cut = ", ".join(f"{key} {value}" for key, value in sorted(self.cut.items()))
        return (
            f"{path}: {self.points} crash points ({self.crashed} at their sync point) in "
            f"{self.seconds:.0f} s, {self.acknowledged} messages acknowledged; cut: {cut}; "
            f"{len(self.failures)} failures"
        )


def crash_point(rng: random.Random) -> int:
    """Mostly the first 150 sync points (commits, the first checkpoints, the directory sync
    of a new WAL); one in ten later, past WAL restarts."""
    return rng.randint(150, 600) if rng.random() < 0.1 else rng.randint(1, 150)


def run_path(shim: Path, root: Path, path: str, tally: Tally) -> None:
    started = time.monotonic()
    settings = PATHS[path]
    rng = random.Random(f"{SEED}:{path}")
    zygote = harness.Zygote(shim)
    template = harness.make_template(root / f"{path}-template")
    try:
        chain_index = 0
        while tally.points < POINTS and not tally.failures:
            chain = harness.Chain(
                root / f"{path}-{chain_index}",
                zygote,
                seed=rng.randrange(1 << 30),
                template=template,
                **settings,
            )
            for _ in range(min(CHAIN_POINTS, POINTS - tally.points)):
                crash_at = crash_point(rng)
                result = chain.run_point(crash_at)
                tally.points += 1
                tally.crashed += result.crashed
                tally.cut["undone writes"] += result.cut.undone_writes
                tally.cut["torn writes"] += result.cut.torn_writes
                tally.cut["kept writes"] += result.cut.kept_writes
                tally.cut["undone truncations"] += result.cut.undone_truncates
                tally.cut["files lost"] += len(result.cut.lost_files)
                tally.cut["sizes cut"] += len(result.cut.resized)
                tally.cut[f"shm {result.shm}"] += 1
                if result.problems:
                    tally.failures.append(
                        f"{path}, seed {SEED}, chain {chain_index} ({chain.root}), point "
                        f"{chain.points - 1}, crash at sync {crash_at}: {result.problems[:5]}"
                    )
                    break
            tally.acknowledged += len(chain.ledger.acknowledged())
            if not tally.failures and not chain.accepts_mail():
                tally.failures.append(f"{path}: the spool at {chain.root} refuses new mail")
            if not tally.failures:  # a failing chain's files stay, for a look
                shutil.rmtree(chain.root)
            chain_index += 1
    except Exception as exc:
        tally.failures.append(f"{path}: the harness failed: {exc!r}")
        raise
    finally:
        zygote.close()
        tally.seconds = time.monotonic() - started


@pytest.mark.slow
@pytest.mark.timeout(max(300, POINTS * 6))
def test_power_loss_keeps_every_acknowledged_message(shim: Path, tmp_path: Path) -> None:
    """Both write paths, side by side (each its own server and spool)."""
    tallies = {path: Tally() for path in PATHS}
    threads = [
        threading.Thread(target=run_path, args=(shim, tmp_path, path, tallies[path]))
        for path in PATHS
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for path, tally in tallies.items():
        print("\n" + tally.line(path))
    failures = [failure for tally in tallies.values() for failure in tally.failures]
    assert not failures, "\n".join(failures)
    for path, tally in tallies.items():
        assert tally.points == POINTS, path
        assert tally.crashed >= POINTS * 0.9, f"{path}: most points must crash at their sync"
        assert tally.acknowledged >= POINTS * 10, path
        assert tally.cut["torn writes"] > 0 and tally.cut["undone writes"] > 0, path
