"""The ARC seal on release (RFC 8617): what was true at arrival, signed by the spooler.

Held mail reaches the target tenant days after it was signed, from the spooler's address: SPF
no longer aligns and DKIM signatures with a short ``x=`` have expired. The intake recorded the
verdicts at arrival (``messages.auth_results``, an Authentication-Results value); on every
delivery, when ``[arc]`` is configured, a new ARC set is put in front of the stored bytes:

- ``ARC-Authentication-Results: i=N; <the stored verdicts>; arc=<cv>``
- ``ARC-Message-Signature`` over the message (relaxed/relaxed, dkimpy's default header set)
- ``ARC-Seal`` over the ARC sets, with ``cv=``

signed with dkimpy (``ARC.sign``) and the ``[arc] key_file`` key as ``d=<domain>``,
``s=<selector>``. A tenant that lists the sealing domain as a trusted ARC sealer
(``Set-ArcConfig``) uses the AAR's verdicts instead of its own failed checks.

Decisions (see also README "ARC sealing"):

- ``i=`` is one more than the highest instance already in the message (1 when none).
- ``cv=``: the intake does not record an ``arc=`` verdict at arrival (if it ever does, it is
  used: an ``arc=`` result in the stored value wins). Otherwise an existing chain is verified
  at seal time with dkimpy's ARC verifier (keys looked up in DNS then, through ``[delivery]
  resolver``): ``pass`` or ``fail``; no chain: ``none``. The AAR then carries that ``arc=``.
- No ``Authentication-Results:`` header is added: RFC 8601 section 5 lets the receiving ADMD
  remove A-R headers from outside (Exchange Online stamps its own), RFC 8617 section 4.1.2
  keeps them out of the AMS for that reason, and the AAR is the signed copy of the same text.
- A message without stored verdicts (authentication at arrival off, or mail stored before it
  existed) is sealed with ``<authserv-id>; arc=<cv>`` (the chain verdict alone: nothing else
  was checked): every release carries the spooler's seal, which keeps an existing chain
  going and tells the truth.
- Sealing never blocks delivery: a message whose seal cannot be made (headers over
  ``MAX_HEADER_BYTES``, unparseable headers or verdicts, a dkimpy error) goes out unsealed and
  the reason is logged as a warning.

Memory: dkimpy would hold the whole message and several canonicalized copies (the body hash).
Here the body hash comes from ``bodyhash.BodyHasher`` over the stored bytes as they stream from
the store (one pass, one piece at a time); dkimpy gets only the header block, and the hash is
put into the AMS it generates (``_StreamedArc``). The cost per seal is the header block (at
most 1 MiB) plus one store piece, whatever the message size, and a second read of the body.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import dkim  # type: ignore[import-untyped]
import dns.exception
import dns.resolver
from authres import AuthenticationResultsHeader  # type: ignore[import-untyped]
from authres.core import AuthResError  # type: ignore[import-untyped]

from mxspool import nameservers
from mxspool.config import ArcConfig, Config
from mxspool.delivery.arckey import ArcKey, load_key
from mxspool.delivery.bodyhash import BodyHasher, Canon

log = logging.getLogger(__name__)
_dkimpy_log = logging.getLogger(f"{__name__}.dkimpy")
"""dkimpy logs every failed check as an error; a broken chain is a verdict here (logged once,
at info), not an error of ours."""
_dkimpy_log.setLevel(logging.CRITICAL)

MAX_HEADER_BYTES = 1 << 20
"""A header block larger than this is not sealed (dkimpy holds it, parsed, in memory)."""
DNS_TIMEOUT = 5.0
CV_VALUES = ("none", "pass", "fail")

DnsFunc = Callable[..., bytes | None]
"""dkimpy's DNS interface: ``dnsfunc(name: bytes, timeout=...)`` -> the TXT strings joined."""
Body = Callable[[], AsyncIterator[bytes]]


class SealError(Exception):
    """This message cannot be sealed; it goes out unsealed (the reason is logged)."""


@dataclass(frozen=True, slots=True)
class Seal:
    headers: bytes
    """The new ARC set, header lines with CRLF, to put in front of the stored bytes."""
    instance: int
    cv: str


def make_dnsfunc(nameserver: str, timeout: float = DNS_TIMEOUT) -> DnsFunc:
    """TXT lookups for dkimpy through ``[delivery] resolver`` ("host:port"), else the system's.

    Only for verifying an existing chain at seal time; runs in a worker thread (dkimpy is
    synchronous). A DNS failure makes dkimpy's verdict ``fail`` for that chain.
    """
    resolver = nameservers.configure(dns.resolver.Resolver, nameserver)
    resolver.lifetime = timeout

    def txt(name: bytes | str, timeout: float = timeout) -> bytes | None:
        qname = name.decode("ascii") if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(qname, "TXT", lifetime=timeout, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers):
            return None
        except dns.exception.Timeout as exc:
            raise dkim.DnsTimeoutError(f"DNS timeout for {qname}: {exc}") from exc
        for rrset in answer.response.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                return b"".join(next(iter(rrset)).strings)
        return None

    return txt


class _StreamedArc(dkim.ARC):  # type: ignore[misc]
    """dkimpy's ARC with body hashes computed elsewhere (streamed), over headers only.

    dkimpy computes ``bh=`` from ``self.body``; here the body is empty and the hashes come from
    ``BodyHasher``: ``gen_header`` puts ours in the AMS being signed, ``verify_sig_process``
    compares an existing AMS's ``bh=`` with the streamed hash of its canonicalization and
    then lets dkimpy check the header signature alone.
    """

    def __init__(self, headers: list[list[bytes]], hashes: dict[tuple[bytes, int | None], bytes]):
        super().__init__(None, logger=_dkimpy_log, signature_algorithm=b"rsa-sha256")
        self.headers = headers
        self.body = b""
        self._hashes = hashes
        """(c= body canonicalization, l=) -> sha256 of that canonical body."""

    def gen_header(  # noqa: PLR0917 (dkimpy's signature, called positionally)
        self,
        fields: list[tuple[bytes, bytes]],
        include_headers: Any,
        canon_policy: Any,
        header_name: bytes,
        pk: Any,
        standardize: bool = False,
    ) -> bytes:
        if header_name == b"ARC-Message-Signature":
            ours = base64.b64encode(self._hashes[(b"relaxed", None)])
            fields = [(tag, ours if tag == b"bh" else value) for tag, value in fields]
        result: bytes = super().gen_header(
            fields, include_headers, canon_policy, header_name, pk, standardize
        )
        return result

    def verify_sig_process(
        self, sig: dict[bytes, bytes], include_headers: Any, sig_header: Any, dnsfunc: Any
    ) -> bool:
        if b"bh" in sig:
            key = _body_key(sig)
            streamed = self._hashes.get(key) if key is not None else None
            claimed = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
            if streamed is None or streamed != claimed:
                raise dkim.ValidationError("body hash mismatch (or not computed)")
            sig = {tag: value for tag, value in sig.items() if tag != b"bh"}
        valid: bool = super().verify_sig_process(sig, include_headers, sig_header, dnsfunc)
        return valid


def _body_key(sig: dict[bytes, bytes]) -> tuple[bytes, int | None] | None:
    """(body canonicalization, l=) of an AMS, if its body hash is one we can stream."""
    if sig.get(b"a", b"").lower() != b"rsa-sha256":
        return None
    canon = sig.get(b"c", b"relaxed/relaxed").split(b"/")
    body = canon[1] if len(canon) == 2 else b"simple"
    if body not in (b"relaxed", b"simple"):
        return None
    length = sig.get(b"l")
    if length is not None and not length.isdigit():
        return None
    return body.lower(), int(length) if length is not None else None


class ArcSealer:
    """Seals messages as ``d=domain``, ``s=selector`` with ``key``."""

    def __init__(
        self,
        *,
        domain: str,
        selector: str,
        key: ArcKey,
        authserv_id: str,
        dnsfunc: DnsFunc,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.domain = domain
        self.selector = selector
        self._key = key
        self.authserv_id = authserv_id
        """For the AAR of a message without stored verdicts (``<authserv-id>; arc=none``)."""
        self._dnsfunc = dnsfunc
        self._clock = clock

    @classmethod
    def from_config(cls, config: Config) -> ArcSealer | None:
        """The configured sealer, or None when ``[arc] key_file`` is not set.

        Raises ArcKeyError (from ``load_key``) when the key cannot be used.
        """
        arc: ArcConfig = config.arc
        if not arc.enabled:
            return None
        return cls(
            domain=arc.domain,
            selector=arc.selector,
            key=load_key(arc.key_file),
            authserv_id=config.smtp.authserv_id or config.smtp.hostname,
            dnsfunc=make_dnsfunc(config.delivery.resolver),
        )

    async def seal(self, body: Body, auth_results: str | None) -> Seal | None:
        """The ARC set for the message whose stored bytes ``body`` yields; None (logged)
        when it cannot be sealed."""
        try:
            head, hashes = await _read(body)
            return await asyncio.to_thread(self._sign, head, hashes, auth_results)
        except SealError as exc:
            log.warning("message not ARC-sealed: %s", exc)
            return None

    def _sign(
        self,
        head: _Head,
        hashes: dict[tuple[bytes, int | None], bytes],
        auth_results: str | None,
    ) -> Seal:
        instance = head.instance + 1
        arrival = _parse_results(auth_results) if auth_results else None
        cv = _arrival_cv(arrival, head.instance)
        if cv is None:
            cv = self._verify_chain(head, hashes) if head.instance else "none"
        srv_id = arrival.authserv_id if arrival is not None else self.authserv_id
        results = list(arrival.results) if arrival is not None else []
        if any(result.method == "arc" for result in results):
            value = (auth_results or "").strip()
        else:
            # The chain's verdict goes into the AAR with the others (RFC 8617 section 4.1.1);
            # a stored "<id>; none" (nothing checked) becomes "<id>; arc=<cv>".
            kept = (auth_results or "").strip() if results else srv_id
            value = f"{kept}; arc={cv}"
        # Authentication-Results headers in the message are someone else's claims: only ours
        # (the stored verdicts) may reach the AAR. A-R is never signed, so dropping them here
        # changes nothing else.
        headers = [[b"Authentication-Results", b" " + value.encode("utf-8") + b"\r\n"]]
        headers += [h for h in head.headers if h[0].lower() != b"authentication-results"]
        signer = _StreamedArc(headers, hashes)
        try:
            lines = signer.sign(
                self.selector.encode("ascii"),
                self.domain.encode("ascii"),
                self._key.private,
                srv_id.encode("utf-8"),
                timestamp=int(self._clock()),
            )
        except dkim.DKIMException as exc:
            raise SealError(f"dkimpy could not seal it: {exc}") from exc
        if not lines:
            raise SealError(f"dkimpy made no ARC set (verdicts {value!r}, cv={cv})")
        return Seal(b"".join(lines), instance, cv)

    def _verify_chain(self, head: _Head, hashes: dict[tuple[bytes, int | None], bytes]) -> str:
        verifier = _StreamedArc([list(h) for h in head.headers], hashes)
        try:
            cv, _results, reason = verifier.verify(dnsfunc=self._dnsfunc)
        except dkim.DKIMException as exc:
            cv, reason = dkim.CV_Fail, str(exc)
        if cv != dkim.CV_Pass:
            log.info("existing ARC chain (i=%d) does not verify: %s", head.instance, reason)
            return "fail"
        return "pass"


def _parse_results(value: str) -> Any:
    try:
        return AuthenticationResultsHeader.parse(f"Authentication-Results: {value}")
    except AuthResError as exc:
        raise SealError(
            f"the stored Authentication-Results do not parse ({exc}): {value!r}"
        ) from None


def _arrival_cv(arrival: Any, chain: int) -> str | None:
    """The ``arc=`` verdict recorded at arrival, when there is one consistent with the chain."""
    if arrival is None:
        return None
    found = [str(result.result).lower() for result in arrival.results if result.method == "arc"]
    if len(found) != 1 or found[0] not in CV_VALUES:
        return None
    if (found[0] == "none") != (chain == 0):
        return None  # inconsistent with the message: decide at seal time
    return found[0]


@dataclass(slots=True)
class _Head:
    headers: list[list[bytes]]
    instance: int
    """The highest ARC instance in the message (0: no chain)."""


async def _read(body: Body) -> tuple[_Head, dict[tuple[bytes, int | None], bytes]]:
    """One pass over the stored bytes: the parsed header block and the body hashes needed."""
    pieces = body()
    buffer = b""
    head: _Head | None = None
    hashers: dict[tuple[bytes, int | None], BodyHasher] = {}
    try:
        async for piece in pieces:
            if head is None:
                buffer += piece
                end = _header_end(buffer)
                if end is None:
                    if len(buffer) > MAX_HEADER_BYTES:
                        raise SealError(f"header block over {MAX_HEADER_BYTES} bytes")
                    continue
                block, start = end
                if block > MAX_HEADER_BYTES:
                    raise SealError(f"header block over {MAX_HEADER_BYTES} bytes")
                head = _parse_head(buffer[:block])
                hashers = _hashers_for(head)
                data, buffer = buffer[start:], b""
            else:
                data = piece
            for hasher in hashers.values():
                hasher.feed(data)
    finally:
        close = getattr(pieces, "aclose", None)
        if close is not None:
            await close()
    if head is None:  # no empty line: all header, empty body
        head = _parse_head(buffer)
        hashers = _hashers_for(head)
    return head, {key: hasher.digest() for key, hasher in hashers.items()}


def _header_end(data: bytes) -> tuple[int, int] | None:
    """(length of the header block with its last line break, where the body starts)."""
    match = re.search(rb"\n(\r?\n)", data)
    if match is None:
        return None
    return match.start() + 1, match.end()


def _parse_head(block: bytes) -> _Head:
    try:
        headers, _ = dkim.rfc822_parse(block + b"\r\n")
    except dkim.DKIMException as exc:
        raise SealError(f"the header block does not parse: {exc}") from exc
    reader = dkim.ARC(None, logger=_dkimpy_log)
    reader.headers = headers
    instance, _sets = reader.sorted_arc_headers()
    return _Head(headers, int(instance))


def _hashers_for(head: _Head) -> dict[tuple[bytes, int | None], BodyHasher]:
    """Ours (relaxed, whole body), plus the one the chain's latest AMS covers, if any."""
    hashers: dict[tuple[bytes, int | None], BodyHasher] = {
        (b"relaxed", None): BodyHasher("relaxed")
    }
    if head.instance:
        for name, value in head.headers:
            if name.lower() != b"arc-message-signature":
                continue
            try:
                sig = dkim.util.parse_tag_value(re.sub(rb"\s+", b"", value))
            except dkim.util.InvalidTagValueList:
                continue
            if sig.get(b"i") != str(head.instance).encode():
                continue
            key = _body_key(sig)
            if key is not None and key not in hashers:
                canon: Canon = "relaxed" if key[0] == b"relaxed" else "simple"
                hashers[key] = BodyHasher(canon, limit=key[1])
    return hashers
