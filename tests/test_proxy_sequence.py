"""The ProxyApp sequence on its own: admit, choose, attempt, retry, relay or answer.

ProxyApp takes the world outside a request as constructor arguments (the clock, the
random source, the way to wait, and `send`, one exchange with a backend). These tests
inject their own, so each decision of the sequence can be watched without a socket
or a real second passing: which backend each attempt went to, how long each backoff
was, where the deadline stopped the retries. Real servers and real sockets test the
same paths end to end elsewhere (test_retry.py, test_errors_and_timeouts.py).
"""

from __future__ import annotations

import dataclasses
import io
import random
from collections.abc import Callable, Iterator
from typing import IO, Any

import pytest
import urllib3
from conftest import base_config

from pyproxy.config.schema import BackendConfig, RetryConfig, Timeouts
from pyproxy.observe.metrics import Metrics
from pyproxy.pool.backend import Backend
from pyproxy.pool.errors import UnsendableRequest
from pyproxy.proxy.app import ProxyApp
from pyproxy.proxy.request import Outcome, Request
from pyproxy.runtime.snapshot import RuntimeHolder, build_runtime

BACKENDS = [
    BackendConfig(url=f"http://127.0.0.1:{port}", name=n)
    for n, port in (("a", 9001), ("b", 9002), ("c", 9003))
]  # never dialled: `send` is injected


class Clock:
    """Time that moves only when told: by a sleep, or by a backend taking its time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Dice(random.Random):
    """A seeded random source that remembers the jitter it was asked for and answers
    the top of the range, so the pause it causes is known exactly."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.jitter_asked: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.jitter_asked.append((a, b))
        return b


@dataclasses.dataclass
class Sent:
    backend: str
    method: str
    target: str


Reply = Callable[[int], "urllib3.BaseHTTPResponse | BaseException"]


class Backends:
    """The injected `send`: records each exchange, answers with `reply(n)` for the
    n-th one (a response, or an exception to raise), after `takes` seconds."""

    def __init__(self, clock: Clock, reply: Reply, takes: float = 0.0) -> None:
        self.clock, self.reply, self.takes = clock, reply, takes
        self.sent: list[Sent] = []

    def send(
        self,
        backend: Backend,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | IO[bytes] | None,
        timeout: urllib3.Timeout,
        deadline: float | None,
        watchdog: object,
    ) -> urllib3.BaseHTTPResponse:
        self.sent.append(Sent(backend.name, method, target))
        self.clock.now += self.takes
        answer = self.reply(len(self.sent))
        if isinstance(answer, BaseException):
            raise answer
        return answer


def response(status: int, body: bytes = b"ok") -> urllib3.HTTPResponse:
    return urllib3.HTTPResponse(
        body=io.BytesIO(body),
        headers={"Content-Length": str(len(body))},
        status=status,
        reason="",
        preload_content=False,
    )


class AccessLogSpy:
    """Stands in for the access log: keeps what it is given."""

    def __init__(self) -> None:
        self.lines: list[tuple[Request, Outcome]] = []

    def write(self, request: Request, outcome: Outcome, now: float) -> None:
        self.lines.append((request, outcome))


@dataclasses.dataclass
class Setup:
    app: ProxyApp
    clock: Clock
    dice: Dice
    backends: Backends
    log: AccessLogSpy


@pytest.fixture
def make_app() -> Iterator[Callable[..., Setup]]:
    holders: list[RuntimeHolder] = []

    def make(reply: Reply, *, takes: float = 0.0, seed: int = 0, **config: Any) -> Setup:
        clock, dice = Clock(), Dice(seed)
        backends = Backends(clock, reply, takes)
        runtime, _ = build_runtime(base_config(BACKENDS, **config), clock=clock)
        holder = RuntimeHolder(runtime)
        holders.append(holder)
        log = AccessLogSpy()
        app = ProxyApp(
            holder,
            Metrics(),
            instance_name="pyproxy-test",
            access_log=log,  # type: ignore[arg-type]
            clock=clock,
            rng=dice,
            sleep=clock.sleep,
            send=backends.send,
        )
        return Setup(app, clock, dice, backends, log)

    yield make
    for holder in holders:
        for backend in holder.runtime.backends:
            backend.close()


@dataclasses.dataclass
class Answer:
    status: str
    headers: list[tuple[str, str]]
    body: bytes
    exc_info_given: bool  # the head was replaced, as PEP 3333 allows with exc_info


def call(app: ProxyApp, *, refuse_first_head: bool = False) -> Answer:
    """One GET through the app, its body read and its iterable closed (as a server
    must, PEP 3333), with a start_response that may refuse the first head."""
    environ = {
        "REQUEST_METHOD": "GET",
        "REQUEST_URI": "/thing",
        "PATH_INFO": "/thing",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "example.test",
        "REMOTE_ADDR": "192.0.2.7",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
    }
    heads: list[tuple[str, list[tuple[str, str]], bool]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if refuse_first_head and not heads:
            heads.append((status, headers, False))
            # What waitress does with a header it takes for hop-by-hop.
            raise AssertionError("Connection is a 'hop-by-hop' header")
        heads.append((status, headers, exc_info is not None))
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    status, headers, replaced = heads[-1]
    return Answer(status, headers, body, replaced)


def test_a_retry_goes_to_a_backend_not_yet_tried(make_app: Callable[..., Setup]) -> None:
    """Two 503s, then an answer: three attempts on three different backends, whatever
    the random source (a retry picks among the untried ones only)."""
    for seed in range(20):
        setup = make_app(lambda n: response(503 if n < 3 else 200), seed=seed,
                         retries=RetryConfig(max_retries=2))  # fmt: skip
        answer = call(setup.app)
        assert answer.status.startswith("200")
        tried = [sent.backend for sent in setup.backends.sent]
        assert len(tried) == 3 and len(set(tried)) == 3, (seed, tried)
        ((_, outcome),) = setup.log.lines
        assert (outcome.attempts, outcome.backend_name, outcome.status) == (3, tried[-1], 200)


def test_backoff_sleeps_through_the_injected_sleep_with_the_injected_jitter(
    make_app: Callable[..., Setup],
) -> None:
    """backoff 0.2 s jittered by the rng's uniform(0.5, 1.5): the Dice answer 1.5, so
    each pause is 0.3 s, slept by the injected sleep (no real time passes)."""
    setup = make_app(lambda n: response(503 if n < 3 else 200),
                     retries=RetryConfig(max_retries=2, backoff=0.2))  # fmt: skip
    assert call(setup.app).status.startswith("200")
    assert setup.dice.jitter_asked == [(0.5, 1.5), (0.5, 1.5)]
    assert setup.clock.slept == [pytest.approx(0.3), pytest.approx(0.3)]


def test_a_backoff_is_cut_short_by_the_deadline(make_app: Callable[..., Setup]) -> None:
    """A backend that takes 9.9 of the 10 s deadline: the pause before the retry is
    only what is left (0.1 s), not the 3 s the backoff asked for."""
    setup = make_app(lambda n: response(503), takes=9.9,
                     retries=RetryConfig(max_retries=2, backoff=2.0))  # fmt: skip
    call(setup.app)
    assert setup.clock.slept[0] == pytest.approx(0.1)


def test_the_total_deadline_stops_the_retries(make_app: Callable[..., Setup]) -> None:
    """Each attempt takes 6 s of a 10 s deadline: the second ends past it, and no
    third is made although max_retries allows four. The backend's own 503 is relayed
    (its answer beats one pyproxy would make up), and the log says why it stopped."""
    setup = make_app(lambda n: response(503, b"busy"), takes=6.0,
                     timeouts=Timeouts(connect=1.0, read=2.0, total=10.0),
                     retries=RetryConfig(max_retries=4))  # fmt: skip
    answer = call(setup.app)
    assert len(setup.backends.sent) == 2
    assert (answer.status, answer.body) == ("503 ", b"busy")
    ((_, outcome),) = setup.log.lines
    assert (outcome.attempts, outcome.detail) == (2, "total deadline reached")


def test_a_head_the_server_refuses_is_answered_502(make_app: Callable[..., Setup]) -> None:
    """The server refuses the backend's head when the app hands it over: pyproxy
    answers 502 in its place (with exc_info, as PEP 3333 requires for a second
    start_response), counts it against that backend, and does not retry."""
    setup = make_app(lambda n: response(200), retries=RetryConfig(max_retries=2))
    answer = call(setup.app, refuse_first_head=True)
    assert answer.status == "502 Bad Gateway"
    assert answer.exc_info_given
    assert answer.body == b"502 Bad Gateway: invalid response head from backend\n"
    assert ("X-Request-ID", setup.log.lines[0][0].request_id) in answer.headers
    assert len(setup.backends.sent) == 1
    judged = {b.name: b.failures_total for b in setup.app.holder.runtime.backends}
    assert judged[setup.backends.sent[0].backend] == 1
    assert sum(judged.values()) == 1


def test_a_request_that_could_not_be_sent_is_not_retried(
    make_app: Callable[..., Setup],
) -> None:
    """http.client refused to write the request: no backend saw it, another would
    refuse it too. One attempt, a 400, no backend named or charged."""

    def unwritable(n: int) -> BaseException:
        exc = UnsendableRequest("request could not be written")
        exc.__cause__ = ValueError("Invalid header value b'a\\rb'")
        return exc

    setup = make_app(unwritable, retries=RetryConfig(max_retries=3))
    answer = call(setup.app)
    assert answer.status == "400 Bad Request"
    assert len(setup.backends.sent) == 1
    ((_, outcome),) = setup.log.lines
    assert (outcome.attempts, outcome.backend_name) == (1, "")
    assert all(b.failures_total == 0 for b in setup.app.holder.runtime.backends)


def test_the_request_record_cannot_be_changed(make_app: Callable[..., Setup]) -> None:
    """What the client sent is frozen: only the Outcome is written along the way."""
    setup = make_app(lambda n: response(200))
    call(setup.app)
    ((request, outcome),) = setup.log.lines
    assert (request.client, request.host, request.target) == (
        "192.0.2.7", "example.test", "/thing",
    )  # fmt: skip
    with pytest.raises(AttributeError):
        request.client = "203.0.113.9"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del request.client  # type: ignore[misc]
    assert request.client == "192.0.2.7"
    assert outcome.status == 200


def test_a_backend_that_loses_the_race_for_its_last_slot_is_not_chosen_again(
    make_app: Callable[..., Setup], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between looking at the candidates and admitting one, another thread may take a
    backend's last slot: the next look goes to another backend, not the same one three
    times and then a 503 while the others are free. Sticky `ip` mode shows it: the
    rendezvous hash names the same backend on every look unless it is excluded."""
    from pyproxy.config.schema import StickyConfig
    from pyproxy.proxy.admission import Admission

    setup = make_app(lambda n: response(200), sticky=StickyConfig(mode="ip"))
    admit = Admission.admit
    refused: list[str] = []

    def lose_the_first_race(self: Admission, backend: Backend, *args: Any) -> Any:
        if not refused or refused[0] == backend.name:
            refused.append(backend.name)
            return None  # as if another thread took its last slot first
        return admit(self, backend, *args)

    monkeypatch.setattr(Admission, "admit", lose_the_first_race)
    answer = call(setup.app)

    assert answer.status.startswith("200"), answer
    assert len(refused) == 1
    assert [sent.backend for sent in setup.backends.sent] != refused
