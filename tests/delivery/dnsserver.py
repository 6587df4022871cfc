"""A tiny authoritative DNS server for tests (dnslib) on 127.0.0.1 over UDP."""

from __future__ import annotations

from collections import deque
from typing import Any

from dnslib import QTYPE, RCODE, RR, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from tests.conftest import free_port


class ZoneResolver(BaseResolver):  # type: ignore[misc]
    """Answers from zone-file lines; unknown names get NXDOMAIN, known names without the
    asked type an empty NOERROR answer (so "no MX" is distinguishable from "no domain")."""

    def __init__(self, zone: str) -> None:
        self.records = RR.fromZone(zone)
        self.questions: deque[tuple[str, str]] = deque(maxlen=1000)
        """The latest questions, (name, type), oldest first."""

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = request.q.qname
        qtype = QTYPE[request.q.qtype]
        self.questions.append((str(qname).rstrip(".").lower(), str(qtype)))
        known = False
        for record in self.records:
            if record.rname == qname:
                known = True
                if QTYPE[record.rtype] == qtype:
                    reply.add_answer(record)
        if not known:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


class DnsServer:
    def __init__(self, zone: str, resolver: ZoneResolver | None = None) -> None:
        """Serves ``zone``, or ``resolver`` (a ZoneResolver that does more) when given."""
        self.port = free_port()
        quiet = DNSLogger(logf=lambda _text: None)
        self.resolver = resolver or ZoneResolver(zone)
        self.server = DNSServer(self.resolver, port=self.port, address="127.0.0.1", logger=quiet)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> DnsServer:
        self.server.start_thread()
        return self

    def stop(self) -> None:
        self.server.stop()  # dnslib's stop shuts the loop down but keeps the socket open
        self.server.server.server_close()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
