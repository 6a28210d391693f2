"""The SSRF guard for admin-added backends (pyproxy/pool/urlguard.py and the address
checks under it, addresses.py), without HTTP.

Every spelling of a forbidden address is checked two ways: what the guard says, and
what the resolver urllib3 uses (`socket.getaddrinfo`) would actually connect to, so
a spelling the stack accepts cannot slip past a guard that only reads text.
No test here sends a packet: getaddrinfo on a numeric spelling does no DNS.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

import pytest

from pyproxy.config.schema import BackendConfig
from pyproxy.pool.addresses import embedded_ipv4, resolve, why_forbidden
from pyproxy.pool.urlguard import (
    ForbiddenAddress,
    RefusalLog,
    keep_allowed,
    refuse_backend_url,
    resolve_allowed,
)

METADATA = ipaddress.IPv4Address("169.254.169.254")

# IPv4 spellings glibc's inet_aton accepts, all meaning 169.254.169.254.
IPV4_SPELLINGS = [
    "169.254.169.254",
    "2852039166",  # one 32-bit decimal number
    "0xa9fea9fe",  # one hexadecimal number
    "0xa9.0xfe.0xa9.0xfe",  # hexadecimal parts
    "0251.0376.0251.0376",  # octal parts
    "025177524776",  # one octal number
    "169.254.43518",  # a.b.c, c filling the last 16 bits
    "169.16689662",  # a.b, b filling the last 24 bits
]

# IPv6 forms that carry 169.254.169.254 to an IPv4 host.
IPV6_FORMS = [
    "::ffff:169.254.169.254",  # IPv4-mapped
    "::ffff:a9fe:a9fe",  # IPv4-mapped, hex
    "::169.254.169.254",  # IPv4-compatible (deprecated, RFC 4291 §2.5.5.1)
    "64:ff9b::169.254.169.254",  # NAT64 well-known prefix (RFC 6052)
    "64:ff9b::a9fe:a9fe",
    "64:ff9b:1::a9fe:a9fe",  # NAT64 local-use prefix (RFC 8215), /96 position
    "64:ff9b:1:a9fe:a9:fe00::",  # the same prefix at /48: bits 64-71 are skipped
    "2002:a9fe:a9fe::1",  # 6to4 (RFC 3056)
    "2001:0:4136:e378:8000:63bf:5601:5601",  # Teredo, client 169.254.169.254 obfuscated
]


@pytest.mark.parametrize("spelling", IPV4_SPELLINGS)
def test_every_ipv4_spelling_resolves_to_the_metadata_address_and_is_refused(
    spelling: str,
) -> None:
    stack = {info[4][0] for info in socket.getaddrinfo(spelling, 80, type=socket.SOCK_STREAM)}
    assert stack == {"169.254.169.254"}, "the resolver urllib3 uses connects here"
    assert resolve(spelling) == [METADATA]
    why = refuse_backend_url(f"http://{spelling}:80", [])
    assert why is not None and "link-local" in why, why


@pytest.mark.parametrize("form", IPV6_FORMS)
def test_ipv4_inside_ipv6_is_unwrapped_and_refused(form: str) -> None:
    address = ipaddress.IPv6Address(form)
    assert METADATA in embedded_ipv4(address)
    why = refuse_backend_url(f"http://[{form}]:80", [])
    assert why is not None and "link-local" in why and "169.254.169.254" in why, why


@pytest.mark.parametrize(
    "form",
    ["::ffff:0.0.0.0", "::ffff:0.1.2.3", "64:ff9b::", "2002::", "0.0.0.0", "0", "0.1.2.3", "::"],
)
def test_unspecified_and_this_network_in_any_form_are_refused(form: str) -> None:
    host = f"[{form}]" if ":" in form else form
    why = refuse_backend_url(f"http://{host}:80", [])
    assert why is not None and "unspecified" in why, (form, why)


@pytest.mark.parametrize(
    "host", ["[fe80::1]", "[fe80::a9fe:a9fe]", "[febf::1]", "[fe80::1%25eth0]", "[fe80::1%eth0]"]
)
def test_ipv6_link_local_with_or_without_a_zone_is_refused(host: str) -> None:
    why = refuse_backend_url(f"http://{host}:80", [])
    assert why is not None and "link-local" in why, (host, why)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "192.0.2.7",
        "2001:db8::1",
        "::1",
        "64:ff9b::c000:207",  # NAT64 of 192.0.2.7
        "2002:c000:0207::1",  # 6to4 of 192.0.2.7
        "fec0::1",  # outside fe80::/10
        "64:ff9b:1::c000:207",  # NAT64 local-use, /96 position: 192.0.2.7
        "64:ff9b:1:c000:2:700::",  # the same at /48
    ],
)
def test_ordinary_addresses_are_allowed(address: str) -> None:
    assert why_forbidden(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("url", "listener"),
    [
        ("http://127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("http://[::ffff:127.0.0.1]:8080", ("127.0.0.1", 8080)),
        ("http://[::ffff:7f00:1]:8080", ("0.0.0.0", 8080)),
        ("http://2130706433:8080", ("127.0.0.1", 8080)),  # decimal 127.0.0.1
        ("http://0x7f.1:8080", ("127.0.0.1", 8080)),
        ("http://127.1:8080", ("127.0.0.1", 8080)),
        ("http://[::1]:8080", ("::", 8080)),
    ],
)
def test_own_listeners_in_any_spelling_are_refused(url: str, listener: tuple[str, int]) -> None:
    why = refuse_backend_url(url, [listener])
    assert why is not None and "own listeners" in why, (url, why)
    assert refuse_backend_url(url, [(listener[0], listener[1] + 1)]) is None


def test_connect_time_resolution_refuses_a_name_that_now_points_at_metadata(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    answers = {"app.test": "127.0.0.1"}
    real = socket.getaddrinfo

    def fake(host: str, port: object, *args: object, **kwargs: object) -> list:  # type: ignore[type-arg]
        if host in answers:
            return real(answers[host], port, *args, **kwargs)  # type: ignore[arg-type]
        return real(host, port, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    assert resolve_allowed("app.test", 80) == ["127.0.0.1"]
    answers["app.test"] = "0xa9fea9fe"  # DNS changed after the admin check
    with (
        caplog.at_level(logging.WARNING, logger="pyproxy.pool.urlguard"),
        pytest.raises(ForbiddenAddress, match="link-local"),
    ):
        resolve_allowed("app.test", 80)
    assert "app.test:80" in caplog.text
    with pytest.raises(OSError):
        resolve_allowed("does-not-exist.invalid", 80)  # RFC 6761: .invalid never resolves


def test_restored_backends_get_the_admin_rules(caplog: pytest.LogCaptureFixture) -> None:
    backends = [
        BackendConfig(url="http://127.0.0.1:9001", name="fine"),
        BackendConfig(url="http://[::ffff:169.254.169.254]", name="metadata"),
        BackendConfig(url="http://2852039166", name="metadata-decimal"),
        BackendConfig(url="http://127.0.0.1:8081", name="loop"),
        BackendConfig(url="http://later.invalid:80", name="dns-not-up-yet"),
    ]
    with caplog.at_level(logging.ERROR, logger="pyproxy.pool.urlguard"):
        kept = keep_allowed(backends, [("127.0.0.1", 8081)])
    assert [b.name for b in kept] == ["fine", "dns-not-up-yet"]
    for name in ("metadata", "metadata-decimal", "loop"):
        assert f"skipped backend {name} " in caplog.text, caplog.text


def test_the_refusal_log_says_what_changed_and_stays_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refusals = RefusalLog(limit=2)
    with caplog.at_level(logging.INFO, logger="pyproxy.pool.urlguard"):
        for _ in range(3):
            refusals.refused("a.test", 80, "link-local")
        refusals.refused("a.test", 80, "unspecified")  # a new reason
        refusals.refused("a.test", 8080, "link-local")  # another backend (port)
        refusals.allowed("b.test", 80)  # never refused: nothing to say
        refusals.allowed("a.test", 8080)
        refusals.refused("a.test", 8080, "link-local")  # refused again after a change
        refusals.refused("c.test", 80, "link-local")  # a third: a.test:80 is forgotten
        refusals.refused("a.test", 80, "unspecified")
    assert [r.getMessage().split("backend ")[1] for r in caplog.records] == [
        "a.test:80: link-local",
        "a.test:80: unspecified",
        "a.test:8080: link-local",
        "a.test:8080 is allowed again",
        "a.test:8080: link-local",
        "c.test:80: link-local",
        "a.test:80: unspecified",
    ]


def this_hosts_outward_address() -> str | None:
    """The address this host would send from to the world: a UDP connect() picks it
    from the routing table and sends nothing. None without a route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        try:
            udp.connect(("198.51.100.7", 9))  # TEST-NET-2 (RFC 5737): never answered
        except OSError:
            return None
        address = str(udp.getsockname()[0])
    return None if ipaddress.ip_address(address).is_loopback else address


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
def test_a_wildcard_listener_owns_every_address_of_this_host(wildcard: str) -> None:
    """A listener on 0.0.0.0 or :: accepts on every address of the host, not only on
    loopback: a backend at the host's LAN address and that port is pyproxy itself."""
    own = this_hosts_outward_address()
    if own is None:
        pytest.skip("this host has no non-loopback IPv4 address to test with")
    why = refuse_backend_url(f"http://{own}:8080", [(wildcard, 8080)])
    assert why is not None and "own listeners" in why, why
    assert refuse_backend_url(f"http://{own}:8080", [("127.0.0.1", 8080)]) is None
    assert refuse_backend_url(f"http://{own}:8081", [(wildcard, 8080)]) is None
    # An address that is not this host's, on the same port: someone else.
    assert refuse_backend_url("http://198.51.100.7:8080", [(wildcard, 8080)]) is None
