"""The drill (issue 11 point 7): relay, hold, release, relay again, against a fake Exchange
Online tenant, with the promise checked at the end: no acknowledged message lost, no NDR.

Everything is real: `mxspool serve` (tests/conftest.py Spooler) with [arc] sealing and
authentication at arrival; senders over SMTP (smtplib) with plus addresses, bare-LF bodies,
SIZE=, 8BITMIME and SMTPUTF8, DKIM signatures (dkimpy); a dnslib server publishing the senders'
DKIM key, SPF and DMARC and the spooler's ARC key; recipients imported with `mxspool recipients
import`; the tenant (tests/e2e/exo_target.py) answering busy at random (seeded), 452 past 200
recipients, 550 5.4.1 for mailboxes not created yet, and dropping one connection in DATA.

The senders' domain is configured in the spooler routed to a sink, so any DSN the spooler sent
them would land there; the positive control at the end makes one (`queue bounce`) and sees it.

Mailboxes not created yet: while the domain was never held, the exchange-online profile reads
550 5.4.1 as any 5xx (parked, never bounced; the operator creates the mailbox and runs `queue
retry --parked`); once it was released it means "not ready at target" (pending, re-checked
every 15 minutes; the operator creates the mailbox and runs `queue flush`).
"""

from __future__ import annotations

import collections
import contextlib
import csv
import hashlib
import json
import re
import smtplib
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import pytest

from mxspool.delivery.arc import make_dnsfunc
from tests.conftest import MXSPOOL, Spooler
from tests.delivery.dnsserver import DnsServer
from tests.delivery.target import Target
from tests.e2e.authkit import Key
from tests.e2e.exo_target import TenantTarget, mailbox_of
from tests.waiting import stays, wait_until

DOMAIN = "contoso.test"
SENDERS = "src.test"
SEALER = "seal.test"
KEY = Key()
USERS = [f"user{n:03d}@{DOMAIN}" for n in range(1, 261)]
UTF8_USER = f"jöran@{DOMAIN}"
NEW = [f"new{n:02d}@{DOMAIN}" for n in range(1, 4)]
"""Mailboxes in the source tenant's export that the target tenant does not have yet."""
NULL = {"", "<>"}
"""The null reverse-path as the targets record it."""
SIGNED_KINDS = ("dkim", "8bit", "utf8", "plus")


@dataclass
class Sent:
    """One message the senders got a 250 for."""

    queue_id: str
    message_id: str
    kind: str
    mail_from: str
    rcpts: list[str]


@pytest.fixture
def tenant() -> Iterator[TenantTarget]:
    server = TenantTarget(busy_share=0.05, max_recipients=200, seed=11)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def targets() -> Iterator[tuple[Target, Target]]:
    """The senders' sink (their domain's route) and the control target."""
    sink, control = Target().start(), Target().start()
    yield sink, control
    sink.stop()
    control.stop()


def arc_key(tmp_path: Path) -> tuple[Path, str]:
    key = tmp_path / "arc.key"
    result = subprocess.run(
        [MXSPOOL, "arc", "keygen", "--domain", SEALER, "--selector", "drill", "--out", str(key)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return key, next(line for line in result.stdout.splitlines() if " IN TXT " in line)


def recipients_csv(path: Path) -> Path:
    """The source tenant's Get-Recipient export: every mailbox, created at the target or not."""
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["PrimarySmtpAddress", "RecipientType", "EmailAddresses"])
        for address in [*USERS, UTF8_USER, *NEW]:
            writer.writerow([address, "UserMailbox", f"SMTP:{address}"])
    return path


def build(number: int, kind: str, sender: str, rcpts: list[str]) -> bytes:
    """Message ``number`` of one kind; signed kinds carry a DKIM signature of src.test."""
    message_id = f"<drill-{number}@{SENDERS}>"
    if kind == "lf":  # bare LF line ends throughout: normalised to CRLF at arrival
        return (
            f"From: <{sender}>\nTo: <{rcpts[0]}>\nSubject: drill {number} lf\n"
            f"Message-ID: {message_id}\n\nwritten with LF only\n.leading dot\nend\n"
        ).encode()
    subject = f"drill {number} {kind}"
    body = b"Hello from the drill.\r\n.a leading dot\r\n"
    extra = ""
    if kind in ("8bit", "utf8"):
        extra = "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        extra += "Content-Transfer-Encoding: 8bit\r\n"
        body = "Grüße aus Köln, 東京 too.\r\n".encode()
        subject += " Grüße" if kind == "utf8" else ""
    data = (
        f"From: <{sender}>\r\nTo: <{rcpts[0]}>\r\nSubject: {subject}\r\n"
        f"Message-ID: {message_id}\r\n{extra}\r\n"
    ).encode() + body
    return KEY.sign(data, SENDERS) if kind in SIGNED_KINDS else data


class Senders:
    """The senders: smtplib over real SMTP; every 250 is remembered with its queue id."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent: list[Sent] = []
        self.number = 0

    def send(self, kind: str, rcpts: list[str], sender: str = f"alice@{SENDERS}") -> Sent:
        self.number += 1
        data = build(self.number, kind, sender, rcpts)
        options = [f"SIZE={len(data)}"]
        if kind in ("8bit", "utf8"):
            options.append("BODY=8BITMIME")
        if kind == "utf8":
            options.append("SMTPUTF8")
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            client.ehlo("sender.src.test")
            for name in ("size", "8bitmime", "smtputf8"):
                assert client.has_extn(name), f"the spooler does not offer {name.upper()}"
            code, text = client.mail(sender, options)
            assert code == 250, (code, text)
            for rcpt in rcpts:
                code, text = client.rcpt(rcpt)
                assert code == 250, (rcpt, code, text)
            code, text = client.data(data)
            assert code == 250, (code, text)
        sent = Sent(
            text.decode().rsplit(" ", 1)[-1], f"<drill-{self.number}@{SENDERS}>", kind, sender,
            list(rcpts),
        )  # fmt: skip
        self.sent.append(sent)
        return sent

    def mixed(self, count: int, first_user: int) -> list[Sent]:
        """``count`` messages cycling through the kinds, each to its own user."""
        kinds = ["dkim", "lf", "8bit", "utf8", "plus", "plain"]
        out = []
        for n in range(count):
            kind = kinds[n % len(kinds)]
            user = USERS[(first_user + n) % 40]
            if kind == "plus":
                rcpts = [user.replace("@", f"+drill{n}@")]
            elif kind == "utf8":
                rcpts = [UTF8_USER, user]
            else:
                rcpts = [user]
            sender = f"jörg@{SENDERS}" if kind == "utf8" else f"s{n % 3}@{SENDERS}"
            out.append(self.send(kind, rcpts, sender))
        return out


def rows(spooler: Spooler) -> list[tuple[str, str, str | None]]:
    """(rcpt, state, last_reply) of every recipient of the drilled domain, from the store file
    (read-only; the CLI would cost a process start per poll)."""
    uri = f"file:{spooler.db}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as conn:
        query = "SELECT rcpt, state, last_reply FROM recipients WHERE domain = ? ORDER BY id"
        return list(conn.execute(query, (DOMAIN,)))


def delivered_count(spooler: Spooler) -> int:
    return sum(state == "delivered" for _, state, _ in rows(spooler))


def at_tenant(tenant: TenantTarget) -> collections.Counter[tuple[str, str]]:
    """(Message-ID, recipient) -> how many times the tenant accepted it."""
    return collections.Counter(
        (message_id(item.data), rcpt) for item in tenant.recorder.received for rcpt in item.rcpt_tos
    )


def message_id(data: bytes) -> str:
    found = re.search(rb"^Message-ID: (<[^>]+>)", data, re.MULTILINE | re.IGNORECASE)
    assert found is not None, data[:300]
    return found.group(1).decode()


def expected(sent: list[Sent]) -> set[tuple[str, str]]:
    return {(item.message_id, rcpt) for item in sent for rcpt in item.rcpts}


def wait_delivered(tenant: TenantTarget, pairs: set[tuple[str, str]], what: str) -> None:
    wait_until(lambda: pairs <= set(at_tenant(tenant)), 40, what)


def without_arc(data: bytes) -> bytes:
    """The bytes after the ARC set the spooler put in front: what it stored."""
    lines = data.split(b"\r\n")
    at = 0
    while at < len(lines) and (
        lines[at][:4].lower() == b"arc-" or (at and lines[at][:1] in (b" ", b"\t"))
    ):
        at += 1
    return b"\r\n".join(lines[at:])


def arc_results(data: bytes) -> str:
    header = re.search(rb"^ARC-Authentication-Results:(.*?)\r\n(?![ \t])", data, re.M | re.S)
    assert header is not None, data[:600]
    return re.sub(r"\s+", " ", header.group(1).decode())


def test_drill(
    spooler_factory: Any, tenant: TenantTarget, targets: tuple[Target, Target], tmp_path: Path
) -> None:
    started = time.monotonic()
    sink, control = targets
    key, arc_record = arc_key(tmp_path)
    zone = "\n".join(
        [
            arc_record,
            KEY.record("sel", SENDERS),
            f'{SENDERS}. 60 IN TXT "v=spf1 ip4:127.0.0.1 -all"',
            f'_dmarc.{SENDERS}. 60 IN TXT "v=DMARC1; p=reject"',
        ]
    )
    dns = DnsServer(zone).start()
    try:
        _drill(spooler_factory, tenant, sink, control, dns, key, tmp_path)
    finally:
        dns.stop()
    assert time.monotonic() - started < 90


def _drill(
    spooler_factory: Any,
    tenant: TenantTarget,
    sink: Target,
    control: Target,
    dns: DnsServer,
    key: Path,
    tmp_path: Path,
) -> None:
    spooler: Spooler = spooler_factory(
        smtp={"spf_check_private": True},
        delivery={"resolver": dns.address, "retry_schedule": ["1s"], "connect_timeout": "5s"},
        arc={"domain": SEALER, "selector": "drill", "key_file": str(key)},
    )
    route = f"127.0.0.1:{tenant.port}"
    spooler.cli(
        "domain", "add", DOMAIN, "--route", route, "--tls", "off", "--profile", "exchange-online"
    )
    spooler.cli("domain", "add", SENDERS, "--route", f"127.0.0.1:{sink.port}", "--tls", "off")
    spooler.cli("recipients", "import", DOMAIN, str(recipients_csv(tmp_path / "recipients.csv")))
    spooler.start()
    tenant.tenant.missing = {mailbox_of(address) for address in NEW}
    senders = Senders(spooler.port)

    # -- 1. relay: mail flows; a mailbox not created yet is parked, never bounced -------------
    relayed = senders.mixed(8, first_user=0)
    early = senders.send("dkim", [USERS[9].replace("@", "+early@"), NEW[0]])
    wait_delivered(tenant, expected(relayed) | {(early.message_id, early.rcpts[0])}, "relay")
    parked = wait_until(
        lambda: [r for r in rows(spooler) if r[0] == NEW[0] and r[1] == "parked"],
        20,
        f"{NEW[0]} parked",
    )
    assert "5.4.1" in str(parked[0][2])
    tenant.tenant.create(NEW[0])
    spooler.cli("queue", "retry", "--parked", "--domain", DOMAIN)
    wait_delivered(tenant, expected([early]), f"{NEW[0]} after it was created")

    # -- 2. hold: mail accumulates, nothing reaches the tenant ----------------------------
    spooler.cli("domain", "hold", DOMAIN)
    before_hold = at_tenant(tenant)
    held = senders.mixed(12, first_user=8)
    held.append(senders.send("dkim", USERS[:250]))  # one message, 250 recipients
    held.append(senders.send("8bit", [USERS[20], NEW[1]]))
    held_rows = sum(len(item.rcpts) for item in held)
    wait_until(
        lambda: spooler.domain_status(DOMAIN)["held"] == held_rows, 20, "every held recipient"
    )
    # Positive control: the engine delivers elsewhere meanwhile; the held mail stayed.
    spooler.deliver_control(control.port, lambda: len(control.recorder.received))
    stays(lambda: at_tenant(tenant) == before_hold, 1.0, "nothing reaches the tenant in hold")

    # -- 3. release: the backlog goes, through a dropped connection and busy replies ----------
    tenant.behaviour.drop_in_data = 1  # after the text, before the reply
    tenant.tenant.cut_in_data = 1  # in the middle of the text
    spooler.cli("domain", "release", DOMAIN)
    ready = expected(held) - {(held[-1].message_id, NEW[1])}
    wait_delivered(tenant, ready, "the released backlog")
    assert tenant.behaviour.drop_in_data == 0 and tenant.tenant.cut_in_data == 0
    not_ready = wait_until(
        lambda: [r for r in rows(spooler) if r[0] == NEW[1] and r[2]], 20, f"{NEW[1]} tried"
    )
    assert not_ready[0][1] == "pending", not_ready
    assert str(not_ready[0][2]).startswith("not ready at target"), not_ready

    # -- 4. relay again: new mail flows straight through -------------------------------------
    after = senders.mixed(6, first_user=20)
    late = senders.send("plus", [NEW[2].replace("@", "+late@"), USERS[30]])
    wait_delivered(tenant, expected(after) | {(late.message_id, USERS[30])}, "relay again")
    tried = wait_until(
        lambda: [r for r in rows(spooler) if r[0] == late.rcpts[0] and r[2]], 20, "late tried"
    )
    assert tried[0][1] == "pending" and str(tried[0][2]).startswith("not ready at target")
    # The operator creates the mailboxes, then makes the deferred mail due at once.
    for address in NEW[1:]:
        tenant.tenant.create(address)
    spooler.cli("queue", "flush", "--domain", DOMAIN)
    accepted = expected(senders.sent)
    wait_delivered(tenant, accepted, "every acknowledged message")
    wait_until(lambda: delivered_count(spooler) == len(accepted), 20, "every delivery recorded")

    check_ledger(spooler, tenant, senders.sent)
    check_arc(tenant, dns, senders.sent)
    check_no_ndr(spooler, tenant, sink, control)


def check_ledger(spooler: Spooler, tenant: TenantTarget, sent: list[Sent]) -> None:
    """0 acknowledged messages lost, none twice, and the report equal to the tenant's record."""
    received = at_tenant(tenant)
    accepted = expected(sent)
    assert set(received) == accepted
    twice = {pair: count for pair, count in received.items() if count != 1}
    assert not twice, f"delivered more than once: {twice}"
    data_of = {
        (message_id(item.data), rcpt): item.data
        for item in tenant.recorder.received
        for rcpt in item.rcpt_tos
    }
    spooler.cli("report", "--domain", DOMAIN, "--check")  # exit status 0: nothing open
    report = json.loads(spooler.cli("report", "--domain", DOMAIN, "--format", "json").stdout)
    by_queue_id = {item.queue_id: item for item in sent}
    assert {(by_queue_id[r["id"]].message_id, r["rcpt"]) for r in report} == accepted
    assert len(report) == len(accepted)
    for row in report:
        data = data_of[(row["message_id"], row["rcpt"])]
        assert row["state"] == "delivered", row
        assert row["sent_sha256"] == hashlib.sha256(data).hexdigest(), row
        assert row["sha256"] == hashlib.sha256(without_arc(data)).hexdigest(), row
        assert row["remote_reply"].startswith("250"), row
        kind = by_queue_id[row["id"]].kind
        if kind in SIGNED_KINDS:
            assert (row["spf"], row["dkim"], row["dmarc"]) == ("pass", "pass", "pass"), row
    # What the Exchange-like tenant made the spooler go through.
    assert tenant.tenant.busy_given > 0 and tenant.tenant.not_created_given
    assert tenant.tenant.too_many_given == 0, "a transaction had more than 200 recipients"
    (big,) = [item for item in sent if len(item.rcpts) == 250]
    parts = [
        len(r.rcpt_tos) for r in tenant.recorder.received if message_id(r.data) == big.message_id
    ]
    assert len(parts) >= 2 and sum(parts) == 250 and max(parts) <= 200, parts
    assert not re.search(rb"\r(?!\n)|(?<!\r)\n", b"".join(data_of.values()))  # no bare LF


def check_arc(tenant: TenantTarget, dns: DnsServer, sent: list[Sent]) -> None:
    """Every message that left carries a valid ARC set with the arrival verdicts."""
    kinds = {item.message_id: item.kind for item in sent}
    dnsfunc = make_dnsfunc(dns.address)
    for item in tenant.recorder.received:
        cv, results, reason = dkim.arc_verify(item.data, dnsfunc=dnsfunc)
        assert cv == dkim.CV_Pass, (reason, item.data[:600])
        assert [r["instance"] for r in results] == [1]
        verdicts = arc_results(item.data)
        assert "spf=pass" in verdicts and "arc=none" in verdicts, verdicts
        if kinds[message_id(item.data)] in SIGNED_KINDS:
            assert "dkim=pass header.d=src.test" in verdicts, verdicts
            assert "dmarc=pass" in verdicts, verdicts
        else:
            # DMARC passes on the aligned SPF pass alone.
            assert "dkim=none" in verdicts and "dmarc=pass" in verdicts, verdicts


def check_no_ndr(spooler: Spooler, tenant: TenantTarget, sink: Target, control: Target) -> None:
    """No NDR anywhere: nothing from <> at the tenant or the control target, nothing at all at
    the senders' sink; then the positive control: a DSN the operator asks for lands there."""
    assert NULL.isdisjoint(tenant.tenant.senders)
    assert NULL.isdisjoint(item.mail_from for item in control.recorder.received)
    assert control.recorder.received  # (the hold's positive control went there)
    assert sink.recorder.mail_commands == 0 and sink.recorder.received == []

    spooler.cli("domain", "add", "bounce.test", "--route", "127.0.0.1:9", "--tls", "off", "--hold")

    def held_one() -> str | None:
        try:
            with smtplib.SMTP("127.0.0.1", spooler.port, timeout=10) as client:
                client.sendmail(f"ctl@{SENDERS}", ["x@bounce.test"], b"Subject: ctl\r\n\r\nx\r\n")
        except smtplib.SMTPRecipientsRefused:
            return None  # until the intake has read the new domain
        return "sent"

    wait_until(held_one, 15, "the control message accepted")
    (entry,) = json.loads(spooler.cli("queue", "list", "--domain", "bounce.test", "--json").stdout)
    spooler.cli("queue", "bounce", entry["id"])
    wait_until(lambda: sink.recorder.received, 15, "the control DSN at the senders' sink")
    (dsn,) = sink.recorder.received
    assert dsn.mail_from in NULL and dsn.rcpt_tos == [f"ctl@{SENDERS}"]
    assert b"report-type=delivery-status" in dsn.data
