"""HealthStatus: rise/fall streaks, the unknown start, thresholds, thread safety."""

from __future__ import annotations

import threading

import pytest
from conftest import ChangedOnlyUnderLock, run_to_end

from pyproxy.pool.health import HealthStatus


def feed(status: HealthStatus, results: str, start: float = 0.0) -> list[bool]:
    """Record "p" (pass) / "f" (fail) results one second apart; return the transitions."""
    return [
        status.record(r == "p", "200" if r == "p" else "connect refused", start + i)
        for i, r in enumerate(results)
    ]


def test_config_backend_starts_up_and_never_probed() -> None:
    status = HealthStatus(2, 3, initially_up=True)
    assert status.up and status.state == "up"
    assert (status.pass_streak, status.fail_streak) == (0, 0)
    assert status.last_probe_at is None and status.last_result is None
    assert status.changed_at is None


def test_up_goes_down_after_unhealthy_threshold_failures() -> None:
    status = HealthStatus(2, 3, initially_up=True)
    assert feed(status, "fffff") == [False, False, True, False, False]
    assert not status.up and status.state == "down"
    assert status.fail_streak == 5
    assert status.changed_at == 2.0


def test_a_pass_resets_the_fail_streak() -> None:
    status = HealthStatus(2, 3, initially_up=True)
    assert feed(status, "ffpff") == [False] * 5
    assert status.up
    assert (status.pass_streak, status.fail_streak) == (0, 2)


def test_down_comes_back_after_healthy_threshold_passes() -> None:
    status = HealthStatus(2, 1, initially_up=True)
    feed(status, "f")
    assert feed(status, "ppp", start=10) == [False, True, False]
    assert status.up and status.pass_streak == 3 and status.fail_streak == 0


def test_a_failure_resets_the_pass_streak() -> None:
    status = HealthStatus(3, 1, initially_up=False)
    assert feed(status, "ppfpp") == [False] * 5
    assert not status.up
    assert status.pass_streak == 2


def test_unknown_is_not_up_until_the_first_pass() -> None:
    status = HealthStatus(healthy_threshold=5, unhealthy_threshold=3, initially_up=None)
    assert not status.up and status.state == "unknown"
    assert feed(status, "fp") == [False, True]  # one pass is enough from unknown
    assert status.up and status.state == "up"


def test_unknown_goes_down_after_unhealthy_threshold_failures() -> None:
    status = HealthStatus(2, 3, initially_up=None)
    assert feed(status, "ff") == [False, False]
    assert status.state == "unknown"
    assert feed(status, "f", start=2) == [True]
    assert status.state == "down"
    assert feed(status, "p", start=3) == [False]  # now it needs the full rise
    assert feed(status, "p", start=4) == [True]


def test_initially_down() -> None:
    status = HealthStatus(2, 3, initially_up=False)
    assert status.state == "down"
    assert feed(status, "pp") == [False, True]


def test_last_result_and_time_are_kept() -> None:
    status = HealthStatus(2, 3, initially_up=True)
    status.record(False, "timeout", 42.5)
    assert (status.last_result, status.last_probe_at) == ("timeout", 42.5)
    status.record(True, "204", 47.5)
    assert (status.last_result, status.last_probe_at) == ("204", 47.5)


def test_update_thresholds_keeps_state_and_applies_at_the_next_result() -> None:
    status = HealthStatus(2, 5, initially_up=True)
    feed(status, "ff")
    status.update_thresholds(2, 2)
    assert status.up and status.fail_streak == 2  # nothing happens until a result
    assert feed(status, "f", start=2) == [True]
    status.update_thresholds(4, 2)
    assert feed(status, "ppp", start=3) == [False, False, False]
    assert feed(status, "p", start=6) == [True]


def test_thresholds_below_one_act_as_one() -> None:
    status = HealthStatus(0, 0, initially_up=True)
    assert feed(status, "fp") == [True, True]


@pytest.mark.usefixtures("busy_switching")
def test_concurrent_passes_report_the_transition_exactly_once() -> None:
    status = HealthStatus(healthy_threshold=50, unhealthy_threshold=1, initially_up=False)
    transitions: list[bool] = []
    lock = threading.Lock()

    def prober() -> None:
        mine = [status.record(True, "200", 0.0) for _ in range(2000)]
        with lock:
            transitions.extend(mine)

    run_to_end([threading.Thread(target=prober) for _ in range(8)])
    assert transitions.count(True) == 1
    assert status.up and status.pass_streak == 16000


class WatchedStatus(ChangedOnlyUnderLock, HealthStatus):
    """A HealthStatus that fails any field change made without its lock held."""


def test_every_change_happens_under_the_lock() -> None:
    status = WatchedStatus(2, 2, initially_up=None)
    status.watching = True  # a class attribute set on the instance: not a field
    feed(status, "pffpp")
    status.update_thresholds(3, 3)
    assert status.up and status.changed_at == 4.0


def test_only_real_transitions_are_counted() -> None:
    status = HealthStatus(healthy_threshold=2, unhealthy_threshold=2, initially_up=None)
    results = [True, True, False, False, False, True, True, True]
    changes = [status.record(passed, "x", float(i)) for i, passed in enumerate(results)]
    # unknown -> up (first pass), up -> down (2nd failure), down -> up (2nd pass)
    assert changes == [True, False, False, True, False, False, True, False]
    assert status.transitions == 3
