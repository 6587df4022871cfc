"""Authentication at arrival in-process: DKIM and DMARC verdicts (intake/authcheck.py) against
a real DNS server (dnslib on 127.0.0.1) with keys the test signs with (dkimpy), and the
Authenticator (intake/auth.py) storing verdicts into a real SQLite store."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mxspool.body import BodyBuffer
from mxspool.envelope import Envelope, MailParams, Recipient
from mxspool.intake import auth as auth_module
from mxspool.intake import authcheck, authdns
from mxspool.intake.auth import Authenticator
from mxspool.intake.authcheck import organizational_domain
from mxspool.store import queries
from mxspool.store.base import ClientInfo, IncomingMessage, StoredMessage
from mxspool.store.sqlite import SqliteStore
from tests.delivery.dnsserver import DnsServer
from tests.e2e.authkit import Key, SilentDns, message
from tests.waiting import eventually

KEY = Key()
OTHER = Key()  # signs, but is not the published key


def zone() -> str:
    return "\n".join(
        [
            KEY.record("sel", "signed.test"),
            KEY.record("sel", "mail.org.test"),
            OTHER.record("other", "signed.test").replace(OTHER.public, "MIIBbroken"),
            '_dmarc.signed.test. 60 IN TXT "v=DMARC1; p=reject"',
            '_dmarc.strict.test. 60 IN TXT "v=DMARC1; p=quarantine; adkim=s; aspf=s"',
            '_dmarc.org.test. 60 IN TXT "v=DMARC1; p=none; sp=reject"',
            "nodmarc.test. 60 IN A 192.0.2.1",
        ]
    )


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    server = DnsServer(zone()).start()
    yield server
    server.stop()


def lookup(dns: DnsServer, lifetime: float = 3.0) -> authcheck.Lookup:
    return lambda name: authdns.txt(dns.address, name, lifetime)


def test_dkim_results_per_signature(dns: DnsServer) -> None:
    find = lookup(dns)
    signed = KEY.sign(message("a@signed.test"), "signed.test")
    assert [r.result for r in authcheck.check_dkim(signed, find)] == ["pass"]
    assert authcheck.check_dkim(message("a@signed.test"), find) == ()  # unsigned
    # A body changed after signing; no key at the selector; a key that does not parse.
    changed = signed.replace(b"Hello.", b"Hallo.")
    assert [r.result for r in authcheck.check_dkim(changed, find)] == ["fail"]
    nokey = KEY.sign(message("a@signed.test"), "signed.test", selector="nokey")
    (missing,) = authcheck.check_dkim(nokey, find)
    assert missing.result == "permerror" and "no key" in missing.reason
    badkey = OTHER.sign(message("a@signed.test"), "signed.test", selector="other")
    assert [r.result for r in authcheck.check_dkim(badkey, find)] == ["permerror"]
    # Every signature is its own result, with its d= and s=.
    both = KEY.sign(nokey, "signed.test")
    results = authcheck.check_dkim(both, find)
    assert [(r.result, r.domain, r.selector) for r in results] == [
        ("pass", "signed.test", "sel"),
        ("permerror", "signed.test", "nokey"),
    ]


def test_expiry_is_judged_at_arrival(dns: DnsServer) -> None:
    find = lookup(dns)
    # Valid now and for one more minute: the verdict taken now is pass (it is what the
    # release seals, days later, when the signature alone would no longer verify).
    short = KEY.sign(message("a@signed.test"), "signed.test", expire_in=60)
    assert b" x=" in short.split(b"\r\nFrom:")[0]
    assert [r.result for r in authcheck.check_dkim(short, find)] == ["pass"]
    # Already expired (beyond dkimpy's 10 hours of clock skew): fail, saying why.
    expired = KEY.sign(message("a@signed.test"), "signed.test", expire_in=-11 * 3600)
    (result,) = authcheck.check_dkim(expired, find)
    assert result.result == "fail" and "x= value is past" in result.reason


def test_dmarc_alignment_and_policy(dns: DnsServer) -> None:
    find = lookup(dns)

    def dmarc(data: bytes, spf: str | None, mail_from: str) -> authcheck.DmarcResult:
        return authcheck.check_dmarc(data, spf, mail_from, authcheck.check_dkim(data, find), find)

    unsigned = message("a@signed.test")
    assert dmarc(unsigned, "fail", "a@signed.test") == authcheck.DmarcResult(
        "fail", "signed.test", "reject"
    )
    assert dmarc(unsigned, "pass", "b@bounce.signed.test").result == "pass"  # relaxed SPF
    assert dmarc(unsigned, "pass", "b@elsewhere.test").result == "fail"  # not aligned
    signed = KEY.sign(unsigned, "signed.test")
    assert dmarc(signed, "fail", "b@elsewhere.test").result == "pass"  # DKIM aligned
    # Strict alignment: a subdomain's SPF pass does not align; the exact domain does.
    strict = message("a@strict.test")
    assert dmarc(strict, "pass", "x@sub.strict.test") == authcheck.DmarcResult(
        "fail", "strict.test", "quarantine"
    )
    assert dmarc(strict, "pass", "x@strict.test").result == "pass"
    # No record at the From domain: the organizational domain's, with its sp= policy.
    sub = KEY.sign(message("a@mail.org.test"), "mail.org.test")
    assert dmarc(sub, None, "") == authcheck.DmarcResult("pass", "mail.org.test", "reject")
    assert dmarc(message("a@mail.org.test"), None, "").result == "fail"
    # No record anywhere; no From; several From domains.
    assert dmarc(message("a@nodmarc.test"), "pass", "a@nodmarc.test").result == "none"
    assert dmarc(b"Subject: x\r\n\r\nbody\r\n", None, "").result == "none"
    several = message("a@signed.test, b@nodmarc.test")
    assert dmarc(several, None, "").result == "permerror"


def test_organizational_domain_from_the_packaged_public_suffix_list() -> None:
    assert organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert organizational_domain("Mail.Example.COM.") == "example.com"
    assert organizational_domain("mail.example.test") == "example.test"  # unknown TLD
    assert organizational_domain("example.com") == "example.com"
    assert organizational_domain("com") == "com"


def test_the_public_suffix_list_is_parsed_at_start_not_at_the_first_verdict() -> None:
    """DMARC alignment runs on the event loop: the list's ~40 ms parse happens when the
    Authenticator is made (before serve listens), in a fresh process, not at the first verdict."""
    code = (
        "from mxspool.intake import authcheck\n"
        "from mxspool.intake.auth import Authenticator\n"
        "before = authcheck._suffixes.cache_info().currsize\n"
        "Authenticator(object(), authserv_id='mx.test')\n"
        "print(before, authcheck._suffixes.cache_info().currsize)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["0", "1"], out.stderr


def test_a_dns_server_that_never_answers_gives_temperror_within_the_bound() -> None:
    silent = SilentDns()
    try:
        started = time.monotonic()
        signed = KEY.sign(message("a@signed.test"), "signed.test")
        find = lambda name: authdns.txt(silent.address, name, 1.0)  # noqa: E731
        dkim = authcheck.check_dkim(signed, find)
        dmarc = authcheck.check_dmarc(signed, None, "", dkim, find)
        assert [r.result for r in dkim] == ["temperror"] and dmarc.result == "temperror"
        assert time.monotonic() - started < 4.0  # two lookups of at most ~1 s each
    finally:
        silent.close()


def test_the_header_value_and_tags() -> None:
    verdict = authcheck.Verdict(
        "pass",
        "bounce@signed.test",
        (authcheck.DkimResult("pass", "signed.test", "sel"),),
        authcheck.DmarcResult("pass", "signed.test", "reject"),
    )
    assert verdict.header_value("mx.test.local") == (
        "mx.test.local; spf=pass smtp.mailfrom=bounce@signed.test; "
        "dkim=pass header.d=signed.test header.s=sel; "
        "dmarc=pass header.from=signed.test policy.dmarc=reject"
    )
    assert verdict.tags() == ("spf=pass", "dkim=pass", "dmarc=pass")
    # SPF not evaluated (internal client): no spf= at all; no signature: dkim=none.
    internal = authcheck.Verdict(None, "", (), authcheck.DmarcResult("none"))
    assert internal.header_value("mx") == "mx; dkim=none; dmarc=none"
    assert internal.tags() == ("dkim=none", "dmarc=none")
    # A value that is not a plain token never breaks the header's syntax.
    odd = authcheck.Verdict("fail", '"a b;c"@x.test', (), authcheck.DmarcResult("none"))
    assert "smtp.mailfrom=x.test;" in odd.header_value("mx")


# -- the Authenticator, into a real store ----------------------------------------------------


def incoming(data: bytes, spill_threshold: int = 1 << 20) -> IncomingMessage:
    body = BodyBuffer(spill_threshold)
    body.write(data)
    return IncomingMessage(
        id=f"A{time.monotonic_ns()}",
        envelope=Envelope("a@signed.test", MailParams(), (Recipient("user@example.test"),)),
        client=ClientInfo("127.0.0.1", "client.test"),
        received_at=time.time(),
        message_id=None,
        body=body,
    )


async def verdict_of(store: SqliteStore, queue_id: str) -> StoredMessage:
    async def judged() -> StoredMessage | None:
        stored = await store.get_message(queue_id)
        return stored if stored is not None and stored.auth_at is not None else None

    return await eventually(judged, within=10, what=f"the verdict of {queue_id}")


async def test_authenticator_stores_the_verdict(tmp_path: Path, dns: DnsServer) -> None:
    store = SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await store.open()
    auth = Authenticator(
        store, authserv_id="mx.test", resolver=dns.address, check_private=True, timeout=3.0
    )
    try:
        signed = KEY.sign(message("a@signed.test", body="x" * 5000 + "\r\n"), "signed.test")
        small, spilled = incoming(signed), incoming(signed, spill_threshold=1024)
        assert spilled.body.spilled
        for item in (small, spilled):
            await store.accept_message(item)
            check = auth.start("127.0.0.1", "a@signed.test", "client.test")
            auth.submit(item, check)
        for item in (small, spilled):
            stored = await verdict_of(store, item.id)
            assert stored.auth_results == (
                "mx.test; spf=none smtp.mailfrom=a@signed.test; "
                "dkim=pass header.d=signed.test header.s=sel; "
                "dmarc=pass header.from=signed.test policy.dmarc=reject"
            )
            assert stored.tags == ("spf=none", "dkim=pass", "dmarc=pass")
        assert spilled.body._file is None  # the spill file was closed once read
        assert b"".join([p async for p in store.read_body(small.id)]) == signed
    finally:
        auth.close()
        await store.close()


async def test_too_many_in_flight_leaves_the_verdict_to_the_background_pass(
    tmp_path: Path, dns: DnsServer
) -> None:
    store = SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await store.open()
    full = Authenticator(store, authserv_id="mx.test", resolver=dns.address, max_in_flight=0)
    try:
        item = incoming(KEY.sign(message("a@signed.test"), "signed.test"))
        await store.accept_message(item)
        full.submit(item, None)
        # No temperror for being busy: the verdict stays empty...
        await full.drain()
        stored = await store.get_message(item.id)
        assert stored is not None and stored.auth_at is None
        assert full.deferred == 1
        # ... until the background pass judges it from the stored bytes.
        assert await full.catch_up(time.time() + 1) == 1
        judged = await verdict_of(store, item.id)
        assert judged.tags == ("dkim=pass", "dmarc=pass")
    finally:
        full.close()
        await full.drain()
        await store.close()


async def test_the_background_pass_reaches_back_past_a_long_burst(
    tmp_path: Path, dns: DnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A burst deferred more messages than the pass's window of recent messages holds: the
    # oldest deferred one (first) fell out of it and was never judged.
    monkeypatch.setattr(queries, "RECENT_SCAN", 4)
    store = SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await store.open()
    full = Authenticator(store, authserv_id="mx.test", resolver=dns.address, max_in_flight=0)
    try:
        items = [incoming(KEY.sign(message("a@signed.test"), "signed.test")) for _ in range(8)]
        for item in items:
            await store.accept_message(item)
            full.submit(item, None)
        assert full.deferred == 8
        # The control: the window of the newest four alone misses the first four.
        window = await store.without_authentication(time.time() + 1, 100)
        assert window == [item.id for item in items[4:]]
        assert await full.catch_up(time.time() + 1) == 8
        for item in items:
            assert (await verdict_of(store, item.id)).tags == ("dkim=pass", "dmarc=pass")
    finally:
        full.close()
        await full.drain()
        await store.close()


async def test_a_verdict_written_while_the_pass_reads_is_not_judged_again(
    tmp_path: Path, dns: DnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pass's read of unjudged messages may start before a verdict's write commits and
    return after it: the message is then neither unjudged nor being checked, and must not be
    checked a second time (a CI run counted 9 checks for 8 messages)."""
    # The verdict's write waits for the test, not for the 10 ms timer (which could otherwise
    # write it between two looks at the queue).
    monkeypatch.setattr(auth_module, "WRITE_DELAY", 3600.0)
    store = SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await store.open()
    auth = Authenticator(store, authserv_id="mx.test", resolver=dns.address)
    try:
        item = incoming(KEY.sign(message("a@signed.test"), "signed.test"))
        await store.accept_message(item)
        auth.submit(item, None)
        await eventually(lambda: bool(auth._batch), what="the verdict queued for its write")
        unwritten = await store.get_message(item.id)
        assert unwritten is not None and unwritten.auth_at is None  # not before the read below
        original = store.without_authentication
        listed: list[str] = []

        async def read_then_write(*args: object) -> list[str]:
            ids = await original(*args)  # type: ignore[arg-type]
            listed.extend(ids)
            auth._flush()  # the write commits after the read, before the pass looks
            await asyncio.gather(*auth._writes)
            return ids

        monkeypatch.setattr(store, "without_authentication", read_then_write)
        assert await auth.catch_up(time.time() + 1) == 0
        assert item.id in listed  # the control: the read did list it as unjudged
        assert (await verdict_of(store, item.id)).tags == ("dkim=pass", "dmarc=pass")
    finally:
        auth.close()
        await auth.drain()
        await store.close()


async def test_recover_judges_what_a_crash_left_without_a_verdict(
    tmp_path: Path, dns: DnsServer
) -> None:
    store = SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await store.open()
    auth = Authenticator(
        store, authserv_id="mx.test", resolver=dns.address, check_private=True, timeout=3.0
    )
    try:
        # Committed, then the process died before the verdict: nothing was submitted.
        orphan = incoming(KEY.sign(message("a@signed.test"), "signed.test"))
        judged = incoming(message("a@signed.test"))
        for item in (orphan, judged):
            await store.accept_message(item)
        await store.set_authentication(judged.id, "mx.test; dkim=none", ("dkim=none",))
        await auth.recover(time.time())
        assert auth.recovered == 1
        stored = await store.get_message(orphan.id)
        assert stored is not None and stored.auth_results is not None
        assert stored.tags == ("spf=none", "dkim=pass", "dmarc=pass")
        untouched = await store.get_message(judged.id)
        assert untouched is not None and untouched.auth_results == "mx.test; dkim=none"
    finally:
        auth.close()
        await store.close()


def mark_of(store: SqliteStore, node: str) -> int | None:
    """The node's mark (``Store.mark_unjudged``), read as another process would."""
    with sqlite3.connect(f"file:{store.path}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (f"unjudged:{node}",))
        found = row.fetchone()
    return None if found is None else int(found[0])


def seq_of(store: SqliteStore, queue_id: str) -> int:
    with sqlite3.connect(f"file:{store.path}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT seq FROM messages WHERE id = ?", (queue_id,)).fetchone()[0])


async def test_recovery_reaches_back_to_the_node_mark_past_later_arrivals(
    tmp_path: Path, dns: DnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mx1 started (noting its mark), committed three messages and died before judging them;
    # then more messages than the window of recent ones arrived, all judged (on another node,
    # or on mx1 after its restart). mx1's recovery still finds the three.
    monkeypatch.setattr(queries, "RECENT_SCAN", 4)
    store = SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await store.open()

    def node(name: str) -> Authenticator:
        return Authenticator(
            store, authserv_id="mx.test", resolver=dns.address, timeout=1.0, node=name
        )

    first = node("mx1")
    run = asyncio.create_task(first.run(time.time()))
    try:
        await eventually(lambda: mark_of(store, "mx1") is not None, what="mx1's mark")
    finally:
        run.cancel()
        first.close()
    orphans = [incoming(KEY.sign(message("a@signed.test"), "signed.test")) for _ in range(3)]
    later = [incoming(message("a@signed.test")) for _ in range(6)]
    for item in orphans + later:
        await store.accept_message(item)
    for item in later:
        await store.set_authentication(item.id, "mx.test; dkim=none", ("dkim=none",))
    # The control: the window of the newest four alone, all judged, misses them.
    assert await store.without_authentication(time.time() + 1, 10) == []
    second = node("mx1")
    try:
        await second.recover(time.time())
        assert second.recovered == 3 and second.recovery_done
        for item in orphans:
            assert (await verdict_of(store, item.id)).tags == ("dkim=pass", "dmarc=pass")
        # Nothing owed any more: the mark moved up to the newest four.
        mark = mark_of(store, "mx1")
        assert mark is not None and mark > seq_of(store, orphans[-1].id)
    finally:
        second.close()
        await second.drain()
        await store.close()


async def test_a_node_takes_over_the_mark_of_a_node_that_is_gone(
    tmp_path: Path, dns: DnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mx1 died owing three verdicts and never came back (or serves again under a new name);
    # more messages than the window of recent ones arrived since. mx2's recovery takes mx1's
    # mark over and judges the three; later, a mark found at the periodic look is judged too.
    monkeypatch.setattr(queries, "RECENT_SCAN", 4)
    monkeypatch.setattr(auth_module, "ADOPT_INTERVAL", 0.2)
    store = SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await store.open()
    orphans = [incoming(KEY.sign(message("a@signed.test"), "signed.test")) for _ in range(4)]
    later = [incoming(message("a@signed.test")) for _ in range(6)]
    for item in orphans[:3]:
        await store.accept_message(item)
    await store.mark_unjudged("mx1", [item.id for item in orphans[:3]])
    for item in later:
        await store.accept_message(item)
        await store.set_authentication(item.id, "mx.test; dkim=none", ("dkim=none",))
    assert await store.without_authentication(time.time() + 1, 10) == []  # the control
    auth = Authenticator(
        store, authserv_id="mx.test", resolver=dns.address, timeout=1.0, node="mx2"
    )
    run = asyncio.create_task(auth.run(time.time()))
    try:
        await eventually(lambda: auth.recovery_done, what="mx2's recovery")
        assert auth.recovered == 3
        for item in orphans[:3]:
            assert (await verdict_of(store, item.id)).tags == ("dkim=pass", "dmarc=pass")
        assert mark_of(store, "mx1") is None
        # A mark that turns up later (a node gone since) is found at the next look.
        await store.accept_message(orphans[3])
        await store.mark_unjudged("mx3", [orphans[3].id])
        for _ in range(6):  # past the window again
            judged = incoming(message("a@signed.test"))
            await store.accept_message(judged)
            await store.set_authentication(judged.id, "mx.test; dkim=none", ("dkim=none",))
        assert (await verdict_of(store, orphans[3].id)).tags == ("dkim=pass", "dmarc=pass")
        await eventually(lambda: mark_of(store, "mx3") is None, what="mx3's mark taken over")
    finally:
        run.cancel()
        auth.close()
        await auth.drain()
        await store.close()


async def test_the_mark_stays_at_a_message_still_being_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A message whose check is slow (its DNS does not answer) while more than the window of
    # recent messages arrives: the mark the background pass moves stays at it, so a crash
    # now would not lose it; once its verdict is stored the mark moves past it.
    monkeypatch.setattr(queries, "RECENT_SCAN", 4)
    monkeypatch.setattr(auth_module, "SWEEP_INTERVAL", 0.2)
    silent = SilentDns()
    store = SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await store.open()
    auth = Authenticator(
        store, authserv_id="mx.test", resolver=silent.address, timeout=3.0, node="mx1"
    )
    run = asyncio.create_task(auth.run(time.time()))
    try:
        await eventually(lambda: auth.recovery_done, what="the start's recovery")
        slow = incoming(KEY.sign(message("a@signed.test"), "signed.test"))
        await store.accept_message(slow)
        auth.submit(slow, None)
        for _ in range(6):
            item = incoming(message("a@signed.test"))
            await store.accept_message(item)
            await store.set_authentication(item.id, "mx.test; dkim=none", ("dkim=none",))
        slow_seq = seq_of(store, slow.id)
        # The control: the window of the newest four no longer holds it ...
        assert await store.without_authentication(time.time() + 1, 10) == []
        # ... the mark does, while its check runs (the pass moves the mark every 0.2 s).
        await eventually(lambda: mark_of(store, "mx1") == slow_seq, what="the mark at it")
        stored = await store.get_message(slow.id)
        assert stored is not None and stored.auth_at is None
        found = await store.without_authentication(time.time() + 1, 10, node="mx1")
        assert found == [slow.id]
        # Its DNS time is up: temperror stored, and the mark moves on past it.
        assert (await verdict_of(store, slow.id)).tags == ("dkim=temperror", "dmarc=temperror")
        await eventually(
            lambda: (mark_of(store, "mx1") or 0) > slow_seq, what="the mark to move on"
        )
    finally:
        run.cancel()
        auth.close()
        await auth.drain()
        await store.close()
        silent.close()
