"""Prometheus metrics of one node: what the intake and the delivery engine count, and what the
store says at scrape time.

The intake and the delivery engine call the small functions below (never prometheus-client
directly), so the metric names and labels live in this one module. Counters are per process:
a node that restarts starts again from zero, which Prometheus's ``rate()`` handles. Queue sizes
(held, pending, oldest pending age...) are not counted here at all: they are read from the
store when /metrics is scraped (``StoreStatusCollector``), so they are right even with several
nodes on one PostgreSQL store and across restarts.

Everything is registered in ``REGISTRY``, not the global default registry, so importing this
module in tests or in a CLI command has no side effects on other registries.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mxspool import maillog
from mxspool.envelope import domain_of
from mxspool.store.base import DomainMode, DomainStatus, RecipientOutcome, RecipientState

REGISTRY = CollectorRegistry(auto_describe=True)

ACCEPTED = Counter(
    "mxspool_messages_accepted",
    "Messages durably stored and acknowledged with 250, per recipient domain "
    "(a message for two domains counts once in each).",
    ["domain"],
    registry=REGISTRY,
)
REJECTED = Counter(
    "mxspool_smtp_rejected",
    "SMTP connections, recipients and messages refused, by reason.",
    ["reason"],
    registry=REGISTRY,
)
DELIVERED = Counter(
    "mxspool_recipients_delivered",
    "Recipients the next hop accepted with 250.",
    ["domain"],
    registry=REGISTRY,
)
DEFERRED = Counter(
    "mxspool_recipients_deferred",
    "Delivery attempts that ended in a temporary failure (retried later).",
    ["domain"],
    registry=REGISTRY,
)
PARKED = Counter(
    "mxspool_recipients_parked",
    "Recipients parked for an operator (permanent failure or too old).",
    ["domain"],
    registry=REGISTRY,
)
DEAD_DESTINATIONS = Gauge(
    "mxspool_destination_dead",
    "1 while this node holds the domain's destination for dead (its queue deferred until the "
    "next probe), 0 once a session opens again.",
    ["domain"],
    registry=REGISTRY,
)
DEFERRED_DEAD = Counter(
    "mxspool_recipients_deferred_dead_destination",
    "Recipients deferred without an attempt because their destination was dead "
    "(one store update for the whole queue).",
    ["domain"],
    registry=REGISTRY,
)
SMTP_SESSIONS = Gauge(
    "mxspool_smtp_sessions",
    "SMTP sessions open now.",
    registry=REGISTRY,
)
AUTH_RESULTS = Counter(
    "mxspool_auth_results",
    "Authentication verdicts at arrival, per method (spf, dkim, dmarc) and result (pass, fail, "
    "none, temperror...); SPF is not counted for internal clients, which are not checked.",
    ["method", "result"],
    registry=REGISTRY,
)
AUTH_SECONDS = Histogram(
    "mxspool_auth_verdict_seconds",
    "Time one message's authentication verdict took, from the start of its check (DNS, DKIM "
    "and DMARC in a worker process, waiting for SPF) to the verdict.",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
AUTH_DEFERRED = Counter(
    "mxspool_auth_deferred",
    "Messages whose authentication was left to the background pass because too many were "
    "being checked (their verdict comes later, from the stored bytes).",
    registry=REGISTRY,
)
AUTH_RELEASED_UNJUDGED = Counter(
    "mxspool_auth_released_without_verdict",
    "Relayed messages sent without their arrival verdict: none stored within "
    "authentication_timeout (plus a second) of their arrival (the intake was behind).",
    registry=REGISTRY,
)
AUTH_WORKER_RESTARTS = Counter(
    "mxspool_auth_worker_restarts",
    "Times the authentication worker processes were restarted after one died.",
    registry=REGISTRY,
)
REVERSE_LOOKUPS = Counter(
    "mxspool_reverse_lookups",
    "Reverse DNS lookups of SMTP clients (intake.ptr), by result: confirmed, no_name, "
    "not_confirmed (no PTR name resolves back), timeout, failed, busy (too many at once).",
    ["result"],
    registry=REGISTRY,
)
COMMIT_SECONDS = Histogram(
    "mxspool_commit_seconds",
    "Time from end of DATA to the durable commit of a message (the wait before 250).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
DELIVERY_SECONDS = Histogram(
    "mxspool_delivery_seconds",
    "Time of one delivery transaction (MAIL FROM to the final reply to DATA) to the next hop.",
    ["domain"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
    registry=REGISTRY,
)


# -- what the intake calls -------------------------------------------------------------------


# labels() costs a lock and a tuple key per call; the intake calls this for every message.
# Bounded: recipients are only accepted in configured domains.
_accepted_by_domain: dict[str, Counter] = {}


def message_accepted(recipients: Iterable[str], commit_seconds: float) -> None:
    """A message was committed and acknowledged: count it once per recipient domain."""
    for domain in {domain_of(address) for address in recipients}:
        counter = _accepted_by_domain.get(domain)
        if counter is None:
            counter = _accepted_by_domain[domain] = ACCEPTED.labels(domain=domain)
        counter.inc()
    COMMIT_SECONDS.observe(commit_seconds)


def auth_verdict(results: Iterable[tuple[str, str]], seconds: float) -> None:
    """One message's verdict: (method, result) pairs and the time it took."""
    for method, result in results:
        AUTH_RESULTS.labels(method, result).inc()
    AUTH_SECONDS.observe(seconds)


def auth_verdicts(counts: Mapping[tuple[str, str], int], seconds: Iterable[float]) -> None:
    """Many messages' verdicts at once: (method, result) counts, and each one's time."""
    for (method, result), count in counts.items():
        AUTH_RESULTS.labels(method, result).inc(count)
    for value in seconds:
        AUTH_SECONDS.observe(value)


def auth_deferred() -> None:
    AUTH_DEFERRED.inc()


def auth_released_unjudged(count: int) -> None:
    AUTH_RELEASED_UNJUDGED.inc(count)


def auth_worker_restarted() -> None:
    AUTH_WORKER_RESTARTS.inc()


def reverse_lookup(result: str) -> None:
    REVERSE_LOOKUPS.labels(result=result).inc()


def rejected(reason: str) -> None:
    REJECTED.labels(reason=reason).inc()


def session_opened() -> None:
    SMTP_SESSIONS.inc()


def session_closed() -> None:
    SMTP_SESSIONS.dec()


# -- what the delivery engine calls ----------------------------------------------------------


def delivery_outcomes(domain: str, outcomes: Iterable[RecipientOutcome]) -> None:
    """Count the recorded results of one message's delivery attempt."""
    for outcome in outcomes:
        if outcome.state is RecipientState.DELIVERED:
            DELIVERED.labels(domain=domain).inc()
        elif outcome.state is RecipientState.PARKED:
            PARKED.labels(domain=domain).inc()
        elif outcome.state is RecipientState.PENDING and outcome.count_attempt:
            DEFERRED.labels(domain=domain).inc()


def delivery_latency(domain: str, seconds: float) -> None:
    DELIVERY_SECONDS.labels(domain=domain).observe(seconds)


def destination_dead(domain: str, dead: bool) -> None:
    DEAD_DESTINATIONS.labels(domain=domain).set(1.0 if dead else 0.0)


def destination_deferred(domain: str, recipients: int) -> None:
    """A dead destination's queue was deferred in one go: ``recipients`` rows changed."""
    DEFERRED_DEAD.labels(domain=domain).inc(recipients)


# -- what the TLS certificate code calls -----------------------------------------------------

TLS_CERTIFICATE_EXPIRY = Gauge(
    "mxspool_tls_certificate_expiry_seconds",
    "Seconds until the certificate STARTTLS serves expires (negative once expired; NaN while "
    "none is loaded).",
    registry=REGISTRY,
)
TLS_CERTIFICATE_EXPIRY.set(float("nan"))
TLS_RELOADS = Counter(
    "mxspool_tls_certificate_reloads",
    "Loads of the certificate files (at start, on change, on SIGHUP), by result: loaded or "
    "failed (the previous certificate stays in use).",
    ["result"],
    registry=REGISTRY,
)
ACME_ORDERS = Counter(
    "mxspool_acme_orders",
    "Certificate orders to the ACME server, by result: issued or failed.",
    ["result"],
    registry=REGISTRY,
)


def tls_certificate_loaded(not_after: float) -> None:
    """A certificate valid until ``not_after`` (a Unix time) is served from now on."""
    TLS_RELOADS.labels(result="loaded").inc()
    TLS_CERTIFICATE_EXPIRY.set_function(lambda: not_after - time.time())


def tls_certificate_failed() -> None:
    TLS_RELOADS.labels(result="failed").inc()


def acme_order(issued: bool) -> None:
    ACME_ORDERS.labels(result="issued" if issued else "failed").inc()


# -- what the notifications (mxspool.notify) call ---------------------------------------------

NOTIFICATIONS = Counter(
    "mxspool_notifications",
    "Notifications handed to a [[notify]] target, by result: sent (accepted by the target), "
    "failed (given up after its retries, or refused for good) or dropped (its target's queue "
    "was full: the oldest waiting one is dropped).",
    ["target", "result"],
    registry=REGISTRY,
)
NOTIFICATION_RETRIES = Counter(
    "mxspool_notification_retries",
    "Attempts to send a notification that failed and were retried.",
    ["target"],
    registry=REGISTRY,
)


def notification(target: str, result: str) -> None:
    """One notification ``sent``, ``failed`` or ``dropped`` for ``target``."""
    NOTIFICATIONS.labels(target=target, result=result).inc()


def notification_retry(target: str) -> None:
    NOTIFICATION_RETRIES.labels(target=target).inc()


# -- what the store says at scrape time ------------------------------------------------------

_STATUS_GAUGES = (
    ("held", "mxspool_domain_held", "Recipients kept because their domain is in hold."),
    ("pending", "mxspool_domain_pending", "Recipients waiting for delivery (not held)."),
    ("delivering", "mxspool_domain_delivering", "Recipients being delivered now."),
    ("parked", "mxspool_domain_parked", "Recipients parked, waiting for an operator."),
    ("delivered", "mxspool_domain_delivered", "Recipients delivered so far, as the store says."),
)


class StoreStatusCollector(Collector):
    """Per-domain gauges from the latest ``store.status``; /metrics refreshes it per scrape.

    ``collect`` must be synchronous and the store is not, so the scrape handler awaits the
    store first and hands the result over with ``update``.
    """

    def __init__(self) -> None:
        self._entries: list[DomainStatus] = []

    def update(self, entries: Sequence[DomainStatus]) -> None:
        self._entries = list(entries)

    def collect(self) -> Iterator[Metric]:
        entries = self._entries
        for key, name, text in _STATUS_GAUGES:
            family = GaugeMetricFamily(name, text, labels=["domain"])
            for entry in entries:
                family.add_metric([entry.domain], float(getattr(entry, key)))
            yield family
        oldest = GaugeMetricFamily(
            "mxspool_domain_oldest_pending_age_seconds",
            "Age of the oldest held, pending or delivering recipient's message (0 when none).",
            labels=["domain"],
        )
        hold = GaugeMetricFamily(
            "mxspool_domain_hold",
            "1 while the domain is in hold mode, 0 while it relays.",
            labels=["domain"],
        )
        for entry in entries:
            oldest.add_metric([entry.domain], entry.oldest_pending_age_s or 0.0)
            hold.add_metric([entry.domain], 1.0 if entry.mode is DomainMode.HOLD else 0.0)
        yield oldest
        yield hold


STORE_STATUS = StoreStatusCollector()
REGISTRY.register(STORE_STATUS)


class MailLogCollector(Collector):
    """Mail-log lines lost (the writer thread far behind, or the file not writable)."""

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "mxspool_maillog_dropped_lines",
            "Mail-log lines dropped because the writer was too far behind (its bounded queue "
            "was full) or the log file could not be written.",
            value=float(maillog.dropped()),
        )


REGISTRY.register(MailLogCollector())
