"""Protocol version 2: the conversation list, the directory, blocking, edit and
delete, replies, and upgrading a version 1 database in place (docs/protocol.md:
HTTP endpoints, Blocking, Editing and deleting, Changes from version 1).

Storage-touching tests run on SQLite and on PostgreSQL (`database_url`)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import chatx
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.schema import CreateIndex, CreateTable
from starlette.testclient import TestClient

from conftest import (PASSWORD, Person, ack_and_copy, delete_me, directory, error_code, fresh_postgres_database, history,
                      make_partners, next_frame, quiet, run_async, settle, sign_in, sign_up, wait_until)

PASSWORD_HASH = chatx.hash_password(PASSWORD)  # one slow hash, shared by every user inserted in bulk
EVIL_ORIGIN = "https://evil.example"


# ---- helpers ----------------------------------------------------------------------------


def chat_of(client: TestClient) -> chatx.ChatX:
    return client.app.state.chat


def send(ws, to: str, body: str, client_id: str | None = None, **extra) -> None:
    ws.send_json({"type": "send", "to": to, "body": body, "client_id": client_id or uuid.uuid4().hex, **extra})


def sent(ws, to: str, body: str, **extra) -> dict[str, Any]:
    """Send, and return the acked message (the socket's own message frame is consumed too)."""
    send(ws, to, body, **extra)
    return ack_and_copy(ws)[0]["message"]


def received(ws, count: int) -> list[dict[str, Any]]:
    """The next `count` message frames' messages."""
    return [next_frame(ws, "message")["message"] for _ in range(count)]


def not_presence(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [frame for frame in frames if frame["type"] != "presence"]


def conversations(person, **query) -> dict[str, Any]:
    response = person.get("/api/conversations", params=query)
    assert response.status_code == 200, response.text
    return response.json()


def put(person, path: str, **headers: str):
    return person.client.put(path, headers={**person.headers, **headers})


def delete(person, path: str, **headers: str):
    return person.client.delete(path, headers={**person.headers, **headers})


def add_users(client: TestClient, names: list[str]) -> dict[str, chatx.User]:
    """Insert users through the storage layer, in one write job run by the app with the server's own
    chatx.insert_user: no slow hash per user (each has the password PASSWORD), no sign-up limit."""
    now = chatx.now_ms()

    async def insert(conn: chatx.Connection) -> list[chatx.User | None]:
        return [await chatx.insert_user(conn, name, PASSWORD_HASH, now) for name in names]

    storage = chat_of(client).storage
    users = client.portal.call(lambda: storage.write(insert))
    assert all(users), f"some names were refused: {[n for n, u in zip(names, users) if u is None]}"
    return {user.username: user for user in users}


def person(client: TestClient, name: str) -> Person:
    """A signed-in user made through the storage layer (sign_up hashes a password: slow, and limited per address)."""
    user = add_users(client, [name])[name]
    cookie = client.portal.call(chat_of(client).accounts.create_session, user)
    return Person(client, user.username, cookie, user.id)


def store_messages(client: TestClient, items: list[tuple[chatx.User, chatx.User, str]]) -> list[dict[str, Any]]:
    """Send messages through the app's Messenger (stored, numbered, delivered), in order."""
    messenger = chat_of(client).messenger

    async def go() -> list[Any]:
        futures = [messenger.send(chatx.NewMessage(sender, recipient, body, None, None), lambda outcome: None)
                   for sender, recipient, body in items]
        return list(await asyncio.gather(*futures))

    outcomes = client.portal.call(go)
    assert all(isinstance(outcome, chatx.Stored) for outcome in outcomes), outcomes
    return [outcome.message for outcome in outcomes]


def me_as_user(person) -> chatx.User:
    return chatx.User(person.id, person.username)


@pytest.fixture
def chat(database_url, make_client):
    """alice, bob, carol and dave on the parametrised database; sends and typing are not rate limited."""
    client = make_client(database_url=database_url, send_rate=1000.0, send_burst=1000.0, typing_interval=0)
    return client, *(person(client, name) for name in ("alice", "bob", "carol", "dave"))


# ---- 1. GET /api/conversations ------------------------------------------------------------


def test_conversations_list_everyone_i_exchanged_a_message_with_newest_first_with_unread_and_cursors(chat):
    client, alice, bob, carol, dave = chat
    erin = person(client, "erin")
    with alice.ws() as a, bob.ws() as b, carol.ws() as c:
        settle(a, b, c)
        b1 = sent(b, "alice", "bob one")
        b2 = sent(b, "alice", "bob two")
        b3 = sent(b, "alice", "bob three")
        assert received(a, 3) == [b1, b2, b3]
        to_carol = sent(a, "carol", "hi carol")  # only I wrote: carol is listed all the same
        assert received(c, 1) == [to_carol]
        with erin.ws() as e:
            next_frame(e, "hello")
            from_erin_first = sent(e, "ALICE", "erin writes")
        assert received(a, 1) == [from_erin_first]
        reply = sent(a, "bob", "alice answers")  # bob's conversation is newest again
        assert received(b, 1) == [reply]
        # alice reads bob's first message only
        a.send_json({"type": "read", "with": "bob", "up_to": b1["id"]})
        assert next_frame(a, "read")["up_to"] == b1["id"]
        settle(a, b, c)

        listed = conversations(alice)
        assert listed["has_more"] is False
        assert [row["user"]["username"] for row in listed["conversations"]] == ["bob", "erin", "carol"]
        by_name = {row["user"]["username"]: row for row in listed["conversations"]}
        assert by_name["bob"] == {
            "user": {"id": bob.id, "username": "bob"},
            "status": "online",
            "last_seen": by_name["bob"]["last_seen"],
            "unread": 2,  # bob two and bob three are above my cursor
            "last_message": reply,
            "read_up_to": {"alice": b1["id"], "bob": 0},
        }
        assert by_name["bob"]["last_seen"].endswith("Z")
        assert by_name["carol"]["status"] == "online" and by_name["carol"]["unread"] == 0
        assert by_name["carol"]["last_message"] == to_carol
        assert by_name["carol"]["read_up_to"] == {"alice": 0, "carol": 0}
        assert by_name["erin"]["unread"] == 1 and by_name["erin"]["last_message"] == from_erin_first
        assert by_name["erin"]["user"] == {"id": erin.id, "username": "erin"}

        # The other side: bob sees alice, with the mirrored cursors and his unread.
        bob_view = conversations(bob)["conversations"]
        assert [row["user"]["username"] for row in bob_view] == ["alice"]
        assert bob_view[0]["unread"] == 1 and bob_view[0]["last_message"] == reply
        assert bob_view[0]["read_up_to"] == {"bob": 0, "alice": b1["id"]}
        assert bob_view[0]["status"] == "online"

        # carol reads up to the message: unread falls, alice sees carol's cursor.
        c.send_json({"type": "read", "with": "alice", "up_to": to_carol["id"]})
        next_frame(c, "read")
        assert conversations(carol)["conversations"][0]["unread"] == 0
        row = {r["user"]["username"]: r for r in conversations(alice)["conversations"]}["carol"]
        assert row["read_up_to"] == {"alice": 0, "carol": to_carol["id"]}
        assert b2["id"] < b3["id"] < reply["id"]


def test_a_stranger_never_messaged_is_not_a_conversation(chat):
    client, alice, bob, carol, dave = chat
    with alice.ws() as a, bob.ws() as b, dave.ws() as d:
        settle(a, b, d)
        sent(a, "bob", "hello")
        settle(b, d)
    assert [row["user"]["username"] for row in conversations(alice)["conversations"]] == ["bob"]
    assert conversations(dave) == {"conversations": [], "has_more": False}
    assert conversations(carol) == {"conversations": [], "has_more": False}


def test_a_never_connected_partner_is_offline_with_no_last_seen(chat):
    client, alice, bob, carol, dave = chat
    with alice.ws() as a:
        next_frame(a, "hello")
        sent(a, "carol", "are you there")
    row = conversations(alice)["conversations"][0]
    assert row["user"]["username"] == "carol" and row["status"] == "offline" and row["last_seen"] is None


def test_talking_to_myself_is_a_conversation_with_myself(chat):
    client, alice, bob, carol, dave = chat
    with alice.ws() as a:
        next_frame(a, "hello")
        note = sent(a, "alice", "note to self")
        other = sent(a, "bob", "to bob")
        newest = sent(a, "Alice", "another note")
    rows = conversations(alice)["conversations"]
    assert [row["user"]["username"] for row in rows] == ["alice", "bob"]
    assert rows[0]["user"] == {"id": alice.id, "username": "alice"}
    assert rows[0]["last_message"] == newest and rows[1]["last_message"] == other
    assert set(rows[0]["read_up_to"]) == {"alice"}
    assert note["id"] < other["id"] < newest["id"]
    # bob's list has alice only once, not alice's self-conversation
    assert [row["user"]["username"] for row in conversations(bob)["conversations"]] == ["alice"]


def test_conversations_page_with_before_and_has_more(chat):
    client, alice, bob, carol, dave = chat
    people = add_users(client, [f"pal{n:02d}" for n in range(7)])
    last = store_messages(client, [(me_as_user(alice), people[f"pal{n:02d}"], f"hi {n}") for n in range(7)])
    # newest first: pal06 … pal00
    first = conversations(alice, limit=3)
    assert [row["user"]["username"] for row in first["conversations"]] == ["pal06", "pal05", "pal04"]
    assert first["has_more"] is True
    second = conversations(alice, limit=3, before=first["conversations"][-1]["last_message"]["id"])
    assert [row["user"]["username"] for row in second["conversations"]] == ["pal03", "pal02", "pal01"]
    assert second["has_more"] is True
    third = conversations(alice, limit=3, before=second["conversations"][-1]["last_message"]["id"])
    assert [row["user"]["username"] for row in third["conversations"]] == ["pal00"]
    assert third["has_more"] is False
    assert third["conversations"][0]["last_message"] == last[0]
    # exactly the page's size left: no more
    exact = conversations(alice, limit=1, before=last[1]["id"])
    assert [row["user"]["username"] for row in exact["conversations"]] == ["pal00"] and exact["has_more"] is False
    assert conversations(alice, before=0) == {"conversations": [], "has_more": False}
    # a message in an old conversation brings it to the front
    newest = store_messages(client, [(people["pal00"], me_as_user(alice), "back again")])[0]
    top = conversations(alice, limit=1)["conversations"][0]
    assert top["user"]["username"] == "pal00" and top["last_message"] == newest and top["unread"] == 1


def test_conversations_limit_defaults_to_50_and_above_200_is_taken_as_200(chat):
    client, alice, bob, carol, dave = chat
    names = [f"friend{n:03d}" for n in range(205)]
    people = add_users(client, names)
    store_messages(client, [(people[name], me_as_user(alice), f"from {name}") for name in names])
    default = conversations(alice)
    assert len(default["conversations"]) == 50 and default["has_more"] is True
    assert default["conversations"][0]["user"]["username"] == "friend204"
    capped = conversations(alice, limit=1000)
    assert len(capped["conversations"]) == 200 and capped["has_more"] is True
    assert conversations(alice, limit=200)["conversations"] == capped["conversations"]
    rest = conversations(alice, limit=200, before=capped["conversations"][-1]["last_message"]["id"])
    assert [row["user"]["username"] for row in rest["conversations"]] == [f"friend{n:03d}" for n in (4, 3, 2, 1, 0)]
    assert rest["has_more"] is False
    assert all(row["unread"] == 1 for row in capped["conversations"] + rest["conversations"])


BIG_BODY = "\U0001F600" * chatx.BODY_MAX  # 16 kB of UTF-8


def test_history_pages_stop_short_of_their_byte_bound_and_has_more_stays_true(chat):
    client, alice, bob, carol, dave = chat
    ids = [m["id"] for m in store_messages(client, [(me_as_user(alice), me_as_user(bob), f"{n} {BIG_BODY}")
                                                    for n in range(40)])]
    seen, before, pages = [], None, 0
    while True:  # newest first, then older: every message once, in order
        response = bob.get("/api/conversations/alice/messages", params={"limit": 200, **({} if before is None
                                                                                          else {"before": before})})
        assert response.status_code == 200 and len(response.content) <= chatx.PAGE_BYTES_MAX, len(response.content)
        page = response.json()
        seen[:0] = [m["id"] for m in page["messages"]]
        pages += 1
        if not page["has_more"]:
            break
        before = page["messages"][0]["id"]
    assert seen == ids and pages >= 3
    seen, after = [], 0
    while True:  # oldest first, then newer
        response = bob.get("/api/conversations/alice/messages", params={"limit": 200, "after": after})
        assert response.status_code == 200 and len(response.content) <= chatx.PAGE_BYTES_MAX, len(response.content)
        page = response.json()
        seen += [m["id"] for m in page["messages"]]
        if not page["has_more"]:
            break
        after = page["messages"][-1]["id"]
    assert seen == ids
    # A page of short messages is not cut: the count decides, as before.
    short = store_messages(client, [(me_as_user(bob), me_as_user(alice), f"short {n}") for n in range(200)])
    page = history(alice, "bob", limit=200)
    assert [m["id"] for m in page["messages"]] == [m["id"] for m in short] and page["has_more"] is True


def test_the_conversation_list_stops_short_of_its_byte_bound_and_has_more_stays_true(chat):
    client, alice, bob, carol, dave = chat
    names = [f"pen{n:02d}" for n in range(30)]
    people = add_users(client, names)
    store_messages(client, [(people[name], me_as_user(alice), f"{name} {BIG_BODY}") for name in names])
    listed, before = [], None
    while True:
        response = alice.get("/api/conversations", params={"limit": 200, **({} if before is None
                                                                                else {"before": before})})
        assert response.status_code == 200 and len(response.content) <= chatx.PAGE_BYTES_MAX, len(response.content)
        page = response.json()
        listed += [row["user"]["username"] for row in page["conversations"]]
        if not page["has_more"]:
            break
        before = page["conversations"][-1]["last_message"]["id"]
    assert listed == names[::-1]


@pytest.mark.validation
@pytest.mark.parametrize("query", [{"limit": "0"}, {"limit": "-1"}, {"limit": "abc"}, {"before": "abc"},
                                   {"before": "-1"}, {"before": "1.5"}, {"before": ""}])
def test_bad_conversation_list_queries_are_bad_request(chat, query):
    client, alice, bob, carol, dave = chat
    response = alice.get("/api/conversations", params=query)
    assert response.status_code == 400, response.text
    assert error_code(response) == "bad_request"


@pytest.mark.validation
def test_conversation_list_needs_a_session(chat):
    client, alice, bob, carol, dave = chat
    client.cookies.clear()
    response = client.get("/api/conversations")
    assert response.status_code == 401 and error_code(response) == "not_authenticated"


# ---- 2. one request per page load, whatever the number of users --------------------------------


class RecordingConnection:
    """Stands in for chatx.Connection to capture a query's SQL and arguments (SQLite marks)."""

    postgres = False

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        self.calls.append((sql, args))
        return []


def captured_sql(query, *args: Any) -> tuple[str, tuple]:
    recorder = RecordingConnection()
    run_async(query, recorder, *args)
    (call,) = recorder.calls
    return call


def query_plan(path: Path, sql: str, args: tuple) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, args)]


def vm_steps(path: Path, sql: str, args: tuple) -> tuple[int, list[tuple]]:
    """How many virtual machine instructions SQLite runs for the query: its cost, without a clock."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        steps = 0

        def count() -> int:
            nonlocal steps
            steps += 1
            return 0

        conn.set_progress_handler(count, 1)
        rows = conn.execute(sql, args).fetchall()
        return steps, rows


def assert_searches_only(plan: list[str]) -> None:
    """Every table is reached through an index or key (SEARCH), none is scanned, nothing is sorted."""
    assert plan, "no plan"
    for line in plan:
        assert not line.startswith("SCAN"), plan
        assert "TEMP B-TREE" not in line, plan


def test_conversations_and_directory_cost_their_page_not_the_number_of_users(make_client, sqlite_url):
    client = make_client(send_rate=1000.0, send_burst=1000.0)
    path = Path(sqlite_url.removeprefix("sqlite:///"))
    alice = sign_up(client, "alice")
    crowd = add_users(client, [f"user{n:04d}" for n in range(2000)])
    partners = [crowd[f"user{n:04d}"] for n in range(0, 2000, 100)]  # 20 of them
    me = me_as_user(alice)
    stored = store_messages(client, [(me, p, f"hello {p.username}") if n % 2 else (p, me, f"hi from {p.username}")
                                     for n, p in enumerate(partners)])
    # The page is right: 20 conversations, newest first, each with its one message.
    page = conversations(alice, limit=10)
    assert [row["user"]["username"] for row in page["conversations"]] == [p.username for p in partners[::-1][:10]]
    assert [row["last_message"] for row in page["conversations"]] == stored[::-1][:10]
    assert page["has_more"] is True
    assert [row["unread"] for row in page["conversations"]] == [0 if n % 2 else 1 for n in range(19, 9, -1)]
    found = directory(alice, q="USER19", limit=5)
    assert [u["username"] for u in found["users"]] == [f"user19{n:02d}" for n in range(5)] and found["has_more"]

    conversation_sql = captured_sql(chatx.conversation_rows, alice.id, None, 11)
    older_sql = captured_sql(chatx.conversation_rows, alice.id, stored[10]["id"], 11)
    directory_sql = captured_sql(chatx.directory_page, alice.id, "user19", "", 6)
    paged_directory_sql = captured_sql(chatx.directory_page, alice.id, "user19", "user1904", 6)
    for sql, args in (conversation_sql, older_sql, directory_sql, paged_directory_sql):
        plan = query_plan(path, sql, args)
        assert_searches_only(plan)
    assert any("chatx_conversations_recent" in line for line in query_plan(path, *conversation_sql))
    assert any("username_key" in line for line in query_plan(path, *directory_sql))

    before = {name: vm_steps(path, *sql) for name, sql in
              (("conversations", conversation_sql), ("older", older_sql), ("directory", directory_sql),
               ("paged", paged_directory_sql))}
    assert len(before["conversations"][1]) == 11 and len(before["directory"][1]) == 6

    # Twice the users, and conversations among the others: the same pages cost the same.
    more = add_users(client, [f"zed{n:04d}" for n in range(2000)])
    others = [more[f"zed{n:04d}"] for n in range(0, 2000, 10)]
    store_messages(client, [(others[n], others[n + 1], "not for alice") for n in range(len(others) - 1)])
    store_messages(client, [(crowd["user0001"], crowd[f"user{n:04d}"], "busy") for n in range(2, 200)])
    after = {name: vm_steps(path, *sql) for name, sql in
             (("conversations", conversation_sql), ("older", older_sql), ("directory", directory_sql),
              ("paged", paged_directory_sql))}
    for name in before:
        assert after[name][1] == before[name][1], name
        assert after[name][0] == before[name][0], (name, before[name][0], after[name][0])
    assert conversations(alice, limit=10) == page


def test_a_commit_looks_up_each_conversation_it_touches_by_key_not_every_pair_of_its_people(make_client, sqlite_url):
    # A commit of many senders asks which of its (person, partner) pairs are new
    # conversations: a key lookup per pair, not one per pair of all its people.
    client = make_client()
    path = Path(sqlite_url.removeprefix("sqlite:///"))
    crowd = add_users(client, [f"user{n:04d}" for n in range(400)])
    people = [crowd[f"user{n:04d}"] for n in range(400)]
    store_messages(client, [(people[n], people[n + 1], "hi") for n in range(0, 400, 2)])

    def check(pairs: int) -> tuple[list[str], int, list[tuple]]:
        asked = [(people[n].id, people[n + 1].id) for n in range(0, 2 * pairs, 2)]
        sql, args = captured_sql(chatx.conversations_known, asked)
        steps, rows = vm_steps(path, sql, args)
        return query_plan(path, sql, args), steps, rows

    plan, few, found_few = check(10)
    assert_searches_only(plan)
    plan, many, found_many = check(200)
    assert many < 20 * few * 1.5, (few, many)  # 20 times the pairs, 400 times the pairs of people
    assert (len(found_few), len(found_many)) == (10, 200)


def test_conversations_page_is_right_with_2000_users_on_both_databases(chat):
    client, alice, bob, carol, dave = chat
    crowd = add_users(client, [f"member{n:04d}" for n in range(2000)])
    me = me_as_user(alice)
    partners = [crowd[f"member{n:04d}"] for n in (5, 1500, 42, 1999, 0)]
    stored = store_messages(client, [(p, me, f"from {p.username}") for p in partners])
    listed = conversations(alice)
    assert [row["user"]["username"] for row in listed["conversations"]] == [p.username for p in partners[::-1]]
    assert [row["last_message"] for row in listed["conversations"]] == stored[::-1]
    assert [row["unread"] for row in listed["conversations"]] == [1] * 5 and listed["has_more"] is False
    assert conversations(bob) == {"conversations": [], "has_more": False}
    found = directory(alice, q="member199", limit=20)
    assert [u["username"] for u in found["users"]] == [f"member199{n}" for n in range(10)]
    assert found["has_more"] is False


# ---- 3. GET /api/users: the directory -------------------------------------------------------


def test_directory_is_a_case_insensitive_prefix_search_excluding_me_by_lowercase_username(chat):
    client, alice, bob, carol, dave = chat
    add_users(client, ["Bobby", "BOBCAT", "bobo.x", "rob"])
    found = directory(bob, q="bO")
    assert [u["username"] for u in found["users"]] == ["Bobby", "BOBCAT", "bobo.x"]  # bob himself is left out
    assert found["has_more"] is False
    assert set(found["users"][0]) == {"id", "username", "status", "last_seen"}
    assert [u["username"] for u in directory(alice, q="BOB")["users"]] == ["bob", "Bobby", "BOBCAT", "bobo.x"]
    assert directory(alice, q="bobz") == {"users": [], "has_more": False}
    # ordered by the lower-cased username (bob < bobby < bobcat), not by the bytes as registered (BOBCAT first)
    assert [u["username"] for u in directory(alice, q="b")["users"]] == ["bob", "Bobby", "BOBCAT", "bobo.x"]


def test_directory_shows_status_and_last_seen_of_partners(chat):
    client, alice, bob, carol, dave = chat
    make_partners(alice, bob)
    make_partners(alice, carol)
    with bob.ws() as b:
        next_frame(b, "hello")
        user = directory(alice, q="bob")["users"][0]
        assert user["id"] == bob.id and user["status"] == "online" and user["last_seen"].endswith("Z")
    carol_found = directory(alice, q="carol")["users"][0]
    assert carol_found["status"] == "offline" and carol_found["last_seen"] is None  # a partner never seen
    # v3: of someone who is not my partner, nothing.
    assert {k: v for k, v in directory(dave, q="bob")["users"][0].items() if k != "id"} == {
        "username": "bob", "status": None, "last_seen": None}


def test_directory_pages_with_after_and_limit(chat):
    client, alice, bob, carol, dave = chat
    names = [f"Page{n}" for n in range(7)]
    add_users(client, names)
    first = directory(alice, q="page", limit=3)
    assert [u["username"] for u in first["users"]] == ["Page0", "Page1", "Page2"] and first["has_more"] is True
    second = directory(alice, q="page", limit=3, after=first["users"][-1]["username"])
    assert [u["username"] for u in second["users"]] == ["Page3", "Page4", "Page5"] and second["has_more"] is True
    third = directory(alice, q="page", limit=3, after="PAGE5")  # after is matched regardless of case too
    assert [u["username"] for u in third["users"]] == ["Page6"] and third["has_more"] is False
    exact = directory(alice, q="page", limit=7)
    assert len(exact["users"]) == 7 and exact["has_more"] is False
    assert [u["username"] for u in directory(alice, q="page")["users"]] == names


def test_directory_limit_defaults_to_20_and_above_100_is_taken_as_100(chat):
    client, alice, bob, carol, dave = chat
    add_users(client, [f"many{n:03d}" for n in range(120)])
    default = directory(alice, q="many")
    assert len(default["users"]) == 20 and default["has_more"] is True
    capped = directory(alice, q="many", limit=500)
    assert len(capped["users"]) == 100 and capped["has_more"] is True
    assert capped["users"][-1]["username"] == "many099"
    rest = directory(alice, q="many", limit=100, after="many099")
    assert len(rest["users"]) == 20 and rest["has_more"] is False


def test_directory_prefix_wildcards_match_literally(chat):
    client, alice, bob, carol, dave = chat
    add_users(client, ["ab_c", "abxc", "ab.d", "abzd"])
    assert [u["username"] for u in directory(alice, q="ab_")["users"]] == ["ab_c"]
    assert directory(alice, q="ab%")["users"] == []
    assert directory(alice, q="%")["users"] == []
    assert directory(alice, q="_")["users"] == []
    assert [u["username"] for u in directory(alice, q="ab.")["users"]] == ["ab.d"]
    assert directory(alice, q="ab[")["users"] == [] and directory(alice, q="a*")["users"] == []


@pytest.mark.validation
@pytest.mark.parametrize("query", [{}, {"q": ""}, {"q": "x" * 33}, {"q": "bob", "limit": "0"},
                                   {"q": "bob", "limit": "x"}])
def test_bad_directory_queries_are_bad_request(chat, query):
    client, alice, bob, carol, dave = chat
    response = alice.get("/api/users", params=query)
    assert response.status_code == 400, response.text
    assert error_code(response) == "bad_request"


def test_a_query_of_32_characters_is_accepted(chat):
    client, alice, bob, carol, dave = chat
    add_users(client, ["q" * 32])
    assert [u["username"] for u in directory(alice, q="Q" * 32)["users"]] == ["q" * 32]


@pytest.mark.validation
def test_directory_needs_a_session(chat):
    client, alice, bob, carol, dave = chat
    client.cookies.clear()
    response = client.get("/api/users", params={"q": "bob"})
    assert response.status_code == 401 and error_code(response) == "not_authenticated"


# ---- 4. blocking ----------------------------------------------------------------------


def test_block_endpoints_answer_204_204_200_and_are_idempotent(chat):
    client, alice, bob, carol, dave = chat
    assert alice.get("/api/blocks").json() == {"blocks": []}
    assert put(alice, "/api/blocks/BOB").status_code == 204
    assert put(alice, "/api/blocks/bob").status_code == 204  # again: still 204
    assert put(alice, "/api/blocks/carol").status_code == 204
    response = alice.get("/api/blocks")
    assert response.status_code == 200
    assert response.json() == {"blocks": [{"id": bob.id, "username": "bob"}, {"id": carol.id, "username": "carol"}]}
    assert bob.get("/api/blocks").json() == {"blocks": []}  # blocks are mine, not theirs
    assert delete(alice, "/api/blocks/Bob").status_code == 204
    assert delete(alice, "/api/blocks/bob").status_code == 204  # not blocked: still 204
    assert alice.get("/api/blocks").json() == {"blocks": [{"id": carol.id, "username": "carol"}]}


@pytest.mark.validation
def test_blocking_an_unknown_user_is_404_and_every_block_endpoint_needs_a_session(chat):
    client, alice, bob, carol, dave = chat
    for response in (put(alice, "/api/blocks/nobody"), delete(alice, "/api/blocks/nobody")):
        assert response.status_code == 404 and error_code(response) == "unknown_user"
    client.cookies.clear()
    for response in (client.put("/api/blocks/bob"), client.delete("/api/blocks/bob"), client.get("/api/blocks")):
        assert response.status_code == 401 and error_code(response) == "not_authenticated"


@pytest.mark.validation
def test_a_cross_site_block_request_is_forbidden(chat):
    client, alice, bob, carol, dave = chat
    for response in (put(alice, "/api/blocks/bob", origin=EVIL_ORIGIN),
                     delete(alice, "/api/blocks/bob", origin=EVIL_ORIGIN)):
        assert response.status_code == 403, response.text
        assert error_code(response) == "forbidden"
    assert alice.get("/api/blocks").json() == {"blocks": []}
    assert put(alice, "/api/blocks/bob", origin="http://testserver").status_code == 204  # same origin is fine


def test_while_a_blocks_b_b_cannot_send_to_a_but_a_can_send_to_b_and_history_stays(chat):
    client, alice, bob, carol, dave = chat
    with alice.ws() as a, bob.ws() as b:
        settle(a, b)
        before = sent(b, "alice", "before the block")
        next_frame(a, "message")
        assert put(alice, "/api/blocks/bob").status_code == 204
        history_before = history(alice, "bob")

        send(b, "alice", "let me in", client_id="blocked-1")
        error = next_frame(b, "error")
        assert error["code"] == "blocked" and error["client_id"] == "blocked-1"
        assert not_presence(quiet(b)) == []
        assert not_presence(quiet(a)) == []  # alice gets nothing
        assert history(alice, "bob") == history_before  # nothing stored
        assert history(bob, "alice")["messages"] == [before]
        reply = sent(a, "bob", "I can still write to you")
        assert next_frame(b, "message")["message"] == reply
        assert [m["id"] for m in history(bob, "alice")["messages"]] == [before["id"], reply["id"]]

        # both lists still show the conversation
        assert [row["user"]["username"] for row in conversations(alice)["conversations"]] == ["bob"]
        assert [row["user"]["username"] for row in conversations(bob)["conversations"]] == ["alice"]

        assert delete(alice, "/api/blocks/bob").status_code == 204
        after = sent(b, "alice", "let me in", client_id="blocked-1")  # the refused client_id stored nothing
        assert after["body"] == "let me in" and after["id"] > reply["id"]
        assert next_frame(a, "message")["message"] == after


def test_b_blocked_by_a_has_typing_to_a_dropped(chat):
    client, alice, bob, carol, dave = chat
    with alice.ws() as a, bob.ws() as b:
        settle(a, b)
        sent(a, "bob", "hi")
        assert received(b, 1)[0]["body"] == "hi"
        settle(a, b)
        assert put(alice, "/api/blocks/bob").status_code == 204
        b.send_json({"type": "typing", "to": "alice"})
        assert not_presence(quiet(b)) == []  # bob's typing is handled before his ping is answered; no error
        assert not_presence(quiet(a)) == []  # and alice got nothing
        a.send_json({"type": "typing", "to": "bob"})  # alice may still tell bob
        settle(a)
        assert next_frame(b, "typing") == {"type": "typing", "from": "alice"}
        assert delete(alice, "/api/blocks/bob").status_code == 204
        b.send_json({"type": "typing", "to": "alice"})
        settle(b)
        assert next_frame(a, "typing") == {"type": "typing", "from": "bob"}  # the control: it does reach her


def test_a_blocked_person_s_edit_and_delete_do_not_reach_the_blocker(chat):
    client, alice, bob, carol, dave = chat
    with alice.ws() as a, bob.ws() as b, carol.ws() as c:
        settle(a, b, c)
        mine = sent(b, "alice", "before the block")
        theirs = sent(c, "alice", "carol's, never blocked")
        assert [m["id"] for m in received(a, 2)] == [mine["id"], theirs["id"]]
        assert put(alice, "/api/blocks/bob").status_code == 204
        history_before = history(alice, "bob")

        b.send_json({"type": "edit", "id": mine["id"], "body": "something worse", "client_id": "e-1"})
        b.send_json({"type": "delete", "id": mine["id"], "client_id": "d-1"})
        errors = not_presence(quiet(b))
        assert [(e["type"], e["code"], e["client_id"]) for e in errors] == [("error", "blocked", "e-1"),
                                                                            ("error", "blocked", "d-1")]
        assert not_presence(quiet(a)) == []  # alice gets nothing live...
        assert history(alice, "bob") == history_before  # ...nor in her history
        with alice.ws(since=0) as again:  # ...nor in her stream's replay
            next_frame(again, "hello")
            assert [f["type"] for f in not_presence(quiet(again))] == ["message", "message"]

        # The well-behaved: carol's edit reaches alice, and alice's own edits reach bob.
        c.send_json({"type": "edit", "id": theirs["id"], "body": "carol's, edited"})
        assert next_frame(a, "edit")["message"]["body"] == "carol's, edited"
        to_bob = sent(a, "bob", "I blocked you")
        assert next_frame(b, "message")["message"] == to_bob
        a.send_json({"type": "edit", "id": to_bob["id"], "body": "I blocked you, sorry"})
        assert next_frame(b, "edit")["message"]["body"] == "I blocked you, sorry"
        assert next_frame(a, "edit")["message"]["body"] == "I blocked you, sorry"

        # Once the block ends, bob's edits reach alice again.
        assert delete(alice, "/api/blocks/bob").status_code == 204
        b.send_json({"type": "edit", "id": mine["id"], "body": "after the block"})
        assert next_frame(a, "edit")["message"]["body"] == "after the block"


def test_a_blocked_person_s_read_receipt_does_not_reach_the_blocker(chat):
    client, alice, bob, carol, dave = chat
    with alice.ws() as a, bob.ws() as b, carol.ws() as c:
        settle(a, b, c)
        to_bob = sent(a, "bob", "hi bob")
        to_carol = sent(a, "carol", "hi carol")
        received(b, 1)
        received(c, 1)
        assert put(alice, "/api/blocks/bob").status_code == 204

        b.send_json({"type": "read", "with": "alice", "up_to": to_bob["id"]})
        assert next_frame(b, "read")["up_to"] == to_bob["id"]  # bob's own view changes
        assert not_presence(quiet(a)) == []  # alice's does not: no frame...
        assert history(alice, "bob")["read_up_to"] == {"alice": 0, "bob": 0}  # ...no cursor
        (row,) = [r for r in conversations(alice)["conversations"] if r["user"]["username"] == "bob"]
        assert row["read_up_to"] == {"alice": 0, "bob": 0}
        assert history(bob, "alice")["read_up_to"]["bob"] == to_bob["id"]
        with alice.ws(since=0) as again:
            next_frame(again, "hello")
            assert [f["type"] for f in not_presence(quiet(again))] == ["message", "message"]

        # The well-behaved: carol's read reaches alice.
        c.send_json({"type": "read", "with": "alice", "up_to": to_carol["id"]})
        assert next_frame(a, "read") == {"type": "read", "seq": 3, "reader": "carol", "with": "alice",
                                         "up_to": to_carol["id"]}


def test_a_blocked_pair_sees_each_other_offline_with_no_last_seen_in_conversations_and_directory(chat):
    client, alice, bob, carol, dave = chat
    with alice.ws() as a, bob.ws() as b, carol.ws() as c:
        settle(a, b, c)
        sent(a, "bob", "hi bob")
        sent(a, "carol", "hi carol")
        settle(a, b, c)

        def found(viewer, name: str) -> tuple[str, bool]:
            (user,) = directory(viewer, q=name)["users"]
            return user["status"], user["last_seen"] is None

        def seen(viewer, name: str) -> tuple[tuple, tuple]:
            row = {r["user"]["username"]: r for r in conversations(viewer)["conversations"]}[name]
            return (row["status"], row["last_seen"] is None), found(viewer, name)

        assert seen(alice, "bob") == (("online", False), ("online", False))  # the control
        assert seen(bob, "alice") == (("online", False), ("online", False))
        assert put(alice, "/api/blocks/bob").status_code == 204
        assert seen(alice, "bob") == (("offline", True), (None, True))  # v3: the directory says null
        assert seen(bob, "alice") == (("offline", True), (None, True))
        assert seen(alice, "carol") == (("online", False), ("online", False))  # others are untouched
        assert found(carol, "bob") == (None, True)  # v3: not her partner, block or none

        # and neither one's hello lists the other
        with alice.ws() as a2, bob.ws() as b2:
            assert [p["username"] for p in next_frame(a2, "hello")["presence"]] == ["carol"]
            assert [p["username"] for p in next_frame(b2, "hello")["presence"]] == []
        assert delete(alice, "/api/blocks/bob").status_code == 204
        assert seen(bob, "alice") == (("online", False), ("online", False))


# ---- 5. edit and delete ---------------------------------------------------------------


def test_an_edit_changes_the_body_sets_edited_at_and_reaches_every_socket_of_both(chat):
    client, alice, bob, carol, dave = chat
    with alice.ws() as a1, alice.ws() as a2, bob.ws() as b, carol.ws() as c:
        settle(a1, a2, b, c)
        send(a1, "bob", "orignal text")
        ack, copy = ack_and_copy(a1)
        original = ack["message"]
        seqs = {"a1": copy["seq"]}
        for name, ws in (("a2", a2), ("b", b)):
            frame = next_frame(ws, "message")
            assert frame["message"] == original
            seqs[name] = frame["seq"]
        assert original["edited_at"] is None and original["deleted"] is False
        settle(a1, a2, b, c)

        a1.send_json({"type": "edit", "id": original["id"], "body": "original text"})
        frames = {name: next_frame(ws, "edit") for name, ws in (("a1", a1), ("a2", a2), ("b", b))}
        edited = frames["b"]["message"]
        assert edited == {**original, "body": "original text", "edited_at": edited["edited_at"]}
        assert edited["edited_at"].endswith("Z") and edited["edited_at"] >= original["sent_at"]
        for name, frame in frames.items():
            assert frame == {"type": "edit", "seq": seqs[name] + 1, "message": edited}
        for ws in (a1, a2, b):
            assert not_presence(quiet(ws)) == []
        assert not_presence(quiet(c)) == []  # carol hears nothing
        assert history(bob, "alice")["messages"] == [edited]
        assert conversations(bob)["conversations"][0]["last_message"] == edited

        # a second edit
        a2.send_json({"type": "edit", "id": original["id"], "body": "third version"})
        assert next_frame(b, "edit")["message"]["body"] == "third version"
        assert next_frame(a1, "edit")["seq"] == seqs["a1"] + 2


@pytest.mark.validation
@pytest.mark.parametrize("frame, code", [
    ({"body": ""}, "empty_body"),
    ({"body": "  \n\t "}, "empty_body"),
    ({"body": "\u200b\u2060\ufeff"}, "empty_body"),  # invisible characters only
    ({"body": "x" * 4001}, "body_too_long"),
    ({"body": 5}, "invalid_field"),
    ({"body": None}, "invalid_field"),
    ({"id": "1"}, "invalid_field"),
    ({"id": None}, "invalid_field"),
    ({"id": 1.5}, "invalid_field"),
    ({"id": True}, "invalid_field"),
])
def test_an_edit_breaking_the_body_rules_is_refused_and_changes_nothing(chat, frame, code):
    client, alice, bob, carol, dave = chat
    with alice.ws() as a, bob.ws() as b:
        settle(a, b)
        message = sent(a, "bob", "keep me")
        next_frame(b, "message")
        a.send_json({"type": "edit", "id": message["id"], "body": "fine", "client_id": "e-1", **frame})
        error = next_frame(a, "error")
        assert error["code"] == code and error["client_id"] == "e-1"
        assert not_presence(quiet(b)) == []
        assert not_presence(quiet(a)) == []
    assert history(alice, "bob")["messages"] == [message]


def test_an_edit_of_exactly_4000_characters_is_accepted(chat):
    client, alice, bob, carol, dave = chat
    with alice.ws() as a:
        next_frame(a, "hello")
        message = sent(a, "bob", "short")
        a.send_json({"type": "edit", "id": message["id"], "body": "y" * 4000})
        assert next_frame(a, "edit")["message"]["body"] == "y" * 4000


@pytest.mark.validation
def test_editing_someone_elses_or_an_unknown_message_is_unknown_message(chat):
    client, alice, bob, carol, dave = chat
    with alice.ws() as a, bob.ws() as b, carol.ws() as c:
        settle(a, b, c)
        mine = sent(a, "bob", "alice's words")
        next_frame(b, "message")
        for ws, target in ((b, mine["id"]), (c, mine["id"]), (a, mine["id"] + 1000)):
            ws.send_json({"type": "edit", "id": target, "body": "hijacked", "client_id": "x"})
            error = next_frame(ws, "error")
            assert error["code"] == "unknown_message" and error["client_id"] == "x"
            ws.send_json({"type": "delete", "id": target})
            assert next_frame(ws, "error")["code"] == "unknown_message"
        for ws in (a, b, c):
            assert not_presence(quiet(ws)) == []
    assert history(bob, "alice")["messages"] == [mine]


def test_a_delete_erases_the_text_reaches_both_and_cannot_be_repeated_or_edited(chat):
    client, alice, bob, carol, dave = chat
    with alice.ws() as a1, alice.ws() as a2, bob.ws() as b:
        settle(a1, a2, b)
        first = sent(a1, "bob", "keep this one")
        doomed = sent(a1, "bob", "regret this")
        assert received(a2, 2) == received(b, 2) == [first, doomed]
        settle(a1, a2, b)
        a1.send_json({"type": "delete", "id": doomed["id"]})
        frames = {name: next_frame(ws, "delete") for name, ws in (("a1", a1), ("a2", a2), ("b", b))}
        gone = frames["b"]["message"]
        assert gone == {**doomed, "body": "", "deleted": True}
        # each stream so far: first (1), doomed (2), the delete (3)
        assert frames == {name: {"type": "delete", "seq": 3, "message": gone} for name in ("a1", "a2", "b")}

        a1.send_json({"type": "delete", "id": doomed["id"], "client_id": "again"})
        error = next_frame(a1, "error")
        assert error["code"] == "unknown_message" and error["client_id"] == "again"
        a2.send_json({"type": "edit", "id": doomed["id"], "body": "resurrected"})
        assert next_frame(a2, "error")["code"] == "unknown_message"
        for ws in (a1, a2, b):
            assert not_presence(quiet(ws)) == []

        assert history(bob, "alice")["messages"] == [first, gone]
        assert history(alice, "bob")["messages"] == [first, gone]
        assert conversations(bob)["conversations"][0]["last_message"] == gone
        assert conversations(alice)["conversations"][0]["last_message"] == gone

    # A replay shows each message as it is now, and the delete as an event of the stream.
    with bob.client.websocket_connect("/ws?since=0", headers=bob.headers) as replay:
        hello = next_frame(replay, "hello")
        frames = not_presence(quiet(replay))
    assert [f["seq"] for f in frames] == list(range(1, hello["seq"] + 1))
    assert [(f["type"], f["message"]["id"]) for f in frames] == [
        ("message", first["id"]), ("message", doomed["id"]), ("delete", doomed["id"])]
    assert frames[1]["message"] == gone and frames[2]["message"] == gone


def test_an_edited_message_replays_with_its_current_body(chat):
    client, alice, bob, carol, dave = chat
    with alice.ws() as a:
        next_frame(a, "hello")
        message = sent(a, "bob", "draft")
        a.send_json({"type": "edit", "id": message["id"], "body": "final"})
        edited = next_frame(a, "edit")["message"]
    with bob.client.websocket_connect("/ws?since=0", headers=bob.headers) as replay:
        next_frame(replay, "hello")
        frames = not_presence(quiet(replay))
    assert [(f["type"], f["seq"], f["message"]) for f in frames] == [("message", 1, edited), ("edit", 2, edited)]


def file_bytes(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


def test_a_deleted_messages_text_is_gone_from_the_sqlite_file_and_its_log(make_client, sqlite_url):
    client = make_client()
    path = Path(sqlite_url.removeprefix("sqlite:///"))
    wal = Path(f"{path}-wal")
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    secret = "SECRET-" + uuid.uuid4().hex
    first_draft, second_draft = "DRAFT-" + uuid.uuid4().hex, "EDITED-" + uuid.uuid4().hex
    kept = "KEPT-" + uuid.uuid4().hex
    with alice.ws() as a, bob.ws() as b:
        settle(a, b)
        doomed = sent(a, "bob", secret)
        sent(a, "bob", kept)
        edited_then_deleted = sent(a, "bob", first_draft)
        assert [m["body"] for m in received(b, 3)] == [secret, kept, first_draft]
        a.send_json({"type": "edit", "id": edited_then_deleted["id"], "body": second_draft})
        next_frame(a, "edit")
        next_frame(b, "edit")
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        stored = file_bytes(path) + file_bytes(wal)
        assert secret.encode() in stored and kept.encode() in stored  # the search can find text at all
        for target in (doomed, edited_then_deleted):
            a.send_json({"type": "delete", "id": target["id"]})
            next_frame(a, "delete")
            next_frame(b, "delete")
        settle(a, b)

        # The deletes are acknowledged to everyone: within a few seconds, and without anyone's
        # checkpoint but the server's own, the text must not be left anywhere on disk.
        texts = {"secret": secret.encode(), "first draft": first_draft.encode(), "second draft": second_draft.encode()}

        def left_on_disk() -> dict[str, list[str]]:
            files = (("db", file_bytes(path)), ("wal", file_bytes(wal)))
            return {name: [where for where, data in files if text in data] for name, text in texts.items()}

        with contextlib.suppress(AssertionError):
            wait_until(lambda: left_on_disk() == {name: [] for name in texts}, timeout=5, what="erasure")
        left_before = left_on_disk()

        def truncated() -> bool:  # not while the server's own heartbeat or checkpoint holds the file
            with contextlib.closing(sqlite3.connect(path)) as conn:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            return busy == 0

        wait_until(truncated, timeout=5, what="a TRUNCATE checkpoint")
        left_after = {name: [where for where, data in (("db", file_bytes(path)), ("wal", file_bytes(wal)))
                             if text in data] for name, text in texts.items()}
        assert kept.encode() in file_bytes(path)
    assert left_after == {name: [] for name in texts}, f"after a TRUNCATE checkpoint: {left_after}"
    assert left_before == {name: [] for name in texts}, f"5 s after the delete, before a checkpoint: {left_before}"


def test_a_deleted_messages_text_is_gone_from_the_postgresql_table_file():
    with fresh_postgres_database() as url:
        secret = "SECRET-" + uuid.uuid4().hex
        kept = "KEPT-" + uuid.uuid4().hex
        with TestClient(chatx.create_app(database_url=url)) as client:
            alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
            with alice.ws() as a:
                next_frame(a, "hello")
                doomed = sent(a, "bob", secret)
                sent(a, "bob", kept)
                a.send_json({"type": "delete", "id": doomed["id"]})
                next_frame(a, "delete")
                assert history(bob, "alice")["messages"][0]["body"] == ""

                async def table_files() -> bytes:
                    """The table's (and its TOAST table's) files as on disk."""
                    connection = await asyncpg.connect(url)
                    try:
                        await connection.execute("CHECKPOINT")
                        toast = await connection.fetchval(
                            "SELECT reltoastrelid::regclass::text FROM pg_class WHERE relname = 'chatx_messages'")
                        data = b""
                        for relation in ("chatx_messages", toast):
                            path = await connection.fetchval("SELECT pg_relation_filepath($1::regclass)", relation)
                            data += await connection.fetchval("SELECT pg_read_binary_file($1)", path)
                        return data
                    finally:
                        await connection.close()

                assert kept.encode() in run_async(table_files)  # the check can see stored text
                with contextlib.suppress(AssertionError):  # the server may erase it in the background
                    wait_until(lambda: secret.encode() not in run_async(table_files), timeout=5, interval=0.5,
                               what="erasure")
                data = run_async(table_files)
        assert secret.encode() not in data, "5 s after the delete, the text is still in chatx_messages' table file"


# ---- 6. reply_to --------------------------------------------------------------------------


def test_a_reply_to_an_earlier_message_of_the_conversation_is_stored_and_carried_everywhere(chat):
    client, alice, bob, carol, dave = chat
    with alice.ws() as a, bob.ws() as b:
        settle(a, b)
        question = sent(a, "bob", "lunch?")
        assert question["reply_to"] is None
        next_frame(b, "message")
        send(b, "alice", "yes", client_id="r-1", reply_to=question["id"])
        ack, _ = ack_and_copy(b)
        answer = ack["message"]
        assert ack["client_id"] == "r-1" and answer["reply_to"] == question["id"]
        assert next_frame(a, "message")["message"] == answer
        own = sent(a, "bob", "my own thread", reply_to=question["id"])  # replying to my own message
        assert own["reply_to"] == question["id"]
        next_frame(b, "message")
        # a retry of the same client_id gets the original, reply_to included
        send(b, "alice", "yes", client_id="r-1", reply_to=question["id"])
        assert next_frame(b, "ack")["message"] == answer
        assert not_presence(quiet(b)) == []
    assert history(alice, "bob")["messages"] == [question, answer, own]
    assert conversations(bob)["conversations"][0]["last_message"] == own
    with alice.client.websocket_connect("/ws?since=0", headers=alice.headers) as replay:
        next_frame(replay, "hello")
        frames = not_presence(quiet(replay))
    assert [f["message"] for f in frames] == [question, answer, own]


def test_a_reply_to_a_message_of_another_conversation_or_no_message_is_invalid_field_and_stores_nothing(chat):
    client, alice, bob, carol, dave = chat
    with alice.ws() as a, bob.ws() as b, carol.ws() as c:
        settle(a, b, c)
        with_bob = sent(a, "bob", "for bob")
        next_frame(b, "message")
        with_carol = sent(c, "alice", "for alice from carol")
        next_frame(a, "message")
        between_others = sent(c, "dave", "carol to dave")
        settle(a, b, c)
        for n, target in enumerate((with_carol["id"], between_others["id"], with_carol["id"] + 1000, 0, -3, "7",
                                    with_bob["id"] + 0.5)):
            send(a, "bob", "a reply", client_id=f"bad-{n}", reply_to=target)
            error = next_frame(a, "error")
            assert error["code"] == "invalid_field" and error["client_id"] == f"bad-{n}", (target, error)
        assert not_presence(quiet(a)) == []
        assert not_presence(quiet(b)) == []
        # carol replying in her own conversation with dave to alice's message is refused too
        send(c, "dave", "sneaky", client_id="c-bad", reply_to=with_bob["id"])
        assert next_frame(c, "error")["code"] == "invalid_field"
    assert history(alice, "bob")["messages"] == [with_bob]
    assert [m["id"] for m in history(carol, "dave")["messages"]] == [between_others["id"]]
    # a refused client_id is free for a real message afterwards
    with alice.ws() as a:
        next_frame(a, "hello")
        ok = sent(a, "bob", "a reply", client_id="bad-0", reply_to=with_bob["id"])
        assert ok["reply_to"] == with_bob["id"]


# ---- 7. upgrading a version 1 database in place -----------------------------------------------

V1 = sa.MetaData()
sa.Table(
    "chatx_users", V1,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("username", sa.String(32), nullable=False),
    sa.Column("username_key", sa.String(32), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(256), nullable=False),
    sa.Column("status", sa.String(8), nullable=False, server_default="offline"),
    sa.Column("last_seen", sa.BigInteger, nullable=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)
sa.Table(
    "chatx_sessions", V1,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("chatx_users.id"), nullable=False, index=True),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
)
sa.Table(
    "chatx_messages", V1,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("sender_id", sa.Integer, nullable=False),
    sa.Column("recipient_id", sa.Integer, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("sent_at", sa.BigInteger, nullable=False),
    sa.Column("client_id", sa.String(128), nullable=True),
    sa.UniqueConstraint("sender_id", "client_id", name="chatx_messages_client_id"),
    sa.ForeignKeyConstraint(["sender_id"], ["chatx_users.id"]).ddl_if(dialect="sqlite"),
    sa.ForeignKeyConstraint(["recipient_id"], ["chatx_users.id"]).ddl_if(dialect="sqlite"),
    sa.Index("chatx_messages_recipient", "recipient_id", "sender_id", "id"),
)
sa.Table(
    "chatx_read_cursors", V1,
    sa.Column("user_id", sa.Integer, sa.ForeignKey("chatx_users.id"), primary_key=True),
    sa.Column("peer_id", sa.Integer, sa.ForeignKey("chatx_users.id"), primary_key=True),
    sa.Column("up_to", sa.Integer, nullable=False),
)
sa.Table("chatx_processes", V1, sa.Column("id", sa.String(32), primary_key=True),
         sa.Column("heartbeat_at", sa.BigInteger, nullable=False))
sa.Table("chatx_sockets", V1, sa.Column("id", sa.String(32), primary_key=True),
         sa.Column("process_id", sa.String(32), nullable=False, index=True),
         sa.Column("user_id", sa.Integer, nullable=False, index=True))
sa.Table("chatx_settings", V1, sa.Column("name", sa.String(64), primary_key=True),
         sa.Column("value", sa.Text, nullable=False))


def v1_schema(dialect: Any) -> list[str]:
    """The DDL version 1 of chatx.py ran (its tables as `git show HEAD:chatx.py` has them), as raw SQL."""
    statements = []
    for table in V1.sorted_tables:
        statements.append(str(CreateTable(table).compile(dialect=dialect)))
        statements += [str(CreateIndex(index).compile(dialect=dialect)) for index in table.indexes]
    return statements


# (sender, recipient, body, client_id) in the order sent
V1_MESSAGES = [
    ("alice", "bob", "a1", "c-a1"),
    ("bob", "alice", "b1", None),
    ("bob", "alice", "b2", "c-b2"),
    ("alice", "carol", "c1", None),
    ("alice", "alice", "note to self", "c-self"),
    ("bob", "alice", "b3", None),
    ("carol", "bob", "x1", None),
    ("bob", "alice", "b4", "c-b4"),
]


class Raw:
    """Raw SQL on a database of either kind, outside ChatX (`?` marks)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.postgres = url.startswith("postgresql")

    def run(self, statements: list[tuple[str, tuple]]) -> list[list[tuple]]:
        if self.postgres:
            async def go() -> list[list[tuple]]:
                connection = await asyncpg.connect(self.url)
                try:
                    results = []
                    async with connection.transaction():
                        for sql, args in statements:
                            results.append([tuple(row) for row in await connection.fetch(chatx.postgres_marks(sql),
                                                                                         *args)])
                    return results
                finally:
                    await connection.close()

            return run_async(go)
        with contextlib.closing(sqlite3.connect(self.url.removeprefix("sqlite:///"))) as connection:
            results = [connection.execute(sql, args).fetchall() for sql, args in statements]
            connection.commit()
            return results

    def query(self, sql: str, *args: Any) -> list[tuple]:
        return self.run([(sql, args)])[0]


def build_v1_database(raw: Raw) -> dict[str, Any]:
    """A version 1 database with three users, messages both ways (and to oneself), and read cursors.
    Returns what it holds: ids by username, and the messages as rows."""
    dialect = pg_dialect.dialect() if raw.postgres else sqlite_dialect.dialect()
    statements = [(sql, ()) for sql in v1_schema(dialect)]
    if raw.postgres:
        statements.append((chatx.INSERT_MESSAGES_POSTGRES, ()))  # v1 made the same function
    raw.run(statements)
    base = 1_700_000_000_000
    raw.run([("INSERT INTO chatx_users (username, username_key, password_hash, status, last_seen, created_at) "
              "VALUES (?, ?, ?, 'offline', ?, ?)", (name, name, PASSWORD_HASH, base + 5_000, base))
             for name in ("alice", "bob", "carol")]
            + [("INSERT INTO chatx_settings (name, value) VALUES ('secret_key', ?)", ("v1-secret-" + "k" * 20,))])
    ids = dict((name, user_id) for user_id, name in raw.query("SELECT id, username FROM chatx_users"))
    raw.run([("INSERT INTO chatx_messages (sender_id, recipient_id, body, sent_at, client_id) VALUES (?, ?, ?, ?, ?)",
              (ids[s], ids[r], body, base + 1000 * n + 123, client_id))
             for n, (s, r, body, client_id) in enumerate(V1_MESSAGES)])
    rows = raw.query("SELECT id, sender_id, recipient_id, body, sent_at, client_id FROM chatx_messages ORDER BY id")
    by_body = {row[3]: row for row in rows}
    # alice read bob's messages up to b1; bob read alice's up to a1; carol never read.
    raw.run([("INSERT INTO chatx_read_cursors (user_id, peer_id, up_to) VALUES (?, ?, ?)",
              (ids["alice"], ids["bob"], by_body["b1"][0])),
             ("INSERT INTO chatx_read_cursors (user_id, peer_id, up_to) VALUES (?, ?, ?)",
              (ids["bob"], ids["alice"], by_body["a1"][0]))])
    return {"ids": ids, "rows": rows, "by_body": by_body}


def v1_message(row: tuple, names: dict[int, str]) -> dict[str, Any]:
    message_id, sender, recipient, body, sent_at, client_id = row
    return {"id": message_id, "from": names[sender], "to": names[recipient], "body": body,
            "sent_at": chatx.iso(sent_at), "client_id": client_id, "edited_at": None, "deleted": False,
            "reply_to": None, "attachment": None}


def stored_state(raw: Raw) -> dict[str, list[tuple]]:
    """What a second start must leave as it is."""
    return {
        "users": raw.query("SELECT id, username, username_key, password_hash, seq, created_at FROM chatx_users "
                           "ORDER BY id"),
        "messages": raw.query("SELECT id, sender_id, recipient_id, body, sent_at, client_id, edited_at, deleted, "
                              "reply_to FROM chatx_messages ORDER BY id"),
        "events": raw.query("SELECT user_id, seq, kind, message_id, reader_id, with_id, up_to FROM chatx_events "
                            "ORDER BY user_id, seq"),
        "conversations": raw.query("SELECT user_id, peer_id, last_message_id, unread, read_up_to "
                                   "FROM chatx_conversations ORDER BY user_id, peer_id"),
        "settings": raw.query("SELECT name, value FROM chatx_settings ORDER BY name"),
    }


def check_upgrade(url: str) -> None:
    raw = Raw(url)
    v1 = build_v1_database(raw)
    ids, rows, by_body = v1["ids"], v1["rows"], v1["by_body"]
    names = {user_id: name for name, user_id in ids.items()}
    messages = [v1_message(row, names) for row in rows]
    by_text = {m["body"]: m for m in messages}

    def between(x: str, y: str) -> list[dict[str, Any]]:
        return [m for m in messages if {m["from"], m["to"]} == {x, y}]

    with TestClient(chatx.create_app(database_url=url, presence_grace=0)) as client:
        alice, bob, carol = sign_in(client, "alice"), sign_in(client, "bob"), sign_in(client, "carol")
        assert (alice.id, bob.id, carol.id) == (ids["alice"], ids["bob"], ids["carol"])

        # history: every page as it was
        for person, peer in ((alice, "bob"), (bob, "alice"), (alice, "carol"), (carol, "alice"), (bob, "carol"),
                             (alice, "alice")):
            expected = between(person.username, peer)
            page = history(person, peer)
            assert page["messages"] == expected, (person.username, peer)
            assert page["has_more"] is False
        older = history(alice, "bob", limit=2)
        assert older["messages"] == between("alice", "bob")[-2:] and older["has_more"] is True
        assert history(alice, "bob", before=older["messages"][0]["id"])["messages"] == between("alice", "bob")[:-2]
        assert history(alice, "bob")["read_up_to"] == {"alice": by_body["b1"][0], "bob": by_body["a1"][0]}

        # conversations: unread from the v1 read cursors, and both cursors
        listed = {r["user"]["username"]: r for r in conversations(alice)["conversations"]}
        assert [r["user"]["username"] for r in conversations(alice)["conversations"]] == ["bob", "alice", "carol"]
        assert listed["bob"]["unread"] == 3  # b2, b3, b4 are above alice's cursor at b1
        assert listed["bob"]["read_up_to"] == {"alice": by_body["b1"][0], "bob": by_body["a1"][0]}
        assert listed["bob"]["last_message"] == by_text["b4"]
        assert listed["carol"]["unread"] == 0 and listed["carol"]["read_up_to"] == {"alice": 0, "carol": 0}
        assert listed["carol"]["last_message"] == by_text["c1"]
        assert listed["alice"]["last_message"] == by_text["note to self"]
        bob_list = {r["user"]["username"]: r for r in conversations(bob)["conversations"]}
        assert [r["user"]["username"] for r in conversations(bob)["conversations"]] == ["alice", "carol"]
        assert bob_list["alice"]["unread"] == 0 and bob_list["carol"]["unread"] == 1
        assert bob_list["alice"]["read_up_to"] == {"bob": by_body["a1"][0], "alice": by_body["b1"][0]}
        carol_list = {r["user"]["username"]: r for r in conversations(carol)["conversations"]}
        assert carol_list["alice"]["unread"] == 1 and carol_list["bob"]["unread"] == 0

        # streams: every stored message numbered 1..n in id order, per user
        for person in (alice, bob, carol):
            mine = [m for m in messages if person.username in (m["from"], m["to"])]
            with person.client.websocket_connect("/ws?since=0", headers=person.headers) as ws:
                hello = next_frame(ws, "hello")
                frames = not_presence(quiet(ws))
            assert hello["seq"] == len(mine), person.username
            assert frames == [{"type": "message", "seq": n, "message": m} for n, m in enumerate(mine, 1)]

        # new messages continue both numberings
        with alice.ws() as a, bob.ws() as b:
            settle(a, b)
            send(a, "bob", "after the upgrade", client_id="new-1")
            (ack, frame_a), frame_b = ack_and_copy(a), next_frame(b, "message")
            new = ack["message"]
            assert new["id"] > rows[-1][0]
            counts = {name: sum(1 for m in messages if name in (m["from"], m["to"])) for name in ("alice", "bob")}
            assert counts == {"alice": 7, "bob": 6}
            assert frame_a == {"type": "message", "seq": counts["alice"] + 1, "message": new}
            assert frame_b == {"type": "message", "seq": counts["bob"] + 1, "message": new}
            send(a, "bob", "a1", client_id="c-a1")  # a v1 client_id still counts: the original comes back
            assert next_frame(a, "ack")["message"] == by_text["a1"]
            b.send_json({"type": "read", "with": "alice", "up_to": new["id"]})
            assert next_frame(b, "read") == {"type": "read", "seq": counts["bob"] + 2, "reader": "bob", "with": "alice",
                                             "up_to": new["id"]}
            settle(a, b)
        assert conversations(bob)["conversations"][0]["unread"] == 0

    assert raw.query("SELECT value FROM chatx_settings WHERE name = 'schema_version'") == [(str(chatx.SCHEMA_VERSION),)]
    assert raw.query("SELECT value FROM chatx_settings WHERE name = 'secret_key'") == [("v1-secret-" + "k" * 20,)]
    first = stored_state(raw)
    with TestClient(chatx.create_app(database_url=url)) as client:
        pass
    assert stored_state(raw) == first  # starting again is a no-op
    with TestClient(chatx.create_app(database_url=url)) as client:
        alice = sign_in(client, "alice")
        assert history(alice, "bob")["messages"][:-1] == between("alice", "bob")
        assert [r["user"]["username"] for r in conversations(alice)["conversations"]] == ["bob", "alice", "carol"]


def test_sqlite_never_gives_a_deleted_account_s_user_or_message_ids_again(make_client):
    client = make_client()
    alice, bob, carol = (sign_up(client, name) for name in ("alice", "bob", "carol"))
    with alice.ws() as a, bob.ws() as b:
        settle(a, b)
        first = sent(a, "bob", "first")
        next_frame(b, "message")
        newest = make_partners(carol, alice, "carol's newest")  # the newest ids are carol's
        bob_seen = first["id"]
        assert delete_me(carol, PASSWORD).status_code == 204
        dave = sign_up(client, "dave")
        assert dave.id > carol.id
        later = sent(a, "bob", "after carol left")
        assert later["id"] > newest["id"]
        # bob, resuming after the newest id he could know of, misses nothing
        assert [m["body"] for m in history(bob, "alice", after=bob_seen)["messages"]] == ["after carol left"]
        assert next_frame(b, "message")["message"] == later


def downgrade_to_version_2(path: Path) -> None:
    """Make a database file as version 2 left it: user and message ids without
    AUTOINCREMENT (and no high-water mark), no attachment column, the old skeletons."""
    raw = sqlite3.connect(path)
    try:
        for table in ("chatx_users", "chatx_messages"):
            made = raw.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()[0]
            indexes = [row[0] for row in raw.execute(
                "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL", (table,))]
            raw.execute(f"CREATE TABLE old AS SELECT * FROM {table}")
            raw.execute(f"DROP TABLE {table}")
            raw.execute(made.replace(" AUTOINCREMENT", ""))
            raw.execute(f"INSERT INTO {table} SELECT * FROM old")
            raw.execute("DROP TABLE old")
            for index in indexes:
                raw.execute(index)
        raw.execute("ALTER TABLE chatx_messages DROP COLUMN attachment_id")  # version 3's, too
        raw.execute("DELETE FROM sqlite_sequence")
        for username, old_skeleton in (("bobby_", "bobby_"), ("vvendy", "vvendy")):
            raw.execute("UPDATE chatx_users SET skeleton = ? WHERE username = ?", (old_skeleton, username))
        raw.execute("UPDATE chatx_settings SET value = '2' WHERE name = 'schema_version'")
        raw.commit()
    finally:
        raw.close()


def test_a_version_2_sqlite_database_gets_ids_never_given_again_and_the_new_look_alikes(tmp_path):
    path = tmp_path / "v2.db"
    url = f"sqlite:///{path}"
    with TestClient(chatx.create_app(database_url=url, signups_per_address=0)) as client:
        alice, bobby, carol = (sign_up(client, name) for name in ("alice", "bobby_", "carol"))
        sign_up(client, "vvendy")
        first = make_partners(alice, bobby, "one")
        make_partners(carol, alice, "two")
        newest = make_partners(carol, alice, "three")
    downgrade_to_version_2(path)
    raw = sqlite3.connect(path)
    assert "AUTOINCREMENT" not in raw.execute("SELECT sql FROM sqlite_master WHERE name = 'chatx_users'").fetchone()[0]

    with TestClient(chatx.create_app(database_url=url, signups_per_address=0)) as client:
        for table in ("chatx_users", "chatx_messages"):
            made = raw.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
            assert "AUTOINCREMENT" in made, made
        assert raw.execute("SELECT value FROM chatx_settings WHERE name = 'schema_version'").fetchone() == ("3",)
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
        alice, bobby, carol = (Person(client, p.username, p.cookie, p.id) for p in (alice, bobby, carol))
        # everything kept: sessions, messages, indexes
        assert alice.get("/api/me").json()["user"] == {"id": alice.id, "username": "alice"}
        assert [m["body"] for m in history(alice, "bobby_")["messages"]] == ["one"]
        assert [m["body"] for m in history(alice, "carol")["messages"]] == ["two", "three"]
        # skeletons recomputed: the new look-alikes of existing names are taken
        for look_alike in ("bobby", "wendy"):
            client.cookies.clear()
            taken = client.post("/api/register", json={"username": look_alike, "password": PASSWORD})
            assert taken.status_code == 409 and error_code(taken) == "username_taken", look_alike
        # carol, who has the newest ids, goes; her ids are not given again
        assert delete_me(carol, PASSWORD).status_code == 204
        assert sign_up(client, "dave").id > carol.id
        with alice.ws() as a:
            next_frame(a, "hello")
            later = sent(a, "bobby_", "after the upgrade")
        assert later["id"] > newest["id"]
        assert [m["body"] for m in history(bobby, "alice", after=first["id"])["messages"]] == ["after the upgrade"]
    raw.close()


def test_a_version_1_sqlite_database_is_upgraded_in_place_losing_nothing(tmp_path):
    check_upgrade(f"sqlite:///{tmp_path / 'v1.db'}")


def test_a_version_1_postgresql_database_is_upgraded_in_place_losing_nothing():
    with fresh_postgres_database() as url:
        check_upgrade(url)
