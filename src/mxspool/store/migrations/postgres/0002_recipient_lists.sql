-- Recipient lists (migration toolkit): when a domain has one, the intake answers 550 5.1.1 at
-- RCPT for every address not on it. Addresses are stored lowercased: Exchange Online treats
-- local parts case-insensitively, and so does the intake's comparison.
CREATE TABLE recipient_lists (
    domain  text NOT NULL REFERENCES domains (name) ON DELETE CASCADE,
    address text NOT NULL,
    PRIMARY KEY (domain, address)
);
