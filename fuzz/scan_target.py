"""The DATA scanner's differential fuzz target (driven by fuzz_scan.c, or by tests).

``one(data)`` raises AssertionError when the C scanner (``mxspool.smtp._scan``), the
pure-Python reference (``find_end_py``, ``process_region_py``) and a naive byte-by-byte
oracle (below) disagree, for the functions alone and for ``DataReader`` fed the same stream
in two chunkings. The first four bytes of ``data`` choose the options, the rest is the input:

    byte 0   bit 0 normalize, bit 1 sol (a line starts there), bit 2 check_lines, bit 3 the
             line end before was a bare one (sol AFTER_BARE), bits 4-7 chunking seed
    bytes 1-2  carry (mod MAX_LINE + 3)
    byte 3   max_size for DataReader (0: unlimited, else a small size to exercise the cut)
"""

from __future__ import annotations

import random

from mxspool.smtp import _scan
from mxspool.smtp.data import (
    AFTER_BARE,
    AFTER_CRLF,
    MAX_LINE,
    MID_LINE,
    BareNewlines,
    DataReader,
    find_end_py,
    process_region_py,
)

MARKER = b"\r\n.\r\n"
CR, LF, DOT = 13, 10, 46
PIECE_SIZES = (1, 1, 2, 3, 4, 5, 7, 16, 64, 999, 1000, 4096)


def naive_lines(region: bytes) -> list[tuple[bytes, bytes]]:
    """(line, its end) pairs; the end is CRLF, a bare CR, a bare LF or b"" (the last line)."""
    lines: list[tuple[bytes, bytes]] = []
    line = bytearray()
    i, n = 0, len(region)
    while i < n:
        c = region[i]
        if c == CR and i + 1 < n and region[i + 1] == LF:
            lines.append((bytes(line), b"\r\n"))
            line.clear()
            i += 2
        elif c in (CR, LF):
            lines.append((bytes(line), bytes([c])))
            line.clear()
            i += 1
        else:
            line.append(c)
            i += 1
    if line:
        lines.append((bytes(line), b""))
    return lines


def naive_normalize(region: bytes, sol: int) -> bytes:
    """The "normalize" mode, one line at a time: every line end is a CRLF, every line's first
    dot is stuffing, and a lone dot next to a bare line end is dropped with its line end."""
    out = bytearray()
    at_start, bare_before = sol != MID_LINE, sol == AFTER_BARE
    for raw, end in naive_lines(region):
        bare = end in (b"\r", b"\n")
        line = raw
        if at_start and raw.startswith(b"."):
            if raw == b"." and end and (bare or bare_before):
                bare_before = bare
                continue
            line = raw[1:]
        out += line + (b"\r\n" if end else b"")
        at_start, bare_before = bool(end), bare
    return bytes(out)


def naive_process(
    region: bytes, sol: int, normalize: bool, check_lines: bool, carry: int
) -> tuple[bytes, bool, bool, int]:
    """What process() means, one byte or line at a time (slow, obviously right)."""
    bare = any(end in (b"\r", b"\n") for _, end in naive_lines(region))
    if normalize:
        out = bytearray(naive_normalize(region, sol))
    else:  # reject mode: only a dot after a genuine CRLF is stuffing; bare CR/LF stay
        out = bytearray()
        i, n = 0, len(region)
        at_line_start = bool(sol)
        while i < n:
            c = region[i]
            if at_line_start and c == DOT:  # a stuffed dot
                at_line_start = False
                i += 1
                continue
            at_line_start = False
            if c == CR and i + 1 < n and region[i + 1] == LF:
                out += b"\r\n"
                at_line_start = True
                i += 2
                continue
            out.append(c)
            i += 1
    if not check_lines:
        return bytes(out), bare, False, carry
    run = carry
    for c in out:
        if c in (CR, LF):
            if run > MAX_LINE:
                return bytes(out), bare, True, carry
            run = 0
        else:
            run += 1
    if run > MAX_LINE:
        return bytes(out), bare, True, carry
    return bytes(out), bare, False, run


def naive_read(stream: bytes, normalize: bool, max_size: int) -> tuple[bytes, int, bool, bool]:
    """(content, bytes consumed, bare CR/LF, line too long) of a stream holding the marker."""
    if stream.startswith(b".\r\n"):
        return b"", 3, False, False
    i = stream.find(MARKER)
    assert i >= 0
    content, bare, too_long, _ = naive_process(stream[: i + 2], AFTER_CRLF, normalize, True, 0)
    return content[:max_size], i + 5, bare, too_long


def _chunks(stream: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    pieces, pos = [], 0
    while pos < len(stream):
        step = rng.choice(PIECE_SIZES)
        pieces.append(stream[pos : pos + step])
        pos += step
    return pieces


def _feed(reader: DataReader, pieces: list[bytes]) -> list[tuple[bytes, int, bool]]:
    steps = []
    for piece in pieces:
        step = reader.feed(piece)
        steps.append(step)
        if step[2]:
            break
    return steps


def _state(reader: DataReader) -> tuple[object, ...]:
    headers = reader.headers
    return (
        reader.size,
        reader.done,
        reader.too_big,
        reader.bare_newline,
        reader.line_too_long,
        headers.done,
        headers.too_long,
        headers.header,
        headers.message_id,
        headers.received_count,
    )


def check_functions(region: bytes, sol: int, normalize: bool, check: bool, carry: int) -> None:
    assert _scan.find_end(region) == find_end_py(region), "find_end differs from bytes.find"
    got = _scan.process(region, sol, normalize, check, carry)
    reference = process_region_py(region, sol, normalize, check, carry)
    oracle = naive_process(region, sol, normalize, check, carry)
    assert reference == oracle, f"the Python reference is wrong: {reference!r} != {oracle!r}"
    assert got == reference, f"C process() {got!r} != reference {reference!r}"


def check_reader(stream: bytes, normalize: bool, max_size: int, seed: int) -> None:
    mode: BareNewlines = "normalize" if normalize else "reject"
    pieces = _chunks(stream, seed)
    readers = [DataReader(max_size, mode, accelerated=flag) for flag in (True, False)]
    c_steps, py_steps = (_feed(reader, pieces) for reader in readers)
    assert c_steps == py_steps, "DataReader: the C scanner and the reference differ"
    assert _state(readers[0]) == _state(readers[1]), "DataReader state differs"
    # Another chunking of the same stream: the same content, end and (unless cut) flags.
    whole = DataReader(max_size, mode, accelerated=True)
    whole_steps = _feed(whole, [stream] if stream else [])
    assert b"".join(s[0] for s in c_steps) == b"".join(s[0] for s in whole_steps)
    assert sum(s[1] for s in c_steps) == sum(s[1] for s in whole_steps)
    assert whole.done == readers[0].done and whole.size == readers[0].size
    if not whole.too_big:
        assert whole.bare_newline == readers[0].bare_newline
        assert whole.line_too_long == readers[0].line_too_long
    if whole.done:
        content, consumed, bare, too_long = naive_read(stream, normalize, max_size)
        assert b"".join(s[0] for s in whole_steps) == content, "DataReader content != oracle"
        assert sum(s[1] for s in whole_steps) == consumed, "DataReader end != oracle"
        if not whole.too_big:
            assert (whole.bare_newline, whole.line_too_long) == (bare, too_long)


def one(data: bytes) -> None:
    if len(data) < 4:
        return
    flags, size_byte, payload = data[0], data[3], data[4:]
    carry = int.from_bytes(data[1:3], "little")
    normalize, check = bool(flags & 1), bool(flags & 4)
    sol = (AFTER_BARE if flags & 8 else AFTER_CRLF) if flags & 2 else MID_LINE
    carry %= MAX_LINE + 3
    max_size = 1 << 30 if size_byte == 0 else size_byte * 7
    check_functions(payload, sol, normalize, check, carry)
    check_reader(payload, normalize, max_size, flags >> 4)
    check_reader(payload + MARKER, normalize, max_size, flags >> 4)
