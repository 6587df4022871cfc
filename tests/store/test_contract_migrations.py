"""Store contract for migrations as objects and stage events (issue 12). Same fixtures as
test_contract.py: every backend, a fresh store per test."""

from __future__ import annotations

import time

import pytest

from mxspool.store.base import (
    AuditEntry,
    Conflict,
    DomainChanges,
    DomainMode,
    DomainsTransition,
    Migration,
    MigrationChanges,
    NotFound,
    StageEvent,
    Store,
)
from tests.store.test_contract import add_domain, make_message

DOMAINS = ("a.test", "b.test", "c.test")


async def three_domains(store: Store) -> None:
    for name in DOMAINS:
        await add_domain(store, name)


async def test_create_list_get_and_remove(store: Store) -> None:
    await three_domains(store)
    before = await store.domains_generation()
    await store.add_migration(
        Migration("move", ("a.test", "b.test"), "old", "new", created_at=100.0)
    )
    assert await store.domains_generation() != before
    got = await store.get_migration("move")
    assert got is not None
    assert (got.domains, got.source_tenant, got.target_tenant) == (
        ("a.test", "b.test"),
        "old",
        "new",
    )
    assert got.created_at == 100.0 and got.release_at is None and got.release_rate is None
    await store.add_migration(Migration("empty"))
    assert [m.name for m in await store.list_migrations()] == ["empty", "move"]
    assert (await store.get_migration("empty")) == Migration(
        "empty", created_at=pytest.approx(time.time(), abs=60)
    )  # type: ignore[arg-type]
    with pytest.raises(Conflict, match="already exists"):
        await store.add_migration(Migration("move"))
    await store.remove_migration("move")
    assert await store.get_migration("move") is None
    with pytest.raises(NotFound, match="no migration move"):
        await store.remove_migration("move")
    # The domains stay.
    assert {d.name for d in await store.list_domains()} == set(DOMAINS)


async def test_a_domain_belongs_to_one_migration(store: Store) -> None:
    await three_domains(store)
    await store.add_migration(Migration("one", ("a.test",)))
    with pytest.raises(Conflict, match="belongs to migration one"):
        await store.add_migration(Migration("two", ("b.test", "a.test")))
    # Nothing of the refused create was kept.
    assert await store.get_migration("two") is None
    with pytest.raises(NotFound, match=r"no domain nowhere\.test"):
        await store.add_migration(Migration("three", ("nowhere.test",)))
    await store.add_migration(Migration("two", ("b.test",)))
    with pytest.raises(Conflict, match="belongs to migration one"):
        await store.change_migration_domains("two", add=["a.test"])
    changed = await store.change_migration_domains("two", add=["c.test", "b.test"])
    assert changed.domains == ("b.test", "c.test")
    changed = await store.change_migration_domains("two", remove=["b.test"])
    assert changed.domains == ("c.test",)
    with pytest.raises(NotFound, match="not in migration two"):
        await store.change_migration_domains("two", remove=["a.test"])
    with pytest.raises(NotFound, match="no migration nine"):
        await store.change_migration_domains("nine", add=["b.test"])
    # Removing a domain removes its membership: it can join another migration when re-added.
    await store.remove_domain("a.test")
    assert (await store.get_migration("one")).domains == ()  # type: ignore[union-attr]
    await add_domain(store, "a.test")
    await store.change_migration_domains("two", add=["a.test"])


async def test_schedule_changes_and_clears(store: Store) -> None:
    await store.add_migration(Migration("m"))
    got = await store.update_migration("m", MigrationChanges(release_at=500.0, release_rate=2.5))
    assert (got.release_at, got.release_rate) == (500.0, 2.5)
    got = await store.update_migration("m", MigrationChanges(clear_release_at=True))
    assert (got.release_at, got.release_rate) == (None, 2.5)
    with pytest.raises(NotFound):
        await store.update_migration("nope", MigrationChanges(release_at=1.0))


async def test_transition_is_all_or_nothing(store: Store) -> None:
    await three_domains(store)
    await store.add_migration(Migration("m", DOMAINS))
    hold = {name: DomainChanges(mode=DomainMode.HOLD) for name in DOMAINS}
    events = [StageEvent(name, "holding", 10.0, "cli", "", "m") for name in DOMAINS]
    audit = AuditEntry(10.0, "tester", "migration.hold", "m", "domains=a.test,b.test,c.test")
    updated = await store.apply_transition(DomainsTransition(hold, events, audit, "m"))
    assert [d.mode for d in updated] == [DomainMode.HOLD] * 3
    entries = [e for e in await store.list_audit(10) if e.action == "migration.hold"]
    assert len(entries) == 1 and entries[0].actor == "tester"
    assert [e.stage for e in await store.stage_events(list(DOMAINS))] == ["holding"] * 3

    # A missing domain in the middle: nothing changes, no event, no audit entry.
    relay = {
        "a.test": DomainChanges(mode=DomainMode.RELAY),
        "gone.test": DomainChanges(mode=DomainMode.RELAY),
        "c.test": DomainChanges(mode=DomainMode.RELAY),
    }
    released = [StageEvent("a.test", "released", 11.0)]
    bad_audit = AuditEntry(11.0, "tester", "migration.release", "m", "")
    with pytest.raises(NotFound):
        await store.apply_transition(DomainsTransition(relay, released, bad_audit, "m"))
    assert {d.mode for d in await store.list_domains()} == {DomainMode.HOLD}
    assert len(await store.stage_events()) == 3
    assert not [e for e in await store.list_audit(10) if e.action == "migration.release"]


async def test_scheduled_release_runs_once(store: Store, open_store: object) -> None:
    await three_domains(store)
    await store.add_migration(Migration("m", DOMAINS))
    await store.update_migration("m", MigrationChanges(release_at=1234.5, release_rate=1.0))
    release = {name: DomainChanges(mode=DomainMode.RELAY, released_at=1234.5) for name in DOMAINS}
    done = DomainsTransition(
        release,
        migration="m",
        migration_changes=MigrationChanges(clear_release_at=True),
        expect_release_at=1234.5,
    )
    await store.apply_transition(done)
    assert (await store.get_migration("m")).release_at is None  # type: ignore[union-attr]
    # The second node (or a retry) finds it done: Conflict, nothing changed again.
    await store.update_domain("a.test", DomainChanges(mode=DomainMode.HOLD))
    with pytest.raises(Conflict, match="changed or done"):
        await store.apply_transition(done)
    assert (await store.get_domain("a.test")).mode is DomainMode.HOLD  # type: ignore[union-attr]


async def test_stage_events_in_order_and_bounded(store: Store) -> None:
    await three_domains(store)
    stages = ["planned", "mx-to-spooler", "holding", "released"]
    for index, stage in enumerate(stages):
        await store.record_stage_events(
            [StageEvent("a.test", stage, 100.0 + index, "cli", f"n={index}", None)]
        )
    await store.record_stage_events([StageEvent("b.test", "planned", 50.0, "api:ops")])
    await store.record_stage_events([])
    mine = await store.stage_events(["a.test"])
    assert [e.stage for e in mine] == stages
    assert mine[1].detail == "n=1" and mine[0].actor  # "cli" became the OS user
    assert [e.domain for e in await store.stage_events()] == ["a.test"] * 4 + ["b.test"]
    assert await store.stage_events([]) == []
    newest = await store.stage_events(["a.test"], limit=2)
    assert [e.stage for e in newest] == ["holding", "released"]
    # History outlives the domain.
    await store.remove_domain("a.test")
    assert len(await store.stage_events(["a.test"])) == 4


async def test_mail_of_every_domain_is_held_and_released_together(store: Store) -> None:
    await three_domains(store)
    await store.add_migration(Migration("m", DOMAINS))
    for name in DOMAINS:
        await store.accept_message(make_message([f"u@{name}"]))
    hold = {name: DomainChanges(mode=DomainMode.HOLD) for name in DOMAINS}
    await store.apply_transition(DomainsTransition(hold, migration="m"))
    counts = {s.domain: s.held for s in await store.status(time.time())}
    assert counts == dict.fromkeys(DOMAINS, 1)
    relay = {name: DomainChanges(mode=DomainMode.RELAY) for name in DOMAINS}
    await store.apply_transition(DomainsTransition(relay, migration="m"))
    assert set(await store.due_domains(time.time() + 1)) == set(DOMAINS)
