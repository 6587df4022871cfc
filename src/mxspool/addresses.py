"""How mail addresses and domain names compare: the one place that folds them.

Every comparison of a recipient with a configured domain or a recipient list goes through these
functions, so the RCPT check, the recipient-list import, the store and the envelope agree on what
"the same address" means:

* Domains compare by their A-label (IDNA 2008, RFC 5890), with ASCII-only case folding. A
  U-label from an SMTPUTF8 client (``bücher.example``) becomes its A-label
  (``xn--bcher-kva.example``) first. Unicode case folding is never applied to a domain:
  ``str.lower()`` turns U+212A KELVIN SIGN into ``k``, so ``\\u212aelvin.example`` would match
  ``kelvin.example``, a name the DNS and the target never see. A label IDNA 2008 disallows
  (that sign, upper-case non-ASCII letters, non-NFC text) has no key at all: it matches nothing.
* Local parts compare case-insensitively, as Exchange Online compares them: ASCII by ASCII
  folding, non-ASCII (RFC 6531) after NFC by Unicode case folding. Mistaking two local parts for
  one only stores a message the target may refuse (it is parked, and an operator sees it);
  refusing a mailbox the target knows would be a bounce caused by the move.
"""

from __future__ import annotations

import unicodedata

import idna

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """``text`` with A-Z lowercased and every other character as it is."""
    return text.translate(_ASCII_LOWER)


def domain_key(domain: str) -> str | None:
    """The comparison form of a domain: its A-label, ASCII-lowercased; None when it is not a
    valid IDNA 2008 name (such a name matches no configured domain)."""
    if domain.isascii():
        return ascii_lower(domain)
    labels: list[str] = []
    for label in domain.split("."):
        if label.isascii():
            labels.append(ascii_lower(label))
            continue
        try:
            labels.append(idna.alabel(label).decode("ascii"))
        except (idna.IDNAError, UnicodeError, ValueError):
            return None
    return ".".join(labels)


def local_key(local: str) -> str:
    """The comparison form of a local part (quotes already removed)."""
    if local.isascii():
        return ascii_lower(local)
    return unicodedata.normalize("NFC", local).casefold()


def address_key(address: str) -> str | None:
    """``local@domain`` in comparison form; None when the domain has no key."""
    local, at, domain = address.rpartition("@")
    if not at:
        return local_key(domain)
    key = domain_key(domain)
    if key is None:
        return None
    return f"{local_key(local)}@{key}"


def domain_of(address: str) -> str:
    """The domain of ``address`` as the store files it: the A-label, ASCII-lowercased (a name
    without a key is kept with ASCII folding only, so nothing is lost or merged)."""
    domain = address.rpartition("@")[2]
    return domain_key(domain) or ascii_lower(domain)


def parent_domains(domain: str) -> list[str]:
    """``a.b.example.com`` -> ``[b.example.com, example.com, com]``: where a subdomain's
    configuration may come from, nearest first."""
    labels = domain.split(".")
    return [".".join(labels[index:]) for index in range(1, len(labels))]
