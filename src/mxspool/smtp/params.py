"""ESMTP parameters of MAIL and RCPT (RFC 5321 4.1.2 esmtp-param, RFC 1870, 6152, 6531, 3461).

Errors, in the order the words are read: a repeated keyword is 501 5.5.4, an unknown or not
offered one (including BODY=BINARYMIME, since BINARYMIME is not advertised) is 555 5.5.4, and a
malformed value is 501 5.5.4.
"""

from __future__ import annotations

import re

from mxspool.envelope import MailParams, RcptParams
from mxspool.smtp.replies import (
    CommandError,
    bad_parameter,
    duplicate_parameter,
    unsupported_parameter,
)

_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
# RFC 3461 4: xtext, hexchar is "+" and two upper-case hex digits; lower case is tolerated.
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*")
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
            raise CommandError(bad_parameter(word[:40]))
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
            orcpt = value
        else:
            raise CommandError(unsupported_parameter(key))
    return RcptParams(notify=notify, orcpt=orcpt)
