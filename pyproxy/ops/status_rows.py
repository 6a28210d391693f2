"""The status page's pieces: escaping, pills, durations, and one backend's row.

`statuspage.py` assembles the page from these; this module knows how one backend
reads, the page module knows how pools and routes are laid out.
"""

from __future__ import annotations

import html
import math

from pyproxy.pool.backend import Backend
from pyproxy.runtime.snapshot import Pool

# One colour class per word the page shows: green = fine, amber = in between, red = not.
TONE = {
    "up": "ok", "closed": "ok", "available": "ok", "serving": "warn",
    "half_open": "warn", "unknown": "warn", "not checked": "dim", "off": "dim",
    "down": "bad", "open": "bad", "unavailable": "bad", "standing by": "dim",
    "succeeded": "ok", "failed": "bad", "drained": "warn", "backup": "dim",
}  # fmt: skip


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


def verdict_cell(backend: Backend, why: str | None, primaries_serving: bool) -> str:
    """The judge's verdict; for an available backup, whether it is serving now.

    A backup takes requests only while no other backend of its pool is available
    (nginx's and HAProxy's `backup`), so "available" alone would mislead: it says
    `standing by` while a primary serves, `serving` when none can.
    """
    if why is not None:
        return pill("unavailable") + f'<span class="why">{e(why)}</span>'
    if not backend.config.backup:
        return pill("available")
    if primaries_serving:
        return pill("standing by") + '<span class="note">available; a primary is serving</span>'
    return pill("serving") + '<span class="note">no primary of its pool is available</span>'


def backend_row(
    backend: Backend, pool: Pool, why: str | None, primaries_serving: bool, now: float
) -> str:
    """One table row for `backend` of `pool`; `why` is the judge's verdict on it."""
    snap = backend.snapshot()
    health = backend.health
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
    breaker_on = pool.config.circuit_breaker.enabled
    breaker = backend.breaker
    circuit_cell = pill(snap.circuit) if breaker_on else pill("off")
    reopens_at = breaker.reopens_at
    if reopens_at is not None:
        circuit_cell += f"<br><small>reopens in {e(ago(math.ceil(reopens_at - now)))}</small>"
    if breaker_on:
        circuit_cell += f"<br><small>failures in a row: {breaker.consecutive_failures}</small>"
    cap = str(snap.max_connections) if snap.max_connections else "∞"
    name_cell = f"<strong>{e(snap.name)}</strong>"
    if backend.config.backup:
        name_cell += f" {pill('backup')}"
    cells = [
        f"{name_cell}<br><small>{e(snap.url)}</small>",
        verdict_cell(backend, why, primaries_serving),
        health_cell,
        probe_cell,
        circuit_cell,
        f'<td class="num">{snap.in_flight} / {e(cap)}',
        f'<td class="num">{snap.requests_total}',
        f'<td class="num">{snap.failures_total}',
        weight_cell(snap.weight, snap.file_weight, snap.admin_weight, snap.drain),
        e(snap.source),
    ]
    limiter = pool.backend_limiter
    if limiter is not None:
        capacity = limiter.rate.count
        cells.append(f'<td class="num">{limiter.level(backend.name):.1f} / {capacity}')
    tds = "".join(c if c.startswith("<td") else f"<td>{c}" for c in cells)
    standing_by = why is None and backend.config.backup and primaries_serving
    tone = "down" if why is not None else "idle" if standing_by else "up"
    return f'<tr class="{tone}" data-backend="{e(snap.name)}">{tds}</tr>'


def weight_cell(weight: int, file_weight: int, admin_weight: int | None, drain: bool) -> str:
    """The weight that counts; when the admin set one, the configured one under it; and
    a drain by the admin, which no weight overrides."""
    cell = f'<td class="num">{weight}'
    if admin_weight is not None:
        cell += f'<span class="note">set by the admin<br>configured: {file_weight}</span>'
    if drain:  # the verdict says who drained it; here, what a drain means
        cell += f'<br>{pill("drained")}<span class="note">no new requests</span>'
    return cell
