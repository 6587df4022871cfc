"""Preflight of a domain's DNS: MX and its TTL, MTA-STS, SPF and DMARC.

Verdicts: ``ok``; ``todo`` (a step of the plan not taken yet, e.g. MX not yet at the spooler);
``warn`` (works, but look at it); ``fail`` (mail will be lost or refused if you go on: a no-go);
``info`` (for the record). The classic mistakes it catches:

* an MX TTL above 300 s while the MX still points elsewhere: lower it and wait the old TTL
  before the change, or senders keep using the old MX for as long as they cached it;
* an enforcing MTA-STS policy (RFC 8461) whose ``mx:`` lines do not list the spooler: senders
  that honour it refuse to deliver to the spooler once MX points at it.

The MTA-STS policy is fetched over HTTPS from ``mta-sts.<domain>`` (no redirects, 64 KiB at
most, as RFC 8461 says). Its host is resolved with the same resolver as the rest, and the
certificate is checked against the system CAs plus ``[delivery] ca_file``.

Test-only: ``MXSPOOL_TEST_MTA_STS_PORT`` makes the policy fetch use that port instead of 443,
so tests can run a local HTTPS server; it is not meant for production use.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.resolver

from mxspool.delivery import dnscache
from mxspool.delivery.errors import RoutingError

MAX_TTL = 300
"""The MX TTL to have before the change: an operator waits at most this for senders to follow."""
POLICY_LIMIT = 64 * 1024
TIMEOUT = 10.0
TEST_PORT_ENV = "MXSPOOL_TEST_MTA_STS_PORT"

VERDICTS = ("ok", "todo", "info", "warn", "fail")


class DnsCheckError(Exception):
    """DNS could not be asked at all (no resolver); the message says what to configure."""


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    verdict: str
    detail: str
    fix: str = ""


@dataclass(frozen=True, slots=True)
class MxEntry:
    preference: int
    host: str
    ttl: int


@dataclass(slots=True)
class DnsReport:
    domain: str
    spooler: str
    mx: list[MxEntry] = field(default_factory=list)
    mx_ttl: int | None = None
    mx_at: str = "unknown"
    """"spooler", "route" (the domain's configured destination), "other" or "unknown"."""
    mta_sts_mode: str | None = None
    mta_sts_mx: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def add(self, check: str, verdict: str, detail: str, fix: str = "") -> None:
        self.findings.append(Finding(check, verdict, detail, fix))

    @property
    def go(self) -> bool:
        return all(finding.verdict != "fail" for finding in self.findings)


def make_resolver(nameserver: str) -> dns.asyncresolver.Resolver:
    """The delivery engine's resolver set-up, with this module's error type."""
    try:
        return dnscache.make_resolver(nameserver, TIMEOUT)
    except RoutingError as exc:
        raise DnsCheckError(str(exc)) from exc


class _Lookup:
    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self.resolver = resolver

    async def records(self, name: str, rdtype: str) -> tuple[list[str], int | None]:
        """(records as text, TTL); ([], None) when the name has none. NXDOMAIN -> LookupError."""
        try:
            answer = await self.resolver.resolve(name, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            raise LookupError(f"{name} does not exist (NXDOMAIN)") from None
        except dns.exception.DNSException as exc:
            raise OSError(f"DNS error looking up {rdtype} of {name}: {exc}") from None
        if answer.rrset is None:
            return [], None
        return [rdata.to_text() for rdata in answer.rrset], int(answer.rrset.ttl)

    async def txt(self, name: str) -> list[str]:
        try:
            texts, _ttl = await self.records(name, "TXT")
        except LookupError:
            return []
        # A TXT record is one or more quoted strings; senders join them without spaces.
        return ["".join(part.strip('"') for part in _split_quoted(text)) for text in texts]


def _split_quoted(text: str) -> list[str]:
    parts: list[str] = []
    current = ""
    quoted = False
    escaped = False
    for char in text:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
            if not quoted:
                parts.append(current)
                current = ""
        elif quoted:
            current += char
    return parts or [text]


def mx_pattern_matches(pattern: str, host: str) -> bool:
    """RFC 8461 section 4.1: "*.example.net" matches exactly one extra leftmost label."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host


def parse_policy(text: str) -> dict[str, list[str]]:
    """An MTA-STS policy's fields (key -> values; mx may repeat)."""
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            fields.setdefault(key.strip().lower(), []).append(value.strip())
    return fields


async def fetch_policy(
    lookup: _Lookup, domain: str, ca_file: str = "", port: int | None = None
) -> str:
    """The policy text from https://mta-sts.<domain>/.well-known/mta-sts.txt; OSError if not."""
    host = f"mta-sts.{domain}"
    try:
        addresses, _ttl = await lookup.records(host, "A")
        if not addresses:
            addresses, _ttl = await lookup.records(host, "AAAA")
    except LookupError:
        addresses = []
    if not addresses:
        raise OSError(f"{host} has no address")
    if port is None:
        override = os.environ.get(TEST_PORT_ENV, "")
        port = int(override) if override.isdigit() else 443
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    request = (
        f"GET /.well-known/mta-sts.txt HTTP/1.0\r\nHost: {host}\r\n"
        "User-Agent: mxspool-check\r\nConnection: close\r\n\r\n"
    ).encode()
    try:
        # HTTP/1.0 keeps the reply simple (no chunked encoding); RFC 8461 needs nothing more.
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(addresses[0], port, ssl=context, server_hostname=host),
            TIMEOUT,
        )
    except ssl.SSLCertVerificationError as exc:
        raise OSError(f"the certificate of {host} is not valid: {exc.verify_message}") from None
    except (TimeoutError, ssl.SSLError) as exc:
        raise OSError(f"cannot connect to https://{host}: {exc or type(exc).__name__}") from None
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(POLICY_LIMIT + 4096), TIMEOUT)
    except (TimeoutError, ssl.SSLError) as exc:
        raise OSError(f"https://{host} did not answer: {exc or type(exc).__name__}") from None
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or parts[1] != "200":
        # RFC 8461 section 3.3: redirects are not followed; anything but 200 is no policy.
        raise OSError(f"https://{host}/.well-known/mta-sts.txt answered {status_line!r}")
    if len(body) > POLICY_LIMIT:
        raise OSError(f"the MTA-STS policy of {domain} is larger than 64 KiB")
    return body.decode("utf-8", errors="replace")


async def current_mx(domain: str, nameserver: str = "") -> tuple[list[str], int | None, str]:
    """(MX hosts by preference, TTL, error text) as DNS shows them now; never raises."""
    try:
        texts, ttl = await _Lookup(make_resolver(nameserver)).records(domain, "MX")
    except (LookupError, OSError, DnsCheckError) as exc:
        return [], None, str(exc)
    entries = sorted(
        (int(p), h.rstrip(".").lower()) for p, _, h in (t.partition(" ") for t in texts)
    )
    return [host for _pref, host in entries], ttl, "" if texts else "no MX record"


def _classify_mx(hosts: list[str], spooler: str, route_hosts: set[str]) -> str:
    if not hosts:
        return "unknown"
    if spooler and all(host == spooler for host in hosts):
        return "spooler"
    if route_hosts and all(host in route_hosts for host in hosts):
        return "route"
    return "other"


async def check_dns(
    domain: str,
    *,
    spooler: str,
    nameserver: str = "",
    ca_file: str = "",
    route_hosts: set[str] | None = None,
) -> DnsReport:
    """Look at the domain's DNS as a sender would; see the module docstring for verdicts.

    ``route_hosts`` are the hosts mail currently goes to from the spooler (the configured
    routes, or their MX hosts): MX pointing there means MX points at the destination.
    """
    spooler = spooler.lower().rstrip(".")
    report = DnsReport(domain, spooler)
    lookup = _Lookup(make_resolver(nameserver))
    await _check_mx(report, lookup, route_hosts or set())
    await _check_mta_sts(report, lookup, ca_file)
    await _check_spf_dmarc(report, lookup)
    return report


async def _check_mx(report: DnsReport, lookup: _Lookup, route_hosts: set[str]) -> None:
    domain, spooler = report.domain, report.spooler
    try:
        texts, ttl = await lookup.records(domain, "MX")
    except LookupError as exc:
        report.add("mx", "fail", str(exc), "check the domain name; it must exist in DNS")
        return
    except OSError as exc:
        report.add("mx", "fail", str(exc), "check [delivery] resolver and try again")
        return
    for text in texts:
        preference, _, host = text.partition(" ")
        report.mx.append(MxEntry(int(preference), host.rstrip(".").lower(), ttl or 0))
    report.mx.sort(key=lambda entry: entry.preference)
    report.mx_ttl = ttl
    hosts = [entry.host for entry in report.mx]
    shown = ", ".join(f"{entry.preference} {entry.host}" for entry in report.mx)
    if not hosts:
        report.add(
            "mx",
            "warn",
            f"{domain} has no MX record: senders use its A/AAAA record (implicit MX)",
            f"publish 'MX 10 {spooler or 'SPOOLER-HOST'}' when it is time to cut over",
        )
        return
    report.mx_at = _classify_mx(hosts, spooler, route_hosts)
    if report.mx_at == "spooler":
        report.add("mx", "ok", f"MX points at the spooler ({shown})")
    elif spooler and spooler in hosts:
        report.add(
            "mx",
            "warn",
            f"MX lists the spooler and other hosts ({shown}): senders may use either",
            "list only the spooler while mail is held, so nothing bypasses it",
        )
    elif report.mx_at == "route":
        report.add(
            "mx",
            "todo",
            f"MX points at the domain's route ({shown}), not at the spooler {spooler}",
            f"lower the TTL, then point MX at {spooler} to cut over; after the release this "
            "is the final state",
        )
    else:
        report.add(
            "mx",
            "todo",
            f"MX is not at the spooler yet ({shown})",
            f"point MX at {spooler or 'the spooler'} once the TTL is low (see the TTL check)",
        )
    _check_ttl(report)


def _check_ttl(report: DnsReport) -> None:
    ttl = report.mx_ttl or 0
    if ttl <= MAX_TTL:
        report.add("mx-ttl", "ok", f"MX TTL is {ttl} s (at most {MAX_TTL} s)")
        return
    detail = f"MX TTL is {ttl} s, longer than {MAX_TTL} s"
    fix = (
        f"lower the MX TTL to {MAX_TTL} s now and wait at least {ttl} s (the old TTL; 24 h "
        "to be safe) before changing MX, or senders keep using the old MX for that long"
    )
    if report.mx_at == "spooler":
        # Already cut over: a long TTL only slows down the final move to the target.
        report.add("mx-ttl", "warn", detail, f"lower it to {MAX_TTL} s before MX moves again")
    else:
        report.add("mx-ttl", "fail", detail, fix)


async def _check_mta_sts(report: DnsReport, lookup: _Lookup, ca_file: str) -> None:
    domain, spooler = report.domain, report.spooler
    records = [t for t in await lookup.txt(f"_mta-sts.{domain}") if t.startswith("v=STSv1")]
    if not records:
        report.add("mta-sts", "info", f"no MTA-STS record (_mta-sts.{domain}): nothing to update")
        return
    try:
        policy_text = await fetch_policy(lookup, domain, ca_file)
    except OSError as exc:
        report.add(
            "mta-sts",
            "fail",
            f"_mta-sts.{domain} is published ({records[0]}) but the policy cannot be fetched: "
            f"{exc}",
            "fix the policy web site, or remove the _mta-sts TXT record; senders that cached an "
            "enforcing policy keep applying it until its max_age runs out",
        )
        return
    policy = parse_policy(policy_text)
    mode = (policy.get("mode") or ["none"])[0].lower()
    patterns = policy.get("mx", [])
    report.mta_sts_mode = mode
    report.mta_sts_mx = patterns
    max_age = (policy.get("max_age") or ["?"])[0]
    listed = ", ".join(patterns) or "none"
    covered = bool(spooler) and any(mx_pattern_matches(p, spooler) for p in patterns)
    where = f"mode {mode}, mx: {listed}, max_age {max_age}"
    if mode == "enforce" and not covered:
        report.add(
            "mta-sts",
            "fail",
            f"MTA-STS policy enforces ({where}) and does not list the spooler {spooler}",
            f"add 'mx: {spooler}' to https://mta-sts.{domain}/.well-known/mta-sts.txt and "
            f"change the id in the _mta-sts.{domain} TXT record, before MX points at the spooler",
        )
    elif mode == "enforce":
        report.add("mta-sts", "ok", f"MTA-STS policy enforces and lists the spooler ({where})")
    elif mode == "testing":
        report.add(
            "mta-sts",
            "warn" if not covered else "ok",
            f"MTA-STS policy in testing mode ({where})"
            + ("" if covered else f"; the spooler {spooler} is not listed"),
            "" if covered else f"add 'mx: {spooler}' before switching the policy to enforce",
        )
    else:
        report.add("mta-sts", "info", f"MTA-STS policy in mode {mode} ({where})")


async def _check_spf_dmarc(report: DnsReport, lookup: _Lookup) -> None:
    domain = report.domain
    spf = [text for text in await lookup.txt(domain) if text.lower().startswith("v=spf1")]
    if len(spf) > 1:
        report.add("spf", "warn", f"{len(spf)} SPF records (receivers treat that as an error)")
    elif spf:
        report.add(
            "spf",
            "info",
            spf[0],
            "the spooler relays inbound mail only; SPF of the domain needs no change for it",
        )
    else:
        report.add("spf", "info", f"no SPF record for {domain}")
    dmarc = [t for t in await lookup.txt(f"_dmarc.{domain}") if t.upper().startswith("V=DMARC1")]
    if dmarc:
        report.add("dmarc", "info", dmarc[0])
    else:
        report.add("dmarc", "info", f"no DMARC record at _dmarc.{domain}")
