"""The migration runbook: the operator's story (docs/design.md) as the commands for one domain.

A plan is a list of steps; each step has an explanation and commands of four kinds: DNS
records to publish, Exchange Online PowerShell (``exo``: the target tenant; ``exo-source``:
the source tenant), and mxspool commands. It renders as Markdown (``md``) for people, or as a
PowerShell script (``ps1``) whose only live commands are the target tenant's, everything else
being comments: the script is meant to be run in Exchange Online PowerShell, while DNS changes
and mxspool commands happen elsewhere, at the moments the comments give.

Every Exchange Online parameter used here is one Microsoft documents for the cmdlet
(New-InboundConnector, Set-InboundConnector, Get-InboundConnector, Get-Recipient,
Get-ArcConfig, Set-ArcConfig); each is explained in a comment next to it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

MAX_TTL = 300
Kind = Literal["dns", "exo", "exo-source", "graph", "graph-source", "mxspool", "shell"]


class RunbookError(Exception):
    """The runbook cannot be made from these inputs; the message says what to give instead."""


@dataclass(frozen=True, slots=True)
class Command:
    kind: Kind
    text: str
    why: tuple[str, ...] = ()


@dataclass(slots=True)
class Step:
    key: str
    title: str
    text: list[str]
    commands: list[Command] = field(default_factory=list)
    checks: list[Command] = field(default_factory=list)
    """Commands whose output confirms the step was done (the tenant runbook has them)."""


@dataclass(frozen=True, slots=True)
class Inputs:
    domain: str
    spooler_host: str
    spooler_ip: str
    target_host: str | None = None
    mx_hosts: tuple[str, ...] = ()
    """The MX hosts seen in DNS now (the source tenant's, before the cut-over)."""
    mx_ttl: int | None = None
    lookup_error: str = ""
    client_cert_name: str | None = None
    """The name on ``[delivery] tls_client_cert``: the connector recognises the spooler by it
    (TlsSenderCertificateName) instead of by IP address; None: by IP address."""
    arc: ArcSealing | None = None
    """``[arc]`` sealing, when configured: the target tenant must trust the sealer."""


@dataclass(frozen=True, slots=True)
class ArcSealing:
    domain: str
    selector: str
    zone_line: str
    """The key's TXT record as a zone-file line (``mxspool arc keygen`` prints the same)."""


def check_spooler_ip(value: str) -> str:
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        raise RunbookError(
            f"--spooler-ip {value!r} is not an IP address; give the public IPv4 address the "
            "spooler sends from"
        ) from None
    if address.version != 4:
        raise RunbookError(
            f"--spooler-ip {value} is IPv6; Exchange Online inbound connectors accept only IPv4 "
            "in SenderIPAddresses: give the spooler's public IPv4 address (and make it send to "
            "the target over IPv4)"
        )
    # RFC 1918, loopback and the like cannot be what Exchange Online sees; documentation
    # ranges (203.0.113.0/24...) are let through so examples work.
    internal = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16")
    if address.is_unspecified or any(address in ipaddress.ip_network(net) for net in internal):
        raise RunbookError(
            f"--spooler-ip {value} is not a public address; Exchange Online sees the spooler's "
            "public IPv4 address (after NAT): give that one"
        )
    return str(address)


def _ps(value: str) -> str:
    """A PowerShell single-quoted string (no expansion; a quote is doubled)."""
    return "'" + value.replace("'", "''") + "'"


def connector_name(domain: str) -> str:
    return f"mxspool {domain}"


def plan(inputs: Inputs) -> list[Step]:
    """The ordered steps for the domain."""
    d = inputs.domain
    spooler = inputs.spooler_host
    target = inputs.target_host or "TARGET-MX-HOST"
    source = inputs.mx_hosts[0] if inputs.mx_hosts else "SOURCE-MX-HOST"
    steps: list[Step] = []

    ttl_text = (
        f"The MX TTL seen in DNS now is {inputs.mx_ttl} s"
        if inputs.mx_ttl is not None
        else f"The MX TTL could not be read now ({inputs.lookup_error or 'no MX record'})"
    )
    wait = max(inputs.mx_ttl or 0, 24 * 3600)
    ttl_ok = inputs.mx_ttl is not None and inputs.mx_ttl <= MAX_TTL
    steps.append(
        Step(
            "ttl",
            "Lower the MX TTL (at least 24 h before the cut-over)",
            [
                f"{ttl_text}; current MX: {', '.join(inputs.mx_hosts) or 'unknown'}.",
                (
                    f"It is already at most {MAX_TTL} s: nothing to change."
                    if ttl_ok
                    else f"Set it to {MAX_TTL} s now, then wait at least {wait // 3600} h "
                    f"({wait} s, the longer of the old TTL and 24 h) before pointing MX at the "
                    "spooler, so no sender still uses the old MX from its cache."
                ),
            ],
            [
                Command(
                    "dns",
                    f"{d}. {MAX_TTL} IN MX 10 {source}.",
                    ("same MX as today, with a TTL of 300 s",),
                )
            ],
        )
    )
    steps.append(
        Step(
            "mta-sts",
            "MTA-STS: list the spooler before MX changes",
            [
                f"If {d} publishes an enforcing MTA-STS policy, senders refuse to deliver to an MX "
                "host it does not list. Add the spooler (and, for the end, the target's MX host) "
                f"to the mx: lines of https://mta-sts.{d}/.well-known/mta-sts.txt and change the "
                f"id in the _mta-sts.{d} TXT record so senders fetch the new policy.",
                "'mxspool check dns' fetches the policy and says NO-GO while it is missing.",
            ],
            [
                Command("dns", f"mx: {spooler}", ("a line of the policy file",)),
                Command("dns", f"mx: {target}", ("for the final step",)),
                Command("mxspool", f"mxspool check dns {d} --spooler {spooler}"),
            ],
        )
    )
    steps.append(
        Step(
            "configure",
            "Configure mxspool with today's route and the recipient list",
            [
                f"Mail keeps flowing to the source tenant ({source}) until the hold. Export the "
                "domain's recipients from the source tenant while it still has the domain; the "
                "spooler then answers 550 5.1.1 at RCPT for anyone else (no backscatter).",
            ],
            [
                Command(
                    "exo-source",
                    "Get-Recipient -ResultSize Unlimited | Select-Object PrimarySmtpAddress, "
                    "@{Name='EmailAddresses';Expression={$_.EmailAddresses -join ';'}} | "
                    f"Export-Csv -Path {_ps(f'recipients-{d}.csv')} -NoTypeInformation "
                    "-Encoding UTF8",
                    (
                        "in the SOURCE tenant: every recipient with its proxy addresses, joined "
                        "with ';' so the CSV holds addresses rather than a type name",
                    ),
                ),
                Command("mxspool", f"mxspool domain add {d} --route {source} --tls verify"),
                Command("mxspool", f"mxspool recipients import {d} recipients-{d}.csv"),
                Command("mxspool", f"mxspool check route {d}"),
                Command("mxspool", f"mxspool probe {d}"),
            ],
        )
    )
    steps.append(_connector_step(inputs))
    if inputs.arc is not None:
        steps.append(_arc_step(inputs.arc))
    steps.append(
        Step(
            "mx-to-spooler",
            "Cut over: point MX at the spooler (relay mode: mail still goes to the source)",
            [
                f"Only once the TTL has been {MAX_TTL} s for long enough (step 1) and MTA-STS "
                "lists the spooler (step 2). 'mxspool check dns' records that MX points at the "
                "spooler; 'mxspool status' shows the mail coming through.",
            ],
            [
                Command("dns", f"{d}. {MAX_TTL} IN MX 10 {spooler}."),
                Command("mxspool", f"mxspool check dns {d} --spooler {spooler}"),
                Command("mxspool", "mxspool status"),
            ],
        )
    )
    steps.append(
        Step(
            "hold",
            "Hold: detach the domain from the source tenant; mail accumulates in the spooler",
            [
                "Hold first, then remove the domain from the source tenant: from then on nothing "
                "is delivered and every message is kept, durably.",
            ],
            [
                Command("mxspool", f"mxspool domain hold {d}"),
                Command("mxspool", f"mxspool probe {d}"),
            ],
        )
    )
    target_text = (
        [f"The target's MX host: {target}."]
        if inputs.target_host
        else [
            "The target's MX host must come from the TARGET tenant once the domain is added "
            f"there: the Microsoft 365 admin center (Settings > Domains > {d} > DNS records, "
            f"the MX record) or Microsoft Graph (GET /v1.0/domains/{d}/"
            "serviceConfigurationRecords, the Mx record's mailExchange). Domains added to "
            "Microsoft 365 from July 2026 get hosts under mx.microsoft that cannot be derived "
            f"from the name; the older form {d.replace('.', '-')}.mail.protection.outlook.com "
            "applies only to domains added before. Replace TARGET-MX-HOST below with it."
        ]
    )
    steps.append(
        Step(
            "reroute",
            "Re-route to the target tenant and check readiness",
            [
                *target_text,
                "Add the domain to the target tenant and create the mailboxes; 'check "
                "recipients' asks the target about every held recipient (RCPT only): "
                "550 5.4.1 usually means the mailbox does not exist there yet.",
            ],
            [
                Command(
                    "mxspool",
                    f"mxspool domain route {d} --route {target} --tls verify "
                    "--profile exchange-online",
                ),
                Command("mxspool", f"mxspool check route {d}"),
                Command("mxspool", f"mxspool check recipients {d}"),
            ],
        )
    )
    steps.append(
        Step(
            "canary",
            "Canary: release one recipient and look at that mailbox",
            ["Release one user's mail and check that it arrived, intact, at the target."],
            [Command("mxspool", f"mxspool domain release {d} --only USER@{d} --wait")],
        )
    )
    steps.append(
        Step(
            "release",
            "Release the backlog, paced",
            ["Oldest first, at the pace given; parked recipients need a decision afterwards."],
            [Command("mxspool", f"mxspool domain release {d} --rate 600/min --wait")],
        )
    )
    steps.append(
        Step(
            "mx-to-target",
            "Point MX at the target; keep relaying until old TTLs expire",
            [
                f"Keep the spooler in relay mode for at least {MAX_TTL} s after the change (24 h "
                "to be safe): senders that cached the spooler's MX still deliver there.",
            ],
            [
                Command("dns", f"{d}. {MAX_TTL} IN MX 0 {target}."),
                Command("mxspool", f"mxspool check dns {d} --spooler {spooler}"),
            ],
        )
    )
    steps.append(
        Step(
            "report",
            "Reconcile and finish",
            ["Prove that every accepted message reached a final state; discard the probes."],
            [
                Command("mxspool", f"mxspool report --domain {d} --check"),
                Command("mxspool", f"mxspool report --domain {d} --format csv"),
                Command("mxspool", f"mxspool probe {d} --discard"),
            ],
        )
    )
    return steps


def _connector_step(inputs: Inputs) -> Step:
    """The target tenant's inbound connector for the spooler, and Enhanced Filtering.

    By IP address (``-SenderIPAddresses``, IPv4 only: which is why the ``exchange-online``
    profile delivers over IPv4, see ``delivery.exchange.address_family``), or, when
    ``[delivery] tls_client_cert`` is set, by the certificate's name
    (``-RestrictDomainsToCertificate $true -TlsSenderCertificateName NAME``; the spooler may
    then send from any address, so Enhanced Filtering skips the last hop instead of a listed
    IP). Parameters as documented for New-InboundConnector / Set-InboundConnector:
    https://learn.microsoft.com/powershell/module/exchange/new-inboundconnector
    """
    d = inputs.domain
    ip = inputs.spooler_ip
    name = connector_name(d)
    cert = inputs.client_cert_name
    who = (
        f"by the name on its TLS client certificate ({cert})"
        if cert
        else f"by its public IPv4 address ({ip})"
    )
    identify = (
        "Set [delivery] source_address to the address that is (or is NATed to) "
        f"{ip}, so every connection leaves from it."
        if not cert
        else "The spooler presents [delivery] tls_client_cert on STARTTLS; 'mxspool check "
        "route' shows it."
    )
    return Step(
        "connector",
        "Target tenant: an inbound connector for the spooler, with Enhanced Filtering",
        [
            "Run in Exchange Online PowerShell connected to the TARGET tenant. The connector "
            f"identifies mail from the spooler {who} as a partner's and requires TLS; "
            "Enhanced Filtering for Connectors makes Exchange Online judge SPF, DKIM, DMARC "
            "and reputation on the original sender's IP, not on the spooler's.",
            identify,
        ],
        [
            Command(
                "exo",
                "Connect-ExchangeOnline",
                ("sign in as an Exchange administrator of the TARGET tenant",),
            ),
            *connector_commands(
                "exo", name, ip, cert, f"mxspool store-and-forward for {d} during the migration"
            ),
        ],
    )


def connector_commands(
    kind: Kind, name: str, ip: str, cert: str | None, purpose: str
) -> list[Command]:
    """Create the inbound connector for the spooler, turn on Enhanced Filtering, show it."""
    comment = f"-Comment {_ps(purpose)} "
    common_why = (
        "-Name: how the connector shows in the admin center",
        "-ConnectorType Partner: the mail comes from a service outside the "
        "organization (the spooler), not from an on-premises server",
        "-SenderDomains '*': the spooler relays mail from any sender domain",
    )
    tail_why = (
        "-RequireTls $true: reject mail from the spooler that is not sent over TLS",
        "-Comment: a note for the next administrator",
        "-Enabled $true: active at once",
    )
    if cert:
        create = Command(
            kind,
            f"New-InboundConnector -Name {_ps(name)} -ConnectorType Partner "
            f"-SenderDomains {_ps('*')} -RequireTls $true "
            f"-RestrictDomainsToCertificate $true -TlsSenderCertificateName {_ps(cert)} "
            f"{comment}-Enabled $true",
            (
                *common_why,
                "-RestrictDomainsToCertificate $true: only mail whose TLS client certificate "
                "matches -TlsSenderCertificateName uses this connector",
                f"-TlsSenderCertificateName: the name on [delivery] tls_client_cert ({cert}); "
                "the spooler presents that certificate on STARTTLS",
                *tail_why,
            ),
        )
        filtering = Command(
            kind,
            f"Set-InboundConnector -Identity {_ps(name)} -EFSkipLastIP $true",
            (
                "Enhanced Filtering for Connectors (skip listing):",
                "-EFSkipLastIP $true: skip the last hop (the spooler, whatever address it "
                "sends from), so SPF and sender reputation are checked against the server that "
                "sent the mail to the spooler",
            ),
        )
        shown = ("TlsSenderCertificateName", "RestrictDomainsToCertificate", "EFSkipLastIP")
    else:
        create = Command(
            kind,
            f"New-InboundConnector -Name {_ps(name)} -ConnectorType Partner "
            f"-SenderDomains {_ps('*')} -SenderIPAddresses {_ps(ip)} "
            "-RestrictDomainsToIPAddresses $false -RequireTls $true "
            f"{comment}-Enabled $true",
            (
                *common_why,
                f"-SenderIPAddresses: the spooler's public IPv4 address ({ip}); this is "
                "how Exchange Online recognises mail that comes through it (IPv4 only: the "
                "exchange-online profile makes the spooler deliver over IPv4)",
                "-RestrictDomainsToIPAddresses $false: with SenderDomains '*', $true "
                "would reject mail from every other IP address",
                *tail_why,
            ),
        )
        filtering = Command(
            kind,
            f"Set-InboundConnector -Identity {_ps(name)} -EFSkipLastIP $false -EFSkipIPs {_ps(ip)}",
            (
                "Enhanced Filtering for Connectors (skip listing):",
                "-EFSkipLastIP $false: skip the addresses listed in -EFSkipIPs (rather "
                "than only the last hop)",
                f"-EFSkipIPs: the spooler ({ip}) is skipped, so SPF and sender reputation "
                "are checked against the server that sent the mail to the spooler",
                "(Alternative: -EFSkipLastIP $true skips only the last hop, whatever its address.)",
            ),
        )
        shown = ("SenderIPAddresses", "EFSkipIPs", "EFSkipLastIP")
    show = Command(
        kind,
        f"Get-InboundConnector -Identity {_ps(name)} | Format-List -Property "
        + ",".join(_ps(prop) for prop in ("Name", "ConnectorType", *shown, "RequireTls")),
        ("show what was set, to check it",),
    )
    return [create, filtering, show]


_FENCE = {
    "dns": "text",
    "exo": "powershell",
    "exo-source": "powershell",
    "graph": "powershell",
    "graph-source": "powershell",
    "mxspool": "sh",
    "shell": "sh",
}
_WHERE = {
    "dns": "DNS",
    "exo": "Exchange Online PowerShell, TARGET tenant",
    "exo-source": "Exchange Online PowerShell, SOURCE tenant",
    "graph": "Microsoft Graph PowerShell, TARGET tenant",
    "graph-source": "Microsoft Graph PowerShell, SOURCE tenant",
    "mxspool": "on the spooler",
    "shell": "any shell",
}


def _header(inputs: Inputs, now: datetime) -> list[str]:
    return [
        f"Migration runbook for {inputs.domain}",
        f"spooler {inputs.spooler_host} ({inputs.spooler_ip}); target MX "
        f"{inputs.target_host or 'not given (see the re-route step)'}; made "
        f"{now.isoformat(timespec='seconds')}",
    ]


def render_markdown(inputs: Inputs, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    title, subtitle = _header(inputs, now)
    return markdown(title, subtitle, plan(inputs))


def markdown(
    title: str, subtitle: str, steps: list[Step], where: dict[str, str] | None = None
) -> str:
    """Numbered steps, each with its explanation, its commands and (when it has them) the
    commands that check it, fenced by where they run."""
    out = [f"# {title}", "", subtitle, ""]
    for number, step in enumerate(steps, start=1):
        out += [f"## {number}. {step.title}", ""]
        for paragraph in step.text:
            out += [paragraph, ""]
        out += _fenced(step.commands, where or _WHERE)
        if step.checks:
            out += ["Check:", ""]
            out += _fenced(step.checks, where or _WHERE)
    return "\n".join(out)


def _fenced(commands: list[Command], where: dict[str, str]) -> list[str]:
    out: list[str] = []
    kind: str | None = None
    for command in commands:
        if command.kind != kind:
            if kind is not None:
                out += ["```", ""]
            kind = command.kind
            out += [f"{where[kind]}:", "", f"```{_FENCE[kind]}"]
        comment = ";" if command.kind == "dns" else "#"
        out += [f"{comment} {why}" for why in command.why]
        out.append(command.text)
    if kind is not None:
        out += ["```", ""]
    return out


def render_ps1(inputs: Inputs, now: datetime | None = None) -> str:
    """A PowerShell script: target-tenant commands live, everything else as comments."""
    now = now or datetime.now(UTC)
    out = [f"# {line}" for line in _header(inputs, now)]
    out += [
        "#",
        "# Run in Exchange Online PowerShell (module ExchangeOnlineManagement). Only the TARGET",
        "# tenant's commands run; DNS changes and mxspool commands are comments, in order.",
        "",
    ]
    for number, step in enumerate(plan(inputs), start=1):
        out += [f"# ==== {number}. {step.title} ===="]
        for paragraph in step.text:
            out += [f"# {line}" for line in _wrap(paragraph)]
        for command in step.commands:
            if command.kind == "exo":
                out += [f"# {why}" for why in command.why]
                out.append(command.text)
            else:
                out.append(f"# {_WHERE[command.kind]}:")
                out += [f"#   ({why})" for why in command.why]
                out.append(f"#   {command.text}")
        out.append("")
    return "\n".join(out)


def _wrap(text: str, width: int = 96) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        lines.append(current)
    return lines


def _arc_step(arc: ArcSealing) -> Step:
    """Publish the sealing key; make the target tenant trust the spooler's ARC seals.

    Set-ArcConfig and Get-ArcConfig, Exchange Online only:
    https://learn.microsoft.com/powershell/module/exchangepowershell/set-arcconfig
    https://learn.microsoft.com/powershell/module/exchangepowershell/get-arcconfig
    -ArcTrustedSealers REPLACES the list (Microsoft's example 2 adds to it this way: read it
    with Get-ArcConfig, append, set); the domain must be the d= of the ARC-Seal (Microsoft 365
    Defender, "Trusted ARC sealers").
    """
    d = _ps(arc.domain)
    key_name = f"{arc.selector}._domainkey.{arc.domain}"
    return Step(
        "arc",
        "Target tenant: trust the spooler's ARC seal",
        [
            "Held mail reaches the target days after it was signed, from the spooler's "
            "address: SPF no longer aligns and short-lived DKIM signatures expire. The spooler "
            "seals each released message with ARC (the verdicts it took at arrival, signed as "
            f"d={arc.domain}); a tenant that trusts that sealer uses them. Publish the key, "
            "then add the sealing domain to the target tenant's trusted ARC sealers (keeping "
            "any already there).",
        ],
        [
            Command("dns", arc.zone_line, ("the ARC sealing key (TXT, strings of <= 255)",)),
            Command("mxspool", f"dig +short TXT {key_name}"),
            Command(
                "exo",
                "$sealers = @((Get-ArcConfig).ArcTrustedSealers -split ',' | "
                "ForEach-Object { $_.Trim() } | Where-Object { $_ })",
                ("the trusted ARC sealers already configured (Set-ArcConfig replaces the list)",),
            ),
            Command(
                "exo",
                f"if ($sealers -notcontains {d}) {{ $sealers += {d} }}",
                (f"add the spooler's sealing domain (the d= of its ARC-Seal): {arc.domain}",),
            ),
            Command(
                "exo",
                "Set-ArcConfig -Identity Default -ArcTrustedSealers $sealers",
                (
                    "-Identity Default: the organization's one ARC configuration",
                    "-ArcTrustedSealers: every trusted sealer, the spooler's included",
                ),
            ),
            Command(
                "exo",
                "Get-ArcConfig | Format-List -Property 'ArcTrustedSealers'",
                (f"check: the list shows {arc.domain}",),
            ),
        ],
    )


# Public names for the tenant-to-tenant runbook (mxspool.migrate.tenantplan).
ps_quote = _ps
wrap = _wrap
arc_step = _arc_step
