"""Delivery: release held mail to each domain's route, paced, with proof of every delivery.

Modules, one concept each: ``routing`` (+ ``dnscache``) picks hops, ``transport`` speaks SMTP
to one hop, ``pacing`` limits rate, ``engine`` drains one destination, ``scheduler`` decides
which destinations to drain, ``outcomes`` maps results to recipient states, ``bounce`` builds
and sends RFC 3464 DSNs on an operator's request.
"""

from __future__ import annotations

from mxspool.delivery.scheduler import Scheduler, delivery_component

__all__ = ["Scheduler", "delivery_component"]
