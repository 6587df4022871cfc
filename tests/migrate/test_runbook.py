"""``mxspool runbook``: the plan's commands, the connector's parameters, and valid PowerShell.

PowerShell itself cannot be installed here (no registry ships it), so the ps1 output is checked
twice: by a PowerShell grammar (tree-sitter-powershell, from PyPI) that must parse it without
an error node, and by a structural test: every line is a comment, blank, or one of the known
cmdlets with -Parameter value pairs, quotes balanced, no markdown.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.migrate.conftest import Cli

SPOOLER = "spool.example.net"
IP = "203.0.113.7"
ARGS = ("--spooler-host", SPOOLER, "--spooler-ip", IP)

# Parameters per cmdlet, as Microsoft documents them (New-/Set-/Get-InboundConnector, and the
# pipeline's Format-List). A parameter not listed here is an error in the runbook.
DOCUMENTED = {
    "Connect-ExchangeOnline": set(),
    "New-InboundConnector": {
        "Name", "ConnectorType", "SenderDomains", "SenderIPAddresses", "RequireTls",
        "RestrictDomainsToIPAddresses", "Comment", "Enabled", "EFSkipIPs", "EFSkipLastIP",
        "TlsSenderCertificateName", "AssociatedAcceptedDomains",
    },
    "Set-InboundConnector": {
        "Identity", "Name", "ConnectorType", "SenderDomains", "SenderIPAddresses", "RequireTls",
        "RestrictDomainsToIPAddresses", "Comment", "Enabled", "EFSkipIPs", "EFSkipLastIP",
        "EFUsers",
    },
    "Get-InboundConnector": {"Identity"},
    "Format-List": {"Property"},
}  # fmt: skip


def test_markdown_plan_has_every_step_in_order(mxcli: Cli) -> None:
    text = mxcli("runbook", "example.test", *ARGS).output
    steps = re.findall(r"^## (\d+)\. (.*)$", text, re.MULTILINE)
    assert [int(n) for n, _ in steps] == list(range(1, len(steps) + 1))
    order = [
        "mxspool domain add example.test --route mx.source.test --tls verify",
        "mxspool recipients import example.test recipients-example.test.csv",
        "mxspool check route example.test",
        "mxspool probe example.test",
        f"example.test. 300 IN MX 10 {SPOOLER}.",
        f"mxspool check dns example.test --spooler {SPOOLER}",
        "mxspool domain hold example.test",
        "mxspool domain route example.test --route TARGET-MX-HOST --tls verify "
        "--profile exchange-online",
        "mxspool check recipients example.test",
        "mxspool domain release example.test --only USER@example.test --wait",
        "mxspool domain release example.test --rate 600/min --wait",
        "example.test. 300 IN MX 0 TARGET-MX-HOST.",
        "mxspool report --domain example.test --check",
    ]
    position = 0
    for command in order:
        # Each command appears after the one before it (str.index raises if not).
        position = text.index(command, position) + len(command)
    # The TTL seen now (300 s from the test DNS server) and the current MX are used.
    assert "The MX TTL seen in DNS now is 300 s" in text
    # The spooler's address is in the connector, with Enhanced Filtering skipping it.
    assert f"-SenderIPAddresses '{IP}'" in text
    assert f"-EFSkipIPs '{IP}'" in text
    assert "-ConnectorType Partner" in text and "-RequireTls $true" in text
    # Without --target-host: where to find it, and why it cannot be derived.
    assert "serviceConfigurationRecords" in text and "mx.microsoft" in text
    assert "example-test.mail.protection.outlook.com" in text
    audit = json.loads(mxcli("audit", "--json").stdout)
    assert audit[0]["action"] == "runbook" and audit[0]["target"] == "example.test"


def test_long_ttl_and_target_host(mxcli: Cli) -> None:
    text = mxcli(
        "runbook", "longttl.test", *ARGS, "--target-host", "longttl-test.mx.microsoft"
    ).output
    assert "The MX TTL seen in DNS now is 3600 s" in text
    assert "Set it to 300 s now" in text
    assert "--route longttl-test.mx.microsoft --tls verify" in text
    assert "longttl.test. 300 IN MX 0 longttl-test.mx.microsoft." in text
    assert "TARGET-MX-HOST" not in text


@pytest.mark.parametrize(
    ("ip", "message"),
    [("2001:db8::7", "IPv6"), ("10.1.2.3", "public"), ("spooler", "not an IP address")],
)
def test_bad_spooler_ip_is_refused(mxcli: Cli, ip: str, message: str) -> None:
    result = mxcli("runbook", "example.test", "--spooler-host", SPOOLER, "--spooler-ip", ip, code=2)
    assert message in result.output


def _ps1(mxcli: Cli) -> str:
    return str(mxcli("runbook", "example.test", *ARGS, "--format", "ps1").output)


def test_ps1_parses_with_a_powershell_grammar(mxcli: Cli) -> None:
    tree_sitter = pytest.importorskip("tree_sitter")
    grammar = pytest.importorskip("tree_sitter_powershell")
    parser = tree_sitter.Parser(tree_sitter.Language(grammar.language()))
    script = _ps1(mxcli)
    tree = parser.parse(script.encode())
    assert not tree.root_node.has_error
    # The grammar is not lenient: a broken line is caught.
    broken = parser.parse((script + "\nNew-InboundConnector -Name 'unclosed\n").encode())
    assert broken.root_node.has_error


_TOKEN = re.compile(r"'(?:[^']|'')*'|\$(?:true|false)\b|[A-Za-z0-9.*-]+|,|\|")


def test_ps1_structure(mxcli: Cli) -> None:
    script = _ps1(mxcli)
    assert "```" not in script and "## " not in script
    live = []
    for number, line in enumerate(script.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        live.append(line)
        for segment in _split_pipeline(line):
            words = _tokens(segment, number)
            cmdlet, rest = words[0], words[1:]
            assert cmdlet in DOCUMENTED, f"line {number}: unknown cmdlet {cmdlet}"
            index = 0
            while index < len(rest):
                name = rest[index]
                assert name.startswith("-"), f"line {number}: {name!r} is not a -Parameter"
                assert name[1:] in DOCUMENTED[cmdlet], f"line {number}: {cmdlet} {name}"
                values = []
                index += 1
                while index < len(rest) and not rest[index].startswith("-"):
                    values.append(rest[index])
                    index += 1
                assert values, f"line {number}: {name} has no value"
                # Lists are 'a','b': values alternate with commas.
                assert all(v == "," for v in values[1::2]), f"line {number}: {values}"
    cmdlets = [line.split()[0] for line in live]
    assert cmdlets == [
        "Connect-ExchangeOnline",
        "New-InboundConnector",
        "Set-InboundConnector",
        "Get-InboundConnector",
    ]
    assert f"-SenderIPAddresses '{IP}'" in live[1]
    assert "-RestrictDomainsToIPAddresses $false" in live[1]
    assert f"-EFSkipIPs '{IP}'" in live[2] and "-EFSkipLastIP $false" in live[2]
    # Each parameter of the connector is explained in a comment above it.
    comments = script[: script.index(live[1])]
    for parameter in re.findall(r" -(\w+) ", live[1]):
        assert f"# -{parameter}" in comments, parameter
    # mxspool and DNS steps are there, as comments.
    assert "#   mxspool domain hold example.test" in script
    assert f"#   example.test. 300 IN MX 10 {SPOOLER}." in script


def _split_pipeline(line: str) -> list[str]:
    segments, current, quoted = [], "", False
    for char in line:
        if char == "'":
            quoted = not quoted  # a doubled '' toggles twice: still balanced
        if char == "|" and not quoted:
            segments.append(current)
            current = ""
        else:
            current += char
    assert not quoted, f"unbalanced quotes in {line!r}"
    segments.append(current)
    return [segment.strip() for segment in segments]


def _tokens(segment: str, number: int) -> list[str]:
    tokens = _TOKEN.findall(segment)
    rebuilt = re.sub(r"\s+", "", segment)
    assert "".join(tokens).replace(" ", "") == rebuilt, f"line {number}: stray text in {segment!r}"
    return tokens
