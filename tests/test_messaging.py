"""Sending, delivery, idempotency, typing, read cursors, history and replay
(docs/protocol.md: HTTP endpoints, The WebSocket `/ws`), each on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time

import asyncpg
import chatx
import pytest
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from conftest import (PASSWORD, Person, ack_and_copy, directory, fresh_postgres_database, history, make_partners, next_frame, quiet,
                      run_async, settle, sign_in, sign_up)


@pytest.fixture
def chat(database_url, make_client):
    """An in-process app on the parametrised database, with alice, bob and carol."""
    client = make_client(database_url=database_url)
    return client, sign_up(client, "alice"), sign_up(client, "bob"), sign_up(client, "carol")


def send(ws, to: str, body: str, client_id: str | None = "c-1", **extra) -> None:
    ws.send_json({"type": "send", "to": to, "body": body, "client_id": client_id, **extra})


def seed(ws, to: str, count: int, prefix: str = "m") -> list[int]:
    ids = []
    for n in range(count):
        send(ws, to, f"{prefix}{n}", client_id=f"{prefix}-{n}")
        ids.append(ack_and_copy(ws)[0]["message"]["id"])
    return ids


def test_hello_is_the_first_frame_and_lists_only_online_partners(chat):
    # v2: the partners (people alice exchanged a message with) who are online;
    # v1 listed every online user. carol is online but a stranger.
    client, alice, bob, carol = chat
    make_partners(alice, bob)
    with bob.ws() as bob_ws, carol.ws() as carol_ws:
        next_frame(bob_ws, "hello")
        next_frame(carol_ws, "hello")
        with alice.ws() as ws:
            hello = ws.receive_json()
            assert hello["type"] == "hello"
            assert hello["user"] == {"id": alice.id, "username": "alice"}
            assert hello["seq"] == 1  # her stream: the one message
            assert [p["username"] for p in hello["presence"]] == ["bob"]
            assert hello["presence"][0]["status"] == "online" and hello["presence"][0]["last_seen"].endswith("Z")


def test_a_send_is_acked_and_reaches_every_socket_of_both_people_once(chat):
    client, alice, bob, carol = chat
    with alice.ws() as a1, alice.ws() as a2, bob.ws() as b1, carol.ws() as c1:
        settle(a1, a2, b1, c1)
        send(a1, "BOB", "hi bob", client_id="c-1")
        ack, copy = ack_and_copy(a1)
        message = ack["message"]
        assert ack["client_id"] == "c-1"
        assert message["from"] == "alice" and message["to"] == "bob" and message["body"] == "hi bob"
        assert message["client_id"] == "c-1" and message["sent_at"].endswith("Z") and isinstance(message["id"], int)
        for ws, frame in ((a1, copy), (a2, next_frame(a2, "message")), (b1, next_frame(b1, "message"))):
            assert frame == {"type": "message", "seq": 1, "message": message}  # the first event of each stream
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
    # these share commits; a send repeated inside the burst (same client_id, same
    # message) still stores once.
    client = make_client(database_url=database_url, send_burst=100)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    with alice.ws() as ws, bob.ws() as bob_ws:
        settle(ws, bob_ws)
        for n in range(40):
            send(ws, "bob", f"burst {n}", client_id=f"b-{n}")
        send(ws, "bob", "burst 3", client_id="b-3")
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
        original = ack_and_copy(ws)[0]["message"]
        burst = [("a", None), ("original", "kept"), ("b", None), ("c", "new-1"), ("d", None)]
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


async def insert_message_rows_through_postgres(conn: chatx.Connection, rows: list[tuple]) -> list[int | None]:
    """PostgreSQL stores message rows only within insert_messages (one call of
    chatx_insert_messages()): the rows as sends, each one's new id or None."""
    items = [chatx.NewMessage(chatx.User(sender, f"user{sender}"), chatx.User(recipient, f"user{recipient}"), body,
                              client_id, reply_to) for sender, recipient, body, _, client_id, reply_to in rows]
    return [outcome.message["id"] if isinstance(outcome, chatx.Stored) and outcome.seqs else None
            for outcome in await chatx.insert_messages(conn, items)]


def on_new_schema(database_url: str, scenario):
    """`scenario(conn, insert)` on a new schema, with the database's own insert
    of message rows: the writer would hide a wrong answer of it by retrying
    each send alone, so these tests call it themselves."""
    postgres = database_url.startswith("postgresql")
    insert = insert_message_rows_through_postgres if postgres else chatx.insert_message_rows_sqlite

    async def run():
        database = chatx.open_database(database_url)
        await database.connect()
        try:
            async with database.connection() as connection:
                conn = chatx.Connection(connection)
                await chatx.migrate(conn)
                return await scenario(conn, insert)
        finally:
            await database.disconnect()

    return run_async(run)


def test_one_insert_mixing_a_stored_client_id_with_new_rows_gives_each_new_row_its_id(database_url):
    # SQLite derives the ids from the newest id before the insert and the count
    # of rows stored (or looks them up when a client_id was stored before);
    # PostgreSQL takes them first.
    async def scenario(conn, insert):
        alice = await chatx.insert_user(conn, "alice", "hash", 0)
        bob = await chatx.insert_user(conn, "bob", "hash", 0)
        # Rows are (sender_id, recipient_id, body, sent_at, client_id, reply_to).
        first = await insert(conn, [(alice.id, bob.id, "original", 1, "kept", None)])
        mixed = await insert(conn, [
            (alice.id, bob.id, "a", 2, None, None), (alice.id, bob.id, "retried", 3, "kept", None),
            (bob.id, alice.id, "c", 4, "kept", first[0]), (alice.id, bob.id, "d", 5, "new", None)])
        repeated = await insert(conn, [(alice.id, bob.id, "again", 6, "new", None)])
        stored = await conn.fetch("SELECT id, body, reply_to FROM chatx_messages ORDER BY id")
        return first, mixed, repeated, [tuple(row) for row in stored]

    first, mixed, repeated, stored = on_new_schema(database_url, scenario)
    assert mixed[1] is None and repeated == [None]
    new = [mixed[0], mixed[2], mixed[3]]
    assert first[0] < new[0] < new[1] < new[2]
    assert stored == [(first[0], "original", None), (new[0], "a", None), (new[1], "c", first[0]), (new[2], "d", None)]


def test_a_message_naming_a_user_id_that_does_not_exist_is_refused_and_stores_nothing(database_url):
    # SQLite has foreign keys; PostgreSQL checks the ids in chatx_insert_messages().
    async def scenario(conn, insert):
        alice = await chatx.insert_user(conn, "alice", "hash", 0)
        refused = []
        for row in [(alice.id, alice.id + 99, "to no one", 1, "a"), (alice.id + 99, alice.id, "from no one", 1, "b")]:
            await conn.begin()  # in a transaction, as the writer runs it, which rolls back on the error
            try:
                await insert(conn, [(alice.id, alice.id, "fine", 1, None, None), (*row, None)])
            except Exception as exc:
                refused.append(type(exc).__name__)
                await conn.rollback()
            else:
                await conn.commit()
        return refused, await conn.fetch_value("SELECT count(*) FROM chatx_messages")

    refused, stored = on_new_schema(database_url, scenario)
    postgres = database_url.startswith("postgresql")
    assert refused == ["ForeignKeyViolationError" if postgres else "IntegrityError"] * 2
    assert stored == 0


def test_a_commit_of_sends_is_one_statement_to_postgresql_whatever_it_holds(monkeypatch):
    """Refusals, retries, ids, both streams and the conversation rows of a
    commit go in one call, outside BEGIN and COMMIT: one round trip."""
    statements: list[str] = []
    for name in ("execute", "fetch", "fetchrow", "fetchval", "executemany"):
        def counted(self, query, *args, _send=getattr(asyncpg.connection.Connection, name), **kwargs):
            statements.append(query)
            return _send(self, query, *args, **kwargs)
        monkeypatch.setattr(asyncpg.connection.Connection, name, counted)

    async def scenario(url: str) -> list[tuple[list[str], list]]:
        storage = chatx.Storage(url)
        await storage.start(chatx.migrate)
        try:
            people = [await storage.write(chatx.insert_user, f"user{i}", "hash", 0) for i in range(6)]
            await storage.write(chatx.insert_block, people[5].id, people[4].id)
            first = await storage.write_bulk(chatx.insert_messages, chatx.NewMessage(*people[:2], "first", "c", None))
            commits = []
            for sends in ([(0, 1, "c", None)], [(0, 1, "c", None), (0, 2, "d", None), (1, 0, "e", first.message["id"]),
                                                (4, 5, "f", None), (2, 3, None, None), (3, 3, "g", None)]):
                del statements[:]
                outcomes = await asyncio.gather(*[storage.write_bulk(chatx.insert_messages, chatx.NewMessage(
                    people[sender], people[recipient], f"body {n}", client_id, reply_to))
                    for n, (sender, recipient, client_id, reply_to) in enumerate(sends)])
                commits.append((list(statements), outcomes))
            return commits
        finally:
            await storage.stop()

    with fresh_postgres_database() as url:
        commits = run_async(scenario, url)
    for sent, outcomes in commits:
        assert len(sent) == 1 and "chatx_insert_messages" in sent[0], sent
    assert [type(outcome).__name__ for outcome in commits[1][1]] == [
        "Refused", "Stored", "Stored", "Refused", "Stored", "Stored"]


def test_a_commit_of_sends_on_postgresql_reads_no_stored_message_or_conversation_it_does_not_need():
    """A commit's cost must not grow with the database: the lookups of a
    retried client_id and of whether two people were partners are by key.
    Counted by PostgreSQL inside the commit's own transaction (rows read by
    sequential scans), after 2,048 messages between 40 people, every pair of
    whom has a conversation."""
    async def scenario(url: str) -> list:
        storage = chatx.Storage(url)
        await storage.start(chatx.migrate)
        try:
            people = [await storage.write(chatx.insert_user, f"user{i}", "hash", 0) for i in range(40)]
            pairs = [(a, b) for a in people for b in people if a is not b]
            for start in range(0, 2048, 256):
                await asyncio.gather(*[storage.write_bulk(chatx.insert_messages, chatx.NewMessage(
                    *pairs[n % len(pairs)], "body", f"fill{n}", None)) for n in range(start, start + 256)])
        finally:
            await storage.stop()
        connection = await asyncpg.connect(url)
        try:
            await connection.execute("ANALYZE")
            async with connection.transaction():
                senders, recipients = [p.id for p in people[:10]] * 5, [p.id for p in people[10:20]] * 5
                rows = await connection.fetch("SELECT * FROM chatx_insert_messages($1, $2, $3, $4, $5, $6)",
                                              senders, recipients, ["hi"] * 50,
                                              [f"new{n}" for n in range(49)] + ["fill351"], [None] * 50, 0)
                assert len(rows) == 50 and rows[-1]["fresh"] is False  # people[9] stored fill351 before: a retry
                return await connection.fetch(
                    "SELECT relname, seq_tup_read FROM pg_stat_xact_user_tables "
                    "WHERE relname IN ('chatx_messages', 'chatx_conversations') ORDER BY relname")
        finally:
            await connection.close()

    with fresh_postgres_database() as url:
        read = run_async(scenario, url)
    assert [tuple(row) for row in read] == [("chatx_conversations", 0), ("chatx_messages", 0)]


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


# A database as ChatX before version 2 left it ({serial} per dialect). The
# sender index and, on PostgreSQL, the foreign keys of chatx_messages are older
# still: databases that had them kept them until now.
VERSION_1_SCHEMA = [
    "CREATE TABLE chatx_users (id {serial} PRIMARY KEY, username VARCHAR(32) NOT NULL, "
    "username_key VARCHAR(32) NOT NULL UNIQUE, password_hash VARCHAR(256) NOT NULL, "
    "status VARCHAR(8) NOT NULL DEFAULT 'offline', last_seen BIGINT, created_at BIGINT NOT NULL)",
    "CREATE TABLE chatx_sessions (id VARCHAR(64) PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES chatx_users (id), "
    "expires_at BIGINT NOT NULL)",
    "CREATE TABLE chatx_messages (id {serial} PRIMARY KEY, sender_id INTEGER NOT NULL REFERENCES chatx_users (id), "
    "recipient_id INTEGER NOT NULL REFERENCES chatx_users (id), body TEXT NOT NULL, sent_at BIGINT NOT NULL, "
    "client_id VARCHAR(128), CONSTRAINT chatx_messages_client_id UNIQUE (sender_id, client_id))",
    "CREATE INDEX chatx_messages_recipient ON chatx_messages (recipient_id, sender_id, id)",
    "CREATE INDEX chatx_messages_sender ON chatx_messages (sender_id, recipient_id, id)",
    "CREATE TABLE chatx_read_cursors (user_id INTEGER NOT NULL REFERENCES chatx_users (id), "
    "peer_id INTEGER NOT NULL REFERENCES chatx_users (id), up_to INTEGER NOT NULL, PRIMARY KEY (user_id, peer_id))",
    "CREATE TABLE chatx_processes (id VARCHAR(32) PRIMARY KEY, heartbeat_at BIGINT NOT NULL)",
    "CREATE TABLE chatx_sockets (id VARCHAR(32) PRIMARY KEY, process_id VARCHAR(32) NOT NULL, user_id INTEGER NOT NULL)",
    "CREATE TABLE chatx_settings (name VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL)",
]


def test_starting_on_a_version_1_database_keeps_everything_and_numbers_it_in_the_streams(database_url, make_client):
    # v2 adds streams, conversation rows, edits and blocks to a database v1
    # made; everything in it must survive, and the old sender index (one more
    # page written per message) and PostgreSQL's message foreign keys (a row
    # lock per message) go.
    postgres = database_url.startswith("postgresql")
    password_hash = chatx.hash_password(PASSWORD)
    people = ["alice", "bob", "carol"]
    sent = [("alice", "bob", "one"), ("bob", "alice", "two"), ("alice", "bob", "three"), ("carol", "bob", "four"),
            ("alice", "alice", "note to self")]
    index_names = ("SELECT indexname FROM pg_indexes WHERE tablename = 'chatx_messages'" if postgres else
                   "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'chatx_messages'")
    foreign_keys = ("SELECT count(*) FROM pg_constraint WHERE conrelid = 'chatx_messages'::regclass AND contype = 'f'"
                    if postgres else "SELECT count(*) FROM pragma_foreign_key_list('chatx_messages')")

    async def on_database(build: bool):
        database = chatx.open_database(database_url)
        await database.connect()
        try:
            async with database.connection() as connection:
                conn = chatx.Connection(connection)
                if build:
                    for statement in VERSION_1_SCHEMA:
                        await conn.execute(statement.format(serial="SERIAL" if postgres else "INTEGER"))
                    for name in people:
                        await conn.execute("INSERT INTO chatx_users (username, username_key, password_hash, status, "
                                           "created_at) VALUES (?, ?, ?, 'offline', 0)", name, name, password_hash)
                    for n, (sender, recipient, body) in enumerate(sent):
                        await conn.execute(
                            "INSERT INTO chatx_messages (sender_id, recipient_id, body, sent_at, client_id) VALUES ("
                            "(SELECT id FROM chatx_users WHERE username = ?), "
                            "(SELECT id FROM chatx_users WHERE username = ?), ?, ?, ?)",
                            sender, recipient, body, 1_700_000_000_000 + n, f"old-{n}")
                    await conn.execute("INSERT INTO chatx_read_cursors (user_id, peer_id, up_to) VALUES (2, 1, 1)")
                    await conn.execute("INSERT INTO chatx_settings (name, value) VALUES ('secret_key', 'v1 secret')")
                return ({row[0] for row in await conn.fetch(index_names)}, await conn.fetch_value(foreign_keys),
                        await conn.fetch_value("SELECT value FROM chatx_settings WHERE name = 'schema_version'"))
        finally:
            await database.disconnect()

    indexes, keys, version = run_async(on_database, True)
    assert "chatx_messages_sender" in indexes and keys == 2 and version is None

    client = make_client(database_url=database_url)
    signed_in = {name: sign_in(client, name) for name in people}
    alice, bob = signed_in["alice"], signed_in["bob"]

    assert [m["body"] for m in history(bob, "alice")["messages"]] == ["one", "two", "three"]
    assert history(bob, "alice")["read_up_to"] == {"bob": 1, "alice": 0}
    listed = bob.get("/api/conversations").json()["conversations"]
    assert [(c["user"]["username"], c["last_message"]["body"], c["unread"]) for c in listed] == [
        ("carol", "four", 1), ("alice", "three", 1)]
    assert unread_counts(alice) == {"alice": 1, "bob": 1}  # "two", and her note to herself

    # Each person's stream numbers their old messages in id order, from 1.
    with bob.ws(since=0) as b:
        assert b.receive_json()["seq"] == 4
        replayed = [next_frame(b, "message") for _ in range(4)]
        assert [(f["seq"], f["message"]["body"]) for f in replayed] == [
            (1, "one"), (2, "two"), (3, "three"), (4, "four")]
        assert [f for f in quiet(b) if f["type"] == "message"] == []
        with alice.ws() as a:
            assert a.receive_json()["seq"] == 4  # one, two, three and her note, once
            send(a, "bob", "after the upgrade", client_id="new-1")
            ack, copy = ack_and_copy(a)
            assert ack["message"]["id"] > 5
            assert next_frame(b, "message") == {"type": "message", "seq": 5, "message": ack["message"]}
            assert copy["seq"] == 5

    indexes, keys, version = run_async(on_database, False)
    assert "chatx_messages_sender" not in indexes and "chatx_messages_recipient" in indexes
    assert keys == (0 if postgres else 2)  # SQLite keeps its foreign keys: they cost no row lock there
    assert version == str(chatx.SCHEMA_VERSION)


def test_a_version_2_postgresql_database_loses_the_insert_that_took_a_lock_shared_by_all_users():
    """Version 3 drops version 2's chatx_insert_messages(), which took one
    advisory lock for every commit: a process of version 2 left running
    stores nothing rather than number streams under a lock no one else takes."""
    async def scenario(conn, insert):
        await conn.execute("UPDATE chatx_settings SET value = '2' WHERE name = 'schema_version'")
        await conn.execute("ALTER TABLE chatx_messages DROP COLUMN attachment_id")  # version 3's, too
        await conn.execute(
            "CREATE FUNCTION chatx_insert_messages(integer[], integer[], text[], bigint[], text[]) "
            "RETURNS void LANGUAGE sql AS 'SELECT pg_advisory_xact_lock(734216)'")
        signatures = "SELECT oid::regprocedure::text FROM pg_proc WHERE proname = 'chatx_insert_messages' ORDER BY 1"
        before = [row[0] for row in await conn.fetch(signatures)]
        await chatx.migrate(conn)
        return before, [row[0] for row in await conn.fetch(signatures)]

    with fresh_postgres_database() as url:
        before, after = on_new_schema(url, scenario)
    version_3 = "chatx_insert_messages(integer[],integer[],text[],text[],integer[],bigint)"
    assert before == ["chatx_insert_messages(integer[],integer[],text[],bigint[],text[])", version_3]
    assert after == [version_3]



def test_the_same_client_id_again_stores_nothing_and_gets_the_original_ack(chat):
    client, alice, bob, carol = chat
    with alice.ws() as ws, bob.ws() as bob_ws:
        settle(ws, bob_ws)
        send(ws, "bob", "once", client_id="dup")
        first, _ = ack_and_copy(ws)
        assert next_frame(bob_ws, "message")["message"] == first["message"]
        send(ws, "BOB", "once", client_id="dup")  # a retry: the same message
        again = next_frame(ws, "ack")
        assert again == first
        assert [f for f in quiet(ws) if f["type"] == "message"] == []
        assert [f for f in quiet(bob_ws) if f["type"] == "message"] == []
    assert [m["body"] for m in history(alice, "bob")["messages"]] == ["once"]


def test_a_client_id_reused_for_a_different_message_is_invalid_and_delivers_nothing(chat):
    # v2: v1 acked the original for any reuse; now another body or another
    # recipient under a used client_id is invalid_field.
    client, alice, bob, carol = chat
    with alice.ws() as ws, bob.ws() as bob_ws, carol.ws() as carol_ws:
        settle(ws, bob_ws, carol_ws)
        send(ws, "bob", "once", client_id="dup")
        ack_and_copy(ws)
        next_frame(bob_ws, "message")
        for to, body in (("bob", "changed body"), ("carol", "once")):
            send(ws, to, body, client_id="dup")
            error = next_frame(ws, "error")
            assert error["code"] == "invalid_field" and error["client_id"] == "dup" and error["detail"]
        for socket in (ws, bob_ws, carol_ws):
            assert [f for f in quiet(socket) if f["type"] in ("message", "ack")] == []
    assert [m["body"] for m in history(alice, "bob")["messages"]] == ["once"]
    assert history(alice, "carol")["messages"] == []


def test_different_senders_may_use_the_same_client_id(chat):
    client, alice, bob, carol = chat
    with alice.ws() as a, bob.ws() as b:
        settle(a, b)
        send(a, "carol", "from alice", client_id="same")
        send(b, "carol", "from bob", client_id="same")
        assert ack_and_copy(a)[0]["message"]["id"] != ack_and_copy(b)[0]["message"]["id"]


def test_sending_to_yourself_delivers_once_per_socket(chat):
    client, alice, bob, carol = chat
    with alice.ws() as ws:
        next_frame(ws, "hello")
        send(ws, "alice", "note to self")
        ack_and_copy(ws)
        assert [f for f in quiet(ws) if f["type"] == "message"] == []
    assert len(history(alice, "alice")["messages"]) == 1


@pytest.mark.validation
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
        assert ack_and_copy(ws)[0]["message"]["body"] == "still here"
    assert [m["body"] for m in history(alice, "bob")["messages"]] == ["still here"]


def test_a_body_of_exactly_4000_characters_is_accepted(chat):
    client, alice, bob, carol = chat
    with alice.ws() as ws:
        next_frame(ws, "hello")
        send(ws, "bob", "é" * 4000)
        assert len(ack_and_copy(ws)[0]["message"]["body"]) == 4000


def test_sends_over_the_token_bucket_are_rate_limited_and_not_stored(database_url, make_client):
    client = make_client(database_url=database_url, send_rate=0.001, send_burst=3)
    alice, _ = sign_up(client, "alice"), sign_up(client, "bob")
    with alice.ws() as ws:
        next_frame(ws, "hello")
        for n in range(3):
            send(ws, "bob", f"m{n}", client_id=f"c{n}")
            ack_and_copy(ws)
        send(ws, "bob", "one too many", client_id="c3")
        error = next_frame(ws, "error")
        assert error["code"] == "rate_limited" and error["client_id"] == "c3"
        ws.send_json({"type": "ping"})
        assert next_frame(ws) == {"type": "pong"}  # still open
    assert len(history(alice, "bob")["messages"]) == 3


@pytest.mark.validation
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
        # Each stream's 4th event (after the three messages): v2 read frames carry the seq.
        expected = {"type": "read", "seq": 4, "reader": "bob", "with": "alice", "up_to": ids[1]}
        assert next_frame(b, "read") == expected
        assert next_frame(a, "read") == expected
        b.send_json({"type": "read", "with": "alice", "up_to": ids[0]})  # backwards: nothing
        assert [f for f in quiet(b) if f["type"] == "read"] == []
        b.send_json({"type": "read", "with": "alice", "up_to": ids[2] + 1000})  # past the end: the newest
        moved = next_frame(b, "read")
        assert moved["up_to"] == ids[2] and moved["seq"] == 5  # a move that sent nothing used no seq
        assert next_frame(a, "read") == moved
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
        ack_and_copy(a)
        with bob.ws() as b:
            next_frame(b, "hello")
            b.send_json({"type": "read", "with": "alice", "up_to": ids[0]})
            next_frame(b, "read")
    # v2: unread counts are in the conversation list (v1 had them in /api/users).
    assert unread_counts(bob) == {"alice": 2, "carol": 1}
    assert unread_counts(alice) == {"bob": 0, "carol": 0}
    assert unread_counts(carol) == {"bob": 0, "alice": 1}


def unread_counts(person) -> dict[str, int]:
    response = person.get("/api/conversations")
    assert response.status_code == 200, response.text
    return {c["user"]["username"]: c["unread"] for c in response.json()["conversations"]}


def test_the_directory_finds_users_but_me_by_username_prefix_in_username_order(chat):
    # v2: GET /api/users is a paged prefix search; v1 listed everyone.
    client, alice, bob, carol = chat
    for name in ("Alfred", "aaron", "ALBERT", "bobby"):
        sign_up(client, name)
    found = directory(alice, q="A")
    assert [u["username"] for u in found["users"]] == ["aaron", "ALBERT", "Alfred"]  # not alice herself
    assert found["has_more"] is False
    assert set(found["users"][0]) == {"id", "username", "status", "last_seen"}
    assert found["users"][0]["status"] is None and found["users"][0]["last_seen"] is None  # v3: not a partner
    assert [u["username"] for u in directory(bob, q="bO")["users"]] == ["bobby"]
    assert [u["username"] for u in directory(bob, q="alice")["users"]] == ["alice"]
    assert directory(alice, q="zed") == {"users": [], "has_more": False}

    first = directory(alice, q="al", limit=1)
    assert [u["username"] for u in first["users"]] == ["ALBERT"] and first["has_more"] is True
    second = directory(alice, q="al", limit=1, after="ALBERT")
    assert [u["username"] for u in second["users"]] == ["Alfred"] and second["has_more"] is False
    assert [u["username"] for u in directory(alice, q="a", after="aaron")["users"]] == ["ALBERT", "Alfred"]


@pytest.mark.validation
@pytest.mark.parametrize("query", [{}, {"q": ""}, {"q": "a" * 33}, {"q": "a", "limit": 0}, {"q": "a", "limit": "x"}])
def test_bad_directory_queries_are_bad_request(chat, query):
    client, alice, bob, carol = chat
    response = alice.get("/api/users", params=query)
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"


@pytest.mark.validation
def test_the_directory_needs_a_session(chat):
    client, alice, bob, carol = chat
    response = client.get("/api/users", params={"q": "a"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "not_authenticated"


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


@pytest.mark.parametrize("digits", [19, 20, 100, 5000])
def test_limits_and_cursors_of_any_number_of_digits_are_the_most_and_past_the_end(chat, digits):
    client, alice, bob, carol = chat
    with alice.ws() as ws:
        next_frame(ws, "hello")
        ids = seed(ws, "bob", 3)
    huge = "9" * digits
    assert [m["id"] for m in history(bob, "alice", limit=huge)["messages"]] == ids  # limit taken as 200
    assert history(bob, "alice", limit=huge, after=huge)["messages"] == []  # none newer
    everything_older = history(bob, "alice", limit=huge, before=huge)
    assert [m["id"] for m in everything_older["messages"]] == ids and everything_older["has_more"] is False
    listed = bob.get("/api/conversations", params={"limit": huge, "before": huge})
    assert listed.status_code == 200, listed.text
    assert [row["user"]["username"] for row in listed.json()["conversations"]] == ["alice"]
    with bob.ws(after=huge, since=huge) as b:  # nothing beyond the end to replay, and no refusal
        hello = next_frame(b, "hello")
        assert hello["seq"] == 3 and [f for f in quiet(b) if f["type"] != "presence"] == []


def test_history_limit_above_200_is_taken_as_200(chat):
    client, alice, bob, carol = chat
    assert history(alice, "bob", limit=100000)["messages"] == []


@pytest.mark.validation
@pytest.mark.parametrize(
    "query", [{"limit": 0}, {"limit": -3}, {"limit": "ten"}, {"before": -1}, {"after": "1.5"}, {"before": "x"},
              {"before": 5, "after": 1}],
)
def test_bad_history_queries_are_bad_request(chat, query):
    client, alice, bob, carol = chat
    response = alice.get("/api/conversations/bob/messages", params=query)
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"


@pytest.mark.validation
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
    # v2: since=S replays bob's stream above seq S, each frame with its seq.
    with bob.ws(since=2) as b:
        assert b.receive_json()["seq"] == 4
        replayed = [next_frame(b, "message") for _ in range(2)]
        assert [(f["seq"], f["message"]["id"]) for f in replayed] == [(3, ids[2]), (4, ids[3])]
        assert [f for f in quiet(b) if f["type"] == "message"] == []


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


@pytest.mark.validation
def test_a_bad_after_is_an_invalid_field_error(chat):
    client, alice, bob, carol = chat
    with alice.ws(after="-2") as ws:  # type: ignore[arg-type]
        error = ws.receive_json()
        assert error["type"] == "error" and error["code"] == "invalid_field"


@pytest.mark.validation
def test_the_websocket_needs_a_session(chat):
    client, alice, bob, carol = chat
    with pytest.raises((WebSocketDisconnect, WebSocketDenialResponse)):
        with client.websocket_connect("/ws") as ws:
            ws.receive_json()


@pytest.mark.validation
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
