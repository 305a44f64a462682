"""Presence and the status hook (docs/protocol.md, Presence), on SQLite and on PostgreSQL.

Version 2: presence goes only to conversation partners (people who exchanged
a message), never to strangers and never to oneself; the last socket closing
takes effect CHATX_PRESENCE_GRACE seconds later. Tests that want an immediate
offline run with presence_grace=0; test_the_grace_* prove the grace itself."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

import chatx
from conftest import ack_and_copy, hello_of, make_partners, next_frame, quiet, run_job, settle, sign_up, wait_until


def presence_frames(frames: list[dict]) -> list[dict]:
    return [f for f in frames if f["type"] == "presence"]


def status_of(person, username: str) -> dict:
    """How the directory shows a user to `person`."""
    response = person.get("/api/users", params={"q": username})
    assert response.status_code == 200, response.text
    return next(u for u in response.json()["users"] if u["username"] == username)


def listed(hello: dict) -> list[str]:
    return [p["username"] for p in hello["presence"]]


def next_presence_of(ws, username: str) -> dict:
    frame = next_frame(ws, "presence")
    while frame["username"] != username:
        frame = next_frame(ws, "presence")
    return frame


def message_and_presence(ws, acked: bool = False) -> tuple[dict, list[dict]]:
    """Frames up to both a message frame and a presence frame (and the ack,
    on the sending socket), in whatever order they come; the message frame
    and every presence frame on the way."""
    message, presence, waiting_for_ack = None, [], acked
    while message is None or not presence or waiting_for_ack:
        frame = ws.receive_json()
        if frame["type"] == "message":
            assert message is None, frame
            message = frame
        elif frame["type"] == "presence":
            presence.append(frame)
        elif frame["type"] == "ack":
            assert waiting_for_ack, frame
            waiting_for_ack = False
    return message, presence


@pytest.fixture
def people(database_url, make_client):
    """alice and bob, partners by one message, on an app without a presence grace."""
    client = make_client(database_url=database_url, presence_grace=0)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    make_partners(alice, bob)
    return client, alice, bob


# ---- online and offline ----------------------------------------------------------------


def test_first_socket_sends_one_online_frame_and_the_last_one_offline(people):
    client, alice, bob = people
    with bob.ws() as watcher:
        assert hello_of(watcher)["presence"] == []  # alice is offline
        assert presence_frames(quiet(watcher)) == []  # and bob hears nothing of himself
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
            assert status_of(bob, "alice")["status"] == "online"
        offline = next_frame(watcher, "presence")
        assert (offline["username"], offline["status"]) == ("alice", "offline")
        assert offline["last_seen"] >= online[0]["last_seen"]
        assert presence_frames(quiet(watcher)) == []
    found = status_of(bob, "alice")
    assert found["status"] == "offline" and found["last_seen"] == offline["last_seen"]


def test_my_own_presence_never_reaches_me(people):
    # v1 sent everyone's online frame to everyone, oneself included; v2 only to
    # partners, and talking to oneself does not make one one's own partner.
    client, alice, bob = people
    make_partners(alice, alice, body="note to self")
    with alice.ws() as first:
        hello = hello_of(first)
        assert hello["presence"] == []
        assert presence_frames(quiet(first)) == []
        with alice.ws() as second:
            assert hello_of(second)["presence"] == []
            settle(second)
            assert presence_frames(quiet(first)) == []
        settle(first)
        assert presence_frames(quiet(first)) == []


def test_a_partner_never_seen_is_offline_with_no_last_seen(people):
    client, alice, bob = people
    found = status_of(alice, "bob")
    assert found["status"] == "offline" and found["last_seen"] is None


def test_presence_reaches_partners_and_not_strangers(database_url, make_client):
    client = make_client(database_url=database_url, presence_grace=0)
    alice, bob, carol = sign_up(client, "alice"), sign_up(client, "bob"), sign_up(client, "carol")
    make_partners(bob, alice)  # either direction makes partners
    with bob.ws() as partner, carol.ws() as stranger:
        settle(partner, stranger)
        assert presence_frames(quiet(partner)) == []  # carol is a stranger to bob too
        with alice.ws() as ws:
            assert hello_of(ws)["presence"] == [{"username": "bob", "status": "online",
                                                  "last_seen": status_of(alice, "bob")["last_seen"]}]
            assert [(f["username"], f["status"]) for f in presence_frames(quiet(partner))] == [("alice", "online")]
            assert presence_frames(quiet(stranger)) == []
            assert presence_frames(quiet(ws)) == []  # nothing of carol, who is online
        assert (next_presence_of(partner, "alice")["status"]) == "offline"
        assert presence_frames(quiet(stranger)) == []
    # v3: the directory tells a stranger nothing of it either.
    assert status_of(carol, "alice")["status"] is None and status_of(carol, "alice")["last_seen"] is None


def test_the_directory_shows_presence_only_to_partners_neither_of_whom_blocks_the_other(database_url, make_client):
    client = make_client(database_url=database_url, presence_grace=0)
    alice, bob, carol = sign_up(client, "alice"), sign_up(client, "bob"), sign_up(client, "carol")
    make_partners(bob, alice)
    with alice.ws() as ws:
        settle(ws)
        online = status_of(bob, "alice")
        assert online["status"] == "online" and online["last_seen"]  # a partner sees it
        assert status_of(carol, "alice") == {"id": alice.id, "username": "alice", "status": None, "last_seen": None}
        for blocker, blocked in ((bob, "alice"), (alice, "bob")):  # a block either way hides it
            assert blocker.put(f"/api/blocks/{blocked}").status_code == 204
            assert status_of(bob, "alice")["status"] is None and status_of(bob, "alice")["last_seen"] is None
            assert status_of(alice, "bob")["status"] is None
            assert blocker.delete(f"/api/blocks/{blocked}").status_code == 204
        assert status_of(bob, "alice") == online


def test_registering_sends_nothing_to_anyone(database_url, make_client):
    client = make_client(database_url=database_url, presence_grace=0)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    make_partners(alice, bob)
    with alice.ws() as a, bob.ws() as b:
        next_frame(a, "hello")
        next_frame(b, "hello")  # bob's online frame is on its way to alice before his hello
        settle(a, b)
        sign_up(client, "dave")
        sign_up(client, "erin")
        assert quiet(a) == [] and quiet(b) == []  # not even a presence frame


def test_a_first_message_makes_two_people_partners_and_each_ones_sockets_learn_the_others_presence(
        database_url, make_client):
    client = make_client(database_url=database_url, presence_grace=0)
    alice, carol, dave = sign_up(client, "alice"), sign_up(client, "carol"), sign_up(client, "dave")
    with alice.ws() as a1, alice.ws() as a2, carol.ws() as c:
        for ws in (a1, a2, c):
            assert hello_of(ws)["presence"] == []  # strangers: nobody is listed
        assert presence_frames(quiet(a1) + quiet(a2) + quiet(c)) == []

        a1.send_json({"type": "send", "to": "carol", "body": "hi, stranger", "client_id": "first"})
        for ws, other in ((a1, "carol"), (a2, "carol"), (c, "alice")):
            message, presence = message_and_presence(ws, acked=ws is a1)
            assert message["message"]["body"] == "hi, stranger"
            assert [(f["username"], f["status"]) for f in presence] == [(other, "online")]
            assert presence[0]["last_seen"].endswith("Z")

        c.send_json({"type": "send", "to": "alice", "body": "hi back", "client_id": "second"})
        copies = [next_frame(a1, "message"), next_frame(a2, "message"), ack_and_copy(c)[1]]
        assert [frame["message"]["body"] for frame in copies] == ["hi back"] * 3
        for ws in (a1, a2, c):
            assert presence_frames(quiet(ws)) == []  # partners already: no frame again

        # A first message to someone offline tells the sender they are offline.
        a1.send_json({"type": "send", "to": "dave", "body": "are you there?", "client_id": "third"})
        for ws in (a1, a2):
            message, presence = message_and_presence(ws, acked=ws is a1)
            assert message["message"]["body"] == "are you there?"
            assert [(f["username"], f["status"], f["last_seen"]) for f in presence] == [("dave", "offline", None)]

        with carol.ws() as again:  # partners now: a new socket's hello lists alice
            assert listed(hello_of(again)) == ["alice"]
    # And from now on, presence changes reach them.
    with alice.ws() as a:
        next_frame(a, "hello")
        with dave.ws() as d:
            assert listed(hello_of(d)) == ["alice"]
            assert next_presence_of(a, "dave")["status"] == "online"
        assert next_presence_of(a, "dave")["status"] == "offline"


# ---- the grace --------------------------------------------------------------------------


GRACE = 1.5


def test_the_grace_absorbs_a_reconnect_and_offline_comes_after_it(database_url, make_client):
    client = make_client(database_url=database_url, presence_grace=GRACE)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    make_partners(alice, bob)
    calls: list[tuple[str, str]] = []
    client.app.state.chat.on_status_change(lambda username, status, last_seen: calls.append((username, status)))
    with bob.ws() as watcher:
        next_frame(watcher, "hello")
        with alice.ws() as ws:
            next_frame(ws, "hello")
            assert next_presence_of(watcher, "alice")["status"] == "online"
        # Her page reloads: the socket is gone and back at once.
        with alice.ws() as ws:
            assert listed(hello_of(ws)) == ["bob"]
            settle(ws)
            assert presence_frames(quiet(watcher)) == []
            client.portal.call(asyncio.sleep, GRACE + 0.5)  # the first close's grace ends while she is back
            assert presence_frames(quiet(watcher)) == []
            assert status_of(bob, "alice")["status"] == "online"
        closed_at = time.monotonic()
        assert status_of(bob, "alice")["status"] == "online"  # within the grace
        assert presence_frames(quiet(watcher)) == []
        assert [c for c in calls if c[0] == "alice"] == [("alice", "online")]  # no hook call for the reconnect

        offline = next_presence_of(watcher, "alice")
        waited = time.monotonic() - closed_at
        assert offline["status"] == "offline" and offline["last_seen"].endswith("Z")
        assert GRACE - 0.1 <= waited < GRACE + 5, f"offline came {waited:.2f} s after the last socket closed"
        assert presence_frames(quiet(watcher)) == []
    wait_until(lambda: ("alice", "offline") in calls, what="the hook to see alice offline")
    assert [c for c in calls if c[0] == "alice"] == [("alice", "online"), ("alice", "offline")]
    assert status_of(bob, "alice")["status"] == "offline"


def test_the_grace_defaults_to_5_seconds_and_comes_from_chatx_presence_grace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.delenv("CHATX_PRESENCE_GRACE", raising=False)
    assert chatx.load_settings().presence_grace == 5
    monkeypatch.setenv("CHATX_PRESENCE_GRACE", "0")
    assert chatx.load_settings().presence_grace == 0
    assert chatx.load_settings(presence_grace=2.5).presence_grace == 2.5


# ---- blocking ---------------------------------------------------------------------------


def test_blocking_stops_presence_both_ways_and_unblocking_restores_it(database_url, make_client):
    client = make_client(database_url=database_url, presence_grace=0)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    make_partners(alice, bob)
    assert alice.put("/api/blocks/BOB").status_code == 204
    assert alice.get("/api/blocks").json() == {"blocks": [{"id": bob.id, "username": "bob"}]}

    # alice's presence does not reach bob...
    with bob.ws() as watcher:
        assert hello_of(watcher)["presence"] == []
        with alice.ws() as ws:
            assert hello_of(ws)["presence"] == []  # bob is online, but blocked
            settle(ws)
            assert presence_frames(quiet(watcher)) == []
            assert status_of(bob, "alice")["status"] is None  # nor does the directory tell him
        settle(watcher)
        assert presence_frames(quiet(watcher)) == []
    # ...nor bob's alice: the block works both ways.
    with alice.ws() as ws:
        next_frame(ws, "hello")
        with bob.ws() as b:
            assert hello_of(b)["presence"] == []
            settle(b)
            assert presence_frames(quiet(ws)) == []
        settle(ws)
        assert presence_frames(quiet(ws)) == []

    assert alice.delete("/api/blocks/bob").status_code == 204
    assert alice.get("/api/blocks").json() == {"blocks": []}
    with bob.ws() as watcher:
        next_frame(watcher, "hello")
        with alice.ws() as ws:
            assert listed(hello_of(ws)) == ["bob"]  # hello lists him again
            assert next_presence_of(watcher, "alice")["status"] == "online"  # and changes reach him again
        assert next_presence_of(watcher, "alice")["status"] == "offline"


def test_a_block_tells_both_sides_at_once_the_other_is_offline_and_an_unblock_tells_the_presence_again(
        database_url, make_client):
    client = make_client(database_url=database_url, presence_grace=0)
    alice, bob, carol = sign_up(client, "alice"), sign_up(client, "bob"), sign_up(client, "carol")
    make_partners(alice, bob)
    with alice.ws() as a, bob.ws() as b, carol.ws() as stranger:
        settle(a, b, stranger)
        for ws in (a, b, stranger):
            quiet(ws)  # hello, and bob coming online
        shown = status_of(alice, "bob")
        assert shown["status"] == "online"

        assert bob.put("/api/blocks/alice").status_code == 204
        # At once, both ways, with no last_seen: the one shown before is not theirs to know any more.
        assert presence_frames(quiet(a)) == [
            {"type": "presence", "username": "bob", "status": "offline", "last_seen": None}]
        assert presence_frames(quiet(b)) == [
            {"type": "presence", "username": "alice", "status": "offline", "last_seen": None}]
        assert presence_frames(quiet(stranger)) == []
        with alice.ws() as second:  # a new socket's hello leaves him out too
            assert listed(hello_of(second)) == []
            settle(second)
            assert presence_frames(quiet(second)) == []

        assert bob.delete("/api/blocks/alice").status_code == 204
        # Each, a partner of the other again, gets the other's presence as it is now.
        assert presence_frames(quiet(a)) == [{"type": "presence", "username": "bob", "status": "online",
                                              "last_seen": shown["last_seen"]}]
        assert [(f["username"], f["status"]) for f in presence_frames(quiet(b))] == [("alice", "online")]
        assert presence_frames(quiet(stranger)) == []


@pytest.mark.validation
def test_blocks_name_a_user_and_need_a_session(people):
    client, alice, bob = people
    assert alice.put("/api/blocks/nobody").json()["error"]["code"] == "unknown_user"
    assert alice.delete("/api/blocks/nobody").status_code == 404
    assert client.put("/api/blocks/bob").status_code == 401
    assert client.get("/api/blocks").status_code == 401
    assert alice.put("/api/blocks/bob").status_code == 204
    assert alice.put("/api/blocks/bob").status_code == 204  # again: still one block
    assert [b["username"] for b in alice.get("/api/blocks").json()["blocks"]] == ["bob"]
    assert bob.get("/api/blocks").json() == {"blocks": []}  # a block is one-sided as a list


def test_the_hello_of_a_socket_lists_only_online_partners_not_blocked_ones(database_url, make_client):
    client = make_client(database_url=database_url, presence_grace=0)
    alice, bob, carol, dave, erin = (sign_up(client, name) for name in ("alice", "bob", "carol", "dave", "erin"))
    make_partners(alice, bob)
    make_partners(carol, alice)
    make_partners(alice, dave)
    assert carol.put("/api/blocks/alice").status_code == 204  # carol blocks alice: hidden either way
    with bob.ws() as b, carol.ws() as c, erin.ws() as e:  # bob online partner, carol blocked, erin stranger
        settle(b, c, e)
        with alice.ws() as ws:  # dave: a partner, offline
            hello = hello_of(ws)
            assert hello["user"] == {"id": alice.id, "username": "alice"}
            assert hello["seq"] == 3  # her stream: the three messages
            assert hello["presence"] == [{"username": "bob", "status": "online",
                                          "last_seen": status_of(alice, "bob")["last_seen"]}]
            assert hello["presence"][0]["last_seen"].endswith("Z")
            with carol.ws() as blocker:  # alice is online and carol's partner, but blocked
                assert hello_of(blocker)["presence"] == []
            with bob.ws() as partner:
                assert listed(hello_of(partner)) == ["alice"]
            with erin.ws() as stranger:
                assert hello_of(stranger)["presence"] == []


# ---- the status hook ---------------------------------------------------------------------


def test_the_status_hook_runs_once_per_change_after_commit(people):
    client, alice, bob = people
    chat = client.app.state.chat
    calls: list[tuple] = []

    async def record(username: str, status: str, last_seen: datetime) -> None:
        # After commit: a separate connection already sees the new status.
        stored = await chat.storage.database.fetch_val(
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


# ---- processes that die, and changes never published ----------------------------------------


def test_a_dead_processs_sockets_stop_counting_after_the_ttl(database_url, make_client):
    client = make_client(database_url=database_url, presence_ttl=1)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    make_partners(alice, bob)
    # bob's socket lives on a process that said he is online, then died without
    # a word: its heartbeat stops now.
    chat = client.app.state.chat
    run_job(client, chatx.heartbeat, "dead-process", [])
    transitions = client.portal.call(chat.presence.change, chatx.open_socket, "dead-socket", "dead-process", bob.id)
    assert transitions and transitions[0][:2] == ("bob", "online")
    with alice.ws() as ws:
        hello = next_frame(ws, "hello")
        assert listed(hello) == ["bob"]
        started = time.monotonic()
        assert next_presence_of(ws, "bob")["status"] == "offline"
        assert time.monotonic() - started < 1 + 1  # within the TTL, and a heartbeat
    assert status_of(alice, "bob")["status"] == "offline"


def test_a_live_process_keeps_its_users_online_past_the_ttl(database_url, make_client):
    # A process silent for TTL/2 is dead, and it beats every TTL/4 (0.25 s at
    # least): a TTL of 2 s leaves a loaded machine half a second of slack.
    client = make_client(database_url=database_url, presence_ttl=2)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    make_partners(alice, bob)
    with bob.ws() as b:
        next_frame(b, "hello")
        with alice.ws() as a:
            assert listed(next_frame(a, "hello")) == ["bob"]
            for _ in range(3):  # more than a TTL passes while both stay connected, in steps of over a heartbeat
                client.portal.call(asyncio.sleep, 0.75)
                assert [f for f in presence_frames(quiet(a)) if f["username"] == "bob"] == []
            assert status_of(alice, "bob")["status"] == "online"


def test_a_change_committed_but_never_published_reaches_every_partner_within_a_heartbeat(database_url, make_client):
    # A process that commits a change of status and dies before publishing it:
    # hello frames and open sockets learn it from the database all the same.
    client = make_client(database_url=database_url, presence_ttl=1)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    make_partners(alice, bob)
    chat = client.app.state.chat
    with alice.ws() as ws:
        next_frame(ws, "hello")
        assert run_job(client, chatx.open_socket, "unannounced", chat.process_id, bob.id)[0][:2] == ("bob", "online")
        assert next_presence_of(ws, "bob")["status"] == "online"
        with alice.ws() as second:
            assert listed(next_frame(second, "hello")) == ["bob"]
        assert run_job(client, chatx.close_socket, "unannounced", bob.id, 0)[0][:2] == ("bob", "offline")
        assert next_presence_of(ws, "bob")["status"] == "offline"


def test_a_heartbeat_refresh_reads_its_changes_a_page_at_a_time_and_misses_none(database_url, make_client,
                                                                              monkeypatch):
    monkeypatch.setattr(chatx, "REFRESH_PAGE", 2)
    client = make_client(database_url=database_url)
    alice = sign_up(client, "alice")
    partners = [sign_up(client, name) for name in ("bob", "carol", "dave", "erin", "frank")]
    for partner in partners:
        make_partners(alice, partner)
    chat = client.app.state.chat
    with alice.ws() as ws:
        next_frame(ws, "hello")
        for partner in partners:  # committed by a process that died before publishing
            run_job(client, chatx.open_socket, f"unannounced-{partner.username}", chat.process_id, partner.id)
        client.portal.call(chat.presence.refresh, 0)
        told = {frame["username"]: frame["status"] for frame in presence_frames(quiet(ws))}
        assert told == {partner.username: "online" for partner in partners}


def test_a_presence_the_hello_tells_is_not_sent_again_after_it(database_url, make_client, monkeypatch):
    client = make_client(database_url=database_url)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    make_partners(alice, bob)
    presence = client.app.state.chat.presence
    partners = presence.partners

    async def refreshed_first(user):  # a heartbeat's refresh lands between the socket's attach and its hello
        await presence.refresh(0)
        return await partners(user)

    with bob.ws() as b:
        next_frame(b, "hello")
        monkeypatch.setattr(presence, "partners", refreshed_first)
        with alice.ws() as a:
            assert listed(next_frame(a, "hello")) == ["bob"]
            assert [f for f in presence_frames(quiet(a)) if f["username"] == "bob"] == []
