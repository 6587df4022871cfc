"""The Received: header mxspool prepends to every message it accepts (RFC 5321 section 4.4)."""

from __future__ import annotations

import email.utils
import functools
import time


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    """RFC 5322 date of a whole second; cached because every message in a second shares it."""
    return email.utils.formatdate(second, localtime=True)


def protocol_name(extended: bool, tls: bool, smtputf8: bool) -> str:
    """The "with" keyword (RFC 3848 and RFC 6531): SMTP, ESMTP, ESMTPS, UTF8SMTP, UTF8SMTPS."""
    if not extended:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "")


def received_header(
    *,
    helo: str,
    client_address: str,
    client_hostname: str | None,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    tls_version: str | None = None,
    tls_cipher: str | None = None,
    when: float | None = None,
) -> bytes:
    """One folded Received: field, CRLF-terminated, ready to put on top of the message."""
    peer = f"{client_hostname} [{client_address}]" if client_hostname else f"[{client_address}]"
    lines = [f"Received: from {helo or 'unknown'} ({peer})"]
    by = f"\tby {hostname} (mxspool) with {protocol}"
    if tls_version:
        by += f" ({tls_version} cipher {tls_cipher})" if tls_cipher else f" ({tls_version})"
    lines.append(by)
    tail = f"\tid {queue_id}"
    if recipient is not None:
        tail += f"\r\n\tfor <{recipient}>"
    date = _date(int(when if when is not None else time.time()))
    lines.append(f"{tail}; {date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")
