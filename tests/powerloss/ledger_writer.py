"""A tiny durable log for the harness's own controls: prints "ack N" once record N is stored.

    python ledger_writer.py FILE COUNT good|bad

good: write the record, fsync, then acknowledge (what a store must do).
bad: write the record and acknowledge it at once; fsync only every fourth record, after the
acknowledgements: kill -9 never notices, a power cut loses acknowledged records.
"""

from __future__ import annotations

import os
import sys

RECORD = 600  # spans two sectors, so a record can also be torn


def record(n: int) -> bytes:
    return f"record {n} ".encode().ljust(RECORD - 1, b".") + b"\n"


def main() -> None:
    path, count, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    for n in range(count):
        os.pwrite(fd, record(n), n * RECORD)
        if mode == "good":
            os.fsync(fd)
        print(f"ack {n}", flush=True)
        if mode == "bad" and n % 4 == 3:
            os.fsync(fd)
    os.close(fd)


if __name__ == "__main__":
    main()
