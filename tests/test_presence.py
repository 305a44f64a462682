"""Presence and the status hook (CONTRACT §5), on SQLite and on PostgreSQL."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

import chatx
from conftest import next_frame, quiet, settle, sign_up, wait_until


def presence_frames(frames: list[dict]) -> list[dict]:
    return [f for f in frames if f["type"] == "presence"]


def status_of(person, username: str) -> dict:
    return next(u for u in person.get("/api/users").json()["users"] if u["username"] == username)


def run(client, job, *args):
    """Run a write job on the app's own writer, from the test thread."""
    chat = client.app.state.chat
    return client.portal.call(chat.writer.run, job, *args)


@pytest.fixture
def people(database_url, make_client):
    client = make_client(database_url=database_url)
    return client, sign_up(client, "alice"), sign_up(client, "bob")


def test_first_socket_sends_one_online_frame_and_the_last_one_offline(people):
    client, alice, bob = people
    with bob.ws() as watcher:
        next_frame(watcher, "hello")
        settle(watcher)  # its own online frame
        with alice.ws() as first:
            next_frame(first, "hello")
            online = presence_frames(quiet(watcher))
            assert [(f["username"], f["status"]) for f in online] == [("alice", "online")]
            assert online[0]["last_seen"].endswith("Z")
            assert status_of(bob, "alice")["status"] == "online"
            with alice.ws() as second:
                next_frame(second, "hello")
                settle(second)
                assert presence_frames(quiet(watcher)) == []  # a second tab says nothing
            settle(first)
            assert presence_frames(quiet(watcher)) == []  # closing one of two says nothing
        offline = next_frame(watcher, "presence")
        assert (offline["username"], offline["status"]) == ("alice", "offline")
        assert offline["last_seen"] >= online[0]["last_seen"]
        assert presence_frames(quiet(watcher)) == []
    listed = status_of(bob, "alice")
    assert listed["status"] == "offline" and listed["last_seen"] == offline["last_seen"]


def test_my_own_online_frame_reaches_me_too(people):
    client, alice, bob = people
    with alice.ws() as ws:
        assert ws.receive_json()["type"] == "hello"
        frame = next_frame(ws, "presence")
        assert (frame["username"], frame["status"]) == ("alice", "online")


def test_a_user_never_seen_is_offline_with_no_last_seen(people):
    client, alice, bob = people
    listed = status_of(alice, "bob")
    assert listed["status"] == "offline" and listed["last_seen"] is None


def test_the_status_hook_runs_once_per_change_after_commit(people):
    client, alice, bob = people
    chat = client.app.state.chat
    calls: list[tuple] = []

    async def record(username: str, status: str, last_seen: datetime) -> None:
        # After commit: a separate connection already sees the new status.
        stored = await chat.database.fetch_val(
            sa.select(chatx.users.c.status).where(chatx.users.c.username == username)
        )
        calls.append((username, status, last_seen, stored))

    plain_calls: list[str] = []
    chat.on_status_change(record)
    chat.on_status_change(lambda username, status, last_seen: plain_calls.append(status))
    with alice.ws() as one, alice.ws() as two:
        settle(one, two)
    wait_until(lambda: len(calls) == 2, what="alice offline")
    with bob.ws() as watcher:
        next_frame(watcher, "hello")
        settle(watcher)
    wait_until(lambda: len(calls) == 4, what="bob offline")
    assert [(u, s) for u, s, _, _ in calls] == [
        ("alice", "online"), ("alice", "offline"), ("bob", "online"), ("bob", "offline")
    ]
    assert all(stored == status for _, status, _, stored in calls)
    assert all(moment.tzinfo is not None and moment.utcoffset().total_seconds() == 0 for _, _, moment, _ in calls)
    assert calls[0][2] <= calls[1][2] <= datetime.now(timezone.utc)
    assert plain_calls == ["online", "offline", "online", "offline"]


def test_a_callback_that_raises_is_logged_and_harms_nothing(people, caplog):
    client, alice, bob = people
    chat = client.app.state.chat
    after: list[str] = []

    def broken(username, status, last_seen):
        raise RuntimeError("host bug")

    chat.on_status_change(broken)
    chat.on_status_change(lambda username, status, last_seen: after.append(status))
    with caplog.at_level(logging.ERROR, logger="chatx"), bob.ws() as watcher:
        next_frame(watcher, "hello")
        settle(watcher)
        with alice.ws() as ws:
            next_frame(ws, "hello")
            frame = next_frame(watcher, "presence")
            assert (frame["username"], frame["status"]) == ("alice", "online")
    wait_until(lambda: len(after) == 4, what="both offline")
    assert after == ["online", "online", "offline", "offline"]  # bob, alice, alice, bob
    assert "host bug" in caplog.text


def test_a_dead_processs_sockets_stop_counting_after_the_ttl(database_url, make_client):
    client = make_client(database_url=database_url, presence_ttl=1)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    # bob's socket lives on a process that said he is online, then died without
    # a word: its heartbeat stops now.
    chat = client.app.state.chat
    run(client, chatx.heartbeat, "dead-process", [])
    transitions = run(client, chatx.open_socket, "dead-socket", "dead-process", bob.id)
    assert transitions and transitions[0][:2] == ("bob", "online")
    client.portal.call(chat.announce, transitions)
    with alice.ws() as ws:
        hello = next_frame(ws, "hello")
        assert [p["username"] for p in hello["presence"]] == ["bob"]
        frame = next_frame(ws, "presence")
        while frame["username"] != "bob":
            frame = next_frame(ws, "presence")
        assert frame["status"] == "offline"
    assert status_of(alice, "bob")["status"] == "offline"


def test_a_live_process_keeps_its_users_online_past_the_ttl(database_url, make_client):
    client = make_client(database_url=database_url, presence_ttl=0.5)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    with bob.ws() as b:
        next_frame(b, "hello")
        with alice.ws() as a:
            next_frame(a, "hello")
            for _ in range(3):  # several TTLs pass while both stay connected
                client.portal.call(__import__("asyncio").sleep, 0.5)
                assert [f for f in presence_frames(quiet(a)) if f["username"] == "bob"] == []
            assert status_of(alice, "bob")["status"] == "online"


def next_presence_of(ws, username: str) -> dict:
    frame = next_frame(ws, "presence")
    while frame["username"] != username:
        frame = next_frame(ws, "presence")
    return frame


def test_a_change_committed_but_never_published_reaches_everyone_within_a_heartbeat(database_url, make_client):
    # A process that commits a change of status and dies before publishing it:
    # hello frames and open sockets learn it from the database all the same.
    client = make_client(database_url=database_url, presence_ttl=1)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    chat = client.app.state.chat
    with alice.ws() as ws:
        next_frame(ws, "hello")
        assert run(client, chatx.open_socket, "unannounced", chat.process_id, bob.id)[0][:2] == ("bob", "online")
        assert next_presence_of(ws, "bob")["status"] == "online"
        with alice.ws() as second:
            assert [p["username"] for p in next_frame(second, "hello")["presence"]] == ["bob"]
        assert run(client, chatx.close_socket, "unannounced", bob.id)[0][:2] == ("bob", "offline")
        assert next_presence_of(ws, "bob")["status"] == "offline"
