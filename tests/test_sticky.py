"""Unit tests of sticky-session rules: cookie tokens and rendezvous hashing."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from pyproxy.config.schema import StickyConfig
from pyproxy.policy.sticky import MAX_COOKIES, Sticky, backend_token, cookie_value


@dataclass
class FakeBackend:
    name: str
    url: str
    weight: int = 1
    in_flight: int = 0


def pool(n: int) -> list[FakeBackend]:
    return [FakeBackend(f"b{i}", f"http://127.0.0.1:{9000 + i}") for i in range(n)]


def test_token_is_stable_and_reveals_no_address() -> None:
    token = backend_token("http://127.0.0.1:9001")
    assert token == backend_token("http://127.0.0.1:9001")
    assert token != backend_token("http://127.0.0.1:9002")
    assert "127" not in token and "9001" not in token


def test_cookie_value_parses_both_separators() -> None:
    assert cookie_value("a=1; pyproxy_backend=xyz; b=2", "pyproxy_backend") == "xyz"
    assert cookie_value("a=1, pyproxy_backend=xyz", "pyproxy_backend") == "xyz"
    assert cookie_value("a=1", "pyproxy_backend") is None
    assert cookie_value(None, "pyproxy_backend") is None


def test_cookie_mode_follows_a_valid_cookie_and_ignores_a_tampered_one() -> None:
    sticky = Sticky(StickyConfig(mode="cookie"))
    backends = pool(3)
    header = f"pyproxy_backend={backend_token(backends[2].url)}"
    assert sticky.pinned(backends, header, "10.0.0.1") is backends[2]
    assert sticky.pinned(backends, "pyproxy_backend=forged", "10.0.0.1") is None
    # Pinned backend no longer available: not pinned, the caller picks and re-pins.
    assert sticky.pinned(backends[:2], header, "10.0.0.1") is None


def test_set_cookie_attributes() -> None:
    backend = pool(1)[0]
    value = Sticky(StickyConfig(mode="cookie", cookie_max_age=60)).set_cookie(backend)
    assert value.startswith(f"pyproxy_backend={backend_token(backend.url)}; ")
    for attribute in ("Path=/", "HttpOnly", "SameSite=Lax", "Max-Age=60"):
        assert attribute in value
    assert "Max-Age" not in Sticky(StickyConfig(mode="cookie")).set_cookie(backend)


def test_set_cookie_is_kept_per_backend_and_bounded() -> None:
    """The value is built once per backend URL; past the bound it is built each time."""
    sticky = Sticky(StickyConfig(mode="cookie", cookie_name="s"))
    backends = [FakeBackend(f"b{i}", f"http://10.0.0.1:{i + 1}") for i in range(MAX_COOKIES + 5)]

    first = [sticky.set_cookie(backend) for backend in backends]
    again = [sticky.set_cookie(backend) for backend in backends]

    assert first == again
    assert first[-1] == f"s={backend_token(backends[-1].url)}; Path=/; HttpOnly; SameSite=Lax"
    assert len(set(first)) == len(backends)
    assert len(sticky._cookies) == MAX_COOKIES


def test_ip_mode_is_deterministic_per_client() -> None:
    sticky = Sticky(StickyConfig(mode="ip"))
    backends = pool(4)
    for client in ("10.0.0.1", "10.0.0.2", "192.0.2.9"):
        first = sticky.pinned(backends, None, client)
        assert all(sticky.pinned(backends, None, client) is first for _ in range(5))


def test_ip_mode_moves_only_the_clients_of_a_removed_backend() -> None:
    sticky = Sticky(StickyConfig(mode="ip"))
    backends = pool(5)
    clients = [f"10.1.{i // 256}.{i % 256}" for i in range(2000)]
    before = {c: sticky.pinned(backends, None, c) for c in clients}
    removed = backends[1]
    after = {c: sticky.pinned([b for b in backends if b is not removed], None, c) for c in clients}
    moved = [c for c in clients if before[c] is not after[c]]
    assert moved, "someone had to move"
    assert all(before[c] is removed for c in moved)


def test_ip_mode_spreads_clients_roughly_evenly() -> None:
    sticky = Sticky(StickyConfig(mode="ip"))
    backends = pool(4)
    counts = Counter(
        sticky.pinned(backends, None, f"10.2.{i // 256}.{i % 256}").name for i in range(4000)
    )  # type: ignore[union-attr]
    assert set(counts) == {b.name for b in backends}
    assert min(counts.values()) > 700  # 1000 expected each; generous bound


def test_ip_mode_respects_weights() -> None:
    sticky = Sticky(StickyConfig(mode="ip"))
    heavy, light = (
        FakeBackend("heavy", "http://127.0.0.1:1", 3),
        FakeBackend("light", "http://127.0.0.1:2", 1),
    )
    counts = Counter(sticky.pinned([heavy, light], None, f"c{i}").name for i in range(4000))  # type: ignore[union-attr]
    assert 2600 < counts["heavy"] < 3400  # 3000 expected


def test_none_mode_pins_nothing() -> None:
    assert Sticky(StickyConfig()).pinned(pool(3), "pyproxy_backend=x", "10.0.0.1") is None
