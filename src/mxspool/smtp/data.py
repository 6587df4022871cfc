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
(``<LF>.<LF>`` and friends) is ever taken as a command.

In "normalize" mode (the default, as Postfix 3.9's ``smtpd_forbid_bare_newline = normalize``)
a bare CR or bare LF is read as a CRLF, with one exception that keeps it smuggling-safe: the
end of data is still only a raw ``<CRLF>.<CRLF>``. So every CR, LF and CRLF ends a line and is
stored as CRLF; every line's first dot is stuffing and is removed, after a bare line end as
after a CRLF; and a line holding only a dot next to a bare line end (``<LF>.<LF>``,
``<CR>.<CR>``, ``<CRLF>.<LF>``, ``<LF>.<CRLF>``, ...), which a sender can only have meant as an
end of data, is neither an end nor content: it is dropped with its line end, as Postfix does.
Deciding that needs the next line end, so in this mode the reader also holds back a dot that
starts the last line of a piece (the hold is then at most 5 bytes). The stored message is thus
well-formed CRLF text holding the un-stuffed content; delivery dot-stuffs it again.

Where a region starts matters for the first dot: ``sol`` is ``MID_LINE`` (0), ``AFTER_CRLF`` (1:
the start of the data, or after a genuine CRLF) or ``AFTER_BARE`` (2: after a bare CR or LF, only
in "normalize" mode). In "normalize" mode a non-final region ends in a bare CR only when a held
dot follows it, and never in a genuine CRLF (that is held back as a marker prefix).

BDAT (RFC 3030) is not offered (no CHUNKING in EHLO; BDAT is answered 502 5.5.1). Were it added,
"normalize" would mean there what Postfix does for BDAT: bare CR/LF stored as CRLF, and nothing
else, since BDAT content has neither dot-stuffing nor an end marker.

*Line length* (RFC 5321 4.5.3.1.6, 1000 octets with the CRLF) is checked on the output with
``find`` over 500-octet blocks (a regex is ~20x slower here), carrying the length of the
trailing partial line into the next region.

*Size* is counted on the output: in "normalize" mode it is the size of the normalised bytes
that are stored (and that the stored sha256 covers), not of what went over the wire. Past
``max_size`` the output is cut at exactly ``max_size`` bytes and nothing more is emitted, but
input is still consumed up to the marker.
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
MID_LINE, AFTER_CRLF, AFTER_BARE = 0, 1, 2  # where a region starts (``sol``)
_MARKER = b"\r\n.\r\n"
_FIRST_LINE_END = b".\r\n"
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
# Once every bare CR is an LF: a line holding only a dot, with its line end, when that end or
# the one before it is bare (a bare LF is one not preceded by CR).
_LONE_DOT = re.compile(rb"(?<=[^\r]\n)\.(?:\r\n|\n)|(?<=\r\n)\.\n")
_LINE_DOT = re.compile(rb"(?<=\n)\.")
_SENTINEL = {MID_LINE: b"x", AFTER_CRLF: b"\r\n", AFTER_BARE: b"x\n"}
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
        "_started",
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
        bare_newlines: BareNewlines = "normalize",
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
        self._sol = AFTER_CRLF  # where the next raw byte is: MID_LINE, AFTER_CRLF or AFTER_BARE
        self._started = False  # some content has been processed (the first line is behind us)
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
        first = not self._started
        if first and buf.startswith(_FIRST_LINE_END):
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
        if first and len(buf) < 3 and _FIRST_LINE_END.startswith(buf):
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
        if self._normalize:
            # A dot starting the region's last line: whether it is a lone dot to drop depends
            # on the line end that follows (a genuine CRLF before it is always a marker prefix).
            r = len(buf) - keep
            if r and buf[r - 1] == 0x2E and (buf[r - 2] in (0x0A, 0x0D) if r > 1 else self._sol):
                keep += 1
        if keep:
            self._hold = buf[-keep:]
            buf = buf[:-keep]
        else:
            self._hold = b""
        return self._process(buf), len(data), False

    def _process(self, region: bytes) -> bytes:
        if not region:
            return b""
        self._started = True
        sol = self._sol
        if region.endswith(b"\r\n"):
            self._sol = AFTER_CRLF
        elif self._normalize and region[-1] in (0x0A, 0x0D):
            self._sol = AFTER_BARE
        else:
            self._sol = MID_LINE
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
    region: bytes, sol: int, normalize: bool, check_lines: bool, carry: int
) -> tuple[bytes, bool, bool, int]:
    """Unstuff, find (and in "normalize" mode fix) bare CR/LF, measure lines.

    ``sol`` says where the region starts (``MID_LINE``, ``AFTER_CRLF``, ``AFTER_BARE``; a bool
    works as the first two). Returns (content, bare CR or LF seen, a line over the limit, new
    carry). The reference for ``_scan.process``, which must give the same answer for every
    input.
    """
    crlf = region.count(b"\r\n")
    bare = region.count(b"\r") != crlf or region.count(b"\n") != crlf
    if normalize and (bare or (sol == AFTER_BARE and region[:1] == b".")):
        region = _normalize_lines(region, sol)
    else:
        if sol and region[:1] == b".":
            region = region[1:]
        region = region.replace(b"\r\n.", b"\r\n")
    too_long = False
    if check_lines:
        too_long, carry = _check_lines(region, carry)
    return region, bare, too_long, carry


def _normalize_lines(region: bytes, sol: int) -> bytes:
    """The "normalize" rules of the module docstring with four buffer operations.

    Every bare CR first becomes an LF: that keeps the line structure and which line ends are
    bare (an LF not after a CR), and leaves a single LF character ending every line, so that
    dropping a lone dot's line (with the line end after it) or a line's first dot can never
    join a CR and an LF into a new CRLF. A sentinel in front stands for what came before the
    region. Only then does every bare LF become CRLF.
    """
    sentinel = _SENTINEL[AFTER_BARE if sol == AFTER_BARE else AFTER_CRLF if sol else MID_LINE]
    text = _BARE_CR.sub(b"\n", sentinel + region)
    text = _LONE_DOT.sub(b"", text)
    text = _LINE_DOT.sub(b"", text)
    return _BARE.sub(b"\r\n", text[len(sentinel) :])


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
