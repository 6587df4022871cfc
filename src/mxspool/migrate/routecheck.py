"""``check route`` and ``check recipients``: what the domain's destination says, without mail.

``check route`` looks at every address of the route (as the delivery engine would try them):
connect, EHLO, STARTTLS as the route's TLS mode demands, the certificate, SIZE, one RCPT with
the null sender, and the latency, then gives each hop a go or no-go. It connects as delivery
does (``delivery.identity``), so it also says which local address and IP version it left from
and which client certificate it presented: what the target's inbound connector will see.

``check recipients`` asks the route, by RCPT (then RSET, never DATA), about each distinct
recipient held for the domain, a few connections at a time and paced, so the operator knows
which mailboxes exist at the target before releasing: Exchange Online answers
``550 5.4.1 Recipient address rejected: Access denied`` for a mailbox that does not exist yet.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mxspool.delivery.identity import NO_IDENTITY, OutboundIdentity
from mxspool.delivery.routing import Hop
from mxspool.migrate.dnscheck import Finding
from mxspool.migrate.smtpprobe import HopReport, RcptResult, SmtpProber
from mxspool.store.base import TlsMode


@dataclass(slots=True)
class HopVerdict:
    report: HopReport
    findings: list[Finding] = field(default_factory=list)

    @property
    def go(self) -> bool:
        return all(finding.verdict != "fail" for finding in self.findings)


def judge_hop(
    report: HopReport,
    tls: TlsMode,
    max_message_size: int,
    identity: OutboundIdentity = NO_IDENTITY,
) -> HopVerdict:
    """Go / no-go for one hop, per the route's TLS mode."""
    verdict = HopVerdict(report)
    add = verdict.findings.append
    hop = report.hop
    if not report.connected:
        add(Finding("connect", "fail", report.error or "no connection", _connect_fix(hop)))
        return verdict
    add(Finding("connect", "ok", f"{report.banner} in {report.connect_ms or 0:.0f} ms"))
    add(_judge_source(report, identity))
    _judge_tls(report, tls, add)
    _judge_client_cert(report, identity, add)
    if report.size_limit is None:
        add(Finding("size", "info", "SIZE not advertised"))
    elif report.size_limit and report.size_limit < max_message_size:
        add(
            Finding(
                "size",
                "warn",
                f"takes messages up to {report.size_limit} bytes; the spooler accepts up to "
                f"{max_message_size}",
                "bigger messages will be refused there and parked; lower [smtp] "
                "max_message_size to match, so senders learn it at once",
            )
        )
    else:
        add(Finding("size", "ok", f"SIZE {report.size_limit or 'unlimited'}"))
    for result in report.rcpts:
        add(_judge_rcpt(result))
    return verdict


def ip_version(address: str | None) -> str:
    """ "IPv4" or "IPv6" ("" when unknown)."""
    try:
        return f"IPv{ipaddress.ip_address(address or '').version}"
    except ValueError:
        return ""


def _judge_source(report: HopReport, identity: OutboundIdentity) -> Finding:
    local = report.local_address or "?"
    version = ip_version(report.local_address)
    configured = identity.source_for(report.hop.address)
    if configured is None:
        return Finding(
            "source",
            "info",
            f"from {local} ({version}), chosen by the system",
            "set [delivery] source_address to the address the target's inbound connector "
            "lists, so every connection leaves from it",
        )
    if configured != report.local_address:
        return Finding(
            "source",
            "fail",
            f"from {local} ({version}), not from [delivery] source_address {configured}",
            "check the machine's addresses and routes",
        )
    return Finding("source", "ok", f"from {local} ({version}), [delivery] source_address")


def _judge_client_cert(
    report: HopReport, identity: OutboundIdentity, add: Callable[[Finding], None]
) -> None:
    cert = identity.client_cert
    if cert is None:
        add(
            Finding(
                "client-cert",
                "info",
                "none configured: the target's connector must recognise the spooler by its "
                "IP address",
            )
        )
        return
    if cert.expired:
        add(
            Finding(
                "client-cert",
                "fail",
                f"{cert.describe()}: expired",
                "renew it ([delivery] tls_client_cert and tls_client_key), then restart",
            )
        )
        return
    if not report.client_cert_presented:
        add(
            Finding(
                "client-cert",
                "warn",
                f"{cert.describe()}: not presented, no TLS session with this hop",
                "a connector that recognises the spooler by certificate needs TLS",
            )
        )
        return
    add(
        Finding(
            "client-cert",
            "ok",
            f"{cert.describe()}: offered in the TLS session, which the hop accepted (sent "
            "when the hop asks for one; whether it asked is not observable)",
        )
    )


def _connect_fix(hop: Hop) -> str:
    return (
        f"check that {hop.address} port {hop.port} is reachable from the spooler (firewall, "
        "outbound port 25 blocked by the provider) and that the route is right "
        "('mxspool domain route')"
    )


def _judge_tls(report: HopReport, tls: TlsMode, add: Callable[[Finding], None]) -> None:
    if tls is TlsMode.OFF:
        add(Finding("tls", "info", "TLS off for this route (tls=off)"))
        return
    if not report.starttls_offered:
        verdict = "warn" if tls is TlsMode.OPPORTUNISTIC else "fail"
        add(
            Finding(
                "tls",
                verdict,
                "STARTTLS not offered",
                ""
                if verdict == "warn"
                else f"the route requires TLS (tls={tls.value}); "
                "fix the destination or use --tls opportunistic",
            )
        )
        return
    if report.tls_version is None:
        add(Finding("tls", "fail", report.error or "STARTTLS failed"))
        return
    add(Finding("tls", "ok", f"{report.tls_version} {report.tls_cipher or ''}".strip()))
    if report.cert_verified:
        add(
            Finding(
                "certificate",
                "ok",
                f"valid for {report.hop.name}: subject {report.cert_subject or '-'}, issuer "
                f"{report.cert_issuer or '-'}, until {report.cert_not_after or '-'}",
            )
        )
    else:
        verdict = "fail" if tls is TlsMode.VERIFY else "warn"
        add(
            Finding(
                "certificate",
                verdict,
                f"not valid for {report.hop.name}: {report.cert_error or 'not verified'}",
                "route by the host name the certificate is for, add the CA to [delivery] "
                "ca_file, or use --tls require to accept any certificate"
                if verdict == "fail"
                else "",
            )
        )


def _judge_rcpt(result: RcptResult) -> Finding:
    text = f"RCPT <{result.address}>: {result.code or '-'} {result.reply}".rstrip()
    if 200 <= result.code < 300:
        return Finding("rcpt", "ok", text)
    if 400 <= result.code < 500:
        return Finding("rcpt", "warn", text, "a temporary refusal; check again later")
    return Finding("rcpt", "fail", text, rcpt_hint(result))


def rcpt_hint(result: RcptResult) -> str:
    """What a refusal usually means at a Microsoft 365 target, and what to do."""
    reply = result.reply
    if result.code == 0:
        return (
            "no answer to RCPT (MAIL refused, or the session broke): this says nothing about "
            "the mailbox; check again later, 'mxspool check route' shows the route"
        )
    if "5.4.1" in reply:
        return (
            "the mailbox (or the domain) does not exist at the target yet: create it, or add the "
            "domain as an accepted domain of the target tenant"
        )
    if "5.1.1" in reply or "5.1.10" in reply:
        return "the target does not know this address: create the mailbox or an alias"
    if "4.4.62" in reply:
        return "the route points at the wrong tenant or region: check the target MX host"
    if result.code == 451 and _THROTTLED.match(reply):
        return (
            "Exchange Online is throttling a sender it does not know yet (451 4.7.500-699, "
            '"Server busy"): this says nothing about the mailbox; check again later (in 15 '
            "minutes or more)"
        )
    if 400 <= result.code < 500:
        return "a temporary refusal: this says nothing about the mailbox; check again later"
    return "the target refuses this recipient; see its reply"


_THROTTLED = re.compile(r"4\.7\.[56]\d\d\b")


class Pacer:
    """At most ``rate`` calls a second across every concurrent caller (0: unpaced)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def __call__(self) -> None:
        if not self.interval:
            return
        async with self._lock:
            now = time.monotonic()
            wait = self._next - now
            self._next = max(now, self._next) + self.interval
        if wait > 0:
            await asyncio.sleep(wait)


@dataclass(frozen=True, slots=True)
class Readiness:
    address: str
    state: str
    """"ready", "not ready" or "unknown" (temporary refusal, no answer)."""
    reply: str
    hint: str
    hop: str


async def probe_recipients(
    prober: SmtpProber,
    hops: Sequence[Hop],
    tls: TlsMode,
    addresses: Sequence[str],
    *,
    concurrency: int = 2,
    rate: float = 5.0,
    batch: int = 20,
) -> list[Readiness]:
    """RCPT-probe every address at the first hop that answers, in batches, paced."""
    pace = Pacer(rate)
    batches = [list(addresses[i : i + batch]) for i in range(0, len(addresses), batch)]
    work: asyncio.Queue[list[str]] = asyncio.Queue()
    for item in batches:
        work.put_nowait(item)
    results: dict[str, Readiness] = {}

    async def worker() -> None:
        while not work.empty():
            chunk = work.get_nowait()
            errors: list[str] = []
            for hop in hops:
                report = await prober.examine(hop, tls, chunk, batch=batch, pace=pace)
                if report.connected and report.rcpts:
                    for result in report.rcpts:
                        results[result.address] = _readiness(result, str(hop))
                    break
                errors.append(f"{hop}: {report.error or 'no session'}")
            else:
                reason = "; ".join(errors) or "no hop to try"
                for address in chunk:
                    results[address] = Readiness(
                        address, "unknown", f"not checked: {reason}", _connect_hint(), "-"
                    )

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return [results[address] for address in addresses if address in results]


def _connect_hint() -> str:
    return (
        "no hop of the route answered (a 4xx or a connection failure before RCPT): it says "
        "nothing about the mailbox; check again later, 'mxspool check route' shows why"
    )


def not_checked(addresses: Sequence[str], reason: str) -> list[Readiness]:
    """Every address "unknown": the route could not be asked at all."""
    return [
        Readiness(a, "unknown", f"not checked: {reason}", _connect_hint(), "-") for a in addresses
    ]


def _readiness(result: RcptResult, hop: str) -> Readiness:
    reply = f"{result.code} {result.reply}" if result.code else result.reply
    if 200 <= result.code < 300:
        return Readiness(result.address, "ready", reply, "", hop)
    state = "not ready" if result.code >= 500 else "unknown"
    return Readiness(result.address, state, reply, rcpt_hint(result), hop)
