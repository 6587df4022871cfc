"""Obtain a certificate from an ACME CA (RFC 8555) with the certbot project's ``acme`` library.

One call of :func:`obtain` is one order, start to end, blocking (the server runs it in a
thread): load or create the account key (0600), register or find the account, order the
names, answer each authorization's challenge (HTTP-01 or DNS-01, see ``challenges``), finalize
with a CSR for a NEW private key, and install key and chain atomically (``files.install_pair``).
Nothing is written unless the CA issued, so a failed order leaves the served pair as it was.

:func:`renewal_reason` says whether the installed certificate is due: missing, unreadable,
names changed, or less than ``renew_before`` left.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from acme import client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy.jwk import JWKRSA

from mxspool import metrics
from mxspool.config import Config
from mxspool.tls.certinfo import CertificateError, CertSummary, covers, read_pair
from mxspool.tls.challenges import Dns01HookSolver, Http01Solver, Solver
from mxspool.tls.files import account_key_path, acme_dir, acme_paths, install_pair

log = logging.getLogger("mxspool.tls")

ORDER_TIMEOUT = 120.0
"""Seconds an order may take from the first challenge answer to the certificate."""
NETWORK_TIMEOUT = 30
USER_AGENT = "mxspool acme-python"


class AcmeError(Exception):
    """The order failed; the message says where and what to check."""


@dataclass(frozen=True)
class AcmeSettings:
    directory: str
    email: str
    names: tuple[str, ...]
    cert_dir: Path
    account_key: Path
    key_type: str
    ca_file: str
    challenge: str
    http_listen: str
    dns_hook: str
    dns_delay: float
    renew_before: float

    @classmethod
    def from_config(cls, config: Config) -> AcmeSettings:
        acme = config.acme
        return cls(
            directory=acme.directory,
            email=acme.email,
            names=tuple(acme.names) or (config.smtp.hostname,),
            cert_dir=acme_dir(config),
            account_key=account_key_path(config),
            key_type=acme.key_type,
            ca_file=acme.ca_file,
            challenge=acme.challenge,
            http_listen=acme.http_listen,
            dns_hook=acme.dns_hook,
            dns_delay=acme.dns_delay,
            renew_before=acme.renew_before,
        )

    def solver(self) -> Solver:
        if self.challenge == "dns-01":
            return Dns01HookSolver(self.dns_hook, self.dns_delay)
        return Http01Solver(self.http_listen)


def renewal_reason(settings: AcmeSettings, now: datetime.datetime | None = None) -> str | None:
    """Why a new certificate is needed now, or None while the installed one is good."""
    paths = acme_paths(settings.cert_dir)
    if not paths.cert.exists():
        return "no certificate yet"
    try:
        leaf = read_pair(paths.cert, paths.key).leaf
    except CertificateError as exc:
        return f"the installed pair cannot be served ({exc})"
    missing = [name for name in settings.names if not covers(leaf.names, name)]
    if missing:
        return f"the certificate does not cover {', '.join(missing)}"
    left = leaf.seconds_left(now)
    if left < settings.renew_before:
        return f"{left / 86400:.1f} days left (renew_before is {settings.renew_before / 86400:g})"
    return None


def _account_key(path: Path) -> JWKRSA:
    """The account's key, created (RSA 2048, 0600) on first use."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise AcmeError(f"account key {path} is not an RSA key; move it away to make a new one")
        return JWKRSA(key=key)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    log.info("ACME: created account key %s", path)
    return JWKRSA(key=key)


def _certificate_key(key_type: str) -> bytes:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if key_type == "ec256":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _client(settings: AcmeSettings, key: JWKRSA) -> client.ClientV2:
    net = client.ClientNetwork(key, user_agent=USER_AGENT, timeout=NETWORK_TIMEOUT)
    if settings.ca_file:
        # requests takes a CA bundle path where acme's annotation says bool.
        net.verify_ssl = cast(bool, settings.ca_file)
    directory = client.ClientV2.get_directory(settings.directory, net)
    acme = client.ClientV2(directory, net)
    registration = messages.NewRegistration.from_data(
        email=settings.email or None, terms_of_service_agreed=True
    )
    try:
        acme.new_account(registration)
    except errors.ConflictError as exists:  # this key has an account: use it
        net.account = messages.RegistrationResource(
            uri=exists.location, body=messages.Registration()
        )
    return acme


def obtain(settings: AcmeSettings) -> CertSummary:
    """One order for ``settings.names``; installs and returns the new certificate."""
    try:
        summary = _order(settings)
    except Exception:
        metrics.acme_order(issued=False)
        raise
    metrics.acme_order(issued=True)
    return summary


def _order(settings: AcmeSettings) -> CertSummary:
    wildcards = [name for name in settings.names if name.startswith("*.")]
    if wildcards and settings.challenge != "dns-01":
        raise AcmeError(f'{", ".join(wildcards)}: wildcard names need challenge = "dns-01"')
    log.info(
        "ACME: ordering a certificate for %s from %s (%s)",
        ", ".join(settings.names),
        settings.directory,
        settings.challenge,
    )
    try:
        key = _account_key(settings.account_key)
        acme = _client(settings, key)
        key_pem = _certificate_key(settings.key_type)
        csr = crypto_util.make_csr(key_pem, list(settings.names))
        order = acme.new_order(csr)
        solver = settings.solver()
        answers = []
        for authorization in order.authorizations:
            if authorization.body.status == messages.STATUS_VALID:
                continue  # the CA still holds a recent validation of this name
            name = authorization.body.identifier.value
            if authorization.body.wildcard:
                name = f"*.{name}"
            offered = [c for c in authorization.body.challenges if isinstance(c.chall, solver.kind)]
            if not offered:
                kinds = ", ".join(sorted({c.chall.typ for c in authorization.body.challenges}))
                raise AcmeError(f"the CA offers no {settings.challenge} for {name} (only {kinds})")
            solver.prepare(name, offered[0], key)
            answers.append(offered[0])
        try:
            solver.start()
            for challenge in answers:
                acme.answer_challenge(challenge, challenge.chall.response(key))
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
            order = acme.poll_and_finalize(order, deadline)
        finally:
            solver.cleanup()
    except errors.ValidationError as exc:
        raise AcmeError(f"the CA could not validate: {_validation_detail(exc)}") from None
    except Exception as exc:  # acme's, the hook's, requests' (refused, TLS verification)...
        raise AcmeError(f"{type(exc).__name__}: {exc}") from None
    paths = install_pair(settings.cert_dir, order.fullchain_pem.encode("ascii"), key_pem)
    summary = read_pair(paths.cert, paths.key).leaf
    log.info(
        "ACME: installed certificate serial %s for %s, issuer %s, expires %s",
        summary.serial,
        ", ".join(summary.names),
        summary.issuer,
        f"{summary.not_after:%Y-%m-%d %H:%M}Z",
    )
    return summary


def _validation_detail(exc: errors.ValidationError) -> str:
    parts = []
    for authorization in exc.failed_authzrs:
        for challenge in authorization.body.challenges:
            if challenge.error is not None:
                name = authorization.body.identifier.value
                parts.append(f"{name} ({challenge.chall.typ}): {challenge.error}")
    return "; ".join(parts) or str(exc)
