"""The unit syntax of the config file: durations, sizes, rates."""

from __future__ import annotations

import pytest

from pyproxy.config.schema import Rate
from pyproxy.config.units import parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (2, 2.0),
        (0.5, 0.5),
        ("250ms", 0.25),
        ("2s", 2.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5m", 90.0),
        (".5s", 0.5),
        ("10", 10.0),  # a number written as a string (e.g. from ${ENV}) is seconds
        (" 3s ", 3.0),
        ("2 s", 2.0),
        ("100MS", 0.1),
    ],
)
def test_duration_forms(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value", ["fast", "", "2 seconds", "5d", "-1s", "1h30m", "s", "2ss", None, [1], {}]
)
def test_duration_rejects_bad_text(value: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(value)


def test_duration_message_shows_value_and_examples() -> None:
    with pytest.raises(ValueError) as error:
        parse_duration("fast")
    assert str(error.value) == "invalid duration 'fast' (use e.g. 250ms, 2s, 5m)"


@pytest.mark.parametrize("value", [-1, -0.001])
def test_duration_rejects_negative_numbers(value: float) -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_duration(value)


@pytest.mark.parametrize("value", [True, False])
def test_duration_rejects_bools(value: bool) -> None:
    # YAML `yes`/`true` is a bool, and bool is an int in Python: it must not be 1 second.
    with pytest.raises(ValueError, match="true/false"):
        parse_duration(value)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_duration_rejects_non_finite(value: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (1024, 1024),
        (2048.0, 2048),
        ("512B", 512),
        ("512", 512),
        ("64KiB", 64 * 1024),
        ("10MiB", 10 * 1024**2),
        ("1GiB", 1024**3),
        ("1KB", 1000),
        ("10MB", 10_000_000),
        ("2GB", 2_000_000_000),
        ("1.5KiB", 1536),
        ("1.1KB", 1100),  # exact, although 1.1 * 1000 is not in floating point
        ("0.3KB", 300),
        ("64kib", 65536),
        ("10 MiB", 10 * 1024**2),
    ],
)
def test_size_forms(value: object, size: int) -> None:
    found = parse_size(value)
    assert found == size
    assert type(found) is int


@pytest.mark.parametrize("value", ["10M", "10k", "big", "", "-1KiB", "1TiB", "KiB", None, [1]])
def test_size_rejects_bad_text(value: object) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(value)


@pytest.mark.parametrize("value", [1.5, "1.1B", "0.0001KB", "1.0001KiB"])
def test_size_rejects_fractions_of_a_byte(value: object) -> None:
    with pytest.raises(ValueError, match="whole number of bytes"):
        parse_size(value)


def test_size_rejects_negative_and_bools() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_size(-1)
    with pytest.raises(ValueError, match="true/false"):
        parse_size(True)


@pytest.mark.parametrize(
    ("value", "rate"),
    [
        ("100/second", Rate(100, 1.0)),
        ("100/minute", Rate(100, 60.0)),
        ("100/hour", Rate(100, 3600.0)),
        ("5/s", Rate(5, 1.0)),
        ("5/m", Rate(5, 60.0)),
        ("5/h", Rate(5, 3600.0)),
        ("7 / Minute", Rate(7, 60.0)),
        (30, Rate(30, 60.0)),  # a bare integer is per minute
        ("30", Rate(30, 60.0)),
    ],
)
def test_rate_forms(value: object, rate: Rate) -> None:
    assert parse_rate(value) == rate


def test_rate_helpers() -> None:
    assert parse_rate("120/minute").per_second == 2.0
    assert str(parse_rate("5/s")) == "5/second"


@pytest.mark.parametrize("value", ["5/day", "5/fortnight"])
def test_rate_rejects_unknown_periods(value: str) -> None:
    with pytest.raises(ValueError, match="second, minute or hour"):
        parse_rate(value)


@pytest.mark.parametrize("value", ["fast", "", "1.5/s", "/s", "-5/s", 2.5, None, [5]])
def test_rate_rejects_bad_forms(value: object) -> None:
    with pytest.raises(ValueError, match="invalid rate"):
        parse_rate(value)


@pytest.mark.parametrize("value", [0, "0/s", "0"])
def test_rate_count_must_be_at_least_one(value: object) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        parse_rate(value)


def test_rate_rejects_bools() -> None:
    with pytest.raises(ValueError, match="true/false"):
        parse_rate(True)
