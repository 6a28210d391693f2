"""Where per-client buckets live: this process (`memory`) or Redis (`redis://...`).

With Redis, every pyproxy instance pointing at the same database shares one bucket
per client, so "100/minute" means 100 per minute in total, not per instance. The
bucket update is one Lua script, which Redis runs atomically: no two instances can
both take the last token. Time comes from the Redis server's clock inside the
script, so instances with skewed clocks still agree.

If Redis cannot be reached, requests are let through (fail open) and counted as
`proxy_errors_total{reason="rate_limit_store"}`: a broken limiter must not become an
outage. The first failure is logged; while Redis stays down it is retried at most
once a second, so a dead store does not add a connect timeout to every request.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from pyproxy.config.report import redact_secrets
from pyproxy.config.schema import Rate, RateLimitConfig
from pyproxy.policy.ratelimit import ClientLimiter, Decision, MemoryClientLimiter, bucket_key

log = logging.getLogger(__name__)

# KEYS[1]: the bucket. ARGV: refill rate per second, capacity. Returns {allowed, tokens}.
TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens = capacity
  stamp = now
end
tokens = math.min(capacity, tokens + math.max(0, now - stamp) * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return {allowed, tostring(tokens)}
"""

RETRY_STORE_AFTER = 1.0  # seconds between attempts to reach a store that failed
STORE_TIMEOUT = 0.25  # seconds; a slow store must not become the request's latency


class RedisClientLimiter:
    """Per-client token buckets in Redis, shared by every instance using `url`."""

    def __init__(
        self,
        url: str,
        rate: Rate,
        burst: int | None,
        on_store_error: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        client: Any = None,
    ) -> None:
        self.rate = rate
        self.capacity = burst or rate.count
        self.on_store_error = on_store_error
        self.clock = clock
        if client is None:
            import redis  # optional extra: pip install pyproxy[redis]

            client = redis.Redis.from_url(
                url, socket_timeout=STORE_TIMEOUT, socket_connect_timeout=STORE_TIMEOUT
            )
        self._script = client.register_script(TOKEN_BUCKET_LUA)
        self._lock = threading.Lock()  # guards the two fields below; never held across I/O
        self._down_until = 0.0  # while the store is down: when to probe it again
        self._warned = False  # True while the store is known to be down
        self._probing = False  # a request is probing the down store right now

    def check(self, key: str) -> Decision:
        now = self.clock()
        with self._lock:
            if self._warned:
                # The store is down. Once a second, one request (and only one) probes
                # it; everyone else passes at once instead of queueing on a timeout.
                if now < self._down_until or self._probing:
                    probe = False
                else:
                    self._probing = probe = True
                if not probe:
                    return self._fail_open()
        try:
            allowed, tokens = self._script(
                keys=[f"pyproxy:rl:{bucket_key(key)}"], args=[self.rate.per_second, self.capacity]
            )
        except Exception as error:  # any client or network error: fail open
            with self._lock:
                self._down_until = now + RETRY_STORE_AFTER
                self._probing = False
                first = not self._warned
                self._warned = True
            if first:
                reason = redact_secrets(str(error))  # redis-py's words, never the URL's password
                log.error("rate limit store unreachable (%s): letting requests through", reason)
            return self._fail_open()
        with self._lock:
            recovered, self._warned, self._probing = self._warned, False, False
        if recovered:
            log.info("rate limit store reachable again")
        level = float(tokens)
        per_second = self.rate.per_second
        if allowed:
            return Decision(
                True, self.capacity, int(level), (self.capacity - level) / per_second, 0
            )
        wait = max(1, math.ceil((1 - level) / per_second))
        return Decision(False, self.capacity, 0, (self.capacity - level) / per_second, wait)

    def _fail_open(self) -> Decision:
        self.on_store_error()
        return Decision(True, self.capacity, self.capacity, 0.0, 0)


def make_client_limiter(
    settings: RateLimitConfig,
    on_store_error: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.monotonic,
) -> ClientLimiter:
    """The per-client limiter `settings.store` asks for (`per_client` must be set)."""
    assert settings.per_client is not None
    if settings.store.startswith(("redis://", "rediss://")):  # rediss: Redis over TLS
        return RedisClientLimiter(
            settings.store, settings.per_client, settings.burst, on_store_error, clock
        )
    # Config validation refused every other store, and Redis without its package.
    return MemoryClientLimiter(
        settings.per_client, settings.burst, settings.max_clients, clock=clock
    )
