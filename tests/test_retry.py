"""retry_verdict (the retry rules of docs/retries.md as one pure function) and RetryBudget.

Every row of the decision table is a case here: each names the one input that
makes the difference, so a change to the table breaks exactly the rows it touches.
No sockets, no clock: the deadline is passed in as "seconds left".
"""

from __future__ import annotations

import itertools
import threading

import pytest

from pyproxy.config.schema import RetryConfig
from pyproxy.headers import IDEMPOTENT_METHODS
from pyproxy.policy.retry import MIN_RETRY_BUDGET, RetryBudget, retry_verdict
from pyproxy.pool.errors import Failure, chaos_failure, status_failure

CONNECT_ERROR = Failure("connect_error", "connect_error", 502, "connection refused", False)
CONNECT_TIMEOUT = Failure("connect_error", "connect_error", 504, "connect timeout", False)
RESET = Failure("reset", "reset", 502, "connection closed before the response")
BAD_RESPONSE = Failure("bad_response", "reset", 502, "invalid response")
TIMEOUT = Failure("timeout", "timeout", 504, "no response in time")
STATUS_503 = status_failure(503)

DEFAULT = RetryConfig()  # max_retries 2, retry_on every condition and 502-504, idempotent_only

SENT = [RESET, BAD_RESPONSE, TIMEOUT, STATUS_503, status_failure(502), status_failure(504)]
NON_IDEMPOTENT = ["POST", "PATCH", "CONNECT", "LOCK"]


def verdict(
    failure: Failure,
    method: str = "GET",
    *,
    retries_done: int = 0,
    settings: RetryConfig = DEFAULT,
    body_replayable: bool = True,
    seconds_left: float | None = 10.0,
) -> str | None:
    return retry_verdict(
        failure,
        method=method,
        retries_done=retries_done,
        settings=settings,
        body_replayable=body_replayable,
        seconds_left=seconds_left,
    )


# -- which conditions ----------------------------------------------------------------


@pytest.mark.parametrize("failure", [CONNECT_ERROR, CONNECT_TIMEOUT, *SENT], ids=repr)
def test_every_default_condition_is_retried_for_get(failure: Failure) -> None:
    assert verdict(failure) is None


@pytest.mark.parametrize(
    ("failure", "retry_on"),
    [
        (CONNECT_ERROR, {"reset", "timeout", 503}),
        (RESET, {"connect_error", "timeout", 503}),
        (BAD_RESPONSE, {"connect_error", "timeout", 503}),  # an invalid answer counts as reset
        (TIMEOUT, {"connect_error", "reset", 503}),
        (STATUS_503, {"connect_error", "reset", "timeout", 502, 504}),
        (status_failure(500), set(DEFAULT.retry_on)),  # 500 is not retried by default
    ],
    ids=["connect_error", "reset", "bad_response", "timeout", "503", "500"],
)
def test_a_condition_missing_from_retry_on_is_not_retried(
    failure: Failure, retry_on: set[str | int]
) -> None:
    settings = RetryConfig(retry_on=frozenset(retry_on))
    assert verdict(failure, settings=settings) == f"{failure.condition} is not in retry_on"


def test_a_status_is_retried_only_when_listed_as_a_number() -> None:
    """`retry_on: ["503"]` (a string) must not match the status 503 (an int)."""
    listed = RetryConfig(retry_on=frozenset({500}))
    assert verdict(status_failure(500), settings=listed) is None
    as_string = RetryConfig(retry_on=frozenset({"503"}))
    assert verdict(STATUS_503, settings=as_string) is not None


def test_chaos_is_retried_like_the_status_it_injects() -> None:
    assert verdict(chaos_failure(503)) is None
    assert verdict(chaos_failure(503), "POST") == "POST is not idempotent"
    assert verdict(chaos_failure(500)) == "500 is not in retry_on"


def test_an_empty_retry_on_never_retries() -> None:
    settings = RetryConfig(retry_on=frozenset())
    for failure in [CONNECT_ERROR, *SENT]:
        assert verdict(failure, settings=settings) is not None


# -- idempotency -----------------------------------------------------------------------


def test_the_idempotent_methods_are_those_of_rfc_9110() -> None:
    # RFC 9110 §9.2.2 (TRACE is idempotent even though pyproxy refuses it).
    assert {"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"} == IDEMPOTENT_METHODS


@pytest.mark.parametrize("method", sorted(IDEMPOTENT_METHODS))
@pytest.mark.parametrize("failure", SENT, ids=repr)
def test_a_sent_request_is_retried_for_idempotent_methods(method: str, failure: Failure) -> None:
    assert verdict(failure, method) is None


@pytest.mark.parametrize("method", NON_IDEMPOTENT)
@pytest.mark.parametrize("failure", SENT, ids=repr)
def test_a_sent_request_is_never_retried_for_other_methods(method: str, failure: Failure) -> None:
    """The backend may have acted on it: a POST that reached it must not go twice."""
    assert verdict(failure, method) == f"{method} is not idempotent"


@pytest.mark.parametrize("method", NON_IDEMPOTENT)
@pytest.mark.parametrize("failure", [CONNECT_ERROR, CONNECT_TIMEOUT], ids=repr)
def test_nothing_sent_is_retried_for_any_method(method: str, failure: Failure) -> None:
    assert verdict(failure, method) is None


def test_methods_are_case_sensitive() -> None:
    """RFC 9110 §9.1: "get" is not GET, and not known to be idempotent."""
    assert verdict(TIMEOUT, "get") == "get is not idempotent"


@pytest.mark.parametrize("failure", SENT, ids=repr)
def test_idempotent_only_false_retries_posts_too(failure: Failure) -> None:
    settings = RetryConfig(idempotent_only=False)
    assert verdict(failure, "POST", settings=settings) is None


# -- the body --------------------------------------------------------------------------


@pytest.mark.parametrize("failure", [CONNECT_ERROR, *SENT], ids=repr)
def test_a_body_that_cannot_be_replayed_is_never_retried(failure: Failure) -> None:
    assert verdict(failure, "PUT", body_replayable=False) == "request body too large to replay"


# -- how many, how long ------------------------------------------------------------------


@pytest.mark.parametrize("max_retries", [0, 1, 2, 5])
def test_max_retries_counts_extra_attempts(max_retries: int) -> None:
    settings = RetryConfig(max_retries=max_retries)
    allowed = [verdict(RESET, retries_done=n, settings=settings) for n in range(max_retries + 2)]
    assert allowed[:max_retries] == [None] * max_retries
    assert allowed[max_retries:] == ["no retries left"] * 2


def test_max_retries_zero_never_retries_even_a_connect_error() -> None:
    assert verdict(CONNECT_ERROR, settings=RetryConfig(max_retries=0)) == "no retries left"


@pytest.mark.parametrize("seconds_left", [0.0, -0.001, -5.0])
def test_no_retry_once_the_deadline_has_passed(seconds_left: float) -> None:
    assert verdict(CONNECT_ERROR, seconds_left=seconds_left) == "total deadline reached"


@pytest.mark.parametrize("seconds_left", [None, 0.001, 59.0])
def test_a_retry_is_allowed_while_time_is_left_or_without_a_deadline(
    seconds_left: float | None,
) -> None:
    assert verdict(TIMEOUT, seconds_left=seconds_left) is None


def test_every_combination_agrees_with_the_spec() -> None:
    """The whole table, written out independently of the implementation."""
    failures = [CONNECT_ERROR, RESET, TIMEOUT, STATUS_503, status_failure(500)]
    methods = ["GET", "PUT", "POST"]
    for failure, method, done, replayable, left, idem_only in itertools.product(
        failures, methods, [0, 2], [True, False], [None, 1.0, 0.0], [True, False]
    ):
        settings = RetryConfig(max_retries=2, idempotent_only=idem_only)
        expected = (
            done < 2
            and failure.condition in settings.retry_on
            and (not failure.request_sent or not idem_only or method != "POST")
            and replayable
            and (left is None or left > 0)
        )
        got = verdict(
            failure,
            method,
            retries_done=done,
            settings=settings,
            body_replayable=replayable,
            seconds_left=left,
        )
        assert (got is None) == expected, (failure, method, done, replayable, left, idem_only, got)


# -- the budget --------------------------------------------------------------------------


def test_the_budget_allows_three_retries_even_with_little_in_flight() -> None:
    budget = RetryBudget()
    budget.request_started()
    assert MIN_RETRY_BUDGET == 3
    assert [budget.try_start_retry(20) for _ in range(4)] == [True, True, True, False]


def test_the_budget_is_a_percentage_of_requests_in_flight() -> None:
    budget = RetryBudget()
    for _ in range(50):
        budget.request_started()
    # 20% of 50 = 10 retries at once.
    granted = [budget.try_start_retry(20) for _ in range(12)]
    assert granted.count(True) == 10 and granted[10:] == [False, False]
    assert budget.retries_in_flight == 10


@pytest.mark.parametrize(
    ("in_flight", "percent", "allowed"),
    [(0, 20, 3), (16, 20, 3), (19, 20, 3), (20, 20, 4), (100, 20, 20), (10, 50, 5), (10, 0, 3)],
)
def test_budget_size(in_flight: int, percent: float, allowed: int) -> None:
    budget = RetryBudget()
    for _ in range(in_flight):
        budget.request_started()
    granted = 0
    while budget.try_start_retry(percent):
        granted += 1
        assert granted <= 1000
    assert granted == allowed


def test_a_finished_retry_gives_its_place_back() -> None:
    budget = RetryBudget()
    for _ in range(3):
        assert budget.try_start_retry(20)
    assert not budget.try_start_retry(20)
    budget.retry_finished()
    assert budget.try_start_retry(20)
    assert not budget.try_start_retry(20)


def test_the_budget_shrinks_as_requests_finish() -> None:
    budget = RetryBudget()
    for _ in range(40):
        budget.request_started()
    for _ in range(8):
        assert budget.try_start_retry(20)
    for _ in range(30):
        budget.request_finished()
    # 10 in flight now: the minimum of 3 applies, and 8 retries are already out.
    assert not budget.try_start_retry(20)
    for _ in range(6):
        budget.retry_finished()
    assert budget.try_start_retry(20)  # 2 out -> 3
    assert not budget.try_start_retry(20)


def test_the_budget_never_overshoots_under_threads() -> None:
    budget = RetryBudget()
    for _ in range(100):
        budget.request_started()
    granted: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def grab() -> None:
        start.wait()
        for _ in range(50):
            ok = budget.try_start_retry(20)
            with lock:
                granted.append(ok)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert granted.count(True) == 20
    assert budget.retries_in_flight == 20
