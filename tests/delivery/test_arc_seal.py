"""ARC sealing on release: the engine against a real SMTP target, seals checked by dkimpy's
ARC verifier with keys served by a local DNS server; the streamed body hash against dkimpy's;
the key file's checks; memory for a large message."""

from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from mxspool import operations as ops
from mxspool.delivery.arc import ArcSealer, make_dnsfunc
from mxspool.delivery.arckey import ArcKey, ArcKeyError, generate, load_key, zone_line
from mxspool.delivery.bodyhash import BodyHasher
from mxspool.delivery.dnscache import DnsCache
from mxspool.delivery.engine import DrainSettings
from mxspool.delivery.outcomes import RetryPolicy
from mxspool.delivery.routing import Router
from mxspool.delivery.scheduler import Scheduler, new_owner_id
from mxspool.store.sqlite import SqliteStore
from tests.delivery.conftest import DOMAIN, add_domain, make_connector, put_message, release
from tests.delivery.dnsserver import DnsServer
from tests.delivery.target import Target
from tests.waiting import eventually

SEALER = "seal.test"
SELECTOR = "mxs1"
FORWARDER = "forwarder.test"
AUTHSERV = "mx.test.local"
VERDICT = (
    f"{AUTHSERV}; spf=pass smtp.mailfrom=src.test; dkim=pass header.d=src.test "
    "header.s=sel; dmarc=pass header.from=src.test"
)


@pytest.fixture(scope="module")
def keys() -> tuple[ArcKey, bytes]:
    """(ours, another sealer's PKCS#1 PEM)."""
    _pem, ours = generate(2048)
    _pem, theirs = generate(1024)
    return ours, theirs.private


@pytest.fixture(scope="module")
def dns_server(keys: tuple[ArcKey, bytes]) -> Iterator[DnsServer]:
    ours, theirs = keys
    theirs_key = load_key_from_pem(theirs)
    zone = "\n".join([zone_line(SELECTOR, SEALER, ours), zone_line("fw", FORWARDER, theirs_key)])
    server = DnsServer(zone).start()
    yield server
    server.stop()


def load_key_from_pem(pem: bytes) -> ArcKey:
    from mxspool.delivery.arckey import _from_private

    return _from_private(serialization.load_pem_private_key(pem, password=None), "test")


@pytest.fixture
def sealer(keys: tuple[ArcKey, bytes], dns_server: DnsServer) -> ArcSealer:
    return ArcSealer(
        domain=SEALER,
        selector=SELECTOR,
        key=keys[0],
        authserv_id=AUTHSERV,
        dnsfunc=make_dnsfunc(dns_server.address),
    )


@pytest.fixture
async def sealing_engine(store: SqliteStore, sealer: ArcSealer) -> AsyncIterator[Scheduler]:
    scheduler = Scheduler(
        store,
        Router(DnsCache("")),
        make_connector("own"),
        DrainSettings(
            owner=new_owner_id(),
            concurrency=2,
            default_rate=0.0,
            policy=RetryPolicy((0.2,), 3600.0),
            sealer=sealer,
        ),
        poll_interval=0.1,
    )
    task = asyncio.create_task(scheduler.run())
    yield scheduler
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def original(subject: str = "sealed", body: bytes = b"Hello,  world \r\n\r\nBye.\r\n") -> bytes:
    return (
        b"From: <sender@src.test>\r\nTo: <user@example.test>\r\n"
        b"Subject: "
        + subject.encode()
        + b"\r\nMessage-ID: <"
        + subject.encode()
        + b"@src.test>\r\n"
        b"\r\n" + body
    )


def stored(message: bytes) -> bytes:
    """As the intake stores it: our Received: line in front."""
    return b"Received: from client.test by mx.test.local; id 1\r\n" + message


def forwarded(message: bytes, dns_key: bytes) -> bytes:
    """``message`` as an ARC-sealing forwarder passes it on (i=1, cv=none)."""
    with_results = b"Authentication-Results: forwarder.test; spf=pass smtp.mailfrom=src.test\r\n"
    arc_set = dkim.arc_sign(
        with_results + message, b"fw", FORWARDER.encode(), dns_key, b"forwarder.test"
    )
    assert arc_set, "dkimpy made no ARC set for the forwarder"
    return b"".join(arc_set) + with_results + message


def arc_tags(data: bytes, name: str, instance: int) -> dict[str, str]:
    """The tags of header ``name`` with ``i=instance`` in ``data``'s header block."""
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    unfolded = re.sub(r"\r\n[ \t]+", " ", head)
    for line in unfolded.split("\r\n"):
        field, _, value = line.partition(":")
        if field.lower() != name.lower():
            continue
        tags = dict(
            (part.split("=", 1)[0].strip(), part.split("=", 1)[1].strip())
            for part in value.split(";")
            if "=" in part
        )
        if tags.get("i") == str(instance):
            return tags
    raise AssertionError(f"no {name} i={instance} in {head!r}")


async def release_and_receive(
    store: SqliteStore, target: Target, data: bytes, verdict: str | None
) -> tuple[str, bytes]:
    queue_id, _ = await put_message(store, [f"user@{DOMAIN}"], data)
    if verdict is not None:
        await store.set_authentication(queue_id, verdict, ["spf=pass", "dkim=pass", "dmarc=pass"])
    await release(store)
    await eventually(lambda: len(target.recorder.received) == 1, 15, "the released message")
    received = target.recorder.received[0].data
    return queue_id, received


def verify(data: bytes, dns_server: DnsServer) -> tuple[object, list[dict[str, object]], str]:
    cv, results, reason = dkim.arc_verify(data, dnsfunc=make_dnsfunc(dns_server.address))
    return cv, results, reason


async def test_released_message_carries_a_valid_seal_with_the_stored_verdict(
    store: SqliteStore, target: Target, sealing_engine: Scheduler, dns_server: DnsServer
) -> None:
    await add_domain(store, target.port, hold=True)
    data = stored(original())
    queue_id, received = await release_and_receive(store, target, data, VERDICT)

    cv, results, reason = verify(received, dns_server)
    assert cv == dkim.CV_Pass, reason
    assert [r["instance"] for r in results] == [1]
    seal = arc_tags(received, "ARC-Seal", 1)
    assert (seal["cv"], seal["d"], seal["s"]) == ("none", SEALER, SELECTOR)
    aar = received.split(b"ARC-Authentication-Results:", 1)[1].split(b"\r\n\r\n")[0]
    aar_text = re.sub(r"\s+", " ", aar.decode())
    for verdict in ("spf=pass smtp.mailfrom=src.test", "dkim=pass header.d=src.test",
                    "dmarc=pass header.from=src.test", "arc=none"):  # fmt: skip
        assert verdict in aar_text
    assert aar_text.startswith(f" i=1; {AUTHSERV};")
    assert b"\nAuthentication-Results:" not in received, "no A-R header of ours is added"

    # What was stored is unchanged; what left is the seal plus exactly those bytes.
    message = await store.get_message(queue_id)
    assert message is not None
    chunks = [piece async for piece in store.read_body(queue_id)]
    assert b"".join(chunks) == data
    assert message.sha256 == hashlib.sha256(data).hexdigest()
    assert received.endswith(data)
    assert received.startswith(b"ARC-Seal: i=1;")

    async def delivered() -> bool:
        return [row["state"] async for row in ops.report(store)] == ["delivered"]

    await eventually(delivered, 10, "the delivery recorded")
    (row,) = [row async for row in ops.report(store)]
    assert row["sha256"] == message.sha256
    assert row["sent_sha256"] == hashlib.sha256(received).hexdigest() != row["sha256"]
    assert (row["spf"], row["dkim"], row["dmarc"]) == ("pass", "pass", "pass")


async def test_message_with_a_valid_chain_gets_instance_2_and_cv_pass(
    store: SqliteStore,
    target: Target,
    sealing_engine: Scheduler,
    dns_server: DnsServer,
    keys: tuple[ArcKey, bytes],
) -> None:
    await add_domain(store, target.port, hold=True)
    data = stored(forwarded(original("chain"), keys[1]))
    cv, _results, reason = verify(data, dns_server)
    assert cv == dkim.CV_Pass, f"the forwarder's chain must verify before: {reason}"
    _queue_id, received = await release_and_receive(store, target, data, VERDICT)

    cv, results, reason = verify(received, dns_server)
    assert cv == dkim.CV_Pass, reason
    assert [r["instance"] for r in results] == [2, 1]
    assert arc_tags(received, "ARC-Seal", 2)["cv"] == "pass"
    assert arc_tags(received, "ARC-Seal", 2)["d"] == SEALER
    assert "arc=pass" in re.sub(r"\s+", " ", received.decode())
    assert received.endswith(data)


async def test_tampered_chain_is_sealed_with_cv_fail(
    store: SqliteStore,
    target: Target,
    sealing_engine: Scheduler,
    dns_server: DnsServer,
    keys: tuple[ArcKey, bytes],
) -> None:
    await add_domain(store, target.port, hold=True)
    data = stored(forwarded(original("tampered"), keys[1])).replace(b"Bye.", b"Buy!")
    _queue_id, received = await release_and_receive(store, target, data, VERDICT)

    cv, results, reason = verify(received, dns_server)
    seal = arc_tags(received, "ARC-Seal", 2)
    assert seal["cv"] == "fail"
    # The chain is failed (ours says so, and a verifier stops there); our own message
    # signature is genuine. (dkimpy seals a failed chain over its own set only, as RFC 8617
    # 5.1.2 allows, and its verifier does not check such a seal: cv=fail ends the chain.)
    assert cv is None and "ARC-Seal[2] reported failure" in reason
    assert results[0]["instance"] == 2 and results[0]["ams-valid"] is True
    assert "arc=fail" in re.sub(r"\s+", " ", received.decode())


async def test_message_without_a_verdict_is_sealed_as_unchecked(
    sealer: ArcSealer, dns_server: DnsServer
) -> None:
    data = stored(original("no verdict"))
    seal = await sealer.seal(lambda: _pieces(data, 5), None)
    assert seal is not None and (seal.instance, seal.cv) == (1, "none")
    out = seal.headers + data
    assert verify(out, dns_server)[0] == dkim.CV_Pass
    folded = re.split(rb"\r\n(?![ \t])", out.split(b"ARC-Authentication-Results:")[1])[0]
    aar = re.sub(r"\s+", " ", folded.decode())
    assert aar == f" i=1; {AUTHSERV}; arc=none"
    assert "spf=" not in aar  # nothing claimed that was not checked


async def test_foreign_authentication_results_do_not_reach_the_seal(
    sealer: ArcSealer, dns_server: DnsServer
) -> None:
    forged = b"Authentication-Results: mx.test.local; dmarc=pass header.from=bank.test\r\n"
    data = stored(forged + original("forged"))
    seal = await sealer.seal(lambda: _pieces(data, 64), f"{AUTHSERV}; dmarc=fail")
    assert seal is not None
    assert verify(seal.headers + data, dns_server)[0] == dkim.CV_Pass
    assert b"bank.test" not in seal.headers and b"dmarc=fail" in seal.headers


async def _pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


# -- the streamed body hash is dkimpy's --------------------------------------------------------

_LINE = st.lists(
    st.sampled_from([b"a", b"b", b" ", b"\t", b".", b"\r", b"\n", b"\r\n"]), max_size=12
)


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.binary(max_size=0) | _LINE.map(b"".join), max_size=12),
    cut=st.integers(min_value=1, max_value=7),
    canon=st.sampled_from(["relaxed", "simple"]),
    limit=st.none() | st.integers(min_value=0, max_value=40),
)
def test_streamed_body_hash_equals_dkimpy(
    parts: list[bytes], cut: int, canon: str, limit: int | None
) -> None:
    body = b"".join(parts)
    policy = dkim.CanonicalizationPolicy.from_c_value(f"{canon}/{canon}".encode())
    _headers, parsed_body = dkim.rfc822_parse(b"Subject: x\r\n\r\n" + body)
    expected_bytes = policy.canonicalize_body(parsed_body)
    if limit is not None:
        expected_bytes = expected_bytes[:limit]
    hasher = BodyHasher(canon, limit=limit)  # type: ignore[arg-type]
    for start in range(0, len(body), cut):
        hasher.feed(body[start : start + cut])
    assert hasher.digest() == hashlib.sha256(expected_bytes).digest(), body


def test_long_line_without_end_is_hashed_like_dkimpy() -> None:
    body = b"word   " * 400_000 + b"\t \r\nnext  line  \r\n\r\n"
    policy = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    hasher = BodyHasher("relaxed")
    for start in range(0, len(body), 65_536):
        hasher.feed(body[start : start + 65_536])
    assert hasher.digest() == hashlib.sha256(policy.canonicalize_body(body)).digest()


# -- keys ------------------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_key_file_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ArcKeyError, match="cannot read it"):
        load_key(tmp_path / "missing.key")
    with pytest.raises(ArcKeyError, match="not a PEM private key"):
        load_key(_write(tmp_path / "junk.key", b"hello"))
    ed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ArcKeyError, match="Ed25519; ARC seals are RSA only"):
        load_key(_write(tmp_path / "ed.key", ed))
    small = subprocess.run(
        ["openssl", "genrsa", "768"], capture_output=True, check=True, timeout=30
    ).stdout  # cryptography makes no key under 1024 bits; OpenSSL still does
    with pytest.raises(ArcKeyError, match="768 bits"):
        load_key(_write(tmp_path / "small.key", small))
    good = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    locked = _pem(good, serialization.BestAvailableEncryption(b"secret"))
    with pytest.raises(ArcKeyError, match="encrypted"):
        load_key(_write(tmp_path / "locked.key", locked))
    pkcs1 = good.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert load_key(_write(tmp_path / "pkcs1.key", pkcs1)).bits == 1024  # positive control


def _pem(key: rsa.RSAPrivateKey, encryption: serialization.KeySerializationEncryption) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def test_keygen_writes_a_private_key_whose_printed_record_verifies_a_seal(tmp_path: Path) -> None:
    out = tmp_path / "arc.key"
    mxspool = Path(sys.executable).parent / "mxspool"
    command = [str(mxspool), "arc", "keygen", "--domain", "keys.test", "--selector", "k1",
               "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    record = next(line for line in result.stdout.splitlines() if " IN TXT " in line)
    assert record.startswith("k1._domainkey.keys.test. IN TXT ")
    strings = re.findall(r'"([^"]*)"', record)
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    assert 'domain = "keys.test"' in result.stdout and 'selector = "k1"' in result.stdout
    assert f"key_file = {str(out)!r}".replace("'", '"') in result.stdout

    server = DnsServer(record).start()  # the printed line, as a zone file would hold it
    try:
        sealer = ArcSealer(
            domain="keys.test",
            selector="k1",
            key=load_key(out),
            authserv_id=AUTHSERV,
            dnsfunc=make_dnsfunc(server.address),
        )
        data = stored(original("keygen"))
        seal = asyncio.run(sealer.seal(lambda: _pieces(data, 1000), VERDICT))
        assert seal is not None
        assert verify(seal.headers + data, server)[0] == dkim.CV_Pass
    finally:
        server.stop()

    again = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 2 and "never overwrites" in again.stderr
    assert load_key(out).public.decode() in "".join(strings)  # the file is the first key


# -- memory ----------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, tracemalloc
    from mxspool.delivery.arc import ArcSealer
    from mxspool.delivery.arckey import generate

    SIZE, HOLD = int(sys.argv[1]), sys.argv[2] == "hold"
    _pem, key = generate(2048)
    sealer = ArcSealer(domain="seal.test", selector="s", key=key, authserv_id="mx.test",
                       dnsfunc=lambda *a, **k: None)
    line = b"A line of body text, long enough to look like mail, more or less. \\r\\n"
    piece = line * (1048576 // len(line))

    async def body():
        yield b"From: a@src.test\\r\\nTo: b@example.test\\r\\nSubject: big\\r\\n\\r\\n"
        for _ in range(SIZE // len(piece)):
            yield bytes(piece)  # a fresh piece each time, as a store read gives

    async def held():  # the positive control: the whole message in memory at once
        whole = b"".join([p async for p in body()])
        yield whole

    # The peak of what Python allocated while sealing (bytes, regex results, dkimpy's copies);
    # unlike ru_maxrss it does not depend on what the allocator kept from start-up.
    tracemalloc.start()
    seal = asyncio.run(sealer.seal(held if HOLD else body, "mx.test; spf=pass"))
    assert seal is not None
    print(tracemalloc.get_traced_memory()[1])
    """
)


def _peak_growth(size: int, mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(size), mode],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip())


def test_sealing_a_20_mib_message_holds_one_piece_not_the_message() -> None:
    size = 20 * 1024 * 1024
    streamed = _peak_growth(size, "stream")
    held = _peak_growth(size, "hold")
    assert held >= size, f"the control must see the held message: {held}"
    assert streamed < 4 * 1024 * 1024, f"peak {streamed} bytes allocated for a 20 MiB seal"
