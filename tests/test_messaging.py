"""Sending, delivery, idempotency, typing, read cursors, history and replay
(CONTRACT §3–4), each on SQLite and on PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time

import asyncpg
import chatx
import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from conftest import fresh_postgres_database, next_frame, quiet, run_async, settle, sign_up


@pytest.fixture
def chat(database_url, make_client):
    """An in-process app on the parametrised database, with alice, bob and carol."""
    client = make_client(database_url=database_url)
    return client, sign_up(client, "alice"), sign_up(client, "bob"), sign_up(client, "carol")


def send(ws, to: str, body: str, client_id: str | None = "c-1", **extra) -> None:
    ws.send_json({"type": "send", "to": to, "body": body, "client_id": client_id, **extra})


def history(person, peer: str, **query) -> dict:
    response = person.get(f"/api/conversations/{peer}/messages", params=query)
    assert response.status_code == 200, response.text
    return response.json()


def seed(ws, to: str, count: int, prefix: str = "m") -> list[int]:
    ids = []
    for n in range(count):
        send(ws, to, f"{prefix}{n}", client_id=f"{prefix}-{n}")
        ids.append(next_frame(ws, "ack")["message"]["id"])
        next_frame(ws, "message")
    return ids


def test_hello_is_the_first_frame_and_lists_only_online_users(chat):
    client, alice, bob, carol = chat
    with bob.ws() as bob_ws:
        next_frame(bob_ws, "hello")
        with alice.ws() as ws:
            hello = ws.receive_json()
            assert hello["type"] == "hello"
            assert hello["user"] == {"id": alice.id, "username": "alice"}
            assert [p["username"] for p in hello["presence"]] == ["bob"]
            assert hello["presence"][0]["status"] == "online" and hello["presence"][0]["last_seen"].endswith("Z")


def test_a_send_is_acked_and_reaches_every_socket_of_both_people_once(chat):
    client, alice, bob, carol = chat
    with alice.ws() as a1, alice.ws() as a2, bob.ws() as b1, carol.ws() as c1:
        settle(a1, a2, b1, c1)
        send(a1, "BOB", "hi bob", client_id="c-1")
        ack = next_frame(a1, "ack")
        message = ack["message"]
        assert ack["client_id"] == "c-1"
        assert message["from"] == "alice" and message["to"] == "bob" and message["body"] == "hi bob"
        assert message["client_id"] == "c-1" and message["sent_at"].endswith("Z") and isinstance(message["id"], int)
        for ws in (a1, a2, b1):
            assert next_frame(ws, "message") == {"type": "message", "message": message}
            assert [f for f in quiet(ws) if f["type"] != "presence"] == []
        assert [f for f in quiet(c1) if f["type"] != "presence"] == []  # carol sees nothing
    assert history(bob, "alice")["messages"] == [message]


def test_message_ids_grow(chat):
    client, alice, bob, carol = chat
    with alice.ws() as ws:
        next_frame(ws, "hello")
        ids = seed(ws, "bob", 3)
    assert ids == sorted(ids) and len(set(ids)) == 3


def test_sends_in_flight_together_are_acked_and_delivered_in_the_order_sent(database_url, make_client):
    # The socket reads its next frame before the previous send is committed, so
    # these share commits; a client_id repeated inside the burst still stores once.
    client = make_client(database_url=database_url, send_burst=100)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    with alice.ws() as ws, bob.ws() as bob_ws:
        settle(ws, bob_ws)
        for n in range(40):
            send(ws, "bob", f"burst {n}", client_id=f"b-{n}")
        send(ws, "bob", "burst 3 again", client_id="b-3")
        frames = [next_frame(ws) for _ in range(81)]  # 41 acks, and each message once
        acks = [f for f in frames if f["type"] == "ack"]
        assert [f["message"]["body"] for f in frames if f["type"] == "message"] == [f"burst {n}" for n in range(40)]
        assert [a["client_id"] for a in acks] == [f"b-{n}" for n in range(40)] + ["b-3"]
        ids = [a["message"]["id"] for a in acks[:40]]
        assert ids == sorted(ids) and len(set(ids)) == 40
        assert acks[40]["message"] == acks[3]["message"]
        delivered = [next_frame(bob_ws, "message")["message"] for _ in range(40)]
        assert [m["body"] for m in delivered] == [f"burst {n}" for n in range(40)]
        assert [f for f in quiet(bob_ws) if f["type"] == "message"] == []
    assert [m["id"] for m in history(bob, "alice")["messages"]] == ids


def test_a_burst_mixing_retries_and_sends_without_client_id_acks_each_with_its_own_message(
        database_url, make_client):
    # One commit may hold new sends, sends with no client_id, and a client_id
    # stored by an earlier commit: each ack must carry its own message.
    client = make_client(database_url=database_url, send_burst=100)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    with alice.ws() as ws, bob.ws() as bob_ws:
        settle(ws, bob_ws)
        send(ws, "bob", "original", client_id="kept")
        original = next_frame(ws, "ack")["message"]
        next_frame(ws, "message")
        burst = [("a", None), ("retried", "kept"), ("b", None), ("c", "new-1"), ("d", None)]
        for body, client_id in burst:
            send(ws, "bob", body, client_id=client_id)
        frames = [next_frame(ws) for _ in range(9)]  # 5 acks, and each new message once
        acks = [f for f in frames if f["type"] == "ack"]
        assert [a["client_id"] for a in acks] == [client_id for _, client_id in burst]
        assert acks[1]["message"] == original
        fresh = [acks[i]["message"] for i in (0, 2, 3, 4)]
        assert [m["body"] for m in fresh] == ["a", "b", "c", "d"]
        assert [m["id"] for m in fresh] == sorted(m["id"] for m in fresh) and fresh[0]["id"] > original["id"]
        assert [f["message"] for f in frames if f["type"] == "message"] == fresh
        delivered = [next_frame(bob_ws, "message")["message"] for _ in range(5)]
        assert delivered == [original, *fresh]
        assert [f for f in quiet(bob_ws) if f["type"] == "message"] == []
    assert [m["body"] for m in history(bob, "alice")["messages"]] == ["original", "a", "b", "c", "d"]


def on_new_schema(database_url: str, scenario):
    """`scenario(conn, insert)` on a new schema, with the database's own insert
    of message rows: the writer would hide a wrong answer of it by retrying
    each send alone, so these tests call it themselves."""
    postgres = database_url.startswith("postgresql")
    insert = chatx.insert_message_rows_postgres if postgres else chatx.insert_message_rows_sqlite

    async def run():
        database = chatx.open_database(database_url)
        await database.connect()
        try:
            async with database.connection() as conn:
                await chatx.create_schema(conn, postgres=postgres)
                return await scenario(conn, insert)
        finally:
            await database.disconnect()

    return run_async(run)


def test_one_insert_mixing_a_stored_client_id_with_new_rows_gives_each_new_row_its_id(database_url):
    # SQLite derives the ids from the statement's count and last id (or looks
    # them up when a client_id was stored before); PostgreSQL takes them first.
    async def scenario(conn, insert):
        alice = await chatx.insert_user(conn, "alice", "hash", 0)
        bob = await chatx.insert_user(conn, "bob", "hash", 0)
        first = await insert(conn, [(alice.id, bob.id, "original", 1, "kept")])
        mixed = await insert(conn, [
            (alice.id, bob.id, "a", 2, None), (alice.id, bob.id, "retried", 3, "kept"),
            (bob.id, alice.id, "c", 4, "kept"), (alice.id, bob.id, "d", 5, "new")])
        repeated = await insert(conn, [(alice.id, bob.id, "again", 6, "new")])
        stored = await conn.fetch_all("SELECT id, body FROM chatx_messages ORDER BY id")
        return first, mixed, repeated, [(row[0], row[1]) for row in stored]

    first, mixed, repeated, stored = on_new_schema(database_url, scenario)
    assert mixed[1] is None and repeated == [None]
    new = [mixed[0], mixed[2], mixed[3]]
    assert first[0] < new[0] < new[1] < new[2]
    assert stored == [(first[0], "original"), (new[0], "a"), (new[1], "c"), (new[2], "d")]


def test_a_message_naming_a_user_id_that_does_not_exist_is_refused_and_stores_nothing(database_url):
    # SQLite has foreign keys; PostgreSQL checks the ids in chatx_insert_messages().
    async def scenario(conn, insert):
        alice = await chatx.insert_user(conn, "alice", "hash", 0)
        refused = []
        for row in [(alice.id, alice.id + 99, "to no one", 1, "a"), (alice.id + 99, alice.id, "from no one", 1, "b")]:
            try:
                await insert(conn, [(alice.id, alice.id, "fine", 1, None), row])
            except Exception as exc:
                refused.append(type(exc).__name__)
        return refused, await conn.fetch_val("SELECT count(*) FROM chatx_messages")

    refused, stored = on_new_schema(database_url, scenario)
    postgres = database_url.startswith("postgresql")
    assert refused == ["ForeignKeyViolationError" if postgres else "IntegrityError"] * 2
    assert stored == 0


def test_sqlite_copies_stored_messages_into_the_database_file_in_the_background(make_client, sqlite_url):
    # The commit that stores them does not wait for that copy (a checkpoint);
    # immutable=1 reads the file alone, without its write-ahead log.
    client = make_client()
    alice, _ = sign_up(client, "alice"), sign_up(client, "bob")
    in_file = f"file:{sqlite_url.removeprefix('sqlite:///')}?immutable=1"
    with alice.ws() as ws:
        settle(ws)
        seed(ws, "bob", 3)
        deadline, count = time.monotonic() + 10, None
        while count != 3 and time.monotonic() < deadline:
            time.sleep(0.05)
            with contextlib.suppress(sqlite3.DatabaseError), contextlib.closing(sqlite3.connect(in_file, uri=True)) as db:
                count = db.execute("SELECT count(*) FROM chatx_messages").fetchone()[0]
    assert count == 3


def test_starting_on_a_database_with_the_old_sender_index_drops_it(database_url):
    # Each index is one more page written per message, and the other two serve
    # every query this one did.
    postgres = database_url.startswith("postgresql")
    names = ("SELECT indexname FROM pg_indexes WHERE tablename = 'chatx_messages'" if postgres else
             "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'chatx_messages'")

    async def scenario(conn, insert):
        await conn.execute("CREATE INDEX chatx_messages_sender ON chatx_messages (sender_id, recipient_id, id)")
        before = {row[0] for row in await conn.fetch_all(names)}
        await chatx.create_schema(conn, postgres=postgres)
        return before, {row[0] for row in await conn.fetch_all(names)}

    before, after = on_new_schema(database_url, scenario)
    assert before - after == {"chatx_messages_sender"}
    assert "chatx_messages_recipient" in after


def test_starting_on_a_postgresql_database_with_foreign_keys_on_messages_drops_them():
    # Databases made before chatx_insert_messages() checked the user ids have
    # them, and each one locks the user's row for every message stored.
    old_schema = [
        "CREATE TABLE chatx_users (id SERIAL PRIMARY KEY, username VARCHAR(32) NOT NULL, "
        "username_key VARCHAR(32) NOT NULL UNIQUE, password_hash VARCHAR(256) NOT NULL, "
        "status VARCHAR(8) NOT NULL DEFAULT 'offline', last_seen BIGINT, created_at BIGINT NOT NULL)",
        "CREATE TABLE chatx_messages (id SERIAL PRIMARY KEY, sender_id INTEGER NOT NULL REFERENCES chatx_users (id), "
        "recipient_id INTEGER NOT NULL REFERENCES chatx_users (id), body TEXT NOT NULL, sent_at BIGINT NOT NULL, "
        "client_id VARCHAR(128), CONSTRAINT chatx_messages_client_id UNIQUE (sender_id, client_id))",
    ]

    async def foreign_keys(url: str, *statements: str) -> int:
        connection = await asyncpg.connect(url)
        try:
            for statement in statements:
                await connection.execute(statement)
            return await connection.fetchval(
                "SELECT count(*) FROM pg_constraint WHERE conrelid = 'chatx_messages'::regclass AND contype = 'f'")
        finally:
            await connection.close()

    with fresh_postgres_database() as url:
        before = run_async(foreign_keys, url, *old_schema)
        with TestClient(chatx.create_app(database_url=url)) as client:
            alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
            with alice.ws() as ws, bob.ws() as bob_ws:
                settle(ws, bob_ws)
                send(ws, "bob", "after the upgrade")
                assert next_frame(bob_ws, "message")["message"]["body"] == "after the upgrade"
        after = run_async(foreign_keys, url)
    assert (before, after) == (2, 0)


def test_the_same_client_id_again_stores_nothing_and_gets_the_original_ack(chat):
    client, alice, bob, carol = chat
    with alice.ws() as ws, bob.ws() as bob_ws:
        settle(ws, bob_ws)
        send(ws, "bob", "once", client_id="dup")
        first = next_frame(ws, "ack")
        next_frame(ws, "message")
        assert next_frame(bob_ws, "message")["message"] == first["message"]
        send(ws, "bob", "changed body", client_id="dup")
        again = next_frame(ws, "ack")
        assert again == first
        assert [f for f in quiet(ws) if f["type"] == "message"] == []
        assert [f for f in quiet(bob_ws) if f["type"] == "message"] == []
    assert [m["body"] for m in history(alice, "bob")["messages"]] == ["once"]


def test_different_senders_may_use_the_same_client_id(chat):
    client, alice, bob, carol = chat
    with alice.ws() as a, bob.ws() as b:
        settle(a, b)
        send(a, "carol", "from alice", client_id="same")
        send(b, "carol", "from bob", client_id="same")
        assert next_frame(a, "ack")["message"]["id"] != next_frame(b, "ack")["message"]["id"]


def test_sending_to_yourself_delivers_once_per_socket(chat):
    client, alice, bob, carol = chat
    with alice.ws() as ws:
        next_frame(ws, "hello")
        send(ws, "alice", "note to self")
        ack = next_frame(ws, "ack")
        assert next_frame(ws, "message")["message"] == ack["message"]
        assert [f for f in quiet(ws) if f["type"] == "message"] == []
    assert len(history(alice, "alice")["messages"]) == 1


@pytest.mark.parametrize(
    "frame,code",
    [
        ("not json", "bad_json"),
        ("[1, 2]", "bad_json"),
        ('"send"', "bad_json"),
        ('{"type": "shout"}', "unknown_type"),
        ("{}", "unknown_type"),
        ('{"type": "send", "body": "hi", "client_id": "c-9"}', "invalid_field"),
        ('{"type": "send", "to": "bob", "body": 5, "client_id": "c-9"}', "invalid_field"),
        ('{"type": "send", "to": "bob", "body": "hi", "client_id": 9}', "invalid_field"),
        ('{"type": "send", "to": "nobody", "body": "hi", "client_id": "c-9"}', "unknown_user"),
        ('{"type": "send", "to": "bob", "body": " \\n\\t ", "client_id": "c-9"}', "empty_body"),
        (json.dumps({"type": "send", "to": "bob", "body": "x" * 4001, "client_id": "c-9"}), "body_too_long"),
        ('{"type": "send", "to": "bob", "body": "lone \\ud800 surrogate", "client_id": "c-9"}', "invalid_field"),
        ('{"type": "send", "to": "bob", "body": "nul \\u0000 byte", "client_id": "c-9"}', "invalid_field"),
        ('{"type": "send", "to": "bob", "body": "hi", "client_id": "\\udfff"}', "invalid_field"),
        ('{"type": "typing"}', "invalid_field"),
        ('{"type": "typing", "to": "nobody"}', "unknown_user"),
        ('{"type": "read", "with": "bob", "up_to": "5"}', "invalid_field"),
        ('{"type": "read", "with": "bob", "up_to": true}', "invalid_field"),
        ('{"type": "read", "with": "bob", "up_to": -1}', "invalid_field"),
        ('{"type": "read", "with": "nobody", "up_to": 1}', "unknown_user"),
    ],
)
def test_bad_frames_get_an_error_keep_the_socket_open_and_store_nothing(chat, frame, code):
    client, alice, bob, carol = chat
    with alice.ws() as ws:
        next_frame(ws, "hello")
        ws.send_text(frame)
        error = next_frame(ws, "error")
        assert error["code"] == code and error["detail"]
        if '"client_id": "c-9"' in frame:
            assert error["client_id"] == "c-9"
        send(ws, "bob", "still here", client_id="after-error")
        assert next_frame(ws, "ack")["message"]["body"] == "still here"
    assert [m["body"] for m in history(alice, "bob")["messages"]] == ["still here"]


def test_a_body_of_exactly_4000_characters_is_accepted(chat):
    client, alice, bob, carol = chat
    with alice.ws() as ws:
        next_frame(ws, "hello")
        send(ws, "bob", "é" * 4000)
        assert len(next_frame(ws, "ack")["message"]["body"]) == 4000


def test_sends_over_the_token_bucket_are_rate_limited_and_not_stored(database_url, make_client):
    client = make_client(database_url=database_url, send_rate=0.001, send_burst=3)
    alice, _ = sign_up(client, "alice"), sign_up(client, "bob")
    with alice.ws() as ws:
        next_frame(ws, "hello")
        for n in range(3):
            send(ws, "bob", f"m{n}", client_id=f"c{n}")
            next_frame(ws, "ack")
            next_frame(ws, "message")
        send(ws, "bob", "one too many", client_id="c3")
        error = next_frame(ws, "error")
        assert error["code"] == "rate_limited" and error["client_id"] == "c3"
        ws.send_json({"type": "ping"})
        assert next_frame(ws) == {"type": "pong"}  # still open
    assert len(history(alice, "bob")["messages"]) == 3


def test_a_frame_over_64_kib_closes_the_socket_with_1009(chat):
    client, alice, bob, carol = chat
    with alice.ws() as ws:
        next_frame(ws, "hello")
        ws.send_text(json.dumps({"type": "send", "to": "bob", "body": "x" * 70_000}))
        with pytest.raises(WebSocketDisconnect) as closed:
            while True:
                ws.receive_json()
        assert closed.value.code == 1009
    assert history(alice, "bob")["messages"] == []


def test_typing_reaches_only_the_peer_and_is_not_stored(chat):
    client, alice, bob, carol = chat
    with alice.ws() as a, bob.ws() as b, carol.ws() as c:
        settle(a, b, c)
        a.send_json({"type": "typing", "to": "Bob"})
        assert next_frame(b, "typing") == {"type": "typing", "from": "alice"}
        assert [f for f in quiet(a) + quiet(c) if f["type"] == "typing"] == []
    assert history(alice, "bob")["messages"] == []


def test_a_read_cursor_moves_forward_and_both_people_are_told(chat):
    client, alice, bob, carol = chat
    with alice.ws() as a, bob.ws() as b:
        settle(a, b)
        ids = seed(a, "bob", 3)
        settle(b)
        b.send_json({"type": "read", "with": "alice", "up_to": ids[1]})
        expected = {"type": "read", "reader": "bob", "with": "alice", "up_to": ids[1]}
        assert next_frame(b, "read") == expected
        assert next_frame(a, "read") == expected
        b.send_json({"type": "read", "with": "alice", "up_to": ids[0]})  # backwards: nothing
        assert [f for f in quiet(b) if f["type"] == "read"] == []
        b.send_json({"type": "read", "with": "alice", "up_to": ids[2] + 1000})  # past the end: the newest
        assert next_frame(b, "read")["up_to"] == ids[2]
        b.send_json({"type": "read", "with": "alice", "up_to": ids[2] + 5})  # no move: nothing
        assert [f for f in quiet(b) if f["type"] == "read"] == []
    assert history(bob, "alice")["read_up_to"] == {"bob": ids[2], "alice": 0}


def test_read_in_an_empty_conversation_moves_nothing(chat):
    client, alice, bob, carol = chat
    with alice.ws() as a:
        next_frame(a, "hello")
        a.send_json({"type": "read", "with": "bob", "up_to": 10})
        assert [f for f in quiet(a) if f["type"] == "read"] == []


def test_unread_counts_messages_from_them_above_my_read_cursor(chat):
    client, alice, bob, carol = chat
    with alice.ws() as a, carol.ws() as c:
        settle(a, c)
        ids = seed(a, "bob", 3)
        seed(c, "bob", 1)
        send(a, "carol", "not for bob", client_id="x")
        next_frame(a, "ack")
        with bob.ws() as b:
            next_frame(b, "hello")
            b.send_json({"type": "read", "with": "alice", "up_to": ids[0]})
            next_frame(b, "read")
    users = {u["username"]: u for u in bob.get("/api/users").json()["users"]}
    assert users["alice"]["unread"] == 2 and users["carol"]["unread"] == 1
    assert "bob" not in users
    assert {u["username"]: u["unread"] for u in alice.get("/api/users").json()["users"]} == {"bob": 0, "carol": 0}


def test_user_list_is_everyone_but_me_by_username(chat):
    client, alice, bob, carol = chat
    sign_up(client, "Aaron")
    users = alice.get("/api/users").json()["users"]
    assert [u["username"] for u in users] == ["Aaron", "bob", "carol"]
    assert set(users[0]) == {"id", "username", "status", "last_seen", "unread"}
    assert client.get("/api/users").status_code == 401


def test_history_pages_newest_first_then_older_then_newer(chat):
    client, alice, bob, carol = chat
    with alice.ws() as ws:
        next_frame(ws, "hello")
        ids = seed(ws, "bob", 7)
    newest = history(bob, "alice", limit=3)
    assert [m["id"] for m in newest["messages"]] == ids[4:] and newest["has_more"] is True
    older = history(bob, "alice", limit=3, before=ids[4])
    assert [m["id"] for m in older["messages"]] == ids[1:4] and older["has_more"] is True
    oldest = history(bob, "alice", limit=3, before=ids[1])
    assert [m["id"] for m in oldest["messages"]] == ids[:1] and oldest["has_more"] is False
    newer = history(bob, "alice", limit=4, after=ids[1])
    assert [m["id"] for m in newer["messages"]] == ids[2:6] and newer["has_more"] is True
    last = history(bob, "alice", after=ids[5])
    assert [m["id"] for m in last["messages"]] == ids[6:] and last["has_more"] is False
    assert [m["id"] for m in history(bob, "alice")["messages"]] == ids  # default limit 50


def test_a_cursor_past_any_id_is_an_empty_page_not_an_error(chat):
    client, alice, bob, carol = chat
    with alice.ws() as ws:
        next_frame(ws, "hello")
        ids = seed(ws, "bob", 2)
    assert history(bob, "alice", after=3_000_000_000) == {"messages": [], "has_more": False,
                                                           "read_up_to": {"bob": 0, "alice": 0}}
    assert [m["id"] for m in history(bob, "alice", before=3_000_000_000)["messages"]] == ids
    with bob.ws(after=3_000_000_000) as b:
        next_frame(b, "hello")
        assert [f for f in quiet(b) if f["type"] == "message"] == []


def test_history_limit_above_200_is_taken_as_200(chat):
    client, alice, bob, carol = chat
    assert history(alice, "bob", limit=100000)["messages"] == []


@pytest.mark.parametrize(
    "query", [{"limit": 0}, {"limit": -3}, {"limit": "ten"}, {"before": -1}, {"after": "1.5"}, {"before": "x"},
              {"before": 5, "after": 1}],
)
def test_bad_history_queries_are_bad_request(chat, query):
    client, alice, bob, carol = chat
    response = alice.get("/api/conversations/bob/messages", params=query)
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"


def test_history_of_an_unknown_user_is_404_and_needs_a_session(chat):
    client, alice, bob, carol = chat
    response = alice.get("/api/conversations/nobody/messages")
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_user"
    assert client.get("/api/conversations/bob/messages").status_code == 401


def test_nobody_reads_a_conversation_that_is_not_theirs(chat):
    client, alice, bob, carol = chat
    with alice.ws() as ws:
        next_frame(ws, "hello")
        seed(ws, "bob", 2, prefix="secret")
    assert history(carol, "alice")["messages"] == [] and history(carol, "bob")["messages"] == []
    assert len(history(bob, "ALICE")["messages"]) == 2


def test_replay_sends_every_message_above_after_in_order_before_live(chat):
    client, alice, bob, carol = chat
    with alice.ws() as a, carol.ws() as c:
        settle(a, c)
        ids = seed(a, "bob", 3)
        seed(c, "carol", 1, prefix="self")  # carol's own: never bob's
        seed(c, "bob", 1)
        ids.append(history(bob, "carol")["messages"][0]["id"])
    with bob.ws(after=ids[0]) as b:
        assert b.receive_json()["type"] == "hello"
        replayed = [next_frame(b, "message")["message"]["id"] for _ in range(3)]
        assert replayed == ids[1:]
        assert [f for f in quiet(b) if f["type"] == "message"] == []
    with bob.ws(after=0) as b:
        next_frame(b, "hello")
        assert [next_frame(b, "message")["message"]["id"] for _ in range(4)] == ids


def test_replay_then_live_misses_and_repeats_nothing(chat):
    client, alice, bob, carol = chat
    with alice.ws() as a:
        next_frame(a, "hello")
        first = seed(a, "bob", 2)
        with bob.ws(after=0) as b:
            later = seed(a, "bob", 2, prefix="live")
            got = []
            while len(got) < 4:
                frame = next_frame(b)
                if frame["type"] == "message":
                    got.append(frame["message"]["id"])
            assert got == first + later
            assert [f for f in quiet(b) if f["type"] == "message"] == []


def test_a_bad_after_is_an_invalid_field_error(chat):
    client, alice, bob, carol = chat
    with alice.ws(after="-2") as ws:  # type: ignore[arg-type]
        error = ws.receive_json()
        assert error["type"] == "error" and error["code"] == "invalid_field"


def test_the_websocket_needs_a_session(chat):
    client, alice, bob, carol = chat
    with pytest.raises((WebSocketDisconnect, WebSocketDenialResponse)):
        with client.websocket_connect("/ws") as ws:
            ws.receive_json()


def test_the_websocket_refuses_a_foreign_origin_unless_allowed(database_url, make_client):
    client = make_client(database_url=database_url, allowed_origins="https://app.example")
    alice = sign_up(client, "alice")
    with pytest.raises((WebSocketDisconnect, WebSocketDenialResponse)):
        with alice.ws(headers={"origin": "https://evil.example"}) as ws:
            ws.receive_json()
    for origin in ("https://app.example", "http://testserver"):
        with alice.ws(headers={"origin": origin}) as ws:
            assert ws.receive_json()["type"] == "hello"
    with alice.ws() as ws:  # no Origin at all: a scripted client
        assert ws.receive_json()["type"] == "hello"
