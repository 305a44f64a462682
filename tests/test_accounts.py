"""Accounts, sessions, settings and the HTTP error shape (docs/protocol.md: Accounts, HTTP endpoints,
Errors over HTTP, Settings)."""

from __future__ import annotations

import sqlite3

import pytest
from starlette.websockets import WebSocketDisconnect

import chatx
from conftest import PASSWORD, error_code, next_frame, sign_up


def test_register_signs_in_and_returns_the_user(client):
    response = client.post("/api/register", json={"username": "Alice", "password": PASSWORD})
    assert response.status_code == 201
    assert response.json() == {"user": {"id": response.json()["user"]["id"], "username": "Alice"}}
    assert client.get("/api/me").json()["user"]["username"] == "Alice"


def test_session_cookie_is_httponly_and_samesite_lax(client):
    response = client.post("/api/register", json={"username": "alice", "password": PASSWORD})
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/" in cookie


def test_usernames_are_unique_regardless_of_case(client):
    sign_up(client, "alice")
    response = client.post("/api/register", json={"username": "ALICE", "password": PASSWORD})
    assert response.status_code == 409 and error_code(response) == "username_taken"


@pytest.mark.parametrize("username", ["al", "a" * 33, "al ice", "alice!", "ålice", ""])
def test_register_rejects_invalid_usernames(client, username):
    response = client.post("/api/register", json={"username": username, "password": PASSWORD})
    assert response.status_code == 400 and error_code(response) == "invalid_username"


@pytest.mark.parametrize("password", ["short", "1234567", "x" * 1025])
def test_register_rejects_weak_passwords(client, password):
    response = client.post("/api/register", json={"username": "alice", "password": password})
    assert response.status_code == 400 and error_code(response) == "weak_password"


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'"alice"', b'{"username": "alice"}', b'{"username": 5, "password": "longenough"}',
     b'{"username": "alice", "password": null}', b'{"username": "alice", "password": "lone \\ud800 surrogate"}'],
)
def test_malformed_bodies_are_bad_request(client, body):
    for path in ("/api/register", "/api/login"):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400 and error_code(response) == "bad_request"


def test_a_form_post_is_refused_so_no_other_site_can_register_or_sign_in(client):
    response = client.post("/api/login", data={"username": "alice", "password": PASSWORD})
    assert response.status_code == 400 and error_code(response) == "bad_request"


def test_a_post_from_a_foreign_origin_is_forbidden(client):
    sign_up(client, "alice")
    response = client.post("/api/login", json={"username": "alice", "password": PASSWORD},
                           headers={"origin": "https://evil.example"})
    assert response.status_code == 403 and error_code(response) == "forbidden"
    same = client.post("/api/login", json={"username": "alice", "password": PASSWORD},
                       headers={"origin": "http://testserver"})
    assert same.status_code == 200


def test_login_matches_username_regardless_of_case(client):
    sign_up(client, "Alice")
    response = client.post("/api/login", json={"username": "aLICE", "password": PASSWORD})
    assert response.status_code == 200 and response.json()["user"]["username"] == "Alice"
    assert client.get("/api/me").status_code == 200


@pytest.mark.parametrize("username,password", [("alice", "wrong password"), ("nobody", PASSWORD)])
def test_login_with_bad_credentials_is_refused(client, username, password):
    sign_up(client, "alice")
    response = client.post("/api/login", json={"username": username, "password": password})
    assert response.status_code == 401 and error_code(response) == "bad_credentials"
    assert client.get("/api/me").status_code == 401


def test_me_without_a_session_is_not_authenticated(client):
    response = client.get("/api/me")
    assert response.status_code == 401 and error_code(response) == "not_authenticated"


def test_a_tampered_cookie_is_worthless(client):
    alice = sign_up(client, "alice")
    token, _, signature = alice.cookie.rpartition(".")
    forged = f"{token[:-1]}{'A' if token[-1] != 'A' else 'B'}.{signature}"
    response = client.get("/api/me", headers={"cookie": f"{chatx.SESSION_COOKIE}={forged}"})
    assert response.status_code == 401


def test_logout_makes_the_old_cookie_worthless_at_once(client):
    alice = sign_up(client, "alice")
    assert alice.get("/api/me").status_code == 200
    assert alice.post("/api/logout").status_code == 204
    assert alice.get("/api/me").status_code == 401
    assert client.post("/api/logout").status_code == 204  # also without a session


def test_logout_closes_that_sessions_sockets_with_4401_and_no_others(client):
    alice = sign_up(client, "alice")
    response = client.post("/api/login", json={"username": "alice", "password": PASSWORD})
    other_session = chatx.SESSION_COOKIE + "=" + response.cookies[chatx.SESSION_COOKIE]
    client.cookies.clear()
    with alice.ws() as ws, client.websocket_connect("/ws", headers={"cookie": other_session}) as other:
        next_frame(ws, "hello")
        next_frame(other, "hello")
        assert alice.post("/api/logout").status_code == 204
        with pytest.raises(WebSocketDisconnect) as closed:
            while True:
                ws.receive_json()
        assert closed.value.code == 4401
        other.send_json({"type": "ping"})
        assert next_frame(other) == {"type": "pong"}


@pytest.mark.real_hashes
def test_passwords_are_stored_only_as_slow_salted_hashes(client, sqlite_url):
    sign_up(client, "alice")
    sign_up(client, "bob")
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as db:
        hashes = [row[0] for row in db.execute("SELECT password_hash FROM chatx_users")]
    assert all(PASSWORD not in stored for stored in hashes)
    assert hashes[0] != hashes[1]  # same password, different salts
    assert all(stored.startswith("scrypt$16384$8$5$") for stored in hashes)
    assert chatx.check_password(PASSWORD, hashes[0]) and not chatx.check_password("nope nope", hashes[0])


def test_processes_sharing_a_database_accept_each_others_cookies(make_client):
    first, second = make_client(), make_client()
    alice = sign_up(first, "alice")
    response = second.get("/api/me", headers=alice.headers)
    assert response.status_code == 200 and response.json()["user"]["username"] == "alice"


def test_a_configured_secret_key_signs_cookies(make_client, sqlite_url):
    first = make_client(secret_key="one secret")
    alice = sign_up(first, "alice")
    other_key = make_client(secret_key="another secret")
    assert other_key.get("/api/me", headers=alice.headers).status_code == 401


def test_settings_come_from_keywords_then_environment_then_dotenv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("CHATX_SEND_RATE=7\nCHATX_SEND_BURST=8\nCHATX_PRESENCE_TTL=9\n")
    monkeypatch.setenv("CHATX_SEND_BURST", "80")
    monkeypatch.setenv("CHATX_ALLOWED_ORIGINS", "https://a.example, https://b.example/")
    monkeypatch.setenv("CHATX_TUNE_GC", "false")
    settings = chatx.load_settings(presence_ttl=90)
    assert settings.send_rate == 7 and settings.send_burst == 80 and settings.presence_ttl == 90
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.tune_gc is False
    assert settings.database_url == "sqlite:///chatx.db" and settings.broadcast_url == "memory://"
    with pytest.raises(TypeError):
        chatx.load_settings(no_such_setting=1)


def test_api_errors_are_json_never_html_or_tracebacks(client):
    missing = client.get("/api/nowhere")
    assert missing.status_code == 404 and error_code(missing) == "not_found"
    wrong_method = client.get("/api/register")
    assert wrong_method.status_code == 405 and error_code(wrong_method) == "method_not_allowed"
    too_large = client.post("/api/register", content=b"{" + b" " * 100_000 + b"}",
                            headers={"content-type": "application/json"})
    assert too_large.status_code == 413 and "error" in too_large.json()


def test_pages_send_a_strict_content_security_policy(client):
    page = client.get("/login")
    assert page.status_code == 200
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'self'" in policy and "unsafe-inline" not in policy


def test_the_chat_page_sends_signed_out_people_to_sign_in(client):
    response = client.get("/", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"].endswith("/login")
    alice = sign_up(client, "alice")
    page = alice.get("/")
    assert page.status_code == 200 and "alice" in page.text
