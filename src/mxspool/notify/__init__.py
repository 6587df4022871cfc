"""Notifications: tell operators when the backlog grows, mail is parked, a release starts or
ends, disk runs low or a cluster node disappears, by webhook or email (``[[notify]]``).

``events`` defines what is said; ``detector`` decides when, from the store's counters;
``webhook`` and ``mail`` say it; ``dispatcher`` queues and retries per target without ever
blocking intake or delivery; ``component`` runs it all inside ``mxspool serve``; ``commands``
adds ``mxspool notify test``.
"""
