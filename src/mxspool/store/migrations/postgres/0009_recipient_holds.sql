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
    address    text PRIMARY KEY,
    domain     text NOT NULL,
    prefix     text NOT NULL DEFAULT '',
    suffix     text NOT NULL,
    created_at double precision NOT NULL,
    actor      text NOT NULL DEFAULT ''
);

ALTER TABLE recipients ADD COLUMN held boolean NOT NULL DEFAULT false;
CREATE INDEX recipients_held ON recipients (domain, rcpt) WHERE held;

-- New mail for a held address is held from its first row, whatever inserts it. A BEFORE
-- trigger changes the row itself: no second write. One probe of a table of a few rows.
CREATE FUNCTION recipient_holds_intake() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'pending' AND EXISTS (
        SELECT 1 FROM recipient_holds h WHERE h.address = lower(NEW.rcpt)
        OR (h.prefix <> '' AND left(lower(NEW.rcpt), length(h.prefix)) = h.prefix
            AND right(lower(NEW.rcpt), length(h.suffix)) = h.suffix)) THEN
        NEW.held := true;
        NEW.next_attempt_at := 253402300799.0;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER recipient_holds_intake BEFORE INSERT ON recipients
FOR EACH ROW EXECUTE FUNCTION recipient_holds_intake();
