"""Issue 16, availability: the limits that keep one account, or a client with
no account, from hurting everyone else (docs/protocol.md, Limits). Each test also checks
that the others noticed nothing: their sends are acked, /healthz answers,
their sockets stay open."""

from __future__ import annotations

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
from conftest import (acked, delete_me, error_code, PASSWORD, ChatServer, DocumentedServer, drain, login, make_partners,
                      next_frame, quiet, receive, remote_sign_up, sign_up, silent, stalled_socket, wait_until)


ANY_STREAM_OR_TYPING = ("message", "read", "edit", "delete", "typing")
CLOSED_1013 = 'chatx_sockets_closed_total{code="1013"}'




@contextmanager
def from_address(database_url: str, host: str, **settings: Any) -> Iterator[TestClient]:
    """Another process on the same database, whose clients come from `host`."""
    with TestClient(chatx.create_app(database_url=database_url, **settings), client=(host, 50000)) as client:
        yield client




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
                    early = server.metric(CLOSED_1013)

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
            while server.metric(CLOSED_1013) < STALLED and time.monotonic() < deadline:
                peak = max(peak, rss_bytes(server.process.pid))
                time.sleep(0.2)
            closed = server.metric(CLOSED_1013)
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
        wait_until(lambda: server.metric("chatx_sockets_closed_total") >= RESETS, timeout=30,
                   what="every reset noticed")
        log = server.log.read_text()
        assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
        assert server.metric('chatx_sockets_closed_total{code="1011"}') == 0
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


def test_every_sign_up_attempt_counts_against_the_address_taken_names_too(database_url, make_client):
    assert chatx.load_settings().signups_per_address == 10
    client = make_client(database_url=database_url)
    alice = sign_up(client, "alice")
    for name in ("alice", "ALICE", "a1ice") * 3:  # nine more attempts, every one refused as taken
        client.cookies.clear()
        taken = client.post("/api/register", json={"username": name, "password": PASSWORD})
        assert taken.status_code == 409 and error_code(taken) == "username_taken"
    client.cookies.clear()
    refused = client.post("/api/register", json={"username": "fresh", "password": PASSWORD})
    assert refused.status_code == 429 and error_code(refused) == "rate_limited", refused.text
    assert 0 < retry_after(refused) <= 3600
    # Nobody else noticed: another address signs up, alice signs in.
    with from_address(database_url, "10.0.0.4") as elsewhere:
        assert elsewhere.post("/api/register", json={"username": "fresh", "password": PASSWORD}).status_code == 201
    assert login(client, "alice").status_code == 200 and alice.get("/api/me").status_code == 200


# Ten addresses, each keeping two sign-ups in flight: one with a taken name,
# one with a fresh name (a real hash, in the sign-up threads).
SIGNUP_FLOOD = """
import asyncio, json, sys
import httpx2 as httpx

async def main(base):
    answers, stop = [], asyncio.Event()

    async def until_stdin_closes():
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        stop.set()

    async def flooder(client, address, fresh):
        n = 0
        while not stop.is_set():
            n += 1
            name = f"new{address}x{n}" if fresh else "alice"
            r = await client.post(base + "/api/register", json={"username": name, "password": "a password, long"},
                                  headers={"x-forwarded-for": f"6.6.6.{address}"})
            answers.append([name == "alice", r.status_code, r.json().get("error", {}).get("code")])

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as client:
        watcher = asyncio.create_task(until_stdin_closes())
        tasks = [asyncio.create_task(flooder(client, address, fresh)) for address in range(10)
                 for fresh in (False, True)]
        print("started", flush=True)
        await asyncio.gather(*tasks)
    print(json.dumps(answers))

asyncio.run(main(sys.argv[1]))
"""


def test_a_real_sign_in_gets_a_hash_while_ten_addresses_flood_sign_up(tmp_path):
    server = ChatServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}",
                         "CHATX_TRUSTED_PROXIES": "127.0.0.1",  # so that each flooder has its own address
                         "CHATX_SIGNUPS_PER_ADDRESS": "0"}, tmp_path)  # the flood is not cut short
    server.start()
    flood = None
    try:
        remote_sign_up(server, "alice")
        bob, carol = remote_sign_up(server, "bob"), remote_sign_up(server, "carol")
        with bob.ws(server) as bob_ws, carol.ws(server) as carol_ws:
            receive(bob_ws, "hello")
            receive(carol_ws, "hello")
            flood = subprocess.Popen([sys.executable, "-c", SIGNUP_FLOOD, server.base], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
            assert flood.stdout.readline().strip() == "started"
            time.sleep(1.5)  # the flood is in flight
            sign_ins = [httpx.post(f"{server.base}/api/login", json={"username": "alice", "password": PASSWORD},
                                   headers={"x-forwarded-for": "10.1.1.1"}, timeout=60) for _ in range(5)]
            # The others noticed nothing either.
            assert remote_acked(bob_ws, "carol", "during the flood", "f-1")["body"] == "during the flood"
            assert server.health()[0] == 200
            answers = json.loads(flood.communicate("", timeout=120)[0])
        assert [r.status_code for r in sign_ins] == [200] * 5, [r.text for r in sign_ins]
        taken = [(status, code) for is_taken, status, code in answers if is_taken]
        fresh = [(status, code) for is_taken, status, code in answers if not is_taken]
        print(f"{len(taken)} taken-name and {len(fresh)} fresh sign-ups answered during the flood")
        assert taken and set(taken) == {(409, "username_taken")}  # never hashed, so never busy
        assert fresh and set(fresh) <= {(201, None), (503, "busy")}
    finally:
        if flood is not None and flood.poll() is None:
            flood.kill()
            flood.wait()
        server.stop()


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


@pytest.mark.parametrize("look_alike", ["rnallory1", "RNallory1", "vvendy", "VVendy", "bobby_", ".bobby", "-wendy-",
                                        "rnalIory1"])
def test_rn_vv_and_punctuation_at_the_ends_are_look_alikes_too(make_client, look_alike):
    client = make_client()
    for name in ("mallory1", "wendy", "bobby"):
        sign_up(client, name)
    response = client.post("/api/register", json={"username": look_alike, "password": PASSWORD})
    assert response.status_code == 409 and error_code(response) == "username_taken", look_alike
    client.cookies.clear()
    assert client.post("/api/register", json={"username": "bob_by", "password": PASSWORD}).status_code == 201


def test_wrong_passwords_to_change_the_password_or_delete_the_account_count_as_failed_sign_ins(
        database_url, make_client):
    assert chatx.load_settings().login_failures_per_user == 5
    client = make_client(database_url=database_url)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    change = {"password": "a guess", "new_password": "stolen cookie, new password"}
    with bob.ws() as bob_ws:
        next_frame(bob_ws, "hello")
        for _ in range(3):
            wrong = alice.post("/api/password", json=change)
            assert wrong.status_code == 401 and error_code(wrong) == "bad_credentials"
        for _ in range(2):
            wrong = delete_me(alice, "another guess")
            assert wrong.status_code == 401 and error_code(wrong) == "bad_credentials"
        # Five failures: now even the right password is refused, here and at sign-in.
        for refused in (alice.post("/api/password", json={**change, "password": PASSWORD}),
                        delete_me(alice, PASSWORD), login(client, "alice")):
            assert refused.status_code == 429 and error_code(refused) == "rate_limited", refused.text
            assert retry_after(refused) <= 15 * 60
        assert login(client, "alice", "stolen cookie, new password").status_code == 429  # nothing changed
        assert alice.get("/api/me").status_code == 200  # nothing was deleted
        # Bob noticed nothing: he signs in, changes his password, chats.
        assert login(client, "bob").status_code == 200
        assert bob.post("/api/password", json={"password": PASSWORD, "new_password": "bob's new one"}
                        ).status_code == 204
        assert acked(bob_ws, "alice", "still here", "p-1", others=ANY_STREAM_OR_TYPING)["body"] == "still here"


def test_the_directory_is_throttled_per_user_but_not_for_a_person_typing(make_client):
    settings = chatx.load_settings()
    assert (settings.directory_rate, settings.directory_burst) == (1, 30)
    client = make_client(signups_per_address=0)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    for n in range(30):
        sign_up(client, f"user{n:02}")
    # alice types a name, deletes it and types another: every search answered.
    for text in ("alexander", "user1"):
        for end in range(1, len(text) + 1):
            assert alice.get("/api/users", params={"q": text[:end]}).status_code == 200
    for _ in range(len("alexander") - 1):
        assert alice.get("/api/users", params={"q": "a"}).status_code == 200
    # A script paging through the directory, one name a page, is stopped.
    answers, after = [], ""
    for _ in range(30):
        response = alice.get("/api/users", params={"q": "user", "after": after, "limit": 1})
        answers.append(response.status_code)
        if response.status_code != 200:
            break
        after = response.json()["users"][0]["username"]
    assert answers[-1] == 429 and error_code(response) == "rate_limited", answers
    assert 0 < retry_after(response) <= 2
    assert len(answers) < 30
    # Bob, searching meanwhile, noticed nothing; alice may search again a second later.
    assert [u["username"] for u in bob.get("/api/users", params={"q": "user0"}).json()["users"]][:2] == [
        "user00", "user01"]
    time.sleep(retry_after(response))
    assert alice.get("/api/users", params={"q": "user"}).status_code == 200


def test_a_socket_flooding_frames_of_every_kind_is_throttled_and_others_send_on(make_client):
    settings = chatx.load_settings()
    assert (settings.frame_rate, settings.frame_burst) == (20, 100)
    client = make_client()
    alice, bob, carol = sign_up(client, "alice"), sign_up(client, "bob"), sign_up(client, "carol")
    junk = [{"type": "ping"}, {"type": "typing", "to": "nobody"}, {"type": "whatever"}, "not json", [1]]
    with alice.ws() as ws, bob.ws() as bob_ws, carol.ws() as carol_ws:
        for socket_ in (ws, bob_ws, carol_ws):
            next_frame(socket_, "hello")
        started = time.monotonic()
        for n in range(1000):
            frame = junk[n % len(junk)]
            ws.send_text(frame if isinstance(frame, str) else json.dumps(frame))
        sent_in = time.monotonic() - started
        # Bob's send to carol is acked meanwhile.
        assert acked(bob_ws, "carol", "hello carol", "b-1", others=ANY_STREAM_OR_TYPING)["body"] == "hello carol"
        assert next_frame(carol_ws, "message")["message"]["body"] == "hello carol"
        time.sleep(settings.frame_burst / settings.frame_rate + 0.5)  # the bucket fills again
        ws.send_json({"type": "typing", "to": "nobody", "client_id": "the end"})  # answered last
        answers = []
        while (frame := ws.receive_json()).get("client_id") != "the end":
            answers.append(frame)
        limited = [f for f in answers if f.get("code") == "rate_limited"]
        handled = [f for f in answers if f.get("code") != "rate_limited"]
        print(f"{len(handled)} of 1000 frames handled, {len(limited)} rate_limited, sent in {sent_in:.2f} s")
        assert limited, answers[-5:]
        assert len(handled) <= settings.frame_burst + settings.frame_rate * (time.monotonic() - started) + 1
        assert len(handled) < 500
        # The flooder's own socket stays open and works once it slows down.
        assert acked(ws, "bob", "sorry", "a-1", others=ANY_STREAM_OR_TYPING)["body"] == "sorry"
        assert next_frame(bob_ws, "message")["message"]["body"] == "sorry"


def test_first_contacts_have_a_small_budget_and_answered_conversations_do_not(make_client):
    assert (chatx.Settings.first_contacts_per_sender, chatx.Settings.first_contacts_per_recipient) == (20, 60)
    client = make_client(signups_per_address=0, first_contacts_per_sender=20, first_contacts_per_recipient=60)
    victim, carol, dave = sign_up(client, "victim"), sign_up(client, "carol"), sign_up(client, "dave")
    spammers = [sign_up(client, f"fresh{n}") for n in range(10)]  # ten fresh accounts from one address
    make_partners(dave, carol)  # carol and dave talk: each has answered the other
    make_partners(carol, dave)
    with ExitStack() as stack:
        victim_ws = stack.enter_context(victim.ws())
        carol_ws, dave_ws = stack.enter_context(carol.ws()), stack.enter_context(dave.ws())
        sockets = [stack.enter_context(spammer.ws()) for spammer in spammers]
        for ws in (victim_ws, carol_ws, dave_ws, *sockets):
            next_frame(ws, "hello")
        started = time.monotonic()
        for n in range(30):  # 300 unsolicited messages, each spammer's send bucket allows all 30
            for k, ws in enumerate(sockets):
                ws.send_json({"type": "send", "to": "victim", "body": f"buy now {k}.{n}", "client_id": f"s-{n}"})
        # The well-behaved conversation meanwhile: 25 messages each way, every one acked.
        for n in range(25):
            assert acked(carol_ws, "dave", f"c{n}", f"c-{n}")["body"] == f"c{n}"
            assert acked(dave_ws, "carol", f"d{n}", f"d-{n}", others=("message",))["body"] == f"d{n}"
        outcomes = {"ack": 0, "rate_limited": 0}
        for ws in sockets:
            for _ in range(30):
                frame = next_frame(ws)
                while frame["type"] == "message":  # the spammer's own copy of a message stored
                    frame = next_frame(ws)
                outcomes["ack" if frame["type"] == "ack" else frame["code"]] += 1
        elapsed = time.monotonic() - started
        delivered = [f for f in quiet(victim_ws) if f["type"] == "message"]
        print(f"{len(delivered)} unsolicited messages delivered of 300 in {elapsed:.2f} s; {outcomes}")
        assert len(delivered) == outcomes["ack"] <= 60 + 1 * elapsed + 1
        assert outcomes["rate_limited"] >= 300 - 61 - elapsed
        # One sender to many who never answered runs out after 20.
        strangers = [sign_up(client, f"stranger{n}") for n in range(25)]
        eager_ws = stack.enter_context(sign_up(client, "eager").ws())
        next_frame(eager_ws, "hello")
        answers = []
        for n, stranger in enumerate(strangers):
            eager_ws.send_json({"type": "send", "to": stranger.username, "body": "hi", "client_id": f"t-{n}"})
            frame = next_frame(eager_ws)
            while frame["type"] == "message":
                frame = next_frame(eager_ws)
            answers.append(frame["type"] if frame["type"] == "ack" else frame["code"])
        assert answers[:20] == ["ack"] * 20 and answers[20:].count("rate_limited") >= 4, answers
        # An answer ends the first contact: victim writes back to fresh1, whose messages then go through.
        assert acked(victim_ws, "fresh1", "who are you?", "v-1", others=ANY_STREAM_OR_TYPING)["to"] == "fresh1"
        assert acked(sockets[1], "victim", "an answer", "s-answer", others=ANY_STREAM_OR_TYPING)["to"] == "victim"


# ---- keepalive -------------------------------------------------------------------------------------------


def test_a_socket_that_stops_answering_pings_is_closed_by_chatx_with_1013_before_the_server_s_1011(tmp_path):
    server = ChatServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}", "CHATX_METRICS": "true"},
                        tmp_path, serve_args=("--ws-ping-interval", "1", "--ws-ping-timeout", "4"))
    server.start()
    try:
        alice, bob, carol = (remote_sign_up(server, name) for name in ("alice", "bob", "carol"))
        with bob.ws(server) as bob_ws, carol.ws(server) as carol_ws:  # their clients answer pings
            receive(bob_ws, "hello")
            receive(carol_ws, "hello")
            raw = stalled_socket(server, alice.cookie, "")  # answers nothing
            try:
                assert close_code_of(raw, timeout=12) == chatx.CLOSE_TRY_LATER
            finally:
                raw.close()
            wait_until(lambda: server.metric(CLOSED_1013) == 1, what="the close to be counted")
            # Bob's and carol's sockets, which answer, live on past several pings.
            assert remote_acked(bob_ws, "carol", "still here", "k-1")["body"] == "still here"
            assert receive(carol_ws, "message")["message"]["body"] == "still here"
        assert server.metric(f'chatx_sockets_closed_total{{code="{chatx.CLOSE_ERROR}"}}') == 0
    finally:
        server.stop()


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
    client = make_client(frame_burst=1000)  # the flood of typing frames stays within the frame bucket
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
    server = ChatServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}"}, tmp_path)
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


# ---- HTTP: slow readers, trickled requests, heavy readers ------------------------------------------------


def store_big_history(server: ChatServer, sender, recipient, count: int) -> None:
    """`count` messages of 16 kB from sender to recipient, through a socket."""
    with sender.ws(server) as ws:
        receive(ws, "hello")
        for n in range(count):
            ws.send(json.dumps({"type": "send", "to": recipient.username, "body": BIG_BODY, "client_id": f"h-{n}"}))
        acks = 0
        while acks < count:
            acks += receive(ws, timeout=30)["type"] == "ack"


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


SLOW_READERS = 100
PIPELINING = 5


def test_http_clients_that_do_not_read_their_responses_hold_bounded_memory_and_are_cut_off(tmp_path):
    # No connection cap and no read budget here: what is proved is the send deadline and the page's byte bound.
    server = DocumentedServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}", "CHATX_SEND_RATE": "10000",
                               "CHATX_SEND_BURST": "10000", "CHATX_HTTP_CONNECTIONS_PER_ADDRESS": "0",
                               "CHATX_READ_RATE": "0"}, tmp_path)
    server.start()
    raws: list[socket.socket] = []
    try:
        alice, bob, carol = (remote_sign_up(server, name) for name in ("alice", "bob", "carol"))
        store_big_history(server, bob, alice, 200)  # the 3.2 MB page: 200 messages of 4,000 emoji
        page = alice.get(server, "/api/conversations/bob/messages?limit=200")
        assert page.status_code == 200 and len(page.content) <= chatx.PAGE_BYTES_MAX and page.json()["has_more"]
        time.sleep(0.5)
        baseline, files = rss_bytes(server.process.pid), open_files(server.process.pid)
        request = (f"GET /api/conversations/bob/messages?limit=200 HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                   f"Cookie: {chatx.SESSION_COOKIE}={alice.cookie}\r\n\r\n").encode()
        with bob.ws(server) as bob_ws, carol.ws(server) as carol_ws:
            receive(bob_ws, "hello")
            receive(carol_ws, "hello")
            started = time.monotonic()
            for n in range(SLOW_READERS):
                raw = socket.socket()
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                raw.connect(("127.0.0.1", server.port))
                # and never read; a few ask for 30 pages at once, more than the kernel's buffers take
                raw.sendall(request * (30 if n < PIPELINING else 1))
                raws.append(raw)
            peak = baseline
            while open_files(server.process.pid) > files + 5 and time.monotonic() - started < 40:
                peak = max(peak, rss_bytes(server.process.pid))
                time.sleep(0.2)
            held = time.monotonic() - started
            # The others noticed nothing meanwhile.
            assert remote_acked(bob_ws, "carol", "still here", "s-1")["body"] == "still here"
            assert receive(carol_ws, "message")["message"]["body"] == "still here"
            assert carol.get(server, "/api/conversations").status_code == 200
        growth = (peak - baseline) / 2**20
        report = (f"server RSS {baseline / 2**20:.0f} MiB, peak +{growth:.0f} MiB with {SLOW_READERS} clients that "
                  f"did not read a history page; their connections were gone after {held:.1f} s")
        print(report)
        # The issue saw +320-471 MiB, held for as long as the clients liked.
        assert held <= chatx.RESPONSE_STALL_S + 15, report
        assert growth < SLOW_READERS * 0.5, report  # MiB: a seventh of what each held in the issue, and not for long
    finally:
        for raw in raws:
            raw.close()
        server.stop()
    assert "Traceback" not in server.log.read_text()


def test_a_heavy_reader_gets_429_while_a_person_using_the_page_normally_never_notices(tmp_path):
    server = ChatServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}", "CHATX_SEND_RATE": "10000",
                         "CHATX_SEND_BURST": "10000"}, tmp_path)
    server.start()
    try:
        mallory, bob, alice, carol = (remote_sign_up(server, name) for name in ("mallory", "bob", "alice", "carol"))
        store_big_history(server, bob, mallory, 40)
        make_partners(alice, carol, server=server)
        stop = time.monotonic() + 4

        def heavy() -> list[httpx.Response]:
            answers = []
            with httpx.Client(base_url=server.base, headers=mallory.headers(), timeout=10) as http:
                while time.monotonic() < stop:
                    answers.append(http.get("/api/conversations/bob/messages", params={"limit": 200}))
            return answers

        with ThreadPoolExecutor(8) as pool, alice.ws(server) as alice_ws, carol.ws(server) as carol_ws:
            receive(alice_ws, "hello")
            receive(carol_ws, "hello")
            loops = [pool.submit(heavy) for _ in range(8)]
            normal: list[int] = []
            for n in range(8):  # a person: a message, a glance at the list and the conversation, now and then
                assert remote_acked(alice_ws, "carol", f"normal {n}", f"n-{n}")["body"] == f"normal {n}"
                normal.append(alice.get(server, "/api/conversations").status_code)
                normal.append(alice.get(server, "/api/conversations/carol/messages").status_code)
                time.sleep(0.4)
            answers = [answer for loop in loops for answer in loop.result()]
        refused = [answer for answer in answers if answer.status_code == 429]
        served = len(answers) - len(refused)
        print(f"heavy reader: {served} pages served, {len(refused)} refused in 4 s; the person: {normal}")
        assert normal == [200] * 16
        assert refused and error_code(refused[0]) == "rate_limited" and retry_after(refused[0]) >= 1
        assert {answer.status_code for answer in answers} == {200, 429}
        # The budget: a burst and then the rate, give or take the time it took to start.
        settings = chatx.Settings()
        assert served <= settings.read_burst + settings.read_rate * 6, served
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text()


TRICKLES = {  # what each kind of trickled request sends at once, then a byte at a time
    "head": (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", b"a"),
    "body": (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n", b"a"),
    "chunked": (b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"1\r\na\r\n"),
    "api": (b"POST /api/login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n", b" "),
}


class Trickler:
    """An attacker on 127.0.0.2 that keeps `target` trickled requests open,
    re-opening each one the server closes, and notes how long each lived."""

    def __init__(self, port: int, target: int) -> None:
        self.port, self.target = port, target
        self.open: list[tuple[socket.socket, float, bytes, int]] = []
        self.lifetimes: list[float] = []
        self.stopped = False

    def connect(self, kind: str) -> None:
        try:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=1, source_address=("127.0.0.2", 0))
            first, trickle = TRICKLES[kind]
            raw.sendall(first)
            raw.setblocking(False)
        except OSError:
            return
        self.open.append((raw, time.monotonic(), trickle, 0))

    def run(self) -> None:
        kinds = list(TRICKLES)
        while not self.stopped:
            for n in range(min(40, self.target - len(self.open))):  # at most 40 new ones a round
                self.connect(kinds[n % len(kinds)])
            still = []
            for raw, opened, trickle, sent in self.open:
                try:
                    gone = raw.recv(65536) == b"" if select.select([raw], [], [], 0)[0] else False
                    if not gone:
                        raw.send(trickle[sent % len(trickle):sent % len(trickle) + 1])
                except OSError:
                    gone = True
                if gone:
                    self.lifetimes.append(time.monotonic() - opened)
                    raw.close()
                else:
                    still.append((raw, opened, trickle, sent + 1))
            self.open = still
            time.sleep(0.5)
        for raw, *_ in self.open:
            raw.close()

    def oldest(self) -> float:
        return max((time.monotonic() - opened for _, opened, _, _ in self.open), default=0.0)


def test_trickled_requests_are_cut_off_and_a_real_user_is_served_under_a_low_open_file_limit(tmp_path):
    server = DocumentedServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}"}, tmp_path, open_files=256)
    server.start()
    attacker = Trickler(server.port, target=400)  # more than the server may have open files
    try:
        alice, bob = remote_sign_up(server, "alice"), remote_sign_up(server, "bob")
        with ThreadPoolExecutor(1) as pool:
            attack = pool.submit(attacker.run)
            time.sleep(3)
            served = []
            for attempt in range(4):  # a real user on 127.0.0.1: the page, a sign-in, a socket, a message
                page = httpx.get(f"{server.base}/login", timeout=10)
                signed_in = httpx.post(f"{server.base}/api/login", json={"username": "alice", "password": PASSWORD},
                                       timeout=10)
                user = type(alice)("alice", signed_in.cookies[chatx.SESSION_COOKIE], alice.id)
                with user.ws(server) as ws, bob.ws(server) as bob_ws:
                    receive(ws, "hello")
                    receive(bob_ws, "hello")
                    delivered = remote_acked(ws, "bob", f"served {attempt}", f"t-{attempt}")["body"]
                    assert receive(bob_ws, "message")["message"]["body"] == delivered
                served.append((page.status_code, signed_in.status_code, delivered))
                time.sleep(2)
            time.sleep(max(0.0, chatx.REQUEST_TIMEOUT_S + 4 - 11))  # every kind has had time to be cut off
            oldest = attacker.oldest()
            attacker.stopped = True
            attack.result()
        lifetimes = sorted(attacker.lifetimes)
        print(f"attacker: {len(lifetimes)} connections closed by the server, the longest after {lifetimes[-1]:.1f} s; "
              f"the oldest still open: {oldest:.1f} s; the real user: {served}")
        assert served == [(200, 200, f"served {n}") for n in range(4)]
        limit = chatx.REQUEST_TIMEOUT_S + 3
        assert lifetimes[-1] <= limit and oldest <= limit, (lifetimes[-5:], oldest)
        assert server.health()[0] == 200
    finally:
        attacker.stopped = True
        server.stop()
    assert "Traceback" not in server.log.read_text()


def test_one_address_gets_a_bounded_number_of_connections_and_a_trusted_proxy_any_number(tmp_path):
    server = DocumentedServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}",
                               "CHATX_HTTP_CONNECTIONS_PER_ADDRESS": "3", "CHATX_TRUSTED_PROXIES": "127.0.0.2"},
                              tmp_path)
    server.start()
    held: list[socket.socket] = []
    try:
        def opened(source: str) -> socket.socket:
            raw = socket.create_connection(("127.0.0.1", server.port), timeout=5, source_address=(source, 0))
            held.append(raw)
            return raw

        def answer(raw: socket.socket) -> bytes:
            try:
                raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                return raw.recv(65536)
            except OSError:  # refused: reset before the answer was read
                return b""

        crowd = [opened("127.0.0.3") for _ in range(5)]
        time.sleep(0.5)
        answers = [answer(raw) for raw in crowd]
        assert [a.split(b" ", 2)[1] for a in answers[:3]] == [b"200"] * 3, answers
        assert all(not a or a.startswith(b"HTTP/1.1 429") for a in answers[3:]), answers[3:]
        for refused in filter(None, answers[3:]):
            assert b'"rate_limited"' in refused and b"retry-after: 1" in refused.lower()
        proxy = [opened("127.0.0.2") for _ in range(6)]  # the trusted proxy carries many people's requests
        assert all(answer(raw).startswith(b"HTTP/1.1 200") for raw in proxy)
        assert server.health()[0] == 200  # from 127.0.0.1, meanwhile
        for raw in crowd[:3]:
            raw.close()
        time.sleep(0.5)
        assert answer(opened("127.0.0.3")).startswith(b"HTTP/1.1 200")  # a closed one makes room
    finally:
        for raw in held:
            raw.close()
        server.stop()
    assert "Traceback" not in server.log.read_text()
