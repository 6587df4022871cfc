"""Wires the parts of one mxspool node on one event loop; signals; graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable

from mxspool.config import Config, split_host_port
from mxspool.intake.domains import DomainTable
from mxspool.intake.listener import Intake, server_ssl_context
from mxspool.intake.spf import SpfChecker
from mxspool.store import Store, StoreError, create_store
from mxspool.store.sqlite import sqlite_path

log = logging.getLogger("mxspool")

Component = Callable[[Config, Store, DomainTable], Awaitable[None]]
"""Something else that runs beside the intake until cancelled (delivery, admin plane)."""


def _default_components() -> list[Component]:
    from mxspool.admin import admin_component
    from mxspool.delivery.scheduler import delivery_component

    return [delivery_component, admin_component]


extra_components: list[Component] = _default_components()


def _spill_dir(config: Config) -> str | None:
    """Temporary DATA files go next to the spool so a rename-free copy stays on one disk."""
    if config.store.url.startswith("sqlite:///"):
        return str(sqlite_path(config.store.url).parent / "tmp")
    return None


async def start_listeners(config: Config, intake: Intake) -> list[asyncio.Server]:
    loop = asyncio.get_running_loop()
    servers = []
    for address in config.smtp.listen:
        host, port = split_host_port(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            server = await loop.create_server(
                intake.protocol_factory,
                host=host,
                port=port,
                family=family,
                reuse_address=True,
                backlog=1024,
            )
        except OSError as exc:
            raise StoreError(
                f"cannot listen on {address}: {exc.strerror or exc}; is another server using "
                "that port? Change [smtp] listen in the configuration"
            ) from exc
        servers.append(server)
        log.info("SMTP listening on %s", address)
    return servers


async def run(config: Config, ready: asyncio.Event | None = None) -> None:
    """Run a node until cancelled or signalled."""
    store = create_store(config.store.url)
    await store.open()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    tasks: list[asyncio.Task[None]] = []
    servers: list[asyncio.Server] = []
    intake: Intake | None = None
    try:
        domains = DomainTable()
        await domains.refresh(store)
        ssl_context = None
        if config.smtp.tls_enabled:
            ssl_context = server_ssl_context(config.smtp.tls_cert, config.smtp.tls_key)
        intake = Intake(
            config.smtp,
            store,
            domains,
            min_free_space=config.store.min_free_space,
            spill_dir=_spill_dir(config),
            ssl_context=ssl_context,
            spf=SpfChecker.from_config(config),
        )
        tasks.append(asyncio.create_task(domains.follow(store), name="domains"))
        for component in extra_components:
            tasks.append(asyncio.create_task(_guard(component(config, store, domains))))
        servers = await start_listeners(config, intake)
        log.info("mxspool ready (store %s)", config.store.url)
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("shutting down")
    finally:
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
            if intake.spf is not None:
                intake.spf.close()  # queued SPF checks are dropped, not run at exit
        await store.close()


async def _guard(work: Awaitable[None]) -> None:
    try:
        await work
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("a component stopped with an error; stopping the node")
        os.kill(os.getpid(), signal.SIGTERM)


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

    try:
        check_config(config)
    except AdminConfigError as exc:
        log.error("%s", exc)
        return 2
    flavour = _install_uvloop()
    log.info("event loop: %s; configuration: %s", flavour, config.source)
    try:
        asyncio.run(run(config))
    except StoreError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
