"""The status page (`GET /admin/status`): one HTML page a person reads at a glance.

For every backend it shows the facts pyproxy keeps (health streaks and the last
probe, the circuit and when it reopens, in-flight requests, counters, the rate
bucket) next to the one judgement selection uses: available, or *why not*. An
operator who sees a backend get no traffic finds the reason on the same row.

The page is self-contained: inline CSS, no scripts, no external assets (the admin
listener may be reached through an SSH tunnel with no internet behind it), and it
reloads itself every `REFRESH_SECONDS` with `<meta http-equiv="refresh">`. Every
value that came from configuration or from a backend is HTML-escaped: a backend
name is operator input, and the admin API accepts it over HTTP.
"""

from __future__ import annotations

import html
import math

from pyproxy.pool.backend import Backend
from pyproxy.runtime.snapshot import AdminChanges, Runtime

REFRESH_SECONDS = 5
CONTENT_TYPE = "text/html; charset=utf-8"
# Defence in depth on top of escaping: no script may run, nothing may be fetched.
HEADERS = (
    ("Cache-Control", "no-store"),
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"),
)

# One colour class per word the page shows: green = fine, amber = in between, red = not.
TONE = {
    "up": "ok", "closed": "ok", "available": "ok",
    "half_open": "warn", "unknown": "warn", "not checked": "dim", "off": "dim",
    "down": "bad", "open": "bad", "unavailable": "bad",
    "succeeded": "ok", "failed": "bad", "drained": "warn",
}  # fmt: skip

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d232a;
background:#f4f6f8}
header{background:#1d232a;color:#fff;padding:14px 24px}
header h1{font-size:18px;margin:0 0 4px}
header p{margin:0;color:#b8c2cc}
main{padding:16px 24px}
table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 3px #0002}
th,td{padding:8px 10px;text-align:left;border-bottom:1px solid #e3e7eb;vertical-align:top}
th{white-space:nowrap;background:#eef1f4;font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#52606d}
td.num{text-align:right;font-variant-numeric:tabular-nums}
small{color:#66727f;white-space:nowrap}
tr.up td:first-child{box-shadow:inset 4px 0 #2e7d32}
tr.down td:first-child{box-shadow:inset 4px 0 #c62828}
tr.down{background:#fffafa}
.pill{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px}
.ok{background:#d8f3dc;color:#1b5e20}.warn{background:#fff3cd;color:#7a5200}
.bad{background:#fde2e1;color:#9b1c1c}.dim{background:#e9ecef;color:#52606d}
.why{color:#9b1c1c;font-size:12px;display:block;margin-top:2px}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;margin:0 0 16px}
dt{color:#52606d}dd{margin:0}
h2{font-size:15px;margin:20px 0 8px}
footer{padding:0 24px 16px;color:#66727f;font-size:12px}
"""


def e(value: object) -> str:
    """HTML-escape anything for text and attribute positions alike."""
    return html.escape(str(value), quote=True)


def pill(word: str) -> str:
    return f'<span class="pill {TONE.get(word, "dim")}">{e(word)}</span>'


def ago(seconds: float) -> str:
    """A short human duration: 4 s, 2 min 5 s, 3 h 12 min, 2 d 4 h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def backend_row(
    backend: Backend, runtime: Runtime, now: float, breaker_on: bool
) -> tuple[str, bool]:
    """One table row, and whether the backend is available."""
    snap = backend.snapshot()
    health = backend.health
    limiter = runtime.backend_limiter
    why = runtime.why_unavailable(backend)  # the verdict selection uses, bucket included
    verdict = pill("available")
    if why is not None:
        verdict = pill("unavailable") + f'<span class="why">{e(why)}</span>'
    if backend.health_checked:
        health_cell = (
            f"{pill(snap.health)}<br><small>streak: {health.pass_streak} pass, "
            f"{health.fail_streak} fail</small>"
        )
        probed_at = health.last_probe_at
        probe_cell = (
            "<small>never probed</small>"
            if probed_at is None
            else f"{e(health.last_result)}<br><small>{e(ago(now - probed_at))} ago</small>"
        )
    else:
        health_cell, probe_cell = pill("not checked"), "<small>checks off</small>"
    breaker = backend.breaker
    circuit_cell = pill(snap.circuit) if breaker_on else pill("off")
    reopens_at = breaker.reopens_at
    if reopens_at is not None:
        circuit_cell += f"<br><small>reopens in {e(ago(math.ceil(reopens_at - now)))}</small>"
    if breaker_on:
        circuit_cell += f"<br><small>failures in a row: {breaker.consecutive_failures}</small>"
    cap = str(snap.max_connections) if snap.max_connections else "∞"
    cells = [
        f"<strong>{e(snap.name)}</strong><br><small>{e(snap.url)}</small>",
        verdict,
        health_cell,
        probe_cell,
        circuit_cell,
        f'<td class="num">{snap.in_flight} / {e(cap)}',
        f'<td class="num">{snap.requests_total}',
        f'<td class="num">{snap.failures_total}',
        weight_cell(snap.weight, snap.file_weight, snap.admin_weight, snap.drain),
        e(snap.source),
    ]
    if limiter is not None:
        capacity = limiter.rate.count
        cells.append(f'<td class="num">{limiter.level(backend.name):.1f} / {capacity}')
    tds = "".join(c if c.startswith("<td") else f"<td>{c}" for c in cells)
    tone = "up" if why is None else "down"
    return f'<tr class="{tone}" data-backend="{e(snap.name)}">{tds}</tr>', why is None


def weight_cell(weight: int, file_weight: int, admin_weight: int | None, drain: bool) -> str:
    """The weight that counts; when the admin set one, the configured one under it; and
    a drain by the admin, which no weight overrides."""
    cell = f'<td class="num">{weight}'
    if admin_weight is not None:
        cell += f"<br><small>set by the admin; configured: {file_weight}</small>"
    if drain:
        cell += f"<br>{pill('drained')}<br><small>by the admin: no new requests</small>"
    return cell


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
        "<h2>Removed by the admin</h2>",
        "<p><small>In the config file, but taken out through POST /admin/remove-backend;"
        " they stay out across reloads until added back with POST /admin/add-backend."
        "</small></p>",
        "<table><thead><tr><th>Backend</th><th>URL</th><th>Pool</th></tr></thead><tbody>",
        *rows,
        "</tbody></table>",
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
    config = runtime.config
    limiter = runtime.backend_limiter
    breaker_on = config.circuit_breaker.enabled
    judged = [backend_row(b, runtime, now_monotonic, breaker_on) for b in runtime.backends]
    rows = [row for row, _ in judged]
    available = sum(1 for _, ok in judged if ok)
    if last_reload is None:
        reload_html = "none since start"
    else:
        ok, at = last_reload
        reload_html = f"{pill('succeeded' if ok else 'failed')} {e(ago(now_monotonic - at))} ago"
    heads = ["Backend", "Verdict", "Health", "Last probe", "Circuit", "In flight / max",
             "Requests", "Failures", "Weight", "Source"]  # fmt: skip
    if limiter is not None:
        heads.append("Rate bucket")
    if not rows:
        rows = [f'<tr><td colspan="{len(heads)}">no backends: every request gets 503</td></tr>']
    facts = {
        "Strategy": config.strategy,
        "Sticky sessions": config.sticky.mode,
        "Health checks": (
            f"every {config.health_check.interval:g} s on {config.health_check.path}"
            if config.health_check.enabled
            else "off"
        ),
        "Circuit breaker": "on" if config.circuit_breaker.enabled else "off",
        "Per-backend rate": str(config.rate_limit.per_backend or "off"),
        "Uptime": ago(now_monotonic - started_at),
    }
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>pyproxy status: {e(instance_name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<header><h1>pyproxy status: {e(instance_name)}</h1>",
        f"<p>{available} of {len(runtime.backends)} backend(s) available</p></header>",
        "<main><dl>",
        *(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts.items()),
        f"<dt>Last reload</dt><dd>{reload_html}</dd>",
        "</dl><table><thead><tr>",
        *(f"<th>{e(h)}</th>" for h in heads),
        "</tr></thead><tbody>",
        *rows,
        "</tbody></table>",
        *removed_section(runtime, admin),
        "</main>",
        f"<footer>Refreshes every {REFRESH_SECONDS} s. Verdict is what selection uses;"
        " the other columns are the facts behind it.</footer>",
        "</body></html>",
    ]
    return "\n".join(page).encode("utf-8")
