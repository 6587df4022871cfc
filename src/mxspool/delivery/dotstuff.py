"""Dot-stuffing for DATA (RFC 5321 section 4.5.2), sans-IO and chunk-boundary safe.

The stored bytes go out unchanged except for one extra "." before every "." that starts a
line, and the terminating "<CRLF>.<CRLF>". A line starts after LF, so a "." after a bare LF is
stuffed too: a next hop that (wrongly) ends lines at bare LF can never see an early end of
data. Nothing else is rewritten (some SMTP libraries also turn bare CR and LF into CRLF, which
would change the bytes we promised to keep).
"""

from __future__ import annotations


class DotStuffer:
    """Feed the body in pieces of any size; ``finish`` gives the end-of-data marker."""

    def __init__(self) -> None:
        self._tail = b"\n"  # the last (up to) two bytes seen; "\n" = "at the start of a line"
        self._empty = True

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        out = data.replace(b"\n.", b"\n..")
        if self._tail.endswith(b"\n") and data[:1] == b".":
            out = b"." + out
        self._tail = (self._tail + data)[-2:]
        self._empty = False
        return out

    def finish(self) -> bytes:
        """The end-of-data marker; a CRLF first when the body did not end a line (it always
        does for mail mxspool accepted, but the wire format needs the line closed)."""
        if self._empty or self._tail == b"\r\n":
            return b".\r\n"
        return b"\r\n.\r\n"
