"""The operator's toolbox on the command line: `-t`, `--dump-config`, `--listen`,
`--reload` and the installed `pyproxy` script, each run as an operator runs it (a
`python -m pyproxy` subprocess, files in tmp_path, ports picked free).

The models are nginx's: `nginx -t` checks, `nginx -T` prints the effective config,
`nginx -s reload` asks the running instance to reload and says whether it did.
"""

from __future__ import annotations

import configparser
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
import test_cli
import yaml
from backends import EchoBackend, free_ports
from test_cli import (
    BAD,
    BAD_PATHS,
    GOOD,
    REPO,
    Running,
    assert_no_traceback,
    cli_env,
    run_cli,
    wait_until_serving,
    write,
)

start_cli = test_cli.start_cli  # the fixture, shared: tests ask for it by name

# -- -t ------------------------------------------------------------------------------------


def test_t_is_check(tmp_path: Path) -> None:
    port, admin_port = free_ports(2)
    good = write(tmp_path / "ok.yaml", GOOD.format(port=port, admin_port=admin_port))
    bad = write(tmp_path / "bad.yaml", BAD)

    valid = run_cli("-t", "-c", str(good), cwd=tmp_path)
    invalid = run_cli("-t", "-c", str(bad), cwd=tmp_path)

    assert valid.returncode == 0, valid.stderr
    assert "ok" in valid.stdout
    assert invalid.returncode == 1
    for path in BAD_PATHS:
        assert f"{path}:" in invalid.stderr


def test_the_actions_exclude_each_other(tmp_path: Path) -> None:
    result = run_cli("-t", "--dump-config", cwd=tmp_path)

    assert result.returncode == 2
    assert "not allowed with" in result.stderr
    assert_no_traceback(result)


# -- --dump-config -------------------------------------------------------------------------

SECRETS = """\
listen: "127.0.0.1:{port}"
backends:
  - url: http://127.0.0.1:9
admin:
  listen: "127.0.0.1:{admin_port}"
  token: s3cret-token-value
  # The token's text elsewhere is hidden too (the admin API's answers do the same).
  state_file: /var/lib/pyproxy/s3cret-token-value.json
rate_limit:
  per_client: 10/second
  store: "redis://:hunter2pass@127.0.0.1:6379/0"
"""


def test_dump_config_prints_only_yaml_with_every_default_filled_in(tmp_path: Path) -> None:
    port, admin_port = free_ports(2)
    config = write(tmp_path / "ok.yaml", GOOD.format(port=port, admin_port=admin_port))

    result = run_cli("--dump-config", "-c", str(config), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    dumped = yaml.safe_load(result.stdout)  # stdout is YAML and nothing else
    assert dumped["listen"] == f"127.0.0.1:{port}"
    assert dumped["threads"] == 32  # not in the file: the default
    assert dumped["health_check"]["path"] == "/health"
    assert dumped["health_check"]["expected_status"] == "200-399"
    assert dumped["backends"] == [
        {
            "url": "http://127.0.0.1:9",
            "name": "app1",
            "weight": 1,
            "max_connections": 0,
            "backup": False,
        }
    ]
    assert dumped["workers"] == 1
    # A v1 file is dumped in its own form: no pools or routes, nothing internal.
    assert not {"pools", "routes", "declared_pools", "declared_routes"} & dumped.keys()
    assert "source_path" not in dumped


def test_dump_config_shows_every_secret_as_three_stars(tmp_path: Path) -> None:
    port, admin_port = free_ports(2)
    config = write(tmp_path / "s.yaml", SECRETS.format(port=port, admin_port=admin_port))

    result = run_cli("--dump-config", "-c", str(config), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "s3cret-token-value" not in output and "hunter2pass" not in output
    dumped = yaml.safe_load(result.stdout)
    assert dumped["admin"]["token"] == "***"
    assert dumped["rate_limit"]["store"] == "redis://:***@127.0.0.1:6379/0"
    assert dumped["rate_limit"]["per_client"] == "10/second"
    assert dumped["admin"]["state_file"] == "/var/lib/pyproxy/***.json"


def test_dump_config_hides_a_token_that_came_from_the_environment(tmp_path: Path) -> None:
    port, admin_port = free_ports(2)
    text = GOOD.format(port=port, admin_port=admin_port).replace("  token: test-token\n", "")
    config = write(tmp_path / "ok.yaml", text)

    result = run_cli(
        "--dump-config", "-c", str(config), cwd=tmp_path, PYPROXY_ADMIN_TOKEN="from-env-42"
    )

    assert result.returncode == 0, result.stderr
    assert "from-env-42" not in result.stdout + result.stderr
    assert yaml.safe_load(result.stdout)["admin"]["token"] == "***"


def test_a_dump_without_secrets_loads_back_to_the_same_config(tmp_path: Path) -> None:
    port, admin_port = free_ports(2)
    text = GOOD.format(port=port, admin_port=admin_port).replace("  token: test-token\n", "")
    text += (
        "trusted_proxies: [10.0.0.0/8]\nrate_limit: {per_client: 100/minute}\n"
        "retries: {retry_on: [timeout, 502]}\nhealth_check: {expected_status: 200-204}\n"
        "timeouts: {read: 250ms}\nlimits: {max_request_body: 1MiB}\n"
    )
    config = write(tmp_path / "ok.yaml", text)

    first = run_cli("--dump-config", "-c", str(config), cwd=tmp_path)
    dump = write(tmp_path / "dump.yaml", first.stdout)
    checked = run_cli("--check", "-c", str(dump), cwd=tmp_path)
    second = run_cli("--dump-config", "-c", str(dump), cwd=tmp_path)

    assert first.returncode == 0, first.stderr
    assert checked.returncode == 0, checked.stderr
    assert second.stdout == first.stdout  # the dump is a fixed point: nothing lost
    assert yaml.safe_load(first.stdout)["timeouts"]["read"] == 0.25


def test_dump_config_of_an_invalid_file_exits_1_with_the_problems_on_stderr(
    tmp_path: Path,
) -> None:
    config = write(tmp_path / "bad.yaml", BAD)

    result = run_cli("--dump-config", "-c", str(config), cwd=tmp_path)

    assert result.returncode == 1
    assert result.stdout == ""
    assert_no_traceback(result)
    for path in BAD_PATHS:
        assert f"{path}:" in result.stderr


# -- --listen ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nonsense", "127.0.0.1:99999", "127.0.0.1:", "[zz]:80"])
def test_a_bad_listen_value_exits_2_with_one_line(tmp_path: Path, value: str) -> None:
    result = run_cli("--listen", value, "--check", cwd=tmp_path)

    assert result.returncode == 2
    assert_no_traceback(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--listen" in lines[0], lines


def test_listen_overrides_the_file_in_check_and_dump(tmp_path: Path) -> None:
    port, admin_port, other = free_ports(3)
    config = write(tmp_path / "ok.yaml", GOOD.format(port=port, admin_port=admin_port))

    dumped = run_cli("--dump-config", "--listen", f"127.0.0.1:{other}", "-c", str(config),
                     cwd=tmp_path)  # fmt: skip
    clash = run_cli("-t", "--listen", f"127.0.0.1:{admin_port}", "-c", str(config),
                    cwd=tmp_path)  # fmt: skip

    assert yaml.safe_load(dumped.stdout)["listen"] == f"127.0.0.1:{other}"
    assert clash.returncode == 1
    assert "--listen" in clash.stderr and "admin.listen" in clash.stderr


def test_listen_moves_the_proxy_listener(
    tmp_path: Path, start_cli: Callable[..., Running], echo_backend: EchoBackend
) -> None:
    port, admin_port, other = free_ports(3)
    text = GOOD.format(port=port, admin_port=admin_port).replace(
        "http://127.0.0.1:9", echo_backend.url
    )
    running = start_cli("-c", str(write(tmp_path / "ok.yaml", text)),
                        "--listen", f"127.0.0.1:{other}")  # fmt: skip
    wait_until_serving(f"http://127.0.0.1:{other}/", running)

    with requests.Session() as session:
        session.trust_env = False
        assert session.get(f"http://127.0.0.1:{other}/moved", timeout=5).status_code == 200
    with socket.socket() as probe:  # the file's port was never bound
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    os.kill(running.process.pid, signal.SIGTERM)
    assert running.process.wait(timeout=30) == 0


# -- --reload ------------------------------------------------------------------------------


def test_reload_with_nobody_listening_says_so(tmp_path: Path) -> None:
    port, admin_port = free_ports(2)
    config = write(tmp_path / "ok.yaml", GOOD.format(port=port, admin_port=admin_port))

    result = run_cli("--reload", "-c", str(config), cwd=tmp_path)

    assert result.returncode == 1
    assert_no_traceback(result)
    assert "no instance answered" in result.stderr and str(admin_port) in result.stderr
    assert result.stdout == ""


def test_reload_of_an_invalid_file_prints_the_problems_and_sends_nothing(
    tmp_path: Path,
) -> None:
    config = write(tmp_path / "bad.yaml", BAD)

    result = run_cli("--reload", "-c", str(config), cwd=tmp_path)

    assert result.returncode == 1
    assert_no_traceback(result)
    for path in BAD_PATHS:
        assert f"{path}:" in result.stderr
    assert "not reloaded" in result.stderr


def running_instance(
    tmp_path: Path, start_cli: Callable[..., Running], text: str
) -> tuple[Running, Path, Path]:
    """pyproxy serving `text` through a symlink whose target lives in another directory:
    the file watcher watches the symlink's directory (where nothing else is written), so
    editing the target is seen only by an explicit reload, the one the test asks for."""
    (tmp_path / "real").mkdir()
    (tmp_path / "etc").mkdir()
    real = write(tmp_path / "real" / "config.yaml", text)
    link = tmp_path / "etc" / "config.yaml"
    link.symlink_to(real)
    running = start_cli("-c", str(link))
    return running, link, real


def test_reload_applies_the_file_and_prints_what_changed(
    tmp_path: Path, start_cli: Callable[..., Running], echo_backend: EchoBackend
) -> None:
    port, admin_port = free_ports(2)
    text = GOOD.format(port=port, admin_port=admin_port)
    running, link, real = running_instance(tmp_path, start_cli, text)
    wait_until_serving(f"http://127.0.0.1:{admin_port}/livez", running)
    real.write_text(text.replace(
        "backends:\n", f"backends:\n  - url: {echo_backend.url}\n    name: added-by-file\n"
    ))  # fmt: skip

    result = run_cli("--reload", "-c", str(link), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("reloaded: 1 change(s)"), result.stdout
    assert "added added-by-file" in result.stdout
    with requests.Session() as session:
        session.trust_env = False
        listing = session.get(f"http://127.0.0.1:{admin_port}/admin/backends", timeout=5).json()
    assert "added-by-file" in [backend["name"] for backend in listing["backends"]]


def test_reload_refused_by_the_instance_prints_its_problems_with_field_paths(
    tmp_path: Path,
    start_cli: Callable[..., Running],
    make_echo_backend: Callable[[str], EchoBackend],
) -> None:
    # A file valid on its own that the instance refuses: it names a backend like one
    # added through the admin API (the running admin changes win on reload).
    port, admin_port = free_ports(2)
    text = GOOD.format(port=port, admin_port=admin_port)
    running, link, real = running_instance(tmp_path, start_cli, text)
    admin = f"http://127.0.0.1:{admin_port}"
    wait_until_serving(admin + "/livez", running)
    first, second = make_echo_backend("first"), make_echo_backend("second")
    with requests.Session() as session:
        session.trust_env = False
        added = session.post(
            admin + "/admin/add-backend", timeout=5,
            headers={"Authorization": "Bearer test-token"},
            data=json.dumps({"url": first.url, "name": "shared-name"}),
        )  # fmt: skip
        assert added.status_code == 201, added.text
    real.write_text(text.replace(
        "backends:\n", f"backends:\n  - url: {second.url}\n    name: shared-name\n"
    ))  # fmt: skip

    result = run_cli("--reload", "-c", str(link), cwd=tmp_path)

    assert result.returncode == 1
    assert_no_traceback(result)
    assert "backends[0].name:" in result.stderr and "shared-name" in result.stderr
    assert "not reloaded" in result.stderr


def test_reload_with_a_wrong_token_says_it_was_refused(
    tmp_path: Path, start_cli: Callable[..., Running]
) -> None:
    port, admin_port = free_ports(2)
    text = GOOD.format(port=port, admin_port=admin_port)
    running = start_cli("-c", str(write(tmp_path / "served.yaml", text)))
    wait_until_serving(f"http://127.0.0.1:{admin_port}/livez", running)
    wrong = write(tmp_path / "wrong.yaml", text.replace("test-token", "wrong-token"))

    result = run_cli("--reload", "-c", str(wrong), cwd=tmp_path)

    assert result.returncode == 1
    assert "401" in result.stderr and "wrong-token" not in result.stderr


# -- the installed script ------------------------------------------------------------------


def test_setup_cfg_installs_the_pyproxy_script() -> None:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")

    scripts = setup["options.entry_points"]["console_scripts"].split("\n")
    assert "pyproxy = pyproxy.cli:main" in [line.strip() for line in scripts]


def test_the_script_entry_point_runs_the_same_program_under_its_own_name(
    tmp_path: Path,
) -> None:
    # What pip's generated `pyproxy` script does: import the entry point, call it.
    launcher = "import sys; from pyproxy.cli import main; sys.argv[0] = 'pyproxy'; sys.exit(main())"
    port, admin_port = free_ports(2)
    config = write(tmp_path / "ok.yaml", GOOD.format(port=port, admin_port=admin_port))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", launcher, *args], cwd=tmp_path, env=cli_env(),
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    helped, checked = run("--help"), run("-t", "-c", str(config))

    assert helped.returncode == 0 and helped.stdout.startswith("usage: pyproxy ")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == run_cli("-t", "-c", str(config), cwd=tmp_path).stdout


# -- the Grafana dashboard's ratios ---------------------------------------------------------

DASHBOARD = REPO / "scripts" / "grafana-dashboard.json"


def ratio_queries() -> list[str]:
    """Every query of the dashboard that divides, with Grafana's variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(dashboard["panels"])
    queries = []
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))
        queries += [t["expr"] for t in panel.get("targets", []) if " / " in t["expr"]]
    return [
        q.replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$backend", ".*")
        for q in queries
    ]


def test_the_dashboard_has_ratio_panels() -> None:
    assert ratio_queries()  # else the test below checks nothing


@pytest.mark.parametrize("query", ratio_queries())
def test_ratio_panels_show_0_not_no_data_when_nothing_failed(tmp_path: Path, query: str) -> None:
    # promtool evaluates the query on made-up series, as Prometheus would: a 5xx series
    # that was never created must give 0 (not an empty result, "no data" in Grafana),
    # and so must an idle proxy (0 / 0).
    series = 'proxy_requests_total{{instance="vm:8081", backend="app1", code="{code}"}}'
    cases = [
        ({"200": "0+60x20"}, 0),  # traffic, no 5xx ever
        ({"200": "100+0x20", "503": "5+0x20"}, 0),  # idle: nothing in the last 5m
        ({"200": "0+45x20", "503": "0+15x20"}, 0.25),
    ]
    tests = [
        {
            "interval": "1m",
            "input_series": [
                {"series": series.format(code=code), "values": values}
                for code, values in inputs.items()
            ],
            "promql_expr_test": [
                {
                    "expr": query,
                    "eval_time": "15m",
                    "exp_samples": [{"labels": "{}", "value": want}],
                }
            ],
        }
        for inputs, want in cases
    ]
    spec = write(tmp_path / "test.yml", yaml.safe_dump({"rule_files": [], "tests": tests}))

    result = subprocess.run(
        ["promtool", "test", "rules", str(spec)], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_a_dump_parses_back_to_an_equal_config() -> None:
    # In-process and exact: every field, compared as the dataclasses the proxy runs on.
    from pyproxy.config.dump import dump_config
    from pyproxy.config.load import parse_config

    original = parse_config(yaml.safe_load("""
        backends:
          - {url: "http://10.0.0.1:8000", weight: 3, max_connections: 20}
          - {url: "https://api.internal", name: api}
        listen: "[::1]:8443"
        trusted_proxies: [10.0.0.0/8, "fd00::/8"]
        strategy: least_connections
        health_check: {path: /ready, expected_status: 204, interval: 1500ms}
        circuit_breaker: {failure_statuses: [500, 502]}
        retries: {retry_on: [reset, 503], backoff: 100ms}
        rate_limit: {per_client: 5/second, burst: 10, client_key: "header:X-Api-Key",
                     per_backend: 1000/hour}
        sticky: {mode: cookie, cookie_max_age: 3600}
        limits: {max_request_body: 64KiB}
        access_log: {format: json, path: /var/log/pyproxy/access.log}
    """), env={})

    dumped = parse_config(yaml.safe_load(dump_config(original)), env={})

    assert dumped == original


def test_a_dump_of_pools_and_routes_parses_back_to_an_equal_config() -> None:
    # A file with pools is dumped as pools and routes (each pool's merged sections in
    # full), never as the flat backend list the loader derives from them.
    from pyproxy.config.dump import dump_config
    from pyproxy.config.load import parse_config

    original = parse_config(yaml.safe_load("""
        health_check: {interval: 2s}
        pools:
          web:
            strategy: least_connections
            backends:
              - {url: "http://10.0.0.11:8000", name: web1}
              - {url: "http://10.0.0.13:8000", name: sorry, backup: true}
            health_check: {path: /healthz, host: web.internal, expect_body: ok}
            rate_limit: {per_backend: 50/second}
          api:
            backends: [{url: "http://10.0.0.21:9000", name: api1}]
        routes:
          - name: api
            match: {host: "api.example.com", path_prefix: /v1}
            pool: api
            strip_prefix: true
          - match: {host: "*.example.com"}
            pool: web
          - pool: web
    """), env={})

    text = dump_config(original)
    written = yaml.safe_load(text)
    assert "backends" not in written and set(written["pools"]) == {"web", "api"}
    assert written["routes"][2] == {"name": "routes[2]", "pool": "web", "strip_prefix": False}
    assert parse_config(written, env={}) == original
