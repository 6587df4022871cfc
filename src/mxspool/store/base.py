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
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mxspool.body import BodyBuffer
from mxspool.envelope import Envelope, MailParams, RcptParams


class StoreError(Exception):
    """The store could not do what was asked; the message says what and what to do."""


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
    extra: dict[str, str] = field(default_factory=dict)


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

    # -- audit --------------------------------------------------------------------------
    async def record_audit(
        self, actor: str, action: str, target: str, detail: str = ""
    ) -> None: ...

    async def list_audit(self, limit: int = 100) -> list[AuditEntry]: ...

    # -- migration toolkit ----------------------------------------------------------------
    async def add_recipients(
        self, domain: str, addresses: Sequence[str], replace: bool = False
    ) -> int:
        """Add lowercased addresses to the domain's recipient list (or, with ``replace``,
        make them the whole list); the number of addresses on the list afterwards.

        Bumps the domain generation, so the intake sees the change within a second.
        Raises NotFound when the domain does not exist.
        """

    async def recipient_list(self, domain: str) -> list[str]:
        """The domain's recipient list, sorted (empty: no list, every address accepted)."""

    async def clear_recipients(self, domain: str) -> int:
        """Remove the domain's recipient list; how many addresses it had."""

    async def recipient_lists(self) -> dict[str, frozenset[str]]:
        """Every domain that has a list, with its addresses (the intake's RCPT check)."""

    async def add_tag(self, message_id: str, tag: str) -> None:
        """Add ``tag`` to a stored message (no-op when present); raises NotFound."""

    # -- delivery -----------------------------------------------------------------------
    async def claim_due(
        self, owner: str, now: float, lease_seconds: float, limit: int, domain: str
    ) -> list[DeliveryJob]:
        """Lease up to ``limit`` due recipients of ``domain``, oldest first, grouped by message.

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
