"""The value classes the SMTP core and the listener build for every message (events, paths,
envelope parameters, replies, the recipient gate's verdict).

They are frozen dataclasses with an ``__init__`` of their own (``init=False``; mxspool.envelope
says why), so each lists its fields twice: these tests hold the two lists together and keep
what ``@dataclass(frozen=True)`` gave: construction by keyword and by position with the same
defaults, equality, hashing, repr, ``dataclasses.replace``, no assignment afterwards; and, in the
compiled build, an ``__init__`` that mypyc compiled (the dataclass-generated one would run as
interpreted Python, ~15x slower).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import pytest
from tests import interpreted

from mxspool.envelope import Envelope, MailParams, RcptParams, Recipient
from mxspool.intake.policy import Accepted
from mxspool.smtp import events
from mxspool.smtp.address import Path
from mxspool.smtp.replies import Reply

PARAMS = MailParams(size=10, body="8BITMIME", smtputf8=True, ret="HDRS", envid="e+2B")
RCPT_PARAMS = RcptParams(notify=("SUCCESS",), orcpt="rfc822;a@b.example")
PATH = Path("a@b.example", "a", "b.example", source_route=True, route=("r.example",))
REPLY = Reply(250, "2.0.0", "Ok")

# class, every field given (all values differ from the defaults), how many leading fields may be
# given by position, and the defaults of the fields that have one.
CASES: list[tuple[type[Any], dict[str, Any], int, dict[str, Any]]] = [
    (
        MailParams,
        {"size": 10, "body": "8BITMIME", "smtputf8": True, "ret": "HDRS", "envid": "x"},
        5,
        {"size": None, "body": None, "smtputf8": False, "ret": None, "envid": None},
    ),
    (RcptParams, {"notify": ("NEVER",), "orcpt": "rfc822;x@y"}, 2, {"notify": None, "orcpt": None}),
    (Recipient, {"address": "a@b.example", "params": RCPT_PARAMS}, 2, {"params": RcptParams()}),
    (
        Envelope,
        {"mail_from": "s@x.example", "mail_params": PARAMS, "recipients": (Recipient("a@b"),)},
        3,
        {},
    ),
    (
        Path,
        {
            "address": "a@[127.0.0.1]",
            "local_part": '"a"',
            "domain": "[127.0.0.1]",
            "source_route": True,
            "route": ("r.example",),
            "quoted_local": True,
            "address_literal": True,
        },
        3,
        {"source_route": False, "route": (), "quoted_local": False, "address_literal": False},
    ),
    (Accepted, {"address": "a@b.example", "domain": "b.example", "max_size": 5}, 3, {}),
    (events.Hello, {"name": "client.example", "extended": True}, 2, {}),
    (events.MailFrom, {"path": PATH, "params": PARAMS}, 2, {}),
    (events.RcptTo, {"path": PATH, "params": RCPT_PARAMS}, 2, {}),
    (events.DataStart, {}, 0, {}),
    (events.DataChunk, {"data": b"x\r\n"}, 1, {}),
    (
        events.MessageComplete,
        {
            "size": 10,
            "received_count": 2,
            "message_id": "<m@x>",
            "header": b"A: b\r\n",
            "header_too_long": True,
        },
        5,
        {"header": b"", "header_too_long": False},
    ),
    (events.MessageRejected, {"reply": REPLY}, 1, {}),
    (events.StartTLS, {}, 0, {}),
    (events.Reset, {}, 0, {}),
    (events.Quit, {}, 0, {}),
    (events.ProtocolError, {"reply": REPLY, "command": b"XYZ"}, 2, {"command": b""}),
    (Reply, {"code": 550, "enhanced": "5.1.1", "text": ("No such", "user")}, 3, {}),
]
IDS = [case[0].__name__ for case in CASES]


def init_fields(cls: type[Any]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


@pytest.mark.parametrize(("cls", "given", "positional", "defaults"), CASES, ids=IDS)
def test_the_init_takes_every_field_by_name_and_sets_it(
    cls: type[Any], given: dict[str, Any], positional: int, defaults: dict[str, Any]
) -> None:
    assert sorted(given) == sorted(init_fields(cls))
    value = cls(**given)
    assert {name: getattr(value, name) for name in given} == given


@pytest.mark.parametrize(("cls", "given", "positional", "defaults"), CASES, ids=IDS)
def test_positional_arguments_follow_the_fields_order(
    cls: type[Any], given: dict[str, Any], positional: int, defaults: dict[str, Any]
) -> None:
    names = init_fields(cls)
    head = [given[name] for name in names[:positional]]
    assert cls(*head, **{name: given[name] for name in names[positional:]}) == cls(**given)
    if positional < len(names):  # the rest are keyword-only
        with pytest.raises(TypeError):
            cls(*[given[name] for name in names])


@pytest.mark.parametrize(("cls", "given", "positional", "defaults"), CASES, ids=IDS)
def test_omitted_fields_take_their_defaults(
    cls: type[Any], given: dict[str, Any], positional: int, defaults: dict[str, Any]
) -> None:
    required = {name: value for name, value in given.items() if name not in defaults}
    value = cls(**required)
    assert {name: getattr(value, name) for name in defaults} == defaults
    missing = next(iter(required), None)
    if missing is not None:
        with pytest.raises(TypeError):
            cls(**{name: v for name, v in required.items() if name != missing})


@pytest.mark.parametrize(("cls", "given", "positional", "defaults"), CASES, ids=IDS)
def test_frozen_value_semantics(
    cls: type[Any], given: dict[str, Any], positional: int, defaults: dict[str, Any]
) -> None:
    one, two = cls(**given), cls(**given)
    assert one == two and hash(one) == hash(two)
    assert repr(one).startswith(f"{cls.__name__}(")
    for name, value in given.items():
        assert f"{name}=" in repr(one)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(one, name, value)
    if defaults:  # replace() one field with its default, and back
        name, default = next(iter(defaults.items()))
        changed = dataclasses.replace(one, **{name: default})
        assert getattr(changed, name) == default and changed != one
        assert dataclasses.replace(changed, **{name: given[name]}) == one


def test_a_reply_still_refuses_bad_codes_and_line_breaks() -> None:
    with pytest.raises(ValueError, match="invalid SMTP reply"):
        Reply(199, None, "x")
    with pytest.raises(ValueError, match="CR or LF"):
        Reply(250, None, "Ok\r\nRSET")
    with pytest.raises(ValueError, match="CR or LF"):
        dataclasses.replace(REPLY, text=("Ok", "a\nb"))
    assert REPLY.to_bytes() == b"250 2.0.0 Ok\r\n" and str(REPLY) == "250 2.0.0 Ok"
    assert dataclasses.replace(REPLY, code=251).to_bytes() == b"251 2.0.0 Ok\r\n"


@pytest.mark.skipif(interpreted.ENABLED, reason="MXSPOOL_INTERPRETED=1 imports the sources")
@pytest.mark.parametrize("cls", [case[0] for case in CASES if "__init__" in vars(case[0])], ids=str)
def test_in_the_compiled_build_the_init_is_native(cls: type[Any]) -> None:
    module = __import__(cls.__module__, fromlist=["_"])
    if not (module.__file__ or "").endswith(".so"):
        pytest.skip(f"{cls.__module__} runs interpreted (test_compiled says whether it may)")
    assert not isinstance(cls.__init__, types.FunctionType)
