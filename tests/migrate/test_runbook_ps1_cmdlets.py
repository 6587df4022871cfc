"""Every command and parameter in the runbooks' PowerShell is on the documented list.

The ``.ps1`` is parsed with a PowerShell grammar (tree-sitter-powershell); every ``command``
node, nested ones included (in pipelines, ``foreach`` bodies, script blocks), must name a
cmdlet of :data:`mxspool.migrate.cmdlets.CMDLETS` and use only its listed parameters. The
negative controls inject an unknown cmdlet and an unknown parameter and expect the check to
fail, so a check that finds nothing is a check that can find something.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import tree_sitter
import tree_sitter_powershell

from mxspool.migrate import runbook, tenantplan
from mxspool.migrate.cmdlets import CMDLETS, problems
from mxspool.migrate.runbook import ArcSealing, Inputs
from mxspool.migrate.tenantplan import DomainNow, Migration

NOW = datetime(2026, 3, 1, tzinfo=UTC)
ARC = ArcSealing("seal.example.net", "mxs1", 'mxs1._domainkey.seal.example.net. IN TXT "v=DKIM1"')
DOMAINS = (
    DomainNow("a.example", ("a-example.mail.protection.outlook.com",), 3600),
    DomainNow("b.example", (), None, "NXDOMAIN"),
)
_PARSER = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))


def _commands(script: str) -> list[tuple[str, list[str]]]:
    tree = _PARSER.parse(script.encode())
    assert not tree.root_node.has_error, "the script does not parse as PowerShell"
    found: list[tuple[str, list[str]]] = []
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.type == "command":
            name = node.child_by_field_name("command_name") or node.children[0]
            parameters = [
                element.text.decode().lstrip("-").rstrip(":")
                for child in node.children
                if child.type == "command_elements"
                for element in child.children
                if element.type == "command_parameter"
            ]
            found.append((name.text.decode(), parameters))
        stack.extend(node.children)
    return found


def _check(script: str) -> list[str]:
    return [issue for name, params in _commands(script) for issue in problems(name, params)]


def _scripts() -> dict[str, str]:
    base = dict(spooler_host="spool.example.net", spooler_ip="203.0.113.7")
    by_ip = Migration(DOMAINS, **base, source_initial="contosoa.onmicrosoft.com")
    by_cert = Migration(
        DOMAINS,
        **base,
        source_tenant="A",
        target_tenant="B",
        target_initial="contosob.onmicrosoft.com",
        client_cert_name="spool.example.net",
        arc=ARC,
    )
    single = Inputs("a.example", "spool.example.net", "203.0.113.7", arc=ARC)
    return {
        "tenants-ip": tenantplan.render_ps1(by_ip, NOW),
        "tenants-cert-arc": tenantplan.render_ps1(by_cert, NOW),
        "single-domain": runbook.render_ps1(single, NOW),
    }


@pytest.mark.parametrize("which", ["tenants-ip", "tenants-cert-arc", "single-domain"])
def test_every_command_and_parameter_is_documented(which: str) -> None:
    script = _scripts()[which]
    commands = _commands(script)
    assert len(commands) >= 4  # the walk does find the commands
    assert _check(script) == []


def test_the_tenant_script_uses_both_tenants_cmdlets() -> None:
    names = {name for name, _ in _commands(_scripts()["tenants-ip"])}
    # Source side: connector, release, removal; target side: verification, DKIM, clean-up.
    for cmdlet in (
        "New-InboundConnector", "Update-MgUser", "Set-Mailbox", "Set-UnifiedGroup",
        "Update-MgDomain", "Remove-MgDomain", "Confirm-MgDomain", "New-DkimSigningConfig",
        "Set-DkimSigningConfig", "Remove-InboundConnector", "Get-MgDomainNameReference",
    ):  # fmt: skip
        assert cmdlet in names, cmdlet
    # Every cmdlet of the list is used by some runbook (no dead entries).
    used = set().union(*({n for n, _ in _commands(s)} for s in _scripts().values()))
    assert set(CMDLETS) - used <= {"Disconnect-ExchangeOnline", "Write-Output", "Format-Table"}


@pytest.mark.parametrize(
    ("injected", "expected"),
    [
        ("Set-Mailbox -Identity 'x' -PrimarySmtpAddress 'y@a.example'", "-PrimarySmtpAddress"),
        ("Remove-AcceptedDomain -Identity 'a.example'", "Remove-AcceptedDomain"),
        ("Get-Recipient | Where-Object { Set-MgDomain -DomainId 'x' }", "Set-MgDomain"),
    ],
)
def test_an_undocumented_command_or_parameter_fails_the_check(injected: str, expected: str) -> None:
    script = _scripts()["tenants-ip"]
    assert _check(script) == []  # positive control
    issues = _check(
        script.replace(
            "$ErrorActionPreference = 'Stop'", f"$ErrorActionPreference = 'Stop'\n{injected}"
        )
    )
    assert len(issues) == 1 and expected in issues[0], issues
