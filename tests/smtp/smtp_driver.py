"""Test driver for the SMTP core: feed bytes, accept every decision, collect events."""

from __future__ import annotations

from collections.abc import Iterable

from mxspool.smtp import events as ev
from mxspool.smtp.replies import Reply
from mxspool.smtp.server import NEED_DATA, PAUSED, ServerConfig, ServerConnection

DECISIONS = ev.DECISION_EVENTS


def config(**kw: object) -> ServerConfig:
    base: dict[str, object] = {
        "hostname": "mx.example.net",
        "max_message_size": 10_000,
        "max_recipients": 5,
        "bare_newlines": "reject",
        "tls_available": True,
        "max_received_headers": 50,
    }
    base.update(kw)
    return ServerConfig(**base)  # type: ignore[arg-type]


def run(
    chunks: Iterable[bytes],
    conn: ServerConnection | None = None,
    responses: dict[type, Reply] | None = None,
    **kw: object,
) -> tuple[list[object], bytes, ServerConnection]:
    """Feed ``chunks`` one at a time, draining events; answer decisions (accept by default)."""
    conn = conn or ServerConnection(config(**kw))
    out = bytearray()
    events: list[object] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while True:
            event = conn.next_event()
            out += conn.data_to_send()
            if event is NEED_DATA:
                break
            assert event is not PAUSED
            events.append(event)
            if isinstance(event, DECISIONS):
                if responses and type(event) in responses:
                    conn.respond(responses[type(event)])
                else:
                    conn.accept()
                out += conn.data_to_send()
    return events, bytes(out), conn


def merged(events: list[object]) -> list[object]:
    """Consecutive DataChunks joined into one, so chunkings compare equal."""
    out: list[object] = []
    for event in events:
        if isinstance(event, ev.DataChunk) and out and isinstance(out[-1], ev.DataChunk):
            out[-1] = ev.DataChunk(out[-1].data + event.data)
        else:
            out.append(event)
    return out


def codes(out: bytes) -> list[int]:
    """Final-line reply codes in order."""
    return [int(line[:3]) for line in out.split(b"\r\n") if line[3:4] == b" "]


def content(events: list[object]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, ev.DataChunk))


def session(body: bytes, *, rcpts: int = 1, ehlo: bytes = b"EHLO client.example\r\n") -> bytes:
    rcpt = b"".join(b"RCPT TO:<u%d@example.com>\r\n" % i for i in range(rcpts))
    return ehlo + b"MAIL FROM:<s@example.org>\r\n" + rcpt + b"DATA\r\n" + body
