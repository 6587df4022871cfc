"""``mxspool ledger verify``: is this the ledger mxspool signed, and if not, what changed?

The checks, each reported on its own so the answer says exactly what is wrong: the manifest
and its signature are there; the signature is good for the given public key (or, without one,
for the key the manifest names, which proves only that the files agree with each other: the
fingerprint printed must then be compared with the published one); the ledger file's SHA-256
and size; the header; the hash chain row by row (each row's ``chain_sha256`` is recomputed
from the row before it, so the first row that was changed, or that follows a removed or added
row, is named); the final hash, the row count and the totals per state against the manifest.
The ledger file is read as a stream: memory stays constant at millions of rows.
"""

from __future__ import annotations

import binascii
import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mxspool.csvsafe import read_cell
from mxspool.evidence.keys import LedgerKeyError, fingerprint, parse_public_key
from mxspool.evidence.ledger import (
    CHAIN_COLUMN,
    COLUMNS,
    FORMAT,
    MANIFEST_SUFFIX,
    SIGNATURE_SUFFIX,
    chain_next,
    chain_start,
    manifest_path,
    signature_path,
)

MAX_MANIFEST = 1024 * 1024
MAX_BREAKS = 10
"""Chain breaks named one by one; more are counted."""
HASH_PIECE = 1024 * 1024


@dataclass(slots=True)
class Verification:
    """The outcome: ``problems`` empty means the ledger holds up."""

    ledger: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    rows: int = 0
    fingerprint: str | None = None
    key_given: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def ledger_of(path: Path) -> Path:
    """The ledger file named by ``path``: itself, or the one its manifest/signature is of."""
    for suffix in (MANIFEST_SUFFIX, SIGNATURE_SUFFIX):
        if path.name.endswith(suffix):
            return path.with_name(path.name.removesuffix(suffix))
    return path


def verify_ledger(path: Path, public_key: Ed25519PublicKey | None = None) -> Verification:
    """Check the ledger at ``path`` (or the one whose manifest ``path`` is) in full."""
    ledger = ledger_of(path)
    result = Verification(ledger, key_given=public_key is not None)
    manifest = _read_manifest(ledger, result)
    if manifest is None:
        return result
    result.manifest = manifest
    _check_signature(ledger, manifest, public_key, result)
    if not ledger.is_file():
        result.problems.append(f"the ledger file {ledger} is missing")
        return result
    _check_file_hash(ledger, manifest, result)
    _check_rows(ledger, manifest, result)
    return result


def _read_manifest(ledger: Path, result: Verification) -> dict[str, Any] | None:
    path = manifest_path(ledger)
    if not path.is_file():
        result.problems.append(
            f"missing manifest: no {path.name} beside {ledger.name}; a signed ledger is "
            "three files (FILE, FILE.manifest.json, FILE.manifest.sig): keep them together"
        )
        return None
    if path.stat().st_size > MAX_MANIFEST:
        result.problems.append(f"{path.name} is larger than {MAX_MANIFEST} bytes: not a manifest")
        return None
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        result.problems.append(f"{path.name} is not valid JSON: {exc}")
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        result.problems.append(f"{path.name} is not a {FORMAT} manifest")
        return None
    return data


def _check_signature(
    ledger: Path,
    manifest: dict[str, Any],
    public_key: Ed25519PublicKey | None,
    result: Verification,
) -> None:
    named: Ed25519PublicKey | None = None
    try:
        named = parse_public_key(str(manifest.get("public_key", "")))
    except LedgerKeyError as exc:
        result.problems.append(f"the manifest's public_key is unusable: {exc}")
    key = public_key or named
    if key is None:
        return
    result.fingerprint = fingerprint(key)
    if public_key is not None and named is not None and fingerprint(named) != fingerprint(key):
        result.problems.append(
            f"wrong key: the manifest says it was signed by {fingerprint(named)}, not by the "
            f"given public key {fingerprint(key)}"
        )
    elif public_key is None:
        result.notes.append(
            f"checked against the key the manifest names, {result.fingerprint}: compare it with "
            "the fingerprint you were given, or pass --public-key"
        )
    sig_path = signature_path(ledger)
    if not sig_path.is_file():
        result.problems.append(f"missing signature: no {sig_path.name} beside {ledger.name}")
        return
    signature = sig_path.read_bytes()[:1024]
    try:
        key.verify(signature, manifest_path(ledger).read_bytes())
    except InvalidSignature:
        result.problems.append(
            f"bad signature: {manifest_path(ledger).name} was changed after it was signed, or "
            f"was not signed with the key {result.fingerprint}"
        )


def _check_file_hash(ledger: Path, manifest: dict[str, Any], result: Verification) -> None:
    digest = hashlib.sha256()
    size = 0
    with ledger.open("rb") as source:
        while piece := source.read(HASH_PIECE):
            digest.update(piece)
            size += len(piece)
    if digest.hexdigest() != manifest.get("ledger_sha256") or size != manifest.get("ledger_bytes"):
        result.problems.append(
            f"the ledger file differs from the one signed: sha256 {digest.hexdigest()} "
            f"({size} bytes), the manifest says {manifest.get('ledger_sha256')} "
            f"({manifest.get('ledger_bytes')} bytes)"
        )


def _check_rows(ledger: Path, manifest: dict[str, Any], result: Verification) -> None:
    columns = manifest.get("columns")
    with ledger.open(newline="", encoding="utf-8", errors="strict") as source:
        reader = csv.reader(source)
        try:
            header = next(reader, None)
            if header is None:
                result.problems.append(f"{ledger.name} is empty (no header)")
                return
            if header != columns or header[-1:] != [CHAIN_COLUMN]:
                result.problems.append(f"header {header} is not the manifest's columns {columns}")
                return
            if header != list(COLUMNS):
                result.notes.append("columns differ from this mxspool version's (checked as given)")
            state_at = header.index("state")
            true_chain = chain_start(header)
            previous = true_chain  # the hash the next row should build on, resynchronized
            totals: dict[str, int] = {}
            breaks = 0
            for cells in reader:
                result.rows += 1
                number = result.rows
                if len(cells) != len(header):
                    result.problems.append(
                        f"row {number} (line {reader.line_num}) has {len(cells)} cells, not "
                        f"{len(header)}"
                    )
                    breaks += 1
                    continue
                body, stored = cells[:-1], cells[-1]
                true_chain = chain_next(true_chain, body)
                expected = chain_next(previous, body)
                if expected.hex() != stored:
                    breaks += 1
                    if breaks <= MAX_BREAKS:
                        result.problems.append(
                            f"the chain breaks at row {number} (line {reader.line_num}, id "
                            f"{body[0]}, rcpt {body[3]}): this row was changed, or a row just "
                            "before it was removed or added"
                        )
                previous = _stored_hash(stored) or expected
                state = read_cell(body[state_at])
                totals[state] = totals.get(state, 0) + 1
        except (csv.Error, UnicodeDecodeError) as exc:
            result.problems.append(f"{ledger.name} is not a readable CSV: {exc}")
            return
    if breaks > MAX_BREAKS:
        result.problems.append(f"... and the chain breaks at {breaks - MAX_BREAKS} more rows")
    if true_chain.hex() != manifest.get("chain_final"):
        result.problems.append(
            f"the chain's final hash {true_chain.hex()} is not the signed "
            f"{manifest.get('chain_final')}: rows were changed, removed or added"
        )
    if result.rows != manifest.get("rows"):
        result.problems.append(
            f"row count: the ledger has {result.rows} rows, the manifest says "
            f"{manifest.get('rows')}"
        )
    signed_totals = manifest.get("totals")
    signed = (
        {k: v for k, v in signed_totals.items() if v} if isinstance(signed_totals, dict) else {}
    )
    if totals != signed:
        differ = sorted(set(totals) | set(signed))
        parts = [
            f"{state}: ledger {totals.get(state, 0)}, manifest {signed.get(state, 0)}"
            for state in differ
            if totals.get(state, 0) != signed.get(state, 0)
        ]
        result.problems.append("totals differ: " + "; ".join(parts))


def _stored_hash(text: str) -> bytes | None:
    try:
        raw = binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None
