"""Availability has one judge: `why_unavailable()` in runtime/snapshot.py.

A Backend and its BackendSnapshot hold facts; whether the backend may take a new
request is asked of the judge by each consumer, so selection, the explain header,
/admin/backends (list and add), the status page and /readyz cannot disagree. These
tests make a backend unavailable for a reason that lives outside the Backend (an
empty per-backend rate bucket, which the runtime owns) and ask every consumer through
real sockets.
"""

from __future__ import annotations

import dataclasses
import json

import requests
from backends import EchoBackend
from conftest import ProxyFactory

from pyproxy.config.schema import Address, AdminConfig, Rate, RateLimitConfig
from pyproxy.pool.backend import Backend, BackendSnapshot
from pyproxy.runtime.snapshot import RATE_BUCKET_EMPTY

TOKEN = "t0ken-for-availability"
ASK = {"X-PyProxy-Explain": "1"}


def test_every_consumer_gives_the_one_judges_verdict(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    proxy = make_proxy(
        [echo_backend],
        rate_limit=RateLimitConfig(per_backend=Rate(1, 3600.0)),
        admin=AdminConfig(listen=Address("127.0.0.1", 0), token=TOKEN),
    )
    assert http.get(proxy.proxy_url + "/spend", timeout=5).status_code == 200
    (backend,) = proxy.holder.runtime.backends
    assert proxy.holder.runtime.why_unavailable(backend) == RATE_BUCKET_EMPTY
    assert proxy.holder.runtime.candidates() == []  # selection

    listed = http.get(proxy.admin_url + "/admin/backends", timeout=5).json()
    (entry,) = listed["backends"]
    assert (entry["available"], entry["why_unavailable"]) == (False, RATE_BUCKET_EMPTY)

    page = http.get(proxy.admin_url + "/admin/status", timeout=5).text
    assert RATE_BUCKET_EMPTY in page

    ready = http.get(proxy.admin_url + "/readyz", timeout=5)
    assert (ready.status_code, ready.text) == (503, "no backend available\n")

    refused = http.get(proxy.proxy_url + "/x", headers=ASK, timeout=5)
    assert refused.status_code == 503
    assert f"{backend.name} ({RATE_BUCKET_EMPTY})" in refused.headers["X-PyProxy-Explain"]


def test_the_add_backend_reply_carries_the_judges_verdict(
    make_proxy: ProxyFactory, echo_backend: EchoBackend, http: requests.Session
) -> None:
    """The 201 reply is built like a /admin/backends entry: facts, then the verdict."""
    proxy = make_proxy([], admin=AdminConfig(listen=Address("127.0.0.1", 0), token=TOKEN))
    reply = http.post(
        proxy.admin_url + "/admin/add-backend",
        data=json.dumps({"url": echo_backend.url, "name": "late"}),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        timeout=5,
    )
    assert reply.status_code == 201
    added = reply.json()
    listed = http.get(proxy.admin_url + "/admin/backends", timeout=5).json()["backends"]
    assert added.keys() == listed[0].keys()
    assert (added["available"], added["why_unavailable"]) == (True, None)  # checks are off


def test_a_backend_and_its_snapshot_hold_facts_only() -> None:
    """No second judge hides in the facts: the verdict is never stored, only asked."""
    fields = {field.name for field in dataclasses.fields(BackendSnapshot)}
    assert not fields & {"available", "why_unavailable"}
    assert not hasattr(Backend, "unavailable_reason")
    assert not hasattr(Backend, "available")
