from __future__ import annotations

import pytest

from mxspool.smtp import replies as R
from mxspool.smtp.replies import Reply, queued


def test_single_line_with_enhanced() -> None:
    assert R.OK.to_bytes() == b"250 2.0.0 Ok\r\n"


def test_multi_line_continuation() -> None:
    reply = Reply(250, "2.0.0", ("one", "two", "three"))
    assert reply.to_bytes() == b"250-2.0.0 one\r\n250-2.0.0 two\r\n250 2.0.0 three\r\n"


def test_without_enhanced() -> None:
    assert Reply(250, None, ("a", "b")).to_bytes() == b"250-a\r\n250 b\r\n"


def test_crlf_injection_refused() -> None:
    with pytest.raises(ValueError):
        Reply(250, None, "Ok\r\n250 evil")
    with pytest.raises(ValueError):
        Reply(99, None, "x")


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        (queued("ABC123"), b"250 2.0.0 Ok: queued as ABC123\r\n"),
        (R.RELAY_DENIED, b"550 5.7.1 Relaying denied\r\n"),
        (R.RECIPIENT_UNKNOWN, b"550 5.1.1 Recipient unknown\r\n"),
        (R.TOO_MANY_RECIPIENTS, b"452 4.5.3 Too many recipients\r\n"),
        (R.MESSAGE_TOO_BIG, b"552 5.3.4 Message too big\r\n"),
        (R.STORAGE_ERROR, b"451 4.3.0 Temporary storage error\r\n"),
        (R.INSUFFICIENT_STORAGE, b"452 4.3.1 Insufficient storage\r\n"),
        (R.TOO_MANY_CONNECTIONS, b"421 4.7.0 Too many connections\r\n"),
        (R.MAIL_LOOP, b"554 5.4.6 Mail loop detected\r\n"),
        (R.BARE_NEWLINE, b"500 5.5.2 Bare CR or LF not allowed\r\n"),
        (R.LINE_TOO_LONG, b"500 5.5.2 Line too long\r\n"),
        (R.BYE, b"221 2.0.0 Bye\r\n"),
        (R.START_DATA, b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (R.READY_FOR_TLS, b"220 2.0.0 Ready to start TLS\r\n"),
        (R.greeting("mx.example.net"), b"220 mx.example.net ESMTP mxspool\r\n"),
    ],
)
def test_contract_texts(reply: Reply, wire: bytes) -> None:
    assert reply.to_bytes() == wire


def test_timeout_reply() -> None:
    wire = R.timeout("mx.example.net").to_bytes()
    assert wire.startswith(b"421 4.4.2 mx.example.net ")
    assert b"closing" in wire
