"""Relay policy: which recipients mxspool accepts.

mxspool is never an open relay. A recipient is accepted only when its domain is configured,
compared exactly and case-insensitively, and only in the plain ``local@domain`` form: every
address form that some MTA somewhere interprets as "relay onward" is refused outright, because
the next hop might honour it even though we do not.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Protocol

from mxspool.smtp.replies import RELAY_DENIED, Reply


class RecipientPath(Protocol):
    @property
    def local_part(self) -> str: ...

    @property
    def domain(self) -> str | None: ...

    @property
    def source_route(self) -> bool: ...

    @property
    def quoted_local(self) -> bool: ...

    @property
    def address_literal(self) -> bool: ...


def relay_refusal(path: RecipientPath, domains: Container[str]) -> Reply | None:
    """The 550 reply when ``path`` must not be accepted, or None when it may."""
    if path.source_route or path.address_literal or path.domain is None:
        return RELAY_DENIED
    local = path.local_part
    if path.quoted_local:
        local = local[1:-1]
    # The percent hack (user%other@us), bang paths (other!user@us) and quoted local parts
    # that carry routing characters are all ways to ask the next hop to relay further.
    if any(char in local for char in '%!@:,;<>[]\\"'):
        return RELAY_DENIED
    if path.domain.endswith("."):
        # "user@example.com." is the same domain to DNS; we accept only the plain form.
        return RELAY_DENIED
    if path.domain.lower() not in domains:
        return RELAY_DENIED
    return None
