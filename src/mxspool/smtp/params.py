"""ESMTP parameters of MAIL and RCPT (RFC 5321 4.1.2 esmtp-param, RFC 1870, 6152, 6531, 3461).

Errors, in the order the words are read: a repeated keyword is 501 5.5.4, an unknown or not
offered one (including BODY=BINARYMIME, since BINARYMIME is not advertised) is 555 5.5.4, and a
malformed value is 501 5.5.4.

ENVID and ORCPT end up as lines of a DSN (RFC 3464 Original-Envelope-Id, Original-Recipient),
so their xtext-decoded values must be printable US-ASCII (RFC 3461 4.2, 4.4): ``+0D+0A`` and
every other encoded control character (and DEL) is refused with 501 5.5.4 naming the parameter.
"""

from __future__ import annotations

import re

from mxspool.envelope import MailParams, RcptParams
from mxspool.smtp.replies import (
    CommandError,
    bad_parameter,
    duplicate_parameter,
    unprintable_parameter,
    unsupported_parameter,
)

_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
# RFC 3461 4: xtext, hexchar is "+" and two upper-case hex digits; lower case is tolerated.
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-Fa-f]{2})")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
# RFC 6533 3: in a "utf-8" ORCPT, "\x{HEX}" stands for one Unicode character.
_UTF8_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+")
# 20 digits is far above any real size and keeps int() on a bounded string.
_SIZE = re.compile(r"[0-9]{1,20}")
MAX_ENVID = 100  # RFC 3461 4.4
NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def _split(words: list[str]) -> list[tuple[str, str | None]]:
    seen: set[str] = set()
    out: list[tuple[str, str | None]] = []
    for word in words:
        key, eq, value = word.partition("=")
        if _KEYWORD.fullmatch(key) is None:
            raise CommandError(bad_parameter(word))
        key = key.upper()
        if key in seen:
            raise CommandError(duplicate_parameter(key))
        seen.add(key)
        if eq and _VALUE.fullmatch(value) is None:
            raise CommandError(bad_parameter(key))
        out.append((key, value if eq else None))
    return out


def parse_mail_params(words: list[str]) -> MailParams:
    size: int | None = None
    body: str | None = None
    smtputf8 = False
    ret: str | None = None
    envid: str | None = None
    for key, value in _split(words):
        if key == "SIZE":
            if value is None or _SIZE.fullmatch(value) is None:
                raise CommandError(bad_parameter(key))
            size = int(value)
        elif key == "BODY":
            upper = (value or "").upper()
            if upper == "BINARYMIME":
                raise CommandError(unsupported_parameter("BODY=BINARYMIME"))
            if upper not in ("7BIT", "8BITMIME"):
                raise CommandError(bad_parameter(key))
            body = upper
        elif key == "SMTPUTF8":
            if value is not None:
                raise CommandError(bad_parameter(key))
            smtputf8 = True
        elif key == "RET":
            upper = (value or "").upper()
            if upper not in ("FULL", "HDRS"):
                raise CommandError(bad_parameter(key))
            ret = upper
        elif key == "ENVID":
            if value is None or len(value) > MAX_ENVID or _XTEXT.fullmatch(value) is None:
                raise CommandError(bad_parameter(key))
            if not printable_xtext(value):
                raise CommandError(unprintable_parameter(key))
            envid = value
        else:
            raise CommandError(unsupported_parameter(key))
    return MailParams(size=size, body=body, smtputf8=smtputf8, ret=ret, envid=envid)


def parse_rcpt_params(words: list[str]) -> RcptParams:
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    for key, value in _split(words):
        if key == "NOTIFY":
            if value is None:
                raise CommandError(bad_parameter(key))
            items = tuple(item.upper() for item in value.split(","))
            if items == ("NEVER",):
                notify = items
            elif not set(items) <= NOTIFY_VALUES or len(set(items)) != len(items):
                raise CommandError(bad_parameter(key))
            else:
                notify = items
        elif key == "ORCPT":
            addr_type, semi, addr = (value or "").partition(";")
            if (
                not semi
                or not addr
                or _ADDR_TYPE.fullmatch(addr_type) is None
                or _XTEXT.fullmatch(addr) is None
            ):
                raise CommandError(bad_parameter(key))
            if not printable_xtext(addr) or (
                addr_type.lower() == "utf-8" and not _printable_utf8_escapes(addr)
            ):
                raise CommandError(unprintable_parameter(key))
            orcpt = value
        else:
            raise CommandError(unsupported_parameter(key))
    return RcptParams(notify=notify, orcpt=orcpt)


def xtext_decode(value: str) -> str:
    """RFC 3461 4: each "+XX" becomes the character with that hex code."""
    return _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), value)


def printable_xtext(value: str) -> bool:
    """Whether the decoded xtext ``value`` is printable US-ASCII (space through tilde)."""
    return _PRINTABLE.fullmatch(xtext_decode(value)) is not None


def _printable_utf8_escapes(value: str) -> bool:
    """No "\\x{HEX}" of a utf-8 address type (RFC 6533) names a control character."""
    for m in _UTF8_ESCAPE.finditer(xtext_decode(value)):
        code = int(m.group(1), 16)
        if code < 0x20 or 0x7F <= code <= 0x9F or code in (0x2028, 0x2029) or code > 0x10FFFF:
            return False
    return True
