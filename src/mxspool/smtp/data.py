"""The incremental DATA reader: the hot path of the server.

Theory of operation
-------------------
Raw bytes after the 354 reply are fed in whatever pieces the transport delivers. Each call
works on the piece as a whole; nothing loops per line or per byte in Python. The inner work
(finding the marker, unstuffing, bare CR/LF, line lengths) is done by ``_scan``, a small C
module, when it is built: CPython's multi-byte ``find``/``count``/``replace`` run at about
1 GB/s, which made this reader half of the intake's CPU time at 100 KiB. Without the module the
same work is done by ``find_end_py`` and ``process_region_py`` below with buffer operations
(``find``, ``count``, ``replace``, one regex), the reference the C code is tested against.

*End of data* is only ``<CRLF>.<CRLF>`` in the raw stream. The first content line counts as
starting after a CRLF, so ``.<CRLF>`` right after the 354 ends an empty message. To find the
marker across piece boundaries the reader holds back the longest tail of a piece that is a
proper prefix of the marker (at most 4 bytes: ``\\r``, ``\\r\\n``, ``\\r\\n.``, ``\\r\\n.\\r``) and
prepends it to the next piece. Because a held-back tail always starts with CR, a processed
region never ends in CR, which also makes the bare-CR/LF and unstuffing checks local to one
region: a CRLF or a ``CRLF.`` is never split between two regions.

*Dot-unstuffing* removes the first dot of every line that starts after a genuine CRLF:
``bytes.replace(b"\\r\\n.", b"\\r\\n")`` plus a start-of-line flag for the region's first byte.

*Bare CR / bare LF*: a region has one iff ``count(CR) != count(CRLF)`` or
``count(LF) != count(CRLF)``. In "reject" mode the content is passed on unchanged and the
message is flagged; data is still read to the genuine marker, so nothing after a fake marker
(``<LF>.<LF>`` and friends) is ever taken as a command. In "normalize" mode every bare CR and
bare LF becomes CRLF before size, header scan and output see it (Postfix
smtpd_forbid_bare_newline=normalize); the marker is still only a raw ``<CRLF>.<CRLF>``, and
dots after bare line ends are not unstuffed, so a smuggled ``<LF>.<LF>`` is stored as a line
holding a single dot, which delivery dot-stuffs again.

*Line length* (RFC 5321 4.5.3.1.6, 1000 octets with the CRLF) is checked on the output with
``find`` over 500-octet blocks (a regex is ~20x slower here), carrying the length of the
trailing partial line into the next region.

*Size* is counted on the output. Past ``max_size`` the output is cut at exactly ``max_size``
bytes and nothing more is emitted, but input is still consumed up to the marker.
"""

from __future__ import annotations

import re
from typing import Literal

from mxspool.smtp.headers import DEFAULT_LIMIT, HeaderScanner

try:
    from mxspool.smtp import _scan
except ImportError:  # not built (no C compiler at install time): the pure-Python reference
    _scan = None  # type: ignore[assignment]

ACCELERATED = _scan is not None

BareNewlines = Literal["reject", "normalize"]

MAX_LINE = 998  # octets before the CRLF
_MARKER = b"\r\n.\r\n"
_FIRST_LINE_END = b".\r\n"
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_BLOCK = (MAX_LINE + 2) // 2  # any run of MAX_LINE + 1 octets holds a whole aligned block


class DataReader:
    __slots__ = (
        "_carry",
        "_find_end",
        "_hold",
        "_max_size",
        "_normalize",
        "_process_region",
        "_sol",
        "bare_newline",
        "done",
        "headers",
        "line_too_long",
        "size",
        "too_big",
    )

    def __init__(
        self,
        max_size: int,
        bare_newlines: BareNewlines = "reject",
        header_limit: int = DEFAULT_LIMIT,
        *,
        accelerated: bool | None = None,
    ) -> None:
        if accelerated is None:
            accelerated = ACCELERATED
        if accelerated and _scan is None:
            raise RuntimeError("the C DATA scanner (mxspool.smtp._scan) is not built")
        self._find_end = _scan.find_end if accelerated else find_end_py
        self._process_region = _scan.process if accelerated else process_region_py
        self._max_size = max_size
        self._normalize = bare_newlines == "normalize"
        self._hold = b""
        self._sol = True  # the next raw byte starts a line (follows a genuine CRLF)
        self._carry = 0  # length of the output's trailing partial line
        self.size = 0
        self.done = False
        self.too_big = False
        self.bare_newline = False
        self.line_too_long = False
        self.headers = HeaderScanner(header_limit)

    def feed(self, data: bytes) -> tuple[bytes, int, bool]:
        """Consume raw bytes; return (content, bytes of ``data`` consumed, end reached).

        Unless the end is reached, all of ``data`` is consumed (some of it may be held back
        internally). After the end, the unconsumed rest of ``data`` belongs to the command
        stream.
        """
        if self.done:
            raise RuntimeError("DATA already complete")
        held = len(self._hold)
        buf = self._hold + data if held else data
        stop = -1
        if self._sol and buf.startswith(_FIRST_LINE_END):
            end, stop = 0, 3
        else:
            i = self._find_end(buf)
            if i >= 0:
                end, stop = i + 2, i + 5
        if stop >= 0:
            self._hold = b""
            piece = self._process(buf[:end])
            self.done = True
            self.headers.finish()
            return piece, stop - held, True
        if self._sol and len(buf) < 3 and _FIRST_LINE_END.startswith(buf):
            keep = len(buf)
        elif buf.endswith(b"\r\n.\r"):
            keep = 4
        elif buf.endswith(b"\r\n."):
            keep = 3
        elif buf.endswith(b"\r\n"):
            keep = 2
        elif buf.endswith(b"\r"):
            keep = 1
        else:
            keep = 0
        if keep:
            self._hold = buf[-keep:]
            buf = buf[:-keep]
        else:
            self._hold = b""
        return self._process(buf), len(data), False

    def _process(self, region: bytes) -> bytes:
        if not region:
            return b""
        sol = self._sol
        self._sol = region.endswith(b"\r\n")
        if self.too_big:
            return b""
        region, bare, too_long, self._carry = self._process_region(
            region, sol, self._normalize, not self.line_too_long, self._carry
        )
        if bare:
            self.bare_newline = True
        if too_long:
            self.line_too_long = True
        size = self.size + len(region)
        if size > self._max_size:
            self.too_big = True
            region = region[: self._max_size - self.size]
            size = self._max_size
        self.size = size
        self.headers.feed(region)
        return region


def find_end_py(buf: bytes) -> int:
    """Index of the first ``<CRLF>.<CRLF>`` in ``buf``, or -1."""
    return buf.find(_MARKER)


def process_region_py(
    region: bytes, sol: bool, normalize: bool, check_lines: bool, carry: int
) -> tuple[bytes, bool, bool, int]:
    """Unstuff, find (and in "normalize" mode fix) bare CR/LF, measure lines.

    Returns (content, bare CR or LF seen, a line over the limit, new carry). The reference
    for ``_scan.process``, which must give the same answer for every input.
    """
    if sol and region[:1] == b".":
        region = region[1:]
    region = region.replace(b"\r\n.", b"\r\n")
    crlf = region.count(b"\r\n")
    bare = region.count(b"\r") != crlf or region.count(b"\n") != crlf
    if bare and normalize:
        region = _BARE.sub(b"\r\n", region)
    too_long = False
    if check_lines:
        too_long, carry = _check_lines(region, carry)
    return region, bare, too_long, carry


def _check_lines(region: bytes, carry: int) -> tuple[bool, int]:
    """(a line over MAX_LINE, length of the trailing partial line), ``carry`` continuing it.

    A run of 999+ octets without CR or LF contains one of the 500-octet blocks laid end to end
    from the first line break, so only blocks free of line breaks (rare) need a precise look:
    the Python loop runs once per 500 octets, not per line.
    """
    n = len(region)
    first = _first_break(region, 0, n)
    if carry + first > MAX_LINE:
        return True, carry
    if first == n:
        return False, carry + n
    k = first + 1
    while k + _BLOCK <= n:
        if region.find(b"\n", k, k + _BLOCK) >= 0 or region.find(b"\r", k, k + _BLOCK) >= 0:
            k += _BLOCK
            continue
        start = max(region.rfind(b"\n", 0, k), region.rfind(b"\r", 0, k)) + 1
        end = _first_break(region, k + _BLOCK, n)
        if end - start > MAX_LINE:
            return True, carry
        k = end + 1
    return False, n - 1 - max(region.rfind(b"\r"), region.rfind(b"\n"))


def _first_break(region: bytes, start: int, n: int) -> int:
    """Index of the first CR or LF at or after ``start``, or ``n``."""
    lf = region.find(b"\n", start)
    cr = region.find(b"\r", start, lf if lf >= 0 else n)
    if cr >= 0:
        return cr
    return lf if lf >= 0 else n
