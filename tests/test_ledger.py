"""The signed ledger on a real SQLite store: ``report --sign``, ``ledger keygen``, ``ledger
verify``, and every kind of tampering named for what it is.

A third party checks a ledger without mxspool: ``third_party_verify`` below follows only the
format documented in ``mxspool.evidence.ledger`` (and openssl checks the signature).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from mxspool import cli as cli_module
from mxspool.store.base import RecipientState
from tests.test_cli import Spool


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Spool, Path, Path]:
    """A store with delivered, held and formula-like rows; a key; a signed ledger."""
    spool = Spool(tmp_path)
    spool.run("domain", "add", "done.test", "--route", "127.0.0.1:2525")
    spool.run("domain", "add", "held.test", "--route", "127.0.0.1:2525", "--hold")
    spool.put("a@done.test", "b@done.test", "c@held.test")
    spool.put("=1+1@held.test", body=b"Subject: \xe9t\xe9\r\n\r\nFrom here\r\n")
    spool.put("d@done.test")
    assert spool.finish("done.test", RecipientState.DELIVERED) == 3
    key = tmp_path / "ledger.key"
    spool.run("ledger", "keygen", "--out", str(key))
    ledger = tmp_path / "report.csv"
    spool.run("report", "--sign", "--key", str(key), "--out", str(ledger))
    return spool, key, ledger


def verify(spool: Spool, ledger: Path, *extra: str, code: int) -> str:
    return str(spool.run("ledger", "verify", str(ledger), *extra, code=code).output)


def rows_of(ledger: Path) -> list[list[str]]:
    with ledger.open(newline="", encoding="utf-8") as source:
        return list(csv.reader(source))


def write_rows(ledger: Path, rows: list[list[str]]) -> None:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    ledger.write_bytes(buffer.getvalue().encode())


def netstrings(cells: list[str]) -> bytes:
    return b"".join(b"%d:%s," % (len(c.encode()), c.encode()) for c in cells)


def third_party_verify(ledger: Path, public_pem: Path) -> dict[str, object]:
    """The documented checks, written from the format alone (no mxspool imports)."""
    manifest_file = ledger.with_name(ledger.name + ".manifest.json")
    signature = ledger.with_name(ledger.name + ".manifest.sig")
    subprocess.run(
        ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(public_pem), "-rawin",
         "-in", str(manifest_file), "-sigfile", str(signature)],
        check=True, capture_output=True,
    )  # fmt: skip
    manifest = json.loads(manifest_file.read_bytes())
    assert hashlib.sha256(ledger.read_bytes()).hexdigest() == manifest["ledger_sha256"]
    header, *rows = rows_of(ledger)
    assert header == manifest["columns"]
    chain = hashlib.sha256(netstrings(header[:-1])).digest()
    assert chain.hex() == manifest["chain_head"]
    totals: dict[str, int] = {}
    for row in rows:
        chain = hashlib.sha256(chain + netstrings(row[:-1])).digest()
        assert row[-1] == chain.hex()
        totals[row[header.index("state")]] = totals.get(row[header.index("state")], 0) + 1
    assert chain.hex() == manifest["chain_final"]
    assert len(rows) == manifest["rows"]
    assert totals == {k: v for k, v in manifest["totals"].items() if v}
    return dict(manifest)


def test_sign_then_verify(signed: tuple[Spool, Path, Path]) -> None:
    spool, key, ledger = signed
    out = verify(spool, ledger, "--public-key", f"{key}.pub", code=0)
    assert "OK:" in out and "5 rows" in out and "delivered 3, held 2" in out
    manifest = third_party_verify(ledger, Path(f"{key}.pub"))
    assert manifest["rows"] == 5
    assert manifest["totals"]["delivered"] == 3  # type: ignore[index]
    assert manifest["scope"] == {"store": spool.url, "domains": None, "rows": "all"}
    assert manifest["ledger_file"] == "report.csv"
    # The ledger is the report plus the chain column, cells formula-safe.
    plain = spool.run("report").stdout.splitlines()
    header, *rows = rows_of(ledger)
    assert header[:-1] == plain[0].split(",")
    assert any(row[3] == "'=1+1@held.test" for row in rows)
    # Also by the manifest's name, and with the raw base64 key as text.
    raw = str(manifest["public_key"])
    manifest_file = f"{ledger}.manifest.json"
    assert "OK:" in verify(spool, Path(manifest_file), "--public-key", raw, code=0)


def test_a_changed_field_names_its_row(signed: tuple[Spool, Path, Path]) -> None:
    spool, key, ledger = signed
    rows = rows_of(ledger)
    rows[2][10] = "250 ok, honest"  # the remote reply of row 2
    write_rows(ledger, rows)
    out = verify(spool, ledger, "--public-key", f"{key}.pub", code=1)
    assert "the chain breaks at row 2 (line 3" in out
    assert "row 1 " not in out and "row 3 " not in out  # only the changed row is named
    assert "the ledger file differs from the one signed" in out
    assert "bad signature" not in out  # the manifest itself is intact (control)


def test_a_removed_row(signed: tuple[Spool, Path, Path]) -> None:
    spool, key, ledger = signed
    rows = rows_of(ledger)
    del rows[3]
    write_rows(ledger, rows)
    out = verify(spool, ledger, "--public-key", f"{key}.pub", code=1)
    assert "the chain breaks at row 3" in out  # the row after the gap
    assert "row count: the ledger has 4 rows, the manifest says 5" in out
    assert "totals differ" in out


def test_an_added_row(signed: tuple[Spool, Path, Path]) -> None:
    spool, key, ledger = signed
    rows = rows_of(ledger)
    rows.insert(2, list(rows[1]))  # a copy of row 1, chain cell and all
    write_rows(ledger, rows)
    out = verify(spool, ledger, "--public-key", f"{key}.pub", code=1)
    assert "the chain breaks at row 2" in out
    assert "row count: the ledger has 6 rows, the manifest says 5" in out


def test_edited_totals(signed: tuple[Spool, Path, Path]) -> None:
    spool, key, ledger = signed
    manifest_file = Path(f"{ledger}.manifest.json")
    manifest = json.loads(manifest_file.read_bytes())
    manifest["totals"]["delivered"] = 4
    manifest_file.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    out = verify(spool, ledger, "--public-key", f"{key}.pub", code=1)
    assert "bad signature" in out
    assert "totals differ: delivered: ledger 3, manifest 4" in out


def test_rehashed_without_the_key(signed: tuple[Spool, Path, Path]) -> None:
    """A forger who changes a row and recomputes everything but cannot sign."""
    spool, key, ledger = signed
    header, *rows = rows_of(ledger)
    state = header.index("state")
    held = next(row for row in rows if row[state] == "held")
    held[state] = "delivered"
    chain = hashlib.sha256(netstrings(header[:-1])).digest()
    for row in rows:
        chain = hashlib.sha256(chain + netstrings(row[:-1])).digest()
        row[-1] = chain.hex()
    write_rows(ledger, [header, *rows])
    manifest_file = Path(f"{ledger}.manifest.json")
    manifest = json.loads(manifest_file.read_bytes())
    manifest.update(
        chain_final=chain.hex(),
        ledger_sha256=hashlib.sha256(ledger.read_bytes()).hexdigest(),
        ledger_bytes=ledger.stat().st_size,
    )
    manifest["totals"].update(delivered=4, held=1)
    manifest_file.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    out = verify(spool, ledger, "--public-key", f"{key}.pub", code=1)
    problems = [line for line in out.splitlines() if line.startswith("FAIL:")]
    assert len(problems) == 1 and "bad signature" in problems[0], out


def test_wrong_public_key(signed: tuple[Spool, Path, Path], tmp_path: Path) -> None:
    spool, _key, ledger = signed
    other = tmp_path / "other.key"
    spool.run("ledger", "keygen", "--out", str(other))
    out = verify(spool, ledger, "--public-key", f"{other}.pub", code=1)
    assert "wrong key: the manifest says it was signed by SHA256:" in out
    assert "bad signature" in out
    # Re-signed with another key and that key put in the manifest: consistent, so only the
    # given public key exposes it.
    from mxspool.evidence.keys import load_private_key, raw_public

    forged = load_private_key(other)
    manifest_file = Path(f"{ledger}.manifest.json")
    manifest = json.loads(manifest_file.read_bytes())
    import base64

    manifest["public_key"] = base64.b64encode(raw_public(forged.public_key())).decode()
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    manifest_file.write_bytes(data)
    Path(f"{ledger}.manifest.sig").write_bytes(forged.sign(data))
    assert "note: checked against the key the manifest names" in verify(spool, ledger, code=0)
    assert "wrong key" in verify(spool, ledger, "--public-key", f"{_key}.pub", code=1)


def test_missing_manifest_and_signature(signed: tuple[Spool, Path, Path]) -> None:
    spool, key, ledger = signed
    sig = Path(f"{ledger}.manifest.sig")
    sig.rename(f"{sig}.away")
    assert "missing signature" in verify(spool, ledger, "--public-key", f"{key}.pub", code=1)
    Path(f"{ledger}.manifest.json").unlink()
    out = verify(spool, ledger, "--public-key", f"{key}.pub", code=1)
    assert "missing manifest: no report.csv.manifest.json beside report.csv" in out


def test_keygen_is_private_and_never_overwrites(tmp_path: Path) -> None:
    runner = CliRunner()
    key = tmp_path / "k.key"
    made = runner.invoke(cli_module.cli, ["ledger", "keygen", "--out", str(key)])
    assert made.exit_code == 0, made.output
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "fingerprint SHA256:" in made.output and "BEGIN PUBLIC KEY" in made.output
    before = key.read_bytes()
    again = runner.invoke(cli_module.cli, ["ledger", "keygen", "--out", str(key)])
    assert again.exit_code == 2 and "never overwritten" in again.output
    assert key.read_bytes() == before


def test_sign_usage_and_check(signed: tuple[Spool, Path, Path], tmp_path: Path) -> None:
    spool, key, ledger = signed
    assert "--sign needs --out" in spool.run("report", "--sign", code=2).output
    assert (
        "never overwritten"
        in spool.run("report", "--sign", "--key", str(key), "--out", str(ledger), code=1).output
    )
    missing = spool.run("report", "--sign", "--key", str(tmp_path / "no.key"), "--out", "x", code=2)
    assert "ledger keygen" in missing.output
    # --check: only the unfinished rows, signed, and exit 1 since some are unfinished.
    held = tmp_path / "held.csv"
    out = spool.run(
        "report", "--sign", "--check", "--domain", "held.test", "--key", str(key),
        "--out", str(held), code=1,
    ).output  # fmt: skip
    assert "2 of 2 recipients not final" in out
    manifest = third_party_verify(held, Path(f"{key}.pub"))
    assert manifest["rows"] == 2
    assert manifest["scope"]["rows"] == "unfinished"  # type: ignore[index]
    assert manifest["scope"]["domains"] == ["held.test"]  # type: ignore[index]
    assert shutil.which("openssl")


def test_store_password_is_not_in_the_manifest() -> None:
    from mxspool.evidence.ledger import store_label

    url = "postgresql://mx:s3cret@db.example:5432/spool"
    assert store_label(url) == "postgresql://mx:***@db.example:5432/spool"
    assert store_label("sqlite:///var/lib/spool.db") == "sqlite:///var/lib/spool.db"
