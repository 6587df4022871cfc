-- Per-recipient holds (issue 12): one mailbox's mail kept while its domain is released (a
-- mailbox created late at the target), until `release --only ADDRESS`.
--
-- recipient_holds: one row per held address (lowercased). ``prefix`` and ``suffix`` match its
-- sub-addressed forms too (local+tag@domain lands in the same mailbox): prefix is
-- "local" plus the domain's plus separator ('' when sub-addressing is off), suffix "@domain".
--
-- recipients.held: the row is kept by such a hold. Set on the address's pending rows when the
-- hold is made, and on new rows by the trigger below, so the hot claim reads one column of a
-- row it reads anyway instead of joining recipient_holds. A held row's next_attempt_at is
-- 9999-12-31 (the scheduler's "is anything due?" index never sees it); the release makes it
-- due at once.
CREATE TABLE recipient_holds (
    address    TEXT PRIMARY KEY,
    domain     TEXT NOT NULL,
    prefix     TEXT NOT NULL DEFAULT '',
    suffix     TEXT NOT NULL,
    created_at REAL NOT NULL,
    actor      TEXT NOT NULL DEFAULT ''
);

ALTER TABLE recipients ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
CREATE INDEX recipients_held ON recipients (domain, rcpt) WHERE held = 1;

-- New mail for a held address is held from its first row (every write path: the writer, the
-- accept_rows view the C commit thread inserts through). One probe of a table of a few rows.
CREATE TRIGGER recipient_holds_intake AFTER INSERT ON recipients
WHEN NEW.state = 'pending' AND EXISTS (
    SELECT 1 FROM recipient_holds h WHERE h.address = lower(NEW.rcpt)
    OR (h.prefix <> '' AND substr(lower(NEW.rcpt), 1, length(h.prefix)) = h.prefix
        AND substr(lower(NEW.rcpt), -length(h.suffix)) = h.suffix))
BEGIN
    UPDATE recipients SET held = 1, next_attempt_at = 253402300799.0 WHERE id = NEW.id;
END;
