-- The scheduler asks "is anything due?" several times a second: answer it from an index on
-- the due time of pending rows and on the lease expiry of delivering rows, not by walking a
-- domain's whole backlog.
CREATE INDEX recipients_due ON recipients (domain, next_attempt_at) WHERE state = 'pending';
CREATE INDEX recipients_lease ON recipients (domain, lease_until) WHERE state = 'delivering';
