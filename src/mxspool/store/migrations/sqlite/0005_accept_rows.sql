-- Accepted messages (row, body, recipients) inserted by one INSERT into this view.
--
-- The writer inserts a whole group commit's worth of accepts as one multi-row INSERT INTO
-- accept_rows, in autocommit mode: one statement is one transaction with one fsync and, what
-- matters most in a Python process, one release of the GIL. Each separate statement costs a
-- GIL round trip against the busy event loop (~0.25 ms under load), which made BEGIN, three
-- INSERTs and COMMIT take three times the writer's actual work.
--
-- recipients is a JSON array of [address, domain, params JSON] in RCPT order; data is the
-- whole body (bodies spilled to disk take the explicit-transaction path with blob writes).
CREATE VIEW accept_rows (
    id, received_at, mail_from, mail_params, size, sha256, message_id, client_address,
    client_name, helo, tls_version, tls_cipher, tags, data, recipients
) AS SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
    NULL WHERE 0;

CREATE TRIGGER accept_rows_insert INSTEAD OF INSERT ON accept_rows
BEGIN
    INSERT INTO messages (id, received_at, mail_from, mail_params, size, sha256, message_id,
                          client_address, client_name, helo, tls_version, tls_cipher, tags)
    VALUES (NEW.id, NEW.received_at, NEW.mail_from, NEW.mail_params, NEW.size, NEW.sha256,
            NEW.message_id, NEW.client_address, NEW.client_name, NEW.helo, NEW.tls_version,
            NEW.tls_cipher, NEW.tags);
    -- Within a trigger, last_insert_rowid() is the row the trigger itself just inserted.
    INSERT INTO bodies (seq, data) VALUES (last_insert_rowid(), NEW.data);
    INSERT INTO recipients (message_seq, rcpt, domain, params, updated_at)
    SELECT (SELECT seq FROM messages WHERE id = NEW.id),
           json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
           NEW.received_at
    FROM json_each(NEW.recipients)
    ORDER BY key;
END;
