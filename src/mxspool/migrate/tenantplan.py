"""The runbook of a tenant-to-tenant move: several domains, the source tenant and the target.

A tenant-to-tenant move has a source half that the single-domain runbook
(:mod:`mxspool.migrate.runbook`) leaves out, and whose omission causes real failures:

- During the relay phase MX points at the spooler while the domains still live in the SOURCE
  tenant, which then receives everything from one new IP address. Without an inbound connector
  and Enhanced Filtering for Connectors there, SPF-only senders whose domain publishes DMARC
  p=reject are refused (550 5.7.509) and the new address is throttled (451 4.7.5xx). Microsoft's
  guidance for a server in front of Exchange Online applies to whichever tenant receives.
- A domain is verified in one tenant at a time: the source tenant must release it (UPNs and
  primary addresses back to its onmicrosoft.com domain, proxy addresses removed, another
  default domain) before the target can verify it. Microsoft checks "already added to a
  different organization" at verification, so the target adds it (unverified) and its MS= TXT
  is published days ahead; Confirm-MgDomain runs in the window, right after the removal.
- More DNS than MX changes: DKIM selector CNAMEs point at the tenant that signs, and the
  MTA-STS policy must list the spooler while MX points at it, and no longer afterwards.

The plan is a list of :class:`~mxspool.migrate.runbook.Step`, each with its commands and the
commands that check it. As PowerShell it is one script with a mandatory ``-Step`` parameter:
each step's tenant commands run only when asked for by name (``.\\runbook.ps1 -Step
source-connector``), after connecting to that step's tenant and checking it is the right one,
because its steps are days apart and some cannot be undone. Every cmdlet and parameter comes
from :mod:`mxspool.migrate.cmdlets`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from mxspool.migrate.runbook import (
    MAX_TTL,
    ArcSealing,
    Command,
    Kind,
    Step,
    connector_commands,
    markdown,
)
from mxspool.migrate.runbook import arc_step as _arc_step
from mxspool.migrate.runbook import ps_quote as _ps
from mxspool.migrate.runbook import wrap as _wrap

MAX_DOMAINS = 200
"""A tenant holds at most a few hundred domains; the runbook repeats commands per domain."""

_TENANT_KINDS: dict[Kind, str] = {
    "exo": "target",
    "graph": "target",
    "exo-source": "source",
    "graph-source": "source",
}


@dataclass(frozen=True, slots=True)
class DomainNow:
    """One domain as DNS shows it now."""

    name: str
    mx_hosts: tuple[str, ...] = ()
    mx_ttl: int | None = None
    lookup_error: str = ""
    target_host: str | None = None

    @property
    def source_host(self) -> str:
        return self.mx_hosts[0] if self.mx_hosts else "SOURCE-MX-HOST"

    @property
    def target(self) -> str:
        return self.target_host or "TARGET-MX-HOST"


@dataclass(frozen=True, slots=True)
class Migration:
    domains: tuple[DomainNow, ...]
    spooler_host: str
    spooler_ip: str
    source_tenant: str = "source"
    target_tenant: str = "target"
    source_initial: str | None = None
    """The source tenant's initial domain (NAME.onmicrosoft.com)."""
    target_initial: str | None = None
    client_cert_name: str | None = None
    arc: ArcSealing | None = None
    name: str | None = None
    """The migration's name (engineer A's ``migration`` object), for the title."""

    @property
    def source_onms(self) -> str:
        return self.source_initial or "SOURCE-TENANT.onmicrosoft.com"

    @property
    def target_onms(self) -> str:
        return self.target_initial or "TARGET-TENANT.onmicrosoft.com"

    @property
    def connector(self) -> str:
        return f"mxspool {self.spooler_host}"


def _like(domain: str) -> str:
    """The OPATH filter for every recipient with an address in the domain."""
    return f"\"EmailAddresses -like '*@{domain}'\""


def plan(m: Migration) -> list[Step]:
    """The ordered steps, from days before the cut-over to the clean-up."""
    steps = [
        _ttl(m),
        _target_add(m),
        _mta_sts_add(m),
        _configure(m),
        _connector(m, "source"),
        _connector(m, "target"),
    ]
    if m.arc is not None:
        steps.append(_arc_step(m.arc))
    steps += [
        _mx_to_spooler(m),
        _hold(m),
        _source_release(m),
        _source_remove(m),
        _target_attach(m),
        _target_dkim_keys(m),
        _reroute(m),
        _canary_release(m),
        _target_dkim_enable(m),
        _dns_to_target(m),
        _cleanup_source(m),
        _relay_until_ttl(m),
        _mta_sts_remove(m),
        _cleanup_target(m),
        _finish(m),
    ]
    return steps


# -- days before ---------------------------------------------------------------------------


def _ttl(m: Migration) -> Step:
    lines, records, checks = [], [], []
    for d in m.domains:
        seen = f"{d.mx_ttl} s" if d.mx_ttl is not None else f"unknown ({d.lookup_error or 'no MX'})"
        lines.append(f"{d.name}: MX {', '.join(d.mx_hosts) or 'unknown'}, TTL {seen}.")
        records.append(Command("dns", f"{d.name}. {MAX_TTL} IN MX 10 {d.source_host}."))
        checks.append(Command("shell", f"dig +noall +answer MX {d.name}"))
    wait = max([d.mx_ttl or 0 for d in m.domains] + [24 * 3600])
    return Step(
        "ttl",
        "Days before: lower the MX TTL of every domain",
        [
            *lines,
            f"Set every MX TTL to {MAX_TTL} s now and wait at least {wait // 3600} h (the "
            "longer of the old TTL and 24 h) before pointing MX at the spooler.",
        ],
        records,
        checks,
    )


def _target_add(m: Migration) -> Step:
    commands = [_graph_connect(m, "graph", "Domain.ReadWrite.All")]
    dns, checks = [], []
    for d in m.domains:
        name = _ps(d.name)
        commands += [
            Command("graph", f"New-MgDomain -Id {name}", (f"add {d.name}, unverified",)),
            Command(
                "graph",
                f"Get-MgDomainVerificationDnsRecord -DomainId {name} | "
                "Where-Object { $_.RecordType -eq 'Txt' } | "
                "ForEach-Object { $_.AdditionalProperties['text'] }",
                ("the MS=ms... value to publish",),
            ),
        ]
        dns.append(Command("dns", f'{d.name}. 3600 IN TXT "MS=msXXXXXXXX"', ("the value above",)))
        checks.append(Command("shell", f"dig +short TXT {d.name}"))
    return Step(
        "target-add",
        f"Days before: add the domains to the TARGET tenant ({m.target_tenant}) and publish "
        "their verification TXT",
        [
            "A domain is verified in one tenant at a time. Microsoft refuses the verification "
            '("already added to a different Microsoft 365 organization") while the source '
            "tenant still has it, so it cannot be verified now; but it can be added, unverified, "
            "and its MS= TXT published now, next to the source tenant's own (TXT records "
            "coexist). Verification (Confirm-MgDomain) happens in the window, right after the "
            "source tenant removed it. (Microsoft 365 admin center: Settings > Domains > Add "
            "domain, stop at the verification page.)",
            "If New-MgDomain is refused here, add the domain in the window instead, right after "
            "the removal, and publish its TXT then (the TTL is low by then).",
        ],
        [*commands, *dns],
        checks,
    )


def _mta_sts_add(m: Migration) -> Step:
    now = datetime.now(UTC)
    commands, checks = [], []
    for d in m.domains:
        commands += [
            Command("dns", f"mx: {d.source_host}", (f"policy of {d.name}: keep today's MX",)),
            Command("dns", f"mx: {m.spooler_host}", ("add the spooler",)),
            Command("dns", f"mx: {d.target}", ("add the target, for the end",)),
            Command(
                "dns",
                f'_mta-sts.{d.name}. 300 IN TXT "v=STSv1; id={now:%Y%m%d}a"',
                ("a new id, so senders fetch the new policy",),
            ),
        ]
        checks += [
            Command("shell", f"curl -s https://mta-sts.{d.name}/.well-known/mta-sts.txt"),
            Command("mxspool", f"mxspool check dns {d.name} --spooler {m.spooler_host}"),
        ]
    return Step(
        "mta-sts-add",
        "Days before: MTA-STS lists the spooler before MX changes",
        [
            "For every domain that publishes an MTA-STS policy: add the spooler (and the "
            "target's MX host) to the mx: lines of https://mta-sts.DOMAIN/.well-known/"
            "mta-sts.txt, then change the id in its _mta-sts TXT record. Senders that enforce "
            "the policy refuse an MX host it does not list. Wait the policy's max_age before "
            "the MX change if you can; 'mxspool check dns' says NO-GO while the spooler is "
            "missing. Domains without a policy: nothing to do.",
        ],
        commands,
        checks,
    )


def _configure(m: Migration) -> Step:
    commands: list[Command] = [_exo_connect(m, "exo-source")]
    spooler: list[Command] = []
    for d in m.domains:
        commands.append(
            Command(
                "exo-source",
                f"Get-Recipient -ResultSize Unlimited -Filter {_like(d.name)} | "
                "Select-Object -Property 'PrimarySmtpAddress', "
                "@{ Name = 'EmailAddresses'; Expression = { $_.EmailAddresses -join ';' } } | "
                f"Export-Csv -Path {_ps(f'recipients-{d.name}.csv')} -NoTypeInformation "
                "-Encoding UTF8",
                (f"every recipient with an address in {d.name}, with its proxy addresses",),
            )
        )
        spooler += [
            Command(
                "mxspool",
                f"mxspool domain add {d.name} --route {d.source_host} --tls verify "
                "--profile exchange-online",
            ),
            Command("mxspool", f"mxspool recipients import {d.name} recipients-{d.name}.csv"),
        ]
    return Step(
        "configure",
        "Days before: configure mxspool to relay to the SOURCE tenant, with the recipients",
        [
            f"Export each domain's recipients from the SOURCE tenant ({m.source_tenant}) while "
            "it still has the domains; the spooler answers 550 5.1.1 at RCPT for anyone else. "
            "Each domain routes to the source tenant's MX host with the exchange-online profile "
            "(IPv4, Exchange Online's pacing) during the relay phase.",
        ],
        [*commands, *spooler],
        [
            *(Command("mxspool", f"mxspool check route {d.name}") for d in m.domains),
            *(Command("mxspool", f"mxspool probe {d.name}") for d in m.domains),
        ],
    )


def _connector(m: Migration, side: str) -> Step:
    kind: Kind = "exo-source" if side == "source" else "exo"
    label = m.source_tenant if side == "source" else m.target_tenant
    cert = m.client_cert_name
    who = f"the name on its TLS client certificate ({cert})" if cert else f"its IP ({m.spooler_ip})"
    why = (
        "During the relay phase MX points at the spooler while the domains are still in the "
        "SOURCE tenant: without this connector the source tenant sees all their mail come from "
        "one new IP address, refuses SPF-only senders whose domain has DMARC p=reject (550 "
        "5.7.509) and throttles the new address (451 4.7.5xx)."
        if side == "source"
        else "After the re-route the spooler delivers the held mail to the TARGET tenant; the "
        "same connector and Enhanced Filtering are needed there, before the first release."
    )
    commands = [
        _exo_connect(m, kind),
        *connector_commands(
            kind, m.connector, m.spooler_ip, cert, f"mxspool relay ({m.spooler_host}), migration"
        ),
    ]
    return Step(
        f"{side}-connector",
        f"Days before: {side.upper()} tenant ({label}): an inbound connector for the spooler, "
        "with Enhanced Filtering",
        [
            why,
            f"The connector recognises the spooler by {who} and requires TLS; Enhanced "
            "Filtering for Connectors makes Exchange Online judge SPF, DKIM, DMARC and "
            "reputation on the sender's own IP address.",
        ],
        commands[:-1],
        [commands[-1]],
    )


# -- relay phase and cut-over --------------------------------------------------------------


def _mx_to_spooler(m: Migration) -> Step:
    return Step(
        "mx-to-spooler",
        "Relay phase: point MX at the spooler (mail still goes to the SOURCE tenant)",
        [
            f"Only once the TTL has been {MAX_TTL} s long enough, the MTA-STS policies list the "
            "spooler, and the SOURCE tenant has its connector.",
        ],
        [Command("dns", f"{d.name}. {MAX_TTL} IN MX 10 {m.spooler_host}.") for d in m.domains],
        [
            *(
                Command("mxspool", f"mxspool check dns {d.name} --spooler {m.spooler_host}")
                for d in m.domains
            ),
            Command("mxspool", "mxspool status"),
        ],
    )


def _hold(m: Migration) -> Step:
    return Step(
        "hold",
        "Cut-over: hold every domain; mail accumulates in the spooler",
        ["Hold first: from then on nothing is delivered, and every message is kept, durably."],
        [Command("mxspool", f"mxspool domain hold {d.name}") for d in m.domains],
        [Command("mxspool", "mxspool status")],
    )


_RECIPIENT_KINDS = ("Mailbox", "MailUser", "DistributionGroup", "UnifiedGroup", "MailPublicFolder")


def _source_release(m: Migration) -> Step:
    onms = m.source_onms
    commands = [
        _exo_connect(m, "exo-source"),
        _graph_connect(m, "graph-source", "User.ReadWrite.All", "Domain.ReadWrite.All"),
    ]
    for d in m.domains:
        name, like = _ps(d.name), _like(d.name)
        commands.append(
            Command(
                "graph-source",
                f"foreach ($u in @(Get-MgUser -All -Filter \"endsWith(userPrincipalName,'@"
                f"{d.name}')\" -ConsistencyLevel eventual -CountVariable 'found' -Property "
                "'Id','UserPrincipalName')) {\n"
                f"    Update-MgUser -UserId $u.Id -UserPrincipalName "
                f"(($u.UserPrincipalName -split '@')[0] + {_ps('@' + onms)})\n}}",
                (f"UPNs in {d.name} back to {onms} (first: sign-in names, then addresses)",),
            )
        )
        for kind in _RECIPIENT_KINDS:
            primary = "PrimarySmtpAddress" if kind == "UnifiedGroup" else "WindowsEmailAddress"
            commands.append(
                Command(
                    "exo-source",
                    f"foreach ($r in @(Get-{kind} -ResultSize Unlimited -Filter {like})) {{\n"
                    f"    if ($r.PrimarySmtpAddress -like {_ps('*@' + d.name)}) {{ Set-{kind} "
                    f"-Identity $r.Identity -{primary} ($r.Alias + {_ps('@' + onms)}) }}\n"
                    f"    Set-{kind} -Identity $r.Identity -EmailAddresses @{{Remove = "
                    f"@($r.EmailAddresses | Where-Object {{ $_ -like {_ps('smtp:*@' + d.name)} "
                    "} | ForEach-Object { $_.Substring(5) })}\n}",
                    (f"{kind}: primary address to {onms}, then every {d.name} address removed",),
                )
            )
        commands.append(
            Command(
                "graph-source",
                f"if ((Get-MgDomain -DomainId {name}).IsDefault) {{ Update-MgDomain -DomainId "
                f"{_ps(onms)} -IsDefault }}",
                (f"{d.name} must not be the default domain",),
            )
        )
    checks: list[Command] = []
    for d in m.domains:
        checks += [
            Command(
                "exo-source",
                f"Get-Recipient -ResultSize Unlimited -Filter {_like(d.name)} | Format-Table "
                "-Property 'Name','RecipientTypeDetails','PrimarySmtpAddress'",
                (f"nothing left with an address in {d.name} (mail contacts: change or delete)",),
            ),
            Command(
                "exo-source",
                f"Get-MailContact -ResultSize Unlimited -Filter {_like(d.name)} | Format-Table "
                "-Property 'Name','ExternalEmailAddress'",
                ("mail contacts in the domain: change or delete them by hand",),
            ),
            Command(
                "graph-source",
                f"Get-MgDomainNameReference -DomainId {_ps(d.name)} -All | Format-Table "
                "-Property 'Id'",
                ("no user, group or application still refers to the domain",),
            ),
        ]
    return Step(
        "source-release",
        f"Cut-over: SOURCE tenant ({m.source_tenant}): release the domains",
        [
            "Microsoft 365 removes a domain only when it is not the default domain and no user, "
            "shared or resource mailbox, contact, group, team or admin sign-in uses it. Sign in "
            f"with an administrator whose own name is in {onms}, not in a moving domain. "
            "Directory synchronization (Entra Connect) must be off for these objects, or it "
            "writes the addresses back.",
            "Each recipient's primary address goes back to alias@onmicrosoft and every address "
            "in the domain is removed; mail contacts whose external address is in the domain, "
            "dynamic groups and applications (Get-MgDomainNameReference lists them) are handled "
            "by hand.",
        ],
        commands,
        checks,
    )


def _source_remove(m: Migration) -> Step:
    commands = [_graph_connect(m, "graph-source", "Domain.ReadWrite.All")]
    commands += [
        Command("graph-source", f"Remove-MgDomain -DomainId {_ps(d.name)}") for d in m.domains
    ]
    return Step(
        "source-remove",
        f"Cut-over: SOURCE tenant ({m.source_tenant}): remove the domains",
        [
            "Once the checks above are empty (replication can take minutes, or hours with many "
            "objects). A refusal names what still uses the domain.",
        ],
        commands,
        [
            Command(
                "graph-source",
                "Get-MgDomain | Format-Table -Property 'Id','IsDefault','IsVerified'",
                ("the moved domains are gone",),
            )
        ],
    )


def _target_attach(m: Migration) -> Step:
    commands = [_graph_connect(m, "graph", "Domain.ReadWrite.All")]
    checks: list[Command] = [_exo_connect(m, "exo")]
    for d in m.domains:
        name = _ps(d.name)
        commands += [
            Command("graph", f"Confirm-MgDomain -DomainId {name}", (f"verify {d.name}",)),
            Command(
                "graph",
                f"Update-MgDomain -DomainId {name} -SupportedServices 'Email'",
                ("use it for Exchange Online (verification alone does not)",),
            ),
            Command(
                "graph",
                f"Get-MgDomainServiceConfigurationRecord -DomainId {name} | "
                "Where-Object { $_.RecordType -eq 'Mx' } | "
                "ForEach-Object { $_.AdditionalProperties['mailExchange'] }",
                (f"the target MX host of {d.name} (TARGET-MX-HOST below)",),
            ),
        ]
        checks.append(
            Command(
                "exo",
                f"Get-AcceptedDomain -Identity {name} | Format-List -Property "
                "'DomainName','DomainType'",
                (f"{d.name} is an accepted domain of the target (Authoritative)",),
            )
        )
    return Step(
        "target-attach",
        f"Cut-over: TARGET tenant ({m.target_tenant}): verify the domains",
        [
            "Right after the removal. Then give the target mailboxes their addresses in the "
            "moved domains (your migration tool or mapping file). Microsoft 365 admin center: "
            "Settings > Domains > the domain > Continue setup (Exchange) does the same as "
            "-SupportedServices 'Email'. Domains added from July 2026 get MX hosts under "
            "mx.microsoft: take the host from the command, do not derive it.",
        ],
        commands,
        checks,
    )


def _target_dkim_keys(m: Migration) -> Step:
    commands = [_exo_connect(m, "exo")]
    dns: list[Command] = []
    prefix = m.target_onms.split(".")[0]
    for d in m.domains:
        dashed = d.name.replace(".", "-")
        commands += [
            Command(
                "exo",
                f"New-DkimSigningConfig -DomainName {_ps(d.name)} -Enabled $false",
                ("create the keys; signing starts once the CNAMEs are published",),
            ),
            Command(
                "exo",
                f"Get-DkimSigningConfig -Identity {_ps(d.name)} | Format-List -Property "
                "'Selector1CNAME','Selector2CNAME'",
                ("the CNAME targets to publish",),
            ),
        ]
        for n in (1, 2):
            dns.append(
                Command(
                    "dns",
                    f"selector{n}._domainkey.{d.name}. 3600 IN CNAME SELECTOR{n}CNAME.",
                    (
                        f"Selector{n}CNAME from above: selector{n}-{dashed}._domainkey."
                        f"{prefix}.<x>-v1.dkim.mail.microsoft for domains added since May "
                        f"2025 (formerly selector{n}-{dashed}._domainkey.{m.target_onms}), "
                        "the TARGET tenant's, replacing the source tenant's",
                    ),
                )
            )
    return Step(
        "target-dkim-keys",
        f"Cut-over: TARGET tenant ({m.target_tenant}): DKIM keys, and their CNAMEs in DNS",
        [
            "The selector1/selector2._domainkey CNAMEs point at the tenant that signs: until "
            "they are changed, mail the target signs for the domain fails DKIM. DMARC stays as "
            "it is.",
        ],
        [*commands, *dns],
        [Command("shell", f"dig +short CNAME selector1._domainkey.{d.name}") for d in m.domains],
    )


def _reroute(m: Migration) -> Step:
    commands, checks = [], []
    for d in m.domains:
        commands.append(
            Command(
                "mxspool",
                f"mxspool domain route {d.name} --route {d.target} --tls verify "
                "--profile exchange-online",
            )
        )
        checks += [
            Command("mxspool", f"mxspool check route {d.name}"),
            Command("mxspool", f"mxspool check recipients {d.name}"),
        ]
    return Step(
        "reroute",
        "Cut-over: re-route every domain to the TARGET tenant and check readiness",
        [
            "'check recipients' asks the target about every held recipient (RCPT only): "
            "550 5.4.1 usually means the mailbox or its address does not exist there yet.",
        ],
        commands,
        checks,
    )


def _canary_release(m: Migration) -> Step:
    commands = [
        Command("mxspool", f"mxspool domain release {d.name} --only USER@{d.name} --wait")
        for d in m.domains
    ]
    commands += [
        Command("mxspool", f"mxspool domain release {d.name} --rate 600/min --wait")
        for d in m.domains
    ]
    return Step(
        "release",
        "Cut-over: canary, then release the backlog, paced",
        [
            "Release one user's mail per domain and look at that mailbox in the target; then "
            "the rest, oldest first. Parked recipients need a decision afterwards.",
        ],
        commands,
        [Command("mxspool", f"mxspool report --domain {d.name} --check") for d in m.domains],
    )


def _target_dkim_enable(m: Migration) -> Step:
    return Step(
        "target-dkim-enable",
        f"TARGET tenant ({m.target_tenant}): turn DKIM signing on",
        ["Once the CNAMEs resolve (the check of the DKIM keys step)."],
        [_exo_connect(m, "exo")]
        + [
            Command("exo", f"Set-DkimSigningConfig -Identity {_ps(d.name)} -Enabled $true")
            for d in m.domains
        ],
        [
            Command(
                "exo",
                f"Get-DkimSigningConfig -Identity {_ps(d.name)} | Format-List -Property "
                "'Enabled','Status'",
            )
            for d in m.domains
        ],
    )


def _dns_to_target(m: Migration) -> Step:
    commands: list[Command] = []
    checks: list[Command] = []
    for d in m.domains:
        commands += [
            Command("dns", f"{d.name}. {MAX_TTL} IN MX 0 {d.target}."),
            Command(
                "dns",
                f"autodiscover.{d.name}. 3600 IN CNAME autodiscover.outlook.com.",
                ("the same for every tenant: unchanged if it already is",),
            ),
        ]
        checks += [
            Command("mxspool", f"mxspool check dns {d.name} --spooler {m.spooler_host}"),
            Command("shell", f"dig +short TXT {d.name}"),
            Command("shell", f"dig +short TXT _dmarc.{d.name}"),
        ]
    return Step(
        "dns-to-target",
        "DNS: point MX at the TARGET tenant; SPF, autodiscover, DMARC",
        [
            "SPF: include:spf.protection.outlook.com covers every tenant and stays; remove what "
            "only the source tenant used (its on-premises relays' ip4:, services that sent as "
            "the domain for it) and add what the target needs. DMARC does not change. "
            "MTA-STS keeps listing the spooler for now: some senders still have its MX cached.",
        ],
        commands,
        checks,
    )


# -- clean-up ------------------------------------------------------------------------------


def _remove_connector(m: Migration, kind: Kind) -> list[Command]:
    return [
        _exo_connect(m, kind),
        Command(
            kind,
            f"Remove-InboundConnector -Identity {_ps(m.connector)} -Confirm:$false",
            ("the connector and its Enhanced Filtering skip list (EFSkipIPs) go with it",),
        ),
    ]


def _connector_list(kind: Kind) -> Command:
    return Command(
        kind,
        "Get-InboundConnector | Format-Table -Property 'Name','EFSkipIPs','EFSkipLastIP'",
        ("no connector for the spooler is left",),
    )


def _cleanup_source(m: Migration) -> Step:
    return Step(
        "source-cleanup",
        f"Clean-up: SOURCE tenant ({m.source_tenant}): remove the spooler's connector",
        ["Since the re-route the spooler no longer delivers to the source tenant."],
        _remove_connector(m, "exo-source"),
        [_connector_list("exo-source")],
    )


def _relay_until_ttl(m: Migration) -> Step:
    return Step(
        "relay-ttl",
        "Clean-up: keep the spooler relaying until the old MX TTL has expired",
        [
            f"Senders that cached the spooler's MX (TTL {MAX_TTL} s; 24 h to be safe) still "
            "deliver there; the spooler relays to the target meanwhile. Stop only when "
            "'mxspool status' shows no new mail for the domains.",
        ],
        [],
        [Command("mxspool", "mxspool status")],
    )


def _mta_sts_remove(m: Migration) -> Step:
    now = datetime.now(UTC)
    commands: list[Command] = []
    for d in m.domains:
        commands += [
            Command("dns", f"mx: {d.target}", (f"policy of {d.name}: the target only",)),
            Command("dns", f'_mta-sts.{d.name}. 3600 IN TXT "v=STSv1; id={now:%Y%m%d}b"'),
        ]
    return Step(
        "mta-sts-remove",
        "Clean-up: MTA-STS no longer lists the spooler (nor the source's MX)",
        ["Remove the spooler's and the source tenant's mx: lines; change the id again."],
        commands,
        [
            Command("shell", f"curl -s https://mta-sts.{d.name}/.well-known/mta-sts.txt")
            for d in m.domains
        ],
    )


def _cleanup_target(m: Migration) -> Step:
    return Step(
        "target-cleanup",
        f"Clean-up: TARGET tenant ({m.target_tenant}): remove the spooler's connector",
        [
            "Only after the relay period: until then the spooler still delivers there. The "
            "spooler's ARC sealer (if trusted) may stay or go: it seals nothing any more.",
        ],
        _remove_connector(m, "exo"),
        [_connector_list("exo")],
    )


def _finish(m: Migration) -> Step:
    commands: list[Command] = []
    for d in m.domains:
        commands += [
            Command("dns", f"{d.name}. 3600 IN MX 0 {d.target}.", ("TTL back up",)),
            Command("mxspool", f"mxspool report --domain {d.name} --format csv"),
            Command("mxspool", f"mxspool probe {d.name} --discard"),
        ]
    return Step(
        "finish",
        "Clean-up: TTLs back up, reconcile",
        ["Prove that every accepted message reached a final state; keep the reports."],
        commands,
        [Command("mxspool", f"mxspool report --domain {d.name} --check") for d in m.domains],
    )


# -- connecting ----------------------------------------------------------------------------


def _exo_connect(m: Migration, kind: Kind) -> Command:
    side = _TENANT_KINDS[kind]
    initial = m.source_onms if side == "source" else m.target_onms
    return Command(
        kind,
        f"Connect-ExchangeOnline -ShowBanner:$false\nGet-AcceptedDomain -Identity {_ps(initial)} "
        "| Format-List -Property 'DomainName'",
        (
            f"sign in as an Exchange administrator of the {side.upper()} tenant; the check "
            f"stops the script if this tenant does not hold {initial}",
        ),
    )


def _graph_connect(m: Migration, kind: Kind, *scopes: str) -> Command:
    side = _TENANT_KINDS[kind]
    initial = m.source_onms if side == "source" else m.target_onms
    return Command(
        kind,
        f"Connect-MgGraph -TenantId {_ps(initial)} -Scopes "
        + ",".join(_ps(s) for s in scopes)
        + " -NoWelcome",
        (f"sign in to the {side.upper()} tenant ({initial})",),
    )


# -- rendering -----------------------------------------------------------------------------


def _where(m: Migration) -> dict[str, str]:
    s, t = m.source_tenant, m.target_tenant
    return {
        "dns": "DNS",
        "exo": f"Exchange Online PowerShell, TARGET tenant ({t})",
        "exo-source": f"Exchange Online PowerShell, SOURCE tenant ({s})",
        "graph": f"Microsoft Graph PowerShell, TARGET tenant ({t})",
        "graph-source": f"Microsoft Graph PowerShell, SOURCE tenant ({s})",
        "mxspool": "on the spooler",
        "shell": "any shell",
    }


def _header(m: Migration, now: datetime) -> tuple[str, str]:
    names = ", ".join(d.name for d in m.domains)
    what = f"migration {m.name} ({names})" if m.name else names
    return (
        f"Tenant-to-tenant runbook for {what}",
        f"from {m.source_tenant} ({m.source_onms}) to {m.target_tenant} ({m.target_onms}); "
        f"spooler {m.spooler_host} ({m.spooler_ip}); made {now.isoformat(timespec='seconds')}",
    )


def render_markdown(m: Migration, now: datetime | None = None) -> str:
    title, subtitle = _header(m, now or datetime.now(UTC))
    return markdown(title, subtitle, plan(m), _where(m))


def render_ps1(m: Migration, now: datetime | None = None) -> str:
    """One script; each step's tenant commands run only with ``-Step KEY``."""
    steps = plan(m)
    where = _where(m)
    live = [step for step in steps if any(c.kind in _TENANT_KINDS for c in step.commands)]
    out = [f"# {line}" for line in _header(m, now or datetime.now(UTC))]
    out += [
        "#",
        "# Run one step at a time, on its day, in PowerShell 7 with the ExchangeOnlineManagement",
        "# and Microsoft.Graph modules:  ./runbook.ps1 -Step KEY",
        "# Every step first connects to its tenant and stops if it is the wrong one. DNS and",
        "# mxspool commands are comments, in order. Keys: " + ", ".join(step.key for step in live),
        "param(",
        "    [Parameter(Mandatory = $true)]",
        "    [ValidateSet(" + ", ".join(_ps(step.key) for step in live) + ")]",
        "    [string]$Step",
        ")",
        "$ErrorActionPreference = 'Stop'",
        "",
    ]
    for number, step in enumerate(steps, start=1):
        out.append(f"# ==== {number}. {step.title} ====")
        for paragraph in step.text:
            out += [f"# {line}" for line in _wrap(paragraph)]
        tenants = {_TENANT_KINDS[c.kind] for c in step.commands if c.kind in _TENANT_KINDS}
        if len(tenants) > 1:
            raise ValueError(f"step {step.key} mixes the two tenants")
        if step in live:
            out.append(f"if ($Step -eq {_ps(step.key)}) {{")
        indent = "    " if step in live else ""
        out += _ps1_commands(step.commands, where, indent)
        if step.checks:
            out.append(f"{indent}# -- check")
            out += _ps1_commands(step.checks, where, indent, live=step in live)
        if step in live:
            out.append("}")
        out.append("")
    return "\n".join(out)


def _ps1_commands(
    commands: list[Command], where: dict[str, str], indent: str, *, live: bool = True
) -> list[str]:
    out: list[str] = []
    for command in commands:
        if command.kind in _TENANT_KINDS and live:
            out += [f"{indent}# {why}" for why in command.why]
            out += [f"{indent}{line}" for line in command.text.splitlines()]
        else:
            out.append(f"{indent}# {where[command.kind]}:")
            out += [f"{indent}#   ({why})" for why in command.why]
            out += [f"{indent}#   {line}" for line in command.text.splitlines()]
    return out
