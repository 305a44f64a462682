"""Bare relay: the ceiling that ChatX's benchmark numbers are divided by.

It answers the part of the ChatX contract (version 2) that the benchmark uses,
from memory: no database, no broker and no password hashing (the password is
kept as given). Sessions are random tokens in a cookie, so the load generator
treats the relay and ChatX alike. Error handling is limited to what keeps a
well-behaved client working.

What it does, as ChatX must:
- register, login, `GET /api/conversations` (newest last message first, with
  unread counts and read cursors, paged by `before`), `GET /api/users?q=`
  (prefix search by lower-cased username, paged by `after`, without me);
- `/ws`: `hello` with the newest `seq` of my stream and my online conversation
  partners; `send` -> `ack`, then a `message` frame numbered in each person's
  stream to every socket of both; `read` (numbered too); `ping`;
- presence only to conversation partners, at once (no grace period): the
  first socket of a user, the last one closing, and a first message that makes
  two people partners.
What it leaves out, because the benchmark never asks for it: replay
(`since`, `after`), edit, delete, typing, blocks, limits, accounts.

One route that is not in the contract, `POST /bench/users` with
`{"usernames": [...]}`, adds users in one go: the directory workload's way of
having 100,000 users, as it writes ChatX's table directly.

Each socket has an outbox (a queue drained by one writer task) so that the
hello frame always goes out before any presence or message frame, as in ChatX.

Run: python -m uvicorn bench.relay:app --ws-per-message-deflate false
"""

import asyncio
import bisect
import json
import secrets
from collections import OrderedDict
from datetime import UTC, datetime

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

COOKIE = "relay_session"


def now_iso() -> str:
    """The current UTC time as ChatX writes it: milliseconds and a Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "detail": detail}}, status_code=status)


def whole(text: str | None, default: int | None) -> int | None:
    """A query parameter that must be a whole number >= 0; raises ValueError otherwise."""
    if text is None:
        return default
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


class Outbox:
    """The frames waiting to be written to one socket, in order."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.writer = asyncio.create_task(self.write_all())

    def put(self, text: str) -> None:
        self.queue.put_nowait(text)

    async def write_all(self) -> None:
        try:
            while True:
                await self.websocket.send_text(await self.queue.get())
        except (OSError, RuntimeError):
            pass  # the client went away; the reader side cleans up


class Conversation:
    """Two people (or one, talking to themselves): their newest message,
    read cursors, and the ids each one received (for unread counts)."""

    __slots__ = ("last", "read", "received")

    def __init__(self) -> None:
        self.last: dict | None = None
        self.read: dict[str, int] = {}  # user key -> read cursor
        self.received: dict[str, list[int]] = {}  # user key -> ids of messages to them, ascending

    def unread(self, key: str) -> int:
        ids = self.received.get(key, ())
        return len(ids) - bisect.bisect_right(ids, self.read.get(key, 0))


class Relay:
    """Users, sessions, conversations and open sockets, all in memory."""

    def __init__(self) -> None:
        self.users: dict[str, dict] = {}  # key: username.lower()
        self.keys: list[str] = []  # every user key, sorted: the directory
        self.sessions: dict[str, str] = {}  # token -> user key
        self.outboxes: dict[str, set[Outbox]] = {}  # user key -> open sockets
        self.last_seen: dict[str, str] = {}
        self.seq: dict[str, int] = {}  # user key -> newest seq of their stream
        # user key -> partner key -> conversation, the most recent last message at the end
        self.conversations: dict[str, OrderedDict[str, Conversation]] = {}
        self.next_message_id = 1

    def add_user(self, username: str, password: str) -> str | None:
        """The new user's key, or None when the name is taken."""
        key = username.lower()
        if key in self.users:
            return None
        self.users[key] = {"id": len(self.users) + 1, "username": username, "password": password}
        bisect.insort(self.keys, key)
        return key

    def add_users(self, usernames: list[str]) -> int:
        added = 0
        for username in usernames:
            key = username.lower()
            if key not in self.users:
                self.users[key] = {"id": len(self.users) + 1, "username": username, "password": ""}
                self.keys.append(key)
                added += 1
        self.keys.sort()
        return added

    def public(self, key: str) -> dict:
        user = self.users[key]
        return {"id": user["id"], "username": user["username"]}

    def status(self, key: str) -> str:
        return "online" if self.outboxes.get(key) else "offline"

    def sign_in(self, key: str, status_code: int) -> Response:
        token = secrets.token_urlsafe(24)
        self.sessions[token] = key
        response = JSONResponse({"user": self.public(key)}, status_code=status_code)
        response.set_cookie(COOKIE, token, httponly=True, samesite="lax")
        return response

    def to_user(self, key: str, text: str) -> None:
        for outbox in self.outboxes.get(key, ()):
            outbox.put(text)

    def to_partners(self, key: str, text: str) -> None:
        for partner in self.conversations.get(key, ()):
            if partner != key:
                self.to_user(partner, text)

    def presence(self, key: str) -> dict:
        return {
            "username": self.users[key]["username"],
            "status": self.status(key),
            "last_seen": self.last_seen.get(key),
        }

    def presence_frame(self, key: str) -> str:
        return json.dumps({"type": "presence", **self.presence(key)})

    def next_seq(self, key: str) -> int:
        seq = self.seq[key] = self.seq.get(key, 0) + 1
        return seq

    def open_socket(self, key: str, outbox: Outbox) -> None:
        """Queue the hello frame and make the socket reachable, with no await
        in between, so no presence or message frame can slip in before hello."""
        online = [self.presence(p) for p in self.conversations.get(key, ())
                  if p != key and self.outboxes.get(p)]
        outbox.put(json.dumps({"type": "hello", "user": self.public(key), "seq": self.seq.get(key, 0),
                               "presence": online}))
        first = not self.outboxes.get(key)
        self.outboxes.setdefault(key, set()).add(outbox)
        if first:
            self.to_partners(key, self.presence_frame(key))

    def close_socket(self, key: str, outbox: Outbox) -> None:
        outbox.writer.cancel()
        self.outboxes[key].discard(outbox)
        if not self.outboxes[key]:
            del self.outboxes[key]
            self.last_seen[key] = now_iso()
            self.to_partners(key, self.presence_frame(key))

    def conversation(self, key: str, peer: str) -> tuple[Conversation, bool]:
        """The conversation of two people, and whether it is new."""
        mine = self.conversations.setdefault(key, OrderedDict())
        found = mine.get(peer)
        if found is not None:
            return found, False
        found = mine[peer] = Conversation()
        self.conversations.setdefault(peer, OrderedDict())[key] = found
        return found, True

    def send(self, key: str, frame: dict, outbox: Outbox) -> None:
        to, body = frame.get("to"), frame.get("body")
        client_id = frame.get("client_id")
        if not isinstance(to, str) or not isinstance(body, str):
            outbox.put(json.dumps({"type": "error", "code": "invalid_field",
                                   "detail": "to and body must be strings.", "client_id": client_id}))
            return
        peer = to.lower()
        if peer not in self.users:
            outbox.put(json.dumps({"type": "error", "code": "unknown_user",
                                   "detail": "No such user.", "client_id": client_id}))
            return
        message = {"id": self.next_message_id, "from": self.users[key]["username"],
                   "to": self.users[peer]["username"], "body": body,
                   "sent_at": now_iso(), "client_id": client_id,
                   "edited_at": None, "deleted": False, "reply_to": None}
        self.next_message_id += 1
        conversation, new = self.conversation(key, peer)
        conversation.last = message
        conversation.received.setdefault(peer, []).append(message["id"])
        self.conversations[key].move_to_end(peer)
        self.conversations[peer].move_to_end(key)
        outbox.put(json.dumps({"type": "ack", "client_id": client_id, "message": message}))
        if new and peer != key:  # now partners: each learns the other's status
            self.to_user(key, self.presence_frame(peer))
            self.to_user(peer, self.presence_frame(key))
        text = json.dumps(message)
        for person in (key, peer) if peer != key else (key,):
            self.to_user(person, f'{{"type": "message", "seq": {self.next_seq(person)}, "message": {text}}}')

    def read(self, key: str, frame: dict, outbox: Outbox) -> None:
        peer, up_to = frame.get("with"), frame.get("up_to")
        if not isinstance(peer, str) or not isinstance(up_to, int) or isinstance(up_to, bool):
            outbox.put(json.dumps({"type": "error", "code": "invalid_field",
                                   "detail": "with must be a string and up_to an integer."}))
            return
        conversation = self.conversations.get(key, {}).get(peer.lower())
        if conversation is None or conversation.last is None:
            return
        cursor = min(up_to, conversation.last["id"])
        if cursor <= conversation.read.get(key, 0):
            return
        conversation.read[key] = cursor
        reader, other = self.users[key]["username"], self.users[peer.lower()]["username"]
        people = (key, peer.lower()) if peer.lower() != key else (key,)
        for person in people:
            self.to_user(person, json.dumps({"type": "read", "seq": self.next_seq(person), "reader": reader,
                                             "with": other, "up_to": cursor}))

    def conversation_list(self, key: str, before: int | None, limit: int) -> dict:
        listed = []
        for peer, conversation in reversed(self.conversations.get(key, {}).items()):
            if before is not None and conversation.last["id"] >= before:
                continue
            if len(listed) == limit:
                return {"conversations": listed, "has_more": True}
            listed.append({"user": self.public(peer), "status": self.status(peer),
                           "last_seen": self.last_seen.get(peer), "unread": conversation.unread(key),
                           "last_message": conversation.last,
                           "read_up_to": {self.users[key]["username"]: conversation.read.get(key, 0),
                                          self.users[peer]["username"]: conversation.read.get(peer, 0)}})
        return {"conversations": listed, "has_more": False}

    def directory(self, me: str, prefix: str, after: str | None, limit: int) -> dict:
        start = bisect.bisect_left(self.keys, prefix)
        if after is not None:
            start = max(start, bisect.bisect_right(self.keys, after.lower()))
        listed = []
        for key in self.keys[start:start + limit + 2]:  # at most me and one more beyond the page
            if not key.startswith(prefix):
                break
            if key == me:
                continue
            if len(listed) == limit:
                return {"users": listed, "has_more": True}
            listed.append({**self.public(key), "status": self.status(key), "last_seen": self.last_seen.get(key)})
        return {"users": listed, "has_more": False}


relay = Relay()


async def credentials(request: Request) -> tuple[str, str] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    username, password = body.get("username"), body.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        return None
    return username, password


async def register(request: Request) -> Response:
    given = await credentials(request)
    if given is None:
        return error(400, "bad_request", "Send a JSON object with username and password.")
    key = relay.add_user(*given)
    if key is None:
        return error(409, "username_taken", "That username is taken.")
    return relay.sign_in(key, 201)


async def login(request: Request) -> Response:
    given = await credentials(request)
    if given is None:
        return error(400, "bad_request", "Send a JSON object with username and password.")
    username, password = given
    user = relay.users.get(username.lower())
    if user is None or not secrets.compare_digest(user["password"], password):
        return error(401, "bad_credentials", "Wrong username or password.")
    return relay.sign_in(username.lower(), 200)


def signed_in(request: Request) -> str | None:
    return relay.sessions.get(request.cookies.get(COOKIE, ""))


async def conversations(request: Request) -> Response:
    me = signed_in(request)
    if me is None:
        return error(401, "not_authenticated", "Sign in first.")
    try:
        before = whole(request.query_params.get("before"), None)
        limit = min(whole(request.query_params.get("limit"), 50), 200)
    except ValueError:
        return error(400, "bad_request", "before and limit must be whole numbers.")
    if limit < 1:
        return error(400, "bad_request", "limit must be at least 1.")
    return JSONResponse(relay.conversation_list(me, before, limit))


async def users(request: Request) -> Response:
    me = signed_in(request)
    if me is None:
        return error(401, "not_authenticated", "Sign in first.")
    q = request.query_params.get("q", "")
    try:
        limit = min(whole(request.query_params.get("limit"), 20), 100)
    except ValueError:
        return error(400, "bad_request", "limit must be a whole number.")
    if not 1 <= len(q) <= 32 or limit < 1:
        return error(400, "bad_request", "q must have 1 to 32 characters, and limit be at least 1.")
    return JSONResponse(relay.directory(me, q.lower(), request.query_params.get("after"), limit))


async def add_users(request: Request) -> Response:
    """Not in the contract: the benchmark's bulk load of the directory."""
    body = await request.json()
    return JSONResponse({"added": relay.add_users(body["usernames"])})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok", "checks": {"database": "ok", "broadcast": "ok"}})


async def chat_socket(websocket: WebSocket) -> None:
    key = relay.sessions.get(websocket.cookies.get(COOKIE, ""))
    if key is None:
        await websocket.close()  # before accept: HTTP 403
        return
    await websocket.accept()
    outbox = Outbox(websocket)
    relay.open_socket(key, outbox)
    try:
        async for text in websocket.iter_text():  # ends when the client leaves
            handle_frame(key, text, outbox)
    finally:
        relay.close_socket(key, outbox)


def handle_frame(key: str, text: str, outbox: Outbox) -> None:
    try:
        frame = json.loads(text)
    except ValueError:
        frame = None
    if not isinstance(frame, dict):
        outbox.put(json.dumps({"type": "error", "code": "bad_json", "detail": "Send a JSON object."}))
    elif frame.get("type") == "send":
        relay.send(key, frame, outbox)
    elif frame.get("type") == "read":
        relay.read(key, frame, outbox)
    elif frame.get("type") == "ping":
        outbox.put('{"type": "pong"}')
    else:
        outbox.put(json.dumps({"type": "error", "code": "unknown_type", "detail": "Unknown frame type."}))


app = Starlette(routes=[
    Route("/api/register", register, methods=["POST"]),
    Route("/api/login", login, methods=["POST"]),
    Route("/api/conversations", conversations, methods=["GET"]),
    Route("/api/users", users, methods=["GET"]),
    Route("/bench/users", add_users, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
    WebSocketRoute("/ws", chat_socket),
])
