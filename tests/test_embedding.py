"""Embedding (README.md, Embedding; docs/protocol.md, Conventions): mounted at /chat in a host app, and several
independent apps in one process."""

from __future__ import annotations

import gc
import re
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

import chatx
from conftest import PASSWORD, next_frame, quiet, sign_up


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
            assert next_frame(ws, "ack")["message"]["body"] == "from the mounted app"


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
