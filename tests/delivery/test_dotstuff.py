"""Dot-stuffing: exact bytes, any chunking."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from mxspool.delivery.dotstuff import DotStuffer


def unstuff(wire: bytes) -> bytes:
    """What a receiver does (RFC 5321 4.5.2): the data up to the first lone ".", unstuffed."""
    assert wire.endswith(b".\r\n")
    body = wire[:-3]
    assert body == b"" or body.endswith(b"\r\n")
    lines = body.split(b"\r\n")
    assert b"." not in lines[:-1], "a lone dot inside the data would end it early"
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def stuff(data: bytes, cuts: list[int]) -> bytes:
    stuffer = DotStuffer()
    out = []
    last = 0
    for cut in [*sorted(cuts), len(data)]:
        out.append(stuffer.feed(data[last:cut]))
        last = cut
    out.append(stuffer.finish())
    return b"".join(out)


def test_lines_starting_with_dot_are_stuffed() -> None:
    data = b".a\r\n.\r\nb.\r\n..c\r\n"
    assert stuff(data, []) == b"..a\r\n..\r\nb.\r\n...c\r\n.\r\n"


def test_empty_body_and_missing_final_crlf() -> None:
    assert stuff(b"", []) == b".\r\n"
    assert stuff(b"abc", []) == b"abc\r\n.\r\n"


def test_dot_at_a_chunk_boundary() -> None:
    data = b"line\r\n.dot\r\n"
    for cut in range(len(data) + 1):
        assert stuff(data, [cut]) == b"line\r\n..dot\r\n.\r\n"


line = st.sampled_from([b"", b".", b"..", b"x", b".x", b"x.", b"a.b", b"\xe2\x82\xac."])


@given(st.lists(line, max_size=30), st.randoms())
def test_round_trip_with_any_chunking(lines: list[bytes], rnd: random.Random) -> None:
    data = b"".join(item + b"\r\n" for item in lines)
    cuts = [rnd.randint(0, len(data)) for _ in range(rnd.randint(0, 6))]
    assert unstuff(stuff(data, cuts)) == data
