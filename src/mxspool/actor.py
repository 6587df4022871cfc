"""Who the audit log names for an action taken on the command line: the OS user.

Operations take an ``actor`` and default it to :data:`CLI`; the admin plane passes its token's
name instead. A command-line process sets the real person once (``cli_support`` calls
:func:`use_cli_actor` before running an action) and the stores write that in place of
:data:`CLI` (:func:`audit_actor`), so no operation or command has to pass it along, and the
server process, which never sets it, cannot be mistaken for a person.

The user is the effective uid's name from the password database (``$USER`` and ``$LOGNAME``
are whatever the caller's shell says, so they are not asked). Under sudo the person who ran
sudo is in ``$SUDO_USER``; it is shown first, as ``alice (sudo: root)``, because that is who
acted. ``$SUDO_USER`` is only as trustworthy as the environment (root can set anything), so it
is cleaned and bounded, never relied on for access.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from contextvars import ContextVar

CLI = "cli"
"""The operations' default actor: "whoever runs this command line"."""

MAX_NAME = 64
"""Characters of a user name kept from the environment."""

_cli_actor: ContextVar[str | None] = ContextVar("mxspool_cli_actor", default=None)


def os_user() -> str:
    """The name of the effective user, or ``uid N`` when it has no entry (containers)."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _clean(name: str) -> str:
    text = "".join(ch if ch.isprintable() and not ch.isspace() else "?" for ch in name.strip())
    return text[:MAX_NAME]


def cli_actor(environ: Mapping[str, str] = os.environ) -> str:
    """``alice``, or ``alice (sudo: root)`` when alice ran the command through sudo."""
    user = os_user()
    sudo_user = _clean(environ.get("SUDO_USER", ""))
    if sudo_user and sudo_user != user:
        return f"{sudo_user} (sudo: {user})"
    return user


def use_cli_actor(name: str) -> None:
    """From now on (in this context), actions recorded as :data:`CLI` are recorded as ``name``."""
    _cli_actor.set(name)


def audit_actor(actor: str) -> str:
    """What the audit log records for ``actor``: the command line's person for :data:`CLI`."""
    if actor == CLI:
        return _cli_actor.get() or CLI
    return actor
