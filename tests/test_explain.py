"""The X-PyProxy-Explain learning header: who may ask, and what the answer says."""

from __future__ import annotations

import ipaddress

import requests
from backends import EchoBackend, closed_port
from conftest import ProxyFactory

from pyproxy.config.schema import BackendConfig, CircuitBreakerConfig, RetryConfig
from pyproxy.proxy.explain import wants_explanation

ASK = {"X-PyProxy-Explain": "1"}


def test_only_local_or_trusted_clients_may_ask() -> None:
    trusted = (ipaddress.ip_network("10.0.0.0/8"),)
    assert wants_explanation("1", "127.0.0.1", ())
    assert wants_explanation("1", "::1", ())
    assert wants_explanation("1", "10.1.2.3", trusted)
    assert not wants_explanation("1", "192.0.2.7", trusted)
    assert not wants_explanation(None, "127.0.0.1", ())
    assert not wants_explanation("0", "127.0.0.1", ())


def test_the_answer_names_the_choice_and_the_outcome(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    proxy = make_proxy([echo_backend])
    response = http.get(proxy.proxy_url + "/x", headers=ASK)
    assert (
        response.headers["X-PyProxy-Explain"]
        == "strategy=round_robin; #1 echo by round_robin -> 200"
    )
    # The question is for pyproxy: it is not forwarded.
    assert "x-pyproxy-explain" not in {n.lower() for n in echo_backend.requests()[0].header_names()}
    assert "X-PyProxy-Explain" not in http.get(proxy.proxy_url + "/x").headers


def test_a_retry_and_an_open_circuit_are_explained(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    dead = BackendConfig(url=f"http://127.0.0.1:{closed_port()}", name="dead")
    proxy = make_proxy(
        [dead, echo_backend],
        retries=RetryConfig(max_retries=1),
        circuit_breaker=CircuitBreakerConfig(failure_threshold=1, open_duration=60),
    )
    first = http.get(proxy.proxy_url + "/x", headers=ASK).headers["X-PyProxy-Explain"]
    assert "#1 dead by round_robin -> 502 connection refused, retry" in first
    assert "#2 echo by retry" in first and "dead (already tried)" in first
    assert first.endswith("-> 200")
    later = http.get(proxy.proxy_url + "/x", headers=ASK).headers["X-PyProxy-Explain"]
    assert "skipped dead (circuit open, reopens in " in later


def test_no_backend_is_explained(make_proxy: ProxyFactory, http: requests.Session) -> None:
    dead = BackendConfig(url=f"http://127.0.0.1:{closed_port()}", name="dead", weight=0)
    proxy = make_proxy([dead])
    response = http.get(proxy.proxy_url + "/x", headers=ASK)
    assert response.status_code == 503
    assert (
        "no backend available: dead (weight 0 (draining))" in response.headers["X-PyProxy-Explain"]
    )


# -- who may ask, through real sockets ---------------------------------------------
#
# The test client's TCP peer address is 127.0.0.1. Listing it in trusted_proxies makes
# the proxy believe the X-Forwarded-For it sends: this client plays a trusted load
# balancer, and the address it forwards is the real client's.

LOCAL_LB = (ipaddress.ip_network("127.0.0.1/32"),)


def explained(proxy_url: str, http: requests.Session, forwarded_for: str | None) -> bool:
    headers = dict(ASK)
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    response = http.get(proxy_url + "/x", headers=headers, timeout=5)
    assert response.status_code == 200
    return "X-PyProxy-Explain" in response.headers


def test_a_trusted_proxy_forwarding_an_internet_client_gets_no_explanation(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    """The peer (the load balancer) is trusted, the client it forwards is not: the
    answer would describe the pool to anyone on the internet."""
    proxy = make_proxy([echo_backend], trusted_proxies=LOCAL_LB)
    assert not explained(proxy.proxy_url, http, "203.0.113.9")
    # A client that writes a loopback address itself gets it appended to, not believed.
    assert not explained(proxy.proxy_url, http, "127.0.0.1, 203.0.113.9")
    # Nothing forwarded: the trusted peer is the client, and it is local.
    assert explained(proxy.proxy_url, http, None)


def test_a_trusted_proxy_forwarding_a_trusted_client_gets_an_explanation(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    inside = (*LOCAL_LB, ipaddress.ip_network("10.0.0.0/8"))
    proxy = make_proxy([echo_backend], trusted_proxies=inside)
    assert explained(proxy.proxy_url, http, "10.1.2.3")
    assert not explained(proxy.proxy_url, http, "10.1.2.3, 192.0.2.7")


def test_an_untrusted_peers_forwarded_for_is_not_believed_either_way(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    """With no trusted proxies, X-Forwarded-For is the client's own claim: the real
    client is the loopback peer, which may ask whatever the header says."""
    proxy = make_proxy([echo_backend])
    assert explained(proxy.proxy_url, http, "203.0.113.9")
