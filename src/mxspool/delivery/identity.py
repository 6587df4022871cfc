"""The spooler's outbound identity: the address delivery connects from, and what it presents.

Why it matters: the target tenant recognises mail that comes through the spooler by an inbound
connector, which lists either the spooler's public IPv4 address (``-SenderIPAddresses``, with
Enhanced Filtering's ``-EFSkipIPs``) or the name on its TLS client certificate
(``-TlsSenderCertificateName``). Mail that leaves over IPv6, or from whichever address the OS
picks on a host with several, or without a certificate, matches no connector and is judged as
if the spooler were the sender (SPF fails, reputation is the spooler's).

So ``[delivery]`` names them: ``source_address`` (at most one IPv4 and one IPv6 address; a
connection binds the one of the destination's family, or none when that family has none),
``address_family`` (which IP versions delivery may use at all; the ``exchange-online`` profile
narrows it, see ``exchange.address_family``) and ``tls_client_cert``/``tls_client_key``
(presented on STARTTLS when the hop asks for a certificate). ``outbound_identity`` checks them
once, when delivery starts: every source address must be local (a bind test) and the
certificate and key readable and matching; each error names the key and says what to do.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.x509.oid import NameOID

from mxspool.config import AddressFamily, ConfigError, DeliveryConfig
from mxspool.delivery import exchange


class IdentityError(ConfigError):
    """``[delivery]`` names an outbound identity this machine cannot use; says what to fix."""


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """The TLS client certificate delivery presents, as read from its file."""

    cert_path: str
    key_path: str
    subject: str
    """The subject's common name ("" when it has none)."""
    names: tuple[str, ...]
    """The DNS names of its subjectAltName."""
    not_after: datetime

    @property
    def name(self) -> str:
        """The name a connector's TlsSenderCertificateName should match: the first DNS name
        of the subjectAltName, else the common name."""
        return self.names[0] if self.names else self.subject

    @property
    def expired(self) -> bool:
        return self.not_after <= datetime.now(UTC)

    def describe(self) -> str:
        names = ", ".join(self.names) or "-"
        return (
            f"subject CN={self.subject or '-'}, names {names}, "
            f"expires {self.not_after.isoformat(timespec='seconds')}"
        )


@dataclass(frozen=True, slots=True)
class OutboundIdentity:
    family: AddressFamily = "any"
    source_v4: str | None = None
    source_v6: str | None = None
    client_cert: ClientCertificate | None = None

    def source_for(self, address: str) -> str | None:
        """The configured source address of ``address``'s family, if any."""
        return self.source_v6 if _version(address) == 6 else self.source_v4

    def family_for(self, profile: str | None) -> AddressFamily | None:
        """The family delivery to a domain with ``profile`` may use; None: no family is
        allowed (the profile and the configuration disagree)."""
        if exchange.applies(profile):
            return exchange.address_family(self.family, by_certificate=self.client_cert is not None)
        return self.family

    def load_into(self, context: ssl.SSLContext) -> None:
        """Present the client certificate (if any) in TLS sessions made with ``context``."""
        if self.client_cert is not None:
            context.load_cert_chain(
                self.client_cert.cert_path, self.client_cert.key_path, password=_no_password
            )


NO_IDENTITY = OutboundIdentity()
"""What delivery does without configuration: any family, the OS's address, no certificate."""


def allowed(address: str, family: AddressFamily) -> bool:
    """Whether connecting to ``address`` is in ``family``."""
    return family == "any" or (_version(address) == 4) == (family == "ipv4")


def _version(address: str) -> int:
    return ipaddress.ip_address(address.strip("[]")).version


def _no_password() -> bytes:
    raise IdentityError(
        "[delivery] tls_client_key is encrypted; mxspool needs the key without a passphrase "
        "(openssl pkey -in KEY -out KEY.plain), readable only by the mxspool user"
    )


def outbound_identity(delivery: DeliveryConfig) -> OutboundIdentity:
    """The checked identity of ``[delivery]``; raises IdentityError."""
    sources = {_version(address): address for address in delivery.source_address}
    for address in sources.values():
        _bind_test(address)
    cert = None
    if delivery.tls_client_cert:
        cert = _client_certificate(delivery.tls_client_cert, delivery.tls_client_key)
    return OutboundIdentity(delivery.address_family, sources.get(4), sources.get(6), cert)


def _bind_test(address: str) -> None:
    family = socket.AF_INET6 if _version(address) == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError as exc:
            what = (
                "is not an address of this machine"
                if exc.errno == errno.EADDRNOTAVAIL
                else "cannot be bound"
            )
            raise IdentityError(
                f"[delivery] source_address {address} {what} ({exc.strerror or exc}); give "
                "one of this machine's addresses ('ip -brief address' lists them), or remove "
                "it to let the system choose"
            ) from None


def _client_certificate(cert_path: str, key_path: str) -> ClientCertificate:
    try:
        with open(cert_path, "rb") as file:
            pem = file.read()
        with open(key_path, "rb"):
            pass
    except OSError as exc:
        raise IdentityError(
            f"[delivery] tls_client_cert/tls_client_key: cannot read {exc.filename} "
            f"({exc.strerror or exc}); check the path and that the mxspool user may read it"
        ) from None
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise IdentityError(
            f"[delivery] tls_client_cert {cert_path} is not a PEM certificate ({exc}); give "
            "the certificate (chain) in PEM form"
        ) from None
    try:
        ssl.create_default_context(ssl.Purpose.SERVER_AUTH).load_cert_chain(
            cert_path, key_path, password=_no_password
        )
    except ssl.SSLError as exc:
        raise IdentityError(
            f"[delivery] tls_client_key {key_path} does not match tls_client_cert {cert_path} "
            f"or is not a PEM private key ({exc.reason or exc}); give the key the "
            "certificate was issued for"
        ) from None
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = tuple(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return ClientCertificate(
        cert_path,
        key_path,
        str(common[0].value) if common else "",
        names,
        cert.not_valid_after_utc,
    )


def certificate_name(delivery: DeliveryConfig) -> str | None:
    """The configured client certificate's name (for the runbook's connector); None when no
    certificate is configured. Raises IdentityError when it cannot be read."""
    if not delivery.tls_client_cert:
        return None
    return _client_certificate(delivery.tls_client_cert, delivery.tls_client_key).name
