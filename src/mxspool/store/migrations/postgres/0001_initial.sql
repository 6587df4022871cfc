-- mxspool PostgreSQL schema, version 1.
-- Same meaning as the SQLite schema (times are seconds since the epoch, as double precision,
-- taken from the node's clock). Applied by PostgresStore.open() inside one transaction that
-- holds a transaction-level advisory lock, so nodes starting together do not race.

CREATE TABLE meta (
    key   text PRIMARY KEY,
    value bigint NOT NULL
);
INSERT INTO meta (key, value) VALUES ('domains_generation', 0);

CREATE TABLE domains (
    name        text PRIMARY KEY,
    mode        text NOT NULL CHECK (mode IN ('hold', 'relay')),
    routes      text NOT NULL,          -- JSON list of [host, port]
    use_mx      boolean NOT NULL DEFAULT false,
    tls         text NOT NULL DEFAULT 'verify'
                CHECK (tls IN ('verify', 'require', 'opportunistic', 'off')),
    rate        double precision,       -- messages per second; NULL = [delivery] rate
    profile     text,
    created_at  double precision NOT NULL,
    released_at double precision,
    updated_at  double precision NOT NULL
);

CREATE TABLE messages (
    seq            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- arrival order
    id             text NOT NULL UNIQUE, -- the queue id given in "250 ... queued as"
    received_at    double precision NOT NULL,
    mail_from      text NOT NULL,
    mail_params    text NOT NULL,        -- JSON
    size           bigint NOT NULL,
    sha256         text NOT NULL,
    message_id     text,                 -- the Message-ID header
    client_address text NOT NULL,
    client_name    text,
    helo           text NOT NULL,
    tls_version    text,
    tls_cipher     text,
    tags           text NOT NULL DEFAULT ''
);
CREATE INDEX messages_message_id ON messages (message_id);

-- Message bytes, apart from the hot per-recipient rows: one row for a small body, rows of
-- 1 MiB for a large one (written and read piece by piece, never whole in memory).
CREATE TABLE bodies (
    message_seq bigint NOT NULL REFERENCES messages (seq) ON DELETE CASCADE,
    chunk       integer NOT NULL,
    data        bytea NOT NULL,
    PRIMARY KEY (message_seq, chunk)
);
-- Out of line, uncompressed: most of the bytes are base64 of already-compressed attachments,
-- and compressing on the way in would cost the intake CPU for little gain.
ALTER TABLE bodies ALTER COLUMN data SET STORAGE EXTERNAL;

CREATE TABLE recipients (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_seq     bigint NOT NULL REFERENCES messages (seq) ON DELETE CASCADE,
    rcpt            text NOT NULL,
    domain          text NOT NULL,
    params          text NOT NULL,       -- JSON
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivering', 'delivered', 'parked',
                                     'bounced', 'discarded')),
    released        boolean NOT NULL DEFAULT false,  -- canary: released while the domain holds
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL DEFAULT 0,
    lease_owner     text,
    lease_until     double precision,
    last_reply      text,
    delivered_at    double precision,
    updated_at      double precision NOT NULL
);
CREATE INDEX recipients_message ON recipients (message_seq);
-- The scheduler's indexes cover only unfinished rows, so finished rows (the vast majority
-- after a release) cost the claim query nothing however many pile up.
CREATE INDEX recipients_open ON recipients (domain, id)
    WHERE state IN ('pending', 'delivering');
CREATE INDEX recipients_canary ON recipients (domain, id)
    WHERE released AND state IN ('pending', 'delivering');
CREATE INDEX recipients_due ON recipients (domain, next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX recipients_leased ON recipients (domain, lease_until)
    WHERE state = 'delivering';
CREATE INDEX recipients_pending_rcpt ON recipients (domain, lower(rcpt))
    WHERE state = 'pending';
CREATE INDEX recipients_delivered ON recipients (domain, delivered_at)
    WHERE state = 'delivered';
CREATE INDEX recipients_parked ON recipients (domain, id)
    WHERE state = 'parked';
-- The hot table is updated a lot: leave room for HOT updates and vacuum it early.
ALTER TABLE recipients SET (fillfactor = 85, autovacuum_vacuum_scale_factor = 0.02,
                            autovacuum_analyze_scale_factor = 0.02);

CREATE TABLE attempts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    recipient_id bigint NOT NULL REFERENCES recipients (id) ON DELETE CASCADE,
    at           double precision NOT NULL,
    destination  text NOT NULL,
    outcome      text NOT NULL,
    reply        text NOT NULL
);
CREATE INDEX attempts_recipient ON attempts (recipient_id);

CREATE TABLE audit (
    id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at     double precision NOT NULL,
    actor  text NOT NULL,
    action text NOT NULL,
    target text NOT NULL,
    detail text NOT NULL DEFAULT ''
);

-- Cluster-wide pacing: one token bucket per destination, shared by every node.
CREATE TABLE rate_buckets (
    bucket     text PRIMARY KEY,
    tokens     double precision NOT NULL,
    updated_at double precision NOT NULL,
    last_grant integer NOT NULL DEFAULT 0  -- what the last take_tokens got (for RETURNING)
);

-- Cluster-wide concurrency: one row per connection slot held, expiring unless renewed.
CREATE TABLE delivery_slots (
    destination text NOT NULL,
    owner       text NOT NULL,
    expires_at  double precision NOT NULL,
    PRIMARY KEY (destination, owner)
);
