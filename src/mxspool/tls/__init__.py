"""The SMTP listener's certificate: where it lives, what it says, reloading it, and ACME.

STARTTLS on a public MX must keep working for the whole migration, which can outlast a
certificate. This package reads and checks the served PEM pair (``certinfo``), loads a changed
pair for new connections without a restart (``reloader``), obtains and renews one from an ACME
CA (``acme``, ``challenges``, ``renewal``) and reports on it (``check``, ``commands``).
"""
