"""What an attempt means for each recipient: delivered, deferred (pending) or parked.

Nothing here bounces: during a migration a 5xx from the target usually means "not ready yet",
so permanent failures park the recipient for an operator. Temporary failures are retried per
``retry_schedule`` until ``max_age`` has passed since the domain was released (or since the
message arrived, when later), then parked as expired; never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from mxspool.smtp.replies import Reply
from mxspool.store.base import ClaimedRecipient, RecipientOutcome, RecipientState
from mxspool.units import format_duration


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retry_schedule: tuple[float, ...]
    max_age: float

    def delay(self, attempts_before: int) -> float:
        """Wait after the failure of attempt number ``attempts_before`` (0 = the first)."""
        schedule = self.retry_schedule or (60.0,)
        return schedule[min(attempts_before, len(schedule) - 1)]


@dataclass(frozen=True, slots=True)
class AttemptContext:
    """Facts shared by every recipient of one attempt."""

    destination: str
    now: float
    age_start: float
    """When max_age starts counting: the domain's release, or the arrival when later."""
    policy: RetryPolicy


def for_reply(recipient: ClaimedRecipient, reply: Reply, ctx: AttemptContext) -> RecipientOutcome:
    """The outcome of a final SMTP reply for this recipient."""
    if reply.positive:
        return RecipientOutcome(recipient.id, RecipientState.DELIVERED, str(reply), ctx.destination)
    return for_failure(recipient, str(reply), ctx, permanent=reply.permanent)


def for_failure(
    recipient: ClaimedRecipient,
    reason: str,
    ctx: AttemptContext,
    *,
    permanent: bool,
    delay: float | None = None,
) -> RecipientOutcome:
    """The outcome of a failure: parked when permanent or expired, else deferred, by
    ``delay`` seconds when given, else by the policy's step for the recipient's attempts."""
    if permanent:
        return RecipientOutcome(recipient.id, RecipientState.PARKED, reason, ctx.destination)
    if ctx.now - ctx.age_start >= ctx.policy.max_age:
        return RecipientOutcome(
            recipient.id, RecipientState.PARKED, expired_reply(ctx.policy, reason), ctx.destination
        )
    return RecipientOutcome(
        recipient.id,
        RecipientState.PENDING,
        reason,
        ctx.destination,
        next_attempt_at=ctx.now
        + (ctx.policy.delay(recipient.attempts) if delay is None else delay),
    )


def not_attempted(recipient: ClaimedRecipient, reason: str, due_at: float) -> RecipientOutcome:
    """Deferred without an attempt (its destination is dead): no attempt is counted, so the
    recipient's own retry step stays where it was."""
    return RecipientOutcome(
        recipient.id,
        RecipientState.PENDING,
        reason,
        "",
        next_attempt_at=due_at,
        count_attempt=False,
    )


def expired_reply(policy: RetryPolicy, reason: str) -> str:
    return (
        f"expired: not delivered within {format_duration(policy.max_age)} of release; "
        f"last error: {reason}"
    )


def expiry_cutoff(policy: RetryPolicy, released_at: float | None, now: float) -> float | None:
    """Messages received at or before this are past ``max_age`` (which counts from the
    release, or from arrival when later); None while the release itself is younger."""
    cutoff = now - policy.max_age
    return cutoff if (released_at or 0.0) <= cutoff else None
