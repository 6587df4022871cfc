"""DKIM and DMARC verdicts of one message, and the Authentication-Results value that records them.

Held mail reaches its target days after it was signed, from our address: SPF no longer aligns
and short-lived DKIM signatures (``x=``) may have expired. So the verdicts are taken at arrival
(``intake.auth`` runs this just after the commit: the DNS names a message needs, ``names_needed``,
are resolved by the intake; DKIM verification and the DMARC record, ``dmarc_policy``, in a
verification worker process, ``intake.authwork``; the alignment, ``dmarc_verdict``, once SPF's
result is in) and stored with the message; the release seals them with ARC.

- DKIM (RFC 6376), with dkimpy: every signature, up to ``MAX_SIGNATURES``, each its own result:
  ``pass``; ``fail`` (bad signature, body hash mismatch, ``x=`` past; dkimpy allows 10 hours of
  clock skew); ``neutral`` (a signature it cannot process: syntax, algorithm); ``permerror``
  (no usable key at ``<s>._domainkey.<d>``); ``temperror`` (DNS failed); ``policy`` (the
  message is over ``MAX_DKIM_SIZE``: not verified). No signature: ``dkim=none``.
- DMARC (RFC 7489): the RFC5322.From domain; the policy record at ``_dmarc.<from>``, else at
  ``_dmarc.<organizational domain>``, the organizational domain found with the public suffix
  list that authheaders packages (no network fetch; read once per process). Pass when SPF
  passed for an aligned MAIL FROM domain or a DKIM signature passed for an aligned ``d=``,
  relaxed (same organizational domain) or strict (same domain) per ``aspf``/``adkim``.
  ``none`` when no record (or no From domain); ``permerror`` for several From domains;
  ``temperror`` when DNS failed. The policy that applies (``p``, or ``sp`` from an
  organizational record) is recorded as ``policy.dmarc``; nothing is refused on it.

Why not ``authheaders.authenticate_message``: it verifies only the first DKIM signature, asks
the system resolver for SPF, and gives dkimpy (which wants bytes) and its DMARC lookup (which
wants text) one DNS function. Its parts are used instead: the DMARC record parser and the
packaged public suffix list; authres (which it builds on) formats the header.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import getaddresses

import dkim  # type: ignore[import-untyped]
from authheaders.dmarc_lookup import DMARCException, answer_to_dict  # type: ignore[import-untyped]
from authres import (  # type: ignore[import-untyped]
    AuthenticationResultsHeader,
    DKIMAuthenticationResult,
    SPFAuthenticationResult,
)
from authres.dmarc import DMARCAuthenticationResult  # type: ignore[import-untyped]
from publicsuffix2 import PublicSuffixList  # type: ignore[import-untyped]

from mxspool.intake.authdns import TempError

MAX_SIGNATURES = 8
"""DKIM signatures verified per message (RFC 6376 6.1 lets a verifier limit them); the rest are
not evaluated."""
MAX_DKIM_SIZE = 32 * 1024 * 1024
"""Larger messages are not DKIM-verified (dkimpy holds several copies in memory): dkim=policy."""

HEADER_CACHE = 1024
"""Authentication-Results values kept formatted, by verdict (``Verdict.header_value``)."""

Lookup = Callable[[str], list[bytes]]
"""TXT records at a name (each record's strings joined); raises TempError when DNS fails."""

_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]+")


@dataclass(frozen=True, slots=True)
class DkimResult:
    result: str
    domain: str = ""
    selector: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DmarcResult:
    result: str
    from_domain: str = ""
    policy: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What was found at arrival; ``spf`` is None when SPF was not evaluated (internal client,
    null sender)."""

    spf: str | None
    mail_from: str
    dkim: tuple[DkimResult, ...]
    dmarc: DmarcResult

    @property
    def dkim_summary(self) -> str:
        """One word for the message: pass if any signature passed, else the first other."""
        results = [item.result for item in self.dkim]
        for wanted in ("pass", "temperror", "fail"):
            if wanted in results:
                return wanted
        return results[0] if results else "none"

    def tags(self) -> tuple[str, ...]:
        spf = () if self.spf is None else (f"spf={self.spf}",)
        return (*spf, f"dkim={self.dkim_summary}", f"dmarc={self.dmarc.result}")

    def header_value(self, authserv_id: str) -> str:
        """The Authentication-Results value (RFC 8601): no field name, no CRLF.

        Cached (``HEADER_CACHE`` verdicts): authres takes ~30 us to build one, in the intake,
        and a busy sender's messages get the same verdict again and again."""
        return _header_value(self, authserv_id)

    def _format(self, authserv_id: str) -> str:
        results: list[object] = []
        if self.spf is not None:
            results.append(
                SPFAuthenticationResult(result=self.spf, smtp_mailfrom=_pvalue(self.mail_from))
            )
        if not self.dkim:
            results.append(DKIMAuthenticationResult(result="none"))
        for item in self.dkim:
            results.append(
                DKIMAuthenticationResult(
                    result=item.result,
                    reason=_reason(item.reason),
                    header_d=_pvalue(item.domain),
                    header_s=_pvalue(item.selector),
                )
            )
        dmarc = self.dmarc
        results.append(
            DMARCAuthenticationResult(
                result=dmarc.result,
                reason=_reason(dmarc.reason),
                header_from=_pvalue(dmarc.from_domain),
                policy=_pvalue(dmarc.policy),
            )
        )
        header = AuthenticationResultsHeader(authserv_id=_pvalue(authserv_id), results=results)
        text = str(header)
        return text.split(": ", 1)[1] if text.startswith("Authentication-Results:") else text


@functools.lru_cache(maxsize=HEADER_CACHE)
def _header_value(verdict: Verdict, authserv_id: str) -> str:
    return verdict._format(authserv_id)


def _pvalue(value: str) -> str | None:
    """A property value as RFC 8601 allows it unquoted; an address falls back to its domain."""
    if not value:
        return None
    if _TOKEN.fullmatch(value):
        return value
    domain = value.rpartition("@")[2]
    return domain if domain and _TOKEN.fullmatch(domain) else None


def _reason(text: str) -> str | None:
    cleaned = "".join(ch if " " <= ch <= "~" else " " for ch in text).strip()
    return cleaned[:120] or None


# -- DKIM -----------------------------------------------------------------------------------


class _KeyLookup:
    """dkimpy's dnsfunc for one signature: remembers what DNS said, to tell why it failed."""

    def __init__(self, lookup: Lookup) -> None:
        self.lookup = lookup
        self.error = ""
        self.record: bytes | None = None
        self.name = ""

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        self.name = name.decode("ascii", "replace")
        try:
            records = self.lookup(self.name)
        except TempError as exc:
            self.error = str(exc)
            raise dkim.DnsTimeoutError(self.error) from None
        self.record = records[0] if records else None
        return self.record


def check_dkim(message: bytes, lookup: Lookup, size: int | None = None) -> tuple[DkimResult, ...]:
    """One result per DKIM-Signature (up to MAX_SIGNATURES); () when there is none.

    ``size`` is the whole message's when ``message`` is only its start (too large to verify).
    """
    if b"dkim-signature" not in _head(message).lower():
        return ()  # no signature in the header section: nothing to parse
    try:
        verifier = dkim.DKIM(message)
    except dkim.DKIMException as exc:
        return (DkimResult("neutral", reason=f"message not parsable: {exc}"),)
    signatures = [v for k, v in verifier.headers if k.lower() == b"dkim-signature"]
    if max(len(message), size or 0) > MAX_DKIM_SIZE:
        reason = f"message over {MAX_DKIM_SIZE // (1024 * 1024)} MiB, not verified"
        return tuple(DkimResult("policy", *_ids(v), reason) for v in signatures)
    return tuple(
        _verify(verifier, index, signature, lookup)
        for index, signature in enumerate(signatures[:MAX_SIGNATURES])
    )


def _ids(signature: bytes) -> tuple[str, str]:
    """(d=, s=) of a signature header value, as far as it parses."""
    try:
        fields = dkim.util.parse_tag_value(signature)
    except Exception:
        return "", ""
    return (
        fields.get(b"d", b"").decode("ascii", "replace"),
        fields.get(b"s", b"").decode("ascii", "replace"),
    )


def _verify(verifier: dkim.DKIM, index: int, signature: bytes, lookup: Lookup) -> DkimResult:
    domain, selector = _ids(signature)
    key = _KeyLookup(lookup)
    try:
        ok = verifier.verify(idx=index, dnsfunc=key)
    except dkim.ValidationError as exc:
        text = str(exc)
        failed = "body hash mismatch" in text or "x= value is past" in text
        return DkimResult("fail" if failed else "neutral", domain, selector, text)
    except dkim.KeyFormatError as exc:
        return DkimResult("permerror", domain, selector, f"bad key: {exc}")
    except dkim.DKIMException as exc:
        return DkimResult("neutral", domain, selector, str(exc))
    except Exception as exc:  # dkimpy on odd input; a result is still owed
        return DkimResult("neutral", domain, selector, f"{type(exc).__name__}: {exc}")
    if ok:
        return DkimResult("pass", domain, selector)
    if key.error:
        return DkimResult("temperror", domain, selector, key.error)
    if key.record is None:
        return DkimResult("permerror", domain, selector, f"no key at {key.name}")
    try:
        dkim.evaluate_pk(key.name, key.record)
    except Exception as exc:
        return DkimResult("permerror", domain, selector, f"bad key: {exc}")
    return DkimResult("fail", domain, selector, "signature did not verify")


# -- DMARC ----------------------------------------------------------------------------------


@functools.cache
def _suffixes() -> PublicSuffixList:
    """The public suffix list packaged with authheaders, parsed once (~30 ms)."""
    source = importlib.resources.files("authheaders") / "public_suffix_list.txt"
    with source.open(encoding="utf-8") as lines:
        return PublicSuffixList(lines)


def load_suffixes() -> None:
    """Parse the public suffix list now (once per process) rather than at the first DMARC
    alignment: the Authenticator calls it at start, before the listeners open."""
    _suffixes()


@functools.lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """RFC 7489 3.2: the public suffix plus one label (an unknown TLD is its own suffix)."""
    domain = domain.lower().rstrip(".")
    suffix = _suffixes().get_tld(domain) or domain.rpartition(".")[2]
    if domain == suffix or not domain.endswith("." + suffix):
        return domain
    return domain[: -len(suffix) - 1].rpartition(".")[2] + "." + suffix


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """RFC 7489 3.1: strict, the same domain; relaxed, the same organizational domain."""
    a, b = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if not a:
        return False
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


def _head(message: bytes) -> bytes:
    """The header section (with its last CRLF), or everything when there is no body."""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


def from_domains(message: bytes) -> list[str]:
    """The domains of the RFC5322.From addresses, in order, without repeats."""
    values = []
    for field in re.findall(rb"(?im)^from[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", _head(message)):
        values.append(field.replace(b"\r\n", b"").strip().decode("utf-8", "replace"))
    found: list[str] = []
    for _name, address in getaddresses(values):
        domain = address.rpartition("@")[2].strip().lower().rstrip(".")
        if domain and domain not in found:
            found.append(domain)
    return found


def _policy_record(domain: str, lookup: Lookup) -> dict[str, str] | None:
    records = [r for r in lookup(f"_dmarc.{domain}") if r.startswith(b"v=DMARC1")]
    if len(records) != 1:
        return None  # none, or several (RFC 7489 6.6.3: as if none)
    try:
        tags: dict[str, str] = answer_to_dict(records[0].decode("utf-8", "replace"))
    except DMARCException:
        return None
    return tags


@dataclass(frozen=True, slots=True)
class DmarcPolicy:
    """What DNS says of a message's DMARC (the part that needs the message and DNS; computed in
    the verification worker): the From domain and its policy record, or a final result
    (``none``, ``permerror``, ``temperror``) that no SPF or DKIM result can change."""

    from_domain: str = ""
    record: tuple[tuple[str, str], ...] = ()
    inherited: bool = False
    final: DmarcResult | None = None


def dmarc_policy(message: bytes, lookup: Lookup) -> DmarcPolicy:
    """The From domain's DMARC record (RFC 7489 6.6.3), or the result when there is nothing to
    align."""
    domains = from_domains(message)
    if not domains:
        return DmarcPolicy(final=DmarcResult("none", reason="no From domain"))
    if len(domains) > 1:
        return DmarcPolicy(
            final=DmarcResult("permerror", domains[0], reason="several From domains")
        )
    from_domain = domains[0]
    try:
        record = _policy_record(from_domain, lookup)
        organizational = organizational_domain(from_domain)
        inherited = False
        if record is None and organizational != from_domain:
            record = _policy_record(organizational, lookup)
            inherited = record is not None
    except TempError as exc:
        return DmarcPolicy(final=DmarcResult("temperror", from_domain, reason=str(exc)))
    if record is None:
        return DmarcPolicy(final=DmarcResult("none", from_domain))
    return DmarcPolicy(from_domain, tuple(record.items()), inherited)


def dmarc_verdict(
    policy: DmarcPolicy, spf: str | None, mail_from: str, dkim_results: tuple[DkimResult, ...]
) -> DmarcResult:
    """RFC 7489's alignment of the SPF and DKIM results with the From domain (cheap: no DNS)."""
    if policy.final is not None:
        return policy.final
    record = dict(policy.record)
    from_domain = policy.from_domain
    applies = record.get("p", "none")
    if policy.inherited:
        applies = record.get("sp", applies)
    applies = applies if applies in ("none", "quarantine", "reject") else "none"
    mail_from_domain = mail_from.rpartition("@")[2]
    spf_ok = spf == "pass" and aligned(mail_from_domain, from_domain, record.get("aspf", "r"))
    adkim = record.get("adkim", "r")
    dkim_ok = any(
        item.result == "pass" and aligned(item.domain, from_domain, adkim) for item in dkim_results
    )
    return DmarcResult("pass" if spf_ok or dkim_ok else "fail", from_domain, applies)


def check_dmarc(
    message: bytes,
    spf: str | None,
    mail_from: str,
    dkim_results: tuple[DkimResult, ...],
    lookup: Lookup,
) -> DmarcResult:
    return dmarc_verdict(dmarc_policy(message, lookup), spf, mail_from, dkim_results)


# -- the DNS names a message needs ----------------------------------------------------------


def names_needed(message: bytes) -> list[str]:
    """The TXT names the checks of ``message`` (or its header section) will look up: each DKIM
    signature's key (up to MAX_SIGNATURES), the From domain's DMARC record and its
    organizational domain's. Lower case, no final dot (see ``dns_key``). The intake resolves
    them before the message goes to a verification worker, so a worker rarely waits on DNS.

    Quick (it runs in the intake, for every message): regular expressions, not the parsers the
    checks use. A name it misses or gets wrong costs only a lookup in the worker."""
    head = _head(message)
    names: list[str] = []
    for folded in _SIGNATURE.findall(head)[:MAX_SIGNATURES]:
        value = folded.replace(b"\r\n", b"")
        domain, selector = _TAG_D.search(value), _TAG_S.search(value)
        if domain and selector:
            names.append(
                f"{selector[1].decode('ascii', 'replace')}._domainkey."
                f"{domain[1].decode('ascii', 'replace')}"
            )
    senders = _FROM.findall(head)
    if len(senders) == 1:
        domains = set(_AT_DOMAIN.findall(senders[0]))
        if len(domains) == 1:
            from_domain = domains.pop().decode("ascii", "replace").lower().rstrip(".")
            names.append(f"_dmarc.{from_domain}")
            organizational = organizational_domain(from_domain)
            if organizational != from_domain:
                names.append(f"_dmarc.{organizational}")
    return list(dict.fromkeys(dns_key(name) for name in names))


_SIGNATURE = re.compile(rb"(?im)^dkim-signature[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)")
_FROM = re.compile(rb"(?im)^from[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)")
_TAG_D = re.compile(rb"(?:^|;)[ \t]*d[ \t]*=[ \t]*([A-Za-z0-9._-]+)")
_TAG_S = re.compile(rb"(?:^|;)[ \t]*s[ \t]*=[ \t]*([A-Za-z0-9._-]+)")
_AT_DOMAIN = re.compile(rb"@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)")


def dns_key(name: str) -> str:
    """A looked-up name as the key of prefetched records: lower case, no final dot."""
    return name.strip().rstrip(".").lower()
