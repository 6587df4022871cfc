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
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from mxspool.actor import audit_actor
from mxspool.addresses import ascii_lower
from mxspool.store import codec
from mxspool.store.base import (
    EVERY_ROW,
    AttemptRecord,
    AuditEntry,
    ClaimedRecipient,
    ClientInfo,
    DeliveryJob,
    Domain,
    Migration,
    MigrationChanges,
    NotFound,
    QueueEntry,
    QueueFilter,
    RecipientBacklog,
    RecipientCheck,
    RecipientHold,
    RecipientRecord,
    RecipientState,
    ReportRow,
    StageEvent,
    StoredMessage,
)

Row = tuple[Any, ...]

LIKE_ESCAPE = "!"
"""The escape character of every LIKE pattern built here. Not a backslash: PostgreSQL would
read ``'\\'`` differently with standard_conforming_strings off."""

REPORT_PAGE = 1000
"""Rows per query of ``report``: memory stays flat however large the store is."""

RECENT_SCAN = 10_000
"""``without_authentication`` looks at the newest this many messages (by arrival order)."""

UNJUDGED_KEY = "unjudged:"
"""Prefix of the meta row (``unjudged:<node>``, ``Store.mark_unjudged``) holding a seq: the
node may owe verdicts for messages from there on, none before it."""

UNJUDGED_PROBE = 16
"""``mark_unjudged`` looks up this many of the oldest ids it is given (ids sort by arrival)."""


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
    "m.client_address, m.helo, m.client_name, m.tls_version, m.tls_cipher, m.tags, "
    "m.auth_results, m.auth_at"
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
    mid, received_at, mail_from, mail_params, size, sha256, message_id, *client, tags = head[:-2]
    auth_results, auth_at = head[-2:]
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
        auth_results,
        auth_at,
    )


_REPORT_COLUMNS = (
    "r.id, m.id, m.message_id, m.mail_from, r.rcpt, m.size, m.sha256, m.received_at, "
    "r.state, r.released, d.mode, r.attempts, r.delivered_at, r.last_reply, "
    "r.sent_sha256, m.tags"
)


def _report_row(row: Row) -> ReportRow:
    _cursor, mid, message_id, mail_from, rcpt, size, sha256, at = row[:8]
    state, released, mode, tries, delivered_at, reply, sent_sha256, tags = row[8:]
    shown = shown_state(state, released, mode)
    return ReportRow(
        mid, message_id, mail_from, rcpt, size, sha256, at, shown, tries, delivered_at, reply,
        sent_sha256, codec.load_tags(tags or ""),
    )  # fmt: skip


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
        where.append(f"r.domain = {p(ascii_lower(queue.domain))}")
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
        where.append(f"r.domain = {p(ascii_lower(domain))}")
    query = (
        f"SELECT {_REPORT_COLUMNS} {_RECIPIENT_JOINS} WHERE {' AND '.join(where)} "
        f"ORDER BY r.id LIMIT {p(REPORT_PAGE)}"
    )
    return query, p.values


MIGRATION_COLUMNS = (
    "m.name, m.source_tenant, m.target_tenant, m.created_at, m.release_at, m.release_rate"
)


def migration_from_row(row: Row) -> Migration:
    return Migration(
        name=row[0],
        source_tenant=row[1],
        target_tenant=row[2],
        created_at=float(row[3]),
        release_at=None if row[4] is None else float(row[4]),
        release_rate=None if row[5] is None else float(row[5]),
    )


def replace_domains(migration: Migration, domains: tuple[str, ...]) -> Migration:
    return Migration(
        migration.name,
        domains,
        migration.source_tenant,
        migration.target_tenant,
        migration.created_at,
        migration.release_at,
        migration.release_rate,
    )


def migration_sets(changes: MigrationChanges) -> list[tuple[str, Any]]:
    """(column, value) to SET for ``changes`` (updated_at is the caller's)."""
    sets: list[tuple[str, Any]] = []
    if changes.release_at is not None or changes.clear_release_at:
        sets.append(("release_at", changes.release_at))
    if changes.release_rate is not None or changes.clear_release_rate:
        sets.append(("release_rate", changes.release_rate))
    return sets


def event_rows(events: Sequence[StageEvent]) -> list[Row]:
    """INSERT values of stage events; "cli" actors become the OS user (``audit_actor``, read
    here, on the caller's context, not on a writer thread)."""
    return [(e.domain, e.stage, e.at, audit_actor(e.actor), e.detail, e.migration) for e in events]


def no_migration(name: str) -> str:
    return f"no migration {name}; 'mxspool migration list' shows the migrations"


def migration_exists(name: str) -> str:
    return (
        f"migration {name} already exists; 'mxspool migration show {name}' shows it, "
        "add-domain adds to it"
    )


def not_in_migration(domain: str, name: str) -> str:
    return (
        f"domain {domain} is not in migration {name}; 'mxspool migration show {name}' lists "
        "its domains"
    )


def migration_insert(dialect: Dialect, migration: Migration, now: float) -> tuple[str, Row]:
    """The INSERT of a new migration's row (its domains are rows of their own)."""
    p = Params(dialect)
    values = (
        migration.name,
        migration.source_tenant,
        migration.target_tenant,
        migration.created_at or now,
        migration.release_at,
        migration.release_rate,
        now,
    )
    sql = (
        "INSERT INTO migrations (name, source_tenant, target_tenant, created_at, release_at, "
        f"release_rate, updated_at) VALUES ({', '.join(p(value) for value in values)})"
    )
    return sql, tuple(p.values)


def taken(domain: str, other: str) -> str:
    return (
        f"domain {domain} already belongs to migration {other}; a domain is in at most one "
        f"migration: 'mxspool migration remove-domain {other} {domain}' first"
    )


# -- the marks of owed verdicts (written by each backend's write path) -----------------------


_LOWER_MARK = "CASE WHEN excluded.value < meta.value THEN excluded.value ELSE meta.value END"
"""An upsert of a mark that keeps the older (lower) of the stored and the new one."""


def unjudged_sql(
    dialect: Dialect, node: str, message_ids: Sequence[str], *, move: bool
) -> tuple[str, list[Any]]:
    """The statement of ``mark_unjudged``. The mark is the lowest seq among the oldest
    ``UNJUDGED_PROBE`` of ``message_ids`` still stored, else the first of the newest
    ``RECENT_SCAN`` messages (whatever is being committed right now is among those); without
    ``move`` an older mark is kept."""
    p = Params(dialect)
    key = p(UNJUDGED_KEY + node)
    oldest = sorted(message_ids)[:UNJUDGED_PROBE]
    found = ""  # placeholders in the order they appear: the ids before the window
    if oldest:
        found = f"(SELECT min(seq) FROM messages WHERE id {dialect.one_of(p, oldest)})"
    recent = f"(SELECT coalesce(max(seq), 0) FROM messages) - {p(RECENT_SCAN - 1)}"
    value = f"coalesce({found}, {recent})" if found else recent
    update = "excluded.value" if move else _LOWER_MARK
    # WHERE true: SQLite would read ON CONFLICT as a join constraint of the SELECT otherwise.
    sql = (
        f"INSERT INTO meta (key, value) SELECT {key}, {value} WHERE true "
        f"ON CONFLICT (key) DO UPDATE SET value = {update}"
    )
    return sql, p.values


def clear_unjudged_sql(dialect: Dialect, node: str) -> tuple[str, list[Any]]:
    p = Params(dialect)
    return f"DELETE FROM meta WHERE key = {p(UNJUDGED_KEY + node)}", p.values


def other_marks_sql(dialect: Dialect, node: str) -> tuple[str, list[Any]]:
    """The names of the nodes other than ``node`` with a mark (``Store.adopt_unjudged``)."""
    p = Params(dialect)
    sql = (
        f"SELECT substr(key, {len(UNJUDGED_KEY) + 1}) FROM meta "
        f"WHERE key LIKE {p(UNJUDGED_KEY + '%')} AND key <> {p(UNJUDGED_KEY + node)} ORDER BY key"
    )
    return sql, p.values


def adopt_mark_sql(dialect: Dialect, node: str, other: str) -> list[tuple[str, list[Any]]]:
    """The statements, for one transaction, that give ``node`` the mark of ``other``: its own
    moves down to ``other``'s when that is older (or is ``other``'s when it has none), and
    ``other``'s goes."""
    p = Params(dialect)
    merge = (
        f"INSERT INTO meta (key, value) SELECT {p(UNJUDGED_KEY + node)}, value FROM meta "
        f"WHERE key = {p(UNJUDGED_KEY + other)} ON CONFLICT (key) DO UPDATE SET value = "
        + _LOWER_MARK
    )
    return [(merge, p.values), clear_unjudged_sql(dialect, other)]


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
            f"SELECT {codec.DOMAIN_COLUMNS} FROM domains WHERE name = {p(ascii_lower(name))}",
            p.values,
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

    async def unauthenticated(self, message_ids: Sequence[str]) -> set[str]:
        ids = list(message_ids)
        if not ids:
            return set()
        p = Params(self.dialect)
        rows = await self._fetch(
            f"SELECT id FROM messages WHERE id {self.dialect.one_of(p, ids)} AND auth_at IS NULL",
            p.values,
        )
        return {row[0] for row in rows}

    async def without_authentication(
        self,
        received_before: float,
        limit: int,
        since: str | None = None,
        node: str | None = None,
    ) -> list[str]:
        # A range of seqs (the primary key), not a scan of the whole table: the newest
        # RECENT_SCAN, and back to ``since`` or to ``node``'s mark when older.
        floors = []
        if since is not None:
            q = Params(self.dialect)
            found = await self._one(
                f"SELECT seq, (SELECT max(seq) FROM messages) FROM messages WHERE id = {q(since)}",
                q.values,
            )
            if found is not None:
                floors += [int(found[0]) - 1, int(found[1]) - RECENT_SCAN]
        if node is not None:
            q = Params(self.dialect)
            mark = await self._one(
                "SELECT m.value, (SELECT coalesce(max(seq), 0) FROM messages) FROM meta m "
                f"WHERE m.key = {q(UNJUDGED_KEY + node)}",
                q.values,
            )
            if mark is not None:
                floors += [int(mark[0]) - 1, int(mark[1]) - RECENT_SCAN]
        floor = min(floors) if floors else None
        p = Params(self.dialect)
        if floor is None:
            lowest = f"(SELECT coalesce(max(seq), 0) FROM messages) - {p(RECENT_SCAN)}"
        else:
            lowest = p(floor)
        rows = await self._fetch(
            f"SELECT id FROM messages WHERE seq > {lowest} "
            f"AND auth_at IS NULL AND received_at < {p(received_before)} "
            f"ORDER BY seq LIMIT {p(limit)}",
            p.values,
        )
        return [row[0] for row in rows]

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

    # -- migrations (issue 12) ----------------------------------------------------------
    async def list_migrations(self) -> list[Migration]:
        return await self._migrations("", [])

    async def get_migration(self, name: str) -> Migration | None:
        p = Params(self.dialect)
        found = await self._migrations(f"WHERE m.name = {p(name)}", p.values)
        return found[0] if found else None

    async def _require_migration(self, name: str) -> Migration:
        found = await self.get_migration(name)
        if found is None:
            raise NotFound(no_migration(name))
        return found

    async def _migrations(self, where: str, values: list[Any]) -> list[Migration]:
        rows = await self._fetch(
            f"SELECT {MIGRATION_COLUMNS}, d.domain FROM migrations m "
            f"LEFT JOIN migration_domains d ON d.migration = m.name {where} "
            "ORDER BY m.name, d.domain",
            values,
        )
        found: dict[str, Migration] = {}
        for row in rows:
            known = found.get(row[0])
            if known is None:
                known = found[row[0]] = migration_from_row(row)
            if row[-1] is not None:
                found[row[0]] = replace_domains(known, (*known.domains, row[-1]))
        return list(found.values())

    async def stage_events(
        self, domains: Sequence[str] | None = None, limit: int = 10_000
    ) -> list[StageEvent]:
        p = Params(self.dialect)
        where = "" if domains is None else f"WHERE domain {self.dialect.one_of(p, list(domains))}"
        if domains is not None and not domains:
            return []
        rows = await self._fetch(
            "SELECT domain, stage, at, actor, detail, migration FROM stage_events "
            f"{where} ORDER BY id DESC LIMIT {p(limit)}",
            p.values,
        )
        return [StageEvent(*row) for row in reversed(rows)]

    # -- recipient lists ----------------------------------------------------------------
    async def recipient_list(self, domain: str) -> list[str]:
        p = Params(self.dialect)
        rows = await self._fetch(
            f"SELECT address FROM recipient_lists WHERE domain = {p(ascii_lower(domain))} "
            "ORDER BY address",
            p.values,
        )
        return [row[0] for row in rows]

    async def recipient_lists(self) -> dict[str, frozenset[str]]:
        found: dict[str, set[str]] = {}
        for domain, address in await self._fetch("SELECT domain, address FROM recipient_lists", ()):
            found.setdefault(domain, set()).add(address)
        return {domain: frozenset(items) for domain, items in found.items()}

    async def recipient_max_sizes(self) -> dict[str, int]:
        rows = await self._fetch(
            "SELECT address, max_size FROM recipient_lists WHERE max_size IS NOT NULL", ()
        )
        return {address: int(size) for address, size in rows}

    # -- recipient holds and release planning ---------------------------------------------
    def _held(self) -> str:
        """A recipient row kept by a recipient hold, spelled as its partial index is."""
        return "r.held = 1" if self.dialect.false == "0" else "r.held"

    async def recipient_holds(self, domain: str | None = None) -> list[RecipientHold]:
        p = Params(self.dialect)
        where = f" WHERE domain = {p(ascii_lower(domain))}" if domain is not None else ""
        rows = await self._fetch(
            "SELECT address, domain, prefix, suffix, created_at, actor FROM recipient_holds"
            f"{where} ORDER BY address",
            p.values,
        )
        holds = [RecipientHold(*row) for row in rows]
        if not holds:
            return []
        p = Params(self.dialect)
        counted = await self._fetch(
            "SELECT lower(r.rcpt), count(*) FROM recipients r WHERE r.domain "
            f"{self.dialect.one_of(p, sorted({hold.domain for hold in holds}))} "
            f"AND {self._held()} AND r.state = 'pending' GROUP BY lower(r.rcpt)",
            p.values,
        )
        counts = {hold.address: 0 for hold in holds}
        for address, n in counted:
            for hold in holds:
                if hold_matches(hold, address):
                    counts[hold.address] += int(n)
                    break
        return [replace(hold, held=counts[hold.address]) for hold in holds]

    async def recipient_backlog(
        self, domain: str, default_max_size: int | None
    ) -> list[RecipientBacklog]:
        # One pass over the domain's pending rows (its partial index), each joined to its
        # message (primary key) and its mailbox's recipient-list entry (primary key).
        p = Params(self.dialect)
        limit = p(default_max_size)
        rows = await self._fetch(
            "SELECT lower(r.rcpt), count(*), sum(m.size),"
            f" sum(CASE WHEN m.size > rl.max_size OR m.size > {limit} THEN 1 ELSE 0 END),"
            f" sum(CASE WHEN {self._held()} THEN 1 ELSE 0 END), max(rl.max_size)"
            " FROM recipients r JOIN messages m ON m.seq = r.message_seq"
            " LEFT JOIN recipient_lists rl ON rl.domain = r.domain AND rl.address = lower(r.rcpt)"
            f" WHERE r.domain = {p(ascii_lower(domain))} AND r.state = 'pending'"
            " GROUP BY lower(r.rcpt)",
            p.values,
        )
        # The busiest sender of each recipient: a second pass over the same rows, grouped by
        # pair (Exchange Online's per sender-recipient hourly limit).
        q = Params(self.dialect)
        pairs = await self._fetch(
            "SELECT rcpt, max(n) FROM (SELECT lower(r.rcpt) AS rcpt, count(*) AS n"
            " FROM recipients r JOIN messages m ON m.seq = r.message_seq"
            f" WHERE r.domain = {q(ascii_lower(domain))} AND r.state = 'pending'"
            " GROUP BY lower(r.rcpt), lower(m.mail_from)) pair GROUP BY rcpt",
            q.values,
        )
        busiest = {address: int(n) for address, n in pairs}
        return [
            RecipientBacklog(
                address,
                int(n),
                int(size or 0),
                int(big or 0),
                int(held or 0),
                None if max_size is None else int(max_size),
                busiest.get(address, 0),
            )
            for address, n, size, big, held, max_size in rows
        ]

    async def flush_generation(self) -> int:
        row = await self._one(f"SELECT value FROM meta WHERE key = '{FLUSH_GENERATION}'", ())
        return int(row[0]) if row else 0

    async def flushed_domains(self, after: int) -> list[str]:
        # One meta row per domain ever flushed ("flush:<domain>" = the generation of its last
        # flush): read only when the generation moved, so a few rows at most.
        p = Params(self.dialect)
        rows = await self._fetch(
            f"SELECT key FROM meta WHERE key LIKE {p('flush:%')} AND value > {p(after)}"
            " ORDER BY key",
            p.values,
        )
        return [str(key).removeprefix("flush:") for (key,) in rows]

    async def recipient_checks(self, domain: str) -> list[RecipientCheck]:
        p = Params(self.dialect)
        rows = await self._fetch(
            "SELECT address, state, reply, checked_at FROM recipient_checks"
            f" WHERE domain = {p(ascii_lower(domain))} ORDER BY address",
            p.values,
        )
        return [
            RecipientCheck(address, state, reply, float(at)) for address, state, reply, at in rows
        ]


FLUSH_GENERATION = "flush_generation"
"""The meta row ``flush_queue`` raises; ``flush:<domain>`` rows keep each domain's last one."""


def hold_matches(hold: RecipientHold, address: str) -> bool:
    """Whether the (lowercased) ``address`` is kept by ``hold``: itself or a sub-address."""
    if address == hold.address:
        return True
    return bool(hold.prefix) and address.startswith(hold.prefix) and address.endswith(hold.suffix)
