"""Any chunking of the same input gives the same events and the same reply bytes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from smtp_driver import merged, run

pytestmark = pytest.mark.usefixtures("scanner")  # C and Python DATA scanners

BODY = (
    b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID:\r\n <m1@example.org>\r\nSubject: dots\r\n\r\n"
    b"..leading dot\r\n...\r\n..\r\n" + b"L" * 997 + b"\r\n" + b"x\r\n.x\r\n\r\n\r\n"
)
SESSIONS: dict[str, tuple[bytes, str]] = {
    "pipelined": (
        b"EHLO client.example\r\nNOOP\r\nMAIL FROM:<s@example.org> SIZE=500 BODY=8BITMIME\r\n"
        b"RCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com> NOTIFY=NEVER\r\nDATA\r\n"
        + BODY
        + b".\r\nMAIL FROM:<>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n.\r\n"
        b"RSET\r\nBOGUS\r\nMAIL FROM:<x@@y>\r\nVRFY a\r\nQUIT\r\nNOOP\r\n",
        "reject",
    ),
    "smuggling-reject": (
        b"EHLO c\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"
        b"a\n.\nMAIL FROM:<evil@x>\r\nb\r.\rc\r\n.\nd\r\r\n.\r\r\n.\r\nNOOP\r\n",
        "reject",
    ),
    "smuggling-normalize": (
        b"EHLO c\nMAIL FROM:<s@example.org>\rRCPT TO:<a@example.com>\r\nDATA\r\n"
        b"a\n.\nMAIL FROM:<evil@x>\r\nb\r.\rc\r\n.\nd\r\r\n.\r\r\n..e\n..\r\n.\r\nNOOP\n",
        "normalize",
    ),
    "long-lines-and-limits": (
        b"EHLO c\r\nNOOP "
        + b"y" * 700
        + b"\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"
        + (b"z" * 120 + b"\r\n") * 12
        + b"w" * 1000
        + b"\r\n.\r\nNOOP\r\n",
        "reject",
    ),
}


def split(raw: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted(set(points))
    chunks, prev = [], 0
    for cut in cuts:
        chunks.append(raw[prev:cut])
        prev = cut
    chunks.append(raw[prev:])
    return [c for c in chunks if c]


@pytest.mark.parametrize("name", sorted(SESSIONS))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_chunking_invariance(name: str, data: st.DataObject) -> None:
    raw, mode = SESSIONS[name]
    points = data.draw(st.lists(st.integers(0, len(raw)), max_size=40))
    reference_events, reference_out, _ = run([raw], bare_newlines=mode, max_message_size=1400)
    events, out, _ = run(split(raw, points), bare_newlines=mode, max_message_size=1400)
    assert merged(events) == merged(reference_events)
    assert out == reference_out


@pytest.mark.parametrize("name", sorted(SESSIONS))
def test_bytewise(name: str) -> None:
    raw, mode = SESSIONS[name]
    reference_events, reference_out, _ = run([raw], bare_newlines=mode, max_message_size=1400)
    events, out, _ = run(
        [raw[i : i + 1] for i in range(len(raw))], bare_newlines=mode, max_message_size=1400
    )
    assert merged(events) == merged(reference_events)
    assert out == reference_out
    assert len(reference_events) > 3


@settings(max_examples=200, deadline=None)
@given(
    runs=st.lists(st.integers(0, 1200), min_size=1, max_size=6),
    points=st.lists(st.integers(0, 8000), max_size=6),
)
def test_line_length_check_matches_naive(runs: list[int], points: list[int]) -> None:
    from mxspool.smtp.data import DataReader

    body = b"".join(b"a" * n + b"\r\n" for n in runs)
    reader = DataReader(max_size=100_000)
    for chunk in split(body + b".\r\n", points):
        if reader.done:
            break
        reader.feed(chunk)
    assert reader.done
    assert reader.line_too_long == (max(runs) > 998)
