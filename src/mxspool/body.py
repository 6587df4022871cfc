"""A message body on its way into the store: small in memory, large on disk.

The intake appends DATA pieces as they arrive. Up to ``spill_threshold`` bytes stay in memory;
beyond that everything moves to an anonymous temporary file, so a connection never holds a
whole large message.

The sha256 of a body in memory is computed when first asked for, once. The SQLite store's
commit thread never asks: it computes the digest in C, without the GIL, on the other core
(``mxspool_sha256`` in _groupcommit.c), which leaves the event loop ~60 us more per 100 KiB
message. Every other path asks on the event loop, as the loop hashed every piece before: the
SQLite store's Python writer when the message is submitted, PostgreSQL when it builds its
batch. (Hashing in the Python writer thread was measured slower than on the loop, 15-20%:
each hashlib call there releases and retakes the GIL on the commit's critical path.)
A spilled body is hashed on the way in, from the spill on, so that its digest never needs
the file read back.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

READ_CHUNK = 1 << 20


class BodyBuffer:
    """Append-only message bytes with incremental sha256; spills to a temp file."""

    def __init__(self, spill_threshold: int, spill_dir: str | None = None) -> None:
        self._threshold = spill_threshold
        self._spill_dir = spill_dir
        self._pieces: list[bytes] = []
        self._file: BinaryIO | None = None
        self._hash: hashlib._Hash | None = None  # incremental, once spilled
        self._digest: str | None = None  # of the bytes in memory, once asked for
        self.size = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self._hash is not None:
            self._hash.update(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._digest = None
        self._pieces.append(data)
        if self.size > self._threshold:
            self._spill()

    def _spill(self) -> None:
        if self._spill_dir:
            os.makedirs(self._spill_dir, exist_ok=True)
        # An unlinked file: a crash leaves nothing behind to clean up.
        self._file = tempfile.TemporaryFile(dir=self._spill_dir)  # noqa: SIM115
        self._hash = hashlib.sha256()
        for piece in self._pieces:
            self._hash.update(piece)
        self._file.writelines(self._pieces)
        self._pieces = []

    @property
    def spilled(self) -> bool:
        return self._file is not None

    @property
    def sha256(self) -> str:
        """The lowercase hex SHA-256 of the bytes written so far."""
        if self._hash is not None:
            return self._hash.hexdigest()
        if self._digest is None:
            self._digest = hashlib.sha256(self.getvalue() or b"").hexdigest()
        return self._digest

    def getvalue(self) -> bytes | None:
        """The whole body when it is in memory; None when it spilled to disk."""
        if self._file is not None:
            return None
        if len(self._pieces) > 1:
            self._pieces = [b"".join(self._pieces)]
        return self._pieces[0] if self._pieces else b""

    def chunks(self, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        """The bytes in pieces of at most ``chunk_size`` (blocking file reads when spilled)."""
        if self._file is None:
            value = self.getvalue() or b""
            for start in range(0, len(value), chunk_size):
                yield value[start : start + chunk_size]
            return
        self._file.flush()
        offset = 0
        while offset < self.size:
            piece = os.pread(self._file.fileno(), min(chunk_size, self.size - offset), offset)
            if not piece:
                raise OSError("spooled message body is shorter than written")
            offset += len(piece)
            yield piece

    def close(self) -> None:
        self._pieces = []
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> BodyBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
