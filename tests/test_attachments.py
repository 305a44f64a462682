"""Attachments: upload, the attachment in messages everywhere, who may read
them, how they are served, their limits, and their erasure."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import httpx2 as httpx
import pytest
from PIL import Image

import chatx
from conftest import (PASSWORD, ChatServer, ack_and_copy, error_code, next_frame, quiet, remote_sign_up, receive, run_async, run_job,
                      settle, sign_up, wait_until)


PDF = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj 2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n"
       b"trailer<</Root 1 0 R>>\n%%EOF\n" + secrets.token_bytes(300_000))
HTML = b"<!doctype html><title>x</title><script>document.title='RAN'; window.ran = true;</script><p>hello"
SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
       b"<script>document.title='RAN'; window.ran = true;</script><rect width='10' height='10'/></svg>")


def image_bytes(width: int = 800, height: int = 600, kind: str = "PNG") -> bytes:
    """A real image with noise in it, so that it does not compress to nothing."""
    image = Image.frombytes("RGB", (width, height), secrets.token_bytes(width * height * 3))
    out = io.BytesIO()
    image.save(out, kind)
    return out.getvalue()


def upload(person, data: bytes, name: str, kind: str, prefix: str = "") -> httpx.Response:
    return person.post(f"{prefix}/api/attachments", params={"name": name}, content=data,
                       headers={"content-type": kind})


def uploaded(person, data: bytes, name: str, kind: str) -> dict[str, Any]:
    response = upload(person, data, name, kind)
    assert response.status_code == 201, response.text
    return response.json()["attachment"]


def send_attachment(ws, to: str, attachment_id: str, body: str | None = None, client_id: str | None = None) -> None:
    frame = {"type": "send", "to": to, "attachment": attachment_id, "client_id": client_id or uuid.uuid4().hex}
    if body is not None:
        frame["body"] = body
    ws.send_json(frame)


def sent_attachment(ws, to: str, attachment_id: str, body: str | None = None) -> dict[str, Any]:
    send_attachment(ws, to, attachment_id, body)
    return ack_and_copy(ws)[0]["message"]


@pytest.fixture
def chat(database_url, make_client):
    client = make_client(database_url=database_url, send_rate=1000.0, send_burst=1000.0)
    return client, sign_up(client, "alice"), sign_up(client, "bob"), sign_up(client, "carol")


# ---- upload, send and receive ----------------------------------------------------------


def test_an_image_and_a_pdf_reach_the_partner_in_frames_history_replay_and_the_conversation_list(chat):
    client, alice, bob, carol = chat
    png = image_bytes(800, 600)
    photo = uploaded(alice, png, "holiday.png", "image/png")
    assert {k: v for k, v in photo.items() if k != "id"} == {
        "name": "holiday.png", "type": "image/png", "size": len(png), "width": 800, "height": 600}
    report = uploaded(alice, PDF, "report.pdf", "application/pdf")
    assert (report["type"], report["width"], report["height"], report["size"]) == ("application/pdf", None, None,
                                                                                    len(PDF))
    with alice.ws() as a, bob.ws() as b:
        settle(a, b)
        with_photo = sent_attachment(a, "bob", photo["id"])  # no body at all
        with_report = sent_attachment(a, "bob", report["id"], body="the figures")
        assert with_photo["body"] == "" and with_photo["attachment"] == photo
        assert with_report["body"] == "the figures" and with_report["attachment"] == report
        assert next_frame(b, "message")["message"] == with_photo
        assert next_frame(b, "message")["message"] == with_report
    got = bob.get(f"/api/attachments/{photo['id']}")
    assert got.status_code == 200 and got.content == png
    assert got.headers["content-type"] == "image/png"
    assert got.headers["content-disposition"].startswith("inline")
    thumbnail = bob.get(f"/api/attachments/{photo['id']}/thumbnail")
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumbnail.content)).size == (320, 240)
    got = bob.get(f"/api/attachments/{report['id']}")
    assert got.status_code == 200 and got.content == PDF
    assert got.headers["content-disposition"].startswith("attachment;")
    assert error_code(bob.get(f"/api/attachments/{report['id']}/thumbnail")) == "unknown_attachment"
    messages = bob.get("/api/conversations/alice/messages").json()["messages"]
    assert [m["attachment"] for m in messages] == [photo, report]
    listed = bob.get("/api/conversations").json()["conversations"][0]["last_message"]
    assert listed["attachment"] == report
    with bob.ws(since=0) as replay:
        next_frame(replay, "hello")
        replayed = [next_frame(replay, "message")["message"] for _ in range(2)]
    assert [m["attachment"] for m in replayed] == [photo, report]


def test_an_attachment_must_be_an_unsent_upload_of_the_sender(chat):
    client, alice, bob, carol = chat
    mine = uploaded(alice, image_bytes(40, 30), "a.png", "image/png")
    carols = uploaded(carol, image_bytes(40, 30), "c.png", "image/png")
    with alice.ws() as a:
        next_frame(a, "hello")
        for attachment_id in (carols["id"], "no-such-upload", "x" * 40):
            send_attachment(a, "bob", attachment_id, client_id="c-1")
            frame = next_frame(a, "error")
            assert (frame["code"], frame["client_id"]) == ("unknown_attachment", "c-1"), frame
        first = sent_attachment(a, "bob", mine["id"])
        send_attachment(a, "bob", mine["id"])  # once sent, an upload is not an upload to send again
        assert next_frame(a, "error")["code"] == "unknown_attachment"
        # A retry of the same send (same client_id) gets its original ack and stores nothing new.
        send_attachment(a, "bob", mine["id"], client_id=first["client_id"])
        assert next_frame(a, "ack")["message"] == first
        a.send_json({"type": "send", "to": "bob", "body": " ", "client_id": "c-2"})
        assert next_frame(a, "error")["code"] == "empty_body"  # without an attachment a body is still needed
        a.send_json({"type": "send", "to": "bob", "attachment": 5, "client_id": "c-3"})
        assert next_frame(a, "error")["code"] == "invalid_field"
        assert quiet(a) == []
    assert len(bob.get("/api/conversations/alice/messages").json()["messages"]) == 1


def test_chat_send_carries_an_upload_of_the_sender_as_a_send_frame_would(chat):
    client, alice, bob, carol = chat
    chat_x = client.app.state.chat
    mine = uploaded(alice, image_bytes(40, 30), "a.png", "image/png")
    carols = uploaded(carol, image_bytes(40, 30), "c.png", "image/png")

    def refused(*args, **kwargs) -> str:
        with pytest.raises(chatx.ChatError) as caught:
            client.portal.call(lambda: chat_x.send(*args, **kwargs))
        return caught.value.code

    with bob.ws() as b:
        next_frame(b, "hello")
        assert refused("alice", "bob", "", attachment=carols["id"]) == "unknown_attachment"
        assert refused("alice", "bob", "", attachment=5) == "invalid_field"
        assert refused("alice", "bob", " ") == "empty_body"  # without an attachment a body is still needed
        sent = client.portal.call(lambda: chat_x.send("alice", "bob", "", attachment=mine["id"]))
        assert sent["body"] == "" and sent["attachment"] == mine
        assert next_frame(b, "message")["message"] == sent
        assert refused("alice", "bob", "", attachment=mine["id"]) == "unknown_attachment"  # sent once already
    assert bob.get(f"/api/attachments/{mine['id']}").status_code == 200


def test_two_sends_of_one_upload_in_one_commit_store_it_once(chat):
    client, alice, bob, carol = chat
    photo = uploaded(alice, image_bytes(40, 30), "once.png", "image/png")
    sender, recipient = chatx.User(alice.id, "alice"), chatx.User(bob.id, "bob")
    storage = client.app.state.chat.storage

    async def both() -> list:
        futures = [storage.write_bulk(chatx.insert_messages,
                                      chatx.NewMessage(sender, recipient, "", f"c-{n}", None, photo["id"]))
                   for n in range(2)]
        return list(await asyncio.gather(*futures))

    first, second = client.portal.call(both)
    assert isinstance(first, chatx.Stored) and first.message["attachment"] == photo
    assert second == chatx.Refused("unknown_attachment", "There is no such upload of yours to send.")


# ---- who may read ------------------------------------------------------------------------


def test_only_the_uploader_and_the_other_person_read_an_attachment_everyone_else_gets_the_404_of_no_such_id(chat):
    client, alice, bob, carol = chat
    photo = uploaded(alice, image_bytes(400, 400), "p.png", "image/png")
    report = uploaded(alice, PDF, "r.pdf", "application/pdf")
    never = "A" * 24
    assert error_code(bob.get(f"/api/attachments/{photo['id']}")) == "unknown_attachment"  # not sent yet
    assert alice.get(f"/api/attachments/{photo['id']}").content  # but its uploader sees it
    with alice.ws() as a:
        next_frame(a, "hello")
        sent_attachment(a, "bob", photo["id"])
        sent_attachment(a, "bob", report["id"])
    for path in (f"/api/attachments/{photo['id']}", f"/api/attachments/{photo['id']}/thumbnail",
                 f"/api/attachments/{report['id']}"):
        assert bob.get(path).status_code == 200
        theirs, none = carol.get(path), carol.get(path.replace(path.split("/")[3], never))
        assert (theirs.status_code, theirs.json()) == (404, none.json()) == (404, {"error": {
            "code": "unknown_attachment", "detail": "There is no such attachment for you."}})
        assert set(theirs.headers) == set(none.headers) and "etag" not in theirs.headers
    client.cookies.clear()
    assert client.get(f"/api/attachments/{photo['id']}").status_code == 401


# ---- how they are served ----------------------------------------------------------------------


def test_html_svg_and_a_png_that_is_html_are_sandboxed_downloads_and_images_are_cached_privately(chat):
    client, alice, bob, carol = chat
    html = uploaded(alice, HTML, "page.html", "text/html")
    svg = uploaded(alice, SVG, "logo.svg", "image/svg+xml")
    fake = uploaded(alice, HTML, "cat.png", "image/png")
    photo = uploaded(alice, image_bytes(100, 50, "JPEG"), 'we"ird\u202e name\n.jpg', "image/jpeg")
    assert (html["type"], svg["type"], fake["type"]) == ("text/html", "application/octet-stream",
                                                         "application/octet-stream")
    assert (photo["type"], photo["name"], photo["width"]) == ("image/jpeg", 'we"ird name.jpg', 100)
    for attachment in (html, svg, fake):
        response = alice.get(f"/api/attachments/{attachment['id']}")
        assert response.headers["content-security-policy"] == "sandbox"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["content-disposition"].startswith("attachment;")
        assert attachment["name"].encode() in response.headers["content-disposition"].encode()
    response = alice.get(f"/api/attachments/{photo['id']}")
    assert response.headers["content-disposition"] == (
        "inline; filename=\"we_ird name.jpg\"; filename*=UTF-8''we%22ird%20name.jpg")
    assert response.headers["content-security-policy"] == "sandbox"
    assert response.headers["cache-control"] == "private, max-age=86400"
    again = alice.get(f"/api/attachments/{photo['id']}", headers={"if-none-match": response.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_a_photo_taken_sideways_has_the_size_and_thumbnail_a_browser_shows(chat):
    client, alice, bob, carol = chat
    image = Image.new("RGB", (400, 200), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # the camera was turned: shown rotated by 90 degrees
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif)
    photo = uploaded(alice, out.getvalue(), "portrait.jpg", "image/jpeg")
    assert (photo["width"], photo["height"]) == (200, 400)
    thumbnail = alice.get(f"/api/attachments/{photo['id']}/thumbnail").content
    assert Image.open(io.BytesIO(thumbnail)).size == (160, 320)


def test_a_range_request_gets_206_with_exactly_those_bytes(chat):
    client, alice, bob, carol = chat
    data = secrets.token_bytes(700_000)  # several chunks of the store
    attachment = uploaded(alice, data, "big.bin", "application/octet-stream")
    path = f"/api/attachments/{attachment['id']}"
    for asked, start, end in (("bytes=0-9", 0, 10), ("bytes=262140-524300", 262140, 524301),
                              ("bytes=699990-", 699990, 700000), ("bytes=-5", 699995, 700000),
                              ("bytes=600000-999999999", 600000, 700000)):
        response = alice.get(path, headers={"range": asked})
        assert response.status_code == 206, asked
        assert response.content == data[start:end], asked
        assert response.headers["content-range"] == f"bytes {start}-{end - 1}/700000"
    assert alice.get(path, headers={"range": "bytes=800000-"}).status_code == 416
    whole = alice.get(path)
    assert whole.status_code == 200 and whole.content == data and whole.headers["accept-ranges"] == "bytes"


def test_an_upload_needs_a_name_a_session_and_our_origin(chat):
    client, alice, bob, carol = chat
    assert error_code(alice.post("/api/attachments", content=b"x")) == "bad_request"
    assert error_code(upload(alice, b"", "empty.txt", "text/plain")) == "bad_request"
    assert upload(alice, b"x", "../../etc/passwd", "text/plain").json()["attachment"]["name"] == "passwd"
    foreign = alice.post("/api/attachments?name=a.txt", content=b"x", headers={"origin": "https://evil.example"})
    assert (foreign.status_code, error_code(foreign)) == (403, "forbidden")
    client.cookies.clear()
    assert client.post("/api/attachments?name=a.txt", content=b"x").status_code == 401


# ---- limits ---------------------------------------------------------------------------------


def test_the_day_s_upload_bytes_are_limited_per_user(make_client):
    client = make_client(attachment_bytes_per_day=250_000)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    assert upload(alice, secrets.token_bytes(200_000), "a.bin", "application/octet-stream").status_code == 201
    over = upload(alice, secrets.token_bytes(60_000), "b.bin", "application/octet-stream")
    assert (over.status_code, error_code(over)) == (429, "rate_limited")
    assert upload(alice, secrets.token_bytes(50_000), "c.bin", "application/octet-stream").status_code == 201
    assert upload(bob, secrets.token_bytes(200_000), "d.bin", "application/octet-stream").status_code == 201


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def raw_upload(server: ChatServer, cookie: str, head: str, body_pieces) -> tuple[int, int]:
    """Send a request by hand; return its status and how many body bytes went
    out before the server answered (or stopped reading)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall((head + f"Host: 127.0.0.1:{server.port}\r\nCookie: {chatx.SESSION_COOKIE}={cookie}\r\n"
                      "Content-Type: application/octet-stream\r\n\r\n").encode())
        conn.settimeout(0.001)
        answer = b""
        for piece in body_pieces:
            try:
                conn.sendall(piece)
                sent += len(piece)
            except (BlockingIOError, TimeoutError, socket.timeout, BrokenPipeError, ConnectionResetError):
                break
            try:
                answer += conn.recv(65536)
            except (BlockingIOError, TimeoutError, socket.timeout):
                continue
            except ConnectionResetError:
                break
            if answer:
                break
        conn.settimeout(10)
        while b"\r\n" not in answer:
            answer += conn.recv(65536)
    return int(answer.split()[1]), sent


def test_an_oversized_upload_is_refused_while_it_arrives_whatever_its_content_length_says(tmp_path):
    limit = 1024 * 1024
    server = ChatServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}",
                         "CHATX_MAX_ATTACHMENT_BYTES": str(limit)}, tmp_path)
    server.start()
    try:
        alice = remote_sign_up(server, "alice")
        piece = secrets.token_bytes(64 * 1024)
        warm = httpx.post(f"{server.base}/api/attachments?name=w.bin", headers=alice.headers(), content=piece)
        assert warm.status_code == 201
        before = rss_kib(server.process.pid)
        gigabyte = (piece for _ in range(16 * 1024))  # 1 GiB, if it were all sent
        declared = httpx.post(f"{server.base}/api/attachments?name=big.bin", headers=alice.headers(),
                              content=secrets.token_bytes(limit + 1))
        assert (declared.status_code, error_code(declared)) == (413, "too_large")
        status, sent = raw_upload(server, alice.cookie, "POST /api/attachments?name=lie.bin HTTP/1.1\r\n"
                                  f"Content-Length: {1024 ** 3}\r\n", gigabyte)
        assert status == 413 and sent < 64 * limit, sent
        chunked = (b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(16 * 1024))
        status, sent = raw_upload(server, alice.cookie, "POST /api/attachments?name=chunked.bin HTTP/1.1\r\n"
                                  "Transfer-Encoding: chunked\r\n", chunked)
        assert status == 413 and sent < 64 * limit, sent
        grown = rss_kib(server.process.pid) - before
        assert grown < 20 * 1024, f"the server grew by {grown} KiB"
        assert httpx.get(f"{server.base}/healthz").status_code == 200
    finally:
        server.stop()


# ---- erasure ----------------------------------------------------------------------------------


def marked_bytes(marker: bytes, size: int = 600_000) -> bytes:
    """Random bytes with a marker every 4 KiB, so that any page left behind shows it."""
    data = bytearray(secrets.token_bytes(size))
    for offset in range(0, size - len(marker), 4096):
        data[offset:offset + len(marker)] = marker
    return bytes(data)


def database_bytes(url: str) -> bytes:
    """Where the database keeps attachments: on SQLite its file and log as on
    disk; on PostgreSQL the rows of the attachment tables. (PostgreSQL leaves
    a deleted row's bytes in its table file until the page is reused or a
    VACUUM FULL rewrites it: docs/protocol.md says so.)"""
    if url.startswith("sqlite"):
        path = Path(url.removeprefix("sqlite:///"))
        return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())

    async def rows() -> bytes:
        connection = await asyncpg.connect(url)
        try:
            chunks = await connection.fetch("SELECT data FROM chatx_attachment_chunks")
            thumbnails = await connection.fetch("SELECT thumbnail FROM chatx_attachments WHERE thumbnail IS NOT NULL")
            return b"".join(row[0] for row in [*chunks, *thumbnails])
        finally:
            await connection.close()

    return run_async(rows)


def gone_from_the_database(url: str, markers: list[bytes]) -> None:
    def gone() -> bool:
        data = database_bytes(url)
        return not any(marker in data for marker in markers)

    wait_until(gone, timeout=10, interval=0.5, what="the bytes to be erased from the database")


def test_deleting_the_message_its_sender_s_account_or_leaving_an_upload_unsent_erases_the_bytes(database_url,
                                                                                                 make_client):
    client = make_client(database_url=database_url, send_rate=1000.0, send_burst=1000.0)
    alice, bob, carol = sign_up(client, "alice"), sign_up(client, "bob"), sign_up(client, "carol")
    markers = {name: f"MARK-{name}-{uuid.uuid4().hex}".encode() for name in
               ("deleted", "kept", "unsent", "carol", "to carol")}
    ids = {name: uploaded(carol if name == "carol" else alice, marked_bytes(marker), f"{name}.bin",
                          "application/octet-stream")["id"] for name, marker in markers.items()}
    with alice.ws() as a, carol.ws() as c:
        settle(a, c)
        doomed = sent_attachment(a, "bob", ids["deleted"])
        sent_attachment(a, "bob", ids["kept"])
        sent_attachment(a, "carol", ids["to carol"])
        next_frame(c, "message")
        sent_attachment(c, "alice", ids["carol"])
        next_frame(a, "message")
        assert all(marker in database_bytes(database_url) for marker in markers.values())  # the check can see
        a.send_json({"type": "delete", "id": doomed["id"]})
        deleted = next_frame(a, "delete")["message"]
        assert (deleted["attachment"], deleted["deleted"]) == (None, True)
    gone_from_the_database(database_url, [markers["deleted"]])
    assert error_code(bob.get(f"/api/attachments/{ids['deleted']}")) == "unknown_attachment"
    assert bob.get("/api/conversations/alice/messages").json()["messages"][0]["attachment"] is None

    # An hour unsent: the sweep erases it, and leaves what was sent.
    hour = int(chatx.Settings.unsent_upload_s * 1000)
    run_job(client, chatx.expire_uploads, chatx.now_ms() - hour + 60_000, 0)
    assert alice.get(f"/api/attachments/{ids['unsent']}").status_code == 200  # not an hour old yet
    client.portal.call(client.app.state.chat.attachments.expire, chatx.now_ms() + hour + 1)
    gone_from_the_database(database_url, [markers["unsent"]])
    assert alice.get(f"/api/attachments/{ids['kept']}").status_code == 200

    # Carol deletes her account: what she sent and what she received go with her messages.
    deleted = client.request("DELETE", "/api/me", headers=carol.headers, json={"password": PASSWORD})
    assert deleted.status_code == 204, deleted.text
    gone_from_the_database(database_url, [markers["carol"], markers["to carol"]])
    assert markers["kept"] in database_bytes(database_url)
    assert bob.get(f"/api/attachments/{ids['kept']}").status_code == 200


def stored_uploads(url: str) -> tuple[int, int]:
    """How many attachment rows and chunk rows the database holds."""
    queries = ("SELECT count(*) FROM chatx_attachments", "SELECT count(*) FROM chatx_attachment_chunks")
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///"), timeout=10) as connection:
            return tuple(connection.execute(query).fetchone()[0] for query in queries)

    async def counts() -> tuple[int, int]:
        connection = await asyncpg.connect(url)
        try:
            return tuple([await connection.fetchval(query) for query in queries])
        finally:
            await connection.close()

    return run_async(counts)


def test_an_upload_cut_off_by_a_killed_process_leaves_no_chunk_once_the_sweep_has_run(database_url, tmp_path):
    env = {"CHATX_DATABASE_URL": database_url, "CHATX_MAX_ATTACHMENT_BYTES": str(64 * 1024 * 1024)}
    server = ChatServer(env, tmp_path)
    server.start()
    try:
        alice = remote_sign_up(server, "alice")
        size = 48 * 1024 * 1024
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, f"{server.base}/api/attachments?name=big.bin", headers=alice.headers(),
                                 content=secrets.token_bytes(size), timeout=120)
            wait_until(lambda: stored_uploads(database_url)[1] > 0, timeout=60, interval=0.005,
                       what="the upload's first chunks")
            server.process.kill()
            server.process.wait()
            with pytest.raises(httpx.HTTPError):
                answer.result()
    finally:
        server.stop()
    uploads, chunks = stored_uploads(database_url)
    assert uploads == 1 and 0 < chunks < size // chatx.ATTACHMENT_CHUNK_BYTES, (uploads, chunks)

    restarted = ChatServer({**env, "CHATX_UNSENT_UPLOAD_S": "1"}, tmp_path)
    restarted.start()
    try:
        wait_until(lambda: stored_uploads(database_url) == (0, 0), timeout=20, interval=0.2,
                   what="the sweep to erase the cut-off upload")
    finally:
        restarted.stop()


def decoders_of(pid: int) -> set[int]:
    """The image decoder processes a server started (multiprocessing's spawn)."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == pid and b"spawn_main" in (entry / "cmdline").read_bytes():
                found.add(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_an_image_whose_decoder_dies_gets_503_busy_and_the_decoder_is_replaced_and_leaves_with_the_server(
        tmp_path):
    server = ChatServer({"CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}"}, tmp_path)
    server.start()
    try:
        alice = httpx.Client(base_url=server.base, headers=remote_sign_up(server, "alice").headers(), timeout=60)
        photo = image_bytes(400, 300)
        assert uploaded(alice, photo, "a.png", "image/png")["width"] == 400
        idle = decoders_of(server.process.pid)
        assert idle
        kill_all(idle)  # between uploads: the next one finds a new decoder, and no error
        wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in idle), timeout=10,
                   what="the pool to reap them")  # once reaped, the pool knows it is broken
        assert uploaded(alice, photo, "b.png", "image/png")["width"] == 400

        stop = threading.Event()

        def keep_killing() -> None:
            while not stop.is_set():
                kill_all(decoders_of(server.process.pid))
                time.sleep(0.02)

        killer = threading.Thread(target=keep_killing)
        killer.start()
        try:
            wait_until(lambda: not decoders_of(server.process.pid), timeout=10, what="no decoder left")
            response = upload(alice, photo, "c.png", "image/png")  # a new decoder dies before it answers
        finally:
            stop.set()
            killer.join()
        assert (response.status_code, error_code(response), response.headers.get("retry-after")) == \
            (503, "busy", "1")
        again = uploaded(alice, photo, "c.png", "image/png")
        assert again["width"] == 400 and alice.get(f"/api/attachments/{again['id']}/thumbnail").status_code == 200
        working = decoders_of(server.process.pid)
        assert working
        server.process.kill()
        server.process.wait()
        wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in working), timeout=10,
                   what="the decoders to leave with their server")
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text()


def test_an_unsent_upload_deadline_of_zero_or_less_stops_the_server_from_starting():
    for seconds in (0, -1):
        with pytest.raises(ValueError, match="CHATX_UNSENT_UPLOAD_S"):
            chatx.load_settings(unsent_upload_s=seconds)
    assert chatx.load_settings(unsent_upload_s=0.5).unsent_upload_s == 0.5


# ---- several processes ----------------------------------------------------------------------------


def test_an_attachment_sent_through_one_process_reaches_and_is_read_through_another_on_redis(cluster):
    one, two = cluster(2)
    alice, bob = remote_sign_up(one, "alice"), remote_sign_up(two, "bob")
    png = image_bytes(200, 100)
    response = httpx.post(f"{one.base}/api/attachments?name=photo.png", headers=alice.headers(), content=png)
    assert response.status_code == 201, response.text
    photo = response.json()["attachment"]
    with alice.ws(one) as a, bob.ws(two) as b:
        receive(a, "hello"), receive(b, "hello")
        a.send(json.dumps({"type": "send", "to": "bob", "attachment": photo["id"], "client_id": "p-1"}))
        assert receive(a, "ack")["message"]["attachment"] == photo
        assert receive(b, "message")["message"]["attachment"] == photo
    assert bob.get(two, f"/api/attachments/{photo['id']}").content == png
    assert bob.get(two, f"/api/attachments/{photo['id']}/thumbnail").status_code == 200
    with bob.ws(two, since=0) as replay:
        receive(replay, "hello")
        assert receive(replay, "message")["message"]["attachment"] == photo


# ---- the browser ---------------------------------------------------------------------------------

from playwright.sync_api import expect  # noqa: E402

from test_browser import (bubble, chat_server, chatting, check_accessibility, contact, messages,  # noqa: E402,F401
                          new_context, open_chat, sign_in)


def drop_file(page, name: str, kind: str, data: bytes) -> None:
    """Drop a file on the conversation, as dragging it from the desktop does."""
    transfer = page.evaluate_handle("""([name, kind, b64]) => {
        const transfer = new DataTransfer();
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        transfer.items.add(new File([bytes], name, { type: kind }));
        return transfer;
    }""", [name, kind, base64.b64encode(data).decode()])
    zone = page.locator("#conversation")
    zone.dispatch_event("dragover", {"dataTransfer": transfer})
    zone.dispatch_event("drop", {"dataTransfer": transfer})


def paste_image(page, name: str, data: bytes) -> None:
    page.get_by_role("textbox", name="Message").evaluate("""(box, [name, b64]) => {
        const transfer = new DataTransfer();
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        transfer.items.add(new File([bytes], name, { type: "image/png" }));
        box.dispatchEvent(new ClipboardEvent("paste", { clipboardData: transfer, bubbles: true, cancelable: true }));
    }""", [name, base64.b64encode(data).decode()])


def test_a_photo_and_a_pdf_sent_in_chromium_reach_the_partner_who_sees_the_photo_and_downloads_the_same_bytes(
        chat_server, new_context, tmp_path):
    alice, bob, alice_page, bob_page = chatting(chat_server, new_context, "I have the photos")
    png = image_bytes(800, 600)
    (tmp_path / "holiday.png").write_bytes(png)

    # Pasting an image offers it too; removing it leaves nothing behind.
    paste_image(alice_page, "pasted.png", image_bytes(30, 30))
    tray = alice_page.locator("#attach-tray")
    expect(tray.get_by_role("img", name="pasted.png")).to_be_visible()
    alice_page.get_by_role("button", name="Remove attachment").click()
    expect(tray).to_be_hidden()

    # The Attach button: a preview, a caption, then the upload.
    with alice_page.expect_file_chooser() as chooser:
        alice_page.get_by_role("button", name="Attach").click()
    chooser.value.set_files(str(tmp_path / "holiday.png"))
    expect(tray.get_by_role("img", name="holiday.png")).to_be_visible()
    alice_page.get_by_role("textbox", name="Caption").fill("the beach")
    alice_page.get_by_role("button", name="Send attachment").click()
    expect(tray).to_be_hidden()
    expect(alice_page.get_by_role("textbox", name="Message")).to_be_focused()
    expect(bubble(alice_page, "the beach").get_by_role("button", name="holiday.png")).to_be_visible()

    # Dropping a file on the conversation: a card, no caption.
    drop_file(alice_page, "report.pdf", "application/pdf", PDF)
    alice_page.get_by_role("button", name="Send attachment").click()
    expect(messages(alice_page).get_by_role("link", name=re.compile("report.pdf"))).to_be_visible()

    photo = messages(bob_page).get_by_role("img", name="holiday.png")
    expect(photo).to_be_visible()
    # Its place is kept before it loads: the thumbnail's size, in the photo's proportions.
    assert (photo.get_attribute("width"), photo.get_attribute("height")) == ("320", "240")
    wait_until(lambda: photo.evaluate("(image) => image.complete && image.naturalWidth") == 320,
               what="the thumbnail to load")
    box = photo.bounding_box()
    assert abs(box["width"] / box["height"] - 4 / 3) < 0.02, box
    expect(contact(bob_page, alice)).to_contain_text("📎 report.pdf")

    # Full size in a lightbox; Escape closes it and focus goes back to the photo.
    messages(bob_page).get_by_role("button", name="holiday.png").click()
    dialog = bob_page.get_by_role("dialog", name="holiday.png")
    expect(dialog).to_be_visible()
    full = dialog.get_by_role("img", name="holiday.png")
    wait_until(lambda: full.evaluate("(image) => image.complete && image.naturalWidth") == 800,
               what="the full photo to load")
    check_accessibility(bob_page, "the lightbox")
    bob_page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(messages(bob_page).get_by_role("button", name="holiday.png")).to_be_focused()
    expect(bob_page.get_by_role("heading", name=alice)).to_be_visible()  # the conversation stayed open

    with bob_page.expect_download() as download:
        messages(bob_page).get_by_role("link", name=re.compile("report.pdf")).click()
    assert download.value.suggested_filename == "report.pdf"
    assert Path(download.value.path()).read_bytes() == PDF
    image_url = bob_page.evaluate("() => new URL(document.querySelector('.msg .photo img').src).pathname")
    full_bytes = bob_page.request.get(chat_server.base + image_url.removesuffix("/thumbnail"))
    assert full_bytes.body() == png

    # After a reload (history), the same; and no serious accessibility problem, light or dark.
    bob_page.reload()
    expect(messages(bob_page).get_by_role("img", name="holiday.png")).to_be_visible()
    expect(messages(bob_page).get_by_role("link", name=re.compile("report.pdf"))).to_be_visible()
    check_accessibility(bob_page, "a photo and a file in the log")
    dark = sign_in(new_context(color_scheme="dark", reduced_motion="reduce"), chat_server, bob)
    open_chat(dark, alice)
    wait_until(lambda: messages(dark).get_by_role("img", name="holiday.png").evaluate(
        "(image) => image.complete && image.naturalWidth") == 320, what="the thumbnail to load")
    check_accessibility(dark, "a photo and a file in the log, dark")


def test_opening_an_html_or_svg_attachment_or_a_png_that_is_html_runs_no_script(chat_server, new_context):
    alice, bob, alice_page, bob_page = chatting(chat_server, new_context, "files")
    urls = []
    for name, kind, data in (("page.html", "text/html", HTML), ("logo.svg", "image/svg+xml", SVG),
                             ("cat.png", "image/png", HTML)):
        response = alice_page.request.post(f"{chat_server.base}/api/attachments?name={name}", data=data,
                                           headers={"content-type": kind})
        assert response.status == 201, response.text()
        urls.append(f"{chat_server.base}/api/attachments/{response.json()['attachment']['id']}")
    page = alice_page.context.new_page()
    page.goto(chat_server.base + "/static/favicon.svg")
    for url in urls:
        with page.expect_download() as download:
            page.evaluate("(url) => { location.href = url; }", url)
        assert Path(download.value.path()).read_bytes() in (HTML, SVG)
        # Neither this page nor any other ran the file's script.
        assert page.evaluate("() => [document.title, window.ran === true]") == ["", False]
        for other in page.context.pages:
            assert other.title() != "RAN"


def test_a_version_2_database_gets_the_attachment_column_and_keeps_its_messages(database_url, make_client):
    client = make_client(database_url=database_url)
    alice, bob = sign_up(client, "alice"), sign_up(client, "bob")
    with alice.ws() as a:
        next_frame(a, "hello")
        a.send_json({"type": "send", "to": "bob", "body": "from version 2", "client_id": "v2"})
        ack_and_copy(a)
    client.__exit__(None, None, None)

    async def downgrade() -> None:
        database = chatx.open_database(database_url)
        await database.connect()
        try:
            async with database.connection() as connection:
                conn = chatx.Connection(connection)
                await conn.execute("ALTER TABLE chatx_messages DROP COLUMN attachment_id")
                for table in ("chatx_attachment_chunks", "chatx_attachments", "chatx_upload_days"):
                    await conn.execute(f"DROP TABLE {table}")
                await conn.execute("UPDATE chatx_settings SET value = '2' WHERE name = 'schema_version'")
        finally:
            await database.disconnect()

    run_async(downgrade)
    client = make_client(database_url=database_url)
    assert [m["body"] for m in bob.__class__(client, "bob", bob.cookie, bob.id).get(
        "/api/conversations/alice/messages").json()["messages"]] == ["from version 2"]
    alice = alice.__class__(client, "alice", alice.cookie, alice.id)
    photo = uploaded(alice, image_bytes(20, 10), "p.png", "image/png")
    with alice.ws() as a:
        next_frame(a, "hello")
        assert sent_attachment(a, "bob", photo["id"])["attachment"] == photo
    version = run_job(client, chatx.schema_version)
    assert version == chatx.SCHEMA_VERSION == 3


def test_an_upload_under_way_can_be_cancelled_and_a_failed_one_retried(chat_server, new_context, tmp_path):
    alice, bob, alice_page, bob_page = chatting(chat_server, new_context, "sending the report")
    (tmp_path / "report.pdf").write_bytes(PDF)
    tray = alice_page.locator("#attach-tray")

    def choose() -> None:
        with alice_page.expect_file_chooser() as chooser:
            alice_page.get_by_role("button", name="Attach").click()
        chooser.value.set_files(str(tmp_path / "report.pdf"))

    held = []
    alice_page.route("**/api/attachments?*", lambda route: held.append(route))  # never answered
    choose()
    alice_page.get_by_role("button", name="Send attachment").click()
    expect(tray.get_by_role("progressbar", name="Uploading report.pdf")).to_be_visible()
    alice_page.get_by_role("button", name="Cancel upload").click()
    expect(tray).to_be_hidden()
    alice_page.unroute("**/api/attachments?*")

    alice_page.route("**/api/attachments?*", lambda route: route.abort())
    choose()
    alice_page.get_by_role("button", name="Send attachment").click()
    expect(tray.get_by_role("status")).to_contain_text("Upload failed")
    alice_page.unroute("**/api/attachments?*")
    alice_page.get_by_role("button", name="Retry").click()
    expect(tray).to_be_hidden()
    expect(messages(bob_page).get_by_role("link", name=re.compile("report.pdf"))).to_have_count(1)
    expect(messages(alice_page).get_by_role("link", name=re.compile("report.pdf"))).to_have_count(1)
