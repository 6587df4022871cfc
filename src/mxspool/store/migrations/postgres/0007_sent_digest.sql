-- The sha256 of the bytes that actually left for a delivered recipient (the stored bytes, with
-- the ARC set in front when [arc] sealing is on), recorded with the delivery outcome, so the
-- reconciliation report states both what was stored (messages.sha256) and what was sent.
-- NULL: not delivered, or delivered before this column existed. Adding a nullable column
-- without a default rewrites nothing.
ALTER TABLE recipients ADD COLUMN sent_sha256 TEXT;
