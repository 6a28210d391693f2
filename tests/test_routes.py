"""Route matching (pyproxy/policy/routes.py): every rule, its edges, and a linear reference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyproxy.config.pools_report import covers
from pyproxy.config.schema import RouteConfig, RouteMatch
from pyproxy.policy.routes import Route, RouteTable, request_host


def route(pool: str, host: str | None = None, prefix: str | None = None, **kw: bool) -> RouteConfig:
    return RouteConfig(name=pool, pool=pool, match=RouteMatch(host, prefix), **kw)


def pool_for(routes: list[RouteConfig], host: str, path: str) -> str | None:
    found = RouteTable.build(routes).match(host, path)
    return None if found is None else found.pool


# --- host ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["a.example.com", "A.EXAMPLE.COM", "A.EXAMPLE.COM:8080", "a.example.com.", "a.example.com.:80"],
)
def test_host_is_matched_case_insensitively_port_and_final_dot_ignored(host: str) -> None:
    assert pool_for([route("a", host="a.example.com")], host, "/") == "a"


@pytest.mark.parametrize("host", ["[::1]", "[::1]:8080", "[::1]:"])
def test_ipv6_literal_host_with_or_without_port(host: str) -> None:
    assert pool_for([route("six", host="[::1]")], host, "/") == "six"


def test_ipv4_host_with_port() -> None:
    assert pool_for([route("four", host="127.0.0.1")], "127.0.0.1:8080", "/") == "four"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("a.example.com", "wild"),
        ("B.Example.Com:443", "wild"),
        ("example.com", None),  # the wildcard needs one more label
        ("a.b.example.com", None),  # ... and exactly one
        (".example.com", None),  # an empty label is no label
        ("aexample.com", None),
        ("a.example.org", None),
    ],
)
def test_wildcard_matches_exactly_one_extra_label(host: str, expected: str | None) -> None:
    assert pool_for([route("wild", host="*.example.com")], host, "/") == expected


def test_other_hosts_do_not_match_and_no_route_is_none() -> None:
    assert pool_for([route("a", host="a.example.com")], "b.example.com", "/") is None
    assert pool_for([route("a", host="a.example.com")], "", "/") is None
    assert pool_for([], "a.example.com", "/") is None


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("A.Example.COM:8080", "a.example.com"),
        ("[::1]:8080", "[::1]"),
        ("[::1]", "[::1]"),
        ("example.com.", "example.com"),
        ("", ""),
    ],
)
def test_request_host(host: str, expected: str) -> None:
    assert request_host(host) == expected


# --- path prefix ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1", True),
        ("/v1/", True),
        ("/v1/x", True),
        ("/v1?q", True),
        ("/v1?q=/v2", True),
        ("/v1x", False),  # never across a segment boundary
        ("/v1%2Fx", False),  # raw path: an encoded slash is not a separator
        ("/V1", False),  # paths are case-sensitive (RFC 3986, 6.2.2.1)
        ("/v", False),
        ("/", False),
        ("/x/v1", False),
        ("*", False),
    ],
)
def test_prefix_matches_on_a_segment_boundary(path: str, expected: bool) -> None:
    assert (pool_for([route("v1", prefix="/v1")], "h", path) == "v1") is expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/v1/", True), ("/v1/x", True), ("/v1/x?q", True), ("/v1", False), ("/v1?q", False)],
)
def test_prefix_ending_in_a_slash_takes_paths_that_start_with_it(path: str, expected: bool) -> None:
    assert (pool_for([route("v1", prefix="/v1/")], "h", path) == "v1") is expected


def test_root_prefix_takes_every_path_and_an_empty_path_counts_as_root() -> None:
    routes = [route("root", prefix="/")]
    assert pool_for(routes, "h", "/anything/at?all") == "root"
    assert pool_for(routes, "h", "") == "root"


def test_query_is_never_matched() -> None:
    assert pool_for([route("v1", prefix="/v1")], "h", "/other?/v1") is None


# --- host and path together, order ---------------------------------------------------------


def test_both_host_and_prefix_must_match() -> None:
    routes = [route("api", host="api.example.com", prefix="/v1")]
    assert pool_for(routes, "api.example.com", "/v1/users") == "api"
    assert pool_for(routes, "api.example.com", "/v2") is None
    assert pool_for(routes, "www.example.com", "/v1") is None


def test_first_match_in_file_order_wins_across_the_three_indexes() -> None:
    routes = [
        route("anyhost", prefix="/early"),  # host-less, but first in the file
        route("exact", host="a.example.com"),
        route("wild", host="*.example.com"),
        route("catchall"),
    ]
    assert pool_for(routes, "a.example.com", "/early/x") == "anyhost"
    assert pool_for(routes, "a.example.com", "/late") == "exact"
    assert pool_for(routes, "b.example.com", "/late") == "wild"
    assert pool_for(routes, "example.com", "/late") == "catchall"


def test_wildcard_before_exact_host_wins_when_earlier_in_the_file() -> None:
    routes = [route("wild", host="*.example.com"), route("exact", host="a.example.com")]
    assert pool_for(routes, "a.example.com", "/") == "wild"


def test_catch_all_matches_everything() -> None:
    assert pool_for([route("all")], "whatever:1", "/x?y") == "all"
    assert pool_for([route("all")], "", "*") == "all"


def test_build_names_routes_by_file_position() -> None:
    table = RouteTable.build([route("a"), route("b")])
    assert [(r.index, r.pool) for r in table.routes] == [(0, "a"), (1, "b")]


# --- strip_prefix --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "path", "upstream"),
    [
        ("/v1", "/v1/users", "/users"),
        ("/v1", "/v1", "/"),
        ("/v1", "/v1/", "/"),
        ("/v1", "/v1?x=1", "/?x=1"),
        ("/v1", "/v1/users?x=1", "/users?x=1"),
        ("/v1/", "/v1/users", "/users"),
        ("/v1/", "/v1/", "/"),
        ("/", "/users", "/users"),
        ("/a/b", "/a/b/c%2Fd", "/c%2Fd"),  # the raw rest, still encoded
    ],
)
def test_strip_prefix(prefix: str, path: str, upstream: str) -> None:
    found = RouteTable.build([route("p", prefix=prefix, strip_prefix=True)]).match("h", path)
    assert found is not None and found.upstream_path(path) == upstream


def test_without_strip_prefix_the_path_is_unchanged() -> None:
    found = RouteTable.build([route("p", prefix="/v1")]).match("h", "/v1/users")
    assert found is not None and found.upstream_path("/v1/users") == "/v1/users"


# --- against a linear reference ------------------------------------------------------------


def reference_host_ok(pattern: str | None, host: str) -> bool:
    if pattern is None:
        return True
    name = host.lower()
    name = name[: name.index("]") + 1] if name.startswith("[") else name.split(":")[0]
    name = name.removesuffix(".")
    if pattern.startswith("*."):
        labels = name.split(".")
        return len(labels) >= 2 and labels[0] != "" and ".".join(labels[1:]) == pattern[2:]
    return name == pattern


def reference_path_ok(prefix: str | None, raw_path: str) -> bool:
    if prefix is None:
        return True
    path = (raw_path or "/").split("?")[0]
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


def reference(routes: list[RouteConfig], host: str, path: str) -> int | None:
    """The index of the first route in file order that matches: no index, no cleverness."""
    for index, config in enumerate(routes):
        if reference_host_ok(config.match.host, host) and reference_path_ok(
            config.match.path_prefix, path
        ):
            return index
    return None


LABELS = st.sampled_from(["a", "b", "example", "com"])
DOMAINS = st.lists(LABELS, min_size=1, max_size=3).map(".".join)
HOST_PATTERNS = st.one_of(
    st.none(), DOMAINS, DOMAINS.map(lambda domain: "*." + domain), st.just("[::1]")
)
SEGMENTS = st.lists(st.sampled_from(["v1", "v1x", "a", "%2F", "v1%2Fx"]), max_size=3)
PREFIXES = st.one_of(
    st.none(),
    st.tuples(SEGMENTS, st.booleans()).map(
        lambda parts: "/" + "/".join(parts[0]) + ("/" if parts[1] and parts[0] else "")
    ),
)
ROUTES = st.lists(
    st.builds(
        lambda host, prefix: RouteConfig(name="r", pool="p", match=RouteMatch(host, prefix)),
        HOST_PATTERNS,
        PREFIXES,
    ),
    max_size=8,
)
REQUEST_HOSTS = st.one_of(
    st.tuples(
        st.lists(st.sampled_from(["a", "B", "example", "COM", ""]), min_size=1, max_size=4),
        st.sampled_from(["", ":8080", ".", ".:80"]),
    ).map(lambda parts: ".".join(parts[0]) + parts[1]),
    st.sampled_from(["[::1]", "[::1]:8080", ""]),
)
REQUEST_PATHS = st.tuples(SEGMENTS, st.booleans(), st.sampled_from(["", "?q", "?q=/v1", "x"])).map(
    lambda parts: "/" + "/".join(parts[0]) + ("/" if parts[1] else "") + parts[2]
)


@settings(max_examples=500, deadline=None)
@given(ROUTES, REQUEST_HOSTS, REQUEST_PATHS)
def test_route_table_agrees_with_a_linear_scan(
    routes: list[RouteConfig], host: str, path: str
) -> None:
    found = RouteTable.build(routes).match(host, path)
    assert (None if found is None else found.index) == reference(routes, host, path)


@settings(max_examples=500, deadline=None)
@given(ROUTES, REQUEST_HOSTS, REQUEST_PATHS)
def test_a_route_the_check_calls_shadowed_never_matches(
    routes: list[RouteConfig], host: str, path: str
) -> None:
    """`--check` warns "can never match" only about routes the table really never picks."""
    found: Route | None = RouteTable.build(routes).match(host, path)
    if found is not None:
        earlier = routes[: found.index]
        assert not any(covers(before.match, routes[found.index].match) for before in earlier)


def test_covers_means_every_request_of_the_later_match_is_taken_by_the_earlier() -> None:
    """Exhaustive over small sets built so that near misses (/v1 vs /v1x) meet."""
    hosts = [None, "example.com", "a.example.com", "*.example.com", "*.a.example.com"]
    prefixes = [None, "/", "/v1", "/v1/", "/v1x", "/v1/a", "/v1%2Fx"]
    matches = [RouteMatch(host, prefix) for host in hosts for prefix in prefixes]
    requests = [
        (host, path)
        for host in ["example.com", "a.example.com", "b.a.example.com", "A.example.com:1"]
        for path in ["/", "/v1", "/v1/", "/v1x", "/v1/a", "/v1?q", "/v1%2Fx", "/v1x/"]
    ]

    def takes(match: RouteMatch, host: str, path: str) -> bool:
        return reference_host_ok(match.host, host) and reference_path_ok(match.path_prefix, path)

    covered_pairs = 0
    for earlier in matches:
        for later in matches:
            if covers(earlier, later):
                covered_pairs += 1
                for host, path in requests:
                    assert not takes(later, host, path) or takes(earlier, host, path)
    assert covered_pairs > len(matches)  # more than each match covering itself
