"""The read side of the SQL stores, written once for SQLite and PostgreSQL.

Every query that only reads (the queue, a message, its attempts, the report, the audit log,
domains and recipient lists) is built here for a ``Dialect`` and its rows are mapped here, once,
into the dataclasses of ``store.base``. ``ReadSide`` is the part of the Store protocol made of
those reads; each backend inherits it and supplies one connector method, ``_fetch``, that runs
a query and returns its rows as tuples. What really differs between the backends stays in
them: connections, migrations, the write path, claims and leases, notifications and pacing.

Values are never spliced into SQL: ``Params`` writes the dialect's placeholder for each one and
keeps the values in order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from mxspool.store import codec
from mxspool.store.base import (
    EVERY_ROW,
    AttemptRecord,
    AuditEntry,
    ClaimedRecipient,
    ClientInfo,
    DeliveryJob,
    Domain,
    QueueEntry,
    QueueFilter,
    RecipientRecord,
    RecipientState,
    ReportRow,
    StoredMessage,
)

Row = tuple[Any, ...]

LIKE_ESCAPE = "!"
"""The escape character of every LIKE pattern built here. Not a backslash: PostgreSQL would
read ``'\\'`` differently with standard_conforming_strings off."""

REPORT_PAGE = 1000
"""Rows per query of ``report``: memory stays flat however large the store is."""


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between the SQL of the two backends, for the queries of this module.

    ``placeholder`` marks one parameter (``?`` for sqlite3, ``%s`` for psycopg). ``false`` is
    the boolean literal (SQLite stores 0 and 1). ``ilike`` compares ignoring case (SQLite's
    LIKE already does, for ASCII). ``find(haystack, needle)`` is the 1-based position of a
    substring, 0 when absent. ``arrays``: a list binds as one array parameter rather than one
    parameter per value. ``first_body`` joins a message ``m`` to the row ``b`` holding the
    first piece of its body (SQLite keeps a body in one row, PostgreSQL in 1 MiB chunks).
    Upserts (``ON CONFLICT ... DO UPDATE ... excluded``) are spelled alike and need nothing.
    """

    placeholder: str
    false: str
    ilike: str
    find: str
    arrays: bool
    first_body: str

    def like(self, column: str, placeholder: str) -> str:
        """``column`` matches the pattern case-insensitively, ``LIKE_ESCAPE`` escaping."""
        return f"{column} {self.ilike} {placeholder} ESCAPE '{LIKE_ESCAPE}'"

    def one_of(self, p: Params, values: Sequence[Any]) -> str:
        """The test that a value is one of ``values``: ``= ANY(array)`` or ``IN (...)``."""
        if self.arrays:
            return f"= ANY({p(list(values))})"
        return f"IN ({', '.join(p(value) for value in values)})"


SQLITE = Dialect("?", "0", "LIKE", "instr", False, "b.seq = m.seq")
POSTGRES = Dialect("%s", "false", "ILIKE", "strpos", True, "b.message_seq = m.seq AND b.chunk = 0")


def like_contains(text: str) -> str:
    """A LIKE pattern that matches ``text`` anywhere, its ``%`` and ``_`` taken literally."""
    escaped = (
        text.replace(LIKE_ESCAPE, LIKE_ESCAPE * 2)
        .replace("%", LIKE_ESCAPE + "%")
        .replace("_", LIKE_ESCAPE + "_")
    )
    return f"%{escaped}%"


class Params:
    """The values of one query, in order; calling it with a value gives its placeholder."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return self.dialect.placeholder


# -- rows -> dataclasses ----------------------------------------------------------------------


def shown_state(state: str, released: Any, mode: str | None) -> str:
    """The state an operator sees: ``pending`` in a held domain is ``held`` (unless released
    as a canary)."""
    if state == "pending" and not released and mode == "hold":
        return "held"
    return state


# Each column list below follows its dataclass's field order, with the columns a field is
# computed from (state, released, mode: the shown state) where that field stands.

_QUEUE_COLUMNS = (
    "m.id, r.id, r.rcpt, r.domain, m.mail_from, m.size, m.received_at, "
    "r.state, r.released, d.mode, r.attempts, r.last_reply"
)


def _queue_entry(row: Row) -> QueueEntry:
    mid, rid, rcpt, domain, mail_from, size, at, state, released, mode, tries, reply = row
    shown = shown_state(state, released, mode)
    return QueueEntry(mid, rid, rcpt, domain, mail_from, size, at, shown, tries, reply)


_MESSAGE_COLUMNS = (
    "m.id, m.received_at, m.mail_from, m.mail_params, m.size, m.sha256, m.message_id, "
    "m.client_address, m.helo, m.client_name, m.tls_version, m.tls_cipher, m.tags"
)
_RECIPIENT_COLUMNS = (
    "r.id, r.rcpt, r.domain, r.params, r.state, r.released, d.mode, r.attempts, "
    "r.next_attempt_at, r.last_reply, r.delivered_at, r.updated_at"
)
_MESSAGE_WIDTH = _MESSAGE_COLUMNS.count(",") + 1


def _recipient_record(row: Sequence[Any]) -> RecipientRecord:
    rid, rcpt, domain, params, state, released, mode, *rest = row
    held = shown_state(state, released, mode) == "held"
    loaded = codec.load_rcpt_params(params)
    return RecipientRecord(rid, rcpt, domain, loaded, RecipientState(state), held, *rest)


def _stored_message(rows: list[Row]) -> StoredMessage | None:
    """The message from its rows: message columns, then one recipient's (or NULLs) each."""
    if not rows:
        return None
    head = rows[0][:_MESSAGE_WIDTH]
    mid, received_at, mail_from, mail_params, size, sha256, message_id, *client, tags = head
    return StoredMessage(
        mid,
        received_at,
        mail_from,
        codec.load_mail_params(mail_params),
        size,
        sha256,
        message_id,
        ClientInfo(*client),
        codec.load_tags(tags),
        tuple(
            _recipient_record(row[_MESSAGE_WIDTH:])
            for row in rows
            if row[_MESSAGE_WIDTH] is not None  # no recipient: the LEFT JOIN's NULLs
        ),
    )


_REPORT_COLUMNS = (
    "r.id, m.id, m.message_id, m.mail_from, r.rcpt, m.size, m.sha256, m.received_at, "
    "r.state, r.released, d.mode, r.attempts, r.delivered_at, r.last_reply"
)


def _report_row(row: Row) -> ReportRow:
    _cursor, mid, message_id, mail_from, rcpt, size, sha256, at = row[:8]
    state, released, mode, tries, delivered_at, reply = row[8:]
    shown = shown_state(state, released, mode)
    return ReportRow(
        mid, message_id, mail_from, rcpt, size, sha256, at, shown, tries, delivered_at, reply
    )


CLAIMED_COLUMNS = (
    "r.message_seq, m.id, m.mail_from, m.mail_params, m.size, m.received_at, "
    "r.id, r.rcpt, r.params, r.attempts"
)
"""What ``claim_due`` reads of each claimed row (``r``, its message ``m``), for
``delivery_jobs``."""


def delivery_jobs(rows: Sequence[Row], domain: str) -> list[DeliveryJob]:
    """Claimed rows (CLAIMED_COLUMNS) as one job per message, recipients in id order."""
    grouped: dict[int, tuple[Row, list[ClaimedRecipient]]] = {}
    for row in sorted(rows, key=lambda row: int(row[6])):
        rid, rcpt, params, tries = row[6:]
        recipient = ClaimedRecipient(rid, rcpt, codec.load_rcpt_params(params), tries)
        grouped.setdefault(row[0], (row, []))[1].append(recipient)
    return [
        DeliveryJob(
            message_id=first[1],
            domain=domain,
            mail_from=first[2],
            mail_params=codec.load_mail_params(first[3]),
            size=first[4],
            received_at=first[5],
            recipients=tuple(recipients),
        )
        for first, recipients in grouped.values()
    ]


# -- queries ----------------------------------------------------------------------------------

_RECIPIENT_JOINS = (
    "FROM recipients r JOIN messages m ON m.seq = r.message_seq "
    "LEFT JOIN domains d ON d.name = r.domain"
)


def queue_query(
    dialect: Dialect, queue: QueueFilter, limit: int, after: int | None
) -> tuple[str, list[Any]]:
    """``queue list``: recipient rows matching ``queue``, by id, after the cursor ``after``."""
    p = Params(dialect)
    where = [f"r.id > {p(after or 0)}"]
    if queue.tag:
        # Tags are stored comma-separated; commas around both sides match whole tags only.
        where.append(f"{dialect.find}(',' || m.tags || ',', {p(f',{queue.tag},')}) > 0")
    if queue.domain:
        where.append(f"r.domain = {p(queue.domain.lower())}")
    unreleased = f"r.released = {dialect.false}"
    if queue.state == "held":
        where.append(f"r.state = 'pending' AND {unreleased} AND d.mode = 'hold'")
    elif queue.state == "pending":
        where.append(
            f"r.state = 'pending' AND NOT ({unreleased} AND coalesce(d.mode, 'relay') = 'hold')"
        )
    elif queue.state:
        where.append(f"r.state = {p(queue.state)}")
    if queue.search:
        pattern = like_contains(queue.search)
        columns = ("r.rcpt", "m.mail_from", "m.message_id")
        where.append("(" + " OR ".join(dialect.like(c, p(pattern)) for c in columns) + ")")
    query = (
        f"SELECT {_QUEUE_COLUMNS} {_RECIPIENT_JOINS} WHERE {' AND '.join(where)} "
        f"ORDER BY r.id LIMIT {p(limit)}"
    )
    return query, p.values


def report_query(dialect: Dialect, domain: str | None, after: int) -> tuple[str, list[Any]]:
    """One page of ``report``: every recipient row, by id, after ``after``."""
    p = Params(dialect)
    where = [f"r.id > {p(after)}"]
    if domain:
        where.append(f"r.domain = {p(domain.lower())}")
    query = (
        f"SELECT {_REPORT_COLUMNS} {_RECIPIENT_JOINS} WHERE {' AND '.join(where)} "
        f"ORDER BY r.id LIMIT {p(REPORT_PAGE)}"
    )
    return query, p.values


class ReadSide:
    """The reading half of the Store protocol, for a backend that supplies ``_fetch``."""

    dialect: ClassVar[Dialect]

    async def _fetch(self, query: str, params: Sequence[Any]) -> list[Row]:
        """Run one read-only query; its rows as tuples. Errors become StoreError."""
        raise NotImplementedError

    async def _one(self, query: str, params: Sequence[Any]) -> Row | None:
        rows = await self._fetch(query, params)
        return rows[0] if rows else None

    # -- domains ------------------------------------------------------------------------
    async def domains_generation(self) -> int:
        row = await self._one("SELECT value FROM meta WHERE key = 'domains_generation'", ())
        return int(row[0]) if row else 0

    async def list_domains(self) -> list[Domain]:
        rows = await self._fetch(f"SELECT {codec.DOMAIN_COLUMNS} FROM domains ORDER BY name", ())
        return [codec.domain_from_row(row) for row in rows]

    async def get_domain(self, name: str) -> Domain | None:
        p = Params(self.dialect)
        row = await self._one(
            f"SELECT {codec.DOMAIN_COLUMNS} FROM domains WHERE name = {p(name.lower())}", p.values
        )
        return codec.domain_from_row(row) if row else None

    # -- queue --------------------------------------------------------------------------
    async def list_queue(
        self, filter: QueueFilter = EVERY_ROW, *, limit: int = 100, after: int | None = None
    ) -> list[QueueEntry]:
        rows = await self._fetch(*queue_query(self.dialect, filter, limit, after))
        return [_queue_entry(row) for row in rows]

    async def get_message(self, message_id: str) -> StoredMessage | None:
        # One query, so the message and its recipients come from one snapshot.
        p = Params(self.dialect)
        rows = await self._fetch(
            f"SELECT {_MESSAGE_COLUMNS}, {_RECIPIENT_COLUMNS} FROM messages m "
            "LEFT JOIN recipients r ON r.message_seq = m.seq "
            "LEFT JOIN domains d ON d.name = r.domain "
            f"WHERE m.id = {p(message_id)} ORDER BY r.id",
            p.values,
        )
        return _stored_message(rows)

    async def read_small_bodies(
        self, message_ids: Sequence[str], max_size: int
    ) -> dict[str, bytes]:
        ids = list(message_ids)
        if not ids:
            return {}
        # The length check keeps bodies stored in more than one piece out (they stream).
        p = Params(self.dialect)
        rows = await self._fetch(
            f"SELECT m.id, b.data FROM messages m JOIN bodies b ON {self.dialect.first_body} "
            f"WHERE m.id {self.dialect.one_of(p, ids)} AND m.size <= {p(max_size)} "
            "AND length(b.data) = m.size",
            p.values,
        )
        return {row[0]: bytes(row[1]) for row in rows}

    async def attempts(self, message_id: str) -> list[AttemptRecord]:
        p = Params(self.dialect)
        rows = await self._fetch(
            "SELECT r.rcpt, a.at, a.destination, a.outcome, a.reply FROM attempts a "
            "JOIN recipients r ON r.id = a.recipient_id "
            f"JOIN messages m ON m.seq = r.message_seq WHERE m.id = {p(message_id)} "
            "ORDER BY a.id",
            p.values,
        )
        return [AttemptRecord(*row) for row in rows]

    async def report(self, domain: str | None = None) -> AsyncIterator[ReportRow]:
        after = 0
        while True:
            rows = await self._fetch(*report_query(self.dialect, domain, after))
            for row in rows:
                yield _report_row(row)
            if len(rows) < REPORT_PAGE:
                return
            after = rows[-1][0]

    # -- audit --------------------------------------------------------------------------
    async def list_audit(self, limit: int = 100) -> list[AuditEntry]:
        p = Params(self.dialect)
        rows = await self._fetch(
            "SELECT at, actor, action, target, detail FROM audit "
            f"ORDER BY id DESC LIMIT {p(limit)}",
            p.values,
        )
        return [AuditEntry(*row) for row in rows]

    # -- recipient lists ----------------------------------------------------------------
    async def recipient_list(self, domain: str) -> list[str]:
        p = Params(self.dialect)
        rows = await self._fetch(
            f"SELECT address FROM recipient_lists WHERE domain = {p(domain.lower())} "
            "ORDER BY address",
            p.values,
        )
        return [row[0] for row in rows]

    async def recipient_lists(self) -> dict[str, frozenset[str]]:
        found: dict[str, set[str]] = {}
        for domain, address in await self._fetch("SELECT domain, address FROM recipient_lists", ()):
            found.setdefault(domain, set()).add(address)
        return {domain: frozenset(items) for domain, items in found.items()}
