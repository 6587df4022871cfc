"""Parsing of the human units used in configuration and on the command line.

Times accept ``30s``, ``5m``, ``2h``, ``14d``; sizes accept ``10MB``, ``150MiB`` or bytes;
rates accept ``N/s``, ``N/min``, ``N/h`` (``0`` means unpaced).
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|m|min|h|hour))?\s*$")
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0}


def parse_duration(value: str | int | float) -> float:
    """Seconds in ``value`` ("30s", "5m", "2h", "14d"; a bare number is seconds)."""
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"duration must not be negative: {value!r}")
        return float(value)
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 5m, 2h, 14d)")
    number, unit = match.groups()
    return float(number) * _DURATION_UNITS[unit or "s"]


def parse_size(value: str | int) -> int:
    """Bytes in ``value`` ("10MB", "150MiB", "1GiB" or a number of bytes)."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: {value!r}")
        return value
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"not a size: {value!r} (use e.g. 10MB, 150MiB or a number of bytes)")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "").lower()])


def parse_rate(value: str | int | float) -> float:
    """Events per second in ``value`` ("600/min", "10/s", "3600/h"); 0 means unpaced."""
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"rate must not be negative: {value!r}")
        return float(value)
    match = _RATE.match(value)
    if not match:
        raise ValueError(f"not a rate: {value!r} (use e.g. 10/s, 600/min, 3600/h or 0)")
    number, unit = match.groups()
    return float(number) / _RATE_UNITS[unit or "s"]


def format_duration(seconds: float) -> str:
    """A short human form of ``seconds`` for status output."""
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"
