"""Reading a domain's recipient list from what Exchange Online exports.

Two inputs are accepted:

* a CSV from ``Get-Recipient`` or ``Get-Mailbox | Export-Csv``: the ``PrimarySmtpAddress``
  column and, when present, ``EmailAddresses`` (proxy addresses such as ``SMTP:a@x smtp:b@x
  X500:/o=...``, separated by spaces or semicolons; ``SMTP:`` marks the primary, ``smtp:`` the
  secondaries, other prefixes are not mail addresses). Windows PowerShell's ``#TYPE`` first line
  and UTF-16 or UTF-8 byte order marks are handled;
* a plain list: one address a line, ``#`` comments and blank lines ignored.

Only addresses in the domain count: a tenant export lists every accepted domain's users, and
the others are counted as skipped, not treated as errors. Addresses are kept in comparison form
(``mxspool.addresses.address_key``: local part case-folded, domain as its A-label), the form the
intake's RCPT check looks up.

A ``MaxReceiveSize`` column (``Get-Mailbox`` exports it as ``36 MB (37,748,736 bytes)`` or
``Unlimited``) gives each mailbox's limit, applied to every address of the row (primary and
proxies alike: they reach the same mailbox). The intake refuses at RCPT (with SIZE=) or parks at
once (without) what that mailbox would refuse, instead of retrying it for days.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from mxspool.addresses import address_key, domain_key
from mxspool.csvsafe import read_cell

_PROXY_SPLIT = re.compile(r"[;\s,]+")
_LOCAL_OK = re.compile(r"^[^\s@<>()\[\]\\,;:\"]+$")
_UNEXPANDED = "Microsoft.Exchange.Data"
# "36 MB (37,748,736 bytes)", "37748736", "36 MB", "Unlimited": Exchange's ByteQuantifiedSize.
_BYTES = re.compile(r"\(\s*([\d,.\s]+?)\s*bytes\s*\)", re.IGNORECASE)
_QUANTITY = re.compile(r"^\s*([\d.,]+)\s*(B|KB|MB|GB|TB)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40}


class RecipientFileError(Exception):
    """The file cannot be read as a recipient list; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class ParsedRecipients:
    addresses: tuple[str, ...]
    """Lowercased, unique, sorted addresses in the domain."""
    format: str
    """"csv" or "list"."""
    rows: int
    skipped_other_domains: int
    warnings: tuple[str, ...] = field(default=())
    max_sizes: Mapping[str, int] = field(default_factory=dict)
    """MaxReceiveSize in bytes by address, for the addresses whose mailbox has a limit."""


def parse_max_size(text: str) -> int | None:
    """Bytes in an Exchange size (``36 MB (37,748,736 bytes)``, ``36 MB``, ``37748736``); None
    for ``Unlimited`` or an empty cell. Raises ValueError for anything else."""
    value = text.strip()
    if not value or value.lower() == "unlimited":
        return None
    exact = _BYTES.search(value)
    if exact is not None:
        digits = re.sub(r"[,.\s]", "", exact.group(1))
        if digits.isdigit():
            return int(digits)
    match = _QUANTITY.match(value)
    if match is None:
        raise ValueError(value)
    number, unit = match.groups()
    amount = float(number.replace(",", "")) if unit else float(re.sub(r"[,.]", "", number))
    return int(amount * _UNITS[(unit or "").lower()])


def _decode(data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        # Windows PowerShell's "Unicode" encoding (Export-Csv -Encoding Unicode).
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Windows PowerShell 5.1's Export-Csv default is an ANSI code page.
        return data.decode("cp1252", errors="replace")


def _in_domain(address: str, domain: str) -> bool:
    """Whether ``address`` (comparison form) is in ``domain`` or one of its subdomains.

    Subdomain addresses are kept so that a domain routed with ``--subdomains`` can check
    ``x@sub.domain`` against the same list; without that option the gate never asks for them.
    """
    host = address.rpartition("@")[2]
    return host == domain or host.endswith("." + domain)


def _is_address(text: str) -> bool:
    local, at, domain = text.rpartition("@")
    return bool(at and local and domain and _LOCAL_OK.match(local) and "." in domain)


def parse_recipient_file(data: bytes, domain: str) -> ParsedRecipients:
    """The addresses of ``domain`` in a Get-Recipient/Get-Mailbox CSV or a plain list."""
    text = _decode(data)
    lines = text.splitlines()
    # Windows PowerShell 5.1 writes "#TYPE Deserialized...." first unless -NoTypeInformation.
    while lines and (not lines[0].strip() or lines[0].lstrip().upper().startswith("#TYPE")):
        lines.pop(0)
    if not lines:
        raise RecipientFileError(
            "the file holds no addresses; export them with Get-Recipient (see 'mxspool runbook') "
            "or write one address a line"
        )
    header = lines[0].lower()
    if "primarysmtpaddress" in header or "emailaddresses" in header:
        return _parse_csv("\n".join(lines), domain)
    return _parse_list(lines, domain)


def _parse_csv(text: str, domain: str) -> ParsedRecipients:
    reader = csv.DictReader(io.StringIO(text))
    columns = {name.strip().lower(): name for name in reader.fieldnames or []}
    primary_col = columns.get("primarysmtpaddress")
    proxies_col = columns.get("emailaddresses")
    size_col = columns.get("maxreceivesize")
    domain = domain_key(domain) or domain
    sizes: dict[str, int] = {}
    found: set[str] = set()
    others: set[str] = set()
    warnings: list[str] = []
    rows = 0
    unexpanded = False
    for row in reader:
        rows += 1
        candidates: list[str] = []
        if primary_col is not None:
            candidates.append(read_cell(row.get(primary_col) or "").strip())
        if proxies_col is not None:
            value = read_cell(row.get(proxies_col) or "").strip()
            if value.startswith(_UNEXPANDED):
                unexpanded = True
            for item in _PROXY_SPLIT.split(value):
                prefix, colon, address = item.partition(":")
                # Only smtp:/SMTP: proxies are mail addresses (X500:, SIP:, SPO: are not).
                if colon and prefix.lower() == "smtp":
                    candidates.append(address.strip())
        limit: int | None = None
        if size_col is not None:
            cell = read_cell(row.get(size_col) or "")
            try:
                limit = parse_max_size(cell)
            except ValueError:
                warnings.append(
                    f"row {rows + 1}: MaxReceiveSize {cell!r} is not a size such as "
                    "'36 MB (37,748,736 bytes)' or 'Unlimited'; no limit kept for this row"
                )
        for candidate in candidates:
            if not candidate:
                continue
            address = address_key(candidate)
            if address is None or not _is_address(address):
                warnings.append(f"row {rows + 1}: {candidate!r} is not an address; skipped")
                continue
            if _in_domain(address, domain):
                found.add(address)
                if limit is not None:
                    sizes[address] = limit
            else:
                others.add(address)
    if unexpanded:
        warnings.append(
            "the EmailAddresses column holds a type name instead of addresses: export it with "
            "@{Name='EmailAddresses';Expression={$_.EmailAddresses -join ';'}} (see 'mxspool "
            "runbook') to include proxy addresses"
        )
    return ParsedRecipients(
        tuple(sorted(found)), "csv", rows, len(others - found), tuple(warnings[:20]), sizes
    )


def _parse_list(lines: list[str], domain: str) -> ParsedRecipients:
    domain = domain_key(domain) or domain
    found: set[str] = set()
    others = 0
    rows = 0
    bad: list[str] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        rows += 1
        text = line.strip("<>")
        if text[:5].lower() == "smtp:":
            text = text[5:]
        address = address_key(text) or text
        if not _is_address(address):
            bad.append(f"line {number}: {line!r}")
            continue
        if _in_domain(address, domain):
            found.add(address)
        else:
            others += 1
    if bad:
        shown = "; ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise RecipientFileError(
            f"not an address: {shown}; give one address a line (user@{domain}), or a CSV with "
            "a PrimarySmtpAddress column"
        )
    return ParsedRecipients(tuple(sorted(found)), "list", rows, others)
