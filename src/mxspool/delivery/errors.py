"""The few exceptions delivery code sees; dependency errors are mapped to these at the edge.

Like httpcore, the SMTP client and the router translate ssl, OSError, timeout, protocol and
dnspython failures into these classes, so the scheduler decides retry-or-park from one attribute
(``permanent``) and never imports a dependency's exception types.
"""

from __future__ import annotations


class DeliveryError(Exception):
    """A delivery attempt could not complete; ``str(error)`` is the reason kept in the ledger."""

    permanent = False
    """True: retrying cannot help without an operator (the recipients are parked)."""


class RoutingError(DeliveryError):
    """No next hop could be determined (DNS failure, no route configured)."""


class RoutingRefused(RoutingError):
    """The destination says it takes no mail (null MX) or does not exist (NXDOMAIN)."""

    permanent = True


class ConnectFailed(DeliveryError):
    """No SMTP session could be opened with any hop (refused, timeout, bad greeting)."""


class TlsFailed(ConnectFailed):
    """TLS was required by the route and could not be established; nothing was sent in clear."""


class ConnectionLost(DeliveryError):
    """The session broke in the middle (disconnect, timeout, protocol garbage)."""


class Unsupported(DeliveryError):
    """The message needs an extension the hop lacks (8BITMIME, SMTPUTF8); we never convert."""

    permanent = True
