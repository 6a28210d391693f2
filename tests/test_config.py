"""YAML -> Config: every check of docs/configuration.md, the problem paths, env expansion,
reload lines."""

from __future__ import annotations

import dataclasses
import ipaddress
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO

from pyproxy.config.load import (
    ConfigError,
    config_warnings,
    describe_changes,
    load_config,
    parse_backend,
    parse_config,
    redact_secrets,
)
from pyproxy.config.schema import STRATEGIES, Address, BackendConfig, Config, Rate, Timeouts

EMPTY_BACKENDS_WARNING = (
    "backends: empty list; the proxy answers 503 until a backend is added through the admin API"
)


def parse(env: dict[str, str] | None = None, **settings: Any) -> Config:
    """A config with no backends plus `settings`, and an empty environment by default."""
    return parse_config({"backends": [], **settings}, env={} if env is None else env)


def problems(data: object, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as error:
        parse_config(data, env={} if env is None else env)
    return error.value.problems


def problem(data: object, env: dict[str, str] | None = None) -> str:
    """The one problem `data` has."""
    found = problems(data, env)
    assert len(found) == 1, found
    return found[0]


def setting(path: str, value: object) -> dict[str, Any]:
    """`setting("timeouts.read", 5)` -> {"backends": [], "timeouts": {"read": 5}}."""
    section, _, key = path.rpartition(".")
    return {"backends": [], **({section: {key: value}} if section else {key: value})}


# --- defaults and the example file ---------------------------------------------------


def test_minimal_config_equals_the_dataclass_defaults() -> None:
    assert parse() == Config()


def test_null_sections_mean_defaults() -> None:
    # A section whose lines are all commented out is `null` in YAML.
    assert parse(timeouts=None, rate_limit=None, admin=None) == Config()


def test_example_config_loads_with_demo_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYPROXY_ADMIN_TOKEN", raising=False)
    config = load_config(str(REPO / "config.yaml"))
    assert [(b.name, b.url) for b in config.backends] == [
        ("app1", "http://127.0.0.1:9001"),
        ("app2", "http://127.0.0.1:9002"),
        ("app3", "http://127.0.0.1:9003"),
    ]
    assert config.source_path == str(REPO / "config.yaml")
    # The example documents the defaults; it must not quietly disagree with them.
    assert dataclasses.replace(config, backends=(), source_path=None) == Config()


def _keys(cls: type) -> dict[str, Any]:
    """The YAML key tree a dataclass expects (sections nested, values as None)."""
    tree: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        default = getattr(cls(), field.name) if field.name != "backends" else None
        is_section = dataclasses.is_dataclass(default) and not isinstance(default, Address)
        tree[field.name] = _keys(type(default)) if is_section else None
    return tree


def _yaml_keys(data: dict[str, Any]) -> dict[str, Any]:
    return {
        key: _yaml_keys(value) if isinstance(value, dict) else None for key, value in data.items()
    }


def test_example_config_shows_every_setting() -> None:
    data = yaml.safe_load((REPO / "config.yaml").read_text())
    expected = _keys(Config)
    del expected["source_path"]  # not a setting: where the config came from
    # Filled from `pools` / `routes`, shown commented out after the v1 form.
    del expected["declared_pools"], expected["declared_routes"]
    assert _yaml_keys(data) == expected
    backend_keys = {field.name for field in dataclasses.fields(BackendConfig)}
    assert set(data["backends"][0]) == backend_keys


# --- all problems at once, with paths ------------------------------------------------


def test_three_mistakes_give_three_problems_with_paths() -> None:
    found = problems(
        {
            "backends": [{"url": "http://a:1"}, {"url": "http://b:1", "weight": -1}],
            "timeouts": {"read": "fast"},
            "rate_limit": {"foo": 1},
        }
    )
    assert found == [
        "backends[1].weight: must be an integer >= 0",
        "timeouts.read: invalid duration 'fast' (use e.g. 250ms, 2s, 5m)",
        "rate_limit.foo: unknown key",
    ]


def test_problems_in_many_sections_are_all_reported() -> None:
    found = problems(
        {
            "backends": [{"url": "ftp://x"}, {"url": "http://ok:1"}, {"url": "http://ok:1"}],
            "threads": 0,
            "strategy": "fastest",
            "health_check": {"path": "health", "interval": 0},
            "circuit_breaker": {"open_duration": "1m", "max_open_duration": "30s"},
            "retries": {"retry_on": ["reset", "bogus", 700]},
            "sticky": {"cookie_name": "a b"},
        }
    )
    paths = [line.split(": ", 1)[0] for line in found]
    assert paths == [
        "backends[0].url",
        "backends[2].name",
        "backends[2].url",
        "threads",
        "strategy",
        "health_check.path",
        "health_check.interval",
        "circuit_breaker.max_open_duration",
        "retries.retry_on[1]",
        "retries.retry_on[2]",
        "sticky.cookie_name",
    ]


def test_error_message_lists_problems() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({"backends": [], "threads": 0, "strategy": "x"}, env={})
    assert "threads: must be an integer >= 1" in str(error.value)
    assert len(error.value.problems) == 2


# --- unknown and missing keys --------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("lissen", "lissen: unknown key (did you mean listen?)"),
        ("foo", "foo: unknown key"),
        ("timeouts.conect", "timeouts.conect: unknown key (did you mean connect?)"),
        ("rate_limit.foo", "rate_limit.foo: unknown key"),
    ],
)
def test_unknown_keys_are_errors_at_every_depth(path: str, expected: str) -> None:
    assert problem(setting(path, 1)) == expected


def test_unknown_keys_in_backends_and_non_string_keys() -> None:
    assert problem({"backends": [{"url": "http://a", "wieght": 2}]}) == (
        "backends[0].wieght: unknown key (did you mean weight?)"
    )
    assert problem({"backends": [], 1: 2}) == "1: unknown key"


def test_backends_is_required() -> None:
    assert problem({}) == "backends: is required (or pools + routes)"


@pytest.mark.parametrize("value", [None, "http://a", {"url": "http://a"}])
def test_backends_must_be_a_list(value: object) -> None:
    assert problem({"backends": value}).startswith("backends: must be a list")


def test_backend_needs_a_url_and_a_mapping() -> None:
    assert problem({"backends": [{"name": "a"}]}) == "backends[0].url: is required"
    assert problem({"backends": ["http://a"]}).startswith("backends[0]: must be a mapping")


@pytest.mark.parametrize("data", [[], "backends: []", None, 3])
def test_top_level_must_be_a_mapping(data: object) -> None:
    assert problem(data).startswith("(top level): must be a mapping")


@pytest.mark.parametrize("section", ["timeouts", "admin", "sticky"])
def test_a_section_must_be_a_mapping(section: str) -> None:
    expected = f"{section}: must be a mapping of settings (key: value)"
    assert problem({"backends": [], section: [1]}) == expected


# --- types -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, False, 2.5, "4", None, [4]])
def test_integers_refuse_bools_fractions_and_strings(value: object) -> None:
    assert problem({"backends": [], "threads": value}) == "threads: must be an integer >= 1"


def test_integers_accept_whole_floats() -> None:
    config = parse(threads=4.0)
    assert config.threads == 4
    assert type(config.threads) is int


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, None])
def test_booleans_must_be_yaml_booleans(value: object) -> None:
    assert problem(setting("preserve_host", value)) == "preserve_host: must be true or false"


def test_booleans_accepted() -> None:
    assert parse(preserve_host=False).preserve_host is False
    assert parse(health_check={"enabled": False}).health_check.enabled is False


# --- units through the config ----------------------------------------------------------


def test_units_are_converted() -> None:
    config = parse(
        timeouts={"connect": "250ms", "read": 5, "total": "2m"},
        retries={"max_body": "64KiB", "backoff": "100ms"},
        limits={"max_request_body": "10MB", "max_request_header": 8192},
        rate_limit={"per_client": "100/minute", "per_backend": 50, "burst": 20},
        circuit_breaker={"open_duration": "1s", "max_open_duration": "1h"},
    )
    assert (config.timeouts.connect, config.timeouts.read, config.timeouts.total) == (0.25, 5, 120)
    assert config.retries.max_body == 65536
    assert config.retries.backoff == pytest.approx(0.1)
    assert config.limits.max_request_body == 10_000_000
    assert config.limits.max_request_header == 8192
    assert config.rate_limit.per_client == Rate(100, 60.0)
    assert config.rate_limit.per_backend == Rate(50, 60.0)
    assert config.rate_limit.burst == 20
    assert config.circuit_breaker.max_open_duration == 3600


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("timeouts.read", "fast", "invalid duration 'fast'"),
        ("retries.max_body", "1M", "invalid size '1M'"),
        ("rate_limit.per_client", "5/day", "invalid rate '5/day'"),
        ("rate_limit.burst", 0, "must be an integer >= 1"),
        ("health_check.timeout", 0, "must be a duration > 0"),
        ("limits.header_timeout", "0s", "must be a duration > 0"),
        ("limits.max_request_header", 0, "must be a size of at least 1"),
        ("shutdown.delay", -1, "must not be negative"),
    ],
)
def test_unit_problems_name_the_field(path: str, value: object, expected: str) -> None:
    assert problem(setting(path, value)).startswith(f"{path}: {expected}")


def test_zero_timeouts_mean_no_limit_and_are_allowed() -> None:
    config = parse(timeouts={"connect": 0, "read": 0, "total": 0}, shutdown={"drain_timeout": 0})
    assert config.timeouts == Timeouts(connect=0.0, read=0.0, total=0.0)
    assert config.shutdown.drain_timeout == 0.0


# --- enumerations -----------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_is_accepted(strategy: str) -> None:
    assert parse(strategy=strategy).strategy == strategy


@pytest.mark.parametrize("mode", ["none", "cookie", "ip"])
def test_every_sticky_mode_is_accepted(mode: str) -> None:
    assert parse(sticky={"mode": mode}).sticky.mode == mode


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_access_log_format_is_accepted(fmt: str) -> None:
    assert parse(access_log={"format": fmt}).access_log.format == fmt


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("strategy", "fastest", "round_robin, random, least_connections, weighted (got 'fastest')"),
        ("sticky.mode", False, "none, cookie, ip (got False)"),  # YAML reads `off` as false
        ("access_log.format", "xml", "text, json (got 'xml')"),
    ],
)
def test_enumerations_reject_other_values(path: str, value: object, expected: str) -> None:
    assert problem(setting(path, value)) == f"{path}: must be one of {expected}"


@pytest.mark.parametrize("key", ["ip", "header:X-Api-Key", "header:authorization"])
def test_client_key_forms(key: str) -> None:
    assert parse(rate_limit={"client_key": key}).rate_limit.client_key == key


@pytest.mark.parametrize("key", ["address", "header:", "header:X Api", "header:a@b", "cookie:x", 1])
def test_client_key_rejects_other_forms(key: object) -> None:
    assert problem({"backends": [], "rate_limit": {"client_key": key}}).startswith(
        "rate_limit.client_key: must be ip or header:<Header-Name>"
    )


@pytest.mark.parametrize(
    "store",
    ["memory", "redis://localhost:6379/0", "redis://redis", "rediss://:pw@cache:6380/2"],
)
def test_store_forms(store: str) -> None:
    assert parse(rate_limit={"store": store}).rate_limit.store == store


@pytest.mark.parametrize(
    "store", ["redis", "redis://", "http://redis:6379/0", "redis://h:99999/0", "redis://h:1/x", 1]
)
def test_store_rejects_other_forms(store: object) -> None:
    assert problem({"backends": [], "rate_limit": {"store": store}}).startswith(
        "rate_limit.store: "
    )


@pytest.mark.parametrize(
    "store", ["unix:///run/redis.sock", "redis+sentinel://h:26379/0", "Memory", "memory "]
)
def test_a_store_pyproxy_cannot_serve_is_an_error_not_a_memory_limiter(store: str) -> None:
    found = problem({"backends": [], "rate_limit": {"store": store}})
    assert found.startswith("rate_limit.store: must be memory, redis:// or rediss://"), found


def test_a_redis_store_without_the_redis_package_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, the proxy quietly limited per instance in memory while --check warned
    that requests would pass unlimited: neither is what a shared store promises."""
    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` now fails
    for store in ("redis://cache:6379/0", "rediss://cache:6380/0"):
        found = problem({"backends": [], "rate_limit": {"store": store}})
        assert found == (
            "rate_limit.store: needs the redis package (pip install 'pyproxy[redis]')"
        ), found
    assert parse(rate_limit={"store": "memory"}).rate_limit.store == "memory"


# --- ranges and relations ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("chaos.error_rate", 1.5, "must be a number from 0 to 1"),
        ("chaos.latency_rate", -0.1, "must be a number from 0 to 1"),
        ("chaos.latency_rate", float("nan"), "must be a number from 0 to 1"),
        ("chaos.error_status", 200, "must be an integer from 400 to 599"),
        ("retries.budget_percent", 101, "must be a number from 0 to 100"),
        ("retries.max_retries", -1, "must be an integer >= 0"),
        ("threads", 0, "must be an integer >= 1"),
        ("health_check.healthy_threshold", 0, "must be an integer >= 1"),
        ("health_check.unhealthy_threshold", 0, "must be an integer >= 1"),
        ("circuit_breaker.failure_threshold", 0, "must be an integer >= 1"),
        ("circuit_breaker.half_open_requests", 0, "must be an integer >= 1"),
        ("sticky.cookie_max_age", 0, "must be an integer >= 1"),
        ("sticky.cookie_name", "a;b", "must be a cookie name: letters, digits and !#$%&'*+-.^_`|~"),
        ("health_check.path", "health", "must be a path starting with '/' (e.g. /health)"),
        ("health_check.path", "/he alth", "must be a path starting with '/' (e.g. /health)"),
        ("rate_limit.max_clients", 0, "must be an integer >= 1"),
        ("limits.max_connections", 0, "must be an integer >= 1"),
        ("admin.token", "", "must be a non-empty string"),
        ("access_log.path", "", "must be a non-empty string"),
        ("trusted_proxies", "10.0.0.0/8", "must be a list"),
    ],
)
def test_range_problems(path: str, value: object, expected: str) -> None:
    assert problem(setting(path, value)) == f"{path}: {expected}"


def test_max_open_duration_must_not_be_shorter_than_open_duration() -> None:
    assert problem(setting("circuit_breaker.open_duration", "10m")) == (
        "circuit_breaker.max_open_duration: must be >= open_duration"
    )


def test_each_bad_failure_status_is_named() -> None:
    assert problems(setting("circuit_breaker.failure_statuses", [99, 502, 600])) == [
        "circuit_breaker.failure_statuses[0]: must be an integer from 100 to 599",
        "circuit_breaker.failure_statuses[2]: must be an integer from 100 to 599",
    ]


def test_fractions_and_edges_accepted() -> None:
    config = parse(
        chaos={"error_rate": 1, "latency_rate": 0.25, "error_status": 599},
        retries={"budget_percent": 0, "max_retries": 0},
        circuit_breaker={"open_duration": "5m", "max_open_duration": "5m"},
        sticky={"cookie_max_age": 3600, "cookie_name": "srv_id"},
    )
    assert config.chaos.error_rate == 1.0
    assert config.retries.budget_percent == 0.0
    assert config.circuit_breaker.max_open_duration == config.circuit_breaker.open_duration
    assert config.sticky.cookie_max_age == 3600


@pytest.mark.parametrize(
    ("value", "expected"),
    [("200-399", (200, 399)), ("200", (200, 200)), (204, (204, 204)), ("200 - 299", (200, 299))],
)
def test_expected_status_forms(value: object, expected: tuple[int, int]) -> None:
    assert parse(health_check={"expected_status": value}).health_check.expected_status == expected


@pytest.mark.parametrize("value", ["ok", "200-", "399-200", "99", "200-600", True, [200]])
def test_expected_status_rejects(value: object) -> None:
    assert problem({"backends": [], "health_check": {"expected_status": value}}).startswith(
        "health_check.expected_status: "
    )


def test_retry_on_takes_names_and_statuses() -> None:
    config = parse(retries={"retry_on": ["connect_error", "timeout", 429, "503"]})
    assert config.retries.retry_on == frozenset({"connect_error", "timeout", 429, 503})
    assert parse(retries={"retry_on": []}).retries.retry_on == frozenset()


def test_retry_on_rejects_each_bad_entry() -> None:
    found = problems({"backends": [], "retries": {"retry_on": ["reset", "bogus", 700, True]}})
    assert [line.split(":")[0] for line in found] == [
        "retries.retry_on[1]",
        "retries.retry_on[2]",
        "retries.retry_on[3]",
    ]
    assert "unknown condition 'bogus' (use connect_error, reset, timeout" in found[0]


def test_failure_statuses_become_a_frozenset() -> None:
    config = parse(circuit_breaker={"failure_statuses": [500, 502, 500]})
    assert config.circuit_breaker.failure_statuses == frozenset({500, 502})


# --- addresses and networks --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("127.0.0.1:8080", Address("127.0.0.1", 8080)),
        ("0.0.0.0:0", Address("0.0.0.0", 0)),
        ("localhost:65535", Address("localhost", 65535)),
        ("[::1]:8080", Address("::1", 8080)),
        ("[::]:80", Address("::", 80)),
    ],
)
def test_listen_forms(value: str, address: Address) -> None:
    assert parse(listen=value).listen == address
    assert parse(listen="127.0.0.1:1", admin={"listen": value}).admin.listen == address


@pytest.mark.parametrize(
    "value",
    ["8080", 8080, "127.0.0.1", "127.0.0.1:65536", "::1:8080", "[nope]:80", ":8080", "a b:80"],
)
def test_listen_rejects(value: object) -> None:
    assert problem({"backends": [], "listen": value}).startswith("listen: ")


@pytest.mark.parametrize("admin", ["127.0.0.1:8080", "0.0.0.0:8080"])
def test_admin_must_not_share_the_proxy_listener(admin: str) -> None:
    assert problem({"backends": [], "listen": "127.0.0.1:8080", "admin": {"listen": admin}}) == (
        "admin.listen: must not be the proxy's own address (127.0.0.1:8080)"
    )


def test_both_listeners_may_use_port_zero() -> None:
    config = parse(listen="127.0.0.1:0", admin={"listen": "127.0.0.1:0"})
    assert config.listen == config.admin.listen


def test_trusted_proxies_become_networks() -> None:
    config = parse(trusted_proxies=["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"])
    assert config.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("2001:db8::/32"),
    )


def test_trusted_proxies_problems_name_the_entry() -> None:
    found = problems({"backends": [], "trusted_proxies": ["10.0.0.1/8", "nope", 10]})
    assert found == [
        "trusted_proxies[0]: '10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)",
        "trusted_proxies[1]: 'nope' is not a CIDR (e.g. 10.0.0.0/8) or an IP address",
        "trusted_proxies[2]: 10 is not a CIDR (e.g. 10.0.0.0/8) or an IP address",
    ]


# --- backends --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "stored", "name"),
    [
        ("http://127.0.0.1:9001", "http://127.0.0.1:9001", "127.0.0.1:9001"),
        ("http://127.0.0.1:9001/", "http://127.0.0.1:9001", "127.0.0.1:9001"),
        ("HTTP://App.Example:80/", "http://app.example:80", "app.example:80"),
        ("http://app.example", "http://app.example", "app.example:80"),
        ("https://app.example", "https://app.example", "app.example:443"),
        ("http://[::1]:9001", "http://[::1]:9001", "[::1]:9001"),
        ("http://web_1:8000", "http://web_1:8000", "web_1:8000"),
    ],
)
def test_backend_url_is_normalised_and_names_default_to_host_port(
    url: str, stored: str, name: str
) -> None:
    (backend,) = parse_config({"backends": [{"url": url}]}, env={}).backends
    assert (backend.url, backend.name, backend.weight, backend.max_connections) == (
        stored,
        name,
        1,
        0,
    )


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://host:21", "must start with http:// or https://"),
        ("127.0.0.1:9001", "must start with http:// or https://"),
        ("http://", "needs a valid host"),
        ("http:///path", "needs a valid host"),
        ("http://user:pw@host:80", "must not contain user info"),
        ("http://user@host", "must not contain user info"),
        ("http://host:80/api", "must not have a path"),
        ("http://host:80//", "must not have a path"),
        ("http://host:80/?a=1", "must not have a query or a fragment"),
        ("http://host:80?", "must not have a query or a fragment"),
        ("http://host:80#top", "must not have a query or a fragment"),
        ("http://host:99999", "invalid URL"),
        ("http://host:0", "the port must be 1-65535"),
        ("http://[zz]:80", "invalid URL"),
        ("http://a b:80", "needs a valid host"),
        ("", "must be a URL"),
        (9001, "must be a URL"),
    ],
)
def test_backend_url_rejections(url: object, why: str) -> None:
    found = problem({"backends": [{"url": url}]})
    assert found.startswith("backends[0].url: ")
    assert why in found


@pytest.mark.parametrize("name", ["", "has space", "a/b", "x" * 101, 5])
def test_backend_name_rejections(name: object) -> None:
    assert problem({"backends": [{"url": "http://a", "name": name}]}).startswith(
        "backends[0].name: must be 1-100 characters"
    )


def test_backend_weight_and_max_connections() -> None:
    (backend,) = parse_config(
        {"backends": [{"url": "http://a", "weight": 0, "max_connections": 10}]}, env={}
    ).backends
    assert (backend.weight, backend.max_connections) == (0, 10)
    assert problem({"backends": [{"url": "http://a", "max_connections": -1}]}) == (
        "backends[0].max_connections: must be an integer >= 0"
    )


def test_duplicate_backend_names_rejected() -> None:
    found = problems(
        {"backends": [{"url": "http://a", "name": "app"}, {"url": "http://b", "name": "app"}]}
    )
    assert found == ["backends[1].name: 'app' is already used by backends[0]"]


@pytest.mark.parametrize("second", ["http://a:80", "http://A/", "http://a"])
def test_duplicate_backend_urls_rejected(second: str) -> None:
    found = problems(
        {"backends": [{"url": "http://a", "name": "one"}, {"url": second, "name": "two"}]}
    )
    assert len(found) == 1
    assert found[0].startswith("backends[1].url: same backend as backends[0]")


def test_same_host_port_on_other_scheme_is_another_backend() -> None:
    config = parse_config(
        {"backends": [{"url": "http://a:8443", "name": "x"}, {"url": "https://a:8443"}]}, env={}
    )
    assert len(config.backends) == 2


def test_duplicates_found_even_when_other_backends_are_broken() -> None:
    found = problems(
        {"backends": [{"url": "http://a"}, {"url": "ftp://x"}, {"url": "http://a:80"}]}
    )
    assert [line.split(":")[0] for line in found] == [
        "backends[1].url",
        "backends[2].name",
        "backends[2].url",
    ]


def test_parse_backend_for_the_admin_api() -> None:
    backend = parse_backend({"url": "http://h:1/", "weight": 2})
    assert backend == BackendConfig("http://h:1", "h:1", 2)
    with pytest.raises(ConfigError) as error:
        parse_backend({"url": "http://u@h", "weight": -1, "x": 1})
    assert error.value.problems == [
        "url: must not contain user info (user:password@)",
        "weight: must be an integer >= 0",
        "x: unknown key",
    ]
    with pytest.raises(ConfigError):
        parse_backend("http://h")


# --- ${ENV} expansion and the admin token ---------------------------------------------------


def test_env_variables_are_expanded_inside_strings() -> None:
    config = parse_config(
        {
            "backends": [{"url": "http://${HOST}:${PORT}", "name": "app-${ID}"}],
            "admin": {"token": "${TOKEN}", "state_file": "/var/lib/${ID}/state.json"},
        },
        env={"HOST": "10.0.0.5", "PORT": "9000", "ID": "7", "TOKEN": "s3cret"},
    )
    assert config.backends[0].url == "http://10.0.0.5:9000"
    assert config.backends[0].name == "app-7"
    assert config.admin.token == "s3cret"
    assert config.admin.state_file == "/var/lib/7/state.json"


def test_a_whole_value_from_env_is_read_like_yaml() -> None:
    env = {"THREADS": "8", "HC": "false", "RATE": "0.5", "TIMEOUT": "3s", "TOKEN": "12345"}
    config = parse(
        env,
        threads="${THREADS}",
        health_check={"enabled": "${HC}", "timeout": "${TIMEOUT}"},
        chaos={"error_rate": "${RATE}"},
        admin={"token": "${TOKEN}"},
    )
    assert config.threads == 8
    assert config.health_check.enabled is False
    assert config.health_check.timeout == 3.0
    assert config.chaos.error_rate == 0.5
    assert config.admin.token == "12345"  # a string field keeps the text


def test_an_empty_variable_means_null_where_null_is_allowed() -> None:
    config = parse({"RATE": ""}, rate_limit={"per_client": "${RATE}"})
    assert config.rate_limit.per_client is None


def test_unset_variable_is_a_problem_naming_field_and_variable() -> None:
    found = problems(
        {
            "backends": [{"url": "http://${BACKEND_HOST}"}],
            "threads": "${THREADS}",
            "retries": {"retry_on": ["reset", "${EXTRA}"]},
            "admin": {"token": "${A}-${B}"},
        },
        env={"A": "x"},
    )
    assert found == [
        "backends[0].url: environment variable BACKEND_HOST is not set",
        "threads: environment variable THREADS is not set",
        "retries.retry_on[1]: environment variable EXTRA is not set",
        "admin.token: environment variable B is not set",
    ]


def test_unknown_key_with_unset_variable_is_called_unknown() -> None:
    assert problem({"backends": [], "tokn": "${NOPE}"}) == "tokn: unknown key"


@pytest.mark.parametrize("value", ["${", "${1X}", "${A", "$${A}x${"])
def test_malformed_reference_is_a_problem(value: str) -> None:
    assert problem({"backends": [], "access_log": {"path": value}}, env={"A": "a"}) == (
        "access_log.path: malformed ${...} reference (write ${NAME})"
    )


def test_env_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYPROXY_TEST_LOG", "/tmp/pyproxy-test.log")
    config = parse_config({"backends": [], "access_log": {"path": "${PYPROXY_TEST_LOG}"}})
    assert config.access_log.path == "/tmp/pyproxy-test.log"


def test_admin_token_falls_back_to_environment() -> None:
    env = {"PYPROXY_ADMIN_TOKEN": "from-env"}
    assert parse(env).admin.token == "from-env"
    assert parse(env, admin={"token": None}).admin.token == "from-env"
    assert parse(env, admin={"token": "from-file"}).admin.token == "from-file"
    assert parse({"PYPROXY_ADMIN_TOKEN": ""}).admin.token is None
    assert parse().admin.token is None


# --- reading files ----------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pyproxy.yaml"
    path.write_text(text)
    return str(path)


def load_problems(path: str) -> list[str]:
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    return error.value.problems


def test_load_config_sets_source_path(tmp_path: Path) -> None:
    path = write(tmp_path, "backends: []\nthreads: 4\n")
    config = load_config(path, env={})
    assert config.source_path == path
    assert config.threads == 4


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "backends: []\nthreads: 4\ntimeouts:\n  read: [30s\n")
    (found,) = load_problems(path)
    assert found.startswith(f"{path}: invalid YAML at line 5, column 1: ")


def test_yaml_bad_indentation_gives_line(tmp_path: Path) -> None:
    path = write(tmp_path, "backends: []\ntimeouts:\n  read: 1s\n connect: 2s\n")
    (found,) = load_problems(path)
    assert "line 4" in found


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    # Plain PyYAML would keep the second `threads` and silently drop the first.
    path = write(tmp_path, "backends: []\nthreads: 4\nthreads: 8\n")
    assert load_problems(path) == [
        f"{path}: invalid YAML at line 3, column 1: duplicate key 'threads'"
    ]


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    text = "base: &b {weight: 2}\n"
    path = write(tmp_path, text + "backends:\n  - <<: *b\n    url: http://a\n")
    # `base` itself is an unknown key, which proves the rest was parsed and checked.
    assert load_problems(path) == ["base: unknown key"]


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert load_problems(path) == [f"{path}: the file is empty; it needs `backends:` or `pools:`"]


def test_top_level_list_in_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "- url: http://a\n")
    assert load_problems(path) == ["(top level): must be a mapping of settings, not list"]


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    assert load_problems(path) == [f"{path}: cannot read the file: No such file or directory"]


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"backends: []\n# caf\xe9\n")
    (found,) = load_problems(str(path))
    assert found.startswith(f"{path}: not UTF-8 text")


def test_file_problems_carry_field_paths(tmp_path: Path) -> None:
    path = write(tmp_path, "backends:\n  - url: http://a\n  - url: http://b\n    weight: -1\n")
    assert load_problems(path) == ["backends[1].weight: must be an integer >= 0"]


# --- warnings ----------------------------------------------------------------------------


def test_empty_backends_warns() -> None:
    assert EMPTY_BACKENDS_WARNING in config_warnings(parse())


def test_example_config_has_no_backend_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYPROXY_ADMIN_TOKEN", "t")
    assert config_warnings(load_config(str(REPO / "config.yaml"))) == []


@pytest.mark.parametrize(
    ("path", "value", "start"),
    [
        ("timeouts.total", "1s", "timeouts.total: 1s is shorter"),
        ("health_check.timeout", "5s", "health_check.timeout: not shorter"),
        ("rate_limit.burst", 5, "rate_limit.burst: ignored"),
        ("rate_limit.store", "redis://r", "rate_limit.store: unused"),
        ("rate_limit.client_key", "header:X_Key", "rate_limit.client_key: header:X_Key never"),
    ],
)
def test_other_warnings(path: str, value: object, start: str) -> None:
    data = {**setting(path, value), "backends": [{"url": "http://a"}], "admin": {"token": "t"}}
    warnings = config_warnings(parse_config(data, env={}))
    assert any(line.startswith(start) for line in warnings), warnings
    baseline = {"backends": [{"url": "http://a"}], "admin": {"token": "t"}}
    assert config_warnings(parse_config(baseline, env={})) == []


def test_all_weights_zero_warns() -> None:
    config = parse_config({"backends": [{"url": "http://a", "weight": 0}]}, env={})
    assert "backends: every weight is 0 (drain); the proxy answers 503" in config_warnings(config)


def test_missing_token_warns() -> None:
    assert any(line.startswith("admin.token: not set") for line in config_warnings(parse()))
    with_token = parse({"PYPROXY_ADMIN_TOKEN": "t"})
    assert not any(line.startswith("admin.token") for line in config_warnings(with_token))


# --- describe_changes -------------------------------------------------------------------


def config_with(backends: list[dict], **settings: Any) -> Config:
    return parse_config({"backends": backends, **settings}, env={})


def test_no_changes_no_lines() -> None:
    config = config_with([{"url": "http://a"}])
    assert describe_changes(config, config) == []
    assert describe_changes(config, dataclasses.replace(config, source_path="/elsewhere")) == []


def test_backend_changes_are_described() -> None:
    old = config_with(
        [
            {"url": "http://a:1", "name": "a"},
            {"url": "http://b:1", "name": "b"},
            {"url": "http://c:1", "name": "c", "weight": 1},
        ]
    )
    new = config_with(
        [
            {"url": "http://a:1", "name": "a"},
            {"url": "http://c:1", "name": "c", "weight": 3, "max_connections": 10},
            {"url": "http://d:1", "name": "d"},
        ]
    )
    assert describe_changes(old, new) == [
        "backends: added d (http://d:1)",
        "backends: removed b (http://b:1)",
        "backends[c].weight: 1 -> 3",
        "backends[c].max_connections: 0 -> 10",
    ]


def test_setting_changes_are_described_with_restart_notes() -> None:
    old = config_with([])
    new = config_with(
        [],
        listen="127.0.0.1:9090",
        threads=8,
        strategy="weighted",
        preserve_host=False,
        trusted_proxies=["10.0.0.0/8"],
        timeouts={"read": "250ms"},
        retries={"retry_on": [502, "reset"]},
        rate_limit={"per_client": "10/second"},
        admin={"listen": "127.0.0.1:9091"},
    )
    assert describe_changes(old, new) == [
        "listen: 127.0.0.1:8080 -> 127.0.0.1:9090 (needs a restart)",
        "threads: 32 -> 8 (needs a restart)",
        "strategy: round_robin -> weighted",
        "preserve_host: true -> false",
        "trusted_proxies: [] -> [10.0.0.0/8]",
        "timeouts.read: 30 -> 0.25",
        "retries.retry_on: [502, 503, 504, connect_error, reset, timeout] -> [502, reset]",
        "rate_limit.per_client: null -> 10/second",
        "admin.listen: 127.0.0.1:8081 -> 127.0.0.1:9091 (needs a restart)",
    ]


def test_token_change_never_shows_the_token() -> None:
    old = config_with([], admin={"token": "old-secret"})
    new = config_with([], admin={"token": "new-secret"})
    assert describe_changes(old, new) == ["admin.token: changed"]


# --- secrets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://user:pw@cache", "redis://user:***@cache"),
        ("rediss://token@cache", "rediss://***@cache"),
        ("redis://:p@ss:w@rd@cache/0", "redis://:***@cache/0"),  # urlsplit splits at the last @
        ("a redis://:x@h -> redis://u:y@k/1 b", "a redis://:***@h -> redis://u:***@k/1 b"),
        ("memory", "memory"),
        ("http://127.0.0.1:9001", "http://127.0.0.1:9001"),
        ("user@example.com", "user@example.com"),  # not a URL: nothing to hide
    ],
)
def test_redact_secrets(text: str, shown: str) -> None:
    assert redact_secrets(text) == shown


def test_check_never_prints_a_store_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pyproxy.cli import check

    path = tmp_path / "pyproxy.yaml"
    path.write_text(
        "backends: [{url: 'http://ftp://u:b-secret@x'}]\n"
        "rate_limit: {store: 'redis://:s-secret@cache:123456/0', per_client: '${LIMIT}'}\n"
    )
    assert check(str(path)) == 1
    printed = capsys.readouterr()
    assert "rate_limit.store:" in printed.err and "backends[0].url:" in printed.err
    assert "secret" not in printed.out + printed.err, printed.err


def test_a_config_in_a_traceback_or_debug_line_shows_no_secret() -> None:
    config = parse(
        admin={"token": "tok-secret"},
        rate_limit={"store": "redis://:pw-secret@cache:6379/0"},
    )
    assert config.admin.token == "tok-secret"
    assert "secret" not in repr(config) and "secret" not in str(config)
