"""A user's stream (docs/protocol.md, "The stream and `seq`"): every message, read, edit and
delete that concerns a user is numbered 1, 2, 3, ... in that user's stream,
with no gap and no reuse, whichever process committed it; every socket gets
the stream in seq order, each event once, live and replayed alike, across a
Redis restart; `since=S` resumes it and `after=N` (v1) still works."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any, Callable

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from websockets.sync.client import ClientConnection, connect

import chatx
from conftest import (PASSWORD, ChatServer, Person, Remote, fresh_postgres_database, health_is, hello_of, quiet,
                      remote_sign_up, sign_up, user_row_locked, wait_until, ws_query)

Frame = dict[str, Any]
STREAM_TYPES = ("message", "read", "edit", "delete")
FAST = {"CHATX_SEND_RATE": "100000", "CHATX_SEND_BURST": "100000"}
BIG = 10**9  # a read cursor past every message: taken as the conversation's newest


# ---- helpers -------------------------------------------------------------------------


def is_stream(frame: Frame) -> bool:
    return frame["type"] in STREAM_TYPES


def stream_of(frames: list[Frame]) -> list[Frame]:
    return [f for f in frames if is_stream(f)]


def seqs_of(frames: list[Frame]) -> list[int]:
    return [f["seq"] for f in frames]


def key(frame: Frame) -> tuple:
    """What a stream frame is about, regardless of when it was made: a live
    message frame shows the body as sent, a replayed one the body as it is now."""
    if frame["type"] == "read":
        return frame["seq"], "read", frame["reader"], frame["with"], frame["up_to"]
    return frame["seq"], frame["type"], frame["message"]["id"]


class Tab:
    """One real socket of a user, keeping every frame it got after hello."""

    def __init__(self, person: Remote, server: ChatServer, since: int | None = None, after: int | None = None):
        self.person, self.server = person, server
        # max_queue=None: with websockets' default of 16 frames, a client that
        # closes with more unread frames than that stops reading, misses the
        # server's close frame and waits its close_timeout (10 s) for nothing.
        self.ws: ClientConnection = connect(f"{server.ws_base}/ws{ws_query(since=since, after=after)}",
                                            additional_headers=person.headers(), open_timeout=10,
                                            max_size=2**22, max_queue=None).__enter__()  # closed by close()
        self.hello = json.loads(self.ws.recv(timeout=10))
        assert self.hello["type"] == "hello", self.hello
        self.frames: list[Frame] = []

    def __repr__(self) -> str:
        return f"<Tab {self.person.username} on :{self.server.port}>"

    def send(self, frame: Frame) -> None:
        self.ws.send(json.dumps(frame))

    def recv(self, timeout: float) -> Frame:
        frame = json.loads(self.ws.recv(timeout=max(timeout, 0.01)))
        self.frames.append(frame)
        return frame

    def until(self, done: Callable[[Frame], bool], timeout: float = 20) -> Frame:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                frame = self.recv(remaining)
            except TimeoutError:
                raise AssertionError(f"{self}: timed out after {timeout} s; last frames: {self.frames[-5:]}") from None
            if done(frame):
                return frame

    def until_seq(self, seq: int, timeout: float = 20) -> None:
        if seq > self.hello["seq"] and not any(f.get("seq", 0) >= seq for f in self.stream):
            self.until(lambda f: is_stream(f) and f["seq"] >= seq, timeout)

    def drain(self) -> list[Frame]:
        """Everything up to the answer to a ping (kept in frames too)."""
        self.send({"type": "ping"})
        start = len(self.frames)
        self.until(lambda f: f["type"] == "pong")
        return self.frames[start:-1]

    @property
    def stream(self) -> list[Frame]:
        return stream_of(self.frames)

    def errors(self) -> list[Frame]:
        return [f for f in self.frames if f["type"] == "error"]

    def close(self) -> None:
        self.ws.close()


def replay(person: Remote, server: ChatServer, since: int = 0) -> tuple[int, list[Frame]]:
    """hello's seq, and the stream frames a new socket replays with `since`
    (nothing is expected to happen meanwhile)."""
    tab = Tab(person, server, since=since)
    try:
        newest = tab.hello["seq"]
        tab.until_seq(newest, timeout=30)
        tab.drain()
        return newest, tab.stream
    finally:
        tab.close()


def in_parallel(work: list[Callable[[], Any]]) -> list[Any]:
    """Run every callable at once (after a common start line); re-raise the first failure."""
    start = threading.Barrier(len(work))

    def run(job: Callable[[], Any]) -> Any:
        start.wait(timeout=30)
        return job()

    with ThreadPoolExecutor(len(work)) as pool:
        return [future.result() for future in [pool.submit(run, job) for job in work]]


def send_and_collect_acks(tab: Tab, frames: list[Frame], timeout: float = 60) -> list[Frame]:
    """Send the frames without waiting, then read until every `send` among them is acked."""
    for frame in frames:
        tab.send(frame)
    return collect_acks(tab, [f["client_id"] for f in frames if f["type"] == "send"], timeout)


def collect_acks(tab: Tab, client_ids: list[str], timeout: float = 60) -> list[Frame]:
    """The acked messages of these client ids, in their order, once every one came
    (and every frame the socket was sent before is handled: the reads too)."""
    wanted = set(client_ids)
    acks = {f["client_id"]: f["message"] for f in tab.frames if f["type"] == "ack" and f["client_id"] in wanted}
    deadline = time.monotonic() + timeout
    while len(acks) < len(wanted):
        frame = tab.until(lambda f: f["type"] in ("ack", "error"), max(deadline - time.monotonic(), 0.01))
        assert frame["type"] == "ack", f"{tab}: {frame}"
        acks[frame["client_id"]] = frame["message"]
    tab.drain()
    assert tab.errors() == [], tab.errors()
    return [acks[client_id] for client_id in client_ids]


def message(to: str, body: str, client_id: str) -> Frame:
    return {"type": "send", "to": to, "body": body, "client_id": client_id}


def read(peer: str) -> Frame:
    return {"type": "read", "with": peer, "up_to": BIG}


def check_stream(username: str, newest: int, stream: list[Frame], since: int = 0) -> None:
    """seq since+1 .. newest, each once, in order; message ids grow along the stream."""
    assert seqs_of(stream) == list(range(since + 1, newest + 1)), (username, seqs_of(stream))
    ids = [f["message"]["id"] for f in stream if f["type"] == "message"]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), (username, ids)


def check_live(tab: Tab, newest: int, replayed: list[Frame]) -> None:
    """What a socket got live: hello's seq + 1 .. newest, each once, in order,
    the very events the database holds at those seqs."""
    tab.until_seq(newest)
    tab.drain()
    live = tab.stream
    assert seqs_of(live) == list(range(tab.hello["seq"] + 1, newest + 1)), (tab, seqs_of(live))
    assert [key(f) for f in live] == [key(f) for f in replayed if f["seq"] > tab.hello["seq"]], tab


# ---- many processes committing at once --------------------------------------------------

USERS, MESSAGES_PER_USER = 6, 60


def test_seq_is_gap_free_and_per_user_with_five_processes_committing_at_once(shared_database, cluster):
    servers = cluster(5, **FAST, **shared_database)
    names = [f"user{i}" for i in range(USERS)]
    people = in_parallel([lambda i=i, name=name: remote_sign_up(servers[i % len(servers)], name)
                          for i, name in enumerate(names)])
    with ExitStack() as stack:
        # Each user has two sockets, on two different processes, and sends half of
        # their messages through each, to every other user in turn, with a read now and then.
        tabs, plans = [], []
        for i, person in enumerate(people):
            for half, offset in enumerate((0, 2)):
                tab = Tab(person, servers[(i + offset) % len(servers)])
                stack.callback(tab.close)
                plan = []
                for n in range(half, MESSAGES_PER_USER, 2):
                    peer = names[(i + 1 + n % (USERS - 1)) % USERS]
                    plan.append(message(peer, f"{names[i]} #{n}", f"{names[i]}-{n}"))
                    if n % 7 == 0:
                        plan.append(read(peer))
                tabs.append(tab)
                plans.append(plan)
        assert all(tab.hello["seq"] == 0 for tab in tabs)

        acked = in_parallel([lambda tab=tab, plan=plan: send_and_collect_acks(tab, plan)
                             for tab, plan in zip(tabs, plans)])
        sent = {m["id"]: m for acks in acked for m in acks}
        assert len(sent) == USERS * MESSAGES_PER_USER

        streams: dict[str, list[Frame]] = {}
        newest: dict[str, int] = {}
        for i, person in enumerate(people):
            newest[person.username], streams[person.username] = replay(person, servers[(i + 3) % len(servers)])

        seq_in: dict[str, dict[int, int]] = {}  # username -> message id -> its seq in that stream
        for name in names:
            stream = streams[name]
            check_stream(name, newest[name], stream)
            mine = sorted(m["id"] for m in sent.values() if name in (m["from"], m["to"]))
            in_stream = [f["message"]["id"] for f in stream if f["type"] == "message"]
            assert sorted(in_stream) == mine, f"{name}: each of their messages once in their stream"
            seq_in[name] = {f["message"]["id"]: f["seq"] for f in stream if f["type"] == "message"}
            reads = [f for f in stream if f["type"] == "read"]
            assert reads and all(name in (f["reader"], f["with"]) for f in reads), name
        # seq is per user: the two people of one message get their own numbers.
        differing = [m for m in sent.values() if seq_in[m["from"]][m["id"]] != seq_in[m["to"]][m["id"]]]
        assert differing, "every message had the same seq in both streams: seq looks global, not per user"

        # And every one of the twelve sockets got its user's stream live, in order, once.
        for tab in tabs:
            name = tab.person.username
            check_live(tab, newest[name], streams[name])


# ---- PostgreSQL: ordering per user, not per cluster ------------------------------------


def test_while_one_user_s_row_is_locked_a_commit_for_other_users_completes_and_one_for_that_user_waits(
        shared_postgres, cluster):
    """No write takes a lock that all users share: a transaction holding
    alice's row (as a writer of hers would) holds up bob's message to her, on
    process A, but not carol's to dave, committed meanwhile on process B."""
    a, b = cluster(2, **FAST, **shared_postgres)
    alice, bob, carol, dave = (remote_sign_up(server, name) for server, name in
                               ((a, "alice"), (a, "bob"), (b, "carol"), (a, "dave")))
    with ExitStack() as stack:
        bob_tab, carol_tab, dave_tab = (Tab(person, server) for person, server in ((bob, a), (carol, b), (dave, a)))
        for tab in (bob_tab, carol_tab, dave_tab):
            stack.callback(tab.close)
        with user_row_locked(shared_postgres["CHATX_DATABASE_URL"], alice.id) as lock:
            bob_tab.send(message("alice", "held up", "held-1"))
            wait_until(lambda: lock.lock_waiters() >= 1, what="bob's commit to wait for alice's row")
            [meanwhile] = send_and_collect_acks(carol_tab, [message("dave", "meanwhile", "free-1")], timeout=20)
            assert dave_tab.until(lambda f: f["type"] == "message")["message"] == meanwhile
            assert [f for f in bob_tab.drain() if f["type"] in ("ack", "message", "error")] == []
            assert lock.lock_waiters() >= 1, "bob's message no longer waits for alice's row"
        [held] = collect_acks(bob_tab, ["held-1"], timeout=20)
        assert held["id"] > meanwhile["id"]  # taken after alice's row was free: ids follow each user's commits
        newest, stream = replay(alice, b)
        assert newest == 1 and [(f["seq"], f["message"]) for f in stream] == [(1, held)]


OVERLAPPING_USERS, PARTNERS, MESSAGES_EACH = 12, 3, 24


def test_four_postgresql_processes_give_every_socket_its_whole_stream_in_order_with_overlapping_conversations(
        shared_postgres, cluster):
    """Each user talks to the next three at once, so everyone's partners talk
    to each other too; each has two sockets on two of four processes and
    sends, reads, edits and deletes through both. Commits of the four
    writers interleave and lock users in every mix: no client sees an error
    (a deadlock PostgreSQL reported would be retried, and counted here), and
    every socket gets its user's stream gap-free, in order, once, all of it."""
    servers = cluster(4, **FAST, **shared_postgres, CHATX_METRICS="1", CHATX_SIGNUPS_PER_ADDRESS="0")
    names = [f"user{i}" for i in range(OVERLAPPING_USERS)]
    # One sign-up at a time per process: a client address gets two hashes at once.
    signed_up = in_parallel([lambda k=k, server=server: [remote_sign_up(server, name) for name in names[k::4]]
                             for k, server in enumerate(servers)])
    people = [signed_up[i % 4][i // 4] for i in range(OVERLAPPING_USERS)]
    with ExitStack() as stack:
        tabs, plans = [], []
        for i, person in enumerate(people):
            partners = [names[(i + 1 + k) % OVERLAPPING_USERS] for k in range(PARTNERS)]
            for half, server in enumerate((servers[i % 4], servers[(i + 1 + i // 4) % 4])):
                tab = Tab(person, server)
                stack.callback(tab.close)
                plan = []
                for n in range(half, MESSAGES_EACH, 2):
                    plan.append(message(partners[n % PARTNERS], f"{names[i]} #{n}", f"{names[i]}-{n}"))
                    if n % 4 == 1:
                        plan.append(read(partners[(n + 1) % PARTNERS]))
                tabs.append(tab)
                plans.append(plan)
        acked = in_parallel([lambda tab=tab, plan=plan: send_and_collect_acks(tab, plan)
                             for tab, plan in zip(tabs, plans)])
        sent = {m["id"]: m for acks in acked for m in acks}
        assert len(sent) == OVERLAPPING_USERS * MESSAGES_EACH

        def change(tab: Tab, own: list[Frame]) -> None:  # through the other socket than the sends
            for n, m in enumerate(own[:4]):
                tab.send({"type": "edit", "id": m["id"], "body": f"edited {m['body']}"} if n % 2 else
                         {"type": "delete", "id": m["id"]})
                tab.send(read(m["to"]))
            tab.drain()
            assert tab.errors() == [], tab.errors()

        in_parallel([lambda i=i: change(tabs[i ^ 1], acked[i]) for i in range(len(tabs))])

        for i, person in enumerate(people):
            newest, stream = replay(person, servers[(i + 2) % 4])
            check_stream(person.username, newest, stream)
            mine = sorted(m["id"] for m in sent.values() if person.username in (m["from"], m["to"]))
            assert sorted(f["message"]["id"] for f in stream if f["type"] == "message") == mine, person.username
            assert {f["type"] for f in stream} == set(STREAM_TYPES), person.username
            for tab in tabs[2 * i:2 * i + 2]:
                check_live(tab, newest, stream)
    retries = sum(server.metric("chatx_commit_retries_total") for server in servers)
    print(f"batches retried after a deadlock or serialization failure: {retries:.0f}")
    for server in servers:
        assert "Traceback" not in server.log.read_text(), server.log


# ---- live delivery under concurrent senders ----------------------------------------------


def test_every_socket_receives_its_stream_in_seq_order_once_under_concurrent_senders_on_two_processes(cluster):
    a, b = cluster(2, **FAST)
    alice, bob, carol = remote_sign_up(a, "alice"), remote_sign_up(b, "bob"), remote_sign_up(a, "carol")
    with ExitStack() as stack:
        tabs = {}
        for person, server in ((alice, a), (alice, b), (bob, a), (bob, b), (carol, a), (carol, b)):
            tabs[person.username, server.port] = tab = Tab(person, server)
            stack.callback(tab.close)
        senders = [(tabs["alice", a.port], ("bob", "carol")), (tabs["bob", b.port], ("alice", "carol")),
                   (tabs["carol", b.port], ("alice", "bob")), (tabs["alice", b.port], ("carol",))]

        def plan(tab: Tab, peers: tuple[str, ...], count: int = 40) -> list[Frame]:
            frames = []
            for n in range(count):
                peer = peers[n % len(peers)]
                frames.append(message(peer, f"{tab.person.username}:{tab.server.port} #{n}",
                                      f"{tab.person.username}-{tab.server.port}-{n}"))
                if n % 6 == 5:
                    frames.append(read(peer))
            return frames

        acked = in_parallel([lambda tab=tab, peers=peers: send_and_collect_acks(tab, plan(tab, peers))
                             for tab, peers in senders])

        # Then edits and deletes, from the other process than each author's sends, with reads.
        def change(tab: Tab, own: list[Frame]) -> None:
            for n, m in enumerate(own[:8]):
                if n < 5:
                    tab.send({"type": "edit", "id": m["id"], "body": f"edited {m['body']}"})
                else:
                    tab.send({"type": "delete", "id": m["id"]})
                tab.send(read(own[-1 - n]["to"]))
            tab.drain()  # each frame is handled before the ping after it
            assert tab.errors() == [], tab.errors()

        changers = [tabs["alice", b.port], tabs["bob", a.port], tabs["carol", a.port]]
        in_parallel([lambda tab=tab, own=own: change(tab, own) for tab, own in zip(changers, acked)])

        for person, server in ((alice, b), (bob, a), (carol, b)):
            newest, stream = replay(person, server)
            check_stream(person.username, newest, stream)
            kinds = {f["type"] for f in stream}
            assert kinds == set(STREAM_TYPES), (person.username, kinds)
            for tab in tabs.values():
                if tab.person is person:
                    check_live(tab, newest, stream)


# ---- a reader far behind -------------------------------------------------------------------


def slow_socket(person: Remote, server: ChatServer) -> ClientConnection:
    """A socket whose client reads only when told to: with a receive buffer as
    small as the kernel allows and websockets' queue of 16 frames, what it does
    not take waits on the server."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", server.port))
    return connect(server.ws_base + "/ws", sock=raw, additional_headers=person.headers(), open_timeout=10,
                   max_size=2**20, max_queue=16)


BEHIND = 5000


def test_a_reader_thousands_of_events_behind_stays_open_and_gets_every_one_in_seq_order(tmp_path):
    """v3 §4: past a bounded backlog a socket's stream is read from storage at
    its reader's pace (v2 closed it with 1013 past 1,000 frames)."""
    server = ChatServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}", "CHATX_METRICS": "true", **FAST},
                        tmp_path)
    server.start()
    try:
        alice, bob = remote_sign_up(server, "alice"), remote_sign_up(server, "bob")
        sender = Tab(bob, server)
        with slow_socket(alice, server) as slow:
            assert json.loads(slow.recv(timeout=10))["type"] == "hello"
            fast = Tab(alice, server)  # a second socket of hers that keeps up
            body = "x" * 1000
            for start in range(0, BEHIND, 500):  # alice's slow socket takes nothing meanwhile
                send_and_collect_acks(sender, [message("alice", body, f"m-{n}")
                                               for n in range(start, start + 500)], timeout=120)
            fast.until_seq(BEHIND, timeout=60)
            assert seqs_of(fast.stream) == list(range(1, BEHIND + 1))
            fast.close()
            seqs = []
            while len(seqs) < BEHIND:
                frame = json.loads(slow.recv(timeout=20))
                if is_stream(frame):
                    seqs.append(frame["seq"])
            assert seqs == list(range(1, BEHIND + 1))
            # Still open, and live again.
            sender.send(message("alice", "caught up?", "last"))
            frame = json.loads(slow.recv(timeout=20))
            while frame["type"] == "presence":
                frame = json.loads(slow.recv(timeout=20))
            assert (frame["seq"], frame["message"]["body"]) == (BEHIND + 1, "caught up?")
        sender.close()
        assert server.metric('chatx_sockets_closed_total{code="1013"}') == 0
    finally:
        server.stop()


# ---- a Redis restart under open sockets ---------------------------------------------------


def test_open_sockets_get_every_event_of_a_redis_outage_in_seq_order_once_without_reconnecting(cluster, redis_server):
    a, b = cluster(2, **FAST)
    alice, bob = remote_sign_up(a, "alice"), remote_sign_up(b, "bob")
    with ExitStack() as stack:
        tabs = [Tab(alice, a), Tab(alice, b), Tab(bob, b), Tab(bob, a)]
        for tab in tabs:
            stack.callback(tab.close)
        alice_a, alice_b, bob_b, bob_a = tabs
        # Some history first, so that the stream does not start at the outage.
        send_and_collect_acks(alice_a, [message("bob", "before", "before-1")])
        send_and_collect_acks(bob_b, [message("alice", "before too", "before-2"), read("alice")])

        redis_server.stop()
        for server in (a, b):
            wait_until(lambda: health_is(server, 503, "fail"), timeout=20, what=f"{server.base} to report Redis down")
        # Both processes commit while they cannot tell each other: messages, reads, an edit and a delete.
        from_alice = send_and_collect_acks(alice_a, [message("bob", f"down a{n}", f"down-a{n}") for n in range(3)])
        from_bob = send_and_collect_acks(bob_b, [message("alice", f"down b{n}", f"down-b{n}") for n in range(3)]
                                         + [read("alice")])
        send_and_collect_acks(alice_a, [{"type": "edit", "id": from_alice[0]["id"], "body": "edited while down"},
                                        read("bob"), message("bob", "down a3", "down-a3")])
        send_and_collect_acks(bob_b, [{"type": "delete", "id": from_bob[1]["id"]},
                                      message("alice", "down b3", "down-b3")])
        # What each stream holds now, read from the database (new sockets need no Redis).
        expected = {person.username: replay(person, server) for person, server in ((alice, b), (bob, a))}

        redis_server.start()
        back = time.monotonic()
        for tab in tabs:  # the same sockets, never reconnected
            newest = expected[tab.person.username][0]
            tab.until_seq(newest, timeout=max(15 - (time.monotonic() - back), 0.01))
        caught_up = time.monotonic() - back
        assert caught_up < 15, f"the sockets caught up {caught_up:.1f} s after Redis came back"
        for tab in tabs:
            newest, stream = expected[tab.person.username]
            check_stream(tab.person.username, newest, stream)
            check_live(tab, newest, stream)

        # And live delivery goes on after the outage with no gap and no repeat.
        for server in (a, b):
            wait_until(lambda: health_is(server, 200, "ok"), timeout=20, what=f"{server.base} to report Redis back")
        send_and_collect_acks(bob_a, [message("alice", "after", "after-1")])
        send_and_collect_acks(alice_b, [message("bob", "after too", "after-2"), read("bob")])
        for person, server in ((alice, a), (bob, b)):
            newest, stream = replay(person, server)
            check_stream(person.username, newest, stream)
            for tab in tabs:
                if tab.person is person:
                    check_live(tab, newest, stream)


# ---- reconnecting after every frame -------------------------------------------------------


def test_reconnecting_with_since_after_every_single_frame_loses_nothing_and_repeats_nothing(cluster):
    a, b = cluster(2, CHATX_PRESENCE_GRACE="0", **FAST)
    alice, bob = remote_sign_up(a, "alice"), remote_sign_up(a, "bob")
    count = 40
    done = threading.Event()
    acked: list[Frame] = []

    def bob_sends() -> None:
        tab = Tab(bob, a)
        try:
            for n in range(count):
                tab.send(message("alice", f"one by one {n}", f"obo-{n}"))
                if n % 4 == 3:
                    tab.send(read("alice"))
                time.sleep(0.02)
            acked.extend(collect_acks(tab, [f"obo-{n}" for n in range(count)]))
        finally:
            tab.close()
            done.set()

    got: list[Frame] = []
    log: list[tuple] = []  # per connection: process, since, hello's seq, what came
    with ThreadPoolExecutor(1) as pool:
        sender = pool.submit(bob_sends)
        last, connections, started = 0, 0, time.monotonic()
        while True:
            assert time.monotonic() - started < 90, f"still reconnecting after 90 s; the last connections: {log[-8:]}"
            finished = done.is_set()
            server = (a, b)[connections % 2]
            tab = Tab(alice, server, since=last)
            connections += 1
            try:
                if finished and tab.hello["seq"] == last:
                    break
                try:
                    frame = tab.until(is_stream, timeout=2)
                except AssertionError:
                    log.append((server.port, last, tab.hello["seq"], "nothing", tab.frames))
                    continue  # nothing new yet: reconnect and look again
                log.append((server.port, last, tab.hello["seq"], frame["seq"]))
                got.append(frame)
                last = frame["seq"]
            finally:
                tab.close()
        sender.result()
    newest, stream = replay(alice, b)
    assert seqs_of(got) == list(range(1, newest + 1)), seqs_of(got)
    assert [key(f) for f in got] == [key(f) for f in stream]
    assert [f["message"]["id"] for f in got if f["type"] == "message"] == [m["id"] for m in acked]
    assert any(f["type"] == "read" for f in got)


# ---- since= in-process ---------------------------------------------------------------------


def next_stream(ws: Any) -> Frame:
    while not is_stream(frame := ws.receive_json()):
        assert frame["type"] in ("presence", "ack", "pong"), frame
    return frame


def replayed(person: Person, since: int | None = None, after: int | None = None) -> tuple[Frame, list[Frame]]:
    with person.ws(since=since, after=after) as ws:
        hello = hello_of(ws)
        return hello, stream_of(quiet(ws))


def test_since_replays_messages_reads_edits_and_deletes_in_seq_order_then_continues_live(make_client, database_url):
    client = make_client(database_url=database_url)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    with alice.ws() as alice_ws, bob.ws() as bob_ws:
        assert hello_of(alice_ws)["seq"] == 0 and hello_of(bob_ws)["seq"] == 0
        alice_ws.send_json(message("bob", "first version", "c-1"))
        sent = next_stream(alice_ws)["message"]
        next_stream(bob_ws)
        bob_ws.send_json({"type": "read", "with": "alice", "up_to": sent["id"]})
        assert next_stream(bob_ws)["seq"] == 2 and next_stream(alice_ws)["seq"] == 2
        alice_ws.send_json({"type": "edit", "id": sent["id"], "body": "second version"})
        assert next_stream(alice_ws)["type"] == "edit"
        alice_ws.send_json({"type": "delete", "id": sent["id"]})
        assert next_stream(alice_ws)["type"] == "delete"
        assert [(f["type"], f["seq"]) for f in stream_of(quiet(bob_ws))] == [("edit", 3), ("delete", 4)]

    for person in (alice, bob):
        hello, frames = replayed(person, since=0)
        assert hello["seq"] == 4
        assert [(f["type"], f["seq"]) for f in frames] == [("message", 1), ("read", 2), ("edit", 3), ("delete", 4)]
        shown = frames[0]["message"]
        assert (shown["id"], shown["from"], shown["to"], shown["sent_at"]) == (sent["id"], "alice", "bob",
                                                                               sent["sent_at"])
        assert shown["body"] == "" and shown["deleted"] is True, "a replayed message shows its current state"
        assert frames[1] == {"type": "read", "seq": 2, "reader": "bob", "with": "alice", "up_to": sent["id"]}
        assert frames[2]["message"]["id"] == frames[3]["message"]["id"] == sent["id"]
        assert frames[3]["message"]["deleted"] is True and frames[3]["message"]["body"] == ""
        assert "first version" not in json.dumps(frames) and "second version" not in json.dumps(frames)

        hello, frames = replayed(person, since=2)
        assert hello["seq"] == 4 and [(f["type"], f["seq"]) for f in frames] == [("edit", 3), ("delete", 4)]
        hello, frames = replayed(person, since=4)
        assert hello["seq"] == 4 and frames == []

    # Live frames follow the replay with no gap and no repeat; a since beyond
    # the newest seq replays nothing and still gets what comes next.
    with bob.ws(since=2) as resumed, bob.ws(since=99) as ahead, alice.ws() as alice_ws:
        assert hello_of(resumed)["seq"] == 4 and hello_of(ahead)["seq"] == 4
        hello_of(alice_ws)
        assert [f["seq"] for f in stream_of(quiet(resumed))] == [3, 4]
        assert stream_of(quiet(ahead)) == []
        alice_ws.send_json(message("bob", "live after replay", "c-2"))
        for ws in (resumed, ahead):
            frame = next_stream(ws)
            assert (frame["type"], frame["seq"], frame["message"]["body"]) == ("message", 5, "live after replay")
            assert stream_of(quiet(ws)) == []


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", ""])
def test_a_since_that_is_not_a_whole_number_is_an_invalid_field_error_then_close_1008(client: TestClient, value):
    alice = sign_up(client, "alice")
    with alice.ws(since=value) as ws:
        frame = ws.receive_json()
        assert frame["type"] == "error" and frame["code"] == "invalid_field", frame
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1008


def test_after_still_replays_the_message_frames_with_an_id_above_it(make_client, database_url):
    client = make_client(database_url=database_url)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    with alice.ws() as alice_ws, bob.ws() as bob_ws:
        hello_of(alice_ws), hello_of(bob_ws)
        ids = []
        for n in range(2):
            alice_ws.send_json(message("bob", f"m{n}", f"c-{n}"))
            ids.append(next_stream(alice_ws)["message"]["id"])
        bob_ws.send_json({"type": "read", "with": "alice", "up_to": ids[-1]})
        assert next_stream(alice_ws)["type"] == "read"
        bob_ws.send_json(message("alice", "m2", "c-2"))
        ids.append(next_stream(alice_ws)["message"]["id"])

    for person in (alice, bob):
        hello, frames = replayed(person, after=ids[0])
        assert hello["seq"] == 4
        assert [f["message"]["id"] for f in frames if f["type"] == "message"] == ids[1:]
        check_stream(person.username, 4, frames, since=frames[0]["seq"] - 1)
        assert frames[-1]["seq"] == 4
        hello, frames = replayed(person, after=0)
        assert [f["message"]["id"] for f in frames if f["type"] == "message"] == ids
        hello, frames = replayed(person, after=ids[-1])
        assert frames == []


# ---- a gap is filled from the database ------------------------------------------------------


def test_a_socket_handed_a_later_seq_first_sends_the_missing_events_from_the_database_first(client: TestClient):
    chat = client.app.state.chat
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    with alice.ws() as alice_ws, bob.ws() as bob_ws:
        hello_of(alice_ws), hello_of(bob_ws)
        alice_ws.send_json(message("bob", "hello bob", "c-1"))
        first = next_stream(alice_ws)["message"]
        assert next_stream(bob_ws)["seq"] == 1

        # Two events committed but never handed to the sockets (as if another
        # process stored them and its broadcast had not arrived yet).
        async def commit_quietly() -> list[chatx.Stored]:
            me, peer = await chat.accounts.find_user("alice"), await chat.accounts.find_user("bob")
            edit = await chat.storage.write(chatx.change_message, me.id, first["id"], "quietly edited")
            seen = await chat.storage.write(chatx.advance_read_cursor, peer, me, BIG)
            return [edit, seen]

        quiet_ones = client.portal.call(commit_quietly)
        assert [s.seqs for s in quiet_ones] == [{alice.id: 2, bob.id: 2}, {alice.id: 3, bob.id: 3}]
        for ws in (alice_ws, bob_ws):
            assert stream_of(quiet(ws)) == []

        # Seq 4 arrives live: each socket first sends 2 and 3, read from the database.
        bob_ws.send_json(message("alice", "hello alice", "c-2"))
        for ws in (alice_ws, bob_ws):
            frames = [next_stream(ws) for _ in range(3)]
            assert [(f["type"], f["seq"]) for f in frames] == [("edit", 2), ("read", 3), ("message", 4)]
            assert frames[0]["message"]["body"] == "quietly edited"
            assert frames[1] == {"type": "read", "seq": 3, "reader": "bob", "with": "alice", "up_to": first["id"]}
            assert stream_of(quiet(ws)) == []

        # The late live frames of 2 and 3 (the broadcast catching up) are repeats: nothing is sent.
        async def deliver_late() -> None:
            for stored in quiet_ones:
                chat.messenger.announce(stored)

        client.portal.call(deliver_late)
        for ws in (alice_ws, bob_ws):
            assert stream_of(quiet(ws)) == []
