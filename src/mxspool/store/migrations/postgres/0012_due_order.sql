-- The claim reads due rows in lanes (store/postgres.py, _claim_lanes): rows due since arrival
-- or release (next_attempt_at 0) in id order, retries by due time then id. With id in the
-- index both are ranges already in order: a claim reads ``limit`` index entries however many
-- rows are held, deferred or in flight ahead of them. (SQLite's index ends with the rowid, so
-- its recipients_due serves the same lanes unchanged.)
DROP INDEX recipients_due;
CREATE INDEX recipients_due ON recipients (domain, next_attempt_at, id)
    WHERE state = 'pending';
