"""Field checkers: small functions that turn one YAML value into one typed setting.

A checker takes the value as YAML produced it and returns what the `Config`
dataclass holds, or raises `ValueError("<message for a person>")`; the caller adds
the field path. Checkers that need an argument (a range, a set of choices) are made
by a factory: `integer(minimum=1)` returns the checker. `sections.py` lists them in
one table per section, so adding a setting is one line there.

Checkers of containers (`each`, `mapping`, `section`) raise `Invalid`, carrying one
message per bad element with its sub-path, so the user sees every mistake
(`retries.retry_on[3]: ...`, `timeouts.read: ...`), not just the first.

This module holds the generic checkers; `values.py` the syntaxes particular to
pyproxy (addresses, backend URLs, status ranges, ...).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from pyproxy.config import units

Checker = Callable[[Any], Any]


class Invalid(ValueError):
    """Several problems inside one value, each as (sub-path such as "[2]", message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{sub}: {msg}" for sub, msg in problems))
        self.problems = problems


class FromEnv(str):
    """A string whose whole text came from one `${VAR}`.

    `threads: ${THREADS}` should give a number, yet `${...}` lives inside a YAML
    string. Typed checkers read such a value the way YAML would have read it had it
    been written there; everywhere else it is an ordinary string.
    """


class Unresolved:
    """Stands in for a string whose `${VAR}` could not be expanded.

    The expansion pass cannot know which keys are valid, so it leaves this marker and
    the checking pass reports `message` at the field's path instead of checking the
    value: one problem per mistake, and an unknown key is still called unknown.
    """

    def __init__(self, message: str) -> None:
        self.message = message


def run(checker: Checker, value: Any) -> Any:
    """Apply `checker`, unless the value is an `Unresolved` marker: then report it."""
    if isinstance(value, Unresolved):
        raise ValueError(value.message)
    return checker(value)


# ${NAME}; anything else that starts with "${" is a malformed reference.
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value: Any, env: Mapping[str, str]) -> Any:
    """Replace `${NAME}` in every string inside `value` (keys are left alone).

    A string naming an unset variable becomes an `Unresolved` marker, which the
    checking pass reports under the field's path. A string that is exactly one
    reference becomes `FromEnv`, so `threads: ${THREADS}` can still be a number.
    """
    if isinstance(value, dict):
        return {key: expand_env(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [expand_env(item, env) for item in value]
    if not isinstance(value, str) or "${" not in value:
        return value
    if "${" in _ENV_REFERENCE.sub("", value):
        return Unresolved("malformed ${...} reference (write ${NAME})")
    missing = [name for name in _ENV_REFERENCE.findall(value) if name not in env]
    if missing:
        names = ", ".join(dict.fromkeys(missing))
        return Unresolved(f"environment variable {names} is not set")
    expanded = _ENV_REFERENCE.sub(lambda match: env[match.group(1)], value)
    return FromEnv(expanded) if _ENV_REFERENCE.fullmatch(value) else expanded


def _from_env(value: Any) -> Any:
    if not isinstance(value, FromEnv):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return str(value)  # not a YAML scalar: leave it a string for the checker to refuse


def integer(minimum: int | None = None, maximum: int | None = None) -> Checker:
    """An int (or a float with no fraction, such as 3.0) in [minimum, maximum]."""
    if minimum is not None and maximum is not None:
        wanted = f"an integer from {minimum} to {maximum}"
    elif minimum is not None:
        wanted = f"an integer >= {minimum}"
    else:
        wanted = "an integer"

    def check(value: Any) -> int:
        value = _from_env(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if (
            not isinstance(value, int)
            or isinstance(value, bool)  # YAML `true` is an int in Python
            or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)
        ):
            raise ValueError(f"must be {wanted}")
        return value

    return check


def number(minimum: float, maximum: float) -> Checker:
    """An int or float in [minimum, maximum], returned as float."""

    def check(value: Any) -> float:
        value = _from_env(value)
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not minimum <= value <= maximum  # also false for NaN
        ):
            raise ValueError(f"must be a number from {minimum:g} to {maximum:g}")
        return float(value)

    return check


fraction = number(0.0, 1.0)


def boolean(value: Any) -> bool:
    value = _from_env(value)
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def duration(positive: bool = False) -> Checker:
    """A duration in seconds; `positive=True` also refuses 0 where 0 has no sane meaning."""

    def check(value: Any) -> float:
        seconds = units.parse_duration(value)
        if positive and seconds == 0:
            raise ValueError("must be a duration > 0 (e.g. 500ms, 5s)")
        return seconds

    return check


def size(minimum: int = 0) -> Checker:
    def check(value: Any) -> int:
        found = units.parse_size(value)
        if found < minimum:
            raise ValueError(f"must be a size of at least {minimum} bytes")
        return found

    return check


def rate(value: Any) -> Any:
    return units.parse_rate(value)


def optional(checker: Checker) -> Checker:
    """`null` stays None (meaning "off" or "not set"); anything else goes to `checker`."""
    # `${VAR}` with VAR empty or "null" is null too, like the same text written in YAML.
    return lambda value: None if _from_env(value) is None else checker(value)


def one_of(*choices: str) -> Checker:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)} (got {value!r})")
        return str(value)

    return check


def text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return str(value)


def each(checker: Checker) -> Checker:
    """A checker for a list whose elements each go through `checker`."""

    def check(value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise ValueError("must be a list")
        results: list[Any] = []
        problems: list[tuple[str, str]] = []
        for index, item in enumerate(value):
            try:
                results.append(run(checker, item))
            except Invalid as error:
                problems.extend((f"[{index}]{sub}", message) for sub, message in error.problems)
            except ValueError as error:
                problems.append((f"[{index}]", str(error)))
        if problems:
            raise Invalid(problems)
        return results

    return check


def mapping(value: Any, table: dict[str, Checker], required: tuple[str, ...] = ()) -> dict:
    """Check every key of a YAML mapping against `table`; return the checked values.

    Unknown keys are errors (a typo must not be silently ignored); all problems are
    collected and raised together as `Invalid`, with sub-paths such as ".weight".
    """
    if value is None:
        value = {}  # a section whose lines are all commented out: every default
    if not isinstance(value, dict):
        raise ValueError("must be a mapping of settings (key: value)")
    values: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for key, raw in value.items():
        checker = table.get(key) if isinstance(key, str) else None
        if checker is None:
            close = difflib.get_close_matches(str(key), table, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append((f".{key}", f"unknown key{hint}"))
            continue
        try:
            values[key] = run(checker, raw)
        except Invalid as error:
            problems.extend((f".{key}{sub}", message) for sub, message in error.problems)
        except ValueError as error:
            problems.append((f".{key}", str(error)))
    problems.extend((f".{key}", "is required") for key in required if key not in value)
    if problems:
        raise Invalid(problems)
    return values


Rule = Callable[[Any], list[tuple[str, str]]]


def section(cls: type, table: dict[str, Checker], rules: tuple[Rule, ...] = ()) -> Checker:
    """A checker that builds dataclass `cls` from a mapping; absent keys keep their default.

    `rules` check relations between fields (max >= min) once every field is valid;
    each returns a list of (sub-path, message).
    """

    def check(value: Any) -> Any:
        result = cls(**mapping(value, table))
        problems = [problem for rule in rules for problem in rule(result)]
        if problems:
            raise Invalid(problems)
        return result

    return check


def overlay(base: Any, table: dict[str, Checker], rules: tuple[Rule, ...] = ()) -> Checker:
    """Like `section`, but absent keys keep `base`'s values (a pool over the top level)."""

    def check(value: Any) -> Any:
        result = dataclasses.replace(base, **mapping(value, table))
        problems = [problem for rule in rules for problem in rule(result)]
        if problems:
            raise Invalid(problems)
        return result

    return check
