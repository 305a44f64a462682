"""Several real uvicorn processes on one SQLite file and one Redis behave as one
chat (docs/protocol.md: The WebSocket `/ws`, Presence, Close codes): delivery, presence, idempotency and logout across
processes, a process killed outright, a Redis restart under open sockets,
graceful shutdown, the WebSocket handshake over real HTTP, and a slow reader."""

from __future__ import annotations

import json
import signal
import socket
import time
from contextlib import ExitStack
from typing import Any, Callable

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

import chatx
from conftest import (ChatServer, Remote, drain, health_is, make_partners, receive, remote_sign_in, remote_sign_up,
                      wait_until)

Frame = dict[str, Any]


# ---- helpers -------------------------------------------------------------------------


def send(ws: ClientConnection, to: str, body: str, client_id: str | None) -> None:
    ws.send(json.dumps({"type": "send", "to": to, "body": body, "client_id": client_id}))


def hello(ws: ClientConnection) -> Frame:
    frame = json.loads(ws.recv(timeout=10))
    assert frame["type"] == "hello", frame
    return frame


def frames_until(ws: ClientConnection, done: Callable[[Frame], bool], timeout: float = 10) -> list[Frame]:
    """Every frame (presence included) up to and including the first one `done` accepts."""
    deadline = time.monotonic() + timeout
    frames: list[Frame] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out after {timeout} s; frames so far: {frames}")
        try:
            frame = json.loads(ws.recv(timeout=remaining))
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout} s; frames so far: {frames}") from None
        frames.append(frame)
        if done(frame):
            return frames


def is_message(message_id: int) -> Callable[[Frame], bool]:
    return lambda f: f["type"] == "message" and f["message"]["id"] == message_id


def is_message_with(client_id: str) -> Callable[[Frame], bool]:
    return lambda f: f["type"] == "message" and f["message"]["client_id"] == client_id


def is_presence(username: str, status: str | None = None) -> Callable[[Frame], bool]:
    return lambda f: f["type"] == "presence" and f["username"] == username and status in (None, f["status"])


def is_typing_from(username: str) -> Callable[[Frame], bool]:
    return lambda f: f == {"type": "typing", "from": username}


def messages_in(frames: list[Frame]) -> list[Frame]:
    return [f["message"] for f in frames if f["type"] == "message"]


def presence_of(frames: list[Frame], username: str) -> list[Frame]:
    return [f for f in frames if f["type"] == "presence" and f["username"] == username]


def close_code(ws: ClientConnection, timeout: float = 15, max_frames: int = 200_000) -> int | None:
    """Read until the server closes the socket; the code of its close frame (None: none came)."""
    deadline = time.monotonic() + timeout
    for _ in range(max_frames):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            ws.recv(timeout=remaining)
        except TimeoutError:
            break
        except ConnectionClosed as closed:
            return None if closed.rcvd is None else closed.rcvd.code
    raise AssertionError(f"the socket was not closed within {timeout} s / {max_frames} frames")


def seen_by(person: Remote, server: ChatServer, username: str) -> Frame:
    """`username` as the directory (v2: a prefix search) shows them to `person`."""
    response = person.get(server, f"/api/users?q={username}")
    assert response.status_code == 200, response.text
    return next(u for u in response.json()["users"] if u["username"] == username)


def history(person: Remote, server: ChatServer, peer: str) -> list[Frame]:
    response = person.get(server, f"/api/conversations/{peer}/messages?limit=200")
    assert response.status_code == 200, response.text
    return response.json()["messages"]


@pytest.fixture
def pair(shared_database, cluster):
    """Processes A and B on one database (SQLite, then PostgreSQL) and one
    Redis, with no presence grace, and alice, bob and carol: strangers until a
    test makes them partners."""
    a, b = cluster(2, CHATX_PRESENCE_GRACE="0", **shared_database)
    return a, b, remote_sign_up(a, "alice"), remote_sign_up(b, "bob"), remote_sign_up(a, "carol")


# ---- delivery ------------------------------------------------------------------------


def test_a_message_sent_on_one_process_reaches_every_socket_on_both_processes_once(pair):
    a, b, alice, bob, carol = pair
    with alice.ws(a) as alice_a, alice.ws(b) as alice_b, bob.ws(b) as bob_b:
        for ws in (alice_a, alice_b, bob_b):
            hello(ws)
        send(alice_a, "bob", "across processes", "x-1")
        # A second message is the fence: a duplicate of the first, published
        # before it, would be seen before it on every socket.
        send(alice_a, "bob", "fence", "x-2")
        frames = frames_until(alice_a, is_message_with("x-2"))
        acks = [f for f in frames if f["type"] == "ack"]
        assert [a["client_id"] for a in acks] == ["x-1", "x-2"]
        message, fence = acks[0]["message"], acks[1]["message"]
        assert (message["from"], message["to"], message["body"]) == ("alice", "bob", "across processes")
        assert message["client_id"] == "x-1" and message["sent_at"].endswith("Z") and fence["id"] > message["id"]
        assert messages_in(frames) == [message, fence]
        assert [f["seq"] for f in frames if f["type"] == "message"] == [1, 2]
        for ws in (alice_b, bob_b):
            frames = frames_until(ws, is_message(fence["id"]))
            assert messages_in(frames) == [message, fence]
            assert [f["seq"] for f in frames if f["type"] == "message"] == [1, 2]
        for ws in (alice_a, alice_b, bob_b):
            assert messages_in(drain(ws)) == []

        bob_b.send(json.dumps({"type": "read", "with": "alice", "up_to": fence["id"]}))
        # The third event of both streams (v2: stream frames carry the seq).
        read = {"type": "read", "seq": 3, "reader": "bob", "with": "alice", "up_to": fence["id"]}
        for ws in (alice_a, alice_b, bob_b):
            assert receive(ws, "read") == read

        bob_b.send(json.dumps({"type": "typing", "to": "alice"}))
        for ws in (alice_a, alice_b):
            assert receive(ws, "typing") == {"type": "typing", "from": "bob"}
    assert history(bob, a, "alice") == [message, fence]


def test_a_socket_opened_on_another_process_mid_conversation_gets_every_later_message_live(pair):
    """Process A published nothing for bob while his only socket was on A;
    once a socket of his opens on B, each message after its hello reaches it
    through the broadcast, in order, well inside the heartbeat's catch-up
    (CHATX_PRESENCE_TTL / 4 = 7.5 s): what a publisher remembers of other
    processes' subscriptions never keeps a frame back."""
    a, b, alice, bob, carol = pair
    make_partners(bob, alice, server=a)  # bob answered: alice's sends are no first contacts
    with alice.ws(a) as alice_a, bob.ws(a) as bob_a:
        hello(alice_a)
        hello(bob_a)
        for n in range(10):
            send(alice_a, "bob", f"before {n}", f"before-{n}")
        frames_until(bob_a, is_message_with("before-9"))
        with bob.ws(b) as bob_b:
            seq = hello(bob_b)["seq"]
            for n in range(10):
                send(alice_a, "bob", f"after {n}", f"after-{n}")
                frames_until(alice_a, lambda f, n=n: f["type"] == "ack" and f["client_id"] == f"after-{n}")
            frames = frames_until(bob_b, is_message_with("after-9"), timeout=5)
            assert [f["message"]["client_id"] for f in frames if f["type"] == "message"] == [
                f"after-{n}" for n in range(10)]
            assert [f["seq"] for f in frames if f["type"] == "message"] == list(range(seq + 1, seq + 11))


def test_an_idle_subscriber_outlives_the_redis_socket_timeout(pair):
    """redis-py 8 reads with a 5 s socket timeout by default; a quiet chat must
    not lose its subscription to it."""
    a, b, alice, bob, carol = pair
    with alice.ws(a) as alice_a, bob.ws(b) as bob_b:
        hello(alice_a), hello(bob_b)
        drain(alice_a), drain(bob_b)
        time.sleep(12)  # idle: nothing is published for more than twice the timeout
        assert a.health()[0] == 200 and b.health()[0] == 200
        send(alice_a, "bob", "after a quiet spell", "quiet-1")
        message = receive(alice_a, "ack")["message"]
        assert messages_in(frames_until(bob_b, is_message(message["id"]))) == [message]
    for server in (a, b):
        assert "broadcast connection lost" not in server.log.read_text()


# ---- presence ------------------------------------------------------------------------


def test_presence_is_one_online_and_one_offline_frame_whichever_process_the_sockets_are_on(pair):
    a, b, alice, bob, carol = pair
    make_partners(alice, bob, server=a)  # v2: presence goes to partners only
    make_partners(carol, bob, server=a)
    with ExitStack() as sockets:
        watcher = sockets.enter_context(bob.ws(b))
        assert hello(watcher)["presence"] == []
        assert presence_of(drain(watcher), "bob") == []  # v2: not his own
        first = sockets.enter_context(alice.ws(a))
        hello(first)
        seen = frames_until(watcher, is_presence("alice"))
        online = presence_of(seen, "alice")
        assert [f["status"] for f in online] == ["online"] and online[0]["last_seen"].endswith("Z")
        for server in (a, b):
            assert seen_by(bob, server, "alice")["status"] == "online"

        second = sockets.enter_context(alice.ws(b))
        hello(second)  # its presence change (if any) was published before the hello
        second.send(json.dumps({"type": "typing", "to": "bob"}))
        assert presence_of(frames_until(watcher, is_typing_from("alice")), "alice") == []  # a second tab says nothing

        second.close()
        # Closing one of two tabs: alice stays online on both processes meanwhile...
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            for server in (a, b):
                assert seen_by(bob, server, "alice")["status"] == "online"
            time.sleep(0.1)
        first.send(json.dumps({"type": "typing", "to": "bob"}))
        # ...and no presence frame about her comes.
        assert presence_of(frames_until(watcher, is_typing_from("alice")), "alice") == []

        first.close()
        seen = frames_until(watcher, is_presence("alice"))
        offline = presence_of(seen, "alice")
        assert [f["status"] for f in offline] == ["offline"]
        assert offline[0]["last_seen"].endswith("Z") and offline[0]["last_seen"] >= online[0]["last_seen"]

        with carol.ws(b) as fence:  # carol's online frame is published after any late frame about alice
            hello(fence)
            assert presence_of(frames_until(watcher, is_presence("carol", "online")), "alice") == []
    for server in (a, b):
        listed = seen_by(bob, server, "alice")
        assert listed["status"] == "offline" and listed["last_seen"] == offline[0]["last_seen"]


def test_a_reconnect_to_another_process_within_the_grace_sends_nothing_and_offline_comes_after_it(cluster):
    grace = 2.0
    a, b = cluster(2, CHATX_PRESENCE_GRACE=str(grace))
    alice, bob = remote_sign_up(a, "alice"), remote_sign_up(b, "bob")
    make_partners(alice, bob, server=a)
    with bob.ws(b) as watcher:
        hello(watcher)
        with alice.ws(a) as first:
            hello(first)
            online = presence_of(frames_until(watcher, is_presence("alice")), "alice")
            assert [f["status"] for f in online] == ["online"]
        # Her page reloads, and this time the balancer picks the other process.
        with alice.ws(b) as again:
            assert [p["username"] for p in hello(again)["presence"]] == ["bob"]
            time.sleep(grace + 1)  # past the grace of the first socket's close
            assert presence_of(drain(watcher), "alice") == []
            for server in (a, b):
                assert seen_by(bob, server, "alice")["status"] == "online"
        closed_at = time.monotonic()
        frames = frames_until(watcher, is_presence("alice"), timeout=15)
        elapsed = time.monotonic() - closed_at
        assert [f["status"] for f in presence_of(frames, "alice")] == ["offline"]
        assert grace - 0.2 <= elapsed < grace + 5, f"offline came {elapsed:.1f} s after her last socket closed"
        assert presence_of(drain(watcher), "alice") == []
    assert seen_by(bob, a, "alice")["status"] == "offline"


# ---- idempotency ---------------------------------------------------------------------


def test_the_same_client_id_on_two_processes_at_once_stores_one_message(pair):
    a, b, alice, bob, carol = pair
    with alice.ws(a) as alice_a, alice.ws(b) as alice_b, bob.ws(b) as bob_b:
        for ws in (alice_a, alice_b, bob_b):
            hello(ws)
        logs: dict[Any, list[Frame]] = {alice_a: [], alice_b: []}
        originals = []
        for round_ in range(4):
            client_id = f"same-{round_}"
            send(alice_a, "bob", f"once {round_}", client_id)
            send(alice_b, "bob", f"once {round_}", client_id)
            acks = []
            for ws in (alice_a, alice_b):
                logs[ws] += frames_until(ws, lambda f: f["type"] == "ack")
                acks.append(logs[ws][-1])
            assert acks[0] == acks[1], acks
            assert acks[0]["client_id"] == client_id and acks[0]["message"]["body"] == f"once {round_}"
            originals.append(acks[0]["message"])
        send(alice_a, "bob", "fence", "fence")
        for ws in (alice_a, alice_b):
            logs[ws] += frames_until(ws, is_message_with("fence"))
        fence = messages_in(logs[alice_a])[-1]
        for ws in (alice_a, alice_b):
            assert messages_in(logs[ws]) == [*originals, fence]
        assert messages_in(frames_until(bob_b, is_message(fence["id"]))) == [*originals, fence]
        for ws in (alice_a, alice_b, bob_b):
            assert messages_in(drain(ws)) == []
    assert history(alice, a, "bob") == [*originals, fence]
    assert history(bob, b, "alice") == [*originals, fence]


# ---- logout --------------------------------------------------------------------------


def test_logout_on_one_process_closes_that_sessions_sockets_on_every_process_with_4401(pair):
    a, b, alice, bob, carol = pair
    other_session = remote_sign_in(b, "alice")
    with alice.ws(a) as alice_a, alice.ws(b) as alice_b, other_session.ws(a) as other, \
            bob.ws(a) as bob_a, bob.ws(b) as bob_b:
        for ws in (alice_a, alice_b, other, bob_a, bob_b):
            hello(ws)
        assert alice.post(a, "/api/logout").status_code == 204
        assert close_code(alice_b) == 4401
        assert close_code(alice_a) == 4401
        for ws in (other, bob_a, bob_b):  # still open: they answer a ping
            drain(ws)
        send(bob_b, "alice", "still here", "after-logout")
        message = receive(bob_b, "ack")["message"]
        assert receive(other, "message")["message"] == message
    assert alice.get(b, "/api/me").status_code == 401
    assert other_session.get(b, "/api/me").status_code == 200


# ---- a process that dies -------------------------------------------------------------


def test_users_of_a_killed_process_go_offline_within_the_presence_ttl(cluster):
    # With the default presence grace: a dead process's users are not in it.
    a, b = cluster(2, CHATX_PRESENCE_TTL="3")
    alice, bob = remote_sign_up(a, "alice"), remote_sign_up(b, "bob")
    make_partners(alice, bob, server=a)
    with ExitStack() as sockets:
        hello(sockets.enter_context(bob.ws(b)))  # bob's online frame was published before his hello
        alice_a = sockets.enter_context(alice.ws(a))
        listed = hello(alice_a)["presence"]
        assert [(p["username"], p["status"]) for p in listed] == [("bob", "online")]
        killed_at = time.monotonic()
        b.stop(signal.SIGKILL)
        frames = frames_until(alice_a, is_presence("bob"), timeout=10)
        elapsed = time.monotonic() - killed_at
        offline = presence_of(frames, "bob")
        assert [f["status"] for f in offline] == ["offline"], frames
        assert offline[0]["last_seen"].endswith("Z")
        assert elapsed < 3 + 5, f"bob went offline {elapsed:.1f} s after his process died"
    listed = seen_by(alice, a, "bob")
    assert listed["status"] == "offline" and listed["last_seen"] == offline[0]["last_seen"]


# ---- Redis restart -------------------------------------------------------------------


def test_open_sockets_catch_up_after_a_redis_restart_without_reconnecting(cluster, redis_server):
    a, b = cluster(2)
    alice, bob = remote_sign_up(a, "alice"), remote_sign_up(b, "bob")
    with alice.ws(a) as alice_a, bob.ws(b) as bob_b:
        hello(alice_a), hello(bob_b)
        drain(alice_a), drain(bob_b)

        redis_server.stop()
        for server in (a, b):
            wait_until(lambda: health_is(server, 503, "fail"), timeout=20, what=f"{server.base} to report Redis down")
        missed, alice_log = [], []
        for n in range(3):
            send(alice_a, "bob", f"while down {n}", f"down-{n}")
            alice_log += frames_until(alice_a, lambda f: f["type"] == "ack", timeout=15)
            ack = alice_log[-1]  # stored before published: acked without Redis
            assert ack["client_id"] == f"down-{n}"
            missed.append(ack["message"])
        assert [m["id"] for m in missed] == sorted(m["id"] for m in missed)

        redis_server.start()
        for server in (a, b):
            wait_until(lambda: health_is(server, 200, "ok"), timeout=20, what=f"{server.base} to report Redis back")

        # The same sockets, never reconnected, get what they missed.
        assert messages_in(frames_until(bob_b, is_message(missed[-1]["id"]), timeout=15)) == missed
        if not any(map(is_message(missed[-1]["id"]), alice_log)):
            alice_log += frames_until(alice_a, is_message(missed[-1]["id"]), timeout=15)
        assert messages_in(alice_log) == missed
        for ws in (bob_b, alice_a):
            assert messages_in(drain(ws)) == []

        send(alice_a, "bob", "after recovery", "up-1")
        live = receive(alice_a, "ack")["message"]
        for ws in (bob_b, alice_a):
            assert messages_in(frames_until(ws, is_message(live["id"]))) == [live]
        for ws in (bob_b, alice_a):
            assert messages_in(drain(ws)) == []
    assert history(bob, b, "alice") == [*missed, live]


def test_a_redis_that_stops_answering_is_reported_and_recovered_without_reconnecting(cluster, redis_server):
    """A frozen Redis resets nothing: only the keepalive notices the silence."""
    (server,) = cluster(1)
    alice, bob = remote_sign_up(server, "alice"), remote_sign_up(server, "bob")
    with alice.ws(server) as alice_ws, bob.ws(server) as bob_ws:
        hello(alice_ws), hello(bob_ws)
        drain(alice_ws), drain(bob_ws)
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: health_is(server, 503, "fail"), timeout=40, what="the silence to be noticed")
            send(alice_ws, "bob", "while frozen", "frozen-1")
            missed = receive(alice_ws, "ack", timeout=15)["message"]
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        wait_until(lambda: health_is(server, 200, "ok"), timeout=20, what="Redis to be back")
        assert messages_in(frames_until(bob_ws, is_message(missed["id"]), timeout=15)) == [missed]


# ---- shutdown ------------------------------------------------------------------------


def test_a_server_shutting_down_closes_its_sockets_with_1012(cluster):
    (server,) = cluster(1)
    alice = remote_sign_up(server, "alice")
    with alice.ws(server) as ws:
        hello(ws)
        drain(ws)
        server.stop(signal.SIGTERM)
        assert close_code(ws) == 1012


# ---- the handshake over real HTTP ----------------------------------------------------


def refused_status(server: ChatServer, **kwargs: Any) -> int:
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{server.ws_base}/ws", open_timeout=10, **kwargs).close()
    return refused.value.response.status_code


def test_the_websocket_handshake_needs_a_session_and_an_acceptable_origin(cluster):
    (server,) = cluster(1)
    alice = remote_sign_up(server, "alice")
    assert refused_status(server) == 403
    assert refused_status(server, additional_headers={"Cookie": f"{chatx.SESSION_COOKIE}=forged.cookie"}) == 403
    assert refused_status(server, additional_headers=alice.headers(), origin="https://evil.example") == 403
    with connect(f"{server.ws_base}/ws", open_timeout=10, additional_headers=alice.headers(),
                 origin=f"http://127.0.0.1:{server.port}") as ws:
        assert hello(ws)["user"]["username"] == "alice"


# ---- a slow reader -------------------------------------------------------------------


def test_a_reader_more_than_1000_frames_behind_is_closed_with_1013_and_loses_nothing(cluster):
    # No grace, so that bob sees alice offline as soon as her socket is cut; and
    # no typing limit, so that every typing frame is one more frame for her.
    (server,) = cluster(1, CHATX_SEND_RATE="100000", CHATX_SEND_BURST="100000", CHATX_PRESENCE_GRACE="0",
                        CHATX_TYPING_INTERVAL="0", CHATX_METRICS="1")
    alice, bob = remote_sign_up(server, "alice"), remote_sign_up(server, "bob")
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window for good
    raw.connect(("127.0.0.1", server.port))
    acked: list[int] = []
    with connect(f"{server.ws_base}/ws", sock=raw, additional_headers=alice.headers(), open_timeout=10,
                 max_size=2**20) as slow:
        hello(slow)
        with bob.ws(server) as flooder:
            hello(flooder)
            typing = json.dumps({"type": "typing", "to": "alice"})
            started, rounds, cut = time.monotonic(), 0, False
            # alice reads nothing. Long messages fill the kernel's buffers (the
            # server's send buffer alone takes megabytes on loopback); typing
            # frames, one frame each, then pile up behind them. Until her socket
            # is closed, which bob sees as her going offline (his first message made them partners).
            while not cut and rounds < 40 and time.monotonic() - started < 30:
                for n in range(100):
                    send(flooder, "alice", "x" * 4000, f"r{rounds}-{n}")
                for _ in range(1000):
                    flooder.send(typing)
                rounds += 1
                frames = drain(flooder)
                acked += [f["message"]["id"] for f in frames if f["type"] == "ack"]
                cut = any(f["status"] == "offline" for f in presence_of(frames, "alice"))
            assert cut, f"alice's socket was still open after {rounds * 100} messages and {rounds * 1000} typing frames"
        # Now alice reads: what was already on its way, then the close frame.
        received: list[int] = []
        deadline = time.monotonic() + 20
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(200_000):
                frame = json.loads(slow.recv(timeout=max(deadline - time.monotonic(), 0.01)))
                if frame["type"] == "message":
                    received.append(frame["message"]["id"])
        # The close frame when it can still be written, else a reset (docs/protocol.md, close codes);
        # the server counts a 1013 either way.
        assert closed.value.rcvd is None or closed.value.rcvd.code == 1013, closed.value
    assert server.metric('chatx_sockets_closed_total{code="1013"}') == 1
    assert len(acked) == rounds * 100 and received == sorted(set(received))
    last = received[-1] if received else 0
    assert received == [i for i in acked if i <= last]
    # She reconnects from the last message she has and loses nothing.
    with alice.ws(server, after=last) as again:
        hello(again)
        assert [m["id"] for m in messages_in(drain(again))] == [i for i in acked if i > last]
