from __future__ import annotations

import hashlib

import pytest

from mxspool.body import BodyBuffer


@pytest.mark.parametrize("threshold", [1 << 20, 165, 100, 0])
def test_sha256_and_bytes_in_memory_or_spilled(threshold: int) -> None:
    """In memory, spilled from the start, and (165) asked in memory, then spilled: the digest
    is computed when asked, from the bytes so far, and follows later writes."""
    pieces = [b"Subject: x\r\n\r\n", b"a" * 150, b"", b"tail\r\n"]
    with BodyBuffer(threshold) as body:
        for piece in pieces[:2]:
            body.write(piece)
        early = body.sha256  # asked for midway: must not stick once more is written
        for piece in pieces[2:]:
            body.write(piece)
        whole = b"".join(pieces)
        assert early == hashlib.sha256(b"".join(pieces[:2])).hexdigest()
        assert body.sha256 == hashlib.sha256(whole).hexdigest()
        assert body.size == len(whole)
        assert body.spilled == (len(whole) > threshold)
        assert b"".join(body.chunks(64)) == whole
