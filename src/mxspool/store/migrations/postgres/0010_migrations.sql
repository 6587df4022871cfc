-- Migrations as objects (issue 12): several domains moved together from a source tenant to a
-- target tenant, and each domain's migration stage recorded as typed events.
--
-- migrations.release_at: a scheduled release (`migration release --at`), performed by a
-- running serve at that time and cleared when done or cancelled; NULL = none scheduled.
-- migrations.release_rate: messages per second of the migration's last (or scheduled)
-- release; domains of one target tenant share one pacing bucket at this rate. NULL = each
-- domain's own rate.
CREATE TABLE migrations (
    name          text PRIMARY KEY,
    source_tenant text,
    target_tenant text,
    created_at    double precision NOT NULL,
    release_at    double precision,
    release_rate  double precision,
    updated_at    double precision NOT NULL
);

-- A domain belongs to at most one migration. Not a foreign key to domains: removing a
-- domain removes its membership in the same transaction (the store does it).
CREATE TABLE migration_domains (
    migration text NOT NULL REFERENCES migrations (name) ON DELETE CASCADE,
    domain    text NOT NULL UNIQUE,
    added_at  double precision NOT NULL,
    PRIMARY KEY (migration, domain)
);

-- Where each domain stands (planned, mx-to-spooler, relaying, holding, released,
-- mx-to-target, done, and the manual steps detached, attached, verified), recorded when the
-- action happens. Kept after the domain or its migration is removed: it is history.
CREATE TABLE stage_events (
    id        bigserial PRIMARY KEY,
    domain    text NOT NULL,
    stage     text NOT NULL,
    at        double precision NOT NULL,
    actor     text NOT NULL DEFAULT '',
    detail    text NOT NULL DEFAULT '',
    migration text
);
CREATE INDEX stage_events_domain ON stage_events (domain, id);
