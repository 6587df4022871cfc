"""The bytes that leave for one message, and their sha256, for the reconciliation report.

The store keeps each message exactly as received (plus our Received: line) and its sha256.
What goes to the next hop may differ: with ARC sealing on, an ARC set is put in front. The
report states both digests, so ``OutgoingBody`` hashes the bytes as they are handed to the
SMTP client (before dot-stuffing, which is transport) and the engine records the digest with
each delivered recipient. Hashing streams with the body: nothing extra is held in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import AsyncIterator, Callable

from mxspool.store.base import RecipientOutcome, RecipientState


class OutgoingBody:
    """``prefix`` then the stored bytes; ``Transaction.body`` is ``read``."""

    def __init__(
        self, stored: Callable[[], AsyncIterator[bytes]], stored_size: int, prefix: bytes = b""
    ):
        self._stored = stored
        self._prefix = prefix
        self.size = stored_size + len(prefix)
        """What SIZE= announces and what the client stops reading at."""
        self.sha256: str | None = None
        """The hex digest of the last attempt's bytes, once all of them were read."""

    def stamp(self, results: list[RecipientOutcome]) -> list[RecipientOutcome]:
        """``results`` of the attempt just made, the delivered ones with the digest."""
        digest = self.sha256
        if digest is None:
            return results
        return [
            dataclasses.replace(result, sent_sha256=digest)
            if result.state is RecipientState.DELIVERED
            else result
            for result in results
        ]

    def read(self) -> AsyncIterator[bytes]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[bytes]:
        self.sha256 = None
        digest = hashlib.sha256()
        seen = 0
        if self._prefix:
            digest.update(self._prefix)
            seen = len(self._prefix)
            yield self._prefix
        pieces = self._stored()
        try:
            async for piece in pieces:
                digest.update(piece)
                seen += len(piece)
                if seen >= self.size:
                    # The client stops reading here (it knows the size): finish now.
                    self.sha256 = digest.hexdigest()
                yield piece
        finally:
            close = getattr(pieces, "aclose", None)
            if close is not None:
                await close()
        if seen == self.size:
            self.sha256 = digest.hexdigest()
