"""Simulate a power cut from the shim's log (see shim.c): undo what was not yet durable.

After the process died (SIGKILL keeps the page cache, so every write is still in the files),
every change to a file that no completed sync of that file covers is undone, newest first,
from its pre-image:

- a write is undone per 512-byte sector of its range, each sector independently (a torn
  write): the new bytes survive or the old ones come back. Sectors past the file's old end
  come back as zeros (the size may have reached the disk before the data). Bytes outside the
  written range are never touched: SQLite assumes powersafe overwrite (the unix VFS reports
  SQLITE_IOCAP_POWERSAFE_OVERWRITE) and so do we.
- a truncation is undone, or not, as a whole.
- then the file's size is chosen among the durable size, the current one, and a sector
  boundary in between (the size and the data reach the disk independently).
- a file created since the last sync of its directory loses its directory entry, or not.

Per sector, undoing newest first leaves some prefix of that sector's writes: the states a
disk that writes back pages in any order could show. Every choice comes from one seeded
Random, so a failing seed replays the same cut.

The -shm file is SQLite's wal-index, a memory map the shim cannot see; after a power cut its
contents are whatever pages happened to be written back. SQLite does not trust it: the first
connection after a crash takes the DMS lock, truncates it and rebuilds the index from the WAL.
So the cut leaves it deleted, or full of garbage, at random; both must recover.
"""

from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

SECTOR = 512
HEADER = struct.Struct("<IIQqqqQII")
MAGIC = 0x31524C50

WRITE, TRUNCATE, SYNC, CREATE, CRASH, SYNCALL, POINT = range(1, 8)


@dataclass(slots=True)
class Record:
    type: int
    seq: int
    offset: int
    length: int
    old_size: int
    covers: int
    path: str
    data: bytes


@dataclass
class Log:
    records: list[Record]
    crashed_at: int | None  # the sync point the shim crashed at, None if it did not

    @property
    def sync_points(self) -> int:
        return sum(1 for r in self.records if r.type in (SYNC, SYNCALL, POINT))

    def changes(self) -> list[Record]:
        return [r for r in self.records if r.type in (WRITE, TRUNCATE, CREATE)]


def read_log(path: Path) -> Log:
    data = path.read_bytes()
    records: list[Record] = []
    crashed_at = None
    pos = 0
    while pos < len(data):
        magic, kind, seq, offset, length, old_size, covers, path_len, data_len = HEADER.unpack_from(
            data, pos
        )
        if magic != MAGIC:
            raise ValueError(f"{path}: bad record at byte {pos}")
        pos += HEADER.size
        name = data[pos : pos + path_len].decode()
        pos += path_len
        payload = data[pos : pos + data_len]
        pos += data_len
        if kind == CRASH:
            crashed_at = offset
        records.append(Record(kind, seq, offset, length, old_size, covers, name, payload))
    return Log(records, crashed_at)


@dataclass
class CutReport:
    undone_writes: int = 0
    kept_writes: int = 0
    torn_writes: int = 0  # some sectors kept, some undone
    undone_truncates: int = 0
    lost_files: list[str] = field(default_factory=list)
    resized: dict[str, tuple[int, int]] = field(default_factory=dict)  # path: (before, after)

    @property
    def undone(self) -> int:
        return self.undone_writes + self.torn_writes + self.undone_truncates


def _durable(record: Record, syncs: list[Record]) -> bool:
    """Whether a completed sync covers the change (a sync covers what was recorded before
    it started; a ranged sync, only changes entirely inside its range)."""
    target = os.path.dirname(record.path) if record.type == CREATE else record.path
    for sync in syncs:
        if sync.covers <= record.seq:
            continue
        if sync.type == SYNCALL:
            return True
        if sync.path != target:
            continue
        if sync.length < 0 or record.type == CREATE:
            return True
        end = record.offset + max(record.length, 0)
        if (
            record.type == WRITE
            and sync.offset <= record.offset
            and end <= sync.offset + (sync.length)
        ):
            return True
    return False


def pending(log: Log) -> list[Record]:
    """The changes a power cut could undo, oldest first."""
    syncs = [r for r in log.records if r.type in (SYNC, SYNCALL)]
    return [r for r in log.changes() if not _durable(r, syncs)]


def cut_power(
    log: Log, rng: random.Random, keep: float = 0.5, everything: bool = False
) -> CutReport:
    """Undo the non-durable changes of ``log`` in the files (see the module docstring).

    ``keep`` is the chance that one sector of an undoable write survives. ``everything``
    undoes every change, synced or not, with nothing kept (the shim's positive control:
    the files must come back to what they were before the run).
    """
    changes = log.changes() if everything else pending(log)
    if everything:
        keep = 0.0
    report = CutReport()
    first_size: dict[str, int] = {}  # the size before the oldest undoable change
    for record in changes:
        if record.type in (WRITE, TRUNCATE):
            first_size.setdefault(record.path, record.old_size)
    for record in reversed(changes):
        if record.type == CREATE or not os.path.exists(record.path):
            continue
        with open(record.path, "r+b") as f:
            if record.type == WRITE:
                _undo_write(f, record, rng, keep, report)
            elif everything or rng.random() >= keep:
                _undo_truncate(f, record)
                report.undone_truncates += 1
    for path, durable_size in first_size.items():
        if not os.path.exists(path):
            continue
        current = os.path.getsize(path)
        size = durable_size if everything else _cut_size(durable_size, current, rng)
        if size != current:
            os.truncate(path, size)
            report.resized[path] = (current, size)
    for record in changes:
        if record.type != CREATE or not os.path.exists(record.path):
            continue
        if everything or rng.random() >= keep:  # its directory entry never reached the disk
            os.unlink(record.path)
            report.lost_files.append(record.path)
    return report


def _cut_size(durable: int, current: int, rng: random.Random) -> int:
    """The size a file has after the cut: the durable one, the current one, or a sector
    boundary in between (size and data reach the disk independently)."""
    low, high = sorted((durable, current))
    choice = rng.random()
    if choice < 1 / 3:
        return current
    if choice < 2 / 3 or high - low <= SECTOR:
        return durable
    return min(max(rng.randrange(low // SECTOR, high // SECTOR + 1) * SECTOR, low), high)


def _undo_write(
    f: BinaryIO, record: Record, rng: random.Random, keep: float, rep: CutReport
) -> None:
    start, end = record.offset, record.offset + record.length
    # A later truncation that was kept cut the file: what it cut off does not come back.
    limit = f.seek(0, os.SEEK_END)
    kept = undone = 0
    pos = start
    while pos < end:
        stop = min(end, (pos // SECTOR + 1) * SECTOR)
        if rng.random() < keep:
            kept += 1
        else:
            undone += 1
            if pos < limit:
                old = record.data[pos - start : stop - start]
                piece = (old + bytes(stop - pos - len(old)))[: limit - pos]
                f.seek(pos)
                f.write(piece)
        pos = stop
    if undone and kept:
        rep.torn_writes += 1
    elif undone:
        rep.undone_writes += 1
    else:
        rep.kept_writes += 1


def _undo_truncate(f: BinaryIO, record: Record) -> None:
    new_size, old_size = record.offset, record.old_size
    if new_size < old_size:
        f.seek(new_size)
        f.write(record.data)
    f.truncate(old_size)


def scramble_shm(db: Path, rng: random.Random) -> str:
    """What a power cut leaves of the wal-index: nothing, or garbage (see the docstring)."""
    shm = Path(f"{db}-shm")
    if not shm.exists():
        return "absent"
    if rng.random() < 0.5:
        shm.unlink()
        return "deleted"
    size = shm.stat().st_size
    shm.write_bytes(rng.randbytes(size))
    return "garbage"
