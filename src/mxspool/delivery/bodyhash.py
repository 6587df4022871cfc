"""DKIM body hashes (RFC 6376 section 3.4) computed piece by piece.

dkimpy hashes a body it holds whole, and its canonicalization makes a few more copies of it:
for a 150 MiB message that is most of a gigabyte. The ARC seal (``delivery.arc``) needs the
body hash of the relaxed canonical body, and checking an existing chain needs the hash its
latest ARC-Message-Signature covers, so both are computed here over the stored bytes as they
stream from the store, holding at most one piece and one incomplete line.

The result is byte-for-byte what dkimpy computes (the tests compare them): lines are split on
LF with an optional CR before it (a bare LF counts as a line break, as dkimpy's parser does),
dkimpy's regular expressions are applied to whole lines, and trailing empty lines are counted
rather than hashed until text follows them.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

Canon = Literal["relaxed", "simple"]

_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
_WSP_RUN = re.compile(rb"(?: [\t ]|\t)[\t ]*")
"""Whitespace runs that compress to one space changes: a lone space is already canonical, and
matching every one would make ``re.sub`` build a fragment per word."""
_BARE_LF = re.compile(rb"(?<!\r)\n")
CRLF = b"\r\n"
SLICE = 64 * 1024
"""Bytes canonicalized at a time: ``re.sub`` keeps its fragments until it joins them, so a
large piece is worked through in slices (the result does not depend on where they fall)."""
MAX_PENDING_LINE = 1 << 20
"""An incomplete line longer than this is canonicalized in parts (whitespace runs are still
compressed correctly: only a trailing run is kept back)."""


class BodyHasher:
    """``feed`` the body's bytes (after the header block's empty line), then ``digest``."""

    def __init__(
        self, canon: Canon = "relaxed", algorithm: str = "sha256", limit: int | None = None
    ):
        self._hash = hashlib.new(algorithm)
        self._relaxed = canon == "relaxed"
        self._limit = limit
        """l=: only this many canonical bytes are hashed."""
        self._hashed = 0
        self._partial = b""
        """The bytes after the last LF seen."""
        self._empty_lines = 0
        """Canonical CRLFs held back: empty lines are hashed only when text follows them."""
        self._text_seen = False

    def feed(self, data: bytes) -> None:
        if len(data) <= SLICE:
            self._feed(data)
            return
        view = memoryview(data)
        for start in range(0, len(data), SLICE):
            self._feed(bytes(view[start : start + SLICE]))

    def _feed(self, data: bytes) -> None:
        buffer = self._partial + data if self._partial else data
        cut = buffer.rfind(b"\n")
        if cut < 0:
            self._partial = buffer
            if len(buffer) > MAX_PENDING_LINE and self._relaxed:
                self._flush_long_line()
            return
        lines, self._partial = buffer[: cut + 1], buffer[cut + 1 :]
        self._lines(_BARE_LF.sub(CRLF, lines))

    def _flush_long_line(self) -> None:
        """A line without end: hash all but its trailing whitespace (which may still turn
        out to be at the end of the line and be removed)."""
        line = self._partial
        keep = len(line) - len(line.rstrip(b"\t \r"))
        head, self._partial = line[: len(line) - keep], line[len(line) - keep :]
        if head:
            self._text(_WSP_RUN.sub(b" ", head))

    def _lines(self, lines: bytes) -> None:
        """Whole lines, each ending in CRLF."""
        if self._relaxed:
            lines = _WSP_RUN.sub(b" ", _TRAILING_WSP.sub(CRLF, lines))
        end = len(lines)
        while end >= 2 and lines[end - 2 : end] == CRLF:
            end -= 2
        if end == 0:
            self._empty_lines += len(lines) // 2
            return
        self._text(lines[:end])
        self._empty_lines = (len(lines) - end) // 2

    def _text(self, text: bytes) -> None:
        if self._empty_lines:
            self._update(CRLF * self._empty_lines)
            self._empty_lines = 0
        self._update(text)
        self._text_seen = True

    def _update(self, data: bytes) -> None:
        if self._limit is not None:
            room = self._limit - self._hashed
            if room <= 0:
                return
            data = data[:room]
        self._hashed += len(data)
        self._hash.update(data)

    def digest(self) -> bytes:
        """The body hash; call once, after the last ``feed``."""
        last = self._partial
        if last:
            # A last line without a line break: dkimpy adds one.
            self._text(_WSP_RUN.sub(b" ", last) if self._relaxed else last)
            self._partial = b""
            self._update(CRLF)
        elif self._text_seen:
            self._update(CRLF)  # the text's own line break; trailing empty lines are dropped
        elif not self._relaxed:
            self._update(CRLF)  # simple: an empty body is one CRLF; relaxed: nothing
        return self._hash.digest()
