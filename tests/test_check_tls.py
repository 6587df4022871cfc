"""`mxspool check tls`: the chain, the names against [smtp] hostname, days left against the
planned hold; exit 1 on problems, 0 with warnings only; `--json` for scripts."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import trustme
from click.testing import CliRunner

from mxspool.cli import cli

HOSTNAME = "mx.example.net"
NOW = datetime.datetime.now(datetime.UTC)


def pair(
    tmp_path: Path,
    *names: str,
    days: float = 90,
    intermediate: bool = False,
    foreign_key: bool = False,
) -> tuple[Path, Path]:
    ca = trustme.CA()
    issuer = ca.create_child_ca() if intermediate else ca
    leaf = issuer.issue_cert(*(names or (HOSTNAME,)), not_after=NOW + datetime.timedelta(days=days))
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key_source = trustme.CA().issue_cert(HOSTNAME) if foreign_key else leaf
    key.write_bytes(key_source.private_key_pem.bytes())
    return cert, key


def config(tmp_path: Path, cert: Path | None, key: Path | None, **acme: Any) -> Path:
    lines = ["[smtp]", f'hostname = "{HOSTNAME}"', 'tls_expiry_warning = "21d"']
    if cert is not None and key is not None:
        lines += [f'tls_cert = "{cert}"', f'tls_key = "{key}"']
    lines += ["[store]", f'url = "sqlite:///{tmp_path / "data" / "spool.db"}"']
    if acme:
        lines.append("[acme]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in acme.items()]
    path = tmp_path / "mxspool.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def check(path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    runner = CliRunner()
    text = runner.invoke(cli, ["--config", str(path), "check", "tls", *args])
    data = runner.invoke(cli, ["--config", str(path), "check", "tls", "--json", *args])
    assert text.exit_code == data.exit_code, (text.output, data.output)
    return data.exit_code, json.loads(data.output), text.output


def test_a_good_chain_is_reported_and_passes(tmp_path: Path) -> None:
    cert, key = pair(tmp_path, HOSTNAME, "mx2.example.net", intermediate=True)
    code, data, text = check(config(tmp_path, cert, key), "--hold-days", "30")
    assert code == 0, text
    assert data["ok"] and data["covers_hostname"] and data["source"] == "files"
    assert len(data["chain"]) == 2  # the server certificate, then the intermediate
    assert data["chain"][0]["issuer"] == data["chain"][1]["subject"]
    assert data["names"] == [HOSTNAME, "mx2.example.net"]
    assert 89 < data["days_left"] <= 90
    assert data["problems"] == [] and data["warnings"] == []
    assert "verdict: OK" in text and "[chain 1]" in text and "covers mx.example.net" in text


def test_expiring_before_the_hold_ends_is_a_problem(tmp_path: Path) -> None:
    cert, key = pair(tmp_path, days=40)
    path = config(tmp_path, cert, key)
    assert check(path, "--hold-days", "30")[0] == 0  # 40 days > 30 + 7 margin: the control
    code, data, text = check(path, "--hold-days", "30", "--margin-days", "14")
    assert code == 1
    assert "before the hold ends plus margin (30 + 14 days)" in data["problems"][0]
    assert "PROBLEM:" in text and "verdict: PROBLEMS (exit 1)" in text


def test_with_acme_an_early_expiry_is_only_a_warning(tmp_path: Path) -> None:
    cert, key = pair(tmp_path, days=40)
    acme_dir = tmp_path / "acme"
    (acme_dir / "live").mkdir(parents=True)
    (acme_dir / "live" / "fullchain.pem").write_bytes(cert.read_bytes())
    (acme_dir / "live" / "privkey.pem").write_bytes(key.read_bytes())
    path = config(tmp_path, None, None, enabled=True, cert_dir=str(acme_dir))
    code, data, _text = check(path, "--hold-days", "60")
    assert code == 0 and data["source"] == "acme"
    assert "ACME renews it 30 days ahead" in data["warnings"][0]


def test_problems(tmp_path: Path) -> None:
    cases = {
        "other-name": ({"names": ("other.example.net",)}, "do not cover mx.example.net"),
        "mismatch": ({"foreign_key": True}, "does not belong to the first certificate"),
        "expired": ({"days": -1}, "expired"),
    }
    for label, (options, message) in cases.items():
        directory = tmp_path / label
        directory.mkdir()
        names = options.pop("names", ())
        cert, key = pair(directory, *names, **options)
        code, data, _text = check(config(directory, cert, key))
        assert code == 1, label
        assert any(message in problem for problem in data["problems"]), (label, data)


def test_warnings_alone_exit_zero(tmp_path: Path) -> None:
    cert, key = pair(tmp_path, days=10)  # below the 21-day warning threshold
    code, data, text = check(config(tmp_path, cert, key))
    assert code == 0
    assert "below the 21-day warning threshold" in data["warnings"][0]
    assert "warning:" in text


def test_nothing_configured_or_not_yet_obtained(tmp_path: Path) -> None:
    code, data, _text = check(config(tmp_path, None, None))
    assert code == 1 and "STARTTLS is not configured" in data["problems"][0]
    path = config(tmp_path, None, None, enabled=True, cert_dir=str(tmp_path / "acme"))
    code, data, _text = check(path)
    assert code == 1 and "mxspool acme issue" in data["problems"][0]


def test_acme_and_own_files_together_are_a_configuration_error(tmp_path: Path) -> None:
    cert, key = pair(tmp_path)
    result = CliRunner().invoke(
        cli, ["--config", str(config(tmp_path, cert, key, enabled=True)), "check", "tls"]
    )
    assert result.exit_code == 2
    assert "remove tls_cert and tls_key, or disable ACME" in result.output


def test_acme_issue_needs_acme_enabled(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["--config", str(config(tmp_path, None, None)), "acme", "issue"]
    )
    assert result.exit_code == 2
    assert "set [acme] enabled = true" in result.output
