"""Parsers for the unit syntax of the config file: durations, sizes and rates.

Each parser takes a value as YAML produced it (int, float or str) and returns the
canonical form the `Config` dataclasses hold, or raises `ValueError` with a short
message meant for a person ("invalid duration 'fast' (use e.g. 250ms, 2s, 5m)").
The caller adds the field path. These are pure functions with no pyproxy imports.

YAML reads `true` as a bool and Python's bool is a subclass of int, so every parser
refuses bools explicitly: `timeout: yes` is a mistake, not one second.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from pyproxy.config.schema import Rate

_NUMBER = r"(\d+(?:\.\d+)?|\.\d+)"  # unsigned: a sign in front is always a mistake here

DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(_NUMBER + r"\s*(ms|s|m|h)?", re.IGNORECASE)

# Binary units are what memory and buffers are counted in; the decimal ones are here
# because people write "10MB" and mean it. Bare "k"/"M" are refused: nginx reads them
# as 1024, most other tools as 1000, and a silent factor of 1.024 is a bad surprise.
SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_SIZE = re.compile(_NUMBER + r"\s*([a-z]+)?", re.IGNORECASE)

RATE_PERIODS = {
    "s": 1.0,
    "second": 1.0,
    "m": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
}
_RATE = re.compile(r"(\d+)\s*/\s*([a-z]+)", re.IGNORECASE)


def _refuse_bool(value: object, what: str) -> None:
    if isinstance(value, bool):
        raise ValueError(f"must be a {what}, not true/false")


def parse_duration(value: object) -> float:
    """Seconds as a float: `2`, `0.5`, `"250ms"`, `"2s"`, `"5m"`, `"1h"`. Never negative."""
    _refuse_bool(value, "duration")
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError("must be a finite duration")
        if seconds < 0:
            raise ValueError("must not be negative")
        return seconds
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match:
            number, unit = match.groups()
            return float(number) * DURATION_UNITS[(unit or "s").lower()]
    raise ValueError(f"invalid duration {value!r} (use e.g. 250ms, 2s, 5m)")


def parse_size(value: object) -> int:
    """Bytes as an int: `1024`, `"64KiB"`, `"10MiB"`, `"1GiB"`, `"10MB"` (10**7), `"512B"`."""
    _refuse_bool(value, "size")
    if isinstance(value, int | float):
        if not float(value).is_integer():
            raise ValueError("must be a whole number of bytes")
        if value < 0:
            raise ValueError("must not be negative")
        return int(value)
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        factor = SIZE_UNITS.get((match.group(2) or "b").lower()) if match else None
        if match and factor is not None:
            # Fraction, not float: 1.1 * 1000 is 1100.0000000000002 in floating point.
            size = Fraction(match.group(1)) * factor
            if size.denominator != 1:
                raise ValueError(f"{value!r} is not a whole number of bytes")
            return int(size)
    raise ValueError(f"invalid size {value!r} (use e.g. 512B, 64KiB, 10MiB, 1GiB)")


def parse_rate(value: object) -> Rate:
    """A `Rate`: `"100/minute"`, `"5/s"`, `"1000/hour"`; a bare integer means per minute."""
    _refuse_bool(value, "rate")
    if isinstance(value, int):
        count, period = value, 60.0
    elif isinstance(value, str) and value.strip().isdigit():
        count, period = int(value), 60.0  # a bare number that came through ${ENV}
    elif isinstance(value, str) and (match := _RATE.fullmatch(value.strip())):
        count_text, unit = match.groups()
        found = RATE_PERIODS.get(unit.lower())
        if found is None:
            raise ValueError(f"invalid rate {value!r}: the period must be second, minute or hour")
        count, period = int(count_text), found
    else:
        raise ValueError(f"invalid rate {value!r} (use e.g. 100/minute, 5/second, 1000/hour)")
    if count < 1:
        raise ValueError("the rate's count must be at least 1 (use null to turn the limit off)")
    return Rate(count, period)
