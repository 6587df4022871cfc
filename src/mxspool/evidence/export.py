"""``mxspool export``: the stored messages of domains, byte-exact, for an archive or a legal hold.

What is written is what the store holds: the message as received, with the ``Received:`` line
mxspool added at the top, never re-encoded (8-bit bytes and CRLF line ends as they came).
A message is selected when it has a recipient in one of the domains (in the given ``state``,
if one is given: the states of ``queue list --state``, ``held`` included), and written once
however many of its recipients match.

Two formats, both streamed: memory stays constant whatever the number and size of messages
(the store is read a page of recipient rows and a body piece at a time; nothing collects
the messages).

``mbox``
    mboxrd (:mod:`.mboxrd`): each message is a separator line ``From SENDER DATE`` (SENDER the
    envelope sender, ``MAILER-DAEMON`` for the null sender, whitespace in it as ``_``; DATE
    the arrival time in UTC, ``asctime`` form, e.g. ``Mon Jan  1 12:00:00 2024``) ending in
    LF, then the stored bytes with every line matching ``>*From `` given one more ``>``, then
    one empty line (LF). Undo the quoting and drop that last LF to get the stored bytes back.
``eml-zip``
    A ZIP (deflate; ZIP64 and data descriptors where the output is a pipe) with one
    ``<queue-id>.eml`` per message, its exact stored bytes, and last an ``index.csv``: file,
    queue_id, message_id, mail_from, recipients (the message's recipients in the exported
    domains, space-separated), received_at, size, sha256 (of the bytes written, which is the
    ledger's ``sha256``), note (why a message has no file: ``purged``, or a checksum
    mismatch). Cells are formula-safe (:mod:`mxspool.csvsafe`).

A message whose body was purged (``mxspool purge``) cannot be exported: it is listed (stderr,
and ``index.csv``) and skipped. Bytes whose SHA-256 is not the one stored at arrival are still
written but reported, and the command exits 1.
"""

from __future__ import annotations

import csv
import hashlib
import io
import tempfile
import time
import zipfile
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import IO

from mxspool import operations as ops
from mxspool.csvsafe import csv_cells
from mxspool.evidence.mboxrd import Quoter
from mxspool.store import purge
from mxspool.store.base import (
    QUEUE_STATES,
    NotFound,
    QueueFilter,
    RecipientRecord,
    Store,
    StoredMessage,
)

FORMATS = ("mbox", "eml-zip")
PAGE = 500
"""Recipient rows read per store query."""
RECENT = 10_000
"""Message ids remembered to write each message once. A message's recipient rows are stored
together (one transaction), so its rows in a domain come within this many of each other."""
INDEX_COLUMNS = (
    "file",
    "queue_id",
    "message_id",
    "mail_from",
    "recipients",
    "received_at",
    "size",
    "sha256",
    "note",
)
SPOOL_INDEX = 1024 * 1024
"""index.csv stays in memory up to this size, then moves to a temporary file."""


@dataclass(frozen=True, slots=True)
class Selected:
    """A message to export, with its recipients in the exported domains."""

    message: StoredMessage
    recipients: tuple[str, ...]


@dataclass(slots=True)
class ExportSummary:
    messages: int = 0
    bytes: int = 0
    purged: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    """Messages whose bytes' sha256 is not the one stored at arrival (store damage)."""

    @property
    def ok(self) -> bool:
        return not self.mismatched


def shown_state(recipient: RecipientRecord) -> str:
    return "held" if recipient.held else recipient.state.value


def check_state(state: str | None) -> str | None:
    if state is not None and state not in QUEUE_STATES:
        raise ops.OperationError(
            f"--state {state}: not a state; use one of {', '.join(QUEUE_STATES)}"
        )
    return state


async def select_messages(
    store: Store, domains: Sequence[str], state: str | None = None
) -> AsyncIterator[Selected]:
    """Each message with a recipient in ``domains`` (in ``state``), once, domain by domain."""
    names = list(dict.fromkeys(ops.normalize_domain(name) for name in domains))
    if not names:
        raise ops.OperationError("give at least one --domain to export")
    check_state(state)
    for index, domain in enumerate(names):
        earlier = set(names[:index])
        recent: OrderedDict[str, None] = OrderedDict()
        after: int | None = None
        while True:
            page = await store.list_queue(
                QueueFilter(domain=domain, state=state), limit=PAGE, after=after
            )
            for entry in page:
                if entry.message_id in recent:
                    continue
                recent[entry.message_id] = None
                if len(recent) > RECENT:
                    recent.popitem(last=False)
                message = await store.get_message(entry.message_id)
                if message is None:  # gone since the page was read
                    continue
                if any(
                    r.domain in earlier and (state is None or shown_state(r) == state)
                    for r in message.recipients
                ):
                    continue  # written in an earlier domain's pass
                rcpts = tuple(r.address for r in message.recipients if r.domain in names)
                yield Selected(message, rcpts)
            if len(page) < PAGE:
                break
            after = page[-1].recipient_id


async def _body(
    store: Store, message: StoredMessage, summary: ExportSummary
) -> AsyncIterator[bytes] | None:
    """The body's pieces, or None (noted in ``summary``) when it cannot be read."""
    pieces = aiter(store.read_body(message.id))
    try:
        first = await anext(pieces, b"")
    except NotFound:
        (summary.purged if purge.purged_at(message.tags) else summary.missing).append(message.id)
        return None

    async def all_pieces() -> AsyncIterator[bytes]:
        if first:
            yield first
        async for piece in pieces:
            yield piece

    return all_pieces()


def separator(message: StoredMessage) -> bytes:
    """The mbox ``From `` line of a message (with its LF)."""
    sender = "".join("_" if ch.isspace() else ch for ch in message.mail_from) or "MAILER-DAEMON"
    date = time.asctime(time.gmtime(message.received_at))
    return f"From {sender} {date}\n".encode()


async def write_mbox(
    store: Store, selected: AsyncIterator[Selected], out: IO[bytes]
) -> ExportSummary:
    """Write the messages as mboxrd to ``out``."""
    summary = ExportSummary()
    async for item in selected:
        message = item.message
        body = await _body(store, message, summary)
        if body is None:
            continue
        out.write(separator(message))
        quoter = Quoter()
        digest = hashlib.sha256()
        last = b""
        async for piece in body:
            digest.update(piece)
            summary.bytes += len(piece)
            out.write(quoter.feed(piece))
            last = piece[-1:]
        out.write(quoter.finish())
        # Stored messages end in CRLF (SMTP); one without a line end gets one, or the
        # empty line that ends it would join its last line.
        out.write(b"\n" if last == b"\n" else b"\n\n")
        summary.messages += 1
        if digest.hexdigest() != message.sha256:
            summary.mismatched.append(message.id)
    out.flush()
    return summary


async def write_eml_zip(
    store: Store, selected: AsyncIterator[Selected], out: IO[bytes]
) -> ExportSummary:
    """Write the messages as a ZIP of ``<queue-id>.eml`` files and an ``index.csv``."""
    summary = ExportSummary()
    with (
        tempfile.SpooledTemporaryFile(
            SPOOL_INDEX, mode="w+", newline="", encoding="utf-8"
        ) as index,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as archive,
    ):
        rows = csv.writer(index)
        rows.writerow(INDEX_COLUMNS)
        async for item in selected:
            message = item.message
            body = await _body(store, message, summary)
            name, note, digest_hex = f"{message.id}.eml", "", message.sha256
            if body is None:
                name, note = "", "purged" if message.id in summary.purged else "missing"
            else:
                info = zipfile.ZipInfo(name, time.gmtime(message.received_at)[:6])
                info.compress_type = zipfile.ZIP_DEFLATED
                digest = hashlib.sha256()
                with archive.open(info, "w", force_zip64=message.size > 1 << 30) as entry:
                    async for piece in body:
                        digest.update(piece)
                        summary.bytes += len(piece)
                        entry.write(piece)
                summary.messages += 1
                digest_hex = digest.hexdigest()
                if digest_hex != message.sha256:
                    summary.mismatched.append(message.id)
                    note = f"stored sha256 {message.sha256} differs: the store may be damaged"
            rows.writerow(
                csv_cells(
                    (
                        name,
                        message.id,
                        message.message_id,
                        message.mail_from,
                        " ".join(item.recipients),
                        ops.iso_time(message.received_at),
                        message.size,
                        digest_hex,
                        note,
                    )
                )
            )
        index.seek(0)
        info = zipfile.ZipInfo("index.csv", time.gmtime()[:6])
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as entry:
            while text := index.read(io.DEFAULT_BUFFER_SIZE * 16):
                entry.write(text.encode("utf-8"))
    out.flush()
    return summary


async def export(
    store: Store,
    domains: Sequence[str],
    fmt: str,
    out: IO[bytes],
    state: str | None = None,
) -> ExportSummary:
    """The messages of ``domains`` (in ``state``) to ``out`` as ``fmt`` (``FORMATS``)."""
    if fmt not in FORMATS:
        raise ops.OperationError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    if not domains:
        raise ops.OperationError("give at least one --domain to export")
    for name in domains:
        ops.normalize_domain(name)  # a bad name is refused before anything is written
    check_state(state)
    selected = select_messages(store, domains, state)
    if fmt == "mbox":
        return await write_mbox(store, selected, out)
    return await write_eml_zip(store, selected, out)
