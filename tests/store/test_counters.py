"""The recipient counters behind ``status``: kept by triggers, checked and repaired by
``mxspool check store``, backfilled when an old store is migrated, and (on PostgreSQL) never
making two accepting transactions wait on each other.

Every contract test (test_contract.py) also checks the counters against a recount after each
store operation; these tests cover what the contract scenarios cannot: drift, repair, upgrade.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from mxspool import cli as cli_module
from mxspool import operations as ops
from mxspool.store.base import Domain, DomainMode, Route, Store
from mxspool.store.postgres import PostgresStore
from mxspool.store.sqlite import SqliteStore, sqlite_path
from tests.store.test_contract import make_message, put

HELD = "held.test"


async def _add(store: Store, name: str, mode: DomainMode = DomainMode.HOLD) -> None:
    await store.add_domain(Domain(name=name, mode=mode, routes=(Route("127.0.0.1", 2525),)))


def _execute(store_url: str, statement: str) -> None:
    """Change the store behind the store's back, as a bug or a hand-edit would."""
    if store_url.startswith("sqlite"):
        with sqlite3.connect(sqlite_path(store_url)) as conn:
            conn.execute(statement)
        return
    with psycopg.connect(store_url, autocommit=True) as conn:
        conn.execute(statement)


async def _held(store: Store) -> int:
    return sum(s.held for s in await store.status(time.time()) if s.domain == HELD)


async def test_check_store_finds_drift_and_repair_resets_it(store: Store, store_url: str) -> None:
    await _add(store, HELD)
    for n in range(3):
        await put(store, [f"u{n}@{HELD}"])
    assert await store.check_counters() == []  # control: a sound store has no drift
    assert await _held(store) == 3

    # Rows changed without the triggers knowing (a hand-edit with triggers dropped, say).
    _execute(
        store_url,
        "DROP TRIGGER "
        + (
            "recipient_counts_update"
            if "sqlite" in store_url
            else "recipient_counts_updated ON recipients"
        ),
    )
    _execute(store_url, f"UPDATE recipients SET state = 'discarded' WHERE rcpt = 'u0@{HELD}'")
    assert await _held(store) == 3  # the counters did not see it

    check = await ops.check_store(store)
    assert not check.ok
    assert {(d.state, d.counted, d.actual) for d in check.drift} == {
        ("pending", 3, 2),
        ("discarded", 0, 1),
    }
    assert await _held(store) == 3  # checking changes nothing

    repaired = await ops.check_store(store, repair=True)
    assert repaired.ok and repaired.repaired
    assert await store.check_counters() == []
    statuses = {s.domain: s for s in await store.status(time.time())}
    assert (statuses[HELD].held, statuses[HELD].discarded) == (2, 1)
    audit = await store.list_audit(10)
    assert (audit[0].action, audit[0].target) == ("store.repair", "recipient_counts")


def _config(tmp_path: Path, store_url: str) -> Path:
    config = tmp_path / "mxspool.toml"
    config.write_text(f"[store]\nurl = {json.dumps(store_url)}\n")
    return config


def test_check_store_command(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'spool.db'}"
    config = _config(tmp_path, url)
    runner = CliRunner()
    ok = runner.invoke(cli_module.cli, ["check", "store", "--config", str(config)])
    assert ok.exit_code == 0, ok.output
    assert "match" in ok.output

    _execute(url, "INSERT INTO recipient_counts VALUES ('ghost.test', 'pending', 0, 7)")
    drifted = runner.invoke(cli_module.cli, ["check", "store", "--json", "--config", str(config)])
    assert drifted.exit_code == 1
    assert "mxspool check store --repair" in drifted.output
    data = json.loads(drifted.stdout)
    assert data["ok"] is False
    assert data["drift"] == [
        {"domain": "ghost.test", "state": "pending", "released": False, "counted": 7, "actual": 0}
    ]

    fixed = runner.invoke(cli_module.cli, ["check", "store", "--repair", "--config", str(config)])
    assert fixed.exit_code == 0, fixed.output
    again = runner.invoke(cli_module.cli, ["check", "store", "--config", str(config)])
    assert again.exit_code == 0, again.output


async def test_an_old_sqlite_store_gets_its_counters_from_its_rows(tmp_path: Path) -> None:
    """A store written before migration 0006 (no counters) is counted once on upgrade."""
    db = tmp_path / "old.db"
    folder = Path(__file__).parents[2] / "src" / "mxspool" / "store" / "migrations" / "sqlite"
    conn = sqlite3.connect(db)
    for script in sorted(folder.glob("000[1-5]_*.sql")):
        conn.executescript(script.read_text())
    conn.execute(
        "INSERT INTO accept_rows VALUES ('OLD1', 1.0, 'a@src.test', '{}', 3, 'x', NULL,"
        " '192.0.2.1', NULL, 'h', NULL, NULL, '', X'616263', ?)",
        (json.dumps([[f"a@{HELD}", HELD, "{}"], [f"b@{HELD}", HELD, "{}"]]),),
    )
    conn.execute("PRAGMA user_version = 5")
    conn.commit()
    conn.close()

    store = SqliteStore(f"sqlite:///{db}")
    await store.open()
    try:
        await _add(store, HELD)
        assert await _held(store) == 2
        assert await store.check_counters() == []
        await store.accept_message(make_message([f"c@{HELD}"]))
        assert await _held(store) == 3
    finally:
        await store.close()


async def test_postgres_accepts_never_wait_on_a_counter_row(pg_url: str) -> None:
    """Two transactions adding recipients to the same domain both go through at once: the
    triggers only insert deltas. With one counter row per domain the second would wait for
    the first's COMMIT (and hit the lock timeout here)."""
    store = PostgresStore(pg_url)
    await store.open()
    try:
        await _add(store, HELD)
        insert = (
            "WITH m AS (INSERT INTO messages (id, received_at, mail_from, mail_params, size,"
            " sha256, client_address, helo) VALUES (%s, 1, 'a@src.test', '{}', 1, 'x',"
            " '192.0.2.1', 'h') RETURNING seq)"
            " INSERT INTO recipients (message_seq, rcpt, domain, params, updated_at)"
            " SELECT seq, %s, %s, '{}', 1 FROM m"
        )
        with (
            psycopg.connect(pg_url) as first,
            psycopg.connect(pg_url) as second,
        ):
            first.execute(insert, ("T1", f"a@{HELD}", HELD))  # open, not committed
            second.execute("SET lock_timeout = '2s'")
            second.execute(insert, ("T2", f"b@{HELD}", HELD))
            second.commit()
            assert await _held(store) == 1  # the second is in; the first not yet
            first.commit()
        assert await _held(store) == 2
        await store.fold_counters()
        with psycopg.connect(pg_url) as conn:
            left = conn.execute("SELECT count(*) FROM recipient_count_deltas").fetchone()
            folded = conn.execute(
                "SELECT n FROM recipient_counts WHERE domain = %s AND state = 'pending'", (HELD,)
            ).fetchone()
        assert (left, folded) == ((0,), (2,))
        assert await _held(store) == 2
        assert await store.check_counters() == []
    finally:
        await store.close()


@pytest.mark.parametrize("mode", [DomainMode.HOLD, DomainMode.RELAY])
async def test_status_reads_counters_not_rows(store: Store, store_url: str, mode: str) -> None:
    """status answers from the counters: a counter set by hand shows (what check store is
    there to catch), which a count over the rows would never show."""
    await _add(store, HELD, DomainMode(mode))
    await put(store, [f"a@{HELD}"])
    shown = "held" if mode == DomainMode.HOLD else "pending"
    before = {s.domain: s for s in await store.status(time.time())}[HELD]
    assert getattr(before, shown) == 1
    if store_url.startswith("sqlite"):
        _execute(store_url, f"UPDATE recipient_counts SET n = n + 41 WHERE domain = '{HELD}'")
    else:  # a delta not folded yet counts as much as a folded one
        _execute(
            store_url, f"INSERT INTO recipient_count_deltas VALUES ('{HELD}', 'pending', false, 41)"
        )
    after = {s.domain: s for s in await store.status(time.time())}[HELD]
    assert getattr(after, shown) == 42
    await ops.check_store(store, repair=True)
    assert await store.check_counters() == []
