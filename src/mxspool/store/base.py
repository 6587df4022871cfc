"""The Store protocol: everything mxspool keeps, behind one interface.

The embedded default is SQLite (``store.sqlite``); a PostgreSQL implementation shares this
protocol and its contract tests. Every part of the program (intake, delivery, CLI, admin API)
talks to the store only through these methods, so each can be restarted on its own and several
nodes can share one database.

Hold is a property of the domain, not of each recipient row: a recipient row is ``pending``
until delivered, and it counts as *held* while its domain is in ``hold`` mode (unless the
operator released that recipient alone as a canary).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mxspool.body import BodyBuffer
from mxspool.envelope import Envelope, MailParams, RcptParams


class StoreError(Exception):
    """The store could not do what was asked; the message says what and what to do."""


SYNCHRONOUS_COMMIT_OFF = (
    "the PostgreSQL store runs with synchronous_commit = off, so a PostgreSQL crash could lose "
    "mail already acknowledged with 250; set it to on for mxspool's role or database (ALTER "
    "ROLE ... SET synchronous_commit = on) or remove it from the options in [store] url"
)
"""An accept's 250 waits for its COMMIT; with synchronous_commit off the COMMIT returns before
the WAL is flushed. The PostgreSQL store refuses to open so, and ``mxspool doctor`` says why."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    """The request contradicts the current state (domain exists, mail still pending...)."""


class DomainMode(enum.StrEnum):
    HOLD = "hold"
    RELAY = "relay"


class TlsMode(enum.StrEnum):
    VERIFY = "verify"
    REQUIRE = "require"
    OPPORTUNISTIC = "opportunistic"
    OFF = "off"


class RecipientState(enum.StrEnum):
    PENDING = "pending"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    PARKED = "parked"
    BOUNCED = "bounced"
    DISCARDED = "discarded"


QUEUE_STATES = ("pending", "held", "delivering", "delivered", "parked", "bounced", "discarded")
"""States ``queue list --state`` accepts: the row states plus the derived ``held``."""

FINAL_STATES = frozenset(
    {RecipientState.DELIVERED, RecipientState.BOUNCED, RecipientState.DISCARDED}
)


@dataclass(frozen=True, slots=True)
class Route:
    host: str
    port: int = 25

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Domain:
    name: str
    mode: DomainMode
    routes: tuple[Route, ...]
    use_mx: bool = False
    tls: TlsMode = TlsMode.VERIFY
    rate: float | None = None
    """Messages per second to this domain's destination; None means the configured default."""
    profile: str | None = None
    created_at: float = 0.0
    released_at: float | None = None
    max_size: int | None = None
    """Largest message (bytes) the target takes for this domain; None: the profile's default,
    else only ``[smtp] max_message_size``."""
    subdomains: bool = False
    """Accept, route and hold the domain's subdomains like the domain itself."""
    plus_separator: str = "+"
    """Sub-addressing: ``local<sep>tag@domain`` is accepted when ``local@domain`` is; "": off."""


@dataclass(frozen=True, slots=True)
class ClientInfo:
    address: str
    helo: str
    hostname: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None


@dataclass(slots=True)
class IncomingMessage:
    """A message whose DATA is complete, ready for the durable commit."""

    id: str
    envelope: Envelope
    client: ClientInfo
    received_at: float
    message_id: str | None
    body: BodyBuffer
    tags: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    """Per recipient, in envelope order, the configured domain it was accepted under (a
    subdomain's parent, an IDN's A-label); empty: each address's own domain."""
    parked: dict[int, str] = field(default_factory=dict)
    """Recipients (by envelope index) stored parked at once, with the reason (e.g. a message
    larger than the mailbox takes); the others are stored pending."""


@dataclass(frozen=True, slots=True)
class RecipientRecord:
    id: int
    address: str
    domain: str
    params: RcptParams
    state: RecipientState
    held: bool
    attempts: int
    next_attempt_at: float
    last_reply: str | None
    delivered_at: float | None
    updated_at: float


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: str
    received_at: float
    mail_from: str
    mail_params: MailParams
    size: int
    sha256: str
    message_id: str | None
    client: ClientInfo
    tags: tuple[str, ...]
    recipients: tuple[RecipientRecord, ...]
    auth_results: str | None = None
    """The Authentication-Results value computed at arrival (SPF, DKIM, DMARC; RFC 8601, no
    field name); None until the verdict is stored, or when authentication was off."""
    auth_at: float | None = None
    """When ``auth_results`` was computed."""


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    recipient: str
    at: float
    destination: str
    outcome: str
    reply: str


@dataclass(frozen=True, slots=True)
class QueueFilter:
    """Which recipient rows ``queue list`` shows; a field left None matches every row."""

    domain: str | None = None
    state: str | None = None
    """One of QUEUE_STATES (``held`` is derived: pending in a domain on hold)."""
    search: str | None = None
    """Text found in the recipient, the sender or the Message-ID, ignoring ASCII case;
    taken literally (``%`` and ``_`` are not wildcards)."""
    tag: str | None = None
    """Only messages carrying this tag (e.g. "probe")."""


EVERY_ROW = QueueFilter()
"""The filter that keeps every row (``list_queue``'s default)."""


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One recipient of one message, as ``queue list`` shows it."""

    message_id: str
    recipient_id: int
    rcpt: str
    domain: str
    mail_from: str
    size: int
    received_at: float
    state: str
    attempts: int
    last_reply: str | None


@dataclass(frozen=True, slots=True)
class DomainStatus:
    domain: str
    mode: DomainMode
    held: int = 0
    pending: int = 0
    delivering: int = 0
    delivered: int = 0
    parked: int = 0
    bounced: int = 0
    discarded: int = 0
    oldest_pending_age_s: float | None = None
    delivered_last_minute: int = 0

    @property
    def total(self) -> int:
        """Every recipient row of the domain, whatever its state."""
        return (
            self.held
            + self.pending
            + self.delivering
            + self.delivered
            + self.parked
            + self.bounced
            + self.discarded
        )

    @property
    def unfinished(self) -> int:
        """Rows that still need delivery or an operator's decision."""
        return self.held + self.pending + self.delivering + self.parked


@dataclass(frozen=True, slots=True)
class CounterDrift:
    """One recipient counter that disagrees with a recount of the rows (``check store``)."""

    domain: str
    state: str  # the row state; "pending" with released=False is what status shows as held
    released: bool
    counted: int  # what the counter says
    actual: int  # rows in the store


@dataclass(frozen=True, slots=True)
class ReportRow:
    id: str
    message_id: str | None
    mail_from: str
    rcpt: str
    size: int
    sha256: str
    received_at: float
    state: str
    attempts: int
    delivered_at: float | None
    remote_reply: str | None
    sent_sha256: str | None = None
    """sha256 of the bytes that left for this recipient (with the ARC set, if sealed)."""
    tags: tuple[str, ...] = ()
    """The message's tags (``spf=pass``...): the report's spf, dkim, dmarc columns."""


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at: float
    actor: str
    action: str
    target: str
    detail: str


@dataclass(frozen=True, slots=True)
class ClaimedRecipient:
    id: int
    address: str
    params: RcptParams
    attempts: int


@dataclass(frozen=True, slots=True)
class DeliveryJob:
    """The claimed recipients of one message in one domain, leased to one worker."""

    message_id: str
    domain: str
    mail_from: str
    mail_params: MailParams
    size: int
    received_at: float
    recipients: tuple[ClaimedRecipient, ...]


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    """What one delivery attempt did to one recipient."""

    recipient_id: int
    state: RecipientState  # delivered, pending (deferred) or parked
    reply: str
    destination: str
    next_attempt_at: float = 0.0
    count_attempt: bool = True
    sent_sha256: str | None = None
    """Delivered: sha256 of the bytes that left (the stored bytes, plus the ARC set)."""


@dataclass(frozen=True, slots=True)
class DestinationDeferral:
    """How ``Store.defer_destination`` defers a dead destination's whole queue."""

    until: float
    """The next probe: every deferred recipient becomes due at this moment."""
    reply: str
    """Shown as each recipient's last reply (why it waits)."""
    now: float
    expire_received_before: float | None = None
    """Recipients of messages received at or before this are past ``max_age``: parked with
    ``expired_reply`` instead of deferred. None: nothing has expired."""
    expired_reply: str = ""


@dataclass(frozen=True, slots=True)
class DomainChanges:
    """Fields of a domain to change; None leaves a field as it is."""

    mode: DomainMode | None = None
    routes: tuple[Route, ...] | None = None
    use_mx: bool | None = None
    tls: TlsMode | None = None
    rate: float | None = None
    clear_rate: bool = False
    profile: str | None = None
    released_at: float | None = None
    max_size: int | None = None
    clear_max_size: bool = False
    subdomains: bool | None = None
    plus_separator: str | None = None
    """"" switches plus addressing off."""
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Migration:
    """Several domains moved together from a source tenant to a target tenant (issue 12)."""

    name: str
    domains: tuple[str, ...] = ()
    source_tenant: str | None = None
    target_tenant: str | None = None
    """Domains of migrations with one target tenant label share one pacing bucket."""
    created_at: float = 0.0
    release_at: float | None = None
    """A scheduled release (``migration release --at``); None: none scheduled."""
    release_rate: float | None = None
    """Messages per second of the last or scheduled release; None: each domain's own rate."""


@dataclass(frozen=True, slots=True)
class StageEvent:
    """A domain reached a migration stage (``mxspool.stage``), recorded when it happened."""

    domain: str
    stage: str
    at: float
    actor: str = ""
    detail: str = ""
    migration: str | None = None


@dataclass(frozen=True, slots=True)
class MigrationChanges:
    """Fields of a migration to change; None leaves a field as it is."""

    release_at: float | None = None
    clear_release_at: bool = False
    release_rate: float | None = None
    clear_release_rate: bool = False


@dataclass(frozen=True, slots=True)
class DomainsTransition:
    """Several domains changed in one transaction (a migration's hold, release, route), with
    their stage events, one audit entry and the migration's own change: all or nothing."""

    changes: Mapping[str, DomainChanges]
    events: Sequence[StageEvent] = ()
    audit: AuditEntry | None = None
    """Recorded as is, except that its actor goes through ``audit_actor`` like record_audit."""
    migration: str | None = None
    migration_changes: MigrationChanges | None = None
    expect_release_at: float | None = None
    """Apply only if the migration's release_at is this (a scheduled release performed once
    by one node); else Conflict and nothing changes."""


HELD_UNTIL = 253402300799.0
"""next_attempt_at of a recipient-held row (9999-12-31T23:59:59Z): never due, and still a date
anything that shows it can print. The release of the hold makes the row due at once."""


@dataclass(frozen=True, slots=True)
class RecipientHold:
    """One mailbox's mail kept while its domain is released (``hold --recipient``).

    ``address`` is lowercased; its sub-addressed forms match too: a recipient whose address
    starts with ``prefix`` (local part and plus separator; "" = none) and ends with ``suffix``
    ("@domain"). ``held``: pending recipient rows it keeps (filled in when listed).
    """

    address: str
    domain: str
    prefix: str
    suffix: str
    created_at: float = 0.0
    actor: str = ""
    held: int = 0


@dataclass(frozen=True, slots=True)
class RecipientBacklog:
    """One recipient's open mail in a domain, for release planning (``release_plan``)."""

    address: str
    """Lowercased."""
    messages: int
    """Pending rows (one per message)."""
    size: int
    """Bytes of those messages."""
    too_big: int
    """Messages larger than the mailbox's MaxReceiveSize (recipient list) or ``max_size``."""
    held: int
    """Rows kept by a recipient hold (``hold --recipient``)."""
    max_size: int | None
    """The mailbox's MaxReceiveSize from the recipient list; None: unknown."""
    busiest_pair: int = 0
    """Pending rows of this recipient from its busiest sender (Exchange Online also limits
    each sender-recipient pair an hour, so one sender's backlog can be the slowest)."""


@dataclass(frozen=True, slots=True)
class RecipientCheck:
    """One recipient's result in the last ``check recipients`` run of its domain."""

    address: str
    """Lowercased."""
    state: str
    """"ready", "not ready" or "unknown"."""
    reply: str
    """The target's reply at RCPT, or why there is no verdict."""
    checked_at: float


FLUSH_ALL = "*"
"""``flushed_domains``' name for a ``queue flush`` of every domain."""


AcceptCallback = Callable[[BaseException | None], None]


def submit_via_task(store: Store, message: IncomingMessage, on_done: AcceptCallback) -> None:
    """``Store.submit_message`` for a store that only has ``accept_message``."""

    def finished(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            on_done(StoreError("the commit was cancelled"))
        else:
            on_done(task.exception())

    task = asyncio.ensure_future(store.accept_message(message))
    _pending_tasks.add(task)
    task.add_done_callback(_pending_tasks.discard)
    task.add_done_callback(finished)


_pending_tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """What ``purge_delivered`` dropped (or, in a dry run, would drop)."""

    messages: int
    bytes: int
    """The stored size of the bodies."""
    dry_run: bool
    cutoff: float


class Store(Protocol):
    """What every store implementation provides. All methods are safe to call concurrently."""

    async def open(self) -> None:
        """Connect and apply pending schema migrations."""

    async def close(self) -> None: ...

    def free_bytes(self) -> int | None:
        """Free space where message bytes are written, or None when not measurable here."""

    # -- intake -------------------------------------------------------------------------
    async def accept_message(self, message: IncomingMessage) -> None:
        """Durably store the message and one pending row per recipient.

        Returns only after the commit is on stable storage; raises StoreError otherwise, in
        which case nothing of the message is visible.
        """

    def submit_message(self, message: IncomingMessage, on_done: AcceptCallback) -> None:
        """``accept_message`` for the intake's hot path, without a task or a future.

        ``on_done(None)`` once the commit is on stable storage, ``on_done(error)`` if it failed;
        called on the event loop's thread, from the loop, never before this returns. Must be
        called on the loop's thread. Saves the intake a task per message and the loop iteration
        that resuming a task costs, which matters when one loop serves many sessions.
        """

    def deliver_ready(self) -> None:
        """Call back now, on the loop, the ``submit_message`` commits already finished.

        The intake calls it at each event it handles (a cheap look when there is nothing): a
        busy loop otherwise learns of a finished commit only at its next turn, after the events
        ahead of it (~0.4 ms on 2 cores with 10 sessions), and the client waits that long for
        its 250. A store that calls back through the loop's own queue does nothing here.
        """

    # -- domains ------------------------------------------------------------------------
    async def domains_generation(self) -> int:
        """A number that changes whenever any domain changes (cheap to poll)."""

    async def list_domains(self) -> list[Domain]: ...

    async def get_domain(self, name: str) -> Domain | None: ...

    async def add_domain(self, domain: Domain) -> None:
        """Raises Conflict when the domain exists."""

    async def update_domain(self, name: str, changes: DomainChanges) -> Domain:
        """Raises NotFound when the domain does not exist."""

    async def remove_domain(self, name: str, force: bool = False) -> None:
        """Raises Conflict while mail for it is not final, unless ``force``."""

    async def release_recipient(self, domain: str, address: str) -> int:
        """Canary: let this recipient's held mail go while the domain stays held."""

    async def hold_recipient(self, hold: RecipientHold) -> int:
        """Keep ``hold.address``'s mail (its pending rows and new ones) until released; the
        rows it marked. Holding an address already held refreshes nothing and marks again."""

    async def release_recipient_hold(self, address: str) -> int | None:
        """End the hold of ``address``: its held rows are due now. None: it was not held."""

    async def recipient_holds(self, domain: str | None = None) -> list[RecipientHold]:
        """Every recipient hold (of ``domain``), with the rows each keeps, by address."""
        ...

    async def flush_queue(self, now: float, domain: str | None = None) -> int:
        """Make every deferred pending recipient that may be delivered (its domain relays, or
        a canary) due at ``now``; recipient-held rows stay. The rows changed. Records the
        flush first (``flush_generation``), so a running engine that finds the rows due also
        finds that they were flushed and forgets the destination's dead state."""

    async def recipient_backlog(
        self, domain: str, default_max_size: int | None
    ) -> list[RecipientBacklog]:
        """Per recipient, the domain's pending mail (``release_plan``): one GROUP BY."""
        ...

    async def flush_generation(self) -> int:
        """A number ``flush_queue`` raises (one primary-key read: the scheduler polls it)."""
        ...

    async def flushed_domains(self, after: int) -> list[str]:
        """The domains flushed since generation ``after`` (``FLUSH_ALL``: every domain)."""
        ...

    async def record_recipient_checks(self, domain: str, checks: Sequence[RecipientCheck]) -> None:
        """Make ``checks`` the domain's stored ``check recipients`` result (replacing the last).
        Raises NotFound when the domain does not exist."""
        ...

    async def recipient_checks(self, domain: str) -> list[RecipientCheck]:
        """The domain's last ``check recipients`` result, by address."""
        ...

    # -- queue --------------------------------------------------------------------------
    async def list_queue(
        self, filter: QueueFilter = EVERY_ROW, *, limit: int = 100, after: int | None = None
    ) -> list[QueueEntry]:
        """Recipient rows matching ``filter``, oldest first, after the recipient id ``after``
        (a cursor), at most ``limit``."""

    async def get_message(self, message_id: str) -> StoredMessage | None: ...

    def read_body(self, message_id: str) -> AsyncIterator[bytes]:
        """The stored bytes in pieces; raises NotFound."""

    async def read_small_bodies(
        self, message_ids: Sequence[str], max_size: int
    ) -> dict[str, bytes]:
        """The stored bytes of those messages whose size is at most ``max_size``, in one read.

        Other ids (larger, or gone) are left out. Delivery reads a claimed batch this way.
        """

    async def attempts(self, message_id: str) -> list[AttemptRecord]: ...

    async def discard(self, message_id: str) -> int:
        """Mark every not-yet-final recipient discarded; the number changed."""

    async def retry(self, message_id: str | None = None, domain: str | None = None) -> int:
        """Put parked recipients (of one message, or all parked, optionally in a domain) back."""

    async def mark_bounced(self, message_id: str, reply: str) -> int: ...

    async def status(self, now: float) -> list[DomainStatus]:
        """Counts per domain from the per-(domain, state) counters: O(domains), not O(rows)."""
        ...

    async def check_counters(self, repair: bool = False) -> list[CounterDrift]:
        """Recount the rows and compare them with the counters; ``repair`` resets them."""
        ...

    def report(self, domain: str | None = None) -> AsyncIterator[ReportRow]: ...

    async def purge_delivered(self, before: float, dry_run: bool = False) -> PurgeResult:
        """Drop the bodies of delivered messages unchanged since ``before``, keeping their
        rows and tagging them ``purged=...`` (see store/purge.py); in bounded batches."""
        ...

    # -- audit --------------------------------------------------------------------------
    async def record_audit(
        self, actor: str, action: str, target: str, detail: str = ""
    ) -> None: ...

    async def list_audit(self, limit: int = 100) -> list[AuditEntry]: ...

    # -- migration toolkit ----------------------------------------------------------------
    async def add_recipients(
        self,
        domain: str,
        addresses: Sequence[str],
        replace: bool = False,
        max_sizes: Mapping[str, int] | None = None,
    ) -> int:
        """Add addresses (folded by ``mxspool.addresses.address_key``) to the domain's
        recipient list (or, with ``replace``, make them the whole list); the number of
        addresses on the list afterwards. ``max_sizes``: the mailbox's MaxReceiveSize in bytes
        by address, for those that have one (an address listed again gets the new value).

        Bumps the domain generation, so the intake sees the change within a second.
        Raises NotFound when the domain does not exist.
        """

    async def recipient_list(self, domain: str) -> list[str]:
        """The domain's recipient list, sorted (empty: no list, every address accepted)."""

    async def clear_recipients(self, domain: str) -> int:
        """Remove the domain's recipient list; how many addresses it had."""

    async def recipient_lists(self) -> dict[str, frozenset[str]]:
        """Every domain that has a list, with its addresses (the intake's RCPT check)."""

    async def recipient_max_sizes(self) -> dict[str, int]:
        """Every listed address that has a MaxReceiveSize, with it in bytes."""

    async def add_tag(self, message_id: str, tag: str) -> None:
        """Add ``tag`` to a stored message (no-op when present); raises NotFound."""

    # -- authentication at arrival --------------------------------------------------------
    async def set_authentication(
        self, message_id: str, auth_results: str, tags: Sequence[str]
    ) -> None:
        """Store the arrival verdict: ``auth_results`` (the Authentication-Results value), now
        as ``auth_at``, and ``tags`` (``spf=pass``...), each replacing an earlier tag of the
        same name (the part before ``=``); the message bytes are not touched. Raises NotFound.
        """

    async def set_authentications(
        self, verdicts: Sequence[tuple[str, str, Sequence[str]]]
    ) -> list[str]:
        """``set_authentication`` of many messages, (id, value, tags) each, in one transaction
        (the intake writes its verdicts in batches); returns the ids not found (skipped)."""

    async def unauthenticated(self, message_ids: Sequence[str]) -> set[str]:
        """Those of ``message_ids`` whose verdict is not stored (``auth_at`` is NULL)."""

    async def without_authentication(
        self,
        received_before: float,
        limit: int,
        since: str | None = None,
        node: str | None = None,
    ) -> list[str]:
        """Ids of recent messages received before ``received_before`` with no verdict, oldest
        first, at most ``limit``: among the newest ``queries.RECENT_SCAN`` messages (after a
        crash, what was committed but not yet judged), so the cost is bounded; among every
        message from ``since`` on when it names one (what the intake left to the background
        pass during a burst longer than that window); and from ``node``'s mark on when it has
        one (``mark_unjudged``: what that node may still have owed when it stopped)."""

    async def mark_unjudged(
        self, node: str, message_ids: Sequence[str] = (), *, move: bool = False
    ) -> None:
        """Durably note where the verdicts ``node`` may owe begin (``without_authentication``
        reaches back to it after a crash): at the oldest of ``message_ids`` still stored (ids
        sort by arrival; the oldest few are looked up), else at the first of the newest
        ``queries.RECENT_SCAN`` messages. Without ``move`` an older mark is kept; with it the
        mark moves on (the verdicts before it are stored)."""

    async def clear_unjudged(self, node: str) -> None:
        """Forget ``node``'s mark (it serves with authentication off: nothing is owed)."""

    async def adopt_unjudged(self, node: str) -> list[str]:
        """Take over the marks of the nodes that are not running, so ``node``'s recovery
        reaches back to what they owed (a node that never comes back, or was renamed): for
        each, in one transaction, ``node``'s mark moves down to its mark when that is older,
        and its mark goes. The names taken over. Not running: with SQLite, every other name
        (one server per spool file: ``store.serverlock``); with PostgreSQL, a name no
        running node holds (``store.nodename``)."""

    # -- delivery -----------------------------------------------------------------------
    async def claim_due(
        self, owner: str, now: float, lease_seconds: float, limit: int, domain: str
    ) -> list[DeliveryJob]:
        """Lease due recipients of ``domain``, oldest first, grouped by message.

        Whole messages: the first ``limit`` due recipients choose the messages, and every due
        recipient of those messages in ``domain`` is leased (so a claim may hold more than
        ``limit``, up to the rest of its last message), never a part of one: a message's
        recipients for one destination go out together. With concurrent claims (several
        nodes), a message another claim holds a part of is left to a later claim, whole.

        Due means: pending with next_attempt_at <= now and the domain in relay mode (or the
        recipient released as a canary), or delivering with an expired lease (its worker died).
        """

    async def due_domains(self, now: float) -> list[str]:
        """Domains that have at least one recipient claim_due would return now."""

    async def release_claims(self, owner: str, recipient_ids: Sequence[int]) -> None:
        """Give unattempted claims back: pending and due now; attempts and last reply kept."""

    async def renew_leases(
        self, owner: str, recipient_ids: Sequence[int], until: float
    ) -> None: ...

    async def record_outcomes(self, owner: str, outcomes: Sequence[RecipientOutcome]) -> None:
        """Apply delivery results (only to rows still leased by ``owner``) and log attempts."""

    async def next_due_at(self, domain: str) -> float | None:
        """When the earliest pending recipient of ``domain`` becomes due, if any."""

    async def defer_destination(self, domain: str, deferral: DestinationDeferral) -> int:
        """The domain's destination is dead: defer its whole queue in one update.

        Every recipient ``claim_due`` could hand out (pending in a relaying domain, or a
        released canary; delivering with a lease expired before ``deferral.now``) becomes
        pending, due at ``deferral.until``, with ``deferral.reply`` as its last reply, also when
        its own retry time was later, so the whole queue goes at once when a probe finds the
        destination back. Rows leased to a live worker are left alone. No attempt is counted or
        logged. Recipients past ``expire_received_before`` are parked instead. Returns the
        number of rows changed (rows already due at ``until`` are not rewritten).
        """

    # -- wake-ups and cluster-wide pacing -----------------------------------------------
    def notifications(self) -> AsyncIterator[str]:
        """Hints that work appeared: "resync" after each (re)connect, "domains", "mail:<domain>".

        Polling stays the fallback; a single-node store may yield "resync" and then nothing.
        """

    async def take_tokens(
        self, bucket: str, rate: float, burst: float, want: int, now: float
    ) -> int:
        """Take up to ``want`` tokens from a bucket shared by every node.

        The bucket refills at ``rate`` per second up to ``burst`` and starts full; returns how
        many were taken (0 when empty).
        """

    async def acquire_slot(self, destination: str, owner: str, limit: int, ttl: float) -> bool:
        """Take or renew one of ``limit`` concurrent slots for ``destination``.

        A slot not renewed within ``ttl`` seconds expires. False when all are taken.
        """

    async def release_slot(self, destination: str, owner: str) -> None:
        """Give the slot back (no error when it already expired)."""

    # -- migrations (issue 12) ----------------------------------------------------------
    async def add_migration(self, migration: Migration) -> None:
        """Create it with its domains. Conflict when the name exists or a domain belongs to
        another migration; NotFound when a domain is not configured."""

    async def list_migrations(self) -> list[Migration]:
        """Every migration with its domains (sorted), by name."""
        ...

    async def get_migration(self, name: str) -> Migration | None: ...

    async def change_migration_domains(
        self, name: str, add: Sequence[str] = (), remove: Sequence[str] = ()
    ) -> Migration:
        """Add and remove domains (same rules as add_migration); NotFound for the migration,
        or a domain to remove that is not in it."""
        ...

    async def update_migration(self, name: str, changes: MigrationChanges) -> Migration:
        """Raises NotFound."""
        ...

    async def remove_migration(self, name: str) -> None:
        """The migration and its memberships go; the domains and their events stay."""

    async def apply_transition(self, transition: DomainsTransition) -> list[Domain]:
        """Everything in ``transition`` in one transaction; the changed domains, in the order
        given. NotFound (a domain) or Conflict (``expect_release_at``): nothing changed."""
        ...

    async def record_stage_events(self, events: Sequence[StageEvent]) -> None: ...

    async def stage_events(
        self, domains: Sequence[str] | None = None, limit: int = 10_000
    ) -> list[StageEvent]:
        """Events of ``domains`` (None: all), oldest first; the newest ``limit`` of them."""
        ...
