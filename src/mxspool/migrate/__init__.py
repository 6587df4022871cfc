"""The migration toolkit: preflight checks, readiness probes, the runbook, recipient lists.

Everything here serves the operator's story (docs/design.md) for a Microsoft 365 tenant move:
catch the classic mistakes (MX TTL too long, MTA-STS without the spooler, a route that refuses
TLS, mailboxes not yet created at the target) before they cost mail.
"""
