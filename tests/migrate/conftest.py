"""Fixtures for the migration toolkit: a DNS zone, an HTTPS MTA-STS server, TLS, the CLI.

The DNS server (dnslib, tests.delivery.dnsserver) answers for the test domains below; the
HTTPS server serves each domain's MTA-STS policy with a certificate from a trustme CA, which
the configuration trusts through [delivery] ca_file; the CLI runs in-process (click's runner)
against a SQLite store in tmp_path.
"""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from click.testing import CliRunner, Result

from mxspool.cli import cli
from tests.conftest import free_port
from tests.delivery.dnsserver import DnsServer

SPOOLER = "spooler.mx.test"

ZONE = """
notyet.test. 300 IN MX 10 mx.source.test.
longttl.test. 3600 IN MX 10 mx.source.test.
stsbad.test. 300 IN MX 10 spooler.mx.test.
_mta-sts.stsbad.test. 300 IN TXT "v=STSv1; id=20260101"
mta-sts.stsbad.test. 300 IN A 127.0.0.1
good.test. 300 IN MX 10 spooler.mx.test.
good.test. 300 IN TXT "v=spf1 include:spf.protection.outlook.com -all"
_dmarc.good.test. 300 IN TXT "v=DMARC1; p=reject"
_mta-sts.good.test. 300 IN TXT "v=STSv1; id=20260102"
mta-sts.good.test. 300 IN A 127.0.0.1
mx.source.test. 300 IN A 127.0.0.1
spooler.mx.test. 300 IN A 127.0.0.1
mx.target.test. 300 IN A 127.0.0.1
example.test. 300 IN MX 10 mx.source.test.
"""

POLICIES = {
    "mta-sts.stsbad.test": "version: STSv1\nmode: enforce\nmx: mx.source.test\nmax_age: 604800\n",
    "mta-sts.good.test": (
        "version: STSv1\nmode: enforce\nmx: mx.source.test\nmx: *.mx.test\nmax_age: 86400\n"
    ),
}


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="session")
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer(ZONE).start()
    yield server
    server.stop()


class _PolicyHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        host = (self.headers.get("Host") or "").split(":")[0]
        policy = POLICIES.get(host)
        if self.path != "/.well-known/mta-sts.txt" or policy is None:
            self.send_error(404)
            return
        body = policy.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def mta_sts_server(ca: trustme.CA) -> Iterator[int]:
    """An HTTPS server on 127.0.0.1 serving POLICIES; yields its port."""
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _PolicyHandler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*POLICIES).configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield port
    server.shutdown()
    server.server_close()


def write_config(path: Path, **sections: dict[str, Any]) -> Path:
    from tests.conftest import _toml

    config: dict[str, dict[str, Any]] = {
        "smtp": {"listen": [f"127.0.0.1:{free_port()}"], "hostname": SPOOLER},
        "store": {"url": f"sqlite:///{path / 'spool.db'}", "min_free_space": "1MiB"},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    file = path / "mxspool.toml"
    file.write_text(_toml(config))
    return file


class Cli:
    """``mxspool`` run in-process with one configuration file."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = env or {}

    def __call__(self, *args: str, code: int | None = 0) -> Result:
        result = CliRunner().invoke(
            cli, ["--config", str(self.config), *args], env=self.env, catch_exceptions=False
        )
        if code is not None:
            assert result.exit_code == code, (result.exit_code, result.output)
        return result


@pytest.fixture
def mxcli(tmp_path: Path, dns_server: DnsServer, ca_file: str, mta_sts_server: int) -> Cli:
    config = write_config(
        tmp_path,
        delivery={"resolver": dns_server.address, "ca_file": ca_file, "connect_timeout": "5s"},
    )
    return Cli(config, {"MXSPOOL_TEST_MTA_STS_PORT": str(mta_sts_server)})
