-- Recipient readiness (issue 12): the per-recipient result of the last `check recipients` run of
-- each domain, so `domain release --dry-run` shows each mailbox's readiness and its age.
--
-- One row per (domain, address), address lowercased; a run replaces its domain's rows as a
-- whole (the last run is the truth: an address it did not probe has no stored result).
-- state: 'ready' (250 at RCPT), 'not ready' (5xx: create the mailbox at the target) or
-- 'unknown' (4xx, or no answer: check again); reply: the target's reply or why not checked.
CREATE TABLE recipient_checks (
    domain     text NOT NULL REFERENCES domains (name) ON DELETE CASCADE,
    address    text NOT NULL,
    state      text NOT NULL CHECK (state IN ('ready', 'not ready', 'unknown')),
    reply      text NOT NULL DEFAULT '',
    checked_at double precision NOT NULL,
    PRIMARY KEY (domain, address)
);
