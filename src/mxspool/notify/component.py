"""The notifications inside ``mxspool serve``: a background task that looks at the store
every ``[notifications] interval`` and hands new events to the dispatcher.

Why poll the store rather than hook the code paths: every fact is in the store already
(counters, O(domains) to read; a domain's ``released_at``), and the CLI is another process:
``mxspool domain release`` writes the store and exits, and serve sees the release here, on
any node. Intake and delivery are untouched, so no notification can slow them down; the
detector costs one ``status`` and one ``list_domains`` per interval.

With PostgreSQL only the leader (``store.presence``) looks and sends, so each event is sent
once per cluster; a node that becomes leader starts from a fresh baseline (a condition still
true is told once more then). With SQLite the single node always leads.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mxspool.config import Config
from mxspool.notify.build import build_targets
from mxspool.notify.detector import Detector
from mxspool.notify.dispatcher import Dispatcher
from mxspool.notify.nodes import NodeWatch
from mxspool.store import is_postgres
from mxspool.store.base import Store
from mxspool.store.presence import Presence

log = logging.getLogger("mxspool.notify")


def disk_warning(config: Config) -> int:
    """[notifications] disk_warning, or twice [store] min_free_space."""
    return config.notifications.disk_warning or 2 * config.store.min_free_space


def node_timeout(config: Config) -> float:
    return config.notifications.node_timeout or 3 * config.delivery.lease


class Notifications:
    """The detector loop and the dispatcher of one node."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.node = config.smtp.hostname
        self.targets = build_targets(config)
        self.dispatcher = Dispatcher(self.targets, config.notifications.queue_size)
        postgres = is_postgres(config.store.url)
        self.presence = Presence(config.store.url, self.node) if postgres else None
        self.detector: Detector | None = None
        self.nodes: NodeWatch | None = None

    def _fresh(self) -> None:
        thresholds = {target.backlog_threshold for target in self.targets}
        self.detector = Detector(self.node, thresholds, disk_warning(self.config))
        self.nodes = NodeWatch(self.node, node_timeout(self.config))

    async def step(self, now: float) -> None:
        """One look at the store (when this node leads)."""
        if self.presence is not None and not await self.presence.lead():
            self.detector = None  # another node speaks; start afresh if we take over
            return
        if self.detector is None or self.nodes is None:
            self._fresh()
        assert self.detector is not None and self.nodes is not None
        statuses = await self.store.status(now)
        domains = await self.store.list_domains()
        events = self.detector.observe(statuses, domains, self.store.free_bytes(), now)
        if self.presence is not None:
            events += self.nodes.observe(await self.presence.seen(), now)
        for event in events:
            log.info("notify: %s %s: %s", event.event, event.domain or "-", event.summary)
            self.dispatcher.put(event)

    async def run(self) -> None:
        self.dispatcher.start()
        interval = self.config.notifications.interval
        try:
            while True:
                try:
                    await self.step(time.time())
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the store is away: notifications wait, mail does not
                    log.warning("notifications: looking at the store failed: %s", exc)
                await asyncio.sleep(interval)
        finally:
            await self.dispatcher.close()
            if self.presence is not None:
                await self.presence.close()


async def notify_component(config: Config, store: Store, domains: object = None) -> None:
    """``service.extra_components`` entry: run the notifications until cancelled."""
    if not config.notify:
        return
    await Notifications(config, store).run()
