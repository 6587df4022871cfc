"""The notification parts that need no server: the detector's edges and hysteresis, node
presence timing, the signature, and the dispatcher's bounded, never-blocking queue."""

from __future__ import annotations

import asyncio
import time

from mxspool.config import Config
from mxspool.notify.detector import Detector
from mxspool.notify.dispatcher import Dispatcher
from mxspool.notify.events import Event
from mxspool.notify.nodes import NodeWatch
from mxspool.notify.signature import sign, verify
from mxspool.notify.targets import RetryPolicy, SendFailed
from mxspool.store.base import Domain, DomainMode, DomainStatus
from tests.waiting import eventually


def status(domain: str, **counts: int) -> DomainStatus:
    return DomainStatus(domain=domain, mode=DomainMode.HOLD, **counts)


def names(events: list[Event]) -> list[str]:
    return [event.event for event in events]


def test_backlog_hysteresis_per_threshold() -> None:
    detector = Detector("n1", [10, 100], disk_warning=0)
    domains: list[Domain] = []
    assert detector.observe([status("a.test", held=9)], domains, None, 1.0) == []
    (event,) = detector.observe([status("a.test", held=10)], domains, None, 2.0)
    assert (event.event, event.domain, event.details["threshold"]) == ("backlog_high", "a.test", 10)
    assert detector.observe([status("a.test", held=50)], domains, None, 3.0) == []
    assert detector.observe([status("a.test", held=9)], domains, None, 4.0) == []  # not < 90%
    assert detector.observe([status("a.test", held=10)], domains, None, 5.0) == []
    assert detector.observe([status("a.test", pending=8)], domains, None, 6.0) == []  # re-armed
    again = detector.observe([status("a.test", pending=5, delivering=95)], domains, None, 7.0)
    assert sorted(e.details["threshold"] for e in again) == [10, 100]


def test_parked_once_until_cleared_and_disk_low_hysteresis() -> None:
    detector = Detector("n1", [1000], disk_warning=100)
    assert names(detector.observe([status("a.test", parked=1)], [], 99, 1.0)) == [
        "parked",
        "disk_low",
    ]
    assert detector.observe([status("a.test", parked=5)], [], 105, 2.0) == []  # < 110% of 100
    assert detector.observe([status("a.test")], [], 111, 3.0) == []  # both re-armed now
    assert names(detector.observe([status("a.test", parked=2)], [], 50, 4.0)) == [
        "parked",
        "disk_low",
    ]


def test_release_started_and_finished_with_totals() -> None:
    detector = Detector("n1", [1000], disk_warning=0)
    held = Domain("a.test", DomainMode.HOLD, ())
    assert detector.observe([status("a.test", held=3)], [held], None, 1.0) == []
    released = Domain("a.test", DomainMode.RELAY, (), released_at=10.0)
    (started,) = detector.observe([status("a.test", pending=3)], [released], None, 11.0)
    assert started.event == "release_started" and started.details["to_deliver"] == 3
    assert (
        detector.observe([status("a.test", pending=1, delivered=2)], [released], None, 12.0) == []
    )
    done = status("a.test", delivered=2, parked=1, bounced=0, discarded=0)
    events = detector.observe([done], [released], None, 20.0)
    assert names(events) == ["release_finished", "parked"]
    details = events[0].details
    assert (details["delivered"], details["parked"], details["took_s"]) == (2, 1, 10.0)
    # Same release seen by another node (or after a restart): same event ids.
    other = Detector("n2", [1000], disk_warning=0)
    other.observe([], [held], None, 1.0)
    (twin,) = other.observe([status("a.test", pending=3)], [released], None, 11.5)
    assert twin.id == started.id


def test_release_under_way_at_start_is_followed_not_announced() -> None:
    detector = Detector("n1", [1000], disk_warning=0)
    released = Domain("a.test", DomainMode.RELAY, (), released_at=10.0)
    assert detector.observe([status("a.test", pending=3)], [released], None, 11.0) == []
    (event,) = detector.observe([status("a.test", delivered=3)], [released], None, 12.0)
    assert event.event == "release_finished"


def test_node_lost_after_timeout_and_again_only_after_return() -> None:
    watch = NodeWatch("n1", timeout=30.0)
    assert watch.observe({"n1", "n2"}, 0.0) == []
    assert watch.observe({"n1"}, 29.0) == []
    (lost,) = watch.observe({"n1"}, 31.0)
    assert lost.event == "node_lost" and lost.details["lost_node"] == "n2"
    assert watch.observe({"n1"}, 100.0) == []
    assert watch.observe({"n1", "n2"}, 101.0) == []
    assert [e.details["lost_node"] for e in watch.observe({"n1"}, 140.0)] == ["n2"]


def test_signature_covers_timestamp_and_body() -> None:
    now = int(time.time())
    signature = sign(b"k", now, b"{}")
    assert signature.startswith("sha256=") and len(signature) == 7 + 64
    assert verify(b"k", str(now), b"{}", signature)
    assert not verify(b"k", str(now), b"{ }", signature)
    assert not verify(b"k", str(now - 1000), b"{}", sign(b"k", now - 1000, b"{}"))  # a replay
    assert not verify(b"k", "soon", b"{}", signature)


def test_config_rejects_half_targets() -> None:
    import pydantic
    import pytest

    for entry in (
        {"url": "http://h/x"},  # no secret
        {"url": "ftp://h/x", "secret": "s"},
        {"to": "a@b.c"},  # no relay
        {"url": "http://h/x", "secret": "s", "to": "a@b.c", "relay": "r:25"},
        {"url": "http://h/x", "secret": "s", "events": ["nonsense"]},
    ):
        with pytest.raises(pydantic.ValidationError):
            Config.model_validate({"notify": [entry]})


class _Stuck:
    """A target whose attempts never finish (a receiver that hangs)."""

    kind = "webhook"
    backlog_threshold = 1

    def __init__(self) -> None:
        self.name = "stuck"
        self.policy = RetryPolicy(3, 0.01, 60.0)
        self.started: list[str] = []

    def wants(self, event: Event) -> bool:
        return True

    async def attempt(self, event: Event) -> str:
        self.started.append(event.id)
        await asyncio.Event().wait()
        raise SendFailed("unreachable", retry=True)

    async def close(self) -> None:
        return None


async def test_dispatcher_bounded_drops_oldest_and_never_blocks() -> None:
    target = _Stuck()
    dispatcher = Dispatcher([target], queue_size=3)
    dispatcher.start()
    try:
        events = [Event("parked", "n1", f"e{n}", f"d{n}.test", at=float(n)) for n in range(10)]
        dispatcher.put(events[0])
        await eventually(lambda: target.started, 5, "the first event in flight")
        started = time.monotonic()
        for event in events[1:]:
            dispatcher.put(event)  # returns at once although the target is stuck
        assert time.monotonic() - started < 0.5
        (lane,) = dispatcher.lanes
        assert [e.summary for e in lane.queue] == ["e7", "e8", "e9"]  # the newest kept
        assert target.started == [events[0].id]
    finally:
        await dispatcher.close()
