"""The PROXY protocol parser (mxspool.smtp.proxyproto): the spec's examples, every malformed or
oversized case with its defined answer, and fuzzing: any input is a header, "read more" or
ProxyError, never another exception, and never "read more" past the bounds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mxspool.smtp.proxyproto import (
    V1_MAX,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyError,
    ProxyHeader,
    build_v1,
    build_v2,
    parse,
    starts_header,
)

SMTP = b"EHLO client.example\r\n"


def test_v1_tcp4_and_the_client_stream_after_it() -> None:
    header = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\n"
    parsed = parse(header + SMTP)
    assert parsed == ProxyHeader(1, len(header), ("192.0.2.7", 56324), ("198.51.100.1", 25))


def test_v1_tcp6_is_normalized() -> None:
    header = b"PROXY TCP6 2001:DB8:0:0::1 2001:db8::2 65535 25\r\n"
    parsed = parse(header)
    assert parsed is not None
    assert parsed.source == ("2001:db8::1", 65535)


def test_v1_unknown_names_no_client() -> None:
    for header in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
        assert parse(header) == ProxyHeader(1, len(header), None, None)


def test_v1_longest_header_is_read_and_one_more_byte_is_not() -> None:
    six = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    header = f"PROXY UNKNOWN {six} {six} 65535 65535\r\n".encode()  # the spec's worst case
    assert len(header) == V1_MAX
    parsed = parse(header)
    assert parsed is not None and parsed.length == V1_MAX
    # Without CRLF in the first 107 bytes it is refused, not read further.
    assert parse(header[:-2]) is None
    with pytest.raises(ProxyError, match="without CRLF"):
        parse(header[:-2] + b" \r\n")


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n",  # a field missing
        b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25 x\r\n",  # one too many
        b"PROXY TCP5 192.0.2.7 198.51.100.1 1 25\r\n",  # no such family
        b"PROXY TCP4 2001:db8::1 198.51.100.1 1 25\r\n",  # IPv6 under TCP4
        b"PROXY TCP6 192.0.2.7 2001:db8::2 1 25\r\n",  # IPv4 under TCP6
        b"PROXY TCP4 192.0.2.300 198.51.100.1 1 25\r\n",  # not an address
        b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n",  # port too large
        b"PROXY TCP4 192.0.2.7 198.51.100.1 025 25\r\n",  # leading zero
        b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 25\r\n",
        b"PROXY TCP4  192.0.2.7 198.51.100.1 1 25\r\n",  # two spaces
        b"PROXY TCP4 192.0.2.7\n",  # bare LF
        b"PROXY TCP4 192.0.2.7\rX",  # bare CR
        b"proxy TCP4 192.0.2.7 198.51.100.1 1 25\r\n",  # the keyword is case-sensitive
        b"EHLO client.example\r\n",  # plain SMTP
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
    ],
)
def test_v1_malformed_is_refused(header: bytes) -> None:
    with pytest.raises(ProxyError):
        parse(header)


def test_v2_inet_with_tlvs_skipped() -> None:
    tlvs = b"\x01\x00\x02h2" + b"\x04\x00\x00"  # ALPN, NOOP
    header = build_v2(("192.0.2.7", 56324), ("198.51.100.1", 25), tlvs=tlvs)
    parsed = parse(header + SMTP)
    assert parsed == ProxyHeader(2, len(header), ("192.0.2.7", 56324), ("198.51.100.1", 25))


def test_v2_inet6() -> None:
    header = build_v2(("2001:db8::7", 1), ("2001:db8::1", 25))
    parsed = parse(header)
    assert parsed is not None and parsed.source == ("2001:db8::7", 1)


def test_v2_local_unspec_and_unix_name_no_client() -> None:
    local = build_v2(None)
    assert parse(local) == ProxyHeader(2, 16, None, None)
    # LOCAL with an address block: still the real peer (the spec: discard the block).
    local_inet = V2_SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12)
    assert parse(local_inet) == ProxyHeader(2, 28, None, None)
    unspec = V2_SIGNATURE + b"\x21\x00\x00\x03abc"
    assert parse(unspec) == ProxyHeader(2, 19, None, None)
    unix = V2_SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216)
    assert parse(unix) == ProxyHeader(2, 16 + 216, None, None)


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "version 1"),
        (V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12), "version 3"),
        (V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "unknown command"),
        (V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12), "family"),
        (V2_SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12), "family"),
        (V2_SIGNATURE + b"\x21\x11\x00\x0b" + bytes(11), "too short"),
        (V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), "too short"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "at most"),
        (b"\r\n\r\n\x00\r\nQUIT\r" + bytes(4), "neither"),
    ],
)
def test_v2_malformed_or_oversized_is_refused(header: bytes, why: str) -> None:
    with pytest.raises(ProxyError, match=why):
        parse(header)


def test_v2_largest_block_is_read() -> None:
    noop = b"\x04" + (V2_MAX_LENGTH - 15).to_bytes(2, "big") + bytes(V2_MAX_LENGTH - 15)
    header = build_v2(("192.0.2.7", 1), tlvs=noop)  # 12 bytes of addresses, one NOOP TLV
    assert len(header) == 16 + V2_MAX_LENGTH
    parsed = parse(header)
    assert parsed is not None and parsed.length == len(header)


def test_starts_header() -> None:
    assert starts_header(b"PROXY TCP4") is True
    assert starts_header(V2_SIGNATURE) is True
    assert starts_header(b"EHLO x\r\n") is False
    assert starts_header(b"\r\nQUIT\r\n") is False
    assert starts_header(b"PROX") is None
    assert starts_header(b"\r\n\r\n\x00") is None
    assert starts_header(b"") is None


# -- fuzzing -------------------------------------------------------------------------------


def _check(data: bytes) -> ProxyHeader | None:
    """The parser's contract on any input."""
    try:
        result = parse(data)
    except ProxyError:
        return None
    if result is None:  # "read more" only within the bounds
        assert len(data) < max(V1_MAX, 16 + V2_MAX_LENGTH)
        if data[:1] != b"\r":
            assert len(data) < V1_MAX
        return None
    assert 16 <= result.length <= len(data)
    assert result.length <= max(V1_MAX, 16 + V2_MAX_LENGTH)
    assert parse(data[: result.length]) == result  # the header alone decides
    return result


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_any_bytes(data: bytes) -> None:
    _check(data)
    _check(b"PROXY " + data)
    _check(V2_SIGNATURE + data)
    _check(V2_SIGNATURE + b"\x21" + data)


@settings(max_examples=300, deadline=None)
@given(
    st.ip_addresses(),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.booleans(),
    st.binary(max_size=40),
    st.integers(0, 200),
)
def test_fuzz_valid_headers_round_trip_whatever_the_split(
    ip: object, sport: int, dport: int, v2: bool, after: bytes, split: int
) -> None:
    address = str(ip)
    other = "192.0.2.1" if ":" not in address else "2001:db8::1"
    header = (
        build_v2((address, sport), (other, dport))
        if v2
        else build_v1((address, sport), (other, dport))
    )
    data = header + after
    expected = ProxyHeader(2 if v2 else 1, len(header), (address, sport), (other, dport))
    assert _check(data) == expected
    # Bytes arriving in two pieces: a valid beginning is "read more", never an error.
    cut = min(split, len(header) - 1)
    assert parse(data[:cut]) is None
    assert parse(data) == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=120), st.integers(0, 119))
def test_fuzz_a_flipped_byte_is_a_defined_answer(noise: bytes, where: int) -> None:
    header = bytearray(build_v2(("192.0.2.7", 1), ("198.51.100.1", 25), tlvs=b"\x04\x00\x01x"))
    header[where % len(header)] ^= noise[0] or 1
    _check(bytes(header))
    line = bytearray(build_v1(("192.0.2.7", 1), ("198.51.100.1", 25)))
    line[where % len(line)] = noise[-1]
    _check(bytes(line))
