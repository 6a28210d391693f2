"""CircuitBreaker: every transition, trial slots, late results, settings, threads.

Time is a FakeClock the tests advance; nothing sleeps.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
from conftest import ChangedOnlyUnderLock, FakeClock

from pyproxy.config.schema import CircuitBreakerConfig
from pyproxy.pool.breaker import CircuitBreaker, CircuitState, Permit


def make(clock: FakeClock | None = None, **overrides: object) -> tuple[CircuitBreaker, FakeClock]:
    clock = clock or FakeClock()
    settings = CircuitBreakerConfig(
        **{  # type: ignore[arg-type]
            "failure_threshold": 3,
            "open_duration": 10.0,
            "max_open_duration": 100.0,
            "half_open_requests": 1,
            **overrides,
        }
    )
    return CircuitBreaker(settings, clock=clock), clock


def open_it(breaker: CircuitBreaker) -> None:
    while breaker.state is CircuitState.CLOSED:
        breaker.record_failure()


def fail_trial(breaker: CircuitBreaker, clock: FakeClock) -> float:
    """Wait out the open period, fail the trial; return the new open period."""
    assert breaker.reopens_at is not None
    clock.now = breaker.reopens_at
    permit = breaker.try_acquire()
    assert permit and permit.trial
    assert breaker.record_failure(permit) is True
    assert breaker.reopens_at is not None
    return breaker.reopens_at - clock.now


def test_gauge_values_follow_spec() -> None:
    assert [s.gauge_value for s in CircuitState] == [0, 1, 2]
    assert CircuitState.HALF_OPEN.value == "half_open"


def test_new_breaker_is_closed_and_admits() -> None:
    breaker, _ = make()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.allows_request()
    permit = breaker.try_acquire()
    assert isinstance(permit, Permit) and not permit.trial
    assert breaker.reopens_at is None
    assert (breaker.consecutive_failures, breaker.opens_total) == (0, 0)


def test_opens_after_threshold_consecutive_failures() -> None:
    breaker, clock = make()
    assert breaker.record_failure() is False
    assert breaker.record_failure() is False
    assert breaker.state is CircuitState.CLOSED
    assert breaker.record_failure() is True  # the third: a real transition
    assert breaker.state is CircuitState.OPEN
    assert breaker.reopens_at == clock.now + 10.0
    assert breaker.opens_total == 1
    assert not breaker.allows_request()
    assert breaker.try_acquire() is None


def test_success_resets_the_failure_count() -> None:
    breaker, _ = make()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.record_success() is False  # closed stays closed: no transition
    assert breaker.consecutive_failures == 0
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED


def test_open_turns_half_open_when_its_period_has_passed() -> None:
    breaker, clock = make()
    open_it(breaker)
    clock.advance(9.999)
    assert breaker.state is CircuitState.OPEN
    clock.advance(0.001)
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.reopens_at is None
    assert breaker.allows_request()


def test_allows_request_never_consumes_and_try_acquire_does() -> None:
    breaker, clock = make(half_open_requests=2)
    open_it(breaker)
    clock.advance(10)
    for _ in range(5):
        assert breaker.allows_request()
    first, second = breaker.try_acquire(), breaker.try_acquire()
    assert first and first.trial and second and second.trial
    assert breaker.trials_in_flight == 2
    assert not breaker.allows_request()
    assert breaker.try_acquire() is None
    breaker.release(first)  # the client left: its slot is free again
    assert breaker.trials_in_flight == 1
    assert breaker.allows_request()
    assert breaker.try_acquire()
    assert breaker.state is CircuitState.HALF_OPEN


def test_release_without_permit_frees_a_trial_slot() -> None:
    breaker, clock = make()
    open_it(breaker)
    clock.advance(10)
    assert breaker.try_acquire()
    breaker.release()
    assert breaker.trials_in_flight == 0
    breaker.release()  # never below zero
    assert breaker.trials_in_flight == 0


def test_releasing_a_pre_open_permit_frees_no_trial_slot() -> None:
    breaker, clock = make()
    old = breaker.try_acquire()
    open_it(breaker)
    clock.advance(10)
    assert breaker.try_acquire()
    breaker.release(old)
    assert breaker.trials_in_flight == 1
    assert not breaker.allows_request()


def test_trial_success_closes() -> None:
    breaker, clock = make()
    open_it(breaker)
    clock.advance(10)
    permit = breaker.try_acquire()
    assert breaker.record_success(permit) is True
    assert breaker.state is CircuitState.CLOSED
    assert breaker.consecutive_failures == 0
    assert breaker.trials_in_flight == 0


def test_trial_failure_reopens_for_twice_as_long_up_to_the_cap() -> None:
    breaker, clock = make(open_duration=10.0, max_open_duration=35.0)
    open_it(breaker)
    periods = [fail_trial(breaker, clock) for _ in range(4)]
    assert periods == [20.0, 35.0, 35.0, 35.0]
    assert breaker.opens_total == 5
    assert breaker.state is CircuitState.OPEN


def test_closing_resets_the_doubling() -> None:
    breaker, clock = make()
    open_it(breaker)
    assert fail_trial(breaker, clock) == 20.0
    assert fail_trial(breaker, clock) == 40.0
    clock.advance(40)
    assert breaker.record_success(breaker.try_acquire()) is True
    open_it(breaker)
    assert breaker.reopens_at == clock.now + 10.0


def test_late_success_while_open_does_not_close() -> None:
    breaker, _ = make()
    before = breaker.try_acquire()
    open_it(breaker)
    assert breaker.record_success(before) is False
    assert breaker.record_success() is False
    assert breaker.state is CircuitState.OPEN


def test_late_failure_while_open_does_not_extend_the_period() -> None:
    breaker, _ = make()
    open_it(breaker)
    reopens_at = breaker.reopens_at
    assert breaker.record_failure() is False
    assert breaker.reopens_at == reopens_at
    assert breaker.opens_total == 1


def test_pre_open_success_arriving_in_half_open_is_ignored() -> None:
    breaker, clock = make()
    slow = breaker.try_acquire()  # admitted while closed, finishes much later
    open_it(breaker)
    clock.advance(10)
    trial = breaker.try_acquire()
    assert trial
    assert breaker.record_success(slow) is False
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.trials_in_flight == 1  # the trial still holds its slot
    assert breaker.record_success(trial) is True


def test_pre_open_failure_arriving_in_half_open_is_ignored() -> None:
    breaker, clock = make()
    slow = breaker.try_acquire()
    open_it(breaker)
    clock.advance(10)
    assert breaker.try_acquire()
    assert breaker.record_failure(slow) is False
    assert breaker.state is CircuitState.HALF_OPEN


def test_result_without_permit_and_no_trial_out_is_ignored_in_half_open() -> None:
    breaker, clock = make()
    open_it(breaker)
    clock.advance(10)
    assert breaker.record_success() is False
    assert breaker.record_failure() is False
    assert breaker.state is CircuitState.HALF_OPEN


def test_other_trials_results_after_the_first_verdict_are_stale() -> None:
    breaker, clock = make(half_open_requests=2)
    open_it(breaker)
    clock.advance(10)
    one, two = breaker.try_acquire(), breaker.try_acquire()
    assert breaker.record_success(one) is True
    assert breaker.record_failure(two) is False  # from the half-open generation
    assert breaker.consecutive_failures == 0


def test_late_failures_from_before_an_outage_do_not_count_after_recovery() -> None:
    breaker, clock = make()
    stale = [breaker.try_acquire() for _ in range(3)]
    open_it(breaker)
    clock.advance(10)
    breaker.record_success(breaker.try_acquire())
    for permit in stale:
        assert breaker.record_failure(permit) is False
    assert breaker.state is CircuitState.CLOSED
    assert breaker.consecutive_failures == 0


def test_permits_of_a_closed_period_count_there_and_nowhere_else() -> None:
    """A closed circuit shares one permit per generation: after a recovery the new
    period's permits count, the ones handed out before the outage do not."""
    breaker, clock = make()
    before = breaker.try_acquire()
    assert before is not None and not before.trial
    open_it(breaker)
    clock.advance(10)
    assert breaker.record_success(breaker.try_acquire()) is True  # the trial closes it
    after = [breaker.try_acquire() for _ in range(3)]

    assert all(p is not None and not p.trial for p in after)
    assert {p.generation for p in after if p} == {breaker._generation} != {before.generation}
    assert breaker.record_failure(before) is False
    assert breaker.consecutive_failures == 0
    assert [breaker.record_failure(p) for p in after[:2]] == [False, False]
    assert breaker.consecutive_failures == 2
    assert breaker.record_success(after[2]) is False
    assert breaker.consecutive_failures == 0


def test_disabled_breaker_is_always_closed_and_admits_everything() -> None:
    breaker, _ = make(enabled=False, failure_threshold=1)
    for _ in range(10):
        assert breaker.record_failure() is False
    assert breaker.state is CircuitState.CLOSED
    assert breaker.allows_request()
    assert breaker.try_acquire()
    assert breaker.opens_total == 0


def test_update_settings_keeps_state_and_applies_new_values() -> None:
    breaker, _ = make(failure_threshold=5)
    for _ in range(3):
        breaker.record_failure()
    breaker.update_settings(CircuitBreakerConfig(failure_threshold=4, open_duration=7.0))
    assert breaker.consecutive_failures == 3
    assert breaker.record_failure() is True
    assert breaker.reopens_at is not None


def test_update_settings_on_a_closed_breaker_uses_the_new_open_duration() -> None:
    breaker, clock = make(open_duration=10.0)
    breaker.update_settings(CircuitBreakerConfig(failure_threshold=3, open_duration=4.0))
    open_it(breaker)
    assert breaker.reopens_at == clock.now + 4.0


def test_update_settings_cuts_a_long_open_period_short() -> None:
    breaker, clock = make(max_open_duration=100.0)
    open_it(breaker)
    fail_trial(breaker, clock)  # now open for 20 s
    opened = clock.now
    breaker.update_settings(CircuitBreakerConfig(open_duration=5.0, max_open_duration=8.0))
    assert breaker.reopens_at == opened + 8.0


def test_disabling_closes_an_open_circuit() -> None:
    breaker, _ = make()
    open_it(breaker)
    assert breaker.update_settings(CircuitBreakerConfig(enabled=False)) is True
    assert breaker.state is CircuitState.CLOSED
    breaker.update_settings(CircuitBreakerConfig(failure_threshold=3))
    assert breaker.state is CircuitState.CLOSED
    assert breaker.consecutive_failures == 0


def test_the_clock_is_never_called_under_the_lock() -> None:
    holder: list[CircuitBreaker] = []

    def clock() -> float:
        assert not holder[0]._lock.locked(), "clock called with the breaker lock held"
        return 0.0

    breaker = CircuitBreaker(CircuitBreakerConfig(failure_threshold=1), clock=clock)
    holder.append(breaker)
    breaker.allows_request()
    breaker.record_failure(breaker.try_acquire())
    breaker.record_success()
    assert breaker.state is CircuitState.OPEN


class WatchedBreaker(ChangedOnlyUnderLock, CircuitBreaker):
    """A CircuitBreaker that fails any field change made without its lock held."""


def test_every_change_happens_under_the_lock() -> None:
    clock = FakeClock()
    breaker = WatchedBreaker(CircuitBreakerConfig(failure_threshold=1), clock=clock)
    breaker.watching = True
    breaker.record_failure(breaker.try_acquire())
    clock.advance(30)
    assert breaker.state is CircuitState.HALF_OPEN
    permit = breaker.try_acquire()
    breaker.release(permit)
    breaker.record_success(breaker.try_acquire())
    breaker.update_settings(CircuitBreakerConfig(enabled=False))
    assert breaker.opens_total == 1 and breaker.state is CircuitState.CLOSED


def test_concurrent_try_acquire_hands_out_only_the_free_trial_slots() -> None:
    breaker, clock = make(half_open_requests=2)
    open_it(breaker)
    clock.advance(10)
    admits = breaker._admits

    def slow_admits(state: CircuitState) -> bool:
        verdict = admits(state)
        time.sleep(0.005)  # widen the check-then-take window that the lock must close
        return verdict

    breaker._admits = slow_admits  # type: ignore[method-assign]
    start = threading.Barrier(8)
    permits: list[Permit | None] = []

    def contender() -> None:
        start.wait()
        permits.append(breaker.try_acquire())

    threads = [threading.Thread(target=contender) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sum(p is not None for p in permits) == 2
    assert breaker.trials_in_flight == 2


@pytest.mark.usefixtures("busy_switching")
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_threads_hammering_keep_the_invariants(seed: int) -> None:
    clock = FakeClock()
    breaker, _ = make(clock, failure_threshold=2, open_duration=0.05, half_open_requests=2)
    guard = threading.Lock()
    trials_out: dict[int, int] = {}  # generation -> trial permits not yet handed back
    opened = opened_from_closed = closed = 0
    errors: list[str] = []

    def worker(rng: random.Random) -> None:
        nonlocal opened, opened_from_closed, closed
        for _ in range(3000):
            with guard:
                clock.advance(rng.random() * 0.002)
            permit = breaker.try_acquire()
            if permit is None:
                continue
            if permit.trial:
                with guard:
                    trials_out[permit.generation] = trials_out.get(permit.generation, 0) + 1
                    if trials_out[permit.generation] > 2:
                        errors.append(f"too many trials in generation {permit.generation}")
            if permit.trial:  # count it back before the breaker frees the slot
                with guard:
                    trials_out[permit.generation] -= 1
            roll = rng.random()
            if roll < 0.45:
                changed = breaker.record_failure(permit)
            elif roll < 0.9:
                changed = breaker.record_success(permit)
            else:
                breaker.release(permit)
                changed = False
            with guard:
                if changed and roll < 0.45:
                    opened += 1
                    opened_from_closed += not permit.trial
                elif changed:
                    closed += 1

    threads = [
        threading.Thread(target=worker, args=(random.Random(seed * 10 + i),)) for i in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert errors == []
    assert breaker.opens_total == opened > 0  # every open was reported exactly once
    # Closed -> open and half-open -> closed alternate (re-opens from half-open
    # come in between), so they differ only by whether it ended up closed.
    ended_closed = breaker.state is CircuitState.CLOSED
    assert opened_from_closed - closed == (0 if ended_closed else 1)
    assert opened > opened_from_closed  # some trials failed: the doubling path ran
    assert breaker.trials_in_flight == 0  # every permit was handed back
