"""The access log (`access_log` in docs/configuration.md): one parseable line per
request, in both formats, to a stream, to stdout or to a file; and a stuck disk never
holds up a request.

Lines are read back the way a log shipper would: the text format with a regex for
Apache combined plus pyproxy's key=value fields, the JSON format with json.loads.
Every field a line promises (time, client, method, target, status, bytes, duration,
backend, attempts, request id) is checked against what the client actually saw
(status, body length, X-Request-ID).
"""

from __future__ import annotations

import io
import ipaddress
import json
import random
import re
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from backends import EchoBackend, closed_port, wait_for
from conftest import access_log_text, base_config
from prometheus_client import CollectorRegistry
from rawhttp import exchange, request_bytes

from pyproxy.config.schema import AccessLogConfig, BackendConfig, RetryConfig
from pyproxy.observe import accesslog
from pyproxy.observe.accesslog import AccessLog
from pyproxy.process.service import Service
from pyproxy.proxy.request import Outcome, Request

TEXT_LINE = re.compile(
    r"(?P<client>\S+) - - \[(?P<time>\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} \+0000)\] "
    r'"(?P<method>[A-Z]+|-) (?P<target>\S+) HTTP/1\.[01]" (?P<status>\d{3}) (?P<bytes>\d+) '
    r'"(?P<referer>[^"]*)" "(?P<user_agent>[^"]*)" '
    r"backend=(?P<backend>\S+) attempts=(?P<attempts>\d+) duration=(?P<duration>\d+\.\d+) "
    r"upstream_time=(?P<upstream_time>-|\d+\.\d+) "
    r'request_id=(?P<request_id>[A-Za-z0-9._:-]+)(?: detail="(?P<detail>[^"]*)")?'
)
JSON_FIELDS = {
    "time",
    "client",
    "method",
    "target",
    "status",
    "bytes",
    "duration",
    "backend",
    "attempts",
    "request_id",
}


def parse_text(line: str) -> dict[str, Any]:
    match = TEXT_LINE.fullmatch(line)
    assert match, f"not an access log line: {line!r}"
    fields: dict[str, Any] = match.groupdict()
    when = datetime.strptime(fields["time"], "%d/%b/%Y:%H:%M:%S %z")
    fields["time"] = when.timestamp()
    for name in ("status", "bytes", "attempts"):
        fields[name] = int(fields[name])
    fields["duration"] = float(fields["duration"])
    fields["backend"] = "" if fields["backend"] == "-" else fields["backend"]
    return fields


def parse_json(line: str) -> dict[str, Any]:
    fields: dict[str, Any] = json.loads(line)
    assert isinstance(fields, dict)
    missing = JSON_FIELDS - fields.keys()
    assert not missing, f"access-log fields missing: {missing} in {line}"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fields["time"]), fields
    fields["time"] = datetime.fromisoformat(fields["time"].replace("Z", "+00:00")).timestamp()
    for name, kind in (
        ("status", int),
        ("bytes", int),
        ("attempts", int),
        ("duration", (int, float)),
        ("client", str),
        ("target", str),
    ):
        assert isinstance(fields[name], kind), (name, fields)
    return fields


PARSERS: dict[str, Callable[[str], dict[str, Any]]] = {"text": parse_text, "json": parse_json}


def lines_of(read: Callable[[], str], count: int) -> list[str]:
    """Wait until `count` lines were written (the writer is a thread), then return them."""
    assert wait_for(lambda: read().count("\n") >= count), read()
    lines = read().splitlines()
    assert len(lines) == count, lines
    return lines


def traffic(service: Service, http: requests.Session) -> list[requests.Response]:
    """Four kinds of request: relayed, relayed large, retried, refused by pyproxy."""
    return [
        http.get(
            service.proxy_url + "/plain?q=1",
            timeout=5,
            headers={"User-Agent": "probe/1.0", "Referer": "http://example.test/from"},
        ),
        http.get(service.proxy_url + "/large?size=12345", timeout=5),
        http.post(
            service.proxy_url + "/form",
            data=b"a=1",
            timeout=5,
            headers={"X-Request-ID": "client-chosen.id:1"},
        ),
        http.request("TRACE", service.proxy_url + "/", timeout=5),
    ]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_lines_carry_every_spec_field(
    fmt: str, make_proxy: Any, echo_backend: EchoBackend, http: requests.Session
) -> None:
    service = make_proxy([echo_backend], access_log=AccessLogConfig(format=fmt))
    before = time.time()
    answers = traffic(service, http)
    lines = lines_of(lambda: access_log_text(service), len(answers))
    parsed = [PARSERS[fmt](line) for line in lines]
    for fields, answer in zip(parsed, answers, strict=True):
        assert fields["status"] == answer.status_code
        assert fields["bytes"] == len(answer.content)
        assert fields["request_id"] == answer.headers["X-Request-ID"]
        assert fields["client"] == "127.0.0.1"
        assert before - 1 <= fields["time"] <= time.time() + 1
        assert 0 <= fields["duration"] < 5
    plain, large, posted, traced = parsed
    assert (plain["method"], plain["target"], plain["backend"], plain["attempts"]) == (
        "GET",
        "/plain?q=1",
        "echo",
        1,
    )
    assert large["bytes"] == 12345
    assert (posted["method"], posted["request_id"]) == ("POST", "client-chosen.id:1")
    # Answered by pyproxy itself: no backend, no attempt.
    assert (traced["method"], traced["status"], traced["backend"], traced["attempts"]) == (
        "TRACE",
        405,
        "",
        0,
    )
    if fmt == "json":
        assert plain["user_agent"] == "probe/1.0"
        assert plain["referer"] == "http://example.test/from"
    else:
        assert (plain["user_agent"], plain["referer"]) == ("probe/1.0", "http://example.test/from")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_retries_failures_and_slow_answers(
    fmt: str, make_proxy: Any, echo_backend: EchoBackend, http: requests.Session
) -> None:
    refused = BackendConfig(f"http://127.0.0.1:{closed_port()}", "refused")
    service = make_proxy(
        [refused, echo_backend],
        retries=RetryConfig(max_retries=1),
        access_log=AccessLogConfig(format=fmt),
    )
    answers = [http.get(service.proxy_url + f"/slow?delay=0.2&n={i}", timeout=5) for i in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    parsed = [PARSERS[fmt](x) for x in lines_of(lambda: access_log_text(service), 2)]
    # Round robin: one request met the refused port first and was retried.
    assert sorted(p["attempts"] for p in parsed) == [1, 2]
    assert {p["backend"] for p in parsed} == {"echo"}  # the backend that answered
    assert all(p["duration"] >= 0.2 for p in parsed)


def test_the_client_address_is_the_judged_one(
    make_proxy: Any, echo_backend: EchoBackend, http: requests.Session
) -> None:
    spoof = {"X-Forwarded-For": "203.0.113.9"}
    untrusted = make_proxy([echo_backend], access_log=AccessLogConfig(format="json"))
    http.get(untrusted.proxy_url + "/", headers=spoof, timeout=5)
    [line] = lines_of(lambda: access_log_text(untrusted), 1)
    assert parse_json(line)["client"] == "127.0.0.1"  # a claim from anyone is ignored
    trusted = make_proxy(
        [echo_backend],
        access_log=AccessLogConfig(format="json"),
        trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),),
    )
    http.get(trusted.proxy_url + "/", headers=spoof, timeout=5)
    [line] = lines_of(lambda: access_log_text(trusted), 1)
    assert parse_json(line)["client"] == "203.0.113.9"


def test_client_text_cannot_forge_fields_in_text_lines(
    make_proxy: Any, echo_backend: EchoBackend, http: requests.Session
) -> None:
    """A User-Agent is client input: a quote must not end its field early and make
    the rest of the line say something else."""
    service = make_proxy([echo_backend])
    for agent in ('a" 500 0 "-" "-" backend=forged', "tab\there", "lat\xe9"):
        http.get(service.proxy_url + "/", headers={"User-Agent": agent}, timeout=5)
    lines = lines_of(lambda: access_log_text(service), 3)
    parsed = [parse_text(line) for line in lines]
    assert [p["status"] for p in parsed] == [200, 200, 200]
    assert [p["backend"] for p in parsed] == ["echo"] * 3
    assert "backend=forged" in parsed[0]["user_agent"]  # kept, but inside its quotes


def test_requests_refused_at_the_edge_are_logged_too(
    make_proxy: Any, echo_backend: EchoBackend, http: requests.Session
) -> None:
    """One line per request, including those the strict inbound parser
    refuses (a control character in a header: 400). Probes and smuggling attempts
    are exactly what an operator greps the access log for."""
    service = make_proxy([echo_backend], access_log=AccessLogConfig(format="json"))
    answer = http.get(service.proxy_url + "/edge", headers={"User-Agent": "\x1b[31mred"}, timeout=5)
    assert answer.status_code == 400
    assert echo_backend.requests() == []
    [line] = lines_of(lambda: access_log_text(service), 1)
    fields = parse_json(line)
    assert (fields["status"], fields["backend"], fields["attempts"]) == (400, "", 0)
    assert "\x1b" not in line  # JSON escapes it; a raw ESC would colour a terminal


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_to_a_file(
    fmt: str, echo_backend: EchoBackend, tmp_path: Path, http: requests.Session
) -> None:
    path = tmp_path / "logs" / "access.log"
    path.parent.mkdir()
    path.write_text("an older line\n")  # appended to, never truncated
    config = base_config([echo_backend], access_log=AccessLogConfig(format=fmt, path=str(path)))
    service = Service(config, registry=CollectorRegistry())
    service.start()
    try:
        answer = http.get(service.proxy_url + "/to-file", timeout=5)
        lines = lines_of(path.read_text, 2)
    finally:
        service.close()
    assert lines[0] == "an older line"
    fields = PARSERS[fmt](lines[1])
    assert (fields["target"], fields["request_id"]) == ("/to-file", answer.headers["X-Request-ID"])


def test_to_stdout(
    echo_backend: EchoBackend, http: requests.Session, capsys: pytest.CaptureFixture[str]
) -> None:
    config = base_config([echo_backend], access_log=AccessLogConfig(format="json", path="-"))
    service = Service(config, registry=CollectorRegistry())
    service.start()
    written = io.StringIO()
    try:
        http.get(service.proxy_url + "/to-stdout", timeout=5)

        def read() -> str:
            written.write(capsys.readouterr().out)
            return written.getvalue()

        [line] = lines_of(read, 1)
    finally:
        service.close()
    assert parse_json(line)["target"] == "/to-stdout"


def test_disabled_writes_nothing(
    make_proxy: Any, echo_backend: EchoBackend, http: requests.Session
) -> None:
    service = make_proxy([echo_backend], access_log=AccessLogConfig(enabled=False))
    assert http.get(service.proxy_url + "/", timeout=5).status_code == 200
    assert service.access_log is None
    assert access_log_text(service) == ""


# -- a stuck disk --------------------------------------------------------------------


class StuckStream(io.StringIO):
    """A stream whose write() blocks until `unstick` is set, like a full NFS mount."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.unstick = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        self.unstick.wait(30)
        return super().write(text)


def test_a_stuck_log_does_not_hold_up_requests(
    echo_backend: EchoBackend, http: requests.Session
) -> None:
    stream = StuckStream()
    service = Service(
        base_config([echo_backend]), registry=CollectorRegistry(), access_log_stream=stream
    )
    service.start()
    try:
        assert http.get(service.proxy_url + "/first", timeout=5).status_code == 200
        assert stream.entered.wait(5)  # the writer thread is now stuck in write()
        started = time.monotonic()
        codes = [http.get(service.proxy_url + f"/n/{i}", timeout=5).status_code for i in range(50)]
        elapsed = time.monotonic() - started
        assert codes == [200] * 50
        assert elapsed < 5, f"50 requests took {elapsed:.1f}s behind a stuck log"
        assert stream.getvalue() == ""
        stream.unstick.set()
        lines = lines_of(stream.getvalue, 51)  # nothing was lost while it was stuck
        assert [parse_text(x)["target"] for x in lines] == ["/first"] + [
            f"/n/{i}" for i in range(50)
        ]
    finally:
        stream.unstick.set()
        service.close()


def test_a_stuck_log_is_bounded_and_close_does_not_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(accesslog, "MAX_QUEUE", 10)
    stream = StuckStream()
    log = AccessLog(AccessLogConfig(), stream=stream)
    request, outcome = logged()
    try:
        log.write(request, outcome, time.monotonic())
        assert stream.entered.wait(5)
        for _ in range(50):
            log.write(request, outcome, time.monotonic())
        assert log.dropped == 40  # 10 wait in the queue; the rest are counted, not kept
        started = time.monotonic()
        log.close(timeout=0.5)
        assert time.monotonic() - started < 2
    finally:
        stream.unstick.set()
    assert wait_for(lambda: stream.getvalue().count("\n") == 11)


def logged() -> tuple[Request, Outcome]:
    """One request and its outcome, as the access log receives them."""
    request = Request(
        method="GET", target="/x", host="x", peer="127.0.0.1", client="192.0.2.1",
        scheme="http", headers=(), body=None, body_length=None, replayable=True,
        request_id="r1", via=None, started=0.0,
    )  # fmt: skip
    return request, Outcome(backend_name="a", attempts=1, status=200, bytes_sent=3,
                            upstream_seconds=0.5)  # fmt: skip


def test_reopen_follows_logrotate(tmp_path: Path) -> None:
    """After logrotate renames the file, reopen() (SIGHUP) writes to a fresh one."""
    path = tmp_path / "access.log"
    log = AccessLog(AccessLogConfig(format="json", path=str(path)))
    try:
        log.write(*logged(), 1.0)
        assert wait_for(lambda: path.exists() and path.read_text().count("\n") == 1)
        rotated = tmp_path / "access.log.1"
        path.rename(rotated)
        log.reopen()
        log.write(*logged(), 2.0)
        assert wait_for(lambda: path.exists() and path.read_text().count("\n") == 1)
        assert rotated.read_text().count("\n") == 1  # nothing more went to the old file
    finally:
        log.close()


# -- client bytes cannot forge lines ---------------------------------------------------

FORGED = '127.0.0.1 - - [01/Jan/2030:00:00:00 +0000] "GET /admin HTTP/1.1" 200 0'


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_control_bytes_from_clients_cannot_forge_a_line(
    fmt: str, make_proxy: Any, make_scripted_backend: Callable[..., Any]
) -> None:
    """Bytes a client controls reach the log from the request line, from header values
    (obs-text 0x80-0xff passes waitress; U+0085 and U+009B are a line break and a
    terminal escape to many readers) and, for a refused request, from waitress's own
    error text, which quotes the offending header line with its bare CR. Escaped as
    nginx does (`\\xNN`), each request stays one line that says what it was."""
    # A raw backend: http.server would choke on U+0085 (its header parser splits lines
    # with str.splitlines) and answer with something pyproxy must refuse.
    service = make_proxy([make_scripted_backend({})], access_log=AccessLogConfig(format=fmt))
    agent = f"ua\x85{FORGED}\x9b31m\xff"
    relayed = exchange(
        service.proxy_url,
        request_bytes("GET", "/t", headers=[("User-Agent", agent), ("Referer", 'r"\\x')]),
    )
    assert relayed.status == 200, relayed.body
    refused = exchange(
        service.proxy_url, request_bytes("GET", "/r", headers=[("X-Note", f"a\r{FORGED}")])
    )
    assert refused.status == 400
    # waitress passes any byte but space, CR and LF in the target (400 or 502 here:
    # either way the line is written, and that is what this test reads).
    exchange(service.proxy_url, request_bytes("GET", "/e\x1b[2J\x7f"))
    lines = lines_of(lambda: access_log_text(service), 3)  # splitlines: \r and \x85 split too
    # Told apart by content: the refusal may be logged after the next request's line.
    parsed = [PARSERS[fmt](line) for line in lines]
    [first] = [fields for fields in parsed if fields["status"] == 200]
    [second] = [fields for fields in parsed if "Bare CR" in (fields["detail"] or "")]
    [third] = [fields for fields in parsed if fields["target"].startswith("/e")]
    assert second["status"] == 400
    text = access_log_text(service)
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\U0010ffff]", text), repr(text)
    if fmt == "text":
        quoted = FORGED.replace('"', "\\x22")
        assert first["user_agent"] == f"ua\\x85{quoted}\\x9B31m\\xFF"
        assert first["referer"] == "r\\x22\\x5Cx"
        assert "a\\x0D127.0.0.1" in second["detail"]
        assert third["target"] == "/e\\x1B[2J\\x7F"
    else:
        assert first["user_agent"] == agent and first["referer"] == 'r"\\x'
        assert f"a\r{FORGED}" in second["detail"]
        assert third["target"] == "/e\x1b[2J\x7f"


def test_format_text_escapes_every_field_a_client_can_write() -> None:
    fields = {
        "time": 0.0, "client": "10.0.0.1\tx", "method": "G\x00T", "target": "/\x1b[2J",
        "protocol": "HTTP/1.1", "status": 200, "bytes": 0, "duration": 0.0,
        "upstream_time": None, "backend": "b", "attempts": 1, "request_id": "id\n",
        "referer": "\\", "user_agent": "\u2028ok", "detail": 'why "so"',
    }  # fmt: skip
    line = accesslog.format_text(fields)
    assert line.isascii() and line.isprintable(), line
    assert line.startswith('10.0.0.1\\x09x - - [01/Jan/1970:00:00:00 +0000] "G\\x00T /\\x1B[2J ')
    assert '"\\x5C" "\\xE2\\x80\\xA8ok"' in line  # beyond latin-1: its UTF-8 bytes
    assert line.endswith('request_id=id\\x0A detail="why \\x22so\\x22"')
    assert json.loads(accesslog.format_json(fields))["user_agent"] == "\u2028ok"
    assert accesslog.format_json(fields).isascii()


# The fields of a line, in the order AccessLog.write() puts them in.
WRITE_ORDER = ("time", "client", "method", "target", "protocol", "status", "bytes", "duration",
               "upstream_time", "backend", "attempts", "request_id", "referer", "user_agent",
               "detail")  # fmt: skip


def json_dumps_line(fields: dict[str, Any]) -> str:
    """The JSON line as json.dumps writes it: what format_json must equal."""
    out = dict(fields)
    stamp = fields["time"]
    out["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp))
    out["time"] += f".{int(stamp % 1 * 1000):03d}Z"
    out["duration"] = round(fields["duration"], 6)
    if fields["upstream_time"] is not None:
        out["upstream_time"] = round(fields["upstream_time"], 6)
    return json.dumps(out, separators=(",", ":"))


def test_format_json_writes_what_json_dumps_would() -> None:
    """format_json spells the line out by hand: the same text as json.dumps, for
    strings of controls, quotes, backslashes, latin-1 and astral characters."""
    rng = random.Random(7)
    alphabet = 'ab"\\/\n\r\t\x00\x1b\x7f\x85\xe9\u2028\U0001f600 '
    text_fields = ("client", "method", "target", "protocol", "backend", "request_id",
                   "referer", "user_agent", "detail")  # fmt: skip
    for _ in range(2000):
        fields: dict[str, Any] = {
            "time": rng.uniform(0, 4e9), "status": rng.randrange(100, 600),
            "bytes": rng.randrange(0, 1 << 40), "attempts": rng.randrange(0, 4),
            "duration": rng.choice([0.0, 1e-9, rng.random(), rng.uniform(0, 1e6)]),
            "upstream_time": rng.choice([None, 5.0, rng.random()]),
        }  # fmt: skip
        for name in text_fields:
            fields[name] = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        in_write_order = {name: fields[name] for name in WRITE_ORDER}
        assert accesslog.format_json(fields) == json_dumps_line(in_write_order)


def test_json_lines_keep_the_order_write_gives_the_fields() -> None:
    stream = io.StringIO()
    log = AccessLog(AccessLogConfig(format="json", path="-"), stream=stream)
    try:
        log.write(*logged(), 1.0)
        assert wait_for(lambda: stream.getvalue().count("\n") == 1)
    finally:
        log.close()
    assert tuple(json.loads(stream.getvalue())) == WRITE_ORDER


def test_timestamps_follow_each_lines_own_second_in_both_formats() -> None:
    """The per-second stamp is cached: lines either side of a second boundary, and a
    line of an earlier second after them, still carry their own second."""
    fields: dict[str, Any] = {
        "client": "10.0.0.1", "method": "GET", "target": "/", "protocol": "HTTP/1.1",
        "status": 200, "bytes": 0, "duration": 0.0, "upstream_time": None, "backend": "b",
        "attempts": 1, "request_id": "id", "referer": "", "user_agent": "", "detail": "",
    }  # fmt: skip
    expected = [
        (1_700_000_000.999, "14/Nov/2023:22:13:20", "2023-11-14T22:13:20.999Z"),
        (1_700_000_001.0, "14/Nov/2023:22:13:21", "2023-11-14T22:13:21.000Z"),
        (1_699_999_999.5, "14/Nov/2023:22:13:19", "2023-11-14T22:13:19.500Z"),
        (1_700_000_000.25, "14/Nov/2023:22:13:20", "2023-11-14T22:13:20.250Z"),
    ]
    for stamp, text_time, json_time in expected:
        line = {**fields, "time": stamp}
        assert f"[{text_time} +0000]" in accesslog.format_text(line)
        assert json.loads(accesslog.format_json(line))["time"] == json_time
