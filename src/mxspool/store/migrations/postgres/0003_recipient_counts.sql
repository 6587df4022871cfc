-- Recipient counts per (domain, state, released), kept by triggers in the same transaction as
-- every change to recipients, so `status`, the dashboard and /metrics read a few rows per
-- domain instead of counting millions. Every write path keeps them without knowing.
--
-- A counter row updated by every accept would serialise concurrent accept transactions on
-- its row lock. So the triggers only INSERT into recipient_count_deltas (one row per key and
-- statement, from the statement's transition tables: a batch of accepts adds a handful), and
-- nobody ever waits on anybody. The store folds the deltas into recipient_counts every second
-- (and before each status); readers add the deltas not yet folded, in the same snapshot.
-- "held" is not stored: it is a pending, not released row of a domain whose mode is hold,
-- derived at read time. `mxspool check store` recounts from the rows and reports any drift.
CREATE TABLE recipient_counts (
    domain   text NOT NULL,
    state    text NOT NULL,
    released boolean NOT NULL,
    n        bigint NOT NULL,
    PRIMARY KEY (domain, state, released)
);

CREATE TABLE recipient_count_deltas (
    domain   text NOT NULL,
    state    text NOT NULL,
    released boolean NOT NULL,
    delta    bigint NOT NULL
);
-- Rows live for about a second: vacuum early so the table stays a few pages.
ALTER TABLE recipient_count_deltas SET (autovacuum_vacuum_threshold = 1000,
                                        autovacuum_vacuum_scale_factor = 0);

CREATE FUNCTION recipient_counts_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO recipient_count_deltas (domain, state, released, delta)
    SELECT domain, state, released, count(*) FROM recipient_rows_new
    GROUP BY domain, state, released;
    RETURN NULL;
END $$;

CREATE FUNCTION recipient_counts_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO recipient_count_deltas (domain, state, released, delta)
    SELECT domain, state, released, sum(delta) FROM (
        SELECT domain, state, released, -1 AS delta FROM recipient_rows_old
        UNION ALL
        SELECT domain, state, released, 1 FROM recipient_rows_new
    ) AS changes
    GROUP BY domain, state, released
    HAVING sum(delta) <> 0;
    RETURN NULL;
END $$;

CREATE FUNCTION recipient_counts_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO recipient_count_deltas (domain, state, released, delta)
    SELECT domain, state, released, -count(*) FROM recipient_rows_old
    GROUP BY domain, state, released;
    RETURN NULL;
END $$;

CREATE TRIGGER recipient_counts_inserted AFTER INSERT ON recipients
    REFERENCING NEW TABLE AS recipient_rows_new
    FOR EACH STATEMENT EXECUTE FUNCTION recipient_counts_inserted();
CREATE TRIGGER recipient_counts_updated AFTER UPDATE ON recipients
    REFERENCING OLD TABLE AS recipient_rows_old NEW TABLE AS recipient_rows_new
    FOR EACH STATEMENT EXECUTE FUNCTION recipient_counts_updated();
CREATE TRIGGER recipient_counts_deleted AFTER DELETE ON recipients
    REFERENCING OLD TABLE AS recipient_rows_old
    FOR EACH STATEMENT EXECUTE FUNCTION recipient_counts_deleted();

-- After the triggers: creating them locked recipients against writes until this migration
-- commits, and this statement's snapshot sees every row committed before.
INSERT INTO recipient_counts (domain, state, released, n)
SELECT domain, state, released, count(*) FROM recipients GROUP BY domain, state, released;
