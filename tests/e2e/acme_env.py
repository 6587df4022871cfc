"""Debian's pebble (an ACME test CA) and a dnslib server it resolves names with, for tests.

The DNS server answers A 127.0.0.1 for the test host names and TXT records from files in a
directory (one value a line, the file named after the record), which a DNS-01 hook script
writes: so the hook, run by mxspool in another process, really publishes what pebble's VA
queries. Pebble runs with PEBBLE_VA_ALWAYS_VALID=0 (challenges are really validated),
PEBBLE_VA_NOSLEEP=1 (no random delays), no nonce rejection and no authorization reuse.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import trustme
from dnslib import QTYPE, RCODE, RR, TXT, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from tests.conftest import free_ports
from tests.waiting import wait_until

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
VALIDITY = 90 * 86400
"""Seconds pebble's certificates are valid (Let's Encrypt's 90 days)."""


class ChallengeResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, names: list[str], txt_dir: Path) -> None:
        self.names = {name.rstrip(".").lower() for name in names}
        self.txt_dir = txt_dir

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        txt_file = self.txt_dir / qname
        if qname in self.names:
            if qtype == "A":
                reply.add_answer(RR(qname, QTYPE.A, rdata=A("127.0.0.1"), ttl=1))
        elif txt_file.exists():
            if qtype == "TXT":
                for value in txt_file.read_text().split():
                    reply.add_answer(RR(qname, QTYPE.TXT, rdata=TXT(value), ttl=1))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


class ChallengeDns:
    def __init__(self, names: list[str], txt_dir: Path) -> None:
        txt_dir.mkdir(parents=True, exist_ok=True)
        self.txt_dir = txt_dir
        self.port = free_ports(1)[0]
        quiet = DNSLogger(logf=lambda _text: None)
        self.server = DNSServer(
            ChallengeResolver(names, txt_dir), port=self.port, address="127.0.0.1", logger=quiet
        )
        self.server.start_thread()

    def stop(self) -> None:
        self.server.stop()


class Pebble:
    def __init__(self, root: Path, dns_port: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port, self.management_port, self.http_port, tls_port = free_ports(4)
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        leaf.private_key_pem.write_to_path(str(root / "pebble-key.pem"))
        leaf.cert_chain_pems[0].write_to_path(str(root / "pebble-cert.pem"))
        self.api_ca = root / "pebble-api-ca.pem"
        """The CA of pebble's HTTPS API: [acme] ca_file."""
        ca.cert_pem.write_to_path(str(self.api_ca))
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": str(root / "pebble-cert.pem"),
                "privateKey": str(root / "pebble-key.pem"),
                "httpPort": self.http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
                "certificateValidityPeriod": VALIDITY,
            }
        }
        (root / "pebble.json").write_text(json.dumps(config))
        env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_VA_ALWAYS_VALID": "0",
            "PEBBLE_WFE_NONCEREJECT": "0",
            "PEBBLE_AUTHZREUSE": "0",
        }
        self.log = root / "pebble.log"
        self.proc = subprocess.Popen(
            [PEBBLE, "-config", str(root / "pebble.json"), "-dnsserver", f"127.0.0.1:{dns_port}"],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        wait_until(self._listening, 15, "pebble's ACME port")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"pebble exited: {self.log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def management(self, path: str) -> str:
        context = ssl.create_default_context(cafile=str(self.api_ca))
        url = f"https://127.0.0.1:{self.management_port}{path}"
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            return str(response.read().decode())

    def root_ca_file(self) -> Path:
        """Pebble's issuing root (made at its start), for clients that verify."""
        path = self.root / "pebble-root.pem"
        if not path.exists():
            path.write_text(self.management("/roots/0"))
        return path

    def intermediate_subject(self) -> str:
        from cryptography import x509

        pem = self.management("/intermediates/0").encode()
        return x509.load_pem_x509_certificate(pem).subject.rfc4514_string()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


HOOK = """#!/bin/sh
# DNS-01 hook for tests: publish TXT values as lines of a file the test's DNS server reads.
echo "$1 $2 $3" >> "{calls}"
file="{txt_dir}/$2"
case "$1" in
  set) echo "$3" >> "$file" ;;
  clear) grep -v -x -F -e "$3" "$file" > "$file.new" 2>/dev/null; mv "$file.new" "$file";
         [ -s "$file" ] || rm -f "$file" ;;
  *) echo "unknown action $1" >&2; exit 2 ;;
esac
"""


def write_hook(path: Path, txt_dir: Path, calls: Path, body: str = HOOK) -> Path:
    path.write_text(body.format(calls=calls, txt_dir=txt_dir))
    path.chmod(0o755)
    return path
