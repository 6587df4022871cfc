-- Recipient counts per (domain, state, released), kept by triggers in the same transaction as
-- every change to recipients, so `status`, the dashboard and /metrics read a few rows per
-- domain instead of counting millions. Every write path keeps them without knowing: the
-- writer's statements, the accept_rows view trigger the C commit thread inserts through, and
-- any future one. "held" is not stored: it is a pending, not released row of a domain whose
-- mode is hold, derived at read time (a domain's release changes no recipient row).
--
-- SQLite has one writer, so one row per key updated in place costs nothing in contention.
-- `mxspool check store` recounts from the rows and reports (or --repair fixes) any drift.
CREATE TABLE recipient_counts (
    domain   TEXT NOT NULL,
    state    TEXT NOT NULL,
    released INTEGER NOT NULL,
    n        INTEGER NOT NULL,
    PRIMARY KEY (domain, state, released)
) WITHOUT ROWID;

INSERT INTO recipient_counts (domain, state, released, n)
SELECT domain, state, released, count(*) FROM recipients GROUP BY domain, state, released;

CREATE TRIGGER recipient_counts_insert AFTER INSERT ON recipients
BEGIN
    INSERT INTO recipient_counts (domain, state, released, n)
    VALUES (NEW.domain, NEW.state, NEW.released, 1)
    ON CONFLICT (domain, state, released) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER recipient_counts_update AFTER UPDATE OF domain, state, released ON recipients
WHEN OLD.domain IS NOT NEW.domain OR OLD.state IS NOT NEW.state
     OR OLD.released IS NOT NEW.released
BEGIN
    UPDATE recipient_counts SET n = n - 1
    WHERE domain = OLD.domain AND state = OLD.state AND released = OLD.released;
    INSERT INTO recipient_counts (domain, state, released, n)
    VALUES (NEW.domain, NEW.state, NEW.released, 1)
    ON CONFLICT (domain, state, released) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER recipient_counts_delete AFTER DELETE ON recipients
BEGIN
    UPDATE recipient_counts SET n = n - 1
    WHERE domain = OLD.domain AND state = OLD.state AND released = OLD.released;
END;

-- "Delivered in the last minute" per domain: a range over the last minute's deliveries,
-- not a walk over every delivered row (PostgreSQL has had this index from the start).
CREATE INDEX recipients_delivered ON recipients (domain, delivered_at) WHERE state = 'delivered';
