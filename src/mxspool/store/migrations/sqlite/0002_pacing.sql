-- Shared pacing state: token buckets and expiring concurrency slots per destination.
CREATE TABLE rate_buckets (
    bucket     TEXT PRIMARY KEY,
    tokens     REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE delivery_slots (
    destination TEXT NOT NULL,
    owner       TEXT NOT NULL,
    expires_at  REAL NOT NULL,
    PRIMARY KEY (destination, owner)
);
