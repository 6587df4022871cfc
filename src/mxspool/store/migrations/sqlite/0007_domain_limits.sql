-- Per-domain limits of the recipient gate (issue 11), and recipients stored parked at once.
--
-- domains.max_size: the largest message (bytes) the target takes for the domain; NULL = the
-- profile's default, else [smtp] max_message_size. domains.subdomains: the domain's
-- subdomains are accepted, routed and held like it. domains.plus_separator: sub-addressing
-- (local+tag@domain accepted when local@domain is); '' = off.
ALTER TABLE domains ADD COLUMN max_size INTEGER;
ALTER TABLE domains ADD COLUMN subdomains INTEGER NOT NULL DEFAULT 0;
ALTER TABLE domains ADD COLUMN plus_separator TEXT NOT NULL DEFAULT '+';

-- A mailbox's MaxReceiveSize from the Get-Mailbox export (bytes); NULL = unknown or Unlimited.
ALTER TABLE recipient_lists ADD COLUMN max_size INTEGER;

-- The accept view's recipients may carry a state and a last reply: [address, domain, params,
-- state, reply]. A recipient whose mailbox is too small for the message is stored parked,
-- with the reason, in the same statement as the rest of the message.
DROP TRIGGER accept_rows_insert;
CREATE TRIGGER accept_rows_insert INSTEAD OF INSERT ON accept_rows
BEGIN
    INSERT INTO messages (id, received_at, mail_from, mail_params, size, sha256, message_id,
                          client_address, client_name, helo, tls_version, tls_cipher, tags)
    VALUES (NEW.id, NEW.received_at, NEW.mail_from, NEW.mail_params, NEW.size, NEW.sha256,
            NEW.message_id, NEW.client_address, NEW.client_name, NEW.helo, NEW.tls_version,
            NEW.tls_cipher, NEW.tags);
    -- Within a trigger, last_insert_rowid() is the row the trigger itself just inserted.
    INSERT INTO bodies (seq, data) VALUES (last_insert_rowid(), NEW.data);
    INSERT INTO recipients (message_seq, rcpt, domain, params, state, last_reply, updated_at)
    SELECT (SELECT seq FROM messages WHERE id = NEW.id),
           json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
           coalesce(json_extract(value, '$[3]'), 'pending'), json_extract(value, '$[4]'),
           NEW.received_at
    FROM json_each(NEW.recipients)
    ORDER BY key;
END;
