"""Write the starting corpus of a fuzz target into a folder (fuzz/run.sh calls this).

Seeds give libFuzzer a head start on structure it would take long to find alone: markers,
stuffed dots, bare CR/LF, lines around the 998-octet limit, and (for the commit thread)
messages with many recipients and large bodies. Existing files are left alone.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

LONG = b"L" * 998


def scan_seeds() -> list[bytes]:
    bodies = [
        b"Subject: hi\r\n\r\nbody\r\n.\r\n",
        b".\r\n",
        b"..stuffed\r\n.. \r\n.\r\n",
        b"bare\nlf\r\nbare\rcr\r\n\n.\n\r\n.\r\n",
        LONG + b"\r\n" + LONG + b"x\r\n.\r\n",
        b"a\r\n." + LONG + b"\r\n\r.\r\n",
        b"\r\n.\r",
        b"Message-ID: <a@b>\r\nReceived: x\r\n\r\n",
        # the smuggling forms, each with a would-be second transaction after it
        b"a\n.\nMAIL FROM:<e@x>\r\nb\r.\rc\r\n.\nd\n.\r\ne\r.\r\nf\r\r\n.\r\r\n.\r\n",
        b".\n..\n.\r.x\n.\r\n.\r\n",
    ]
    return [
        bytes([flags, 0xE6, 0x03, size]) + body
        for body in bodies
        for flags, size in ((0, 0), (7, 0), (6, 3), (0x2D, 1), (0x0B, 0), (0x0F, 2))
    ]


def commit_seeds() -> list[bytes]:
    """Inputs for commit_target.py: both roads, every kind of value, small and large."""
    text = bytes([5, 1]) + b"user"
    seeds = []
    for i in range(8):
        if i % 2 == 0:  # the Committer: rows with an int, a -0.0, a str and a large blob
            row = [1, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0x80, 3, *text]
            row += [5, 240 + i, *b"seed"]
            seeds.append(bytes([i & 2, 3, i, *row, i + 1, *row, i, *row]))
        else:  # the store: messages with bodies from 4 bytes to 64 KiB
            message = bytes([240 + i, 4]) + b"body" + bytes([2]) + text + text
            seeds.append(bytes([1, 1]) + message * 2)
    return seeds


def main() -> None:
    target, folder = sys.argv[1], Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    seeds = scan_seeds() if target == "scan" else commit_seeds()
    for seed in seeds:
        path = folder / f"seed-{hashlib.sha1(seed).hexdigest()}"
        if not path.exists():
            path.write_bytes(seed)


if __name__ == "__main__":
    main()
