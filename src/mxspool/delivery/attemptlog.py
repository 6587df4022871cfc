"""What one delivery attempt tells the mail log (mxspool.maillog).

The engine keeps an ``AttemptTrace`` per worker (the hop, its TLS, the time to get a session
and the transaction's time) and, when a message's attempt is over, makes an ``AttemptNote`` from
the trace and the recipients' outcomes. The note goes to the ``OutcomeRecorder`` with the
outcomes and is written only once they are committed (the ledger first, then the log), as one
line per group of recipients with the same result: recipients, relay (host[IP]:port), TLS,
delay since arrival (or release), this attempt's connect/transfer seconds, the remote reply,
and the new state (delivered; deferred with the next attempt; parked).
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass

from mxspool import maillog
from mxspool.store.base import DeliveryJob, RecipientOutcome, RecipientState

DELIVER = "deliver"

_STATUS = {RecipientState.PENDING: "deferred"}


@dataclass(slots=True)
class AttemptTrace:
    """The last transaction of one worker: filled in by the engine as it goes."""

    tls: str | None = None
    connect: float = 0.0
    """Seconds to get a session (0 when an open one was reused)."""
    transfer: float = 0.0
    """Seconds from MAIL FROM to the last reply."""

    def opened(self, session: object, seconds: float) -> None:
        self.connect = seconds
        found = getattr(session, "ssl_object", None)
        if isinstance(found, ssl.SSLObject | ssl.SSLSocket):
            cipher = found.cipher()
            self.tls = f"{found.version()}:{cipher[0] if cipher else '?'}"
        else:
            self.tls = None


@dataclass(frozen=True, slots=True)
class AttemptNote:
    """A message's attempt, to be logged once its outcomes are committed."""

    last_id: int
    """The recipient id of the attempt's last outcome: committed means all are."""
    entries: tuple[tuple[str, dict[str, maillog.Value]], ...]

    def emit(self) -> None:
        for queue_id, fields in self.entries:
            maillog.emit(DELIVER, "attempt", queue_id, fields)


def note(
    job: DeliveryJob, age_start: float, results: list[RecipientOutcome], trace: AttemptTrace
) -> AttemptNote | None:
    """The log lines of ``job``'s attempt (None when the mail log is off or nothing happened)."""
    if not results or not maillog.enabled():
        return None
    addresses = {recipient.id: recipient.address for recipient in job.recipients}
    attempts = {recipient.id: recipient.attempts for recipient in job.recipients}
    groups: dict[tuple[RecipientState, str, str, float], list[RecipientOutcome]] = {}
    for outcome in results:
        key = (outcome.state, outcome.reply, outcome.destination, outcome.next_attempt_at)
        groups.setdefault(key, []).append(outcome)
    now = time.time()
    entries = []
    for (state, reply, destination, next_at), members in groups.items():
        first = members[0]
        deferred = state is RecipientState.PENDING
        fields: dict[str, maillog.Value] = {
            "to": [f"<{addresses.get(item.recipient_id, '?')}>" for item in members],
            "relay": destination or None,
            "tls": trace.tls if first.count_attempt else None,
            "delay": max(0.0, now - age_start),
            "delays": f"{trace.connect:.3f}/{trace.transfer:.3f}",
            "attempt": attempts.get(first.recipient_id, 0) + (1 if first.count_attempt else 0),
            "status": _STATUS.get(state, str(state)),
            "next_attempt": maillog.timestamp(next_at) if deferred and next_at else None,
            "reply": reply,
        }
        entries.append((job.message_id, fields))
    return AttemptNote(results[-1].recipient_id, tuple(entries))
