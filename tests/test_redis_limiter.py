"""Per-client buckets in Redis (`rate_limit.store`, docs/rate-limiting.md): one limit,
many instances.

These tests run a real `redis-server` of their own on 127.0.0.1 (a free port, no
persistence) and stop it by PID. They need the `redis-server` binary and the `redis`
Python package:

    apt-get install -y redis-server      # Debian/Ubuntu
    pip install 'redis>=4.5'             # or: pip install -e '.[redis]'

Without them every test here FAILS with that message: a silently skipped file would
let the shared limiter break unnoticed.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from backends import EchoBackend, closed_port, free_ports, wait_for
from conftest import ProxyFactory, registry_value

from pyproxy.config.schema import Rate, RateLimitConfig
from pyproxy.policy.ratelimit_store import RETRY_STORE_AFTER, RedisClientLimiter
from pyproxy.process.service import Service

WAIT = 5.0
INSTALL = "apt-get install -y redis-server && pip install 'redis>=4.5'"


def _redis_module() -> Any:
    try:
        import redis
    except ImportError:
        pytest.fail(f"the redis Python package is missing; install it: {INSTALL}")
    return redis


class RedisServer:
    """A throwaway redis-server on 127.0.0.1:`port`, stopped by its PID."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(f"redis-server is not installed (needed by these tests): {INSTALL}")
        redis = _redis_module()
        self.port = port if port is not None else free_ports(1)[0]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = workdir / f"redis-{self.port}.log"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0)

        def answers() -> bool:
            if self.process.poll() is not None:
                return True  # exited: stop waiting, report below
            with contextlib.suppress(redis.RedisError):
                return bool(self.client.ping())
            return False

        if not wait_for(answers, timeout=10.0, interval=0.02) or self.process.poll() is not None:
            log = self.log.read_text() if self.log.exists() else ""
            self.stop()
            pytest.fail(f"redis-server did not start on port {self.port}:\n{log[-2000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        with contextlib.suppress(Exception):
            self.client.close()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def store(redis_server: RedisServer) -> str:
    """The shared store's URL, emptied for this test."""
    redis_server.client.flushdb()
    return redis_server.url


def shared_pair(
    make_proxy: ProxyFactory, backend: EchoBackend, url: str, rate: Rate, **kw: Any
) -> tuple[Service, Service]:
    settings = RateLimitConfig(per_client=rate, store=url, **kw)
    first, second = (
        make_proxy([backend], rate_limit=settings),
        make_proxy([backend], rate_limit=settings),
    )
    for service in (first, second):
        assert isinstance(service.holder.runtime.client_limiter, RedisClientLimiter)
    return first, second


def get(service: Service, **kw: Any) -> requests.Response:
    return requests.get(service.proxy_url, timeout=WAIT, **kw)


# -- one limit across instances --------------------------------------------------------


def test_two_instances_share_one_limit(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, store: str
) -> None:
    first, second = shared_pair(make_proxy, echo_backend, store, Rate(4, 60.0))
    codes = [get(first).status_code, get(second).status_code]
    codes += [get(first).status_code, get(second).status_code]
    assert codes == [200, 200, 200, 200]
    for service in (first, second):  # the fifth, wherever it goes
        refused = get(service)
        assert refused.status_code == 429
        assert refused.text.startswith("429 Too Many Requests: ")
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.headers["RateLimit-Policy"] == '"default";q=4;w=60'
        assert refused.headers["RateLimit"].startswith('"default";r=0;')
    assert len(echo_backend.requests()) == 4
    assert registry_value(first, "proxy_rate_limited_total", scope="client") == 1
    assert registry_value(second, "proxy_rate_limited_total", scope="client") == 1
    assert registry_value(first, "proxy_errors_total", backend="", reason="rate_limit_store") == 0


def test_separate_keys_stay_separate_in_the_shared_store(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, store: str
) -> None:
    first, second = shared_pair(
        make_proxy, echo_backend, store, Rate(1, 60.0), client_key="header:X-Api-Key"
    )
    assert get(first, headers={"X-Api-Key": "alice"}).status_code == 200
    assert get(second, headers={"X-Api-Key": "alice"}).status_code == 429
    assert get(second, headers={"X-Api-Key": "bob"}).status_code == 200
    assert get(first).status_code == 200  # no key: the address's own bucket
    assert get(second).status_code == 429


def test_a_huge_header_key_is_a_short_redis_key_shared_by_every_instance(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, redis_server: RedisServer, store: str
) -> None:
    first, second = shared_pair(
        make_proxy, echo_backend, store, Rate(1, 60.0), client_key="header:X-Api-Key"
    )
    huge = "s" * (60 * 1024)
    assert get(first, headers={"X-Api-Key": huge}).status_code == 200
    assert get(second, headers={"X-Api-Key": huge}).status_code == 429  # the same bucket
    keys = redis_server.client.keys("*")
    assert len(keys) == 1
    assert len(keys[0]) <= 80, len(keys[0])
    assert b"ssss" not in keys[0]  # the credential itself is not stored


def test_the_shared_limit_is_atomic_under_concurrent_requests_to_both_instances(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, store: str
) -> None:
    first, second = shared_pair(make_proxy, echo_backend, store, Rate(10, 3600.0))
    codes: list[int] = []
    lock = threading.Lock()

    def client(service: Service) -> None:
        with requests.Session() as session:
            session.trust_env = False
            for _ in range(4):
                code = session.get(service.proxy_url, timeout=WAIT).status_code
                with lock:
                    codes.append(code)

    threads = [
        threading.Thread(target=client, args=(service,), daemon=True)
        for service in (first, second) * 4
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert len(codes) == 32
    # Exactly 10 pass the limiter, never an 11th: the script is atomic. Counted as
    # "not 429", so that a backend too slow for the test's 2 s read timeout on a
    # loaded machine (a 504) is not mistaken for a token the limiter did not grant.
    assert codes.count(429) == 22, Counter(codes)
    assert set(codes) <= {200, 429, 502, 504}, Counter(codes)
    assert len(echo_backend.requests()) <= 10


# -- the Lua token bucket --------------------------------------------------------------


def test_the_script_refills_at_the_rate_on_the_servers_clock(store: str) -> None:
    limiter = RedisClientLimiter(store, Rate(2, 1.0), burst=2)  # a token every 0.5 s
    assert [limiter.check("k").allowed for _ in range(2)] == [True, True]
    emptied = time.monotonic()
    refused = limiter.check("k")
    assert not refused.allowed
    assert refused.retry_after == 1 and refused.remaining == 0 and refused.limit == 2

    # Refused checks take nothing, so polling does not delay the refill.
    assert wait_for(lambda: limiter.check("k").allowed, timeout=6.0, interval=0.05)
    waited = time.monotonic() - emptied
    assert 0.3 <= waited < 5.0, waited
    assert not limiter.check("k").allowed  # that token was the only one back


def test_the_bucket_never_holds_more_than_the_burst_and_expires_when_idle(
    redis_server: RedisServer, store: str
) -> None:
    limiter = RedisClientLimiter(store, Rate(100, 1.0), burst=3)
    first = limiter.check("idle")
    assert first.allowed and first.remaining == 2
    time.sleep(0.05)  # let 5 tokens' worth of time pass on the server's clock ...
    second = limiter.check("idle")
    assert second.allowed and second.remaining == 2  # ... yet it held 3 at most, not 2 + 5
    ttl = redis_server.client.pttl("pyproxy:rl:idle")
    assert 0 < ttl <= 3 / 100 * 1000 + 1000  # a full bucket is forgotten by Redis itself


# -- Redis unreachable: fail open, say so once ---------------------------------------------


def test_an_unreachable_store_lets_requests_through_and_counts_each_one(
    make_proxy: ProxyFactory,
    echo_backend: EchoBackend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _redis_module()
    dead = f"redis://127.0.0.1:{closed_port()}/0"
    caplog.set_level(logging.INFO, logger="pyproxy.policy.ratelimit_store")
    proxy = make_proxy(
        [echo_backend], rate_limit=RateLimitConfig(per_client=Rate(1, 3600.0), store=dead)
    )
    started = time.monotonic()
    codes = [get(proxy).status_code for _ in range(8)]
    assert codes == [200] * 8  # fail open: a broken limiter is not an outage
    assert time.monotonic() - started < 4.0  # and not a slow one either
    assert len(echo_backend.requests()) == 8
    assert registry_value(proxy, "proxy_errors_total", backend="", reason="rate_limit_store") == 8
    assert registry_value(proxy, "proxy_rate_limited_total", scope="client") == 0
    errors = [
        r
        for r in caplog.records
        if r.name == "pyproxy.policy.ratelimit_store" and r.levelno >= logging.ERROR
    ]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "unreachable" in errors[0].getMessage()


def test_a_tls_store_is_a_shared_redis_limiter_not_a_memory_one(
    make_proxy: ProxyFactory, echo_backend: EchoBackend
) -> None:
    """`rediss://` used to fall through to the in-memory limiter: per instance, and
    the second request below got a 429 from memory instead of reaching the store."""
    _redis_module()
    dead = f"rediss://127.0.0.1:{closed_port()}/0"
    proxy = make_proxy(
        [echo_backend], rate_limit=RateLimitConfig(per_client=Rate(1, 3600.0), store=dead)
    )
    limiter = proxy.holder.runtime.client_limiter
    assert isinstance(limiter, RedisClientLimiter)
    pool = limiter._script.registered_client.connection_pool
    assert pool.connection_class.__name__ == "SSLConnection"  # TLS, as rediss:// asks
    assert [get(proxy).status_code for _ in range(3)] == [200, 200, 200]  # fail open
    assert registry_value(proxy, "proxy_errors_total", backend="", reason="rate_limit_store") == 3


def test_the_limit_comes_back_when_the_store_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _redis_module()
    port = closed_port()
    failures: list[int] = []
    caplog.set_level(logging.INFO, logger="pyproxy.policy.ratelimit_store")
    limiter = RedisClientLimiter(
        f"redis://127.0.0.1:{port}/0", Rate(2, 3600.0), None,
        on_store_error=lambda: failures.append(1),
    )  # fmt: skip
    assert limiter.check("k").allowed and failures == [1]

    server = RedisServer(tmp_path, port=port)
    try:
        came_back = started = time.monotonic()

        def limiting() -> bool:
            nonlocal came_back
            came_back = time.monotonic()
            return limiter.check("k").remaining == 1  # a real take, not the fail-open answer

        assert wait_for(limiting, timeout=RETRY_STORE_AFTER + 3.0, interval=0.05)
        assert came_back - started <= RETRY_STORE_AFTER + 2.0
        assert limiter.check("k").allowed  # the second of the burst of 2 ...
        assert not limiter.check("k").allowed  # ... and then the limit holds again
        store_logger = "pyproxy.policy.ratelimit_store"
        messages = [r.getMessage() for r in caplog.records if r.name == store_logger]
        assert sum("unreachable" in m for m in messages) == 1
        assert any("reachable again" in m for m in messages)
    finally:
        server.stop()


class SilentStore:
    """A stand-in Redis client whose script never answers in time (a blackholed store):
    each call waits on `gate` (the client's socket timeout), then raises."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls = 0
        self.inside = 0
        self._lock = threading.Lock()  # guards calls and inside

    def register_script(self, _lua: str) -> Callable[..., Any]:
        def run(keys: list[str], args: list[Any]) -> Any:
            with self._lock:
                self.calls += 1
                self.inside += 1
            try:
                self.gate.wait(WAIT)
                raise ConnectionError("Timeout reading from socket")
            finally:
                with self._lock:
                    self.inside -= 1

        return run


def test_a_down_store_is_probed_by_one_request_while_the_others_pass_at_once() -> None:
    now = [1000.0]
    failures: list[int] = []
    store = SilentStore()
    limiter = RedisClientLimiter(
        "redis://unused", Rate(5, 60.0), None,
        on_store_error=lambda: failures.append(1), clock=lambda: now[0], client=store,
    )  # fmt: skip
    store.gate.set()
    assert limiter.check("k").allowed  # the store is found down: fail open
    store.gate.clear()
    now[0] += RETRY_STORE_AFTER + 0.5  # time to look at the store again

    finished: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def request() -> None:
        start.wait(WAIT)
        allowed = limiter.check("k").allowed
        with lock:
            finished.append(allowed)

    threads = [threading.Thread(target=request, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        # Every request has either answered or is waiting on the silent store.
        assert wait_for(lambda: len(finished) + store.inside == 8, timeout=WAIT)
        waiting = store.inside
    finally:
        store.gate.set()
        for thread in threads:
            thread.join(timeout=WAIT)
    assert finished == [True] * 8  # fail open, all of them
    assert waiting == 1, f"{waiting} requests waited on the down store at once"
    assert store.calls == 2  # the first discovery, then one probe
