"""Host identity (docs/protocol.md, Host identity and tokens): the host names the signed-in person
(`authenticate`), or a token it signed (CHATX_JWT_SECRET) does; the
server-side API (`chat.send`, `chat.on_message`)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time

import httpx2 as httpx
import jwt
import pytest
from starlette.websockets import WebSocketDisconnect
from websockets.sync.client import connect

import chatx
from conftest import (PASSWORD, ChatServer, ack_and_copy, acked, error_code, next_frame, quiet, receive, settle, sign_up,
                      wait_until)

SECRET = "a host's secret of at least thirty-two bytes"
EVIL = {"origin": "http://evil.example"}


def host_named(connection):
    """The host's own sign-in, as tests model it: a header its proxy sets."""
    return connection.headers.get("x-host-user")


async def host_named_async(connection):
    await asyncio.sleep(0)
    return connection.headers.get("x-host-user")


def as_host_user(name: str) -> dict[str, str]:
    return {"x-host-user": name}


def token(sub: str | None = "alice", expires_in: float | None = 300, key: str = SECRET,
          algorithm: str = "HS256") -> str:
    claims: dict = {} if sub is None else {"sub": sub}
    if expires_in is not None:
        claims["exp"] = int(time.time() + expires_in)
    return jwt.encode(claims, key if algorithm != "none" else None, algorithm=algorithm)


def bearer(value: str) -> dict[str, str]:
    return {"authorization": f"Bearer {value}"}


def refused_handshake(client, path: str, headers: dict[str, str] | None = None) -> int | None:
    """403 for a handshake closed before it was accepted (the status uvicorn
    answers; the TestClient reports a close); None for an accepted one."""
    try:
        with client.websocket_connect(path, headers=headers or {}):
            return None
    except WebSocketDisconnect as closed:
        assert closed.code == 1000
        return 403


@pytest.fixture(params=[host_named, host_named_async], ids=["plain", "async"])
def hosted(make_client, request):
    return make_client(authenticate=request.param)


# ---- authenticate ----------------------------------------------------------------


def test_people_the_host_names_chat_with_no_chatx_account_of_their_own(hosted):
    assert hosted.get("/api/me", headers=as_host_user("alice")).json()["user"]["username"] == "alice"
    found = hosted.get("/api/users?q=a", headers=as_host_user("Bob")).json()["users"]
    assert [user["username"] for user in found] == ["alice"]
    with hosted.websocket_connect("/ws", headers=as_host_user("alice")) as alice:
        assert next_frame(alice, "hello")["user"]["username"] == "alice"
        with hosted.websocket_connect("/ws", headers=as_host_user("Bob")) as bob:
            next_frame(bob, "hello")
            sent = acked(alice, "bob", "hi from the host's alice", "h1")
            assert next_frame(bob, "message")["message"] == sent
            presence = next_frame(alice, "presence")
            assert (presence["username"], presence["status"]) == ("Bob", "online")
            bob.send_json({"type": "send", "to": "alice", "body": "hi back", "client_id": "b1"})
            assert ack_and_copy(bob)[0]["message"]["body"] == "hi back"
            assert next_frame(alice, "message")["message"]["body"] == "hi back"
    page = hosted.get("/", headers=as_host_user("alice"))
    assert page.status_code == 200 and "data-hosted" in page.text
    conversations = hosted.get("/api/conversations", headers=as_host_user("ALICE")).json()["conversations"]
    assert [c["last_message"]["body"] for c in conversations] == ["hi back"]
    with sqlite3.connect(hosted.app.state.chat.settings.database_url.removeprefix("sqlite:///")) as db:
        hashes = [row[0] for row in db.execute("SELECT password_hash FROM chatx_users")]
    assert hashes == [chatx.NO_PASSWORD, chatx.NO_PASSWORD]


def test_chatx_s_own_account_endpoints_and_pages_answer_404_where_the_host_names_people(hosted):
    alice = as_host_user("alice")
    for method, path in [("POST", "/api/register"), ("POST", "/api/login"), ("POST", "/api/logout"),
                         ("POST", "/api/password"), ("DELETE", "/api/me"), ("GET", "/login"),
                         ("GET", "/register")]:
        response = hosted.request(method, path, headers=alice, json={"username": "alice", "password": PASSWORD})
        assert response.status_code == 404 and error_code(response) == "not_found", (method, path)
    assert hosted.get("/api/me", headers=alice).status_code == 200
    paths = hosted.get("/api/openapi.json").json()["paths"]
    assert "/api/register" not in paths and "/api/conversations" in paths


def test_an_unnamed_person_gets_401_from_the_api_and_page_and_403_at_the_socket(hosted, make_client, caplog):
    for path in ("/api/me", "/api/conversations", "/api/users?q=a", "/api/blocks"):
        response = hosted.get(path)
        assert response.status_code == 401 and error_code(response) == "not_authenticated", path
    page = hosted.get("/", follow_redirects=False)
    assert page.status_code == 401 and error_code(page) == "not_authenticated"
    assert refused_handshake(hosted, "/ws") == 403

    with_login = make_client(authenticate=host_named, login_url="https://host.example/sign-in?next=/chat/")
    redirect = with_login.get("/", follow_redirects=False)
    assert redirect.status_code == 303 and redirect.headers["location"] == "https://host.example/sign-in?next=/chat/"
    assert with_login.get("/", headers=as_host_user("alice"), follow_redirects=False).status_code == 200


@pytest.mark.parametrize("name", ["al", "a" * 33, "al ice", "alice<script>", "", "ålice"])
def test_a_name_the_host_gives_that_breaks_the_rules_is_403_logged_and_never_stored(hosted, name, caplog):
    caplog.set_level(logging.WARNING, logger="chatx")
    headers = {"x-host-user": name.encode()}
    for path in ("/api/me", "/"):
        response = hosted.get(path, headers=headers)
        assert response.status_code == 403 and error_code(response) == "invalid_username", path
    assert refused_handshake(hosted, "/ws", headers) == 403
    refusals = [record.getMessage() for record in caplog.records if "refused the username" in record.getMessage()]
    assert len(refusals) == 3 and repr(name.encode().decode("latin-1")) in refusals[0]
    assert hosted.get("/api/users?q=a", headers=as_host_user("zed")).json()["users"] == []


def test_a_name_that_looks_like_another_user_s_is_refused_not_merged(hosted):
    assert hosted.get("/api/me", headers=as_host_user("alice")).status_code == 200
    response = hosted.get("/api/me", headers=as_host_user("aIice"))
    assert response.status_code == 403 and error_code(response) == "username_taken"


def test_origin_checks_blocks_and_limits_hold_where_the_host_names_people(make_client):
    hosted = make_client(authenticate=host_named, max_sockets_per_user=1)
    alice, bob = as_host_user("alice"), as_host_user("bob")
    hosted.get("/api/me", headers=bob)
    refused = hosted.put("/api/blocks/bob", headers={**alice, **EVIL})
    assert refused.status_code == 403 and error_code(refused) == "forbidden"
    assert refused_handshake(hosted, "/ws", {**alice, **EVIL}) == 403
    assert hosted.put("/api/blocks/bob", headers={**alice, "origin": "http://testserver"}).status_code == 204
    with hosted.websocket_connect("/ws", headers=bob) as bob_ws:
        next_frame(bob_ws, "hello")
        bob_ws.send_json({"type": "send", "to": "alice", "body": "hello?", "client_id": "b1"})
        assert next_frame(bob_ws, "error")["code"] == "blocked"
        assert refused_handshake(hosted, "/ws", bob) == 403  # one socket each


def test_a_chatx_session_cookie_comes_before_the_host_s_name(make_client):
    plain = make_client()
    carol = sign_up(plain, "carol")
    both = make_client(database_url=plain.app.state.chat.settings.database_url, authenticate=host_named)
    me = both.get("/api/me", headers={**carol.headers, **as_host_user("dave")})
    assert me.json()["user"]["username"] == "carol"
    assert both.get("/api/me", headers=as_host_user("dave")).json()["user"]["username"] == "dave"


def test_deleting_a_named_person_s_account_closes_their_sockets(hosted):
    chat = hosted.app.state.chat
    with hosted.websocket_connect("/ws", headers=as_host_user("alice")) as alice:
        user = chatx.User(next_frame(alice, "hello")["user"]["id"], "alice")
        hosted.portal.call(chat.accounts.delete, user)  # as `python -m chatx delete-user alice` does
        with pytest.raises(WebSocketDisconnect) as closed:
            while True:
                alice.receive_json()
        assert closed.value.code == chatx.CLOSE_REVOKED
    assert hosted.get("/api/me", headers=as_host_user("alice")).status_code == 200  # made anew


# ---- signed tokens ---------------------------------------------------------------


@pytest.fixture
def signed(make_client):
    return make_client(jwt_secret=SECRET)


def test_a_signed_token_names_its_subject_on_the_api_and_the_socket_and_makes_them_on_first_sight(signed):
    me = signed.get("/api/me", headers=bearer(token("alice")))
    assert me.status_code == 200 and me.json()["user"]["username"] == "alice"
    with signed.websocket_connect(f"/ws?token={token('bob')}&since=0") as ws:
        hello = next_frame(ws, "hello")
        assert hello["user"]["username"] == "bob" and hello["seq"] == 0
        assert acked(ws, "alice", "token-borne", "t1")["from"] == "bob"
    for password in ("", "any password at all"):  # she has none
        refused = signed.post("/api/login", json={"username": "alice", "password": password})
        assert refused.status_code == 401 and error_code(refused) == "bad_credentials"


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # HS512 with the HS256 secret
@pytest.mark.parametrize("bad", ["expired", "wrong key", "alg none", "no exp", "no sub", "HS512", "garbage",
                                 "sub not a string"])
def test_a_bad_token_is_401_on_the_api_and_403_at_the_socket(signed, bad):
    value = {
        "expired": lambda: token(expires_in=-10),
        "wrong key": lambda: token(key="another secret of at least thirty-two bytes"),
        "alg none": lambda: token(algorithm="none"),
        "no exp": lambda: token(expires_in=None),
        "no sub": lambda: token(sub=None),
        "HS512": lambda: token(algorithm="HS512"),
        "garbage": lambda: "not.a.token",
        "sub not a string": lambda: jwt.encode({"sub": 7, "exp": int(time.time()) + 60}, SECRET, "HS256"),
    }[bad]()
    response = signed.get("/api/me", headers=bearer(value))
    assert response.status_code == 401 and error_code(response) == "not_authenticated"
    assert refused_handshake(signed, f"/ws?token={value}") == 403
    assert refused_handshake(signed, "/ws", bearer(value)) == 403
    assert signed.get("/api/me", headers=bearer(token("alice"))).status_code == 200  # the good one still works


def test_a_secret_too_short_to_resist_guessing_is_refused_at_start():
    with pytest.raises(ValueError, match="at least 32 bytes"):
        chatx.create_app(jwt_secret="s" * 31)
    assert chatx.create_app(jwt_secret="s" * 32).state.chat.settings.jwt_secret == "s" * 32


def test_tokens_are_refused_where_no_secret_is_set(client):
    assert client.get("/api/me", headers=bearer(token("alice"))).status_code == 401
    assert refused_handshake(client, f"/ws?token={token('alice')}") == 403


def test_a_bearer_request_needs_no_origin_check_but_a_cookie_request_still_does(signed):
    carol = sign_up(signed, "carol")
    signed.get("/api/me", headers=bearer(token("bob")))
    assert signed.put("/api/blocks/bob", headers={**bearer(token("alice")), **EVIL}).status_code == 204
    refused = signed.put("/api/blocks/bob", headers={**carol.headers, **EVIL})
    assert refused.status_code == 403 and error_code(refused) == "forbidden"
    assert [u["username"] for u in signed.get("/api/blocks", headers=bearer(token("alice"))).json()["blocks"]] \
        == ["bob"]


def test_a_cookie_the_host_s_name_and_a_token_each_come_in_that_order(make_client):
    app = make_client(jwt_secret=SECRET, authenticate=host_named)
    assert app.get("/api/me", headers={**as_host_user("dave"), **bearer(token("erin"))}).json()["user"][
        "username"] == "dave"
    assert app.get("/api/me", headers=bearer(token("erin"))).json()["user"]["username"] == "erin"
    with app.websocket_connect(f"/ws?token={token('erin')}") as ws:
        assert next_frame(ws, "hello")["user"]["username"] == "erin"


def test_the_token_of_a_socket_never_reaches_the_server_log(tmp_path):
    server = ChatServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}", "CHATX_JWT_SECRET": SECRET},
                        tmp_path)
    server.start()
    try:
        good, expired = token("alice"), token("alice", expires_in=-5)
        with connect(f"{server.ws_base}/ws?since=0&token={good}", open_timeout=10) as ws:
            assert receive(ws, "hello")["user"]["username"] == "alice"
        with pytest.raises(Exception):
            connect(f"{server.ws_base}/ws?token={expired}", open_timeout=10)
        assert httpx.get(f"{server.base}/api/me", headers=bearer(good), timeout=10).status_code == 200
    finally:
        server.stop()
    log = server.log.read_text()
    assert '"WebSocket /ws?since=0" [accepted]' in log and '"WebSocket /ws" 403' in log, log
    assert good not in log and expired not in log and good.split(".")[2] not in log


# ---- the server-side API -----------------------------------------------------------


def test_chat_send_stores_and_delivers_as_a_send_frame_would(make_client):
    client = make_client(authenticate=host_named)
    chat = client.app.state.chat
    client.get("/api/me", headers=as_host_user("bob"))
    with client.websocket_connect("/ws", headers=as_host_user("bob")) as bob:
        next_frame(bob, "hello")
        sent = client.portal.call(chat.send, "helpdesk", "BOB", "Your order shipped.", "order-17")
        assert sent["from"] == "helpdesk" and sent["to"] == "bob" and sent["client_id"] == "order-17"
        frame = next_frame(bob, "message")
        assert frame["message"] == sent and frame["seq"] == 1
        again = client.portal.call(chat.send, "helpdesk", "bob", "Your order shipped.", "order-17")
        assert again == sent
        assert [f for f in quiet(bob) if f["type"] != "presence"] == []  # the retry delivered nothing
        history = client.get("/api/conversations/helpdesk/messages", headers=as_host_user("bob")).json()
        assert history["messages"] == [sent]

        def refused(*args, **kwargs) -> str:
            with pytest.raises(chatx.ChatError) as caught:
                client.portal.call(lambda: chat.send(*args, **kwargs))
            return caught.value.code

        assert refused("helpdesk", "bob", "Something else", "order-17") == "invalid_field"
        assert refused("helpdesk", "nobody", "hi") == "unknown_user"
        assert refused("helpdesk", "bob", " \u200b ") == "empty_body"
        assert refused("helpdesk", "bob", "x" * 4001) == "body_too_long"
        assert refused("helpdesk", "bob", "hi", client_id="") == "invalid_field"
        assert refused("help desk", "bob", "hi") == "invalid_username"
        assert refused("helpdesk", "bob", "hi", attachment="a1") == "unknown_attachment"
        assert client.put("/api/blocks/helpdesk", headers={**as_host_user("bob"),
                                                          "origin": "http://testserver"}).status_code == 204
        assert refused("helpdesk", "bob", "more news") == "blocked"
        assert [f for f in quiet(bob) if f["type"] != "presence"] == []


def test_on_message_runs_once_per_stored_message_under_concurrent_sends(make_client):
    client = make_client(authenticate=host_named, send_rate=1000, send_burst=1000)
    chat = client.app.state.chat
    plain, awaited = [], []

    async def later(message):
        await asyncio.sleep(0)
        awaited.append(message["id"])

    chat.on_message(lambda message: plain.append(message["id"]))
    chat.on_message(later)
    client.get("/api/me", headers=as_host_user("bob"))
    with client.websocket_connect("/ws", headers=as_host_user("alice")) as alice:
        next_frame(alice, "hello")
        for index in range(40):  # each twice: a retry stores nothing and runs no callback
            for _ in range(2):
                alice.send_json({"type": "send", "to": "bob", "body": f"socket {index}", "client_id": f"s{index}"})

        async def server_sends():
            return await asyncio.gather(*[chat.send("bob", "alice", f"api {index % 20}", f"a{index % 20}")
                                          for index in range(30)], return_exceptions=True)

        results = client.portal.call(server_sends)
        assert all(isinstance(result, dict) for result in results), results
        settle(alice)
    ids = client.get("/api/conversations/bob/messages?limit=200", headers=as_host_user("alice")).json()["messages"]
    stored = sorted(message["id"] for message in ids)
    assert len(stored) == 60
    wait_until(lambda: len(awaited) >= 60, what="the async callbacks")
    assert sorted(plain) == stored and sorted(awaited) == stored


def test_a_callback_that_raises_is_logged_and_changes_nothing_else(make_client, caplog):
    client = make_client(authenticate=host_named)
    chat = client.app.state.chat
    seen = []

    def broken(message):
        raise RuntimeError("the host's bug")

    chat.on_message(broken)
    chat.on_message(lambda message: seen.append(message["body"]))
    client.get("/api/me", headers=as_host_user("bob"))
    with client.websocket_connect("/ws", headers=as_host_user("alice")) as alice:
        next_frame(alice, "hello")
        assert acked(alice, "bob", "first", "c1")["body"] == "first"
        assert client.portal.call(chat.send, "bob", "alice", "second")["body"] == "second"
        assert next_frame(alice, "message")["message"]["body"] == "second"
        assert acked(alice, "bob", "third", "c3")["body"] == "third"
    wait_until(lambda: len(seen) == 3, what="the good callback")
    assert seen == ["first", "second", "third"]
    failures = [r for r in caplog.records if r.getMessage().startswith("callback") and r.exc_info]
    assert len(failures) == 3 and "the host's bug" in str(failures[0].exc_info[1])


def test_chat_send_on_one_process_reaches_a_socket_on_another_and_on_message_runs_where_it_was_stored(
        make_client, tmp_path, redis_server):
    database = f"sqlite:///{tmp_path / 'shared.db'}"
    here = make_client(database_url=database, broadcast_url=redis_server.url, jwt_secret=SECRET)
    chat = here.app.state.chat
    seen_here = []
    chat.on_message(lambda message: seen_here.append(message["body"]))
    there = ChatServer({"CHATX_DATABASE_URL": database, "CHATX_BROADCAST_URL": redis_server.url,
                        "CHATX_JWT_SECRET": SECRET}, tmp_path)
    there.start()
    try:
        with connect(f"{there.ws_base}/ws?token={token('bob')}", open_timeout=10) as bob:
            receive(bob, "hello")
            sent = here.portal.call(chat.send, "alice", "bob", "across processes", "x1")
            frame = receive(bob, "message")
            assert frame["message"] == sent and frame["seq"] == 1
            bob.send('{"type": "send", "to": "alice", "body": "stored there", "client_id": "y1"}')
            assert receive(bob, "ack")["message"]["body"] == "stored there"
    finally:
        there.stop()
    assert seen_here == ["across processes"]  # the reply was stored, and its callbacks run, on the other process


def test_pages_of_allowed_origins_may_read_answers_to_bearer_requests_and_no_others(make_client):
    client = make_client(jwt_secret=SECRET, allowed_origins="https://app.example")
    preflight = {"access-control-request-method": "PUT", "access-control-request-headers": "authorization"}
    allowed = client.options("/api/blocks/bob", headers={"origin": "https://app.example", **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in allowed.headers  # a cookie's answers stay unreadable
    refused = client.options("/api/blocks/bob", headers={"origin": "https://evil.example", **preflight})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    answer = client.get("/api/conversations", headers={"origin": "https://app.example", **bearer(token("alice"))})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://app.example"
    without_tokens = make_client(database_url=client.app.state.chat.settings.database_url,
                                 allowed_origins="https://app.example")
    assert "access-control-allow-origin" not in without_tokens.options(
        "/api/blocks/bob", headers={"origin": "https://app.example", **preflight}).headers
