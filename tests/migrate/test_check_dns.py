"""``check dns`` against a local DNS server and a local HTTPS MTA-STS policy server."""

from __future__ import annotations

import json
from typing import Any

from tests.migrate.conftest import SPOOLER, Cli


def _verdicts(data: dict[str, Any]) -> dict[str, str]:
    return {finding["check"]: finding["verdict"] for finding in data["findings"]}


def test_mx_not_yet_at_the_spooler(mxcli: Cli) -> None:
    result = mxcli("check", "dns", "notyet.test", "--spooler", SPOOLER, "--json")
    data = json.loads(result.stdout)
    assert data["mx"] == [{"preference": 10, "host": "mx.source.test", "ttl": 300}]
    assert data["mx_at"] == "other"
    verdicts = _verdicts(data)
    assert verdicts["mx"] == "todo" and verdicts["mx-ttl"] == "ok"
    assert verdicts["mta-sts"] == "info"
    assert data["verdict"] == "go"


def test_ttl_too_long_is_a_no_go(mxcli: Cli) -> None:
    result = mxcli("check", "dns", "longttl.test", "--json", code=1)
    data = json.loads(result.stdout)
    assert data["spooler"] == SPOOLER  # from [smtp] hostname
    finding = next(f for f in data["findings"] if f["check"] == "mx-ttl")
    assert finding["verdict"] == "fail"
    assert "3600 s" in finding["detail"] and "300 s" in finding["fix"]
    assert data["verdict"] == "no-go"
    # The table says the same to a person, and the exit status is 1.
    table = mxcli("check", "dns", "longttl.test", code=1)
    assert "NO-GO" in table.output and "3600" in table.output


def test_mta_sts_enforce_without_the_spooler_is_a_no_go(mxcli: Cli) -> None:
    data = json.loads(mxcli("check", "dns", "stsbad.test", "--json", code=1).stdout)
    finding = next(f for f in data["findings"] if f["check"] == "mta-sts")
    assert finding["verdict"] == "fail"
    assert "does not list the spooler" in finding["detail"]
    assert f"mx: {SPOOLER}" in finding["fix"]
    assert data["mta_sts"] == {"mode": "enforce", "mx": ["mx.source.test"]}


def test_all_good(mxcli: Cli) -> None:
    data = json.loads(mxcli("check", "dns", "good.test", "--json").stdout)
    verdicts = _verdicts(data)
    assert verdicts == {
        "mx": "ok",
        "mx-ttl": "ok",
        "mta-sts": "ok",
        "spf": "info",
        "dmarc": "info",
    }
    assert data["mx_at"] == "spooler" and data["verdict"] == "go"
    assert "GO" in mxcli("check", "dns", "good.test").output


def test_unknown_domain_and_untrusted_policy_certificate(mxcli: Cli, tmp_path: Any) -> None:
    data = json.loads(mxcli("check", "dns", "nowhere.test", "--json", code=1).stdout)
    assert _verdicts(data)["mx"] == "fail"
    # Without the test CA the policy's certificate does not verify: a no-go that says why.
    config = tmp_path / "untrusted.toml"
    config.write_text(mxcli.config.read_text().replace("ca_file", "# ca_file"))
    untrusted = Cli(config, mxcli.env)
    data = json.loads(untrusted("check", "dns", "good.test", "--json", code=1).stdout)
    finding = next(f for f in data["findings"] if f["check"] == "mta-sts")
    assert finding["verdict"] == "fail" and "certificate" in finding["detail"]


def test_check_dns_records_where_mx_points_for_the_checklist(mxcli: Cli) -> None:
    mxcli("domain", "add", "good.test", "--route", "mx.source.test", "--tls", "off")
    mxcli("check", "dns", "good.test")
    audit = json.loads(mxcli("audit", "--json").stdout)
    entry = next(e for e in audit if e["action"] == "check.dns")
    assert entry["target"] == "good.test" and "mx=spooler" in entry["detail"]
