"""The C DATA scanner (mxspool.smtp._scan) gives exactly the answers of the Python reference."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mxspool.smtp import data
from mxspool.smtp.data import MAX_LINE, DataReader, find_end_py, process_region_py

needs_c = pytest.mark.skipif(not data.ACCELERATED, reason="mxspool.smtp._scan is not built")

# Mostly line structure, so that markers, stuffed dots, bare CR/LF and long lines all occur.
PIECES = st.sampled_from(
    [b"\r\n", b"\r", b"\n", b".", b"\r\n.", b"\r\n.\r\n", b"x", b"yz", b"\x00", b"\xff", b" "]
)
RAW = st.lists(st.one_of(PIECES, st.binary(max_size=8)), max_size=60).map(b"".join)
LONG_RUNS = st.lists(
    st.one_of(PIECES, st.integers(MAX_LINE - 3, MAX_LINE + 3).map(lambda n: b"L" * n)),
    max_size=8,
).map(b"".join)


def test_the_c_scanner_is_built_where_ci_requires_it() -> None:
    if os.environ.get("MXSPOOL_REQUIRE_SPEEDUPS") == "1":
        assert data.ACCELERATED, "mxspool.smtp._scan did not build (is a C compiler installed?)"


@needs_c
@settings(max_examples=1500, deadline=None)
@given(buf=st.one_of(RAW, LONG_RUNS))
def test_find_end_matches_bytes_find(buf: bytes) -> None:
    assert data._scan is not None
    assert data._scan.find_end(buf) == find_end_py(buf)


@needs_c
@settings(max_examples=3000, deadline=None)
@given(
    region=st.one_of(RAW, LONG_RUNS),
    sol=st.booleans(),
    normalize=st.booleans(),
    check_lines=st.booleans(),
    carry=st.integers(0, MAX_LINE + 2),
)
def test_process_matches_the_reference(
    region: bytes, sol: bool, normalize: bool, check_lines: bool, carry: int
) -> None:
    assert data._scan is not None
    expected = process_region_py(region, sol, normalize, check_lines, carry)
    got = data._scan.process(region, sol, normalize, check_lines, carry)
    assert got[0] == expected[0]
    assert got[1:3] == expected[1:3]
    if check_lines and not expected[2]:  # the carry only matters while no line is too long
        assert got[3] == expected[3]


def _read(chunks: list[bytes], accelerated: bool, mode: data.BareNewlines) -> tuple[object, ...]:
    reader = DataReader(2000, mode, accelerated=accelerated)
    out = []
    rest = b""
    for i, chunk in enumerate(chunks):
        content, consumed, done = reader.feed(chunk)
        out.append(content)
        if done:
            rest = chunk[consumed:] + b"".join(chunks[i + 1 :])
            break
    return (
        b"".join(out),
        rest,
        reader.done,
        reader.size,
        reader.too_big,
        reader.bare_newline,
        reader.line_too_long,
        reader.headers.header,
        reader.headers.message_id,
        reader.headers.received_count,
    )


@needs_c
@settings(max_examples=1500, deadline=None)
@given(
    raw=st.one_of(RAW, LONG_RUNS),
    cuts=st.lists(st.integers(0, 4000), max_size=6),
    mode=st.sampled_from(["reject", "normalize"]),
)
def test_reader_agrees_under_any_chunking(raw: bytes, cuts: list[int], mode: str) -> None:
    points = sorted({c % (len(raw) + 1) for c in cuts})
    chunks = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    chunks = [c for c in chunks if c] or [b""]
    m: data.BareNewlines = "normalize" if mode == "normalize" else "reject"
    assert _read(chunks, True, m) == _read(chunks, False, m)


@needs_c
def test_clean_content_is_not_copied() -> None:
    assert data._scan is not None
    region = b"Subject: x\r\n\r\nhello\r\n" * 100
    assert data._scan.process(region, True, False, True, 0)[0] is region


def test_accelerated_reader_needs_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_scan", None)
    with pytest.raises(RuntimeError, match="not built"):
        DataReader(100, accelerated=True)
