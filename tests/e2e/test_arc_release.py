"""ARC sealing end to end: `mxspool arc keygen`, `mxspool serve` with [arc], a held message
released to a real SMTP target, the seal checked by dkimpy against the key served by a local
DNS server, and the report's stored and sent digests."""

from __future__ import annotations

import csv
import hashlib
import io
import smtplib
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest

from mxspool.delivery.arc import make_dnsfunc
from tests import waiting
from tests.conftest import MXSPOOL, Spooler
from tests.delivery.dnsserver import DnsServer
from tests.delivery.target import Target

DOMAIN = "example.test"
SEALER = "seal.test"


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target().start()
    yield server
    server.stop()


def keygen(tmp_path: Path) -> tuple[Path, str]:
    """A key made by `mxspool arc keygen`, and the zone line it printed."""
    key = tmp_path / "arc.key"
    result = subprocess.run(
        [MXSPOOL, "arc", "keygen", "--domain", SEALER, "--selector", "e2e", "--out", str(key)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    record = next(line for line in result.stdout.splitlines() if " IN TXT " in line)
    return key, record


def test_held_message_released_with_a_seal_and_both_digests_reported(
    spooler_factory: Any, target: Target, tmp_path: Path
) -> None:
    key, record = keygen(tmp_path)
    dns = DnsServer(record).start()
    try:
        spooler: Spooler = spooler_factory(
            arc={"domain": SEALER, "selector": "e2e", "key_file": str(key)},
            delivery={"resolver": dns.address, "retry_schedule": ["1s"]},
        )
        spooler.start()
        spooler.cli("domain", "add", DOMAIN, "--route", f"127.0.0.1:{target.port}", "--tls", "off")
        spooler.cli("domain", "hold", DOMAIN)
        message = (
            b"From: <sender@src.test>\r\nTo: <user@example.test>\r\nSubject: sealed\r\n"
            b"Message-ID: <e2e-arc@src.test>\r\n\r\nHeld for days, then sealed.\r\n"
        )
        waiting.wait_until(lambda: _send(spooler.port, message), 15, "the message accepted")
        # The arrival verdict is stored a moment after the 250 (read from the store file: the
        # CLI costs a process start per poll).
        waiting.wait_until(lambda: _sql(spooler, _VERDICT) == [(1,)], 15, "the arrival verdict")
        ((queue_id,),) = _sql(spooler, "SELECT id FROM messages")
        assert target.recorder.received == [], "held mail must not leave before the release"

        spooler.cli("domain", "release", DOMAIN)
        waiting.wait_until(lambda: len(target.recorder.received) == 1, 30, "the release")
        received = target.recorder.received[0].data

        cv, results, reason = dkim.arc_verify(received, dnsfunc=make_dnsfunc(dns.address))
        assert cv == dkim.CV_Pass, reason
        assert [r["instance"] for r in results] == [1]
        assert results[0]["as-domain"] == SEALER.encode()
        stored = spooler.cli("queue", "export", queue_id, binary=True).stdout
        assert received.endswith(stored) and len(received) > len(stored)
        assert stored.endswith(message)

        waiting.wait_until(lambda: _sql(spooler, _DELIVERED) == [(1,)], 15, "the delivery")
        (row,) = list(csv.DictReader(io.StringIO(spooler.cli("report").stdout)))
        assert row["state"] == "delivered"
        assert row["sha256"] == hashlib.sha256(stored).hexdigest()
        assert row["sent_sha256"] == hashlib.sha256(received).hexdigest()
        assert row["dkim"] == "none" and row["dmarc"]  # verdicts from the message's tags
    finally:
        dns.stop()


def test_serve_refuses_to_start_with_an_unusable_key(spooler_factory: Any, tmp_path: Path) -> None:
    key = tmp_path / "not-a-key.pem"
    key.write_text("hello\n")
    spooler: Spooler = spooler_factory(arc={"domain": SEALER, "key_file": str(key)})
    result = subprocess.run(
        [MXSPOOL, "--config", str(spooler.config), "serve"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"[arc] key_file {key}: not a PEM private key" in result.stderr


def _send(port: int, message: bytes) -> bool:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            return not client.sendmail("sender@src.test", ["user@example.test"], message)
    except smtplib.SMTPRecipientsRefused:
        return False  # until the intake has read the new domain


_VERDICT = "SELECT count(*) FROM messages WHERE auth_at IS NOT NULL"
_DELIVERED = "SELECT count(*) FROM recipients WHERE state = 'delivered'"


def _sql(spooler: Spooler, query: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{spooler.db}?mode=ro", uri=True, timeout=5) as conn:
        return list(conn.execute(query))
