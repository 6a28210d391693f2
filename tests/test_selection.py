"""Unit tests of pyproxy/policy/selection.py: each policy picks among the candidates it is given."""

from __future__ import annotations

import random
import threading
from collections import Counter
from dataclasses import dataclass

import pytest

from pyproxy.config.schema import STRATEGIES
from pyproxy.policy.selection import (
    SELECTORS,
    LeastConnections,
    Random,
    RoundRobin,
    Weighted,
    make_selector,
)


@dataclass
class Fake:
    name: str
    weight: int = 1
    in_flight: int = 0


def picks(selector: object, candidates: list[Fake], count: int) -> list[str]:
    chosen = [selector.choose(candidates) for _ in range(count)]  # type: ignore[attr-defined]
    return [c.name for c in chosen]


ABC = [Fake("a"), Fake("b"), Fake("c")]


def test_the_registry_names_every_strategy_of_the_config() -> None:
    assert set(SELECTORS) == set(STRATEGIES)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_policy_returns_none_for_no_candidates_and_the_only_one_for_one(
    strategy: str,
) -> None:
    selector = make_selector(strategy)
    only = Fake("only", weight=3)

    assert selector.choose([]) is None
    assert all(selector.choose([only]) is only for _ in range(5))


def test_make_selector_returns_a_fresh_policy_each_time() -> None:
    first, second = make_selector("round_robin"), make_selector("round_robin")

    assert first is not second
    assert picks(first, ABC, 2) == picks(second, ABC, 2) == ["a", "b"]


# -- round robin ------------------------------------------------------------------------------


def test_round_robin_takes_each_in_turn() -> None:
    assert picks(RoundRobin(), ABC, 7) == ["a", "b", "c", "a", "b", "c", "a"]


def test_round_robin_spreads_evenly_when_the_candidates_change() -> None:
    selector = RoundRobin()
    names = picks(selector, ABC, 3) + picks(selector, ABC[:2], 4)

    assert Counter(names[3:]) == {"a": 2, "b": 2}


def test_round_robin_is_exact_under_concurrent_picks() -> None:
    selector = RoundRobin()
    results: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = picks(selector, ABC, 3000)
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=worker, name=f"test-rr-{i}") for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert Counter(results) == {"a": 4000, "b": 4000, "c": 4000}


# -- random -----------------------------------------------------------------------------------


def test_random_uses_the_injected_source() -> None:
    first = picks(Random(random.Random(7)), ABC, 30)
    second = picks(Random(random.Random(7)), ABC, 30)

    assert first == second


def test_random_is_roughly_uniform() -> None:
    counts = Counter(picks(Random(random.Random(1)), ABC, 3000))

    assert all(900 <= n <= 1100 for n in counts.values()), counts


# -- least connections -----------------------------------------------------------------------------


def test_least_connections_picks_the_fewest_in_flight() -> None:
    candidates = [Fake("a", in_flight=3), Fake("b", in_flight=1), Fake("c", in_flight=2)]

    assert set(picks(LeastConnections(), candidates, 20)) == {"b"}


def test_least_connections_breaks_ties_at_random() -> None:
    candidates = [Fake("a", in_flight=0), Fake("b", in_flight=5), Fake("c", in_flight=0)]

    counts = Counter(picks(LeastConnections(random.Random(3)), candidates, 400))

    assert set(counts) == {"a", "c"}
    assert min(counts.values()) > 120  # not "first in the list wins"


def test_least_connections_follows_in_flight_as_it_changes() -> None:
    a, b = Fake("a"), Fake("b", in_flight=1)
    selector = LeastConnections(random.Random(0))

    assert selector.choose([a, b]) is a
    a.in_flight = 2
    assert selector.choose([a, b]) is b


# -- weighted --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights", [{"a": 5, "b": 1, "c": 1}, {"a": 3, "b": 2}, {"a": 1, "b": 1, "c": 1}, {"a": 7}]
)
def test_weighted_gives_each_its_weight_in_every_window_of_sum_weights(
    weights: dict[str, int],
) -> None:
    candidates = [Fake(name, weight=w) for name, w in weights.items()]
    window = sum(weights.values())

    names = picks(Weighted(), candidates, 5 * window)

    for start in range(len(names) - window + 1):
        assert Counter(names[start : start + window]) == weights, (start, names)


def test_weighted_is_smooth_like_nginx() -> None:
    candidates = [Fake("a", weight=5), Fake("b", weight=1), Fake("c", weight=1)]

    # The sequence nginx documents for 5:1:1 (ngx_http_upstream_round_robin.c).
    assert picks(Weighted(), candidates, 7) == ["a", "a", "b", "a", "c", "a", "a"]


def test_weighted_recovers_its_proportions_after_the_set_changes() -> None:
    selector = Weighted()
    a, b, c = Fake("a", weight=2), Fake("b", weight=1), Fake("c", weight=1)
    picks(selector, [a, b, c], 5)

    names = picks(selector, [a, b], 300)

    counts = Counter(names)
    assert set(counts) == {"a", "b"}
    assert 190 <= counts["a"] <= 210, counts


def test_weighted_is_exact_under_concurrent_picks() -> None:
    selector = Weighted()
    candidates = [Fake("a", weight=3), Fake("b", weight=2), Fake("c", weight=1)]
    results: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = picks(selector, candidates, 1200)
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=worker, name=f"test-w-{i}") for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert Counter(results) == {"a": 2400, "b": 1600, "c": 800}
