from __future__ import annotations

from mxspool.store import codec
from tests.store.test_contract import make_message


def test_message_row_follows_the_column_order() -> None:
    # SQLite inserts the row's values positionally, in MESSAGE_COLUMNS order.
    assert tuple(codec.message_row(make_message(["a@relay.test"]))) == codec.MESSAGE_COLUMNS


def test_recipient_row_lowercases_only_the_domain() -> None:
    (recipient,) = make_message(["Ann@Relay.TEST"]).envelope.recipients
    assert codec.recipient_row(recipient)[:2] == ("Ann@Relay.TEST", "relay.test")
