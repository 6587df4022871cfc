"""``mxspool runbook`` for a tenant-to-tenant move: several domains, both tenants, in order.

Through the CLI against the test DNS server (the MX and TTL seen now come from it). The
single-domain runbook without tenant options stays the target-only one (tests/migrate/
test_runbook.py); here: the source tenant's connector before the MX change, the release and
removal of the domains in the source before their verification in the target, DKIM and
MTA-STS around the cut-over, the clean-up of both tenants, a check for every step, and the
refusals.
"""

from __future__ import annotations

import json
import re

from tests.migrate.conftest import Cli

SPOOLER = "spool.example.net"
IP = "203.0.113.7"
TENANTS = (
    "--spooler-host", SPOOLER, "--spooler-ip", IP,
    "--source-tenant", "contoso-a", "--target-tenant", "contoso-b",
    "--source-initial", "contosoa.onmicrosoft.com", "--target-initial", "contosob.onmicrosoft.com",
)  # fmt: skip


def _sections(text: str) -> list[tuple[str, str]]:
    parts = re.split(r"^## \d+\. (.*)$", text, flags=re.MULTILINE)
    return list(zip(parts[1::2], parts[2::2], strict=True))


def test_both_tenants_in_order_with_a_check_for_every_step(mxcli: Cli) -> None:
    text = mxcli("runbook", "example.test", "longttl.test", *TENANTS).output
    order = [
        "longttl.test. 300 IN MX 10 mx.source.test.",  # days before: TTL
        "New-MgDomain -Id 'example.test'",  # added to the target, unverified
        f"mx: {SPOOLER}",  # MTA-STS lists the spooler
        "mxspool domain add example.test --route mx.source.test --tls verify "
        "--profile exchange-online",  # relay to the SOURCE tenant
        "Exchange Online PowerShell, SOURCE tenant (contoso-a)",
        f"-SenderIPAddresses '{IP}'",  # ... its connector
        f"-EFSkipIPs '{IP}'",  # ... with Enhanced Filtering
        "Exchange Online PowerShell, TARGET tenant (contoso-b)",
        f"example.test. 300 IN MX 10 {SPOOLER}.",  # relay phase
        "mxspool domain hold longttl.test",
        "Update-MgUser -UserId $u.Id -UserPrincipalName",  # source: UPNs back
        "Set-Mailbox -Identity $r.Identity -WindowsEmailAddress ($r.Alias + "
        "'@contosoa.onmicrosoft.com')",
        "Set-UnifiedGroup -Identity $r.Identity -PrimarySmtpAddress",
        "Update-MgDomain -DomainId 'contosoa.onmicrosoft.com' -IsDefault",
        "Remove-MgDomain -DomainId 'example.test'",
        "Confirm-MgDomain -DomainId 'example.test'",  # target: verified after the removal
        "New-DkimSigningConfig -DomainName 'example.test' -Enabled $false",
        "selector1._domainkey.example.test. 3600 IN CNAME SELECTOR1CNAME.",
        "mxspool domain route example.test --route TARGET-MX-HOST --tls verify "
        "--profile exchange-online",
        "mxspool check recipients longttl.test",
        "mxspool domain release example.test --only USER@example.test --wait",
        "Set-DkimSigningConfig -Identity 'example.test' -Enabled $true",
        "example.test. 300 IN MX 0 TARGET-MX-HOST.",
        "Remove-InboundConnector -Identity 'mxspool spool.example.net' -Confirm:$false",
        "mx: TARGET-MX-HOST",  # MTA-STS: the spooler's line removed
        "Remove-InboundConnector -Identity 'mxspool spool.example.net' -Confirm:$false",
        "longttl.test. 3600 IN MX 0 TARGET-MX-HOST.",  # TTL back up
    ]
    position = 0
    for command in order:
        position = text.index(command, position) + len(command)
    # The source tenant's connector comes before MX points at the spooler.
    assert text.index("SOURCE tenant (contoso-a): an inbound connector") < text.index(
        f"example.test. 300 IN MX 10 {SPOOLER}."
    )
    # Every step says how to check it.
    sections = _sections(text)
    assert len(sections) >= 20
    for title, body in sections:
        assert "\nCheck:\n" in body, title
    # The guessed selector is the target tenant's: its onmicrosoft prefix.
    assert "selector1-example-test._domainkey.contosob." in text
    # MTA-STS id bumped twice, different each time.
    ids = re.findall(r'_mta-sts\.example\.test\. \d+ IN TXT "v=STSv1; id=(\w+)"', text)
    assert len(ids) == 2 and ids[0] != ids[1]
    audit = json.loads(mxcli("audit", "--json").stdout)
    assert sorted(e["target"] for e in audit if e["action"] == "runbook") == [
        "example.test",
        "longttl.test",
    ]


def test_ps1_runs_one_step_at_a_time_in_the_right_tenant(mxcli: Cli) -> None:
    script = mxcli("runbook", "example.test", "longttl.test", *TENANTS, "--format", "ps1").output
    assert "[Parameter(Mandatory = $true)]" in script
    keys = re.search(r"\[ValidateSet\((.*)\)\]", script)
    assert keys is not None
    assert "'source-connector'" in keys.group(1) and "'source-release'" in keys.group(1)
    blocks = dict(re.findall(r"^if \(\$Step -eq '([\w-]+)'\) \{\n(.*?)^\}", script, re.M | re.S))
    source = blocks["source-connector"]
    assert "Get-AcceptedDomain -Identity 'contosoa.onmicrosoft.com'" in source  # the guard
    assert source.index("Get-AcceptedDomain") < source.index("New-InboundConnector")
    assert f"-SenderIPAddresses '{IP}'" in source
    assert "Connect-MgGraph -TenantId 'contosoa.onmicrosoft.com'" in blocks["source-remove"]
    assert "Connect-MgGraph -TenantId 'contosob.onmicrosoft.com'" in blocks["target-attach"]
    # DNS and mxspool commands stay comments.
    assert "#   mxspool domain hold example.test" in script
    assert not re.search(r"^\s*mxspool ", script, re.M)


def test_one_domain_with_tenant_options_gets_the_tenant_runbook(mxcli: Cli) -> None:
    single = mxcli("runbook", "example.test", "--spooler-host", SPOOLER, "--spooler-ip", IP)
    assert "Tenant-to-tenant" not in single.output  # positive control: the old runbook
    tenant = mxcli(
        "runbook", "example.test", "--spooler-host", SPOOLER, "--spooler-ip", IP,
        "--source-tenant", "a",
    )  # fmt: skip
    assert tenant.output.startswith("# Tenant-to-tenant runbook for example.test")
    # Without the initial domains: placeholders the tenant guard refuses, and a hint.
    assert "'SOURCE-TENANT.onmicrosoft.com'" in tenant.output


def test_refusals(mxcli: Cli) -> None:
    base = ("--spooler-host", SPOOLER, "--spooler-ip", IP)
    bad = mxcli("runbook", "example.test", *base, "--source-initial", "contoso.com", code=2)
    assert "NAME.onmicrosoft.com" in bad.output
    two = mxcli(
        "runbook", "example.test", "longttl.test", *base, "--target-host", "x.mx.microsoft", code=2
    )
    assert "several domains" in two.output
    label = mxcli("runbook", "example.test", *base, "--target-tenant", "x" * 65, code=2)
    assert "printable name" in label.output
    nothing = mxcli("runbook", *base, code=2)
    assert "DOMAIN" in nothing.output
    audit = json.loads(mxcli("audit", "--json").stdout)
    assert not [e for e in audit if e["action"] == "runbook"]  # refused: nothing recorded
