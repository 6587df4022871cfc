"""Proving control of the names to the ACME server: HTTP-01 on a small listener, or DNS-01
through an operator's hook command.

HTTP-01: during an order, ``acme.standalone.HTTP01Server`` (the certbot project's) answers
``GET /.well-known/acme-challenge/<token>`` on ``[acme] http_listen``; it is bound only while
an order is being validated, in daemon threads, so a stopping node never waits for it.

DNS-01 hook contract: ``HOOK set RECORD VALUE`` must publish the TXT record ``RECORD``
(``_acme-challenge.<name>``, no trailing dot) with ``VALUE`` and exit 0 once the record is
served by the zone's authoritative servers (or set ``[acme] dns_delay``); ``HOOK clear RECORD
VALUE`` removes that value (other values of the record stay: several names may share it). A
non-zero exit fails the order with the hook's stderr in the log; the hook gets
``MXSPOOL_ACME_ACTION``, ``MXSPOOL_ACME_RECORD`` and ``MXSPOOL_ACME_VALUE`` in its environment
too, and has ``HOOK_TIMEOUT`` seconds.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from typing import Protocol

from acme import challenges, messages, standalone
from josepy.jwk import JWK

from mxspool.config import split_host_port

log = logging.getLogger("mxspool.tls")

HOOK_TIMEOUT = 300.0
"""Seconds a DNS hook call may take."""
HOOK_OUTPUT = 2000
"""Characters of a failed hook's stderr quoted in the error."""


class ChallengeError(Exception):
    """A challenge could not be set up; the message says what to fix."""


class Solver(Protocol):
    kind: type[challenges.Challenge]

    def prepare(self, name: str, challenge: messages.ChallengeBody, key: JWK) -> None: ...

    def start(self) -> None: ...

    def cleanup(self) -> None: ...


class Http01Solver:
    """Serve the key authorizations of HTTP-01 challenges while an order is validated."""

    kind = challenges.HTTP01

    def __init__(self, listen: str) -> None:
        self.listen = listen
        self.resources: set[standalone.HTTP01RequestHandler.HTTP01Resource] = set()
        self.server: standalone.HTTP01Server | None = None
        self.thread: threading.Thread | None = None

    def prepare(self, name: str, challenge: messages.ChallengeBody, key: JWK) -> None:
        response, validation = challenge.response_and_validation(key)
        resource = standalone.HTTP01RequestHandler.HTTP01Resource(
            chall=challenge.chall, response=response, validation=validation
        )
        self.resources.add(resource)

    def start(self) -> None:
        host, port = split_host_port(self.listen)
        try:
            self.server = standalone.HTTP01Server(
                (host, port), self.resources, ipv6=":" in host, timeout=10
            )
        except OSError as exc:
            raise ChallengeError(
                f"cannot listen on {self.listen} for the HTTP-01 challenge: "
                f"{exc.strerror or exc}; free the port (is a web server on it?), give mxspool "
                'CAP_NET_BIND_SERVICE for port 80, or use challenge = "dns-01"'
            ) from exc
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="acme-http-01", daemon=True
        )
        self.thread.start()
        log.info("ACME HTTP-01: answering challenges on %s", self.listen)

    def cleanup(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        self.resources.clear()


class Dns01HookSolver:
    """Publish DNS-01 TXT records through the operator's hook command."""

    kind = challenges.DNS01

    def __init__(self, hook: str, delay: float = 0.0) -> None:
        self.hook = hook
        self.delay = delay
        self.records: list[tuple[str, str]] = []
        self.published: list[tuple[str, str]] = []

    def prepare(self, name: str, challenge: messages.ChallengeBody, key: JWK) -> None:
        chall = challenge.chall
        assert isinstance(chall, challenges.DNS01)
        record = chall.validation_domain_name(name.removeprefix("*."))
        self.records.append((record, chall.validation(key)))

    def start(self) -> None:
        for record, value in self.records:
            self._call("set", record, value)
            self.published.append((record, value))
        if self.delay > 0:
            log.info(
                "ACME DNS-01: waiting %.0f s (dns_delay) for the records to spread", self.delay
            )
            time.sleep(self.delay)

    def cleanup(self) -> None:
        published, self.published = self.published, []
        for record, value in published:
            try:
                self._call("clear", record, value)
            except ChallengeError as exc:
                log.warning("ACME DNS-01: %s; remove the TXT record %s by hand", exc, record)
        self.records.clear()

    def _call(self, action: str, record: str, value: str) -> None:
        env = {
            **os.environ,
            "MXSPOOL_ACME_ACTION": action,
            "MXSPOOL_ACME_RECORD": record,
            "MXSPOOL_ACME_VALUE": value,
        }
        try:
            result = subprocess.run(
                [self.hook, action, record, value],
                capture_output=True,
                text=True,
                timeout=HOOK_TIMEOUT,
                env=env,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            raise ChallengeError(
                f"cannot run the DNS hook {self.hook}: {exc.strerror or exc}; check [acme] "
                "dns_hook (an executable path)"
            ) from exc
        except subprocess.TimeoutExpired:
            raise ChallengeError(
                f"the DNS hook {self.hook} {action} {record} took more than {HOOK_TIMEOUT:.0f} s"
            ) from None
        if result.returncode != 0:
            raise ChallengeError(
                f"the DNS hook {self.hook} {action} {record} exited with status "
                f"{result.returncode}: {result.stderr.strip()[-HOOK_OUTPUT:] or '(no stderr)'}"
            )
        log.info("ACME DNS-01: hook %s %s done", action, record)
