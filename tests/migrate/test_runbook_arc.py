"""The runbook's ARC step: rendered only when [arc] is configured, valid PowerShell that adds the
sealing domain to the trusted ARC sealers without dropping the others."""

from __future__ import annotations

import tree_sitter
import tree_sitter_powershell

from mxspool.migrate.runbook import ArcSealing, Inputs, plan, render_markdown, render_ps1

ARC = ArcSealing("seal.example.net", "mxs1", 'mxs1._domainkey.seal.example.net. IN TXT "v=DKIM1"')


def _inputs(arc: ArcSealing | None) -> Inputs:
    return Inputs("example.test", "spool.example.net", "203.0.113.5", arc=arc)


def test_arc_step_only_when_configured() -> None:
    assert "arc" not in [step.key for step in plan(_inputs(None))]
    keys = [step.key for step in plan(_inputs(ARC))]
    assert keys.index("arc") == keys.index("connector") + 1


def test_arc_step_publishes_the_key_and_trusts_the_sealer() -> None:
    text = render_markdown(_inputs(ARC))
    assert ARC.zone_line in text
    assert "dig +short TXT mxs1._domainkey.seal.example.net" in text
    assert (
        "if ($sealers -notcontains 'seal.example.net') { $sealers += 'seal.example.net' }" in text
    )
    assert "Set-ArcConfig -Identity Default -ArcTrustedSealers $sealers" in text
    assert "Get-ArcConfig | Format-List -Property 'ArcTrustedSealers'" in text


def test_arc_step_is_valid_powershell() -> None:
    parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))
    script = render_ps1(_inputs(ARC))
    assert "\nSet-ArcConfig -Identity Default" in script  # a live line, not a comment
    assert not parser.parse(script.encode()).root_node.has_error
    broken = script + "\nif ($sealers -notcontains 'x' { $sealers += 'x' }\n"
    assert parser.parse(broken.encode()).root_node.has_error  # positive control
