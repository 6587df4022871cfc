"""Retention: drop the bodies of delivered mail, keep its ledger rows.

A spool in front of a migrated domain holds days of mail; once it is delivered, its bytes are
only a liability (disk, and a copy of someone's mail nobody needs). ``purge`` deletes the body of
each message whose every recipient is final and whose last change is older than a cutoff, and
keeps everything else: the message row (size, sha256, envelope), the recipient rows (state,
delivered_at, reply, sent_sha256) and the attempts. The reconciliation report still lists them
and ``report --check`` still passes (their states do not change); the message gets the tag
``purged=<ISO time>``, which ``queue show`` and the report's ``purged`` column show and which
makes ``queue export`` answer "purged" instead of returning nothing.

Which messages: every recipient ``delivered`` or ``discarded``, at least one ``delivered``, and
no recipient changed since the cutoff (a delivered row's updated_at is its delivery time).
``bounced`` keeps its body: ``queue bounce --force`` may still have to send a withheld DSN, and
that DSN quotes the message.

The work is done in bounded pieces so a purge of millions never holds the store's single writer
(SQLite) or a long transaction (PostgreSQL): a read finds up to ``BATCH`` candidates among the
next ``SCAN_WINDOW`` message numbers, then one short write transaction re-checks them (a row may
have changed in between) and deletes their bodies. Both stores use the queries built here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from mxspool.store.base import NotFound, PurgeResult

TAG = "purged"
BATCH = 500
"""Messages per write transaction."""
SCAN_WINDOW = 5000
"""Message numbers (seq) examined per read."""

Found = list[tuple[int, int]]
"""(seq, size) of messages whose bodies go."""


def tag_for(now: float) -> str:
    """The tag a purged message gets: ``purged=2026-12-01T17:00:00Z``."""
    stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return f"{TAG}={stamp}"


def purged_at(tags: Sequence[str]) -> str | None:
    """When a message's body was purged (its tag's value), or None."""
    for tag in tags:
        name, _sep, value = tag.partition("=")
        if name == TAG:
            return value
    return None


def body_gone(message_id: str, tags: str) -> NotFound:
    """The error for reading a body that purge dropped."""
    when = purged_at(tags.split(",")) or "earlier"
    return NotFound(
        f"the body of message {message_id} was purged ({when}, 'mxspool purge'); its envelope, "
        "recipients and checksums remain ('mxspool queue show', 'mxspool report')"
    )


def condition(placeholder: str, find: str) -> str:
    """SQL true for a message ``m`` whose body may go; one parameter: the cutoff."""
    return (
        f"{find}(',' || m.tags || ',', ',{TAG}=') = 0"
        " AND EXISTS (SELECT 1 FROM recipients r WHERE r.message_seq = m.seq"
        "   AND r.state = 'delivered')"
        " AND NOT EXISTS (SELECT 1 FROM recipients r WHERE r.message_seq = m.seq"
        f"   AND (r.state NOT IN ('delivered', 'discarded') OR r.updated_at >= {placeholder}))"
    )


def candidates_sql(placeholder: str, find: str) -> str:
    """Parameters: after, upto, cutoff, limit."""
    p = placeholder
    return (
        f"SELECT m.seq, m.size FROM messages m WHERE m.seq > {p} AND m.seq <= {p}"
        f" AND {condition(p, find)} ORDER BY m.seq LIMIT {p}"
    )


async def run(
    last_seq: Callable[[], Awaitable[int]],
    find: Callable[[int, int], Awaitable[Found]],
    drop: Callable[[list[int]], Awaitable[Found]],
    *,
    cutoff: float,
    dry_run: bool,
) -> PurgeResult:
    """Walk the messages in windows: ``find`` candidates (a read), ``drop`` them (one write
    that re-checks and returns what it really dropped)."""
    end = await last_seq()
    after = 0
    messages = size = 0
    while after < end:
        upto = min(after + SCAN_WINDOW, end)
        found = await find(after, upto)
        if found:
            done = found if dry_run else await drop([seq for seq, _size in found])
            messages += len(done)
            size += sum(item for _seq, item in done)
        # A full batch may have left more in this window: continue after its last message.
        after = found[-1][0] if len(found) >= BATCH else upto
    return PurgeResult(messages, size, dry_run, cutoff)
