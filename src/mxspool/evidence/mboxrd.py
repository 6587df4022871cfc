"""mboxrd: the mbox variant whose quoting can be undone exactly.

In an mbox, a line starting with ``From `` begins a new message, so such lines inside a message
must be quoted. mboxo quotes ``From `` as ``>From `` but leaves ``>From `` alone, so a reader
cannot tell which ``>`` to take off. mboxrd quotes every line that matches ``>*From `` with one
more ``>``; a reader takes one ``>`` off every line that matches ``>+From ``, and gets the
message back byte for byte (the unquoting is the regular expression ``^>(>*From )`` -> ``\\1``,
applied per line).

:class:`Quoter` does this on a stream of pieces cut anywhere (a line may span pieces), holding
only a count of ``>`` and at most four bytes of ``From`` between pieces: memory stays constant
whatever the size of the message or its lines.
"""

from __future__ import annotations

FROM = b"From "
GT = 0x3E  # ">"
NL = 0x0A


class Quoter:
    """Feed a message's bytes in pieces; get them back mboxrd-quoted."""

    def __init__(self) -> None:
        self._at_start = True
        self._gts = 0  # ">" seen at the start of the current line, not yet written
        self._partial = b""  # a prefix of "From " seen after them, not yet written

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        i, n = 0, len(data)
        while i < n:
            if not self._at_start:
                end = data.find(b"\n", i)
                if end < 0:
                    out += data[i:]
                    return bytes(out)
                out += data[i : end + 1]
                i = end + 1
                self._at_start = True
                continue
            if not self._partial:
                while i < n and data[i] == GT:
                    self._gts += 1
                    i += 1
                if i == n:
                    return bytes(out)
            want = len(FROM) - len(self._partial)
            take = data[i : i + want]
            candidate = self._partial + take
            maybe_from = FROM.startswith(candidate) and len(candidate) < len(FROM)
            if maybe_from and i + len(take) == n:  # the piece ends inside what may be "From "
                self._partial = candidate
                return bytes(out)
            quoted = candidate == FROM
            out += b">" * (self._gts + quoted)
            out += self._partial
            self._gts, self._partial = 0, b""
            self._at_start = False
        return bytes(out)

    def finish(self) -> bytes:
        """What is held back at the end of the message (it was not a ``From `` line)."""
        rest = b">" * self._gts + self._partial
        self._gts, self._partial, self._at_start = 0, b"", True
        return rest
