from __future__ import annotations

import pytest

from mxspool.envelope import MailParams, RcptParams
from mxspool.smtp.address import parse_path, split_argument
from mxspool.smtp.params import parse_mail_params, parse_rcpt_params
from mxspool.smtp.replies import CommandError


def code(exc: pytest.ExceptionInfo[CommandError]) -> str:
    reply = exc.value.reply
    return f"{reply.code} {reply.enhanced}"


# -- paths ---------------------------------------------------------------------------------
def test_plain_mailbox() -> None:
    path = parse_path("<user@example.com>", reverse=False)
    assert (path.address, path.local_part, path.domain) == (
        "user@example.com",
        "user",
        "example.com",
    )
    assert not (path.source_route or path.quoted_local or path.address_literal)


def test_null_reverse_path() -> None:
    path = parse_path("<>", reverse=True)
    assert path.null and path.address == "" and path.domain is None
    with pytest.raises(CommandError) as exc:
        parse_path("<>", reverse=False)
    assert code(exc) == "501 5.1.3"


def test_quoted_local_part_kept() -> None:
    path = parse_path('<"john smith\\"x"@example.com>', reverse=False)
    assert path.quoted_local
    assert path.local_part == '"john smith\\"x"'
    assert path.domain == "example.com"


def test_source_route_kept() -> None:
    path = parse_path("<@a.example,@b.example:u@c.example>", reverse=False)
    assert path.source_route and path.route == ("a.example", "b.example")
    assert path.address == "u@c.example" and path.domain == "c.example"


@pytest.mark.parametrize(
    "literal", ["[192.0.2.1]", "[IPv6:2001:db8::1]", "[ipv6:::1]", "[x-tag:stuff]"]
)
def test_address_literals(literal: str) -> None:
    path = parse_path(f"<u@{literal}>", reverse=False)
    assert path.address_literal and path.domain == literal


@pytest.mark.parametrize("literal", ["[999.1.1.1]", "[IPv6:zz::1]", "[1.2.3]", "[]"])
def test_bad_literals(literal: str) -> None:
    with pytest.raises(CommandError):
        parse_path(f"<u@{literal}>", reverse=False)


def test_postmaster_without_domain() -> None:
    path = parse_path("<Postmaster>", reverse=False)
    assert path.domain is None and path.local_part == "Postmaster"
    with pytest.raises(CommandError):
        parse_path("<Postmaster>", reverse=True)


@pytest.mark.parametrize(
    "text",
    [
        "<user>",
        "<@example.com>",
        "<user@>",
        "<user@example.com.>",
        "<user@-example.com>",
        "<us er@example.com>",
        "<a..b@example.com>",
        "<.a@example.com>",
        "<u\x00@example.com>",
        "<u@exa\x01mple.com>",
        "<u\x85@example.com>",
        "<u@example.com",
        "user@example.com",
        "<" + "a" * 250 + "@example.com>",
    ],
)
def test_bad_paths(text: str) -> None:
    with pytest.raises(CommandError) as exc:
        parse_path(text, reverse=True)
    assert code(exc) == "501 5.1.7"


def test_utf8_path_parses_but_is_not_ascii() -> None:
    path = parse_path("<jürgen@bücher.example>", reverse=False)
    assert not path.ascii
    assert parse_path("<a@b.example>", reverse=False).ascii


def test_split_argument() -> None:
    assert split_argument("FROM:<a@b>", "FROM") == ("<a@b>", [])
    assert split_argument("from: <a@b> SIZE=10  BODY=8BITMIME", "FROM") == (
        "<a@b>",
        ["SIZE=10", "BODY=8BITMIME"],
    )
    assert split_argument('TO:<"a>b"@c>', "TO") == ('<"a>b"@c>', [])
    for bad in ("FROM<a@b>", "FROM:<a@b>SIZE=1", "FROM:", "FROM:a@b", "TO:<a@b>"):
        with pytest.raises(CommandError):
            split_argument(bad, "FROM")


# -- parameters ----------------------------------------------------------------------------
def test_mail_params_all() -> None:
    params = parse_mail_params(
        ["SIZE=1234", "body=8bitmime", "SMTPUTF8", "RET=hdrs", "ENVID=QQ+2Bx"]
    )
    assert params == MailParams(
        size=1234, body="8BITMIME", smtputf8=True, ret="HDRS", envid="QQ+2Bx"
    )


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["SIZE=-1"], "501 5.5.4"),
        (["SIZE=abc"], "501 5.5.4"),
        (["SIZE="], "501 5.5.4"),
        (["SIZE"], "501 5.5.4"),
        (["SIZE=+5"], "501 5.5.4"),
        (["SIZE=" + "9" * 21], "501 5.5.4"),
        (["SIZE=1", "SIZE=2"], "501 5.5.4"),
        (["SIZE=1", "size=1"], "501 5.5.4"),
        (["FOO=bar"], "555 5.5.4"),
        (["AUTH=<>"], "555 5.5.4"),
        (["BODY=BINARYMIME"], "555 5.5.4"),
        (["BODY=9BIT"], "501 5.5.4"),
        (["SMTPUTF8=yes"], "501 5.5.4"),
        (["RET=ALL"], "501 5.5.4"),
        (["ENVID=a+zz"], "501 5.5.4"),
        (["ENVID="], "501 5.5.4"),
        (["=x"], "501 5.5.4"),
    ],
)
def test_mail_param_errors(words: list[str], expected: str) -> None:
    with pytest.raises(CommandError) as exc:
        parse_mail_params(words)
    assert code(exc) == expected


def test_rcpt_params() -> None:
    assert parse_rcpt_params(["NOTIFY=never"]) == RcptParams(notify=("NEVER",))
    assert parse_rcpt_params(["NOTIFY=SUCCESS,FAILURE,DELAY", "ORCPT=rfc822;a+40b"]) == (
        RcptParams(notify=("SUCCESS", "FAILURE", "DELAY"), orcpt="rfc822;a+40b")
    )


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["NOTIFY=NEVER,SUCCESS"], "501 5.5.4"),
        (["NOTIFY=SUCCESS,SUCCESS"], "501 5.5.4"),
        (["NOTIFY=SOMETIMES"], "501 5.5.4"),
        (["NOTIFY="], "501 5.5.4"),
        (["NOTIFY"], "501 5.5.4"),
        (["ORCPT=rfc822"], "501 5.5.4"),
        (["ORCPT=;a@b"], "501 5.5.4"),
        (["NOTIFY=NEVER", "NOTIFY=NEVER"], "501 5.5.4"),
        (["SIZE=10"], "555 5.5.4"),
    ],
)
def test_rcpt_param_errors(words: list[str], expected: str) -> None:
    with pytest.raises(CommandError) as exc:
        parse_rcpt_params(words)
    assert code(exc) == expected
