-- mxspool SQLite schema, version 1.
-- Message bytes live in their own table so the hot per-recipient rows stay small.

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO meta (key, value) VALUES ('domains_generation', 0);

CREATE TABLE domains (
    name        TEXT PRIMARY KEY,
    mode        TEXT NOT NULL CHECK (mode IN ('hold', 'relay')),
    routes      TEXT NOT NULL,          -- JSON list of [host, port]
    use_mx      INTEGER NOT NULL DEFAULT 0,
    tls         TEXT NOT NULL DEFAULT 'verify'
                CHECK (tls IN ('verify', 'require', 'opportunistic', 'off')),
    rate        REAL,                   -- messages per second; NULL = [delivery] rate
    profile     TEXT,
    created_at  REAL NOT NULL,
    released_at REAL,
    updated_at  REAL NOT NULL
);

CREATE TABLE messages (
    seq            INTEGER PRIMARY KEY,  -- arrival order
    id             TEXT NOT NULL UNIQUE, -- the queue id given in "250 ... queued as"
    received_at    REAL NOT NULL,
    mail_from      TEXT NOT NULL,
    mail_params    TEXT NOT NULL,        -- JSON
    size           INTEGER NOT NULL,
    sha256         TEXT NOT NULL,
    message_id     TEXT,                 -- the Message-ID header
    client_address TEXT NOT NULL,
    client_name    TEXT,
    helo           TEXT NOT NULL,
    tls_version    TEXT,
    tls_cipher     TEXT,
    tags           TEXT NOT NULL DEFAULT ''
);
CREATE INDEX messages_message_id ON messages (message_id);

CREATE TABLE bodies (
    seq  INTEGER PRIMARY KEY REFERENCES messages (seq),
    data BLOB NOT NULL
);

CREATE TABLE recipients (
    id              INTEGER PRIMARY KEY,
    message_seq     INTEGER NOT NULL REFERENCES messages (seq),
    rcpt            TEXT NOT NULL,
    domain          TEXT NOT NULL,
    params          TEXT NOT NULL,       -- JSON
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivering', 'delivered', 'parked',
                                     'bounced', 'discarded')),
    released        INTEGER NOT NULL DEFAULT 0,   -- canary: released while the domain holds
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    lease_until     REAL,
    last_reply      TEXT,
    delivered_at    REAL,
    updated_at      REAL NOT NULL
);
CREATE INDEX recipients_message ON recipients (message_seq);
-- Only unfinished rows are indexed for the scheduler, so finished ones cost it nothing.
CREATE INDEX recipients_open ON recipients (domain, id)
    WHERE state IN ('pending', 'delivering');
CREATE INDEX recipients_canary ON recipients (domain, id)
    WHERE released = 1 AND state IN ('pending', 'delivering');
CREATE INDEX recipients_state ON recipients (state, domain);
CREATE INDEX recipients_rcpt ON recipients (rcpt);

CREATE TABLE attempts (
    id           INTEGER PRIMARY KEY,
    recipient_id INTEGER NOT NULL REFERENCES recipients (id),
    at           REAL NOT NULL,
    destination  TEXT NOT NULL,
    outcome      TEXT NOT NULL,
    reply        TEXT NOT NULL
);
CREATE INDEX attempts_recipient ON attempts (recipient_id);

CREATE TABLE audit (
    id     INTEGER PRIMARY KEY,
    at     REAL NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
