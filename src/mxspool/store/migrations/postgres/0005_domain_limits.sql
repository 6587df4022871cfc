-- Per-domain limits of the recipient gate (issue 11).
--
-- domains.max_size: the largest message (bytes) the target takes for the domain; NULL = the
-- profile's default, else [smtp] max_message_size. domains.subdomains: the domain's
-- subdomains are accepted, routed and held like it. domains.plus_separator: sub-addressing
-- (local+tag@domain accepted when local@domain is); '' = off.
ALTER TABLE domains ADD COLUMN max_size bigint;
ALTER TABLE domains ADD COLUMN subdomains boolean NOT NULL DEFAULT false;
ALTER TABLE domains ADD COLUMN plus_separator text NOT NULL DEFAULT '+';

-- A mailbox's MaxReceiveSize from the Get-Mailbox export (bytes); NULL = unknown or Unlimited.
ALTER TABLE recipient_lists ADD COLUMN max_size bigint;
