"""The status page (`GET /admin/status`): one HTML page a person reads at a glance.

It reads top to bottom the way a request travels: the routes, in the order they are
tried, then one section per pool (its settings, and for every backend the facts
pyproxy keeps next to the one judgement selection uses: available, or *why not*),
then the file's backends the admin removed. An operator who sees a backend get no
traffic finds the reason on its row; one who sees a host get 404 or 503 finds the
route and the pool it went to. The rows themselves are built in status_rows.py.

The page is self-contained: inline CSS, no scripts, no external assets (the admin
listener may be reached through an SSH tunnel with no internet behind it), and it
reloads itself every `REFRESH_SECONDS` with `<meta http-equiv="refresh">`. Every
value that came from configuration or from a backend is HTML-escaped: a backend
name is operator input, and the admin API accepts it over HTTP.
"""

from __future__ import annotations

from pyproxy.config.schema import PoolConfig
from pyproxy.ops.status_rows import ago, backend_row, e, pill
from pyproxy.policy.routes import Route
from pyproxy.runtime.admin_changes import AdminChanges
from pyproxy.runtime.snapshot import Pool, Runtime

__all__ = ["CONTENT_TYPE", "HEADERS", "REFRESH_SECONDS", "ago", "render_status"]

REFRESH_SECONDS = 5
CONTENT_TYPE = "text/html; charset=utf-8"
# Defence in depth on top of escaping: no script may run, nothing may be fetched.
HEADERS = (
    ("Cache-Control", "no-store"),
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"),
)

BACKEND_HEADS = ("Backend", "Verdict", "Health", "Last probe", "Circuit",
                 "In flight / max", "Requests", "Failures", "Weight", "Source")  # fmt: skip

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d232a;
background:#f4f6f8}
header{background:#1d232a;color:#fff;padding:14px 24px}
header h1{font-size:18px;margin:0 0 4px}
header p{margin:0;color:#b8c2cc}
header p.alarm{color:#ffb4ab;font-weight:600}
header p.caution{color:#ffd98a}
main{padding:8px 24px 16px}
section{margin:0 0 28px}
table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 3px #0002}
th,td{padding:8px;text-align:left;border-bottom:1px solid #e3e7eb;vertical-align:top}
th{white-space:nowrap;background:#eef1f4;font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#52606d}
td.num{text-align:right;font-variant-numeric:tabular-nums}
small{color:#66727f;white-space:nowrap}
code{font:13px ui-monospace,SFMono-Regular,Menlo,monospace}
tr.up td:first-child{box-shadow:inset 4px 0 #2e7d32}
tr.idle td:first-child{box-shadow:inset 4px 0 #98a2ad}
tr.down td:first-child{box-shadow:inset 4px 0 #c62828}
tr.down{background:#fffafa}
.pill{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px;
white-space:nowrap}
.ok{background:#d8f3dc;color:#1b5e20}.warn{background:#fff3cd;color:#7a5200}
.bad{background:#fde2e1;color:#9b1c1c}.dim{background:#e9ecef;color:#52606d}
.why{color:#9b1c1c;font-size:12px;display:block;margin-top:2px}
.note{color:#52606d;font-size:12px;display:block;margin-top:2px}
dl{display:flex;flex-wrap:wrap;gap:4px 20px;margin:0 0 10px}
dl div{display:flex;gap:6px}dt{color:#52606d}dd{margin:0}
h2{font-size:16px;margin:22px 0 6px}
h2 code{font-size:16px}
table.backends td:nth-child(2){min-width:150px}
td.num .note{white-space:nowrap}
h2 .pill{margin-left:8px;vertical-align:1px}
h2 small{font-weight:400;font-size:13px;margin-left:8px}
p.hint{margin:6px 0 0;color:#66727f;font-size:12px}
footer{padding:0 24px 16px;color:#66727f;font-size:12px}
"""


def facts(pairs: dict[str, str]) -> str:
    """A line of `term value` pairs (values are escaped here)."""
    items = "".join(f"<div><dt>{e(k)}</dt><dd>{e(v)}</dd></div>" for k, v in pairs.items())
    return f"<dl>{items}</dl>"


def table(heads: list[str] | tuple[str, ...], rows: list[str], kind: str = "") -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in heads)
    opening = f'<table class="{kind}">' if kind else "<table>"
    return f"{opening}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def routes_section(routes: tuple[Route, ...], pools: dict[str, Pool]) -> list[str]:
    """The route table, in the order routes are tried: the first match wins."""
    rows = []
    for route in routes:
        host = "<small>any host</small>"
        if route.host:
            host = f"<code>{e(route.host)}</code>"
        path = "<small>any path</small>"
        if route.path_prefix:
            path = f"<code>{e(route.path_prefix)}</code>"
        strip = "no"
        if route.strip_prefix and route.path_prefix:
            strip = f"yes <small>{e(route.path_prefix)}/x → /x upstream</small>"
        pool = f"<code>{e(route.pool)}</code>"
        if route.pool not in pools:  # cannot happen with a loaded file; say so if it does
            pool += f" {pill('unavailable')}"
        rows.append(
            f'<tr data-route="{e(route.name)}"><td class="num">{route.index + 1}</td>'
            f"<td><strong>{e(route.name)}</strong></td><td>{host}</td><td>{path}</td>"
            f"<td>{pool}</td><td>{strip}</td></tr>"
        )
    return [
        "<section><h2>Routes</h2>",
        table(("#", "Route", "Host", "Path prefix", "Pool", "Strip prefix"), rows),
        '<p class="hint">Tried in this order; the first that matches takes the request.'
        " A request no route takes gets 404.</p></section>",
    ]


def pool_settings(config: PoolConfig) -> dict[str, str]:
    """The pool's own settings (already merged over the top-level ones at load)."""
    checks = config.health_check
    probing = f"every {checks.interval:g} s on {checks.path}" if checks.enabled else "off"
    return {
        "Strategy": config.strategy,
        "Sticky sessions": config.sticky.mode,
        "Health checks": probing,
        "Circuit breaker": "on" if config.circuit_breaker.enabled else "off",
        "Per-backend rate": str(config.per_backend_rate or "off"),
    }


def pool_section(pool: Pool, runtime: Runtime, routed_by: list[str], now: float) -> list[str]:
    """One pool: its state in the heading, its settings, its backends."""
    verdicts = [(b, runtime.why_unavailable(b)) for b in pool.backends]
    available = [b for b, why in verdicts if why is None]
    primaries_serving = any(not b.config.backup for b in available)
    rows = [backend_row(b, pool, why, primaries_serving, now) for b, why in verdicts]
    heads = list(BACKEND_HEADS)
    if pool.backend_limiter is not None:
        heads.append("Rate bucket")
    if not rows:
        rows = [f'<tr><td colspan="{len(heads)}">no backends: every request routed here'
                " gets 503</td></tr>"]  # fmt: skip
    if not available:
        state = pill("unavailable") + "<small>no backend available: requests get 503</small>"
    elif not primaries_serving:
        state = pill("serving") + "<small>from backups: no primary is available</small>"
    else:
        state = f"<small>{len(available)} of {len(pool.backends)} available</small>"
    routes = ", ".join(routed_by) if routed_by else "none (no request comes here)"
    return [
        f'<section data-pool="{e(pool.name)}">',
        f"<h2>Pool <code>{e(pool.name)}</code>{state}</h2>",
        facts({**pool_settings(pool.config), "Routes here": routes}),
        table(heads, rows, "backends"),
        "</section>",
    ]


def removed_section(runtime: Runtime, admin: AdminChanges | None) -> list[str]:
    """The file's backends the admin removed: in the file, yet not serving."""
    removed = admin.removed_from(runtime.config) if admin is not None else []
    if not removed:
        return []
    rows = [
        f'<tr data-removed="{e(b.name)}"><td><strong>{e(b.name)}</strong></td>'
        f"<td>{e(b.url)}</td><td>{e(pool)}</td></tr>"
        for b, pool in removed
    ]
    return [
        "<section><h2>Removed by the admin</h2>",
        table(("Backend", "URL", "Pool"), rows),
        '<p class="hint">In the config file, but taken out through POST'
        " /admin/remove-backend; they stay out across reloads until added back with"
        " POST /admin/add-backend.</p></section>",
    ]


def render_status(
    runtime: Runtime,
    *,
    admin: AdminChanges | None = None,
    now_monotonic: float,
    started_at: float,
    last_reload: tuple[bool, float] | None,
    instance_name: str,
) -> bytes:
    """The status page for `runtime`, as UTF-8 bytes.

    `admin` (the running admin changes) lists the file's backends the admin removed.
    `now_monotonic`, `started_at` and the time in `last_reload` are on the clock the
    backends use (`time.monotonic` unless injected). `last_reload` is (succeeded, when)
    of the most recent reload, or None if there was none since start.
    """
    now = now_monotonic
    pools = dict(runtime.pools)
    routes = runtime.routes.routes
    available = sum(1 for b in runtime.backends if runtime.why_unavailable(b) is None)
    dead_pools, on_backups = [], []
    for name, pool in pools.items():
        serving = pool.candidates()
        if not serving:
            dead_pools.append(name)
        elif all(b.config.backup for b in serving):
            on_backups.append(name)
    if last_reload is None:
        reload_html = "none since start"
    else:
        ok, at = last_reload
        reload_html = f"{pill('succeeded' if ok else 'failed')} {e(ago(now - at))} ago"
    summary = f"<p>{available} of {len(runtime.backends)} backend(s) available"
    summary += f" in {len(pools)} pool(s)</p>"
    if dead_pools:
        summary += (f'<p class="alarm">No backend available in pool(s) '
                    f"{e(', '.join(dead_pools))}: their requests get 503</p>")  # fmt: skip
    if on_backups:
        summary += (f'<p class="caution">Serving from backups in pool(s) '
                    f"{e(', '.join(on_backups))}: no primary backend is available</p>")  # fmt: skip
    sections = [
        line
        for pool in pools.values()
        for line in pool_section(
            pool, runtime, [r.name for r in routes if r.pool == pool.name], now
        )
    ]
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>pyproxy status: {e(instance_name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<header><h1>pyproxy status: {e(instance_name)}</h1>{summary}</header>",
        "<main>",
        f"<dl><div><dt>Uptime</dt><dd>{e(ago(now - started_at))}</dd></div>"
        f"<div><dt>Last reload</dt><dd>{reload_html}</dd></div></dl>",
        *routes_section(routes, pools),
        *sections,
        *removed_section(runtime, admin),
        "</main>",
        f"<footer>Refreshes every {REFRESH_SECONDS} s. Verdict is what selection uses;"
        " the other columns are the facts behind it. A backup backend takes requests"
        " only while no other backend of its pool is available.</footer>",
        "</body></html>",
    ]
    return "\n".join(page).encode("utf-8")
