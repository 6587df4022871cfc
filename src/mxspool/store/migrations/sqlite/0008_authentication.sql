-- Authentication at arrival (SPF, DKIM, DMARC), recorded with the message, never in its bytes.
--
-- auth_results: the Authentication-Results header value (RFC 8601) as computed at arrival,
-- without the field name or CRLF ("mx.example; spf=pass smtp.mailfrom=...; dkim=pass ...").
-- auth_at: when it was computed. Both NULL until the verdict is stored (a few milliseconds
-- after the commit, at most [smtp] authentication_timeout), and for mail accepted while
-- authentication was off. The release seals auth_results with ARC.
ALTER TABLE messages ADD COLUMN auth_results TEXT;
ALTER TABLE messages ADD COLUMN auth_at REAL;
