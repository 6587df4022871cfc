"""Reverse-path and forward-path syntax (RFC 5321 4.1.2, RFC 6531 3.3).

The parser is strict about the grammar but keeps every legal-yet-suspicious form (source routes,
address literals, quoted local parts) visible in the result instead of refusing it here: whether
such an address is acceptable is relay policy, decided elsewhere. The one liberty taken is the
one Postfix takes: spaces between ``FROM:``/``TO:`` and the ``<``.

UTF-8 (RFC 6531) is accepted by the grammar; whether it is *allowed* depends on SMTPUTF8 on the
MAIL command, which the server checks with :attr:`Path.ascii`. C0 and C1 control characters and
DEL are never part of an address, nor are U+2028 and U+2029 (line and paragraph separators, which
``str.splitlines`` and some log viewers take as line ends): addresses reach the Received: field,
the store and DSNs, so nothing in one may start a new line.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from mxspool.addresses import ascii_lower
from mxspool.smtp.replies import BAD_RECIPIENT_SYNTAX, BAD_SENDER_SYNTAX, CommandError, Reply

# RFC 5321 4.5.3.1.3: a path is at most 256 octets including the angle brackets.
MAX_PATH_OCTETS = 256

# UTF8-non-ascii (RFC 6531 3.3) minus the C1 controls and the line/paragraph separators
_U = "\u00a0-\u2027\u202a-\U0010ffff"
_ATOM = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-{_U}]+"
_DOT_STRING = rf"{_ATOM}(?:\.{_ATOM})*"
_QUOTED = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_U}]|\\[\x20-\x7e])*"'
_SUB_DOMAIN = rf"[A-Za-z0-9{_U}](?:[A-Za-z0-9\-{_U}]*[A-Za-z0-9{_U}])?"
_DOMAIN = rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_ADL = rf"@{_DOMAIN}(?:,@{_DOMAIN})*"

_PATH = re.compile(
    rf"<(?:(?P<adl>{_ADL}):)?"
    rf"(?P<mailbox>(?P<local>{_DOT_STRING}|{_QUOTED})@(?P<domain>{_DOMAIN}|{_LITERAL}))>"
)
# Everything up to the closing ">" that is not inside a quoted string; used to find where the
# path ends and the parameters begin before the path itself is judged.
_PATH_EXTENT = re.compile(r'<(?:"(?:[^"\\]|\\.)*"|[^<>"])*>')
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")


@dataclass(frozen=True, slots=True, init=False)
class Path:
    """A parsed reverse-path or forward-path.

    ``address`` is the mailbox as written (``local@domain``; "" for the null path ``<>``), with
    any source route removed (RFC 5321 C: the route SHOULD be ignored) but recorded in ``route``.

    Its own __init__: see mxspool.envelope (one is built per MAIL and RCPT on the event loop).
    """

    address: str
    local_part: str
    domain: str | None
    source_route: bool
    route: tuple[str, ...]
    quoted_local: bool
    address_literal: bool

    def __init__(
        self,
        address: str,
        local_part: str,
        domain: str | None,
        *,
        source_route: bool = False,
        route: tuple[str, ...] = (),
        quoted_local: bool = False,
        address_literal: bool = False,
    ) -> None:
        object.__setattr__(self, "address", address)
        object.__setattr__(self, "local_part", local_part)
        object.__setattr__(self, "domain", domain)
        object.__setattr__(self, "source_route", source_route)
        object.__setattr__(self, "route", route)
        object.__setattr__(self, "quoted_local", quoted_local)
        object.__setattr__(self, "address_literal", address_literal)

    @property
    def null(self) -> bool:
        return self.address == "" and self.domain is None

    @property
    def ascii(self) -> bool:
        return self.address.isascii() and all(d.isascii() for d in self.route)


NULL_PATH = Path(address="", local_part="", domain=None)


def split_argument(arg: str, keyword: str) -> tuple[str, list[str]]:
    """Split ``FROM:<path> params`` into the path text (with brackets) and the parameter words.

    ``keyword`` is "FROM" or "TO". Raises :class:`CommandError` with 501.
    """
    bad = BAD_SENDER_SYNTAX if keyword == "FROM" else BAD_RECIPIENT_SYNTAX
    head = keyword + ":"
    if arg[: len(head)].upper() != head:
        usage = "MAIL FROM:<address>" if keyword == "FROM" else "RCPT TO:<address>"
        raise CommandError(Reply(501, "5.5.4", f"Syntax: {usage}"))
    rest = arg[len(head) :].lstrip(" ")
    m = _PATH_EXTENT.match(rest)
    if m is None:
        raise CommandError(bad)
    tail = rest[m.end() :]
    if tail and tail[0] != " ":
        raise CommandError(bad)
    return m.group(), [word for word in tail.split(" ") if word]


def parse_path(text: str, *, reverse: bool) -> Path:
    """Parse ``<...>``: a Reverse-path when ``reverse`` (MAIL), else a Forward-path (RCPT).

    Raises :class:`CommandError` (501 5.1.7 for MAIL, 501 5.1.3 for RCPT).
    """
    bad = BAD_SENDER_SYNTAX if reverse else BAD_RECIPIENT_SYNTAX
    if text == "<>":
        if reverse:
            return NULL_PATH
        raise CommandError(bad)
    if len(text.encode("utf-8")) > MAX_PATH_OCTETS:
        raise CommandError(bad)
    if not reverse and ascii_lower(text[1:-1]) == "postmaster":
        # RFC 5321 4.1.1.3: "<Postmaster>" without a domain must be accepted.
        return Path(address=text[1:-1], local_part=text[1:-1], domain=None)
    m = _PATH.fullmatch(text)
    if m is None:
        raise CommandError(bad)
    local = m.group("local")
    domain = m.group("domain")
    literal = domain.startswith("[")
    if literal and not _valid_literal(domain[1:-1]):
        raise CommandError(bad)
    adl = m.group("adl")
    route = tuple(part[1:] for part in adl.split(",")) if adl else ()
    return Path(
        address=m.group("mailbox"),
        local_part=local,
        domain=domain,
        source_route=bool(route),
        route=route,
        quoted_local=local.startswith('"'),
        address_literal=literal,
    )


def _valid_literal(inner: str) -> bool:
    if inner[:5].upper() == "IPV6:":
        try:
            ipaddress.IPv6Address(inner[5:])
        except ValueError:
            return False
        return True
    if _IPV4.fullmatch(inner):
        try:
            ipaddress.IPv4Address(inner)
        except ValueError:
            return False
        return True
    return _GENERAL_LITERAL.fullmatch(inner) is not None
