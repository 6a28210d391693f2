"""The per-backend gauges of every worker, for the master's /metrics.

prometheus-client's multiprocess mode aggregates only what a worker writes to its
files; the per-backend gauges are read from the running backends at each scrape
(observe/metrics.py) and so are never written. Each worker keeps its own health
checks and circuit states, so the honest series is one per worker: the master takes
them from each worker's own page and adds a `worker` label (the PID), as the
multiprocess mode "all" does for gauges. `max by (backend)` or `min by (backend)`
then answers "up in any/every worker".
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

PER_BACKEND = ("proxy_backend_up", "proxy_circuit_state", "proxy_backend_in_flight")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def worker_gauges(pages: list[tuple[int, bytes]]) -> bytes:
    """The PER_BACKEND families of each (pid, /metrics page), with a worker label."""
    samples: dict[str, list[str]] = {name: [] for name in PER_BACKEND}
    helps: dict[str, str] = {}
    for pid, page in pages:
        for family in text_string_to_metric_families(page.decode(errors="replace")):
            if family.name not in samples:
                continue
            helps[family.name] = family.documentation
            for sample in family.samples:
                labels = {**sample.labels, "worker": str(pid)}
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                samples[family.name].append(f"{sample.name}{{{text}}} {sample.value:g}")
    lines = []
    for name, rows in samples.items():
        if name in helps:
            lines += [f"# HELP {name} {helps[name]} (one series per worker)",
                      f"# TYPE {name} gauge", *rows]  # fmt: skip
    return ("\n".join(lines) + "\n").encode() if lines else b""
