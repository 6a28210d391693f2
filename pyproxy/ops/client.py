"""The admin API's client side: `--reload` asks a running pyproxy to reload its file.

`nginx -s reload` signals the master found through its pid file; pyproxy has an HTTP
admin listener, so `--reload` sends `POST /admin/reload` to the `admin.listen` of the
config file it was given, with `admin.token` (or $PYPROXY_ADMIN_TOKEN) as the bearer
token, and turns the answer into lines for a person. Plain `http.client`: no proxy
variables, no .netrc, no redirects; the admin listener is local.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass, field

from pyproxy.config.schema import Address

# A reload reads and validates a file and swaps a snapshot: well under a second,
# unless the machine is very busy. Waiting longer than this helps nobody.
RELOAD_TIMEOUT = 30.0
# Where a wildcard listener can be reached from this machine.
_LOCAL_FOR_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


@dataclass
class ReloadAnswer:
    ok: bool
    lines: list[str] = field(default_factory=list)  # changes when ok, problems when not


def admin_target(listen: Address) -> Address:
    """Where to connect to reach a listener bound to `listen`."""
    return Address(_LOCAL_FOR_WILDCARD.get(listen.host, listen.host), listen.port)


def request_reload(listen: Address, token: str, timeout: float = RELOAD_TIMEOUT) -> ReloadAnswer:
    """POST /admin/reload to the instance listening on `listen`."""
    target = admin_target(listen)
    where = f"http://{target}"
    if target.port == 0:
        problem = "admin.listen: port 0 is picked when pyproxy starts; --reload cannot find it"
        return ReloadAnswer(False, [problem])
    connection = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    try:
        connection.request(
            "POST", "/admin/reload", body=b"",
            headers={"Authorization": f"Bearer {token}", "Content-Length": "0"},
        )  # fmt: skip
        response = connection.getresponse()
        status, body = response.status, response.read()
    except ConnectionRefusedError:
        return ReloadAnswer(False, [f"no instance answered at {where} (connection refused)"])
    except (OSError, http.client.HTTPException) as error:
        return ReloadAnswer(False, [f"no answer from {where}: {error}"])
    finally:
        connection.close()
    return _read_answer(status, body, where)


def _read_answer(status: int, body: bytes, where: str) -> ReloadAnswer:
    text = body.decode("utf-8", "replace").strip()
    if status in (200, 400):
        try:
            payload = json.loads(text)
        except json.JSONDecodeError:
            payload = None
        if isinstance(payload, dict) and status == 200:
            return ReloadAnswer(True, [str(line) for line in payload.get("changes", [])])
        if isinstance(payload, dict):
            return ReloadAnswer(False, [str(line) for line in payload.get("problems", [])])
    if status == 401:
        return ReloadAnswer(False, [f"{where} refused the admin token (401)"])
    if status == 403:
        return ReloadAnswer(False, [f"{where} has no admin token configured (403): {text}"])
    return ReloadAnswer(False, [f"{where} answered {status}: {text[:200]}"])
