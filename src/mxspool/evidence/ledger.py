"""The signed ledger: the reconciliation report as a hash-chained CSV and a signed manifest.

``mxspool report --sign --out FILE`` (and ``migration report NAME --sign``) writes three files:

``FILE``
    The report CSV (RFC 4180: comma, ``"`` quoting, CRLF record ends, UTF-8, the project's
    formula-safe cells, :mod:`mxspool.csvsafe`) with the columns of ``mxspool report`` plus a
    last one, ``chain_sha256``.
``FILE.manifest.json``
    What the ledger holds (keys below), as JSON, UTF-8.
``FILE.manifest.sig``
    The Ed25519 signature (RFC 8032, 64 raw bytes) of the manifest file's exact bytes.

The hash chain. Each record's *canonical bytes* are its cells, except the last one
(``chain_sha256``), each as a netstring: the decimal length in bytes of the cell's UTF-8, ``:``,
those bytes, ``,`` (so ``["ab", ""]`` is ``2:ab,0:,``). Cells are taken as they are in the
file after CSV unquoting (formula-safe quotes and all). Then, with ``H`` SHA-256::

    h_0 = H(canonical bytes of the header record)
    h_i = H(h_{i-1} || canonical bytes of row i)      (h_{i-1} as its 32 raw bytes)

Row ``i``'s ``chain_sha256`` cell is ``h_i`` in lowercase hex, so a verifier names the exact
row where the chain breaks; the manifest's ``chain_final`` (``h_n``, or ``h_0`` with no rows)
is what the signature covers, so re-hashing the rows is not enough to forge a ledger.

The manifest's keys: ``format`` (``mxspool-ledger/1``), ``ledger_file`` (its name when
written), ``ledger_sha256`` and ``ledger_bytes`` (of the whole CSV file), ``columns``,
``rows``, ``totals`` (rows per state: every state of ``queue list --state``, zeros
included), ``chain_head`` (``h_0``), ``chain_final``, ``generator`` (``mxspool VERSION``),
``generated_at`` (ISO 8601 UTC), ``scope`` (``store``: the store URL without its password;
``domains``: the list covered, null for every domain; ``rows``: ``all`` or ``unfinished`` for
``--check``; ``migration`` when written by ``migration report``), ``public_key`` (base64 of
the 32 raw bytes) and ``key_fingerprint`` (``SHA256:`` and the unpadded base64 of the SHA-256
of those bytes).

Memory stays constant: rows are written and hashed one at a time as the store pages them in.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mxspool import operations as ops
from mxspool.csvsafe import csv_cells
from mxspool.evidence.keys import fingerprint, raw_public
from mxspool.store.base import QUEUE_STATES, Store

FORMAT = "mxspool-ledger/1"
CHAIN_COLUMN = "chain_sha256"
COLUMNS = (*ops.REPORT_COLUMNS, CHAIN_COLUMN)
MANIFEST_SUFFIX = ".manifest.json"
SIGNATURE_SUFFIX = ".manifest.sig"


class LedgerError(Exception):
    """The signed ledger could not be written; the message says what to do."""


def netstrings(cells: Sequence[str]) -> bytes:
    """The canonical bytes of a record's cells (each ``len:bytes,``)."""
    out = bytearray()
    for cell in cells:
        data = cell.encode("utf-8")
        out += b"%d:" % len(data)
        out += data
        out += b","
    return bytes(out)


def chain_start(header: Sequence[str]) -> bytes:
    """``h_0``: the hash of the header's cells without the chain column."""
    return hashlib.sha256(netstrings(header[:-1])).digest()


def chain_next(previous: bytes, cells: Sequence[str]) -> bytes:
    """``h_i`` from ``h_{i-1}`` and row i's cells without the chain column."""
    return hashlib.sha256(previous + netstrings(cells)).digest()


def manifest_path(ledger: Path) -> Path:
    return ledger.with_name(ledger.name + MANIFEST_SUFFIX)


def signature_path(ledger: Path) -> Path:
    return ledger.with_name(ledger.name + SIGNATURE_SUFFIX)


def generator() -> str:
    try:
        return f"mxspool {version('mxspool')}"
    except PackageNotFoundError:  # pragma: no cover (running from a source tree)
        return "mxspool"


def store_label(url: str) -> str:
    """The store URL as the manifest names it: any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True, slots=True)
class Scope:
    """What the ledger covers, as the manifest's ``scope`` states it."""

    store: str
    domains: Sequence[str] | None = None
    """None: every domain."""
    unfinished_only: bool = False
    migration: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "store": self.store,
            "domains": None if self.domains is None else list(self.domains),
            "rows": "unfinished" if self.unfinished_only else "all",
        }
        if self.migration is not None:
            data["migration"] = self.migration
        return data


class _HashingFile:
    """A binary file that hashes and counts what is written to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("xb")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.sha256.update(data)
        self.size += len(data)

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


class LedgerWriter:
    """Streams report rows (``operations.report`` dicts) into a signed ledger at ``path``.

    ``write`` each row, then ``finish`` writes the manifest and its signature and moves the
    three files into place (written under temporary names first, so a failed run leaves no
    ledger that looks complete). Existing files are never overwritten.
    """

    def __init__(self, path: Path, key: Ed25519PrivateKey, scope: Scope) -> None:
        self.path = path
        self._key = key
        self._scope = scope
        self._targets = (path, manifest_path(path), signature_path(path))
        for target in self._targets:
            if target.exists():
                raise LedgerError(
                    f"{target} exists; a signed ledger is never overwritten. Choose another "
                    "--out, or move the old ledger away first"
                )
        self._temps = tuple(t.with_name(f".{t.name}.tmp{os.getpid()}") for t in self._targets)
        try:
            self._out = _HashingFile(self._temps[0])
        except OSError as exc:
            raise LedgerError(f"cannot write {path}: {exc.strerror}") from None
        self._buffer = io.StringIO()
        self._csv = csv.writer(self._buffer)
        self._chain = chain_start(COLUMNS)
        self._head = self._chain.hex()
        self.rows = 0
        self.totals: dict[str, int] = dict.fromkeys(QUEUE_STATES, 0)
        self._record(list(COLUMNS))

    def _record(self, cells: list[str]) -> None:
        self._csv.writerow(cells)
        self._out.write(self._buffer.getvalue().encode("utf-8"))
        self._buffer.seek(0)
        self._buffer.truncate(0)

    def write(self, row: Mapping[str, Any]) -> None:
        cells = csv_cells(row[column] for column in ops.REPORT_COLUMNS)
        self._chain = chain_next(self._chain, cells)
        self._record([*cells, self._chain.hex()])
        self.rows += 1
        state = str(row["state"])
        self.totals[state] = self.totals.get(state, 0) + 1

    def finish(self, now: float | None = None) -> dict[str, Any]:
        """Write the manifest and signature, move the files into place; the manifest."""
        self._out.close()
        public = self._key.public_key()
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "ledger_file": self.path.name,
            "ledger_sha256": self._out.sha256.hexdigest(),
            "ledger_bytes": self._out.size,
            "columns": list(COLUMNS),
            "rows": self.rows,
            "totals": self.totals,
            "chain_head": self._head,
            "chain_final": self._chain.hex(),
            "generator": generator(),
            "generated_at": ops.iso_time(time.time() if now is None else now),
            "scope": self._scope.to_dict(),
            "public_key": base64.b64encode(raw_public(public)).decode("ascii"),
            "key_fingerprint": fingerprint(public),
        }
        data = (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
        try:
            self._temps[1].write_bytes(data)
            self._temps[2].write_bytes(self._key.sign(data))
            for temp, target in zip(self._temps, self._targets, strict=True):
                temp.rename(target)
        except OSError as exc:
            self.abort()
            raise LedgerError(f"cannot write the ledger's manifest: {exc}") from None
        return manifest

    def abort(self) -> None:
        """Drop the temporary files (after an error)."""
        if not self._out._file.closed:
            self._out._file.close()
        for temp in self._temps:
            temp.unlink(missing_ok=True)


@dataclass(slots=True)
class SignedReport:
    """What ``sign_report`` wrote: the manifest, and the rows seen (``--check`` counts)."""

    manifest: dict[str, Any]
    seen: int = 0
    """Report rows read, before the unfinished-only filter."""
    unfinished: int = 0
    path: Path = field(default_factory=Path)


async def signed_rows(
    rows: AsyncIterable[dict[str, Any]],
    path: Path,
    key: Ed25519PrivateKey,
    scope: Scope,
) -> SignedReport:
    """Write ``rows`` (``operations.report`` dicts) as a signed ledger at ``path``; with
    ``scope.unfinished_only`` only the rows not final are written (``report --check``)."""
    writer = LedgerWriter(path, key, scope)
    result = SignedReport({}, path=path)
    try:
        async for row in rows:
            result.seen += 1
            if not ops.is_final(row):
                result.unfinished += 1
            elif scope.unfinished_only:
                continue
            writer.write(row)
    except BaseException:
        writer.abort()
        raise
    result.manifest = writer.finish()
    return result


async def sign_report(
    store: Store,
    path: Path,
    key: Ed25519PrivateKey,
    domains: Sequence[str] | None = None,
    *,
    store_url: str,
    unfinished_only: bool = False,
    migration: str | None = None,
) -> SignedReport:
    """The report of ``domains`` (in that order; None: every domain) as a signed ledger at
    ``path``. ``store_url`` is named in the manifest, without its password."""
    names = None if domains is None else [ops.normalize_domain(name) for name in domains]

    async def rows() -> AsyncIterator[dict[str, Any]]:
        for name in names if names is not None else [None]:
            async for row in ops.report(store, name):
                yield row

    scope = Scope(store_label(store_url), names, unfinished_only, migration)
    return await signed_rows(rows(), path, key, scope)
