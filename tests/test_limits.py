"""Issue 16, availability: the limits that keep one account, or a client with
no account, from hurting everyone else (CONTRACT §7). Each test also checks
that the others noticed nothing: their sends are acked, /healthz answers,
their sockets stay open."""

from __future__ import annotations

import base64
import json
import os
import re
import select
import socket
import statistics
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx2 as httpx
import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

import chatx
from conftest import (acked, error_code, PASSWORD, ChatServer, drain, make_partners, next_frame, quiet, receive, remote_sign_up,
                      sign_up, wait_until)


pytestmark = pytest.mark.usefixtures("cheap_hashes")
ANY_STREAM_OR_TYPING = ("message", "read", "edit", "delete", "typing")




def login(client: TestClient, username: str, password: str = PASSWORD, headers: dict | None = None):
    client.cookies.clear()
    response = client.post("/api/login", json={"username": username, "password": password}, headers=headers or {})
    client.cookies.clear()
    return response


@contextmanager
def from_address(database_url: str, host: str, **settings: Any) -> Iterator[TestClient]:
    """Another process on the same database, whose clients come from `host`."""
    with TestClient(chatx.create_app(database_url=database_url, **settings), client=(host, 50000)) as client:
        yield client




def silent(ws) -> list[dict[str, Any]]:
    return [frame for frame in quiet(ws) if frame["type"] != "presence"]


def retry_after(response) -> int:
    value = int(response.headers["retry-after"])
    assert value > 0
    return value


def remote_acked(ws, to: str, body: str, client_id: str) -> dict[str, Any]:
    ws.send(json.dumps({"type": "send", "to": to, "body": body, "client_id": client_id}))
    return receive(ws, "ack", timeout=20)["message"]


# ---- sockets per user ------------------------------------------------------------------------------


def test_the_21st_socket_is_refused_and_the_first_20_keep_working(database_url, make_client):
    assert chatx.load_settings().max_sockets_per_user == 20
    here = make_client(database_url=database_url)
    # Another process on the same database: it counts the sockets of every process.
    # (In-process apps share no broadcast, so the sockets all live on `here`.)
    there = make_client(database_url=database_url)
    alice, bob = sign_up(here, "alice"), sign_up(here, "bob")
    alice_there = same_session_on(there, alice)
    with ExitStack() as stack:
        bob_ws = stack.enter_context(bob.ws())
        next_frame(bob_ws, "hello")
        sockets = [stack.enter_context(alice.ws()) for n in range(20)]
        for ws in sockets:
            next_frame(ws, "hello")
        for person in (alice, alice_there):  # one more, on either process, is refused
            assert socket_refused(person), f"a 21st socket was accepted on {person.client}"
        # The 20 live on: each gets bob's message, and alice sends from one.
        assert acked(bob_ws, "alice", "to all twenty", "s-1", others=ANY_STREAM_OR_TYPING)["to"] == "alice"
        for ws in sockets:
            assert next_frame(ws, "message")["message"]["body"] == "to all twenty"
        assert acked(sockets[-1], "bob", "from the twentieth", "s-2", others=ANY_STREAM_OR_TYPING)["body"] == "from the twentieth"
        for ws in sockets[:-1]:
            assert next_frame(ws, "message")["message"]["body"] == "from the twentieth"
        assert next_frame(bob_ws, "message")["message"]["body"] == "from the twentieth"
        for ws in sockets:
            assert silent(ws) == []
        assert here.get("/healthz").status_code == 200 and there.get("/healthz").status_code == 200
        # A socket closed frees its place.
        sockets.pop().close()
        replacement = wait_until(lambda: open_or_none(alice), timeout=10, what="a freed place to be usable")
        stack.enter_context(replacement)
        assert socket_refused(alice)
        assert silent(bob_ws) == []


def same_session_on(client: TestClient, person):
    """The same session, used through another process."""
    return type(person)(client, person.username, person.cookie, person.id)


def socket_refused(person) -> bool:
    """Refused at the handshake, or closed with 4429 before its hello."""
    try:
        with person.ws() as ws:
            ws.receive_json()
    except WebSocketDenialResponse:
        return True
    except WebSocketDisconnect as closed:
        return closed.code in (1000, 1008, chatx.CLOSE_TOO_MANY)
    return False


def open_or_none(person):
    context = person.ws()
    try:
        ws = context.__enter__()
        first = ws.receive_json()
    except (WebSocketDisconnect, WebSocketDenialResponse):
        return None
    assert first["type"] == "hello"
    return _Entered(context)


class _Entered:
    """An entered websocket context that an ExitStack can close."""

    def __init__(self, context) -> None:
        self.context = context

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.context.__exit__(None, None, None)


# ---- a reader that stops reading --------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def closed_with(server: ChatServer, code: int) -> float:
    text = httpx.get(f"{server.base}/metrics", timeout=5).text
    found = re.search(rf'chatx_sockets_closed_total{{code="{code}"}} ([0-9.e+]+)', text)
    return float(found.group(1)) if found else 0.0


def stalled_socket(server: ChatServer, cookie: str, query: str) -> socket.socket:
    """A websocket that completes its handshake and never reads again, with a
    receive buffer as small as the kernel allows: a client on a dead link."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    raw.sendall((f"GET /ws{query} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                 f"Cookie: {chatx.SESSION_COOKIE}={cookie}\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += raw.recv(1)  # one byte at a time: nothing past the head is read
    assert head.startswith(b"HTTP/1.1 101"), head
    return raw


def close_code_of(raw: socket.socket, timeout: float = 15) -> int | None:
    """Read what the server sent; the code of its close frame, or None if it cut the connection instead."""
    raw.settimeout(timeout)
    data = b""
    try:
        while chunk := raw.recv(1 << 20):
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    position = 0
    while position + 2 <= len(data):
        opcode, length = data[position] & 0x0F, data[position + 1] & 0x7F
        header = 2
        if length == 126:
            length, header = int.from_bytes(data[position + 2:position + 4], "big"), 4
        elif length == 127:
            length, header = int.from_bytes(data[position + 2:position + 10], "big"), 10
        if opcode == 0x8 and length >= 2:
            return int.from_bytes(data[position + header:position + header + 2], "big")
        position += header + length
    return None


BIG_BODY = "\U0001F600" * chatx.BODY_MAX  # 4000 characters, 16 kB of UTF-8
STORED = 510
STALLED = 20


# What one reader that takes nothing may hold: a backlog of 1 MiB, a page of
# its stream read from the database, what the transport buffers. v2 held up
# to 1,000 frames (16 MB of these) before its 1013.
HELD_PER_READER = 2 * 2**20
LIVE = 1100  # sent to the stalled readers while they take nothing: 17.6 MB each


def test_readers_that_stop_reading_hold_a_bounded_backlog_and_are_closed_with_1013_after_10_s(tmp_path):
    server = ChatServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}", "CHATX_METRICS": "true",
                         "CHATX_SEND_RATE": "10000", "CHATX_SEND_BURST": "10000"}, tmp_path)
    server.start()
    raws: list[socket.socket] = []
    try:
        alice, bob, carol = (remote_sign_up(server, name) for name in ("alice", "bob", "carol"))
        # alice's stream: 510 messages of 16 kB each (8 MB).
        with bob.ws(server) as ws:
            receive(ws, "hello")
            for n in range(STORED):
                ws.send(json.dumps({"type": "send", "to": "alice", "body": BIG_BODY, "client_id": f"big-{n}"}))
            acks = 0
            while acks < STORED:
                acks += receive(ws, timeout=30)["type"] == "ack"
        # Warm up: one reader takes the whole replay, so what is measured next is the stalled ones.
        with alice.ws(server, after=0) as ws:
            receive(ws, "hello")
            for _ in range(STORED):
                receive(ws, "message", timeout=30)
        time.sleep(0.5)
        baseline = rss_bytes(server.process.pid)

        with bob.ws(server) as bob_ws, carol.ws(server) as carol_ws:
            receive(bob_ws, "hello")
            receive(carol_ws, "hello")
            raws = [stalled_socket(server, alice.cookie, "?after=0") for _ in range(STALLED)]
            stalled_at = time.monotonic()
            # Live messages for them on top of the replay: v2 queued them until 1013.
            peak, early = baseline, 0.0

            def watch() -> None:  # a reader is closed only after SEND_STALL_S of taking nothing
                nonlocal peak, early
                peak = max(peak, rss_bytes(server.process.pid))
                if time.monotonic() - stalled_at < chatx.SEND_STALL_S - 1:
                    early = closed_with(server, 1013)

            for start in range(0, LIVE, 100):  # in bursts whose acks bob's socket holds
                for n in range(start, start + 100):
                    bob_ws.send(json.dumps({"type": "send", "to": "alice", "body": BIG_BODY, "client_id": f"live-{n}"}))
                acks = 0
                while acks < 100:
                    acks += receive(bob_ws, timeout=30)["type"] == "ack"
                    peak = max(peak, rss_bytes(server.process.pid))
                watch()
            sent_in = time.monotonic() - stalled_at
            while time.monotonic() - stalled_at < chatx.SEND_STALL_S - 1:
                watch()
                time.sleep(0.2)
            deadline = stalled_at + chatx.SEND_STALL_S + 10
            while closed_with(server, 1013) < STALLED and time.monotonic() < deadline:
                peak = max(peak, rss_bytes(server.process.pid))
                time.sleep(0.2)
            closed = closed_with(server, 1013)
            # The others noticed nothing meanwhile.
            assert remote_acked(bob_ws, "carol", "still here", "b-1")["body"] == "still here"
            assert receive(carol_ws, "message")["message"]["body"] == "still here"
            assert server.health()[0] == 200

        growth = peak - baseline
        report = (f"server RSS {baseline / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB with {STALLED} readers that "
                  f"stopped reading; {early:.0f} closed with 1013 before {chatx.SEND_STALL_S} s, {closed:.0f} after")
        print(report, f"(live messages sent within {sent_in:.1f} s)")
        assert early == 0 and closed >= STALLED, report
        bound = STALLED * HELD_PER_READER
        assert growth < bound, f"{report}: grew {growth / 2**20:.0f} MiB (bound {bound / 2**20:.0f} MiB)"
        codes = [close_code_of(raw) for raw in raws[:3]]
        assert all(code in (1013, None) for code in codes), codes  # 1013, or cut off when it could not be sent

        # Reconnecting with after= or since= loses nothing.
        newest = STORED + LIVE
        with alice.ws(server, after=0) as ws:
            assert receive(ws, "hello")["seq"] == newest
            seqs = [receive(ws, "message", timeout=30)["seq"] for _ in range(newest)]
            assert seqs == list(range(1, newest + 1))
        with alice.ws(server, since=newest - 10) as ws:
            receive(ws, "hello")
            assert [receive(ws, "message")["seq"] for _ in range(10)] == list(range(newest - 9, newest + 1))
            assert [f for f in drain(ws) if f["type"] != "presence"] == []
    finally:
        for raw in raws:
            raw.close()
        server.stop()


RESETS = 60
BURST = 24


def test_a_client_that_resets_with_frames_queued_leaves_no_traceback_and_no_1011(tmp_path):
    """Issue 23.4: the cork's setsockopt on a connection the client had reset
    raised ValueError (negative file descriptor), logged a traceback and closed with 1011."""
    server = ChatServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}", "CHATX_METRICS": "true",
                         "CHATX_SEND_RATE": "10000", "CHATX_SEND_BURST": "10000"}, tmp_path)
    server.start()
    try:
        alice, bob = (remote_sign_up(server, name) for name in ("alice", "bob"))
        with bob.ws(server) as ws:
            receive(ws, "hello")
            for round_ in range(RESETS):
                raw = stalled_socket(server, alice.cookie, "?after=0")  # its replay fills the buffers
                for n in range(BURST):  # more than the two kernels' buffers hold: the rest waits in the outbox
                    ws.send(json.dumps({"type": "send", "to": "alice", "body": BIG_BODY, "client_id": f"{round_}-{n}"}))
                acks = 0
                while acks < BURST:
                    acks += receive(ws, timeout=30)["type"] == "ack"
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                raw.close()  # a reset, with frames for it still queued
            assert remote_acked(ws, "alice", "still here", "last")["body"] == "still here"
        wait_until(lambda: closed_with(server, 1011) + sum(
            closed_with(server, code) for code in ("client", 1013)) >= RESETS, timeout=30, what="every reset noticed")
        log = server.log.read_text()
        assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
        assert closed_with(server, 1011) == 0
        assert server.health()[0] == 200
    finally:
        server.stop()


# ---- sign-in and sign-up -------------------------------------------------------------------------------


def test_five_failed_passwords_lock_the_username_even_for_the_right_one_until_the_window_passes(
        database_url, make_client, monkeypatch):
    settings = chatx.load_settings()
    assert (settings.login_failures_per_user, settings.login_failures_per_address) == (5, 20)
    client = make_client(database_url=database_url)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    with alice.ws() as ws, bob.ws() as bob_ws:
        next_frame(ws, "hello")
        next_frame(bob_ws, "hello")
        for _ in range(5):
            wrong = login(client, "alice", "not her password")
            assert wrong.status_code == 401 and error_code(wrong) == "bad_credentials"
        for username, password in (("alice", PASSWORD), ("ALICE", PASSWORD), ("alice", "not her password")):
            locked = login(client, username, password)
            assert locked.status_code == 429 and error_code(locked) == "rate_limited", locked.text
            assert retry_after(locked) <= 15 * 60
            assert chatx.SESSION_COOKIE not in locked.cookies
        # Nobody else noticed: bob signs in from the same address, alice's session and socket work.
        assert login(client, "bob").status_code == 200
        assert alice.get("/api/me").status_code == 200
        assert acked(ws, "bob", "locked out, still chatting", "l-1", others=ANY_STREAM_OR_TYPING)["body"] == "locked out, still chatting"
        assert next_frame(bob_ws, "message")["message"]["body"] == "locked out, still chatting"
        assert client.get("/healthz").status_code == 200
    # Once the 15-minute window has passed, the right password works again.
    real_now = chatx.now_ms
    monkeypatch.setattr(chatx, "now_ms", lambda: real_now() + chatx.LOGIN_WINDOW_MS + 1000)
    assert login(client, "alice").status_code == 200


def test_twenty_failures_from_one_address_lock_that_address_and_no_other(database_url, make_client):
    client = make_client(database_url=database_url)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    with alice.ws() as ws, bob.ws() as bob_ws:
        next_frame(ws, "hello")
        next_frame(bob_ws, "hello")
        for n in range(20):  # a different name each time: no username reaches its own limit
            assert login(client, f"guess{n}", "wrong password").status_code == 401
        locked = login(client, "bob")
        assert locked.status_code == 429 and error_code(locked) == "rate_limited"
        assert retry_after(locked) <= 15 * 60
        # Another client address (here through another process on the same database) signs in.
        with from_address(database_url, "10.0.0.2") as elsewhere:
            assert login(elsewhere, "bob").status_code == 200
            assert login(elsewhere, "alice").status_code == 200
        # The sessions and sockets of the address's users live on.
        assert acked(bob_ws, "alice", "fine here", "a-1", others=ANY_STREAM_OR_TYPING)["body"] == "fine here"
        assert next_frame(ws, "message")["message"]["body"] == "fine here"
        assert alice.get("/api/me").status_code == 200
        assert client.get("/healthz").status_code == 200


# 50 attackers behind one address, each always with a bad sign-in in flight and
# coming back as Retry-After asks. A process of their own: 50 client threads in
# the test's process would slow the test's own measurement (the GIL), not the server.
ATTACKERS = """
import asyncio, json, sys
import httpx2 as httpx

async def main(base):
    answers, stop = [], asyncio.Event()

    async def until_stdin_closes():
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        stop.set()

    async def attacker(client, n):
        while not stop.is_set():
            r = await client.post(base + "/api/login", json={"username": f"alice{n % 3}", "password": f"guess {n}"},
                                  headers={"x-forwarded-for": "6.6.6.6"})
            answers.append([r.status_code, r.json()["error"]["code"], r.headers.get("retry-after")])
            try:
                await asyncio.wait_for(stop.wait(), float(r.headers.get("retry-after") or 0))
            except asyncio.TimeoutError:
                pass

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as client:
        watcher = asyncio.create_task(until_stdin_closes())
        tasks = [asyncio.create_task(attacker(client, n)) for n in range(50)]
        print("started", flush=True)
        await asyncio.gather(*tasks)
    print(json.dumps(answers))

asyncio.run(main(sys.argv[1]))
"""


def test_a_real_sign_in_stays_fast_while_50_bad_ones_are_in_flight(tmp_path):
    server = ChatServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}",
                         "CHATX_TRUSTED_PROXIES": "127.0.0.1",  # so that attackers and alice have their own addresses
                         "CHATX_LOGIN_FAILURES_PER_USER": "0", "CHATX_LOGIN_FAILURES_PER_ADDRESS": "0"}, tmp_path)
    server.start()
    attack = None
    try:
        remote_sign_up(server, "alice")
        bob, carol = remote_sign_up(server, "bob"), remote_sign_up(server, "carol")

        def sign_in(address: str) -> tuple[float, httpx.Response]:
            started = time.monotonic()
            response = httpx.post(f"{server.base}/api/login", json={"username": "alice", "password": PASSWORD},
                                  headers={"x-forwarded-for": address}, timeout=120)
            return time.monotonic() - started, response

        alone = []
        for _ in range(3):
            elapsed, response = sign_in("10.9.9.9")
            assert response.status_code == 200
            alone.append(elapsed)
        usual = statistics.median(alone)

        with bob.ws(server) as bob_ws, carol.ws(server) as carol_ws:
            receive(bob_ws, "hello")
            receive(carol_ws, "hello")
            attack = subprocess.Popen([sys.executable, "-c", ATTACKERS, server.base], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
            assert attack.stdout.readline().strip() == "started"
            time.sleep(1.5)  # the flood is in flight
            elapsed, response = sign_in("10.1.1.1")
            # The others noticed nothing either.
            assert remote_acked(bob_ws, "carol", "during the flood", "f-1")["body"] == "during the flood"
            assert server.health()[0] == 200
            answers = json.loads(attack.communicate("", timeout=120)[0])
        print(f"sign-in: {usual:.2f} s alone, {elapsed:.2f} s during the flood; "
              f"{len(answers)} bad attempts answered")
        assert response.status_code == 200, response.text
        assert elapsed < 10 * usual, f"a sign-in took {elapsed:.2f} s during the flood, {usual:.2f} s alone"
        assert all((status, code) in ((401, "bad_credentials"), (503, "busy")) for status, code, _ in answers)
        busy = [retry for status, _, retry in answers if status == 503]
        assert len(busy) >= 40, f"only {len(busy)} of {len(answers)} bad attempts were refused as busy"
        assert all(retry and int(retry) > 0 for retry in busy)
    finally:
        if attack is not None and attack.poll() is None:
            attack.kill()
            attack.wait()
        server.stop()


def test_ten_signups_an_hour_per_address_then_429_and_other_addresses_go_on(database_url, make_client):
    assert chatx.load_settings().signups_per_address == 10
    client = make_client(database_url=database_url)
    first = sign_up(client, "user0")
    with first.ws() as ws:
        next_frame(ws, "hello")
        for n in range(1, 10):
            sign_up(client, f"user{n}")
        client.cookies.clear()
        refused = client.post("/api/register", json={"username": "user10", "password": PASSWORD})
        assert refused.status_code == 429 and error_code(refused) == "rate_limited"
        assert 0 < retry_after(refused) <= 3600
        assert login(client, "user10").status_code == 401  # nothing was made
        with from_address(database_url, "10.0.0.3") as elsewhere:
            assert elsewhere.post("/api/register", json={"username": "user10", "password": PASSWORD}
                                  ).status_code == 201
        # The accounts already made work on: sign-in, sockets, sends.
        assert login(client, "user5").status_code == 200
        assert acked(ws, "user1", "welcome", "w-1", others=ANY_STREAM_OR_TYPING)["body"] == "welcome"
        assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("look_alike", ["aIice", "ALICE", "a1ice", "al1ce", "AL1CE"])
def test_usernames_that_look_alike_are_taken(database_url, make_client, look_alike):
    client = make_client(database_url=database_url)
    sign_up(client, "alice")
    sign_up(client, "b0b")
    response = client.post("/api/register", json={"username": look_alike, "password": PASSWORD})
    assert response.status_code == 409 and error_code(response) == "username_taken"
    client.cookies.clear()
    assert client.post("/api/register", json={"username": "bob", "password": PASSWORD}).status_code == 409
    assert client.post("/api/register", json={"username": "alicia", "password": PASSWORD}).status_code == 201


def test_closed_registration_refuses_sign_up_and_existing_accounts_go_on(database_url, make_client, tmp_path,
                                                                          monkeypatch):
    opened = make_client(database_url=database_url)
    alice, bob = sign_up(opened, "alice"), sign_up(opened, "bob")
    closed = make_client(database_url=database_url, registration="closed")
    response = closed.post("/api/register", json={"username": "carol", "password": PASSWORD})
    assert response.status_code == 403 and error_code(response) == "registration_closed"
    assert login(closed, "carol").status_code == 401
    signed_in = login(closed, "alice")
    assert signed_in.status_code == 200
    alice_here = type(alice)(closed, "alice", signed_in.cookies[chatx.SESSION_COOKIE], alice.id)
    bob_here = type(bob)(closed, "bob", bob.cookie, bob.id)
    with alice_here.ws() as ws, bob_here.ws() as bob_ws:
        next_frame(ws, "hello")
        next_frame(bob_ws, "hello")
        assert acked(ws, "bob", "closed, not for us", "r-1", others=ANY_STREAM_OR_TYPING)["body"] == "closed, not for us"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHATX_REGISTRATION", "closed")
    assert chatx.load_settings().registration == "closed"
    monkeypatch.setenv("CHATX_REGISTRATION", "maybe")
    with pytest.raises(ValueError):
        chatx.load_settings()


# ---- floods ----------------------------------------------------------------------------------------------


def typings(ws) -> list[dict[str, Any]]:
    return [frame for frame in quiet(ws) if frame["type"] == "typing"]


def test_typing_reaches_each_peer_at_most_once_per_2_seconds(make_client):
    assert chatx.load_settings().typing_interval == 2
    client = make_client()
    alice, bob, carol = sign_up(client, "alice"), sign_up(client, "bob"), sign_up(client, "carol")
    with alice.ws() as ws, bob.ws() as bob_ws, carol.ws() as carol_ws:
        sockets = {"alice": ws, "bob": bob_ws, "carol": carol_ws}
        for socket_ in sockets.values():
            next_frame(socket_, "hello")

        def received() -> dict[str, list[str]]:
            """Who each got typing from: one round of pings has every socket's
            frames handled (so every typing frame is queued), a second brings them."""
            got: dict[str, list[str]] = {name: [] for name in sockets}
            for _ in range(2):
                for name, socket_ in sockets.items():
                    got[name] += [frame["from"] for frame in quiet(socket_) if frame["type"] == "typing"]
            return got

        started = time.monotonic()
        for _ in range(50):  # a flood of typing, to a partner and to a stranger alike
            ws.send_json({"type": "typing", "to": "bob"})
            ws.send_json({"type": "typing", "to": "carol"})
            bob_ws.send_json({"type": "typing", "to": "alice"})
        assert received() == {"alice": ["bob"], "bob": ["alice"], "carol": ["alice"]}
        # Within 2 s of the one that went through, nothing more does...
        while time.monotonic() < started + 1.5:
            ws.send_json({"type": "typing", "to": "bob"})
            time.sleep(0.1)
        assert received() == {"alice": [], "bob": [], "carol": []}
        # ...and after them, one more does.
        time.sleep(max(0.0, started + 2.5 - time.monotonic()))
        for _ in range(10):
            ws.send_json({"type": "typing", "to": "bob"})
        assert received() == {"alice": [], "bob": ["alice"], "carol": []}
        # Bob noticed nothing else: his sends are acked and his socket is open.
        assert acked(bob_ws, "alice", "stop typing", "t-1", others=ANY_STREAM_OR_TYPING)["body"] == "stop typing"
        assert next_frame(ws, "message")["message"]["body"] == "stop typing"


def test_read_edit_and_delete_share_the_send_bucket(make_client):
    client = make_client(send_rate=0.001, send_burst=4)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    make_partners(bob, alice)
    with alice.ws() as ws, bob.ws() as bob_ws:
        next_frame(ws, "hello")
        next_frame(bob_ws, "hello")
        message = acked(ws, "bob", "one", "b-1", others=ANY_STREAM_OR_TYPING)  # 1
        for up_to in (1, 2):  # 2, 3: reads move alice's cursor (bob's message, then hers)
            ws.send_json({"type": "read", "with": "bob", "up_to": up_to})
        ws.send_json({"type": "edit", "id": message["id"], "body": "one, edited"})  # 4
        for frame in ({"type": "read", "with": "bob", "up_to": 10**6},
                      {"type": "edit", "id": message["id"], "body": "again"},
                      {"type": "delete", "id": message["id"]},
                      {"type": "send", "to": "bob", "body": "two", "client_id": "b-2"}):
            ws.send_json(frame)
        errors = [f for f in quiet(ws) if f["type"] == "error"]
        while len(errors) < 4:  # the send's refusal may come after the pong
            frame = next_frame(ws)
            if frame["type"] == "error":
                errors.append(frame)
        assert [e["code"] for e in errors] == ["rate_limited"] * 4, errors
        # Bob's bucket is his own.
        assert acked(bob_ws, "alice", "mine is full", "b-3", others=ANY_STREAM_OR_TYPING)["body"] == "mine is full"


def test_the_presence_grace_absorbs_a_connect_close_loop(database_url, make_client):
    grace = 1.0
    client = make_client(database_url=database_url, presence_grace=grace)
    alice, bob, carol = sign_up(client, "alice"), sign_up(client, "bob"), sign_up(client, "carol")
    dave = sign_up(client, "dave")
    make_partners(alice, bob)  # carol is a stranger to alice
    calls: list[tuple[str, str]] = []
    client.app.state.chat.on_status_change(lambda username, status, last_seen: calls.append((username, status)))
    with bob.ws() as bob_ws, carol.ws() as carol_ws, dave.ws() as dave_ws:
        for socket_ in (bob_ws, carol_ws, dave_ws):
            next_frame(socket_, "hello")
        loop_started, n = time.monotonic(), 0
        while n < 25 or time.monotonic() - loop_started < 2.5 * grace:  # the loop outlasts the grace
            n += 1
            with alice.ws() as ws:
                next_frame(ws, "hello")
            if n == 12:  # someone else chats on meanwhile
                assert acked(dave_ws, "dave", "mid-loop", "g-1", others=ANY_STREAM_OR_TYPING)["body"] == "mid-loop"
        loop_ended = time.monotonic()
        seen = [(f["username"], f["status"]) for f in quiet(bob_ws) if f["type"] == "presence"]
        assert seen == [("alice", "online")], seen
        assert quiet(carol_ws) == []
        offline = next_frame(bob_ws, "presence")
        assert (offline["username"], offline["status"]) == ("alice", "offline")
        assert time.monotonic() - loop_ended >= grace - 0.2
        assert quiet(bob_ws) == [] and quiet(carol_ws) == []
    assert [c for c in calls if c[0] == "alice"] == [("alice", "online"), ("alice", "offline")]


# ---- connections that never finish a request ---------------------------------------------------------------


class ProtectedServer(ChatServer):
    """uvicorn as `make run` starts it: with chatx's HTTP protocol and a keep-alive timeout."""

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "chatx:app", "--host", "127.0.0.1", "--port", str(self.port),
                 "--ws-max-size", "65536", "--ws-per-message-deflate", "false", "--http", "chatx:HTTPProtocol",
                 "--timeout-keep-alive", "5"],
                cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        wait_until(self.healthy, timeout=20, what=f"uvicorn on port {self.port} (log: {self.log})")


HEAD_LIMIT = chatx.HEAD_TIMEOUT_S + 2.5  # "closed within ~12 s"
BODY_LIMIT = chatx.BODY_TIMEOUT_S + 2.5


def seconds_until_closed(connection: socket.socket, trickle: bytes = b"", limit: float = 30) -> float:
    """Send `trickle` a byte every half second (none: send nothing) until the server closes the connection."""
    started = time.monotonic()
    for position in range(10**6):
        if time.monotonic() - started > limit:
            return float("inf")
        if trickle:
            try:
                connection.sendall(trickle[position % len(trickle):position % len(trickle) + 1])
            except OSError:
                return time.monotonic() - started
        readable, _, _ = select.select([connection], [], [], 0.5)
        if readable:
            try:
                if connection.recv(65536) == b"":
                    return time.monotonic() - started
            except OSError:
                return time.monotonic() - started
    return float("inf")


def test_slow_headers_idle_connections_and_slow_bodies_are_cut_off(tmp_path):
    assert (chatx.HEAD_TIMEOUT_S, chatx.BODY_TIMEOUT_S) == (10, 10)
    server = ProtectedServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}"}, tmp_path)
    server.start()
    try:
        alice, bob = remote_sign_up(server, "alice"), remote_sign_up(server, "bob")

        def connect() -> socket.socket:
            return socket.create_connection(("127.0.0.1", server.port), timeout=30)

        def idle() -> float:
            with connect() as connection:
                return seconds_until_closed(connection)

        def slow_head() -> float:
            with connect() as connection:
                connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                return seconds_until_closed(connection, trickle=b"X-Slow: " + b"a" * 1000)

        def idle_after_a_request() -> float:
            with connect() as connection:
                connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert connection.recv(65536).startswith(b"HTTP/1.1 200")
                return seconds_until_closed(connection)

        def slow_body() -> tuple[float, bytes]:
            with connect() as connection:
                body = json.dumps({"username": "alice", "password": PASSWORD}).encode()
                connection.sendall(b"POST /api/login HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                   b"Content-Type: application/json\r\n"
                                   b"Content-Length: %d\r\n\r\n" % (len(body) + 1000) + body[:5])
                started, answer = time.monotonic(), b""
                for byte in body[5:] + b" " * 1000:  # a byte a second: it never finishes in time
                    readable, _, _ = select.select([connection], [], [], 1.0)
                    if readable:
                        break
                    connection.sendall(bytes([byte]))
                connection.settimeout(30)
                try:
                    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                        chunk = connection.recv(65536)
                        if not chunk:
                            break
                        answer += chunk
                except OSError:
                    pass
                return time.monotonic() - started, answer

        with alice.ws(server) as ws, bob.ws(server) as bob_ws, ThreadPoolExecutor(4) as pool:
            receive(ws, "hello")
            receive(bob_ws, "hello")
            idle_f, head_f, kept_f, body_f = (pool.submit(f) for f in (idle, slow_head, idle_after_a_request,
                                                                          slow_body))
            time.sleep(1)
            # While they hang on, everyone else is served.
            assert server.health()[0] == 200
            assert remote_acked(ws, "bob", "not held up", "h-1")["body"] == "not held up"
            assert receive(bob_ws, "message")["message"]["body"] == "not held up"
            idle_s, head_s, kept_s = idle_f.result(), head_f.result(), kept_f.result()
            body_s, answer = body_f.result()
            drain(ws)  # the socket is open
            assert remote_acked(bob_ws, "alice", "still here", "h-2")["body"] == "still here"
        print(f"closed after: idle {idle_s:.1f} s, slow head {head_s:.1f} s, idle keep-alive {kept_s:.1f} s; "
              f"slow body answered after {body_s:.1f} s")
        assert idle_s <= HEAD_LIMIT, f"an idle connection was open {idle_s:.1f} s"
        assert head_s <= HEAD_LIMIT, f"a connection sending its headers slowly was open {head_s:.1f} s"
        assert kept_s <= HEAD_LIMIT, f"an idle keep-alive connection was open {kept_s:.1f} s"
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert body_s <= BODY_LIMIT, f"a slow body was answered after {body_s:.1f} s"
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert json.loads(payload)["error"]["code"] == "timeout"
        assert b"content-security-policy" in head.lower() and b"no-store" in head.lower()
        assert server.health()[0] == 200
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text()
