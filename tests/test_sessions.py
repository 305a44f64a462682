"""Issue 16, sessions and account control (docs/protocol.md, Accounts): password change,
sign out everywhere, account deletion that leaves no trace, the idle timeout,
rotation on sign-in, hostile cookies, and the command line."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

import chatx
from conftest import (acked, delete_me, error_code, PASSWORD, ROOT, Person, login, make_partners, next_frame, quiet,
                      run_async, sign_in, sign_up, silent, wait_until)



NEW_PASSWORD = "a brand new passphrase"




def another_session(person: Person) -> Person:
    """The same user signed in from another browser."""
    return sign_in(person.client, person.username)


def close_code(ws) -> int:
    """Read until the server closes the socket; its close code."""
    with pytest.raises(WebSocketDisconnect) as closed:
        for _ in range(1000):
            ws.receive_json()
    return closed.value.code


def alive(ws) -> None:
    """The socket answers, and nothing but presence came meanwhile."""
    assert silent(ws) == []




def refused(person: Person) -> None:
    """A socket with this person's cookie is refused at the handshake."""
    with pytest.raises((WebSocketDisconnect, WebSocketDenialResponse)):
        with person.ws() as ws:
            ws.receive_json()


# ---- password change and sign out everywhere ------------------------------------------------------


def test_a_password_change_ends_my_other_sessions_with_4401_and_keeps_this_one(database_url, make_client):
    client = make_client(database_url=database_url)
    here, bob = sign_up(client, "alice"), sign_up(client, "bob")
    elsewhere = another_session(here)
    # Bad requests change nothing.
    assert client.post("/api/password", json={"password": PASSWORD, "new_password": NEW_PASSWORD}).status_code == 401
    wrong = here.post("/api/password", json={"password": "not my password", "new_password": NEW_PASSWORD})
    assert wrong.status_code == 401 and error_code(wrong) == "bad_credentials"
    weak = here.post("/api/password", json={"password": PASSWORD, "new_password": "short"})
    assert weak.status_code == 400 and error_code(weak) == "weak_password"
    missing = here.post("/api/password", json={"password": PASSWORD})
    assert missing.status_code == 400 and error_code(missing) == "bad_request"
    assert elsewhere.get("/api/me").status_code == 200

    with here.ws() as ws, elsewhere.ws() as other_ws, bob.ws() as bob_ws:
        for socket in (ws, other_ws, bob_ws):
            next_frame(socket, "hello")
        changed = here.post("/api/password", json={"password": PASSWORD, "new_password": NEW_PASSWORD})
        assert changed.status_code == 204
        assert close_code(other_ws) == chatx.CLOSE_REVOKED
        # This session and its socket live on; bob noticed nothing.
        alive(ws)
        assert acked(ws, "bob", "still signed in", "p-1")["body"] == "still signed in"
        assert next_frame(bob_ws, "message")["message"]["body"] == "still signed in"
        alive(bob_ws)
    assert here.get("/api/me").status_code == 200
    assert elsewhere.get("/api/me").status_code == 401
    refused(elsewhere)
    assert login(client, "alice").status_code == 401
    assert login(client, "alice", NEW_PASSWORD).status_code == 200
    assert bob.get("/api/me").status_code == 200
    assert client.get("/healthz").status_code == 200


def test_sign_out_everywhere_ends_every_session_of_mine_and_nobody_elses(database_url, make_client):
    client = make_client(database_url=database_url)
    here, bob = sign_up(client, "alice"), sign_up(client, "bob")
    elsewhere = another_session(here)
    with here.ws() as ws, elsewhere.ws() as other_ws, bob.ws() as bob_ws:
        for socket in (ws, other_ws, bob_ws):
            next_frame(socket, "hello")
        response = here.post("/api/logout", params={"everywhere": "true"})
        assert response.status_code == 204
        assert close_code(ws) == chatx.CLOSE_REVOKED
        assert close_code(other_ws) == chatx.CLOSE_REVOKED
        alive(bob_ws)
        assert acked(bob_ws, "bob", "note to self", "n-1")["body"] == "note to self"
    assert here.get("/api/me").status_code == 401 and elsewhere.get("/api/me").status_code == 401
    refused(here)
    assert bob.get("/api/me").status_code == 200
    assert login(client, "alice").status_code == 200  # the password still works
    assert client.post("/api/logout", params={"everywhere": "true"}).status_code == 204  # also without a session


# ---- account deletion ------------------------------------------------------------------------------------

SECRET = "zebra-7f3a-never-again"


def database_rows(database_url: str, sql: str) -> list[tuple]:
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as db:
            return db.execute(sql).fetchall()

    async def fetch() -> list[tuple]:
        connection = await asyncpg.connect(database_url)
        try:
            return [tuple(row) for row in await connection.fetch(sql)]
        finally:
            await connection.close()

    return run_async(fetch)


def sqlite_files_hold(path: Path, text: str) -> bool:
    """After a TRUNCATE checkpoint (the log copied in and emptied): is `text` anywhere in the files?"""
    def checkpointed() -> bool:
        # Busy while the server's own checkpointer or a reader is at it: again, then.
        with sqlite3.connect(path, timeout=10) as db:
            return db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0

    wait_until(checkpointed, timeout=15, interval=0.1, what="a TRUNCATE checkpoint")
    files = [p for p in (path, Path(f"{path}-wal")) if p.exists()]
    return any(text.encode() in p.read_bytes() for p in files)


def test_deleting_my_account_erases_me_and_my_messages_and_frees_my_username(database_url, make_client):
    client = make_client(database_url=database_url, presence_grace=0)
    alice, bob, carol = sign_up(client, "alice"), sign_up(client, "bob"), sign_up(client, "carol")
    elsewhere = another_session(alice)
    assert carol.put("/api/blocks/alice").status_code == 204
    with alice.ws() as ws, bob.ws() as bob_ws, carol.ws() as carol_ws:
        for socket in (ws, bob_ws, carol_ws):
            next_frame(socket, "hello")
        first = acked(ws, "bob", f"{SECRET} one", "d-1")
        reply = acked(bob_ws, "alice", f"{SECRET} two", "d-2")
        bob_ws.send_json({"type": "read", "with": "alice", "up_to": first["id"]})
        acked(bob_ws, "carol", "bob and carol keep this", "d-3")
        ws.send_json({"type": "edit", "id": first["id"], "body": f"{SECRET} edited"})
        for socket in (ws, bob_ws, carol_ws):  # everything so far has arrived
            quiet(socket)
        assert reply["to"] == "alice"

        if database_url.startswith("sqlite"):
            assert sqlite_files_hold(Path(database_url.removeprefix("sqlite:///")), SECRET)  # the check can see it

        # Refusals change nothing.
        assert delete_me(alice, None).status_code == 400
        wrong = delete_me(alice, "not my password")
        assert wrong.status_code == 401 and error_code(wrong) == "bad_credentials"
        assert delete_me(client, PASSWORD).status_code == 401
        assert alice.get("/api/me").status_code == 200

        deleted = delete_me(alice, PASSWORD)
        assert deleted.status_code == 204
        assert close_code(ws) == chatx.CLOSE_REVOKED
        # The others' sockets stay open and work.
        alive(bob_ws)
        alive(carol_ws)
        assert acked(bob_ws, "carol", "still here", "d-4")["body"] == "still here"
        bob_ws.send_json({"type": "send", "to": "alice", "body": "hello?", "client_id": "d-5"})
        error = next_frame(bob_ws)
        assert error["type"] == "error" and error["code"] == "unknown_user"

    # Every session of hers ended.
    assert alice.get("/api/me").status_code == 401 and elsewhere.get("/api/me").status_code == 401
    assert login(client, "alice").status_code == 401
    # She is gone from the directory and from the others' conversations.
    assert bob.get("/api/users", params={"q": "al"}).json()["users"] == []
    assert [c["user"]["username"] for c in bob.get("/api/conversations").json()["conversations"]] == ["carol"]
    assert bob.get("/api/conversations/alice/messages").status_code == 404
    assert carol.get("/api/blocks").json()["blocks"] == []
    with bob.ws(since=0) as replay:
        frames = [next_frame(replay, "hello"), *quiet(replay)]
    assert SECRET not in str(frames) and "alice" not in str(frames[1:])
    # Her messages are gone from storage, text and all.
    assert database_rows(database_url, "SELECT count(*) FROM chatx_users WHERE username_key = 'alice'") == [(0,)]
    assert database_rows(database_url, f"SELECT count(*) FROM chatx_messages WHERE body LIKE '%{SECRET}%'") == [(0,)]
    assert database_rows(database_url, f"SELECT count(*) FROM chatx_messages WHERE sender_id = {alice.id} "
                                       f"OR recipient_id = {alice.id}") == [(0,)]
    assert database_rows(database_url, f"SELECT count(*) FROM chatx_events WHERE message_id IN ({first['id']}, "
                                       f"{reply['id']}) OR reader_id = {alice.id} OR with_id = {alice.id} "
                                       f"OR user_id = {alice.id}") == [(0,)]
    if database_url.startswith("sqlite"):
        assert not sqlite_files_hold(Path(database_url.removeprefix("sqlite:///")), SECRET)

    # The name is free again, for a new account with nothing of the old one.
    again = sign_up(client, "alice")
    assert again.id != alice.id
    assert again.get("/api/conversations").json()["conversations"] == []
    assert again.get("/api/conversations/bob/messages").json()["messages"] == []
    assert [c["user"]["username"] for c in bob.get("/api/conversations").json()["conversations"]] == ["carol"]
    assert client.get("/healthz").status_code == 200


# ---- idle timeout and rotation ----------------------------------------------------------------------


def test_a_session_unused_for_the_idle_time_is_worthless_and_purged(database_url, make_client):
    idle_days = 0.00002  # 1.7 s
    client = make_client(database_url=database_url, session_idle_days=idle_days)
    alice = sign_up(client, "alice")
    assert alice.get("/api/me").status_code == 200
    time.sleep(idle_days * 86400 + 0.5)
    assert alice.get("/api/me").status_code == 401
    refused(alice)
    assert login(client, "alice").status_code == 200  # signing in again works
    # Expired sessions are purged (a process purges when it starts, then periodically).
    stale = chatx.session_id(alice.cookie.rpartition(".")[0])
    assert database_rows(database_url, f"SELECT count(*) FROM chatx_sessions WHERE id = '{stale}'") == [(1,)]
    make_client(database_url=database_url, session_idle_days=idle_days)
    wait_until(lambda: database_rows(database_url, f"SELECT count(*) FROM chatx_sessions WHERE id = '{stale}'")
               == [(0,)], timeout=10, what="the idle session to be purged")


def test_a_session_in_use_outlives_the_idle_time_and_an_unused_one_does_not(make_client, monkeypatch):
    client = make_client(session_idle_days=1)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    real_now = chatx.now_ms
    day = 86_400_000
    for days_later in (0.9, 1.8, 2.7):
        monkeypatch.setattr(chatx, "now_ms", lambda: real_now() + int(days_later * day))
        assert alice.get("/api/me").status_code == 200, f"alice, used daily, was signed out on day {days_later}"
    assert bob.get("/api/me").status_code == 401  # unused for 2.7 days
    monkeypatch.setattr(chatx, "now_ms", lambda: real_now() + int(3.8 * day))
    assert alice.get("/api/me").status_code == 401  # 1.1 days since her last use


def test_signing_in_again_rotates_the_session_and_the_old_cookie_is_worthless(database_url, make_client):
    client = make_client(database_url=database_url)
    browser, bob = sign_up(client, "alice"), sign_up(client, "bob")
    laptop = another_session(browser)  # another browser: not replaced
    with browser.ws() as old_ws, laptop.ws() as laptop_ws, bob.ws() as bob_ws:
        for socket in (old_ws, laptop_ws, bob_ws):
            next_frame(socket, "hello")
        response = login(client, "alice", cookie=browser.cookie)  # the same browser signs in again
        assert response.status_code == 200
        fresh = response.cookies[chatx.SESSION_COOKIE]
        assert fresh != browser.cookie
        assert close_code(old_ws) == chatx.CLOSE_REVOKED
        alive(laptop_ws)
        alive(bob_ws)
    assert browser.get("/api/me").status_code == 401
    assert client.get("/api/me", headers={"cookie": f"{chatx.SESSION_COOKIE}={fresh}"}).status_code == 200
    assert laptop.get("/api/me").status_code == 200


# ---- hostile cookies ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [b"abc.\xe9", b"\xe9\xe9.abc", b"\xc3\xa9t\xc3\xa9.\xc3\xa9", b"\xff.\xff",
                                   b".", b"abc.", b"a" * 5000 + b".b"])
def test_a_cookie_that_is_not_ascii_or_not_ours_is_401_never_500(client, value):
    bob = sign_up(client, "bob")
    cookie = {"cookie": b"chatx_session=" + value}
    for path in ("/api/me", "/api/conversations", "/api/blocks"):
        response = client.get(path, headers=cookie)
        assert response.status_code == 401 and error_code(response) == "not_authenticated", (path, response.text)
    assert client.post("/api/password", json={"password": PASSWORD, "new_password": NEW_PASSWORD},
                       headers=cookie).status_code == 401
    assert client.post("/api/logout", headers=cookie).status_code == 204
    assert client.get("/", headers=cookie, follow_redirects=False).status_code == 303
    with pytest.raises((WebSocketDisconnect, WebSocketDenialResponse)):
        with client.websocket_connect("/ws", headers=cookie) as ws:
            ws.receive_json()
    assert bob.get("/api/me").status_code == 200


# ---- the command line ---------------------------------------------------------------------------------


def cli(database_url: str, workdir: Path, *args: str, password: str | None = None,
        broadcast_url: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CHATX_DATABASE_URL": database_url}
    if broadcast_url:
        env["CHATX_BROADCAST_URL"] = broadcast_url
    return subprocess.run([sys.executable, "-m", "chatx", *args], input=(password or "") + "\n", text=True,
                          capture_output=True, env=env, cwd=workdir, timeout=60)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


def failed(result: subprocess.CompletedProcess, *words: str) -> None:
    """A clear error: exit status 1, one line that says why, no traceback."""
    assert result.returncode == 1, f"exit {result.returncode}: {result.stdout} {result.stderr}"
    assert "Traceback" not in result.stderr and result.stderr.strip(), result.stderr
    for word in words:
        assert word.lower() in result.stderr.lower(), result.stderr


def test_the_command_line_creates_resets_and_deletes_accounts_while_a_server_runs(database_url, make_client,
                                                                                  redis_server, tmp_path):
    client = make_client(database_url=database_url, broadcast_url=redis_server.url, registration="closed")
    run = lambda *args, password=None: cli(database_url, tmp_path, *args, password=password,  # noqa: E731
                                           broadcast_url=redis_server.url)
    assert "created dave" in ok(run("create-user", "dave", password=PASSWORD))
    ok(run("create-user", "erin", password=PASSWORD))
    closed = client.post("/api/register", json={"username": "frank", "password": PASSWORD})
    assert closed.status_code == 403 and error_code(closed) == "registration_closed"
    signed_in = login(client, "dave")
    assert signed_in.status_code == 200
    dave = Person(client, "dave", signed_in.cookies[chatx.SESSION_COOKIE], signed_in.json()["user"]["id"])
    erin_login = login(client, "erin")
    erin = Person(client, "erin", erin_login.cookies[chatx.SESSION_COOKIE], erin_login.json()["user"]["id"])
    make_partners(dave, erin)

    with dave.ws() as ws, erin.ws() as erin_ws:
        next_frame(ws, "hello")
        next_frame(erin_ws, "hello")
        ok(run("set-password", "dave", password=NEW_PASSWORD))
        assert close_code(ws) == chatx.CLOSE_REVOKED  # his sessions ended, on the running server too
        alive(erin_ws)
    assert dave.get("/api/me").status_code == 401
    assert login(client, "dave").status_code == 401
    again = login(client, "dave", NEW_PASSWORD)
    assert again.status_code == 200
    dave = Person(client, "dave", again.cookies[chatx.SESSION_COOKIE], dave.id)

    stats = dict(line.split(": ", 1) for line in ok(run("stats")).strip().splitlines())
    assert stats["users"] == "2" and stats["messages"] == "1"

    with dave.ws() as ws, erin.ws() as erin_ws:
        next_frame(ws, "hello")
        next_frame(erin_ws, "hello")
        assert "deleted dave" in ok(run("delete-user", "DAVE"))
        assert close_code(ws) == chatx.CLOSE_REVOKED
        alive(erin_ws)
        assert acked(erin_ws, "erin", "note", "c-1")["body"] == "note"
    assert login(client, "dave", NEW_PASSWORD).status_code == 401
    assert erin.get("/api/users", params={"q": "d"}).json()["users"] == []
    assert erin.get("/api/conversations").json()["conversations"][0]["user"]["username"] == "erin"
    assert client.get("/healthz").status_code == 200


def test_the_command_line_refuses_bad_input_with_a_clear_error_and_status_1(sqlite_url, tmp_path):
    database_url = sqlite_url
    assert ok(cli(database_url, tmp_path, "create-user", "erin", password=PASSWORD))
    cases = [
        (("create-user", "x"), PASSWORD, ("characters",)),  # not a valid username
        (("create-user", "frank"), "short", ("password",)),  # a weak password
        (("create-user", "ERIN"), PASSWORD, ("taken",)),  # taken regardless of case
        (("create-user", "er1n"), PASSWORD, ("taken",)),  # or looking alike
        (("set-password", "nobody"), NEW_PASSWORD, ("nobody",)),
        (("set-password", "erin"), "short", ("password",)),
        (("delete-user", "nobody"), None, ("nobody",)),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda case: cli(database_url, tmp_path, *case[0], password=case[1]), cases))
    for (args, _, words), result in zip(cases, results):
        failed(result, *words)
    # Nothing changed: erin still has her password, and no one else exists.
    stats = dict(line.split(": ", 1) for line in ok(cli(database_url, tmp_path, "stats")).strip().splitlines())
    assert stats["users"] == "1"
    assert database_rows(database_url, "SELECT username FROM chatx_users") == [("erin",)]
    hashed = database_rows(database_url, "SELECT password_hash FROM chatx_users")[0][0]
    assert chatx.check_password(PASSWORD, hashed)


def test_the_command_line_backs_up_sqlite_and_names_pg_dump_for_postgresql(database_url, tmp_path):
    ok(cli(database_url, tmp_path, "create-user", "erin", password=PASSWORD))
    target = tmp_path / "backup.db"
    result = cli(database_url, tmp_path, "backup", str(target))
    if database_url.startswith("postgresql"):
        failed(result, "pg_dump")
        return
    ok(result)
    with sqlite3.connect(target) as copy:
        assert copy.execute("SELECT username FROM chatx_users").fetchall() == [("erin",)]
    failed(cli(database_url, tmp_path, "backup", str(target)), "exists")  # never overwrites
    failed(cli(f"sqlite:///{tmp_path / 'missing.db'}", tmp_path, "backup", str(tmp_path / "other.db")), "no database")


def test_deleting_an_unknown_user_with_a_redis_broadcast_fails_at_once(sqlite_url, redis_server, tmp_path):
    """Issue 23, item 6: the Redis listener ends when the command does, rather than hanging it."""
    ok(cli(sqlite_url, tmp_path, "create-user", "erin", password=PASSWORD))
    started = time.monotonic()
    failed(cli(sqlite_url, tmp_path, "delete-user", "nobody", broadcast_url=redis_server.url), "nobody")
    assert time.monotonic() - started < 20


def test_the_backup_command_never_prints_the_postgresql_password(tmp_path):
    """Issue 23, item 10: the pg_dump hint names the database with its password masked, as the logs do."""
    result = cli("postgresql://postgres:s3cret-pw@127.0.0.1:5432/test", tmp_path, "backup", str(tmp_path / "b.dump"))
    failed(result, "pg_dump", "postgres:***@127.0.0.1:5432/test")
    assert "s3cret-pw" not in result.stdout + result.stderr


def test_a_password_set_from_the_command_line_closes_open_sockets_on_the_default_broadcast(make_client, sqlite_url,
                                                                                          tmp_path):
    """The default deployment: one process, memory:// broadcast. The command
    line ends every session of the user (docs/protocol.md, Sessions and
    cross-site requests: its sockets "close with code 4401"), so the sockets a running server holds for them
    must close too, not only their next HTTP request fail."""
    client = make_client(presence_ttl=2)  # a heartbeat every half second
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    with alice.ws() as ws, bob.ws() as bob_ws:
        next_frame(ws, "hello")
        next_frame(bob_ws, "hello")
        ok(cli(sqlite_url, tmp_path, "set-password", "alice", password=NEW_PASSWORD))
        assert alice.get("/api/me").status_code == 401
        deadline, code = time.monotonic() + 10, None
        try:
            while time.monotonic() < deadline:
                quiet(ws)
                time.sleep(0.2)
        except WebSocketDisconnect as closed:
            code = closed.code
        assert code == chatx.CLOSE_REVOKED, "alice's socket still works 10 s after her sessions ended"
        alive(bob_ws)
