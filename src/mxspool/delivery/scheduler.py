"""The delivery component: find domains with due mail and keep one drain running for each.

The store is the only source of truth, so changes made by another process or node (release,
retry, route, new relay mail) are found two ways. The store's notifications wake the scheduler
at once: ``mail:<domain>`` starts that domain's drain without a query, ``domains`` makes the
running drains re-read their domain (a ``hold`` or a new ``--rate`` applies now) and looks for
due mail, ``resync`` (the listener reconnected and may have missed some) looks for due mail.
Polling ``due_domains`` at least every ``POLL_INTERVAL`` seconds stays the fallback for lost
notifications and for stores that have none (SQLite: one node), which keeps "new mail in relay
mode leaves within one second of its 250". A ``queue flush`` (``flush:<domain>``, or the
store's flush generation polled the same way) makes the flushed domains' destinations be
tried now: their dead state (``health``) is forgotten before their rows are looked for.
``wake()`` lets code in the same process skip the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time

from mxspool import liveness
from mxspool.config import Config
from mxspool.delivery.arc import ArcSealer
from mxspool.delivery.dnscache import DnsCache
from mxspool.delivery.engine import Drain, DrainSettings
from mxspool.delivery.health import DestinationHealth
from mxspool.delivery.identity import outbound_identity
from mxspool.delivery.outcomes import RetryPolicy
from mxspool.delivery.routing import Router
from mxspool.delivery.smtpclient import SmtpConnector
from mxspool.delivery.tenants import TenantPacing
from mxspool.delivery.transport import Connector
from mxspool.store.base import FLUSH_ALL, Store, StoreError

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.25
LISTEN_RETRY = 1.0


def new_owner_id() -> str:
    """Names this process in lease columns; random so a restarted process is a new owner."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Scheduler:
    def __init__(
        self,
        store: Store,
        router: Router,
        connector: Connector,
        settings: DrainSettings,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self._store = store
        self._router = router
        self._connector = connector
        self._settings = settings
        self._poll_interval = poll_interval
        self._wakeup = asyncio.Event()
        self._drains: dict[str, asyncio.Task[None]] = {}
        self._running: dict[str, Drain] = {}
        self.health = DestinationHealth(settings.dead_after_failures)
        """Which destinations this process holds for dead; shared by every drain."""
        self._flush_generation: int | None = None
        """The store's flush generation last seen (None: not read yet)."""
        self.tenants = TenantPacing(store)
        """Domains of one target tenant share one pacing bucket (``delivery.tenants``)."""

    @classmethod
    def from_config(cls, config: Config, store: Store) -> Scheduler:
        delivery = config.delivery
        settings = DrainSettings(
            owner=new_owner_id(),
            concurrency=delivery.concurrency,
            default_rate=delivery.rate,
            policy=RetryPolicy(tuple(delivery.retry_schedule), delivery.max_age),
            lease_seconds=delivery.lease,
            dead_after_failures=delivery.dead_after_failures,
            # The release gate: mail leaves with its arrival verdict stored (intake/auth.py).
            auth_wait=config.smtp.authentication_timeout if config.smtp.authentication else 0.0,
            # SQLite is one node: the same limits kept in memory, without store round trips.
            shared_pacing=not config.store.url.startswith("sqlite:"),
            sealer=ArcSealer.from_config(config),
            per_recipient_hourly_limit=delivery.per_recipient_hourly_limit,
        )
        identity = outbound_identity(delivery)  # IdentityError (a ConfigError) when unusable
        connector = SmtpConnector(
            local_hostname=config.smtp.hostname,
            connect_timeout=delivery.connect_timeout,
            ca_file=delivery.ca_file,
            identity=identity,
        )
        return cls(store, Router(DnsCache(delivery.resolver), identity), connector, settings)

    def wake(self) -> None:
        """Look for due mail now instead of at the next poll."""
        self._wakeup.set()

    async def run(self) -> None:
        """Until cancelled; cancelling stops the drains (their unattempted claims go back)."""
        listener = asyncio.create_task(self._listen(), name="delivery-notifications")
        try:
            while True:
                await self.poll_once()
                liveness.NODE.beat("delivery")  # GET /readyz: the loop turns
                # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a cancellation
                # that coincides with its timeout, and the engine would never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_interval):
                        await self._wakeup.wait()
                self._wakeup.clear()
        finally:
            listener.cancel()
            drains = list(self._drains.values())
            for task in drains:
                task.cancel()
            await asyncio.gather(listener, *drains, return_exceptions=True)

    async def _listen(self) -> None:
        """Turn the store's notifications into wake-ups; polling covers any gap."""
        while True:
            try:
                async for note in self._store.notifications():
                    self._notified(note)
            except StoreError as exc:
                log.warning("delivery: store notifications lost (%s); polling meanwhile", exc)
            except Exception:
                log.exception("delivery: store notifications failed; polling meanwhile")
            await asyncio.sleep(LISTEN_RETRY)

    def _notified(self, note: str) -> None:
        if note.startswith("mail:"):
            name = note.removeprefix("mail:").lower()
            if name and not self._start(name):
                # A drain is running; it may be finishing just now: look again when it ends.
                drain = self._running.get(name)
                if drain is not None:
                    drain.more_mail()
            return
        if note.startswith("flush:"):
            self._forget(note.removeprefix("flush:").lower())
            return
        if note == "domains":
            for drain in self._running.values():
                drain.domain_changed()
        self._wakeup.set()

    def _forget(self, name: str) -> None:
        """``queue flush`` of ``name`` (``FLUSH_ALL``: every domain): try now, dead or not."""
        names = self.health.domains() if name == FLUSH_ALL else [name]
        if name == FLUSH_ALL:
            names += list(self._running)
        for item in dict.fromkeys(names):
            if self.health.forget(item):
                log.info("%s: queue flushed; probing the destination now", item)
            drain = self._running.get(item)
            if drain is not None:
                drain.flushed()
        self._wakeup.set()

    async def _poll_flushes(self) -> None:
        """Flushes by another process whose notification was lost, or a store without any
        (SQLite): one primary-key read a poll; the flushed names only when it moved."""
        generation = await self._store.flush_generation()
        if self._flush_generation is not None and generation != self._flush_generation:
            for name in await self._store.flushed_domains(self._flush_generation):
                self._forget(name)
        self._flush_generation = generation

    async def poll_once(self) -> None:
        try:
            await self.tenants.refresh()
            # Before looking for due mail: rows a flush made due are attempted, not deferred
            # again for a destination held for dead (the flush is recorded before its rows).
            await self._poll_flushes()
            due = await self._store.due_domains(time.time())
        except StoreError as exc:
            log.warning("delivery: cannot read the queue: %s", exc)
            return
        for name in due:
            self._start(name)

    def _start(self, name: str) -> bool:
        """Start a drain for ``name`` unless one runs; True when one was started."""
        task = self._drains.get(name)
        if task is not None and not task.done():
            return False
        drain = Drain(
            name,
            self._store,
            self._router,
            self._connector,
            self._settings,
            health=self.health,
            group=self.tenants.group(name),
        )
        self._running[name] = drain
        self._drains[name] = asyncio.create_task(self._drain(name, drain), name=f"drain-{name}")
        return True

    async def _drain(self, name: str, drain: Drain) -> None:
        try:
            await drain.run()
        except StoreError as exc:
            log.warning("delivery to %s paused: %s", name, exc)
        except Exception:
            log.exception("delivery to %s failed", name)
        finally:
            if self._running.get(name) is drain:
                del self._running[name]
            # Finished: there may be more due right away (new mail arrived meanwhile).
            self._wakeup.set()


async def delivery_component(config: Config, store: Store, domains: object = None) -> None:
    """``service.extra_components`` entry: run the delivery engine until cancelled."""
    await Scheduler.from_config(config, store).run()
