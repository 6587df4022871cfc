-- Migrations as objects (issue 12): several domains moved together from a source tenant to a
-- target tenant, and each domain's migration stage recorded as typed events.
--
-- migrations.release_at: a scheduled release (`migration release --at`), performed by a
-- running serve at that time and cleared when done or cancelled; NULL = none scheduled.
-- migrations.release_rate: messages per second of the migration's last (or scheduled)
-- release; domains of one target tenant share one pacing bucket at this rate. NULL = each
-- domain's own rate.
CREATE TABLE migrations (
    name          TEXT PRIMARY KEY,
    source_tenant TEXT,
    target_tenant TEXT,
    created_at    REAL NOT NULL,
    release_at    REAL,
    release_rate  REAL,
    updated_at    REAL NOT NULL
);

-- A domain belongs to at most one migration. Not a foreign key to domains: removing a
-- domain removes its membership in the same transaction (the store does it).
CREATE TABLE migration_domains (
    migration TEXT NOT NULL REFERENCES migrations (name) ON DELETE CASCADE,
    domain    TEXT NOT NULL UNIQUE,
    added_at  REAL NOT NULL,
    PRIMARY KEY (migration, domain)
);

-- Where each domain stands (planned, mx-to-spooler, relaying, holding, released,
-- mx-to-target, done, and the manual steps detached, attached, verified), recorded when the
-- action happens. Kept after the domain or its migration is removed: it is history.
CREATE TABLE stage_events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    domain    TEXT NOT NULL,
    stage     TEXT NOT NULL,
    at        REAL NOT NULL,
    actor     TEXT NOT NULL DEFAULT '',
    detail    TEXT NOT NULL DEFAULT '',
    migration TEXT
);
CREATE INDEX stage_events_domain ON stage_events (domain, id);
