"""Selection policies: given the backends available right now, pick one.

A policy is one method, `choose(candidates)`. It never decides *whether* a backend may
take traffic (that is `why_unavailable()` in runtime/snapshot.py, consulted before); it only picks
among the ones that may. `SELECTORS` maps the config's `strategy` names to classes.
Every policy is O(number of candidates) per pick, the same as the availability filter
in front of it, so a pick stays cheap next to the network round trip.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Sequence
from typing import Protocol, TypeVar


class Candidate(Protocol):
    """What a policy may look at: a name, a weight and the requests in flight."""

    @property
    def name(self) -> str: ...
    @property
    def weight(self) -> int: ...
    @property
    def in_flight(self) -> int: ...


C = TypeVar("C", bound=Candidate)


class Selector(Protocol):
    def choose(self, candidates: Sequence[C]) -> C | None: ...


class RoundRobin:
    """Each candidate in turn. `itertools.count` is atomic under the GIL, so no lock."""

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[C]) -> C | None:
        if not candidates:
            return None
        return candidates[next(self._turn) % len(candidates)]


class Random:
    """Uniformly at random; the random source is injectable for exact tests."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[C]) -> C | None:
        if not candidates:
            return None
        return candidates[self._rng.randrange(len(candidates))]


class LeastConnections:
    """Fewest requests in flight; ties broken at random so that equally idle
    backends share the load instead of the first one in the list taking it all."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[C]) -> C | None:
        if len(candidates) <= 1:
            # None, or the only one: what the comparison below would pick, without it
            # (0.61 -> 0.08 us; a pool of one, or all but one backend down).
            return candidates[0] if candidates else None
        fewest = min(candidate.in_flight for candidate in candidates)
        tied = [candidate for candidate in candidates if candidate.in_flight == fewest]
        return tied[0] if len(tied) == 1 else tied[self._rng.randrange(len(tied))]


class Weighted:
    """Smooth weighted round robin, nginx's algorithm (ngx_http_upstream_round_robin.c).

    Every pick, each candidate's `current` grows by its weight; the largest wins and
    gives back the sum of all weights. Over any sum(weights) consecutive picks each
    backend is chosen exactly weight times, and picks are interleaved (a, a, b for 2:1
    becomes a, b, a) rather than bunched. Candidates with weight 0 never reach here.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _current; held only for arithmetic
        self._current: dict[str, int] = {}

    def choose(self, candidates: Sequence[C]) -> C | None:
        if not candidates:
            return None
        with self._lock:
            total = 0
            best: C | None = None
            best_current = 0
            for candidate in candidates:
                current = self._current.get(candidate.name, 0) + candidate.weight
                self._current[candidate.name] = current
                total += candidate.weight
                if best is None or current > best_current:
                    best, best_current = candidate, current
            assert best is not None
            self._current[best.name] = best_current - total
            if len(self._current) > 2 * len(candidates) + 16:
                # Forget backends that are gone so the table tracks the live set.
                live = {candidate.name for candidate in candidates}
                self._current = {k: v for k, v in self._current.items() if k in live}
            return best


SELECTORS: dict[str, type[RoundRobin] | type[Random] | type[LeastConnections] | type[Weighted]] = {
    "round_robin": RoundRobin,
    "random": Random,
    "least_connections": LeastConnections,
    "weighted": Weighted,
}


def make_selector(strategy: str) -> Selector:
    return SELECTORS[strategy]()
