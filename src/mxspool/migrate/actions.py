"""Migration operations on the store, shared by the CLI (and any other front end).

Like :mod:`mxspool.operations`: input is validated before anything is written, every change is
audited, and errors say what to do next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mxspool import stage as stages
from mxspool.config import Config
from mxspool.delivery.arckey import ArcKeyError, load_key, zone_line
from mxspool.delivery.dnscache import DnsCache
from mxspool.delivery.errors import DeliveryError
from mxspool.delivery.identity import (
    ClientCertificate,
    IdentityError,
    certificate_name,
    outbound_identity,
)
from mxspool.delivery.routing import Router
from mxspool.migrate import dnscheck
from mxspool.migrate.dnscheck import DnsReport
from mxspool.migrate.probe import PROBE_TAG, ProbeError, submit
from mxspool.migrate.recipients import ParsedRecipients, RecipientFileError, parse_recipient_file
from mxspool.migrate.routecheck import (
    HopVerdict,
    Readiness,
    judge_hop,
    not_checked,
    probe_recipients,
)
from mxspool.migrate.runbook import (
    ArcSealing,
    Inputs,
    RunbookError,
    check_spooler_ip,
    render_markdown,
    render_ps1,
)
from mxspool.migrate.smtpprobe import SmtpProber
from mxspool.migrate.tenantplan import MAX_DOMAINS, DomainNow, Migration
from mxspool.migrate.tenantplan import render_markdown as tenant_markdown
from mxspool.migrate.tenantplan import render_ps1 as tenant_ps1
from mxspool.operations import (
    OperationError,
    normalize_domain,
    parse_route,
    record_action,
    show_domain,
)
from mxspool.store.base import Domain, NotFound, QueueEntry, QueueFilter, RecipientCheck, Store
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
    total = await store.add_recipients(
        domain, parsed.addresses, replace=replace, max_sizes=parsed.max_sizes
    )
    await record_action(
        store,
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
    await record_action(store, actor, "recipients.clear", domain, f"removed={count}")
    return count


# -- checks --------------------------------------------------------------------------------


def _router(config: Config) -> Router:
    return Router(DnsCache(config.delivery.resolver), outbound_identity(config.delivery))


def _prober(config: Config) -> SmtpProber:
    return SmtpProber(
        local_hostname=config.smtp.hostname,
        timeout=config.delivery.connect_timeout,
        ca_file=config.delivery.ca_file,
        identity=outbound_identity(config.delivery),
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
        await record_action(
            store,
            actor,
            "check.dns",
            domain_name,
            f"mx={report.mx_at} spooler={spooler_host} verdict={'go' if report.go else 'no-go'}",
        )
        await _dns_stage(store, domain, report.mx_at, actor)
    return report


async def _dns_stage(store: Store, domain: Domain, mx_at: str, actor: str) -> None:
    """MX seen at the spooler (before) or at the target (after the release): a stage event."""
    status = (await show_domain(store, domain.name)).status
    events = await store.stage_events([domain.name])
    reached = stages.after_dns_check(stages.stage(domain, status, events), mx_at, status)
    await stages.record(store, domain.name, reached, actor=actor, detail=f"mx={mx_at}")


@dataclass(frozen=True, slots=True)
class RouteCheck:
    domain: Domain
    hops: list[HopVerdict]
    error: str = ""
    client_cert: ClientCertificate | None = None
    """The TLS client certificate the probes offered ([delivery] tls_client_cert)."""

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
            judge_hop(report, domain.tls, config.smtp.max_message_size, prober.identity)
            for report in reports
        ]
        result = RouteCheck(domain, verdicts, client_cert=prober.identity.client_cert)
    await record_action(
        store,
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

    @property
    def not_ready(self) -> int:
        """Refused for good (5xx at RCPT): create them at the target."""
        return sum(1 for item in self.results if item.state == "not ready")

    @property
    def unknown(self) -> int:
        """No verdict (4xx at RCPT, or a 4xx or connection failure before it): check again."""
        return sum(1 for item in self.results if item.state == "unknown")


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
            if exc.permanent:
                raise OperationError(
                    f"cannot resolve the route of {domain_name}: {exc}; 'mxspool check route "
                    f"{domain_name}' shows more",
                    exit_code=1,
                ) from None
            # A temporary DNS failure says nothing about the recipients: unknown, not failed.
            results = not_checked(addresses, f"cannot resolve the route now: {exc}")
        else:
            results = await probe_recipients(
                _prober(config),
                hops,
                domain.tls,
                addresses,
                concurrency=concurrency,
                rate=per_second,
            )
    check = RecipientsCheck(domain, results)
    # Per recipient, for the release plan's readiness (``domain release --dry-run``); this
    # run replaces the last one's results.
    checked_at = time.time()
    await store.record_recipient_checks(
        domain_name,
        [RecipientCheck(item.address, item.state, item.reply, checked_at) for item in results],
    )
    await record_action(
        store,
        actor,
        "check.recipients",
        domain_name,
        f"checked={len(results)} ready={check.ready} not_ready={check.not_ready} "
        f"unknown={check.unknown}",
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
    return await migration_runbook(
        store,
        config,
        [name],
        spooler_host=spooler_host,
        spooler_ip=spooler_ip,
        target_host=target_host,
        fmt=fmt,
        actor=actor,
    )


async def migration_runbook(
    store: Store,
    config: Config,
    domains: Sequence[str],
    *,
    spooler_host: str,
    spooler_ip: str,
    source_tenant: str | None = None,
    target_tenant: str | None = None,
    source_initial: str | None = None,
    target_initial: str | None = None,
    target_host: str | None = None,
    migration: str | None = None,
    fmt: str = "md",
    actor: str = "cli",
) -> str:
    """The runbook (Markdown, or PowerShell with ``fmt="ps1"``) for a migration of DOMAINS.

    One domain and no tenant given: the target-only runbook of one domain, as before. Several
    domains, or any tenant option: the tenant-to-tenant runbook, both tenants from the days
    before to the clean-up (:mod:`mxspool.migrate.tenantplan`). Each domain is recorded in the
    audit log as planned (the checklist's first stage).
    """
    names = list(dict.fromkeys(normalize_domain(name) for name in domains))
    if not names:
        raise OperationError("no domain given; name at least one domain to plan")
    if len(names) > MAX_DOMAINS:
        raise OperationError(
            f"{len(names)} domains: a runbook covers at most {MAX_DOMAINS}; split the migration"
        )
    try:
        ip = check_spooler_ip(spooler_ip)
    except RunbookError as exc:
        raise OperationError(str(exc)) from None
    spooler = parse_route(spooler_host).host
    target = parse_route(target_host).host if target_host else None
    if target and len(names) > 1:
        raise OperationError(
            "--target-host names one domain's MX host; with several domains leave it out: the "
            "runbook shows how to read each domain's host from the target tenant"
        )
    try:
        cert_name = certificate_name(config.delivery)
    except IdentityError as exc:
        raise OperationError(str(exc)) from None
    arc = _arc_sealing(config)
    seen = []
    for domain in names:
        hosts, ttl, error = await dnscheck.current_mx(domain, config.delivery.resolver)
        seen.append(DomainNow(domain, tuple(hosts), ttl, error, target))
    tenants = (source_tenant, target_tenant, source_initial, target_initial, migration)
    if len(names) == 1 and not any(tenants):
        now = seen[0]
        inputs = Inputs(
            now.name, spooler, ip, target, now.mx_hosts, now.mx_ttl, now.lookup_error,
            cert_name, arc,
        )  # fmt: skip
        text = render_ps1(inputs) if fmt == "ps1" else render_markdown(inputs)
    else:
        plan = Migration(
            tuple(seen),
            spooler,
            ip,
            _label(source_tenant, "source", "--source-tenant"),
            _label(target_tenant, "target", "--target-tenant"),
            _initial(source_initial, "--source-initial"),
            _initial(target_initial, "--target-initial"),
            cert_name,
            arc,
            migration,
        )
        text = tenant_ps1(plan) if fmt == "ps1" else tenant_markdown(plan)
    # The checklist's "planned" stage is this entry, one per domain.
    for domain in names:
        await record_action(
            store, actor, "runbook", domain, f"spooler={spooler} ip={ip} target={target or '-'}"
        )
    return text


MAX_LABEL = 64


def _label(value: str | None, default: str, option: str) -> str:
    """A tenant's label as the runbook prints it: short, one line, printable."""
    if value is None:
        return default
    label = value.strip()
    if not label or len(label) > MAX_LABEL or not label.isprintable():
        raise OperationError(
            f"{option} {value!r}: give a short printable name for the tenant "
            f"(1 to {MAX_LABEL} characters), e.g. contoso-a"
        )
    return label


_INITIAL_SUFFIXES = (".onmicrosoft.com", ".onmicrosoft.us", ".partner.onmschina.cn")


def _initial(value: str | None, option: str) -> str | None:
    """A tenant's initial domain (NAME.onmicrosoft.com), or None when not given."""
    if value is None:
        return None
    domain = normalize_domain(value)
    if not domain.endswith(_INITIAL_SUFFIXES) or domain.count(".") < 2:
        raise OperationError(
            f"{option} {value!r} is not a tenant's initial domain; give the NAME.onmicrosoft.com "
            "domain shown in the Microsoft 365 admin center (Settings > Domains)"
        )
    return domain


def _arc_sealing(config: Config) -> ArcSealing | None:
    """The runbook's ARC step inputs when ``[arc]`` is configured (the key is read for its
    public half, the DNS record)."""
    arc = config.arc
    if not arc.enabled:
        return None
    try:
        key = load_key(arc.key_file)
    except ArcKeyError as exc:
        raise OperationError(str(exc)) from None
    return ArcSealing(arc.domain, arc.selector, zone_line(arc.selector, arc.domain, key))


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
    await record_action(
        store, actor, "probe", domain_name, f"id={sent.queue_id} rcpt={rcpt} state={state}"
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
    await record_action(
        store, actor, "probe.discard", domain, f"messages={len(ids)} recipients={count}"
    )
    return count
