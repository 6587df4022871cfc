-- The accept path without foreign-key checks on bodies and recipients.
--
-- Every accepted row of bodies and recipients was checked against messages by a per-row
-- trigger (an index probe of messages_pkey, locking the row FOR KEY SHARE): 5-12% of
-- PostgreSQL's CPU per accepted 10 KiB message, measured. The check cannot fail: the store
-- writes a message's recipients and bodies only in the same statement or transaction as the
-- message itself, joined to the seq that INSERT returned. And the ON DELETE CASCADE served
-- nobody: no code path deletes messages. Whoever adds one deletes the message's bodies and
-- recipients in the same transaction (attempts still cascade from recipients, whose foreign
-- key stays); tests/store/test_pg_batch.py holds that line.
ALTER TABLE bodies DROP CONSTRAINT IF EXISTS bodies_message_seq_fkey;
ALTER TABLE recipients DROP CONSTRAINT IF EXISTS recipients_message_seq_fkey;
