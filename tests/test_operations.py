"""What an operator relies on: /metrics (read with prometheus_client's own
parser), the OpenAPI description of the HTTP API, and the log lines of a real
uvicorn process (text and JSON, start and stop, passwords masked)."""

from __future__ import annotations

import functools
import json
import re
import os
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import Route
from websockets.exceptions import ConnectionClosed
from starlette.testclient import TestClient

import chatx
from conftest import (
    ROOT, ChatServer, RedisServer, free_port, fresh_postgres_database, remote_sign_up, receive, sign_up, wait_until,
)

LOOPBACK = ("127.0.0.1", 50000)  # TestClient's own address is "testclient", which is no IP address


# ---- helpers ----------------------------------------------------------------------------


def families(text: str) -> dict[str, Any]:
    """/metrics parsed by Prometheus's own parser: family name -> family."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(parsed: dict[str, Any], family: str, sample: str | None = None, **labels: str) -> float | None:
    """One sample's value (None when it is not there)."""
    for found in parsed[family].samples:
        if found.name == (sample or family) and all(found.labels.get(k) == v for k, v in labels.items()):
            return found.value
    return None


def frame_of(ws: Any, kind: str) -> dict[str, Any]:
    """The next frame of that kind (an `ack` and its `message` come in either order)."""
    while (frame := ws.receive_json())["type"] != kind:
        pass
    return frame


def scrape(client: TestClient) -> dict[str, Any]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return families(response.text)


@pytest.fixture
def local_app(make_client):
    """In-process apps whose client address is 127.0.0.1."""
    return functools.partial(make_client, client_address=LOOPBACK)


class PasswordRedis(RedisServer):
    """A redis-server that wants a password (conftest's wants none)."""

    password = "s3cret-redis-pw"
    options = ("--requirepass", password)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(chatx.redis_command("AUTH", self.password) + b"PING\r\n")
                reply = b""
                while reply.count(b"\r\n") < 2:
                    chunk = conn.recv(64)
                    if not chunk:
                        return False
                    reply += chunk
                return reply == b"+OK\r\n+PONG\r\n"
        except OSError:
            return False


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[PasswordRedis]:
    server = PasswordRedis(tmp_path)
    server.start()
    yield server
    server.stop()


# ---- /metrics -----------------------------------------------------------------------------


def test_metrics_are_off_unless_turned_on(local_app):
    client = local_app()
    response = client.get("/metrics")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_metrics_count_sockets_users_messages_commits_closes_and_refusals(local_app):
    client = local_app(metrics=True, send_rate=0.001, send_burst=3)
    before = scrape(client)
    for family in ("chatx_open_sockets", "chatx_users_connected", "chatx_messages_stored", "chatx_commit_seconds",
                   "chatx_broadcast_up", "chatx_sockets_closed", "chatx_refusals"):
        assert family in before, sorted(before)
    assert before["chatx_messages_stored"].type == "counter"
    assert before["chatx_commit_seconds"].type == "histogram"
    assert before["chatx_open_sockets"].type == before["chatx_users_connected"].type == "gauge"
    assert before["chatx_sockets_closed"].type == before["chatx_refusals"].type == "counter"
    assert value(before, "chatx_broadcast_up") == 1
    assert value(before, "chatx_open_sockets") == 0
    assert value(before, "chatx_users_connected") == 0
    stored_before = value(before, "chatx_messages_stored", "chatx_messages_stored_total")
    commits_before = value(before, "chatx_commit_seconds", "chatx_commit_seconds_count")

    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    with alice.ws() as alice_ws, alice.ws() as alice_tab, bob.ws() as bob_ws:
        for ws in (alice_ws, alice_tab, bob_ws):
            assert frame_of(ws, "hello")
        now = scrape(client)
        assert value(now, "chatx_open_sockets") == 3
        assert value(now, "chatx_users_connected") == 2  # alice's two tabs are one user

        for n in range(3):  # the burst: 3 sends
            alice_ws.send_json({"type": "send", "to": "bob", "body": f"hi {n}", "client_id": f"c-{n}"})
            assert frame_of(alice_ws, "ack")["client_id"] == f"c-{n}"
        alice_ws.send_json({"type": "send", "to": "bob", "body": "one too many", "client_id": "c-x"})
        refused = frame_of(alice_ws, "error")
        assert refused["code"] == "rate_limited"

        after = scrape(client)
        assert value(after, "chatx_messages_stored", "chatx_messages_stored_total") == stored_before + 3
        commits = value(after, "chatx_commit_seconds", "chatx_commit_seconds_count")
        assert commits >= commits_before + 3
        assert value(after, "chatx_commit_seconds", "chatx_commit_seconds_sum") > 0
        buckets = [s for s in after["chatx_commit_seconds"].samples if s.name == "chatx_commit_seconds_bucket"]
        assert [s.labels["le"] for s in buckets][-1] == "+Inf"
        assert buckets[-1].value == commits
        assert value(after, "chatx_refusals", "chatx_refusals_total", limit="send_rate") == 1

        # A frame over 64 KiB: the socket is closed with 1009, and counted by its code.
        bob_ws.send_text("x" * (chatx.FRAME_MAX_BYTES + 1))
        with pytest.raises(Exception):
            while True:
                bob_ws.receive_json()

        def closed_1009() -> float | None:
            return value(scrape(client), "chatx_sockets_closed", "chatx_sockets_closed_total", code="1009")

        assert wait_until(closed_1009, what="a socket closed with 1009 in /metrics") == 1
        alice_tab.close()

        def one_closed_by_client() -> bool:
            parsed = scrape(client)
            return value(parsed, "chatx_open_sockets") == 1 and sum(
                s.value for s in parsed["chatx_sockets_closed"].samples
                if s.name == "chatx_sockets_closed_total") == 2

        wait_until(one_closed_by_client, what="alice's second tab closed in /metrics")
        final = scrape(client)
        assert value(final, "chatx_users_connected") == 1
        codes = {s.labels["code"] for s in final["chatx_sockets_closed"].samples
                 if s.name == "chatx_sockets_closed_total"}
        assert codes == {"1009", "client"}, codes  # "client": the client closed it


def test_metrics_are_refused_to_addresses_outside_the_allow_list(local_app):
    only_elsewhere = local_app(metrics=True, metrics_allow="10.0.0.0/8")
    refused = only_elsewhere.get("/metrics")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "forbidden"

    allowed = local_app(metrics=True, metrics_allow="10.0.0.0/8, 127.0.0.0/8")
    assert allowed.get("/metrics").status_code == 200

    # TestClient's default address is not an IP address: never on a list.
    with TestClient(chatx.create_app(database_url=str(allowed.app.state.chat.settings.database_url),
                                     metrics=True)) as unnamed:
        assert unnamed.get("/metrics").status_code == 403


def test_metrics_from_a_real_server_go_to_loopback_only_not_to_whoever_the_proxy_forwards(tmp_path):
    server = ChatServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}", "CHATX_METRICS": "true",
                         "CHATX_TRUSTED_PROXIES": "127.0.0.1"}, tmp_path)
    server.start()
    try:
        response = httpx.get(f"{server.base}/metrics", timeout=5)
        assert response.status_code == 200
        parsed = families(response.text)
        assert value(parsed, "chatx_broadcast_up") == 1
        assert value(parsed, "chatx_open_sockets") == 0
        # Through a proxy on this host, a client elsewhere is that client, not loopback.
        forwarded = httpx.get(f"{server.base}/metrics", headers={"X-Forwarded-For": "203.0.113.7"}, timeout=5)
        assert forwarded.status_code == 403
    finally:
        server.stop()


# ---- OpenAPI ------------------------------------------------------------------------------


def test_openapi_describes_every_api_route_with_its_methods(client):
    response = client.get("/api/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    assert schema["info"]["version"] == chatx.__version__
    paths = schema["paths"]

    expected: dict[str, set[str]] = {}
    for route in client.app.routes:
        if isinstance(route, Route) and route.path.startswith("/api/") and route.path != "/api/openapi.json":
            expected.setdefault(route.path, set()).update(m.lower() for m in route.methods if m != "HEAD")
    assert len(expected) >= 10, expected
    missing = {path: methods - set(paths.get(path, {})) for path, methods in expected.items()}
    assert {path: methods for path, methods in missing.items() if methods} == {}
    for path, methods in expected.items():
        for method in methods:
            operation = paths[path][method]
            assert operation.get("summary") and operation.get("responses"), (method, path, operation)
    # And it names nothing the app does not serve.
    assert {path for path in paths if path.startswith("/api/")} <= set(expected)
    for extra in ("/healthz", "/metrics"):
        assert "get" in paths[extra]


# ---- logs ---------------------------------------------------------------------------------

TEXT_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.]+): (.*)$")
UVICORN_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL):\s")


def chatx_lines(log: str) -> list[re.Match]:
    """ChatX's own lines of a server log (uvicorn's have their own format)."""
    return [match for line in log.splitlines() if (match := TEXT_LINE.match(line))]


def test_log_lines_have_time_level_and_name_and_the_broadcast_password_masked(tmp_path, password_redis):
    server = ChatServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}",
                         "CHATX_BROADCAST_URL": password_redis.url}, tmp_path)
    server.start()
    try:
        remote_sign_up(server, "alice")
    finally:
        server.stop()  # SIGTERM: a normal stop
    log = server.log.read_text()

    lines = chatx_lines(log)
    assert lines, log
    for match in lines:
        datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
    started = [m for m in lines if m.group(4).startswith(f"ChatX {chatx.__version__} started:")]
    assert len(started) == 1, log
    assert started[0].group(2) == "INFO" and started[0].group(3) == "chatx"
    assert started[0].group(4) == (f"ChatX {chatx.__version__} started: database sqlite:///{tmp_path / 'chat.db'}, "
                                   f"broadcast redis://:***@127.0.0.1:{password_redis.port}/0")
    assert password_redis.password not in log
    assert "restored" not in log, log  # nothing was lost: nothing was restored
    assert lines[-1].group(4) == "ChatX stopped", log


def test_stopping_logs_how_many_sockets_it_closed(tmp_path):
    server = ChatServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}"}, tmp_path)
    server.start()
    sockets = []
    try:
        for name in ("alice", "bob"):
            sockets.append(remote_sign_up(server, name).ws(server))
            assert receive(sockets[-1], "hello")
    finally:
        server.stop()  # SIGTERM, with the two sockets open
    codes = []
    for ws in sockets:
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=5)
        codes.append(closed.value.rcvd.code if closed.value.rcvd else None)
        ws.close()
    assert codes == [1012, 1012]  # "service restart": clients reconnect elsewhere
    messages = [m.group(4) for m in chatx_lines(server.log.read_text())]
    assert any(re.search(r"\b2 sockets\b", message) for message in messages), messages
    assert messages[-1] == "ChatX stopped", messages


def test_json_log_format_gives_one_object_per_line_with_the_database_password_masked(tmp_path, redis_server):
    with fresh_postgres_database() as url:
        with_password = url.replace("postgresql://postgres@", "postgresql://postgres:s3cret-pg-pw@")
        # 127.0.0.1 trusts: the password is not checked, only logged (masked).
        server = ChatServer({"CHATX_DATABASE_URL": with_password, "CHATX_BROADCAST_URL": redis_server.url,
                             "CHATX_LOG_FORMAT": "json"}, tmp_path)
        server.start()
        try:
            remote_sign_up(server, "carol")
        finally:
            server.stop()
    log = server.log.read_text()
    assert "s3cret-pg-pw" not in log

    entries: list[dict[str, Any]] = []
    for line in log.splitlines():
        if not line.strip() or UVICORN_LINE.match(line):
            continue  # uvicorn's own lines
        entry = json.loads(line)  # every other line is one JSON object
        assert isinstance(entry, dict), line
        entries.append(entry)
    assert entries, log
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry), entry
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"]), entry
    started = [e for e in entries if e["message"].startswith("ChatX ")
               and " started: " in e["message"]]
    assert len(started) == 1, entries
    assert started[0]["level"] == "INFO" and started[0]["logger"] == "chatx"
    masked = with_password.replace("s3cret-pg-pw", "***")
    assert started[0]["message"] == (f"ChatX {chatx.__version__} started: database {masked}, "
                                     f"broadcast {redis_server.url}")
    assert entries[-1]["message"] == "ChatX stopped", entries
    assert not any("restored" in e["message"] for e in entries), entries


# ---- allowed hosts ---------------------------------------------------------------------------


def serve_output(tmp_path: Path, host: str, **env: str) -> str:
    """What `python -m chatx serve --host HOST` prints until uvicorn has started."""
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    with open(log, "wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "chatx", "serve", "--host", host, "--port", str(port)],
                                   cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "Application startup complete" in log.read_text() or process.poll() is not None,
                   timeout=30, what="python -m chatx serve to start")
    finally:
        process.terminate()
        process.wait(timeout=20)
    return log.read_text()


def test_serve_warns_when_any_host_is_allowed_on_an_address_others_can_reach(tmp_path):
    # DNS rebinding: with CHATX_ALLOWED_HOSTS=* the Origin check compares the Origin with whatever Host came.
    exposed = serve_output(tmp_path, "0.0.0.0")
    assert "CHATX_ALLOWED_HOSTS is '*' while serving on 0.0.0.0" in exposed, exposed
    assert "Application startup complete" in exposed
    assert "CHATX_ALLOWED_HOSTS" not in serve_output(tmp_path, "127.0.0.1")
    named = serve_output(tmp_path, "0.0.0.0", CHATX_ALLOWED_HOSTS="chat.example")
    assert "CHATX_ALLOWED_HOSTS" not in named and "Application startup complete" in named
    settings = chatx.load_settings()
    assert chatx.serving_problem(settings, "::1") is None and chatx.serving_problem(settings, "localhost") is None
    assert chatx.serving_problem(settings, "chat.example.com") is not None
