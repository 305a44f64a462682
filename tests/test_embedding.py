"""Embedding (README.md, Embedding; docs/protocol.md, Conventions): mounted at /chat in a host app, and several
independent apps in one process."""

from __future__ import annotations

import gc
import json
import re
import sqlite3
from contextlib import asynccontextmanager, closing
from pathlib import Path

import httpx2 as httpx
import pytest
from playwright.sync_api import expect
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

import chatx
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from conftest import PASSWORD, ROOT, ChatServer, ack_and_copy, free_port, next_frame, quiet, receive, sign_up
from test_browser import bubble, expect_presence, new_context, open_chat, send, start_chat  # noqa: F401


def host_app(chat: Starlette) -> Starlette:
    """The host code the README shows."""

    @asynccontextmanager
    async def lifespan(app):
        async with chat.router.lifespan_context(chat):
            yield

    async def home(request):
        return PlainTextResponse("host home")

    return Starlette(routes=[Route("/", home), Mount("/chat", app=chat)], lifespan=lifespan)


def test_mounted_at_chat_every_url_honours_the_prefix(sqlite_url):
    chat = chatx.create_app(database_url=sqlite_url)
    with TestClient(host_app(chat)) as client:
        assert client.get("/").text == "host home"
        assert client.get("/chat/healthz").json()["status"] == "ok"
        redirect = client.get("/chat/", follow_redirects=False)
        assert redirect.status_code == 303 and redirect.headers["location"].endswith("/chat/login")

        login_page = client.get("/chat/login").text
        urls = re.findall(r'(?:href|src|action)="([^"]+)"', login_page)
        assert urls and all(url.startswith(("/chat/", "http://testserver/chat/")) for url in urls), urls
        assert client.get(next(u for u in urls if "/static/" in u)).status_code == 200
        assert 'data-base="/chat"' in login_page

        alice = sign_up(client, "alice", prefix="/chat")
        response = client.post("/chat/api/register", json={"username": "bob", "password": PASSWORD})
        assert "path=/chat" in response.headers["set-cookie"].lower()
        assert alice.get("/chat/api/me").json()["user"]["username"] == "alice"
        assert alice.get("/chat/").status_code == 200
        with alice.ws(prefix="/chat") as ws:
            assert next_frame(ws, "hello")["user"]["username"] == "alice"
            ws.send_json({"type": "send", "to": "bob", "body": "from the mounted app", "client_id": "m1"})
            assert ack_and_copy(ws)[0]["message"]["body"] == "from the mounted app"


def test_two_apps_in_one_process_share_nothing(make_client, tmp_path):
    first = make_client(database_url=f"sqlite:///{tmp_path / 'one.db'}")
    second = make_client(database_url=f"sqlite:///{tmp_path / 'two.db'}")
    seen: dict[str, list[str]] = {"first": [], "second": []}
    first.app.state.chat.on_status_change(lambda u, s, t: seen["first"].append(u))
    second.app.state.chat.on_status_change(lambda u, s, t: seen["second"].append(u))

    alice = sign_up(first, "alice")
    assert second.post("/api/login", json={"username": "alice", "password": PASSWORD}).status_code == 401
    assert second.get("/api/me", headers=alice.headers).status_code == 401
    with alice.ws() as ws:
        next_frame(ws, "hello")  # her status changed, and the hook ran, before her hello
        assert seen == {"first": ["alice"], "second": []}
        # v2: her own presence frame goes to her partners only, so none comes here
        # (v1 sent it to her too, and this test waited for it).
        assert [f for f in quiet(ws) if f["type"] == "presence"] == []
    assert seen["second"] == []
    assert first.app.state.chat is not second.app.state.chat


def test_starting_freezes_the_collector_unless_the_host_says_tune_gc_false(make_client, tmp_path):
    gc.unfreeze()
    default = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        make_client(database_url=f"sqlite:///{tmp_path}/host.db", tune_gc=False)
        assert gc.get_freeze_count() == 0 and gc.get_threshold() == (700, 10, 10)

        make_client(database_url=f"sqlite:///{tmp_path}/own.db")
        assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] == 10_000
    finally:
        gc.unfreeze()
        gc.set_threshold(*default)


# ---- docs/embedding.md, run as written ------------------------------------------------

GUIDE = ROOT / "docs" / "embedding.md"
GUIDE_FILE = re.compile(r"<!-- file: (\S+) -->\n```\w*\n(.*?)\n```", re.S)
HOST_SECRETS = {"SESSION_SECRET": "the host's session secret", "CHATX_PRESENCE_GRACE": "0"}
JWT_SECRET = "the secret the host and ChatX share, 32 bytes or more"


def write_guide_files(directory: Path) -> list[str]:
    """The files docs/embedding.md marks with `<!-- file: name -->`, each
    written whole (the blocks of one name joined in order); their names."""
    files: dict[str, list[str]] = {}
    for name, text in GUIDE_FILE.findall(GUIDE.read_text()):
        files.setdefault(name, []).append(text)
    for name, blocks in files.items():
        (directory / name).write_text("\n\n".join(blocks) + "\n")
    return sorted(files)


def host_sign_in(context, base: str, username: str, start: str):
    """Open `start` signed out; the host's sign-in page comes, then `start` again."""
    page = context.new_page()
    page.goto(base + start)
    expect(page).to_have_url(base + "/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(f"{username}'s password")
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(base + start)
    return page


def test_the_guide_marks_every_file_of_its_examples():
    blocks = GUIDE_FILE.findall(GUIDE.read_text())
    assert sorted({name for name, _ in blocks}) == ["chat_page.html", "host_app.py", "token_host.py"]
    assert [name for name, _ in blocks].count("host_app.py") == 2  # the app, then its helper bot


def test_the_guide_s_fastapi_app_lets_its_users_chat_with_no_chatx_password(tmp_path, new_context):
    write_guide_files(tmp_path)
    database = tmp_path / "chat.db"
    host = ChatServer({**HOST_SECRETS, "CHATX_DATABASE_URL": f"sqlite:///{database}"}, tmp_path,
                      app="host_app:app", ready="/chat/healthz")
    host.start()
    try:
        chat = host.base + "/chat"
        assert httpx.get(chat + "/api/me", timeout=10).status_code == 401
        page = httpx.get(chat + "/", timeout=10)
        assert page.status_code == 303 and page.headers["location"] == "/login"
        for method, path in [("GET", "/login"), ("GET", "/register"), ("POST", "/api/register"),
                             ("POST", "/api/login"), ("POST", "/api/logout"), ("POST", "/api/password"),
                             ("DELETE", "/api/me")]:
            response = httpx.request(method, chat + path, json={"username": "mallory", "password": PASSWORD},
                                     timeout=10)
            assert response.status_code == 404, (method, path)
        with pytest.raises(InvalidStatus) as refused:
            connect(f"{host.ws_base}/chat/ws", open_timeout=10)
        assert refused.value.response.status_code == 403

        alice_page = host_sign_in(new_context(), host.base, "alice", "/chat/")
        bob_context = new_context()
        bob_page = host_sign_in(bob_context, host.base, "bob", "/chat/")
        expect(alice_page.get_by_role("button", name="Sign out")).to_be_hidden()
        start_chat(alice_page, "bob")
        send(alice_page, "hello from the host's alice")
        expect_presence(alice_page, "bob", "online")
        open_chat(bob_page, "alice")
        expect(bubble(bob_page, "hello from the host's alice")).to_be_visible()
        send(bob_page, "hello back")
        expect(bubble(alice_page, "hello back")).to_be_visible()

        open_chat(alice_page, "helper")  # it greeted her when she came online
        expect(bubble(alice_page, "Hi! Ask me anything.")).to_have_count(1)
        send(alice_page, "is anyone there?")
        expect(bubble(alice_page, "You asked: is anyone there?")).to_be_visible()

        bob_context.close()
        expect_presence(alice_page, "bob", "offline")
    finally:
        host.stop()
    with closing(sqlite3.connect(database)) as db:
        users = dict(db.execute("SELECT username, password_hash FROM chatx_users").fetchall())
    assert users == {"alice": chatx.NO_PASSWORD, "bob": chatx.NO_PASSWORD, "helper": chatx.NO_PASSWORD}


def test_the_guide_s_page_on_another_origin_chats_through_chatx_with_a_token_from_its_host(tmp_path, new_context):
    write_guide_files(tmp_path)
    host_port = free_port()
    chat = ChatServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}", "CHATX_JWT_SECRET": JWT_SECRET,
                       "CHATX_ALLOWED_ORIGINS": f"http://127.0.0.1:{host_port}", "CHATX_REGISTRATION": "closed"},
                      tmp_path)
    host = ChatServer({**HOST_SECRETS, "CHATX_URL": f"http://127.0.0.1:{chat.port}", "CHATX_JWT_SECRET": JWT_SECRET},
                      tmp_path, port=host_port, app="token_host:app", ready="/login")
    chat.start()
    host.start()
    try:
        sockets = []
        context = new_context()
        context.on("page", lambda page: page.on("websocket", lambda ws: sockets.append(ws.url)))
        alice_page = host_sign_in(context, host.base, "alice", "/")
        with httpx.Client(base_url=host.base, timeout=10) as bob_browser:
            assert bob_browser.post("/login", data={"username": "bob", "password": "bob's password"}).status_code == 303
            token = bob_browser.get("/chat-token").json()["token"]
        with connect(f"{chat.ws_base}/ws?token={token}", open_timeout=10) as bob:
            assert receive(bob, "hello")["user"]["username"] == "bob"
            alice_page.get_by_role("textbox", name="To").fill("bob")
            alice_page.get_by_role("textbox", name="Message").fill("hello across origins")
            alice_page.get_by_role("button", name="Send").click()
            message = receive(bob, "message")["message"]
            assert (message["from"], message["body"]) == ("alice", "hello across origins")
            bob.send(json.dumps({"type": "send", "to": "alice", "body": "<b>hi</b> alice", "client_id": "b1"}))
            log = alice_page.get_by_role("list", name="Messages")
            expect(log.get_by_text("bob: <b>hi</b> alice", exact=True)).to_be_visible()
            expect(log.get_by_text("alice: hello across origins", exact=True)).to_be_visible()
        alice_page.reload()  # a fresh page lists the conversations through the API, from another origin
        expect(log.get_by_text("bob: <b>hi</b> alice", exact=True)).to_be_visible()
        expect(log.get_by_text("alice: hello across origins", exact=True)).to_have_count(0)
        assert sockets and all(url.startswith(f"{chat.ws_base}/ws?token=") for url in sockets)
        refused = httpx.get(f"{chat.base}/api/me", headers={"authorization": "Bearer " + token + "x"}, timeout=10)
        assert refused.status_code == 401
    finally:
        host.stop()
        chat.stop()
    assert token not in chat.log.read_text() and "[accepted]" in chat.log.read_text()
