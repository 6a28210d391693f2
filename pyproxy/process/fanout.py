"""Send one admin request to every worker at once; collect the answers by a deadline.

The master's control channel to a worker is the worker's own admin API on 127.0.0.1
(process/worker.py). A worker that does not answer in time (paused, busy, dying) is
reported by its PID, not waited for: the others' answers are not held up by it.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass

ANSWER_WITHIN = 5.0  # seconds a worker has to apply a change and say so


@dataclass(frozen=True)
class Answer:
    pid: int
    status: int  # 0: no answer (refused, reset, or not within the deadline)
    body: bytes
    problem: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def ask(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = ANSWER_WITHIN,
) -> tuple[int, bytes]:
    """One request to a worker's admin API: (status, body). Raises OSError."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body or None, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def fan_out(
    workers: dict[int, int],
    method: str,
    path: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    within: float = ANSWER_WITHIN,
) -> list[Answer]:
    """Ask every worker ({pid: admin port}) in parallel; one Answer each, in PID order."""
    answers: dict[int, Answer] = {}
    lock = threading.Lock()

    def one(pid: int, port: int) -> None:
        try:
            status, text = ask(port, method, path, body=body, headers=headers, timeout=within)
            answer = Answer(pid, status, text)
        except (OSError, http.client.HTTPException) as error:
            answer = Answer(pid, 0, b"", f"no answer ({error.__class__.__name__}: {error})")
        with lock:
            answers[pid] = answer

    threads = [
        threading.Thread(target=one, args=(pid, port), name=f"pyproxy-fanout-{pid}", daemon=True)
        for pid, port in workers.items()
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + within + 1
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    with lock:
        return [
            answers.get(pid, Answer(pid, 0, b"", f"no answer within {within:g}s"))
            for pid in sorted(workers)
        ]
