"""Migration operations on the store, shared by the CLI (and any other front end).

Like :mod:`mxspool.operations`: input is validated before anything is written, every change is
audited, and errors say what to do next.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from mxspool.config import Config
from mxspool.delivery.dnscache import DnsCache
from mxspool.delivery.errors import DeliveryError
from mxspool.delivery.routing import Router
from mxspool.migrate import dnscheck
from mxspool.migrate.dnscheck import DnsReport
from mxspool.migrate.probe import PROBE_TAG, ProbeError, submit
from mxspool.migrate.recipients import ParsedRecipients, RecipientFileError, parse_recipient_file
from mxspool.migrate.routecheck import HopVerdict, Readiness, judge_hop, probe_recipients
from mxspool.migrate.runbook import (
    Inputs,
    RunbookError,
    check_spooler_ip,
    render_markdown,
    render_ps1,
)
from mxspool.migrate.smtpprobe import SmtpProber
from mxspool.operations import OperationError, normalize_domain, parse_route
from mxspool.store.base import Domain, NotFound, QueueEntry, QueueFilter, Store
from mxspool.units import parse_rate

MAX_FILE = 64 << 20
"""A tenant export of a few hundred thousand recipients is well under this."""


async def require_domain(store: Store, name: str) -> str:
    """The normalized name of a configured domain, or NotFound saying how to add it."""
    domain = normalize_domain(name)
    if await store.get_domain(domain) is None:
        raise NotFound(
            f"no domain {domain}; add it first with 'mxspool domain add {domain} --route HOST'"
        )
    return domain


def _read_file(file: Path) -> bytes:
    try:
        if file.stat().st_size > MAX_FILE:
            raise OperationError(
                f"{file} is larger than {MAX_FILE >> 20} MiB; split it and import the parts"
            )
        return file.read_bytes()
    except OSError as exc:
        raise OperationError(f"cannot read {file}: {exc.strerror}; check the path") from None


@dataclass(frozen=True, slots=True)
class ImportResult:
    domain: str
    parsed: ParsedRecipients
    total: int
    """Addresses on the domain's list after the import."""


async def import_recipients(
    store: Store, name: str, path: str, *, replace: bool = False, actor: str = "cli"
) -> ImportResult:
    """Add the domain's addresses found in ``path`` to its recipient list."""
    domain = await require_domain(store, name)
    file = Path(path)
    data = await asyncio.to_thread(_read_file, file)
    try:
        parsed = parse_recipient_file(data, domain)
    except RecipientFileError as exc:
        raise OperationError(f"{path}: {exc}") from None
    if not parsed.addresses:
        raise OperationError(
            f"{path} has no address in {domain} ({parsed.rows} rows, "
            f"{parsed.skipped_other_domains} addresses in other domains); nothing was changed. "
            "Check that the export comes from the right tenant and domain",
            exit_code=1,
        )
    total = await store.add_recipients(domain, parsed.addresses, replace=replace)
    await store.record_audit(
        actor,
        "recipients.import",
        domain,
        f"file={file.name} format={parsed.format} found={len(parsed.addresses)} "
        f"total={total}{' replace' if replace else ''}",
    )
    return ImportResult(domain, parsed, total)


async def list_recipients(store: Store, name: str) -> list[str]:
    domain = await require_domain(store, name)
    return await store.recipient_list(domain)


async def clear_recipients(store: Store, name: str, *, actor: str = "cli") -> int:
    domain = await require_domain(store, name)
    count = await store.clear_recipients(domain)
    await store.record_audit(actor, "recipients.clear", domain, f"removed={count}")
    return count


# -- checks --------------------------------------------------------------------------------


def _router(config: Config) -> Router:
    return Router(DnsCache(config.delivery.resolver))


def _prober(config: Config) -> SmtpProber:
    return SmtpProber(
        local_hostname=config.smtp.hostname,
        timeout=config.delivery.connect_timeout,
        ca_file=config.delivery.ca_file,
    )


async def _route_hosts(config: Config, domain: Domain) -> set[str]:
    """The hosts the domain's mail goes to now (MX hosts of the routes with --mx)."""
    hosts = {route.host for route in domain.routes}
    if domain.use_mx:
        cache = DnsCache(config.delivery.resolver)
        for target in hosts or {domain.name}:
            try:
                hosts |= {record.exchange for record in await cache.mx(target)}
            except DeliveryError:
                continue
    return hosts


async def check_dns(
    store: Store, config: Config, name: str, spooler: str | None = None, *, actor: str = "cli"
) -> DnsReport:
    """Preflight of the domain's DNS (works before the domain is configured, too)."""
    domain_name = normalize_domain(name)
    spooler_host = (spooler or config.smtp.hostname).strip().lower().rstrip(".")
    domain = await store.get_domain(domain_name)
    route_hosts = await _route_hosts(config, domain) if domain is not None else set()
    try:
        report = await dnscheck.check_dns(
            domain_name,
            spooler=spooler_host,
            nameserver=config.delivery.resolver,
            ca_file=config.delivery.ca_file,
            route_hosts=route_hosts,
        )
    except dnscheck.DnsCheckError as exc:
        raise OperationError(str(exc)) from None
    if domain is not None:
        # The checklist reads these entries: "mx=spooler" moves the domain to mx-to-spooler,
        # "mx=route" after the release to mx-to-target.
        await store.record_audit(
            actor,
            "check.dns",
            domain_name,
            f"mx={report.mx_at} spooler={spooler_host} verdict={'go' if report.go else 'no-go'}",
        )
    return report


@dataclass(frozen=True, slots=True)
class RouteCheck:
    domain: Domain
    hops: list[HopVerdict]
    error: str = ""

    @property
    def go(self) -> bool:
        return bool(self.hops) and all(hop.go for hop in self.hops) and not self.error


async def check_route(
    store: Store, config: Config, name: str, rcpt: str | None = None, *, actor: str = "cli"
) -> RouteCheck:
    """Look at every hop of the domain's route; RCPT-probe ``rcpt`` (default postmaster@)."""
    domain_name = await require_domain(store, name)
    domain = await store.get_domain(domain_name)
    assert domain is not None
    address = rcpt.strip() if rcpt else f"postmaster@{domain_name}"
    if "@" not in address:
        raise OperationError(f"--rcpt {rcpt!r} is not an address; give user@{domain_name}")
    try:
        hops = await _router(config).hops(domain)
    except DeliveryError as exc:
        result = RouteCheck(domain, [], f"cannot resolve the route: {exc}")
    else:
        prober = _prober(config)
        reports = await asyncio.gather(
            *(prober.examine(hop, domain.tls, [address]) for hop in hops)
        )
        verdicts = [
            judge_hop(report, domain.tls, config.smtp.max_message_size) for report in reports
        ]
        result = RouteCheck(domain, verdicts)
    await store.record_audit(
        actor,
        "check.route",
        domain_name,
        f"hops={len(result.hops)} verdict={'go' if result.go else 'no-go'}",
    )
    return result


@dataclass(frozen=True, slots=True)
class RecipientsCheck:
    domain: Domain
    results: list[Readiness]

    @property
    def ready(self) -> int:
        return sum(1 for item in self.results if item.state == "ready")


async def held_recipients(store: Store, domain: str) -> list[str]:
    """Each distinct held recipient of the domain (lowercased), oldest first."""
    seen: dict[str, None] = {}
    after: int | None = None
    while True:
        held = QueueFilter(domain=domain, state="held")
        page = await store.list_queue(held, limit=1000, after=after)
        for entry in page:
            seen.setdefault(entry.rcpt.lower(), None)
        if len(page) < 1000:
            return list(seen)
        after = page[-1].recipient_id


async def check_recipients(
    store: Store,
    config: Config,
    name: str,
    *,
    concurrency: int = 2,
    rate: str = "5/s",
    actor: str = "cli",
) -> RecipientsCheck:
    """RCPT-probe each distinct held recipient at the route (never DATA)."""
    domain_name = await require_domain(store, name)
    domain = await store.get_domain(domain_name)
    assert domain is not None
    if concurrency < 1:
        raise OperationError(f"--concurrency must be at least 1, not {concurrency}")
    try:
        per_second = parse_rate(rate)
    except ValueError as exc:
        raise OperationError(str(exc)) from None
    addresses = await held_recipients(store, domain_name)
    results: list[Readiness] = []
    if addresses:
        try:
            hops = await _router(config).hops(domain)
        except DeliveryError as exc:
            raise OperationError(
                f"cannot resolve the route of {domain_name}: {exc}; 'mxspool check route "
                f"{domain_name}' shows more",
                exit_code=1,
            ) from None
        results = await probe_recipients(
            _prober(config),
            hops,
            domain.tls,
            addresses,
            concurrency=concurrency,
            rate=per_second,
        )
    check = RecipientsCheck(domain, results)
    await store.record_audit(
        actor,
        "check.recipients",
        domain_name,
        f"checked={len(results)} ready={check.ready}",
    )
    return check


# -- runbook -------------------------------------------------------------------------------


async def runbook(
    store: Store,
    config: Config,
    name: str,
    *,
    spooler_host: str,
    spooler_ip: str,
    target_host: str | None = None,
    fmt: str = "md",
    actor: str = "cli",
) -> str:
    """The migration plan for the domain (Markdown or a PowerShell script)."""
    domain = normalize_domain(name)
    try:
        ip = check_spooler_ip(spooler_ip)
    except RunbookError as exc:
        raise OperationError(str(exc)) from None
    spooler = parse_route(spooler_host).host
    target = parse_route(target_host).host if target_host else None
    hosts, ttl, error = await dnscheck.current_mx(domain, config.delivery.resolver)
    inputs = Inputs(domain, spooler, ip, target, tuple(hosts), ttl, error)
    text = render_ps1(inputs) if fmt == "ps1" else render_markdown(inputs)
    # The checklist's "planned" stage is this entry.
    await store.record_audit(
        actor, "runbook", domain, f"spooler={spooler} ip={ip} target={target or '-'}"
    )
    return text


# -- probe ---------------------------------------------------------------------------------

PROBE_POLL = 0.25


@dataclass(frozen=True, slots=True)
class ProbeResult:
    domain: Domain
    rcpt: str
    queue_id: str
    token: str
    submit_reply: str
    listener: str
    stored: bool
    state: str
    """The recipient's state when the command stopped looking (held, pending, delivered...)."""
    reply: str | None
    """The next hop's last reply, once there was an attempt."""
    waited: float


async def _probe_rcpt(store: Store, domain: str, to: str | None) -> str:
    if to:
        address = to.strip().strip("<>")
        local, at, where = address.rpartition("@")
        if not at or not local or where.lower() != domain:
            raise OperationError(f"--to {to!r} is not an address of {domain}; give user@{domain}")
        return address
    listed = await store.recipient_list(domain)
    postmaster = f"postmaster@{domain}"
    if listed and postmaster not in listed:
        # The spooler would refuse postmaster@ (not on the list): use a listed address.
        return listed[0]
    return postmaster


async def probe(
    store: Store,
    config: Config,
    name: str,
    to: str | None = None,
    *,
    wait: float = 30.0,
    actor: str = "cli",
) -> ProbeResult:
    """Send a marked message through our own listener; follow it to the next hop's reply."""
    domain_name = await require_domain(store, name)
    rcpt = await _probe_rcpt(store, domain_name, to)
    try:
        sent = await submit(config, domain_name, rcpt)
    except ProbeError as exc:
        raise OperationError(str(exc), exit_code=1) from None
    await store.add_tag(sent.queue_id, PROBE_TAG)
    started = time.monotonic()
    state, reply = "missing", None
    while True:
        message = await store.get_message(sent.queue_id)
        domain = await store.get_domain(domain_name)
        assert domain is not None
        if message is not None and message.recipients:
            row = message.recipients[0]
            state = "held" if row.held else row.state.value
            reply = row.last_reply
        waited = time.monotonic() - started
        # In hold there is nothing more to see; in relay, wait for a final answer.
        if state in ("held", "delivered", "parked", "bounced", "discarded") or waited >= wait:
            break
        await asyncio.sleep(PROBE_POLL)
    await store.record_audit(
        actor, "probe", domain_name, f"id={sent.queue_id} rcpt={rcpt} state={state}"
    )
    return ProbeResult(
        domain,
        rcpt,
        sent.queue_id,
        sent.token,
        sent.reply,
        sent.listener,
        message is not None,
        state,
        reply,
        round(waited, 1),
    )


async def list_probes(store: Store, name: str) -> list[QueueEntry]:
    domain = await require_domain(store, name)
    entries: list[QueueEntry] = []
    after: int | None = None
    while True:
        probes = QueueFilter(domain=domain, tag=PROBE_TAG)
        page = await store.list_queue(probes, limit=1000, after=after)
        entries += page
        if len(page) < 1000:
            return entries
        after = page[-1].recipient_id


async def discard_probes(store: Store, name: str, *, actor: str = "cli") -> int:
    """Discard every probe message of the domain not yet final; recipients changed."""
    domain = await require_domain(store, name)
    ids = dict.fromkeys(entry.message_id for entry in await list_probes(store, domain))
    count = 0
    for queue_id in ids:
        count += await store.discard(queue_id)
    await store.record_audit(
        actor, "probe.discard", domain, f"messages={len(ids)} recipients={count}"
    )
    return count
