"""The PowerShell cmdlets the runbooks may emit, each with the parameters it may be given.

A runbook line an administrator pastes into a tenant must not fail on a misspelt or invented
parameter, in the middle of a cut-over. So every cmdlet and parameter the runbooks
(:mod:`mxspool.migrate.runbook`, :mod:`mxspool.migrate.tenantplan`) write is listed here with
the Microsoft Learn page that documents it; a test parses the generated ``.ps1`` with a
PowerShell grammar and fails on any command or parameter not on this list.

``verified`` records how each entry was checked when it was written: ``"learn-source"``
against the Markdown source of the Learn page (MicrosoftDocs/office-docs-powershell,
MicrosoftDocs/microsoftgraph-docs-powershell), ``"learn"`` against the rendered Learn page's
syntax block, ``"builtin"`` for PowerShell's own cmdlets (Microsoft.PowerShell.Utility/Core),
whose parameters used here are the long-standing basic ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Verified = Literal["learn-source", "learn", "builtin"]

COMMON = frozenset({"ErrorAction"})
"""PowerShell's common parameters the runbooks use (accepted by every cmdlet)."""

_EXO = "https://learn.microsoft.com/powershell/module/exchangepowershell/"
_DIRECTORY = (
    "https://learn.microsoft.com/powershell/module/microsoft.graph.identity.directorymanagement/"
)
_USERS = "https://learn.microsoft.com/powershell/module/microsoft.graph.users/"
_AUTH = "https://learn.microsoft.com/powershell/module/microsoft.graph.authentication/"
_UTILITY = "https://learn.microsoft.com/powershell/module/microsoft.powershell.utility/"
_CORE = "https://learn.microsoft.com/powershell/module/microsoft.powershell.core/"


@dataclass(frozen=True, slots=True)
class Cmdlet:
    parameters: frozenset[str]
    url: str
    verified: Verified


def _exo(name: str, *parameters: str) -> tuple[str, Cmdlet]:
    return name, Cmdlet(frozenset(parameters), _EXO + name.lower(), "learn-source")


def _graph(base: str, name: str, verified: Verified, *parameters: str) -> tuple[str, Cmdlet]:
    return name, Cmdlet(frozenset(parameters), base + name.lower(), verified)


def _builtin(base: str, name: str, *parameters: str) -> tuple[str, Cmdlet]:
    return name, Cmdlet(frozenset(parameters), base + name.lower(), "builtin")


_CONNECTOR = (
    "Name", "ConnectorType", "SenderDomains", "SenderIPAddresses", "RequireTls",
    "RestrictDomainsToIPAddresses", "RestrictDomainsToCertificate", "TlsSenderCertificateName",
    "Comment", "Enabled", "EFSkipIPs", "EFSkipLastIP",
)  # fmt: skip
_USER_QUERY = ("Filter", "ConsistencyLevel", "CountVariable", "All", "Property")
_DOMAIN_UPDATE = ("DomainId", "IsDefault", "SupportedServices")
_RECIPIENT_GET = ("Identity", "ResultSize", "Filter")
_RECIPIENT_SET = ("Identity", "EmailAddresses")

CMDLETS: dict[str, Cmdlet] = dict(
    [
        # Exchange Online PowerShell (module ExchangeOnlineManagement).
        _exo("Connect-ExchangeOnline", "ShowBanner"),
        _exo("Disconnect-ExchangeOnline", "Confirm"),
        _exo("New-InboundConnector", *_CONNECTOR),
        _exo("Set-InboundConnector", "Identity", *_CONNECTOR),
        _exo("Get-InboundConnector", "Identity"),
        _exo("Remove-InboundConnector", "Identity", "Confirm"),
        _exo("Get-ArcConfig"),
        _exo("Set-ArcConfig", "Identity", "ArcTrustedSealers"),
        _exo("Get-AcceptedDomain", "Identity"),
        _exo("Get-Recipient", *_RECIPIENT_GET),
        _exo("Get-Mailbox", *_RECIPIENT_GET),
        _exo("Set-Mailbox", *_RECIPIENT_SET, "WindowsEmailAddress"),
        _exo("Get-MailUser", *_RECIPIENT_GET),
        _exo("Set-MailUser", *_RECIPIENT_SET, "WindowsEmailAddress"),
        _exo("Get-MailContact", *_RECIPIENT_GET),
        _exo("Get-DistributionGroup", *_RECIPIENT_GET),
        _exo("Set-DistributionGroup", *_RECIPIENT_SET, "WindowsEmailAddress"),
        _exo("Get-UnifiedGroup", *_RECIPIENT_GET),
        _exo("Set-UnifiedGroup", *_RECIPIENT_SET, "PrimarySmtpAddress"),
        _exo("Get-MailPublicFolder", *_RECIPIENT_GET),
        _exo("Set-MailPublicFolder", *_RECIPIENT_SET, "WindowsEmailAddress"),
        _exo("New-DkimSigningConfig", "DomainName", "Enabled"),
        _exo("Set-DkimSigningConfig", "Identity", "Enabled"),
        _exo("Get-DkimSigningConfig", "Identity"),
        # Microsoft Graph PowerShell (modules Microsoft.Graph.*).
        _graph(_AUTH, "Connect-MgGraph", "learn-source", "TenantId", "Scopes", "NoWelcome"),
        _graph(_DIRECTORY, "New-MgDomain", "learn-source", "Id"),
        _graph(_DIRECTORY, "Get-MgDomain", "learn", "DomainId"),
        _graph(_DIRECTORY, "Update-MgDomain", "learn", *_DOMAIN_UPDATE),
        _graph(_DIRECTORY, "Remove-MgDomain", "learn-source", "DomainId"),
        _graph(_DIRECTORY, "Confirm-MgDomain", "learn", "DomainId"),
        _graph(_DIRECTORY, "Get-MgDomainVerificationDnsRecord", "learn", "DomainId"),
        _graph(_DIRECTORY, "Get-MgDomainServiceConfigurationRecord", "learn", "DomainId"),
        _graph(_DIRECTORY, "Get-MgDomainNameReference", "learn-source", "DomainId", "All"),
        _graph(_USERS, "Get-MgUser", "learn", *_USER_QUERY),
        _graph(_USERS, "Update-MgUser", "learn", "UserId", "UserPrincipalName"),
        # PowerShell's own.
        _builtin(_UTILITY, "Select-Object", "Property"),
        _builtin(_UTILITY, "Format-List", "Property"),
        _builtin(_UTILITY, "Format-Table", "Property"),
        _builtin(_UTILITY, "Export-Csv", "Path", "NoTypeInformation", "Encoding"),
        _builtin(_UTILITY, "Write-Output"),
        _builtin(_CORE, "Where-Object"),
        _builtin(_CORE, "ForEach-Object"),
    ]
)


def problems(command: str, parameters: list[str]) -> list[str]:
    """What is wrong with one command line of a runbook: an unknown cmdlet, or a parameter
    that is not on its list (empty when all is documented)."""
    cmdlet = CMDLETS.get(command)
    if cmdlet is None:
        return [f"{command}: not a cmdlet the runbook may use (add it to migrate/cmdlets.py)"]
    return [
        f"{command} -{name}: not a documented parameter (see {cmdlet.url})"
        for name in parameters
        if name not in cmdlet.parameters and name not in COMMON
    ]
