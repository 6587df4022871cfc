"""``mxspool check tls``: can the certificate STARTTLS serves last the migration?

Reads the served pair (``[smtp] tls_cert``/``tls_key`` or ACME's), and reports each certificate
of the chain, the names it covers against ``[smtp] hostname`` (the name senders and Exchange
Online's connectors verify), the days left, and whether it outlives the planned hold
(``--hold-days``) plus a margin. Problems (exit 1): no certificate, unreadable or mismatched
files, a broken chain, the host name not covered, expired, or expiring before the hold ends
without ACME to renew it. Warnings (exit 0): below ``[smtp] tls_expiry_warning``, self-signed,
or expiring before the hold ends while ACME is on (it renews; watch that it does).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from mxspool.config import Config
from mxspool.tls.certinfo import (
    CertificateError,
    CertSummary,
    chain_problems,
    covers,
    read_pair,
    summarize,
)
from mxspool.tls.files import served_paths

DAY = 86400.0


@dataclass
class TlsReport:
    hostname: str
    source: str
    """"files" ([smtp] tls_cert/tls_key), "acme", or "none"."""
    cert_path: str = ""
    key_path: str = ""
    chain: list[CertSummary] = field(default_factory=list)
    covers_hostname: bool | None = None
    days_left: float | None = None
    hold_days: float | None = None
    margin_days: float = 0.0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self, now: datetime.datetime | None = None) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "hostname": self.hostname,
            "source": self.source,
            "cert_file": self.cert_path,
            "key_file": self.key_path,
            "chain": [item.to_dict(now) for item in self.chain],
            "names": list(self.chain[0].names) if self.chain else [],
            "covers_hostname": self.covers_hostname,
            "days_left": None if self.days_left is None else round(self.days_left, 2),
            "hold_days": self.hold_days,
            "margin_days": self.margin_days,
            "problems": self.problems,
            "warnings": self.warnings,
        }


def check_tls(
    config: Config,
    *,
    hold_days: float | None = None,
    margin_days: float = 7.0,
    now: datetime.datetime | None = None,
) -> TlsReport:
    now = now or datetime.datetime.now(datetime.UTC)
    hostname = config.smtp.hostname
    paths = served_paths(config)
    acme = config.acme.enabled
    report = TlsReport(hostname, "acme" if acme else ("files" if paths else "none"))
    report.hold_days, report.margin_days = hold_days, margin_days
    if paths is None:
        report.problems.append(
            "STARTTLS is not configured: set [smtp] tls_cert and tls_key, or enable [acme]; "
            "senders then deliver in clear text, and some refuse to"
        )
        return report
    report.cert_path, report.key_path = str(paths.cert), str(paths.key)
    try:
        pair = read_pair(paths.cert, paths.key)
    except CertificateError as exc:
        hint = " (ACME has not obtained one yet: run 'mxspool acme issue')" if acme else ""
        report.problems.append(f"{exc}{hint}")
        return report
    report.chain = [summarize(cert) for cert in pair.chain]
    leaf = report.chain[0]
    report.problems += chain_problems(pair.chain)
    report.covers_hostname = covers(leaf.names, hostname)
    if not report.covers_hostname:
        report.problems.append(
            f"the certificate's names ({', '.join(leaf.names) or 'none'}) do not cover "
            f"{hostname}, the [smtp] hostname that senders verify; get one for {hostname}"
        )
    left = leaf.seconds_left(now)
    report.days_left = left / DAY
    _expiry(config, report, leaf, left, now)
    if len(pair.chain) == 1 and leaf.issuer == leaf.subject:
        report.warnings.append(
            "the certificate is self-signed: senders that verify certificates (DANE, MTA-STS, "
            "connectors set to require a trusted certificate) refuse it"
        )
    return report


def _expiry(
    config: Config, report: TlsReport, leaf: CertSummary, left: float, now: datetime.datetime
) -> None:
    expires = f"{leaf.not_after:%Y-%m-%d %H:%M}Z"
    acme = config.acme.enabled
    if leaf.not_before > now:
        report.problems.append(f"the certificate is not valid before {leaf.not_before:%Y-%m-%d}")
    if left <= 0:
        report.problems.append(f"the certificate expired at {expires}; replace it")
        return
    if report.hold_days is not None:
        needed = (report.hold_days + report.margin_days) * DAY
        if left < needed:
            text = (
                f"the certificate expires at {expires} ({left / DAY:.1f} days), before the "
                f"hold ends plus margin ({report.hold_days:g} + {report.margin_days:g} days)"
            )
            if acme:
                report.warnings.append(
                    f"{text}; ACME renews it {config.acme.renew_before / DAY:g} days ahead: "
                    "make sure renewals work (serve's log, 'mxspool acme issue')"
                )
            else:
                report.problems.append(f"{text}: renew it before the hold starts")
    if left < config.smtp.tls_expiry_warning:
        report.warnings.append(
            f"the certificate has {left / DAY:.1f} days left, below the "
            f"{config.smtp.tls_expiry_warning / DAY:g}-day warning threshold "
            "([smtp] tls_expiry_warning)"
        )


def render(report: TlsReport) -> list[str]:
    """The report as lines of text for people."""
    lines = [f"STARTTLS certificate for {report.hostname} (source: {report.source})"]
    if report.cert_path:
        lines.append(f"  files: {report.cert_path}, {report.key_path}")
    for index, item in enumerate(report.chain):
        role = "server" if index == 0 else f"chain {index}"
        lines += [
            f"  [{role}] subject {item.subject}",
            f"           issuer  {item.issuer}",
            f"           serial {item.serial}, valid {item.not_before:%Y-%m-%d} to "
            f"{item.not_after:%Y-%m-%d %H:%M}Z",
        ]
    if report.chain:
        covered = "covers" if report.covers_hostname else "does NOT cover"
        lines.append(f"  names: {', '.join(report.chain[0].names) or '(none)'}")
        lines.append(f"  the names {covered} {report.hostname}")
    if report.days_left is not None:
        lines.append(f"  days left: {report.days_left:.1f}")
    if report.hold_days is not None:
        lines.append(f"  planned hold: {report.hold_days:g} days + {report.margin_days:g} margin")
    lines += [f"  PROBLEM: {text}" for text in report.problems]
    lines += [f"  warning: {text}" for text in report.warnings]
    lines.append("  verdict: " + ("OK" if report.ok else "PROBLEMS (exit 1)"))
    return lines
