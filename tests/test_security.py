"""Issue 16, crash inputs and defects: no client input closes a socket with
1011 or logs a traceback; reused client_ids and invisible bodies are refused;
security headers on every response, 500s included; Host and proxy headers are
believed only where configured (docs/protocol.md: Errors over HTTP, Sessions and
cross-site requests, Frames from the client, Limits)."""

from __future__ import annotations

import json
import logging
import sqlite3
from contextlib import contextmanager
from typing import Any, Iterator

import httpx2 as httpx
import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

import chatx
from conftest import (acked, error_code, PASSWORD, ChatServer, DocumentedServer, drain, next_frame, quiet, receive,
                      remote_sign_up, sign_up, silent)




@contextmanager
def app_client(database_url: str, raise_server_exceptions: bool = True, base_url: str = "http://testserver",
               **settings: Any) -> Iterator[TestClient]:
    """An in-process app of the test's own (make_client cannot change the TestClient's options)."""
    with TestClient(chatx.create_app(database_url=database_url, **settings), base_url=base_url,
                    raise_server_exceptions=raise_server_exceptions) as client:
        yield client




def raw_frame(ws) -> str:
    """The next frame's text as sent, presence frames skipped."""
    while True:
        text = ws.receive_text()
        if json.loads(text)["type"] != "presence":
            return text


SECURITY_HEADERS = ("content-security-policy", "x-content-type-options", "referrer-policy", "x-frame-options")


def assert_security_headers(response) -> None:
    missing = [name for name in SECURITY_HEADERS if name not in response.headers]
    assert not missing, f"{response.request.method} {response.request.url} ({response.status_code}) lacks {missing}"
    assert response.headers["x-content-type-options"] == "nosniff"


# ---- crash inputs: an error frame, and the socket stays open ---------------------------------

DEEP_PING = '{"type":"ping","pad":' + "[" * 5000 + "]" * 5000 + "}"
CRASH_INPUTS = [
    pytest.param("[" * 60000, "bad_json", id="60000-open-brackets"),
    pytest.param(DEEP_PING, "bad_json", id="ping-nested-5000-levels"),
    pytest.param('{"a":' * 3000 + "1" + "}" * 3000, "bad_json", id="objects-nested-3000-levels"),
    pytest.param('{"type": []}', "unknown_type", id="type-is-a-list"),
    pytest.param('{"type": {}}', "unknown_type", id="type-is-an-object"),
    pytest.param('{"type": null}', "unknown_type", id="type-is-null"),
    pytest.param('{"type": "send", "to": "bob", "body": "hi", "client_id": "\\ud800"}', "invalid_field",
                 id="lone-surrogate-client-id"),
    pytest.param('{"type": "nope", "client_id": "\\udfff"}', "unknown_type", id="lone-surrogate-client-id-unknown"),
    pytest.param('{"type": "send", "to": "\\ud800", "body": "hi"}', "invalid_field", id="lone-surrogate-to"),
    pytest.param('{"type": "send", "to": "bob", "body": "a\\ud800b"}', "invalid_field", id="lone-surrogate-body"),
    pytest.param('{"type": "send", "to": "bob", "body": "a\\u0000b"}', "invalid_field", id="nul-in-body"),
    pytest.param('{"type": "send", "to": ["bob"], "body": "hi"}', "invalid_field", id="to-is-a-list"),
    pytest.param('{"type": "send", "to": "bob", "body": "hi", "client_id": {"x": 1}}', "invalid_field",
                 id="client-id-is-an-object"),
    pytest.param('{"type": "read", "with": "bob", "up_to": ' + "9" * 5000 + "}", "bad_json",
                 id="integer-of-5000-digits"),
    pytest.param('{"type": "read", "with": "bob", "up_to": NaN}', "invalid_field", id="nan"),
    pytest.param('{"type": "read", "with": "bob", "up_to": 1e400}', "invalid_field", id="infinity"),
    pytest.param('{"type": "edit", "id": 99999999999999999999999999, "body": "x"}', "invalid_field",
                 id="id-beyond-64-bits"),
    pytest.param('{"type": "delete", "id": true}', "invalid_field", id="id-is-a-boolean"),
    pytest.param("null", "bad_json", id="null"),
    pytest.param('"a string"', "bad_json", id="a-string"),
    pytest.param("[]", "bad_json", id="a-list"),
    pytest.param("{", "bad_json", id="truncated"),
]


@pytest.mark.parametrize("text, code", CRASH_INPUTS)
def test_a_crash_input_gets_an_error_frame_and_the_socket_stays_open(make_client, caplog, text, code):
    caplog.set_level(logging.WARNING)
    client = make_client()
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    with alice.ws() as ws, bob.ws() as bob_ws:
        next_frame(ws, "hello")
        next_frame(bob_ws, "hello")
        ws.send_text(text)
        reply = raw_frame(ws)
        error = json.loads(reply)
        assert error["type"] == "error" and error["code"] == code, error
        assert "\\ud" not in reply.lower() and "\\u0000" not in reply, f"the bad value was echoed: {reply}"
        if "client_id" in error:
            assert chatx.storable(error["client_id"])
        # The socket is open and works; bob noticed nothing.
        assert silent(ws) == []
        assert acked(ws, "bob", "still here", "after-crash")["body"] == "still here"
        assert next_frame(bob_ws, "message")["message"]["body"] == "still here"
        assert silent(bob_ws) == []
    assert client.get("/healthz").status_code == 200
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not failures, [r.getMessage() for r in failures]


def test_a_binary_frame_is_bad_json_and_the_socket_stays_open(client):
    alice = sign_up(client, "alice")
    with alice.ws() as ws:
        next_frame(ws, "hello")
        ws.send_bytes(b"\xff\xfe not text")
        assert next_frame(ws)["code"] == "bad_json"
        assert silent(ws) == []


def test_brackets_inside_strings_are_text_not_nesting(client):
    alice = sign_up(client, "alice")
    sign_up(client, "bob")
    body = "[" * 200 + "{" * 200
    with alice.ws() as ws:
        next_frame(ws, "hello")
        assert acked(ws, "bob", body, "brackets")["body"] == body


def test_crash_inputs_on_a_real_server_log_no_traceback_and_never_close_1011(tmp_path):
    server = ChatServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}"}, tmp_path)
    server.start()
    try:
        alice, bob = remote_sign_up(server, "alice"), remote_sign_up(server, "bob")
        with alice.ws(server) as ws, bob.ws(server) as bob_ws:
            receive(ws, "hello")
            receive(bob_ws, "hello")
            for param in CRASH_INPUTS:
                text, code = param.values
                ws.send(text)
                error = receive(ws)
                assert error["type"] == "error" and error["code"] == code, (param.id, error)
            ws.send(json.dumps({"type": "send", "to": "bob", "body": "survived", "client_id": "s-1"}))
            assert receive(ws, "ack")["client_id"] == "s-1"
            assert receive(bob_ws, "message")["message"]["body"] == "survived"
            assert [f for f in drain(bob_ws) if f["type"] != "presence"] == []
        assert server.health()[0] == 200
    finally:
        server.stop()
    log = server.log.read_text()
    assert "Traceback" not in log and "1011" not in log, log[-3000:]


# ---- reused client_ids ---------------------------------------------------------------------------


def test_a_reused_client_id_with_another_recipient_or_body_is_invalid_and_delivers_nothing(database_url,
                                                                                             make_client):
    client = make_client(database_url=database_url)
    alice, bob, carol = sign_up(client, "alice"), sign_up(client, "bob"), sign_up(client, "carol")
    with alice.ws() as ws, bob.ws() as bob_ws, carol.ws() as carol_ws:
        for socket in (ws, bob_ws, carol_ws):
            next_frame(socket, "hello")
        original = acked(ws, "bob", "first", "c-1")
        assert next_frame(bob_ws, "message")["message"]["id"] == original["id"]

        # Another recipient: the issue saw the first message delivered live to carol.
        ws.send_json({"type": "send", "to": "carol", "body": "first", "client_id": "c-1"})
        error = next_frame(ws)
        assert error["type"] == "error" and error["code"] == "invalid_field" and error["client_id"] == "c-1"
        # Another body, same recipient.
        ws.send_json({"type": "send", "to": "bob", "body": "changed", "client_id": "c-1"})
        error = next_frame(ws)
        assert error["type"] == "error" and error["code"] == "invalid_field" and error["client_id"] == "c-1"
        for socket in (ws, bob_ws, carol_ws):
            assert silent(socket) == []

        # The exact retry is still the original's ack, and nothing more.
        ws.send_json({"type": "send", "to": "bob", "body": "first", "client_id": "c-1"})
        retry = next_frame(ws)
        assert retry["type"] == "ack" and retry["message"]["id"] == original["id"]

        # Both in one commit: the second one is refused, carol gets nothing.
        ws.send_json({"type": "send", "to": "bob", "body": "together", "client_id": "c-2"})
        ws.send_json({"type": "send", "to": "carol", "body": "together", "client_id": "c-2"})
        frames = [next_frame(ws) for _ in range(3)]  # acks and errors come after the commit, not before a pong
        assert silent(ws) == []
        kinds = sorted((f["type"], f.get("code")) for f in frames)
        assert kinds == [("ack", None), ("error", "invalid_field"), ("message", None)], frames
        assert next(f for f in frames if f["type"] == "ack")["message"]["to"] == "bob"
        assert [f["message"]["body"] for f in silent(bob_ws) if f["type"] == "message"] == ["together"]
        assert silent(carol_ws) == []

    assert carol.get("/api/conversations").json()["conversations"] == []
    assert carol.get("/api/conversations/alice/messages").json()["messages"] == []
    bodies = [m["body"] for m in bob.get("/api/conversations/alice/messages").json()["messages"]]
    assert bodies == ["first", "together"]


# ---- invisible bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize("body", ["\u200b", "\u200b\u200c\u200d\ufeff", " \u2060\n\t\u200b ", "\u202e",
                                  "\u3164\u115f", "\ufe0f\u00ad",
                                  # format characters outside the usual ranges, and combining marks with no base
                                  "\U0001D173", "\U0001BCA0", "\U00013430", "\u0301", " \u0301\u20dd\u0903 "])
def test_a_body_with_nothing_visible_is_empty_body_and_stores_nothing(client, body):
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    with alice.ws() as ws, bob.ws() as bob_ws:
        next_frame(ws, "hello")
        next_frame(bob_ws, "hello")
        ws.send_json({"type": "send", "to": "bob", "body": body, "client_id": "zw"})
        error = next_frame(ws)
        assert error["type"] == "error" and error["code"] == "empty_body" and error["client_id"] == "zw"
        assert silent(bob_ws) == []
        # The socket goes on: a visible body is stored, bidirectional controls and all.
        kept = "abc\u202edef\u200b e\u0301"
        assert acked(ws, "bob", kept, "visible")["body"] == kept
        assert next_frame(bob_ws, "message")["message"]["body"] == kept
    assert [m["body"] for m in bob.get("/api/conversations/alice/messages").json()["messages"]] == [kept]


# ---- headers ----------------------------------------------------------------------------------------------


def test_api_responses_are_never_cached_and_every_response_has_the_security_headers(client):
    alice = sign_up(client, "alice")
    responses = [
        alice.get("/api/me"), alice.get("/api/conversations"), alice.get("/api/users", params={"q": "a"}),
        client.get("/api/me"),  # 401
        client.post("/api/login", json={"username": "alice", "password": "wrong password"}),  # 401
        client.post("/api/login", json=[]),  # 400
        client.get("/api/nowhere"),  # 404
        client.get("/api/register"),  # 405
        alice.post("/api/logout"),  # 204
    ]
    for response in responses:
        assert response.headers.get("cache-control") == "no-store", (response.request.url, response.status_code)
        assert_security_headers(response)
    for response in (client.get("/login"), client.get("/register"), client.get("/", follow_redirects=False),
                     client.get("/static/nowhere.js"), client.get("/healthz")):
        assert_security_headers(response)


def test_a_500_carries_the_security_headers_and_no_traceback(sqlite_url):
    """An honest 500: a password hash in the database that is not one ChatX
    made (an operator imported it by hand), so signing in as that user fails
    inside the server. A missing table would not do: the database's own
    faults are 503 unavailable."""
    with app_client(sqlite_url, raise_server_exceptions=False) as client:
        alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
        sign_up(client, "mallory")
        with alice.ws() as ws, bob.ws() as bob_ws:
            next_frame(ws, "hello")
            next_frame(bob_ws, "hello")
            with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as db:
                db.execute("UPDATE chatx_users SET password_hash = 'md5:0123456789abcdef' "
                           "WHERE username = 'mallory'")
            response = client.post("/api/login", json={"username": "mallory", "password": PASSWORD})
            assert response.status_code == 500, response.text
            assert error_code(response) == "internal_error"
            assert "Traceback" not in response.text and "md5" not in response.text
            assert_security_headers(response)
            assert response.headers.get("cache-control") == "no-store"
            # Everyone else noticed nothing.
            assert acked(ws, "bob", "fine", "after-500")["body"] == "fine"
            assert next_frame(bob_ws, "message")["message"]["body"] == "fine"
            assert client.get("/healthz").status_code == 200
            assert alice.get("/api/me").status_code == 200
            client.cookies.clear()
            assert client.post("/api/login", json={"username": "bob", "password": PASSWORD}).status_code == 200
            client.cookies.clear()


# ---- Host -------------------------------------------------------------------------------------------------


def test_allowed_hosts_refuses_a_forged_host_and_the_redirect_names_no_host(sqlite_url):
    with app_client(sqlite_url, base_url="http://example.com", allowed_hosts="example.com") as client:
        alice = sign_up(client, "alice")
        # The served name works, and the redirect to sign in is relative: no Host in it.
        redirect = client.get("/", follow_redirects=False)
        assert redirect.status_code == 303 and redirect.headers["location"] == "/login"
        forged_redirect = client.get("/", headers={"host": "example.com.evil.example"}, follow_redirects=False)
        assert forged_redirect.status_code == 400
        assert "evil" not in forged_redirect.headers.get("location", "")
        for path in ("/", "/login", "/api/me", "/healthz"):
            response = client.get(path, headers={**alice.headers, "host": "evil.example"}, follow_redirects=False)
            assert response.status_code == 400, (path, response.status_code)
            assert_security_headers(response)
        login = client.post("/api/login", json={"username": "alice", "password": PASSWORD},
                            headers={"host": "evil.example"})
        assert login.status_code == 400 and chatx.SESSION_COOKIE not in login.cookies
        with pytest.raises((WebSocketDisconnect, WebSocketDenialResponse)):
            with client.websocket_connect("ws://evil.example/ws", headers=alice.headers) as ws:
                ws.receive_json()
        # The real host still serves everything.
        assert alice.get("/api/me").status_code == 200
        with client.websocket_connect("ws://example.com/ws", headers=alice.headers) as ws:
            assert next_frame(ws, "hello")["user"]["username"] == "alice"


@pytest.mark.parametrize("path", ["/login", "/register", "/"])
def test_page_urls_do_not_come_from_the_host_header(client, path):
    """Issue 16: "Build URLs relative to the request's root path". With the
    default CHATX_ALLOWED_HOSTS (*), the Host a client sends must not make the
    page's script, style or link URLs."""
    alice = sign_up(client, "alice")
    page = client.get(path, headers={**alice.headers, "host": "evil.example"})
    assert page.status_code == 200
    assert "evil.example" not in page.text, [line.strip() for line in page.text.splitlines() if "evil" in line]


def test_a_forged_host_gets_the_json_error_shape_on_the_api(sqlite_url):
    """docs/protocol.md, Errors over HTTP: every error response is {"error": {"code", "detail"}}, never a bare text page, for /api."""
    with app_client(sqlite_url, base_url="http://example.com", allowed_hosts="example.com") as client:
        response = client.get("/api/me", headers={"host": "evil.example"})
        assert response.status_code == 400
        assert response.headers["content-type"].startswith("application/json"), response.text
        assert "code" in response.json()["error"]


# ---- trusted proxies ---------------------------------------------------------------------------------


def fail_logins(client: TestClient, count: int, forwarded_for: str | None) -> None:
    """`count` failed sign-ins, each for another unknown name (no per-user lockout)."""
    headers = {} if forwarded_for is None else {"x-forwarded-for": forwarded_for}
    for n in range(count):
        response = client.post("/api/login", json={"username": f"ghost{n}", "password": "not the password"},
                               headers=headers)
        assert response.status_code == 401, response.text


ADDRESS_LIMIT = 20  # failed sign-ins per client address (docs/protocol.md, Limits), the default


def test_x_forwarded_for_from_a_trusted_proxy_names_the_locked_out_address(sqlite_url):
    assert chatx.load_settings().login_failures_per_address == ADDRESS_LIMIT
    # The TestClient's peer is "testclient": listed here as the proxy.
    with app_client(sqlite_url, trusted_proxies="testclient") as client:
        sign_up(client, "bob")
        fail_logins(client, ADDRESS_LIMIT, "1.2.3.4")
        locked = client.post("/api/login", json={"username": "bob", "password": PASSWORD},
                             headers={"x-forwarded-for": "1.2.3.4"})
        assert locked.status_code == 429 and error_code(locked) == "rate_limited"
        assert int(locked.headers["retry-after"]) > 0
        # Another client behind the same proxy is not locked out; the proxy's own address neither.
        other = client.post("/api/login", json={"username": "bob", "password": PASSWORD},
                            headers={"x-forwarded-for": "5.6.7.8"})
        assert other.status_code == 200, other.text
        client.cookies.clear()
        # The entry the proxy added is the last one: a client's own forged entry before it changes nothing.
        forged = client.post("/api/login", json={"username": "bob", "password": PASSWORD},
                             headers={"x-forwarded-for": "5.6.7.8, 1.2.3.4"})
        assert forged.status_code == 429
        client.cookies.clear()


def test_x_forwarded_for_from_a_peer_that_is_not_a_listed_proxy_is_ignored(sqlite_url):
    # The TestClient's peer is "testclient", which is not 127.0.0.1.
    with app_client(sqlite_url, trusted_proxies="127.0.0.1") as client:
        sign_up(client, "bob")
        fail_logins(client, ADDRESS_LIMIT, "1.2.3.4")
        # The header was ignored: the failures counted for the peer, whatever it claims now.
        claimed = client.post("/api/login", json={"username": "bob", "password": PASSWORD},
                              headers={"x-forwarded-for": "5.6.7.8"})
        assert claimed.status_code == 429 and error_code(claimed) == "rate_limited"
        # ...and the scheme it claims is not believed either.
        registered = client.post("/api/register", json={"username": "carol", "password": PASSWORD},
                                 headers={"x-forwarded-proto": "https"})
        assert registered.status_code == 201
        assert "secure" not in registered.headers["set-cookie"].lower()


@pytest.mark.parametrize("command", ["make run", "uvicorn chatx:app"])
def test_forged_x_forwarded_for_from_loopback_is_ignored_by_the_documented_commands(tmp_path, command):
    # uvicorn alone believes X-Forwarded-For from 127.0.0.1 (its --forwarded-allow-ips default); with
    # CHATX_TRUSTED_PROXIES empty, ChatX must believe nobody, so a fresh header buys no fresh limits.
    env = {"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}", "CHATX_SIGNUPS_PER_ADDRESS": "3",
           "CHATX_LOGIN_FAILURES_PER_ADDRESS": "3", "CHATX_LOGIN_FAILURES_PER_USER": "100"}
    server = DocumentedServer(env, tmp_path) if command == "make run" else ChatServer(env, tmp_path)
    server.start()
    try:
        def forged(n: int) -> dict[str, str]:
            return {"X-Forwarded-For": f"198.51.100.{n}", "X-Forwarded-Proto": "https"}

        signups = [httpx.post(f"{server.base}/api/register", json={"username": f"forger{n}", "password": PASSWORD},
                              headers=forged(n), timeout=30) for n in range(5)]
        assert [r.status_code for r in signups] == [201, 201, 201, 429, 429], [r.text for r in signups]
        # Nor is X-Forwarded-Proto believed: the cookie is the plain-http one.
        assert signups[0].cookies.get(chatx.SESSION_COOKIE) and "secure" not in signups[0].headers["set-cookie"].lower()
        failures = [httpx.post(f"{server.base}/api/login", json={"username": f"guess{n}", "password": "wrong guess"},
                               headers=forged(100 + n), timeout=30).status_code for n in range(5)]
        assert failures == [401, 401, 401, 429, 429], failures
    finally:
        server.stop()


def cookie_attributes(set_cookie: str) -> tuple[str, dict[str, str]]:
    """The name of a Set-Cookie header's cookie, and its attributes by lower-cased name."""
    first, *rest = [part.strip() for part in set_cookie.split(";")]
    attributes = {name.lower(): value for name, _, value in (part.partition("=") for part in rest)}
    return first.partition("=")[0], attributes


def test_over_https_through_a_trusted_proxy_the_session_cookie_is_secure_with_the_host_prefix(sqlite_url):
    with app_client(sqlite_url, trusted_proxies="*") as client:
        behind_tls = client.post("/api/register", json={"username": "alice", "password": PASSWORD},
                                 headers={"x-forwarded-proto": "https", "x-forwarded-for": "1.2.3.4"})
        assert behind_tls.status_code == 201
        name, attributes = cookie_attributes(behind_tls.headers["set-cookie"])
        # __Host-: a browser takes it only Secure, for Path=/ and without Domain, and only from this origin,
        # so neither a sibling subdomain nor a plain-http page can plant a second session cookie.
        assert name == chatx.SECURE_SESSION_COOKIE == "__Host-chatx_session"
        assert "secure" in attributes and attributes["path"] == "/" and "domain" not in attributes
        client.cookies.clear()
        plain = client.post("/api/register", json={"username": "bob", "password": PASSWORD},
                            headers={"x-forwarded-proto": "http", "x-forwarded-for": "1.2.3.4"})
        assert plain.status_code == 201
        name, attributes = cookie_attributes(plain.headers["set-cookie"])
        assert name == chatx.SESSION_COOKIE and "secure" not in attributes
        client.cookies.clear()
        # The session works through the proxy over https, sockets included.
        token = behind_tls.cookies[chatx.SECURE_SESSION_COOKIE]
        cookie = {"cookie": f"{chatx.SECURE_SESSION_COOKIE}={token}", "x-forwarded-proto": "https"}
        assert client.get("/api/me", headers=cookie).json()["user"]["username"] == "alice"
        with client.websocket_connect("/ws", headers=cookie) as ws:
            assert ws.receive_json()["type"] == "hello"
        # Over https a cookie without the prefix (one a sibling subdomain could have set) is no session.
        tossed = {"cookie": f"{chatx.SESSION_COOKIE}={token}", "x-forwarded-proto": "https"}
        assert client.get("/api/me", headers=tossed).status_code == 401
        # Signing out clears the prefixed cookie, with the attributes a browser needs to take the clearing.
        out = client.post("/api/logout", headers=cookie)
        name, attributes = cookie_attributes(out.headers["set-cookie"])
        assert name == chatx.SECURE_SESSION_COOKIE and "secure" in attributes and attributes["path"] == "/"
        assert attributes["max-age"] == "0"


def test_trusted_proxies_and_allowed_hosts_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHATX_TRUSTED_PROXIES", "10.0.0.1, 10.1.0.0/16")
    monkeypatch.setenv("CHATX_ALLOWED_HOSTS", "chat.example, www.chat.example")
    settings = chatx.load_settings()
    assert settings.trusted_proxies == ("10.0.0.1", "10.1.0.0/16")
    assert settings.allowed_hosts == ("chat.example", "www.chat.example")
    monkeypatch.delenv("CHATX_TRUSTED_PROXIES")
    monkeypatch.delenv("CHATX_ALLOWED_HOSTS")
    defaults = chatx.load_settings()
    assert defaults.trusted_proxies == () and defaults.allowed_hosts == ("*",)


@pytest.mark.parametrize("path", ["/login", "/register", "/"])
def test_the_theme_cookie_is_written_into_the_page_only_when_it_names_a_theme(client, path):
    alice = sign_up(client, "alice")
    dark = client.get(path, headers={**alice.headers, "cookie": f"{alice.headers['cookie']}; chatx_theme=dark"})
    assert '<html lang="en" data-theme="dark">' in dark.text
    forged = f'dark"><script>alert(1)</script>'
    page = client.get(path, headers={**alice.headers, "cookie": f"{alice.headers['cookie']}; chatx_theme={forged}"})
    assert page.status_code == 200 and '<html lang="en">' in page.text and "alert(1)" not in page.text
