"""Wires the parts of one mxspool node on one event loop; signals; graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable

from mxspool import liveness, maillog, sdnotify
from mxspool.config import Config, ConfigError, split_host_port
from mxspool.intake.auth import Authenticator, forget_owed
from mxspool.intake.domains import DomainTable
from mxspool.intake.listener import Intake
from mxspool.intake.ptr import ReverseNames
from mxspool.store import MissingDependency, Store, StoreError, create_store, is_postgres
from mxspool.store.nodename import NodeName
from mxspool.store.serverlock import SpoolLock
from mxspool.store.sqlite import sqlite_path
from mxspool.tls.certinfo import CertificateError
from mxspool.tls.serving import ServerTls

log = logging.getLogger("mxspool")

WORKER_START_WAIT = 10.0
"""Seconds serve waits for the verification workers before it opens its listeners anyway."""

Component = Callable[[Config, Store, DomainTable], Awaitable[None]]
"""Something else that runs beside the intake until cancelled (delivery, admin plane)."""


def _default_components() -> list[Component]:
    from mxspool.admin import admin_component
    from mxspool.delivery.scheduler import delivery_component
    from mxspool.migrate.migration import component as migration_component
    from mxspool.notify.component import notify_component
    from mxspool.retention import retention_component

    # migration_component: scheduled releases (`migration release --at`) and stage events.
    return [
        delivery_component,
        admin_component,
        notify_component,
        migration_component,
        retention_component,  # [store] purge_delivered_after
    ]


extra_components: list[Component] = _default_components()


def _spill_dir(config: Config) -> str | None:
    """Temporary DATA files go next to the spool so a rename-free copy stays on one disk."""
    if config.store.url.startswith("sqlite:///"):
        return str(sqlite_path(config.store.url).parent / "tmp")
    return None


def _listening_sockets(addresses: list[str]) -> list[socket.socket]:
    """Every listener's socket, bound and listening, before any of them is served.

    Binding them all before the first await means that once any listener answers, the kernel
    already queues connections on every other one: a client (or a test, or a health check)
    that has seen one address greet can reach the rest. Creating them one by one with
    ``loop.create_server`` yields between them, so the first could greet while a later one
    still refused connections. A bind failure closes what was opened and names the address.
    """
    sockets: list[socket.socket] = []
    try:
        for address in addresses:
            host, port = split_host_port(address)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                # SO_REUSEADDR, and IPV6_V6ONLY on an IPv6 address, as asyncio would set them.
                sockets.append(socket.create_server((host, port), family=family, backlog=1024))
            except OSError as exc:
                raise StoreError(
                    f"cannot listen on {address}: {exc.strerror or exc}; is another server "
                    "using that port? Change [smtp] listen in the configuration"
                ) from exc
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def start_listeners(config: Config, intake: Intake) -> list[asyncio.Server]:
    loop = asyncio.get_running_loop()
    servers = []
    for address, sock in zip(
        config.smtp.listen, _listening_sockets(config.smtp.listen), strict=True
    ):
        servers.append(await loop.create_server(intake.protocol_factory, sock=sock, backlog=1024))
        log.info("SMTP listening on %s", address)
    return servers


async def run(
    config: Config,
    ready: asyncio.Event | None = None,
    notifier: sdnotify.Notifier | None = None,
) -> None:
    """Run a node until cancelled or signalled; tells systemd (``notifier``) READY=1 once the
    store is open and every SMTP listener accepts, STOPPING=1 when it starts shutting down.
    A component that fails stops the node too: then ComponentFailed, once it has shut down."""
    notifier = notifier or sdnotify.Notifier(None)
    store = create_store(config.store.url)
    lock = _spool_lock(config)  # restore refuses while it is held
    try:
        await store.open()
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    tasks: list[asyncio.Task[None]] = []
    servers: list[asyncio.Server] = []
    intake: Intake | None = None
    name: NodeName | None = None
    failed: list[str] = []
    try:
        if is_postgres(config.store.url):  # one running node per name (store.nodename)
            name = NodeName(config.store.url, config.smtp.hostname)
            await name.claim()
            tasks.append(asyncio.create_task(_guard(name.hold(), stop, failed), name="node name"))
        domains = DomainTable()
        await domains.refresh(store)
        tls = ServerTls(config)  # certificate reloads (files, SIGHUP) and ACME
        ssl_context = tls.initial_context()
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, tls.reload_now)
        intake = Intake(
            config.smtp,
            store,
            domains,
            min_free_space=config.store.min_free_space,
            spill_dir=_spill_dir(config),
            ssl_context=ssl_context,
            auth=Authenticator.from_config(config, store),
            names=ReverseNames.from_config(config),
        )
        if intake.auth is not None:  # its workers; messages left without a verdict
            # The workers are up before the listeners open (started in a thread: the loop runs
            # meanwhile), so the first relayed message does not wait for them.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(intake.auth.pool.warm(), WORKER_START_WAIT)
            tasks.append(asyncio.create_task(intake.auth.run(time.time()), name="auth"))
        else:
            await forget_owed(store, config.smtp.hostname)
        tasks.append(asyncio.create_task(domains.follow(store), name="domains"))
        for work in tls.start(intake.set_ssl_context):
            tasks.append(asyncio.create_task(_guard(work, stop, failed)))
        for component in extra_components:
            tasks.append(
                asyncio.create_task(_guard(component(config, store, domains), stop, failed))
            )
        # Every component takes its first step before SMTP opens: the admin plane's socket
        # listens from then on (admin.server), so whoever sees a greeting, or READY=1, can
        # reach /readyz.
        await asyncio.sleep(0)
        if not stop.is_set():  # else a component failed at once: SMTP never opens
            servers = await start_listeners(config, intake)
            liveness.NODE.listeners = lambda: bool(servers) and all(s.is_serving() for s in servers)
            log.info("mxspool ready (store %s)", config.store.url)
            notifier.ready(f"accepting mail on {', '.join(config.smtp.listen)}")
            watchdog = sdnotify.start_watchdog(notifier)
            if watchdog is not None:
                tasks.append(watchdog)
            if ready is not None:
                ready.set()
        await stop.wait()
        log.info("shutting down")
    finally:
        notifier.stopping("shutting down")
        for server in servers:
            server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if intake is not None:
            # Sessions mid-commit finish their commit (their 250 may be lost; the client retries
            # and a duplicate is possible, never a loss); everything else is cut.
            await asyncio.sleep(0)
            intake.close_all()
            if intake.auth is not None:
                # Checks in progress are dropped (judged by the background pass at the next
                # start); verdicts already computed are written; the worker processes end.
                intake.auth.close()
                await intake.auth.drain()
        await store.close()
        if name is not None:
            await name.close()
        liveness.NODE.listeners = None
        if lock is not None:
            lock.release()
    if failed:
        raise ComponentFailed(
            f"the node stopped because a component failed: {failed[0]} (the log above has "
            "the details)"
        )


def _spool_lock(config: Config) -> SpoolLock | None:
    """A SQLite spool's serve lock, taken (see store.serverlock); None for PostgreSQL."""
    if not config.store.url.startswith("sqlite:///"):
        return None
    lock = SpoolLock(sqlite_path(config.store.url), "mxspool serve")
    lock.acquire()
    return lock


class ComponentFailed(Exception):
    """A component of the node stopped with an error, so the node stopped: ``serve`` exits
    with status 1 (a service manager's ``Restart=on-failure`` starts it again)."""


async def _guard(work: Awaitable[None], stop: asyncio.Event, failed: list[str]) -> None:
    """Run a component; if it fails, log it, note it in ``failed`` and stop the node."""
    try:
        await work
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("a component stopped with an error; stopping the node")
        failed.append(str(exc) or type(exc).__name__)
        stop.set()


def _install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def serve(config: Config) -> int:
    """Run ``mxspool serve``; returns the process exit status."""
    logging.basicConfig(
        level=os.environ.get("MXSPOOL_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from mxspool.admin import AdminConfigError, check_config
    from mxspool.delivery.arc import ArcSealer
    from mxspool.delivery.arckey import ArcKeyError
    from mxspool.delivery.identity import IdentityError, outbound_identity
    from mxspool.notify.build import build_targets

    try:
        check_config(config)
        build_targets(config)  # [[notify]] secret_file readable
        outbound_identity(config.delivery)  # source_address local, client cert and key usable
        ArcSealer.from_config(config)  # [arc] key_file readable, an RSA key
    except (AdminConfigError, IdentityError, ArcKeyError, ConfigError) as exc:
        log.error("%s", exc)
        return 2
    try:
        maillog.start(config.log)  # the mail log's writer thread (mxspool.maillog)
    except maillog.LogFileError as exc:
        log.error("%s", exc)
        return 2
    flavour = _install_uvloop()
    log.info("event loop: %s; configuration: %s", flavour, config.source)
    notifier = sdnotify.Notifier.from_environ()
    try:
        asyncio.run(run(config, notifier=notifier))
    except MissingDependency as exc:
        log.error("%s", exc)
        notifier.status(str(exc))
        return 2
    except CertificateError as exc:
        log.error("STARTTLS cannot start: %s; fix [smtp] tls_cert / tls_key", exc)
        notifier.status(str(exc))
        return 2
    except (StoreError, ComponentFailed) as exc:
        log.error("%s", exc)
        notifier.status(str(exc))
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        maillog.stop()  # what is queued is written
    return 0
