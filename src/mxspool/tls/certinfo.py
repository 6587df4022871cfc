"""What a PEM certificate chain says, and whether a pair of files can be served.

Read with ``cryptography`` (not ``ssl``) so that every message can name what is wrong: a file
that is not PEM, a key that belongs to another certificate, a chain out of order, a name that is
not covered. The reloader and ``mxspool check tls`` both use these functions.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

MAX_PEM_BYTES = 1024 * 1024
"""A certificate chain or key file larger than this is refused (a chain is a few KiB)."""


class CertificateError(Exception):
    """The files cannot be served; the message says which file and what to do."""


@dataclass(frozen=True)
class CertSummary:
    subject: str
    issuer: str
    serial: str
    """Hexadecimal, as ``openssl x509 -serial`` prints it."""
    not_before: datetime.datetime
    not_after: datetime.datetime
    names: tuple[str, ...]
    """DNS names and IP addresses of the subjectAltName extension."""
    sha256: str

    def seconds_left(self, now: datetime.datetime | None = None) -> float:
        now = now or datetime.datetime.now(datetime.UTC)
        return (self.not_after - now).total_seconds()

    def to_dict(self, now: datetime.datetime | None = None) -> dict[str, object]:
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": self.serial,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "days_left": round(self.seconds_left(now) / 86400, 2),
            "names": list(self.names),
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class CertPair:
    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes

    @property
    def leaf(self) -> CertSummary:
        return summarize(self.chain[0])


def _read(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_PEM_BYTES + 1)
    except FileNotFoundError:
        raise CertificateError(f"{what} file {path} does not exist") from None
    except OSError as exc:
        raise CertificateError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PEM_BYTES:
        raise CertificateError(f"{what} file {path} is larger than {MAX_PEM_BYTES} bytes")
    return data


def load_chain(path: Path) -> tuple[x509.Certificate, ...]:
    data = _read(path, "certificate")
    try:
        chain = tuple(x509.load_pem_x509_certificates(data))
    except ValueError as exc:
        raise CertificateError(
            f"certificate file {path} holds no readable PEM certificate ({exc})"
        ) from None
    return chain


def load_key(path: Path) -> PrivateKeyTypes:
    data = _read(path, "key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(
            f"key file {path} holds no readable unencrypted PEM private key ({exc})"
        ) from None


def read_pair(cert: Path, key: Path) -> CertPair:
    """The chain and key of the two files, checked to belong together."""
    chain = load_chain(cert)
    private_key = load_key(key)
    if not key_matches(chain[0], private_key):
        raise CertificateError(
            f"the key in {key} does not belong to the first certificate in {cert}; "
            "put the server certificate first and use its own key"
        )
    return CertPair(chain, private_key)


def key_matches(cert: x509.Certificate, key: PrivateKeyTypes) -> bool:
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    try:
        mine = key.public_key().public_bytes(encoding, public)
    except (AttributeError, ValueError):
        return False
    return bool(cert.public_key().public_bytes(encoding, public) == mine)


def names_of(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    names: list[str] = [str(n) for n in extension.value.get_values_for_type(x509.DNSName)]
    names += [str(a) for a in extension.value.get_values_for_type(x509.IPAddress)]
    return tuple(names)


def summarize(cert: x509.Certificate) -> CertSummary:
    return CertSummary(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=f"{cert.serial_number:X}",
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        names=names_of(cert),
        sha256=cert.fingerprint(hashes.SHA256()).hex(),
    )


def covers(names: tuple[str, ...] | list[str], hostname: str) -> bool:
    """Whether a subjectAltName list covers ``hostname`` (RFC 6125: a ``*`` is the whole
    left-most label and matches exactly one label)."""
    wanted = hostname.rstrip(".").lower()
    try:
        address = ipaddress.ip_address(wanted)
    except ValueError:
        address = None
    for raw in names:
        name = raw.rstrip(".").lower()
        if address is not None:
            try:
                if ipaddress.ip_address(name) == address:
                    return True
            except ValueError:
                pass
            continue
        if name == wanted:
            return True
        if name.startswith("*.") and "." in wanted:
            head, _, rest = wanted.partition(".")
            if head and rest == name[2:]:
                return True
    return False


def chain_problems(chain: tuple[x509.Certificate, ...]) -> list[str]:
    """Each certificate must be issued (and signed) by the next one in the file."""
    problems = []
    for index, (cert, issuer) in enumerate(itertools.pairwise(chain)):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as exc:
            problems.append(
                f"certificate {index + 1} ({cert.subject.rfc4514_string()}) is not signed by "
                f"certificate {index + 2} ({issuer.subject.rfc4514_string()}): "
                f"{exc or 'bad signature'}; "
                "put the chain in order: server certificate, then each issuer"
            )
    return problems
