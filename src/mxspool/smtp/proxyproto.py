"""PROXY protocol v1 and v2 headers (HAProxy's spec, proxy-protocol.txt of HAProxy 2.6), sans-IO.

A load balancer in TCP mode that sends the PROXY protocol puts one header in front of the
client's bytes: the client's real address and port, then the stream as the client sent it. The
listener (``intake.listener``) reads it before its 220 from the networks in ``[smtp] proxy_from``
and uses that address wherever the peer's address counts (Received:, per-IP slots, SPF, logs).

Why our own parser: the PyPI package ``proxy-protocol`` (0.11, last release April 2024) parses
whole buffers, but a short INET block raises ``struct.error`` rather than its own error, it takes
any v2 length up to 64 KiB and it parses TLVs we do not use. The format is small; this module
reads it in about a hundred lines with a bound on every length and one exception type, and is
fuzzed (tests/smtp/test_proxyproto.py).

:func:`parse` takes the bytes received so far (from the first byte of the connection) and
answers: a :class:`ProxyHeader` (with how many bytes it took), None (a valid beginning; read
more) or :class:`ProxyError` (never a valid header: drop the connection). Decided cases:

- v2 LOCAL (a balancer's health check), v1 ``UNKNOWN``, v2 UNSPEC or UNIX families: the header
  is valid but carries no client: ``source`` is None and the caller uses the real peer.
- v2 TLVs are skipped whole, never parsed; the address block plus TLVs may be at most
  ``V2_MAX_LENGTH`` bytes. A v1 header is at most ``V1_MAX`` bytes, CRLF included (the spec).
"""

from __future__ import annotations

import dataclasses
import ipaddress

V1_PREFIX = b"PROXY "
V1_MAX = 107
"""The longest v1 header, "PROXY TCP6 <39> <39> 65535 65535\\r\\n", per the spec."""
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX_LENGTH = 4096
"""The longest v2 address block plus TLVs we read (the spec allows 65535; HAProxy sends a few
hundred bytes at most with every TLV on)."""

_V2_FIXED = 16  # signature, version/command, family/transport, length
_INET_LENGTH = {1: 12, 2: 36, 3: 216}  # v2 address block size by family (IPv4, IPv6, UNIX)


class ProxyError(ValueError):
    """The bytes cannot begin a valid PROXY header; the message says what is wrong."""


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int
    """1 (text) or 2 (binary)."""
    length: int
    """Bytes of the input the header took; the client's stream starts after them."""
    source: tuple[str, int] | None
    """The client's address and port; None when the header names none (use the real peer)."""
    destination: tuple[str, int] | None


def starts_header(data: bytes) -> bool | None:
    """Whether the first bytes of a connection begin a PROXY header (v1 or v2); None while they
    are too few to tell (fewer than 12 bytes, all of them a prefix of one of the two)."""
    if data.startswith(V1_PREFIX) or data.startswith(V2_SIGNATURE):
        return True
    if V1_PREFIX.startswith(data) or V2_SIGNATURE.startswith(data):
        return None
    return False


def parse(data: bytes) -> ProxyHeader | None:
    """The PROXY header at the start of ``data``; None if ``data`` is a valid beginning of one
    and more bytes are needed; :class:`ProxyError` if it cannot be one."""
    if data[:1] == b"\r":
        return _parse_v2(data)
    return _parse_v1(data)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    if not data.startswith(V1_PREFIX):
        if V1_PREFIX.startswith(data):
            return None
        raise ProxyError("not a PROXY protocol header (neither v1 nor v2)")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyError(f"PROXY v1 header without CRLF in its first {V1_MAX} bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyError("PROXY v1 header with a bare CR or LF")
        return None
    line = data[len(V1_PREFIX) : end]
    length = end + 2
    fields = line.split(b" ")
    if fields[0] == b"UNKNOWN":
        return ProxyHeader(1, length, None, None)
    if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
        raise ProxyError(f"PROXY v1 header not of the form TCP4|TCP6 SRC DST SPORT DPORT: {line!r}")
    version = 4 if fields[0] == b"TCP4" else 6
    source = (_v1_address(fields[1], version), _v1_port(fields[3]))
    destination = (_v1_address(fields[2], version), _v1_port(fields[4]))
    return ProxyHeader(1, length, source, destination)


def _v1_address(field: bytes, version: int) -> str:
    try:
        address = ipaddress.ip_address(field.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyError(f"PROXY v1 header with a bad address {field!r}") from None
    if address.version != version:
        raise ProxyError(f"PROXY v1 header: {field!r} is not an IPv{version} address")
    return str(address)


def _v1_port(field: bytes) -> int:
    if not field.isdigit() or len(field) > 5 or (len(field) > 1 and field[:1] == b"0"):
        raise ProxyError(f"PROXY v1 header with a bad port {field!r}")
    port = int(field)
    if port > 65535:
        raise ProxyError(f"PROXY v1 header with a bad port {field!r}")
    return port


def _parse_v2(data: bytes) -> ProxyHeader | None:
    signature = data[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(signature):
        raise ProxyError("not a PROXY protocol header (neither v1 nor v2)")
    if len(data) < _V2_FIXED:
        if len(data) > 12 and data[12] >> 4 != 2:
            raise ProxyError(f"PROXY v2 header of version {data[12] >> 4}, not 2")
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    family, transport = data[13] >> 4, data[13] & 0x0F
    size = int.from_bytes(data[14:16], "big")
    if version != 2:
        raise ProxyError(f"PROXY v2 header of version {version}, not 2")
    if command > 1:
        raise ProxyError(f"PROXY v2 header with an unknown command {command}")
    if family > 3 or transport > 2:
        raise ProxyError(f"PROXY v2 header with an unknown family/transport byte {data[13]:#04x}")
    if size > V2_MAX_LENGTH:
        raise ProxyError(f"PROXY v2 header of {size} bytes; at most {V2_MAX_LENGTH} are read")
    if command == 1 and family in _INET_LENGTH and size < _INET_LENGTH[family]:
        raise ProxyError(f"PROXY v2 header of {size} bytes, too short for its addresses")
    length = _V2_FIXED + size
    if len(data) < length:
        return None
    if command == 0 or family not in (1, 2):  # LOCAL, or UNSPEC / UNIX: the real peer counts
        return ProxyHeader(2, length, None, None)
    block = data[_V2_FIXED:length]
    width = 4 if family == 1 else 16
    source_ip = ipaddress.ip_address(block[:width])
    destination_ip = ipaddress.ip_address(block[width : 2 * width])
    ports = block[2 * width : 2 * width + 4]
    source = (str(source_ip), int.from_bytes(ports[:2], "big"))
    destination = (str(destination_ip), int.from_bytes(ports[2:], "big"))
    return ProxyHeader(2, length, source, destination)


def build_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 header (for tests and probes)."""
    family = "TCP4" if ipaddress.ip_address(source[0]).version == 4 else "TCP6"
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def build_v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None = None,
    *,
    tlvs: bytes = b"",
) -> bytes:
    """A v2 PROXY header (source None: a LOCAL header) over TCP (for tests and probes)."""
    if source is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + len(tlvs).to_bytes(2, "big") + tlvs
    src = ipaddress.ip_address(source[0])
    if destination is None:
        destination = ("0.0.0.0", 0) if src.version == 4 else ("::", 0)
    dst = ipaddress.ip_address(destination[0])
    family = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + source[1].to_bytes(2, "big")
    block += destination[1].to_bytes(2, "big") + tlvs
    return V2_SIGNATURE + bytes([0x21, family]) + len(block).to_bytes(2, "big") + block
