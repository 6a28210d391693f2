"""RuntimeSwap, AdminChanges and the state file, without HTTP.

`RuntimeSwap` is the only code that replaces the running Runtime. These tests drive it
directly: the running set must always be the file's backends, minus the ones the
admin removed, plus the ones it added; a Backend that stays is the same object; the
state file round-trips and a corrupt one is ignored with a log line.
See docs/reload.md and docs/admin-api.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import base_config
from prometheus_client import CollectorRegistry

from pyproxy.config.load import load_config
from pyproxy.config.report import config_warnings, describe_changes
from pyproxy.config.schema import Address, AdminConfig, BackendConfig, Config
from pyproxy.observe.metrics import Metrics
from pyproxy.runtime.admin_changes import AdminChanges
from pyproxy.runtime.snapshot import RuntimeHolder, build_runtime
from pyproxy.runtime.state_file import load_state, save_state
from pyproxy.runtime.swap import RuntimeSwap, keep_restart_settings

A = BackendConfig(url="http://127.0.0.1:9101", name="a")
B = BackendConfig(url="http://127.0.0.1:9102", name="b")
C = BackendConfig(url="http://127.0.0.1:9103", name="c")
D = BackendConfig(url="http://127.0.0.1:9104", name="d")


def names(holder: RuntimeHolder) -> list[str]:
    return [b.name for b in holder.runtime.backends]


def make_swap(config: Config, admin: AdminChanges | None = None) -> tuple[RuntimeSwap, Metrics]:
    runtime, _ = build_runtime(config, admin=admin)
    metrics = Metrics(CollectorRegistry())
    holder = RuntimeHolder(runtime, admin)
    metrics.read_backends_from(lambda: holder.runtime.members())  # as the Service wires it
    return RuntimeSwap(holder, metrics), metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    """A sample; a backend's series are those of the one pool these tests run."""
    pool = {"pool": "default"} if "backend" in labels else {}
    return metrics.registry.get_sample_value(name, {**pool, **labels})


def write_yaml(path: Path, backends: list[BackendConfig], **extra: Any) -> None:
    document: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "health_check": {"enabled": False},
        "access_log": {"enabled": False},
        "backends": [dataclasses.asdict(b) for b in backends],
    }
    document.update(extra)
    path.write_text(yaml.safe_dump(document), encoding="utf-8")


# -- the running set ------------------------------------------------------------------


def test_desired_is_file_minus_removed_plus_added() -> None:
    config = base_config([A, B, C])
    admin = AdminChanges(added=(D,), removed_urls=frozenset({B.url}))
    desired = admin.desired(config)
    assert [(b.name, source) for b, source in desired] == [
        ("a", "config"),
        ("c", "config"),
        ("d", "admin"),
    ]


def test_an_admin_added_url_that_is_also_in_the_file_appears_once_as_admin() -> None:
    config = base_config([A, B])
    readded_b = BackendConfig(url=B.url, name="b-admin", weight=5)
    desired = AdminChanges(added=(readded_b,)).desired(config)
    assert [(b.name, b.weight, source) for b, source in desired] == [
        ("a", 1, "config"),
        ("b-admin", 5, "admin"),
    ]


def test_build_runtime_carries_backends_over_by_url() -> None:
    first, gone = build_runtime(base_config([A, B]))
    assert gone == []
    a, b = first.backends
    second, gone = build_runtime(base_config([dataclasses.replace(A, weight=7), C]), previous=first)
    assert second.backends[0] is a  # same object: health, breaker, in-flight survive
    assert second.backends[0].weight == 7  # but reconfigured
    assert gone == [b]
    assert second.backends[1].name == "c"


def test_add_backend_swaps_in_a_runtime_with_it() -> None:
    swap, _ = make_swap(base_config([A]))
    before = swap.holder.runtime
    added = swap.add_backend(B)
    assert swap.holder.runtime is not before  # a new snapshot, never mutated in place
    assert names(swap.holder) == ["a", "b"]
    assert added is swap.holder.runtime.find(url=B.url)
    assert added.source == "admin"
    assert swap.holder.runtime.find(url=A.url) is before.find(url=A.url)
    assert swap.holder.admin == AdminChanges(added=(B,))


@pytest.mark.parametrize(
    "clash",
    [
        BackendConfig(url="http://127.0.0.1:9999", name="a"),  # same name
        BackendConfig(url=A.url, name="other"),  # same url
    ],
    ids=["name", "url"],
)
def test_add_backend_refuses_a_duplicate(clash: BackendConfig) -> None:
    swap, _ = make_swap(base_config([A]))
    before = swap.holder.runtime
    with pytest.raises(KeyError):
        swap.add_backend(clash)
    assert swap.holder.runtime is before
    assert swap.holder.admin == AdminChanges()


def test_remove_backend_marks_it_removed_and_remembers_the_url() -> None:
    swap, _ = make_swap(base_config([A, B]))
    b = swap.holder.runtime.find(name="b")
    assert b is not None
    removed = swap.remove_backend("b", None)
    assert removed is b
    assert b.removed  # requests holding the old snapshot no longer pick it
    assert swap.holder.runtime.why_unavailable(b) == "removed"
    assert names(swap.holder) == ["a"]
    assert swap.holder.admin.removed_urls == {B.url}


def test_remove_unknown_backend_changes_nothing() -> None:
    swap, _ = make_swap(base_config([A]))
    before = swap.holder.runtime
    assert swap.remove_backend("nope", None) is None
    assert swap.remove_backend(None, "http://127.0.0.1:1") is None
    assert swap.holder.runtime is before


def test_remove_then_readd_forgets_the_removal() -> None:
    swap, _ = make_swap(base_config([A, B]))
    swap.remove_backend(None, B.url)
    swap.add_backend(dataclasses.replace(B, name="b2"))
    assert swap.holder.admin.removed_urls == frozenset()
    assert [(b.name, b.source) for b in swap.holder.runtime.backends] == [
        ("a", "config"),
        ("b2", "admin"),
    ]


def test_removing_an_admin_added_backend_drops_it_from_added() -> None:
    swap, _ = make_swap(base_config([A]))
    swap.add_backend(B)
    swap.remove_backend("b", None)
    assert swap.holder.admin.added == ()
    assert names(swap.holder) == ["a"]


def test_removed_backend_gauges_are_dropped() -> None:
    swap, metrics = make_swap(base_config([A, B]))
    swap.add_backend(C)  # a swap publishes every backend's state
    assert sample(metrics, "proxy_backend_up", backend="b") == 1
    swap.remove_backend("b", None)
    assert sample(metrics, "proxy_backend_up", backend="b") is None
    assert sample(metrics, "proxy_circuit_state", backend="b") is None
    assert sample(metrics, "proxy_backend_up", backend="a") == 1


# -- reload -------------------------------------------------------------------------


def test_reload_applies_file_and_keeps_admin_changes(tmp_path: Path) -> None:
    path = tmp_path / "pyproxy.yaml"
    write_yaml(path, [A, B])
    swap, metrics = make_swap(load_config(str(path)))
    swap.add_backend(D)
    swap.remove_backend("a", None)
    write_yaml(path, [A, dataclasses.replace(B, weight=3), C])
    result = swap.reload("test")
    assert result.ok, result.problems
    assert "backends: added c (http://127.0.0.1:9103)" in result.changes
    assert "backends[b].weight: 1 -> 3" in result.changes
    # file (a, b, c) - removed (a) + added (d)
    assert [(b.name, b.source) for b in swap.holder.runtime.backends] == [
        ("b", "config"),
        ("c", "config"),
        ("d", "admin"),
    ]
    assert swap.holder.runtime.find(name="b").weight == 3  # type: ignore[union-attr]
    assert sample(metrics, "proxy_config_reloads_total", result="success") == 1
    assert sample(metrics, "proxy_config_last_reload_successful") == 1


def test_invalid_reload_changes_nothing_and_counts_a_failure(tmp_path: Path) -> None:
    path = tmp_path / "pyproxy.yaml"
    write_yaml(path, [A])
    swap, metrics = make_swap(load_config(str(path)))
    before = swap.holder.runtime
    write_yaml(path, [dataclasses.replace(B, weight=-1)])
    result = swap.reload("test")
    assert not result.ok
    assert any(p.startswith("backends[0].weight:") for p in result.problems), result.problems
    assert swap.holder.runtime is before
    assert sample(metrics, "proxy_config_reloads_total", result="failure") == 1
    assert sample(metrics, "proxy_config_last_reload_successful") == 0


def test_reload_keeps_restart_settings(tmp_path: Path) -> None:
    path = tmp_path / "pyproxy.yaml"
    write_yaml(path, [A], threads=4)
    swap, _ = make_swap(load_config(str(path)))
    write_yaml(path, [A], threads=9, listen="127.0.0.1:1", admin={"listen": "127.0.0.1:2"})
    result = swap.reload("test")
    assert result.ok
    config = swap.holder.runtime.config
    assert (config.threads, config.listen, config.admin.listen) == (
        4,
        Address("127.0.0.1", 0),
        Address("127.0.0.1", 0),
    )
    assert "threads: 4 -> 9 (needs a restart)" in result.changes
    assert "listen: 127.0.0.1:0 -> 127.0.0.1:1 (needs a restart)" in result.changes
    assert "admin.listen: 127.0.0.1:0 -> 127.0.0.1:2 (needs a restart)" in result.changes


def test_keep_restart_settings_keeps_only_those() -> None:
    old = base_config([A], threads=3)
    new = base_config([B], threads=50, listen=Address("127.0.0.1", 1), strategy="random")
    kept = keep_restart_settings(old, new)
    assert (kept.threads, kept.listen, kept.admin.listen) == (3, old.listen, old.admin.listen)
    assert (kept.backends, kept.strategy) == (new.backends, "random")


def test_describe_changes_never_shows_the_token() -> None:
    old = base_config([A], admin=AdminConfig(token="old-secret"))
    new = base_config([A], admin=AdminConfig(token="new-secret"))
    lines = describe_changes(old, new)
    assert lines == ["admin.token: changed"]


def test_reload_without_a_file_is_refused() -> None:
    swap, _ = make_swap(base_config([A]))
    result = swap.reload("test")
    assert not result.ok
    assert "without one" in result.problems[0]


def test_names_stay_unique_when_the_file_gains_an_admin_added_name(tmp_path: Path) -> None:
    path = tmp_path / "pyproxy.yaml"
    write_yaml(path, [A])
    swap, _ = make_swap(load_config(str(path)))
    swap.add_backend(BackendConfig(url="http://127.0.0.1:9201", name="shared"))
    write_yaml(path, [A, BackendConfig(url="http://127.0.0.1:9202", name="shared")])
    swap.reload("test")  # refusing the reload is as good as renaming: names stay unique
    running = names(swap.holder)
    assert len(running) == len(set(running)), running


def test_admin_listener_off_loopback_is_warned_about() -> None:
    # Issue 6: "A warning at start when the admin listener is bound to a non-loopback
    # address." `config_warnings` is what start-up and --check print.
    config = base_config([A], admin=AdminConfig(listen=Address("0.0.0.0", 8081), token="t"))
    assert any(w.startswith("admin.listen") for w in config_warnings(config)), config_warnings(
        config
    )


# -- the state file -------------------------------------------------------------------


def test_state_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "state.json")
    changes = AdminChanges(
        added=(C, dataclasses.replace(D, weight=4, max_connections=9)),
        removed_urls=frozenset({A.url, B.url}),
    )
    save_state(path, changes)
    assert load_state(path) == changes
    payload = json.loads(Path(path).read_text())
    assert payload["removed_urls"] == sorted([A.url, B.url])
    assert [entry["name"] for entry in payload["added"]] == ["c", "d"]
    # atomic write: the temp file was renamed, nothing left behind
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_missing_state_file_means_no_changes(tmp_path: Path) -> None:
    assert load_state(str(tmp_path / "absent.json")) == AdminChanges()
    assert load_state(None) == AdminChanges()


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        '{"added": [{"url": "ftp://x"}], "removed_urls": []}',
        '{"added": [{"url": "http://127.0.0.1:1", "bogus": 1}]}',
        '{"added": 5}',
        "",
    ],
    ids=["syntax", "list", "bad-url", "unknown-key", "added-not-list", "empty"],
)
def test_corrupt_state_file_is_ignored_with_a_log_line(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    path.write_text(content)
    with caplog.at_level(logging.ERROR, logger="pyproxy.runtime.swap"):
        assert load_state(str(path)) == AdminChanges()
    assert f"admin state file {path} ignored" in caplog.text


def test_unwritable_state_file_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "is-a-directory"
    target.mkdir()
    (target / "keep").write_text("x")  # os.replace cannot replace a non-empty directory
    with caplog.at_level(logging.ERROR, logger="pyproxy.runtime.swap"):
        save_state(str(target), AdminChanges(added=(A,)))
    assert "not written" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["is-a-directory"]  # the temp file was cleaned up


def test_every_admin_change_rewrites_the_state_file(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    config = base_config([A, B], admin=AdminConfig(state_file=str(state)))
    swap, _ = make_swap(config)
    swap.add_backend(C)
    assert load_state(str(state)) == AdminChanges(added=(C,))
    swap.remove_backend("a", None)
    assert load_state(str(state)) == AdminChanges(added=(C,), removed_urls=frozenset({A.url}))
    # a restart: a new runtime built from the same file and the saved changes
    runtime, _ = build_runtime(config, admin=load_state(str(state)))
    assert [(b.name, b.source) for b in runtime.backends] == [("b", "config"), ("c", "admin")]
