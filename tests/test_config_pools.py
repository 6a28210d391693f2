"""`pools`, `routes` and `workers` in the config file: schema, merging, problems, warnings."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pyproxy.config.load import ConfigError, config_warnings, describe_changes, parse_config
from pyproxy.config.report import keep_running_values, needs_restart
from pyproxy.config.schema import (
    BackendConfig,
    Config,
    HealthCheckConfig,
    Rate,
    RouteConfig,
    RouteMatch,
)

REPO = Path(__file__).resolve().parent.parent


def parse(data: dict[str, Any]) -> Config:
    return parse_config(data, env={})


def problems(data: object) -> list[str]:
    with pytest.raises(ConfigError) as error:
        parse_config(data, env={})
    return error.value.problems


def two_pools(**extra: Any) -> dict[str, Any]:
    """web (two backends) and api (one), routed by host, plus `extra` top-level keys."""
    return {
        "pools": {
            "web": {
                "backends": [
                    {"url": "http://10.0.0.11:8000", "name": "web1"},
                    {"url": "http://10.0.0.12:8000", "name": "web2", "backup": True},
                ]
            },
            "api": {"backends": [{"url": "http://10.0.0.21:9000", "name": "api1"}]},
        },
        "routes": [
            {"name": "api", "match": {"host": "api.example.com"}, "pool": "api"},
            {"pool": "web"},
        ],
        **extra,
    }


# --- the v1 form is one pool and one catch-all route ----------------------------------


def test_v1_file_is_one_default_pool_and_a_catch_all() -> None:
    config = parse(
        {
            "backends": [{"url": "http://127.0.0.1:9001", "name": "app1"}],
            "strategy": "least_connections",
            "health_check": {"path": "/ping"},
            "sticky": {"mode": "ip"},
            "rate_limit": {"per_backend": "5/second"},
        }
    )
    (pool,) = config.pools
    assert pool.name == "default"
    assert pool.backends == config.backends
    assert pool.strategy == "least_connections"
    assert pool.health_check == config.health_check
    assert pool.health_check.path == "/ping"
    assert pool.sticky.mode == "ip"
    assert pool.per_backend_rate == Rate(5, 1.0)
    assert config.routes == (RouteConfig(name="routes[0]", pool="default"),)
    assert config.declared_pools == () and config.declared_routes == ()


def test_config_built_in_code_from_backends_has_its_pool() -> None:
    backend = BackendConfig(url="http://a:1", name="a")
    config = Config(backends=(backend,))
    assert config.pools[0].backends == (backend,)
    replaced = dataclasses.replace(config, health_check=HealthCheckConfig(path="/x"))
    assert replaced.pools[0].health_check.path == "/x"  # derived again, never stale


def test_backup_defaults_to_false_and_can_be_set() -> None:
    config = parse({"backends": [{"url": "http://a:1"}, {"url": "http://b:1", "backup": True}]})
    assert [backend.backup for backend in config.backends] == [False, True]


# --- pools + routes --------------------------------------------------------------------


def test_pools_and_routes_are_read_in_file_order() -> None:
    config = parse(two_pools())
    assert [pool.name for pool in config.pools] == ["web", "api"]
    assert [route.name for route in config.routes] == ["api", "routes[1]"]
    assert config.routes[0].match == RouteMatch(host="api.example.com")
    assert config.routes[1].match == RouteMatch()
    # Every backend of every pool, for code that still reads the flat list.
    assert [backend.name for backend in config.backends] == ["web1", "web2", "api1"]
    assert config.pool("api") is not None and config.pool("nope") is None


def test_pool_sections_merge_field_by_field_over_the_top_level() -> None:
    data = two_pools(
        strategy="weighted",
        health_check={"interval": "7s", "path": "/top"},
        retries={"max_retries": 4},
        rate_limit={"per_backend": "10/second"},
    )
    data["pools"]["web"].update(
        strategy="least_connections",
        health_check={"path": "/healthz", "host": "web.internal", "port": 8081},
        circuit_breaker={"failure_threshold": 9},
        sticky={"mode": "cookie"},
        rate_limit={"per_backend": "50/second"},
    )
    web, api = parse(data).pools
    assert web.strategy == "least_connections"
    assert web.health_check == HealthCheckConfig(
        path="/healthz", interval=7.0, host="web.internal", port=8081
    )
    assert web.circuit_breaker.failure_threshold == 9
    assert web.circuit_breaker.open_duration == 30.0
    assert web.retries.max_retries == 4  # inherited
    assert web.sticky.mode == "cookie"
    assert web.per_backend_rate == Rate(50, 1.0)
    assert api.strategy == "weighted"
    assert api.health_check.path == "/top"
    assert api.per_backend_rate == Rate(10, 1.0)


def test_single_pool_without_routes_takes_everything() -> None:
    config = parse({"pools": {"web": {"backends": [{"url": "http://a:1"}]}}})
    assert config.routes == (RouteConfig(name="routes[0]", pool="web"),)
    assert any(warning.startswith("routes: not set") for warning in config_warnings(config))


def test_health_check_host_port_and_expect_body() -> None:
    config = parse(
        {
            "backends": [],
            "health_check": {"host": "[::1]:8080", "port": 9100, "expect_body": "OK"},
        }
    )
    assert config.health_check.host == "[::1]:8080"
    assert config.health_check.port == 9100
    assert config.health_check.expect_body == "OK"
    assert HealthCheckConfig().host is None and HealthCheckConfig().expect_body is None


@pytest.mark.parametrize(("value", "expected"), [(1, 1), (4, 4), ("auto", os.cpu_count() or 1)])
def test_workers(value: object, expected: int) -> None:
    assert parse({"backends": [], "workers": value}).workers == expected


def test_workers_is_restart_only() -> None:
    assert needs_restart("workers")
    running = parse({"backends": [], "workers": 2})
    new = parse({"backends": [], "workers": 4})
    assert keep_running_values(running, new).workers == 2
    assert describe_changes(running, new) == ["workers: 2 -> 4 (needs a restart)"]


# --- problems, all in one pass, with field paths ------------------------------------


def test_many_mistakes_in_pools_and_routes_are_all_reported() -> None:
    data = two_pools(health_check={"interval": "soon"})
    data["pools"]["web"]["health_check"] = {"path": "healthz", "port": 0}
    data["pools"]["web"]["strategy"] = "fastest"
    data["pools"]["api"]["backends"].append({"url": "http://10.0.0.22:9000", "name": "web1"})
    data["pools"]["api"]["rate_limit"] = {"per_client": "5/second"}
    data["routes"].append({"pool": "apii", "match": {"path_prefix": "v1"}})
    data["routes"].append({"pool": "web", "match": {"host": "a.*.com"}, "strip_prefix": True})
    assert problems(data) == [
        "health_check.interval: invalid duration 'soon' (use e.g. 250ms, 2s, 5m)",
        "pools.web.health_check.path: must be a path starting with '/' (e.g. /health)",
        "pools.web.health_check.port: must be an integer from 1 to 65535",
        "pools.web.strategy: must be one of round_robin, random, least_connections,"
        " weighted (got 'fastest')",
        "pools.api.rate_limit: only per_backend may be set per pool, not per_client",
        "pools.api.backends[1].name: 'web1' is already used in pools.web",
        "routes[2].match.path_prefix: must be a path starting with '/' (e.g. /health)",
        "routes[3].match.host: only one leading wildcard label, as in *.example.com"
        " (got 'a.*.com')",
    ]


def test_route_naming_an_unknown_pool() -> None:
    data = two_pools()
    data["routes"].insert(2, {"pool": "apii"})
    assert problems(data) == ["routes[2].pool: unknown pool 'apii' (did you mean api?)"]


def test_backends_and_pools_together_is_an_error() -> None:
    found = problems({**two_pools(), "backends": []})
    assert len(found) == 1 and found[0].startswith("backends: a file has either top-level")


def test_routes_without_pools_is_an_error() -> None:
    found = problems({"backends": [], "routes": [{"pool": "default"}]})
    assert found == ["routes: needs pools (with top-level backends, every request goes to them)"]


def test_several_pools_without_routes_is_an_error_that_says_add_a_route() -> None:
    data = two_pools()
    del data["routes"]
    (found,) = problems(data)
    assert found.startswith("routes: is required with more than one pool")
    assert "{pool: web}" in found


@pytest.mark.parametrize(
    ("pools", "message"),
    [
        ({}, "pools: must be a mapping of pool names to pools"),
        ([], "pools: must be a mapping of pool names to pools"),
        ({"web.v2": {"backends": []}}, "pools.web.v2: must be 1-100 characters"),
        ({"web": {}}, "pools.web.backends: is required"),
        ({"web": {"backends": [], "weight": 1}}, "pools.web.weight: unknown key"),
    ],
)
def test_pool_shape_problems(pools: object, message: str) -> None:
    found = problems({"pools": pools, "routes": [{"pool": "web"}]})
    assert any(problem.startswith(message) for problem in found), found


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({}, "routes[0].pool: is required"),
        ({"pool": "web", "name": "two words"}, "routes[0].name: must be"),
        ({"pool": "web", "strip_prefix": True}, "routes[0].strip_prefix: needs match.path_prefix"),
        (
            {"pool": "web", "match": {"host": "a.com:80"}},
            "routes[0].match.host: must not have a port",
        ),
        ({"pool": "web", "match": {"host": "*"}}, "routes[0].match.host: only one"),
        ({"pool": "web", "match": {"host": "*.*.com"}}, "routes[0].match.host: only one"),
        ({"pool": "web", "match": {"host": "*a.com"}}, "routes[0].match.host: only one"),
        ({"pool": "web", "match": {"path_prefix": "/a?b"}}, "routes[0].match.path_prefix: must"),
        ({"pool": "web", "match": {"paths": "/"}}, "routes[0].match.paths: unknown key"),
    ],
)
def test_route_problems(route: dict[str, Any], message: str) -> None:
    data = {"pools": {"web": {"backends": []}}, "routes": [route]}
    found = problems(data)
    assert any(problem.startswith(message) for problem in found), found


def test_unreadable_pools_do_not_make_every_route_an_unknown_pool() -> None:
    found = problems({"pools": ["web"], "routes": [{"pool": "web"}]})
    assert found == ["pools: must be a mapping of pool names to pools (pools: {web: ...})"]


def test_route_names_are_unique() -> None:
    data = two_pools()
    data["routes"][1]["name"] = "api"
    assert problems(data) == ["routes[1].name: 'api' is already used by routes[0]"]


def test_host_patterns_are_stored_lower_case_without_the_final_dot() -> None:
    data = two_pools()
    data["routes"][0]["match"] = {"host": "API.Example.COM."}
    assert parse(data).routes[0].match.host == "api.example.com"


# --- warnings ----------------------------------------------------------------------------


def test_a_pool_nothing_routes_to_is_a_warning() -> None:
    data = two_pools()
    data["routes"] = [{"pool": "web"}]
    assert "pools.api: no route sends requests here" in config_warnings(parse(data))


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        ({}, {"host": "a.example.com"}),
        ({"host": "a.example.com"}, {"host": "a.example.com", "path_prefix": "/v1"}),
        ({"host": "*.example.com"}, {"host": "a.example.com"}),
        ({"path_prefix": "/v1"}, {"path_prefix": "/v1/users"}),
        ({"path_prefix": "/v1"}, {"path_prefix": "/v1/"}),
        ({"path_prefix": "/"}, {"path_prefix": "/anything"}),
    ],
)
def test_a_shadowed_route_is_a_warning(earlier: dict[str, str], later: dict[str, str]) -> None:
    data = two_pools()
    data["routes"] = [{"match": earlier, "pool": "web"}, {"match": later, "pool": "api"}]
    assert any(w.startswith("routes[1]: can never match") for w in config_warnings(parse(data)))


def test_shadow_warning_names_the_route_that_comes_first() -> None:
    data = two_pools()
    data["routes"] = [
        {"name": "everything", "pool": "web"},
        {"match": {"path_prefix": "/x"}, "pool": "api"},
    ]
    assert (
        "routes[1]: can never match: routes[0] (everything, a catch-all) comes first"
        " and takes all its requests"
    ) in config_warnings(parse(data))


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        ({"host": "a.example.com"}, {}),
        ({"host": "*.example.com"}, {"host": "example.com"}),
        ({"host": "*.example.com"}, {"host": "a.b.example.com"}),
        ({"path_prefix": "/v1"}, {"path_prefix": "/v1x"}),
        ({"path_prefix": "/v1/"}, {"path_prefix": "/v1"}),
    ],
)
def test_a_reachable_route_is_not_warned_about(
    earlier: dict[str, str], later: dict[str, str]
) -> None:
    data = two_pools()
    data["routes"] = [{"match": earlier, "pool": "web"}, {"match": later, "pool": "api"}]
    assert not any("can never match" in w for w in config_warnings(parse(data)))


def test_a_pool_health_check_with_a_long_timeout_is_warned_about_at_its_path() -> None:
    data = two_pools()
    data["pools"]["api"]["health_check"] = {"timeout": "10s"}
    warnings = config_warnings(parse(data))
    assert any(w.startswith("pools.api.health_check.timeout: not shorter") for w in warnings)
    assert not any(w.startswith("pools.web.health_check") for w in warnings)


def test_workers_with_memory_rate_limits_warn() -> None:
    config = parse({"backends": [], "workers": 4, "rate_limit": {"per_client": "10/second"}})
    (warning,) = [w for w in config_warnings(config) if w.startswith("workers:")]
    assert "up to 4 times" in warning and "store: redis://" in warning
    one = parse({"backends": [], "workers": 1, "rate_limit": {"per_client": "10/second"}})
    assert not any(w.startswith("workers:") for w in config_warnings(one))


def test_a_clean_pools_file_has_no_pool_warnings() -> None:
    warnings = config_warnings(parse(two_pools()))
    assert not [w for w in warnings if w.startswith(("pools", "routes", "workers"))]


# --- reload lines and the example file ---------------------------------------------------


def test_reload_names_the_pools_and_routes_that_changed() -> None:
    old = parse(two_pools())
    data = two_pools()
    data["pools"]["web"]["strategy"] = "random"
    data["pools"]["extra"] = {"backends": []}
    data["routes"].insert(1, {"name": "x", "match": {"path_prefix": "/x"}, "pool": "extra"})
    lines = describe_changes(old, parse(data))
    assert "pools: added extra (0 backend(s))" in lines
    assert "pools.web: changed" in lines
    assert (
        "routes: [api: host api.example.com -> api, routes[1]: everything -> web]"
        " -> [api: host api.example.com -> api, x: path /x -> extra,"
        " routes[2]: everything -> web]"
    ) in lines


def test_a_reload_that_changes_only_a_match_says_so() -> None:
    old = parse(two_pools())
    data = two_pools()
    data["routes"][0]["match"] = {"host": "api.example.org"}
    (line,) = [line for line in describe_changes(old, parse(data)) if line.startswith("routes")]
    assert "host api.example.com -> api" in line and "host api.example.org -> api" in line


def test_the_commented_pools_example_in_config_yaml_is_valid() -> None:
    text = (REPO / "config.yaml").read_text()
    start = text.index("# pools:")
    example = re.sub(r"^# ?", "", text[start:], flags=re.MULTILINE)
    v1 = yaml.safe_load(text)
    del v1["backends"]
    config = parse({**v1, **yaml.safe_load(example)})
    assert [pool.name for pool in config.pools] == ["web", "api"]
    assert [route.pool for route in config.routes] == ["api", "web", "web"]
    assert config.pools[0].backends[2].backup
