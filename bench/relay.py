"""Bare relay: the ceiling that ChatX's benchmark numbers are divided by.

It answers the same HTTP calls and WebSocket frames as ChatX (register, login,
users, hello, send -> ack + message to every socket of both people, presence,
ping/pong) from memory: no database, no broker and no password hashing (the
password is kept as given). Sessions are random tokens in a cookie, so the load
generator treats the relay and ChatX alike. Error handling is limited to what
keeps a well-behaved client working.

Each socket has an outbox (a queue drained by one writer task) so that the
hello frame always goes out before any presence or message frame, as in ChatX.

Run: python -m uvicorn bench.relay:app --ws-per-message-deflate false
"""

import asyncio
import json
import secrets
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


class Relay:
    """Users, sessions and open sockets, all in memory."""

    def __init__(self) -> None:
        self.users: dict[str, dict] = {}  # key: username.casefold()
        self.sessions: dict[str, str] = {}  # token -> user key
        self.outboxes: dict[str, set[Outbox]] = {}  # user key -> open sockets
        self.last_seen: dict[str, str] = {}
        self.next_message_id = 1

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

    def to_everyone_but(self, key: str, text: str) -> None:
        for other, outboxes in self.outboxes.items():
            if other != key:
                for outbox in outboxes:
                    outbox.put(text)

    def to_user(self, key: str, text: str) -> None:
        for outbox in self.outboxes.get(key, ()):
            outbox.put(text)

    def presence(self, key: str) -> dict:
        return {
            "username": self.users[key]["username"],
            "status": self.status(key),
            "last_seen": self.last_seen.get(key),
        }

    def open_socket(self, key: str, outbox: Outbox) -> None:
        """Queue the hello frame and make the socket reachable, with no await
        in between, so no presence or message frame can slip in before hello."""
        online = [self.presence(k) for k, boxes in self.outboxes.items() if boxes and k != key]
        outbox.put(json.dumps({"type": "hello", "user": self.public(key), "presence": online}))
        first = not self.outboxes.get(key)
        self.outboxes.setdefault(key, set()).add(outbox)
        if first:
            self.to_everyone_but(key, json.dumps({"type": "presence", **self.presence(key)}))

    def close_socket(self, key: str, outbox: Outbox) -> None:
        outbox.writer.cancel()
        self.outboxes[key].discard(outbox)
        if not self.outboxes[key]:
            del self.outboxes[key]
            self.last_seen[key] = now_iso()
            self.to_everyone_but(key, json.dumps({"type": "presence", **self.presence(key)}))

    def send(self, key: str, frame: dict, outbox: Outbox) -> None:
        to, body = frame.get("to"), frame.get("body")
        client_id = frame.get("client_id")
        if not isinstance(to, str) or not isinstance(body, str):
            outbox.put(json.dumps({"type": "error", "code": "invalid_field",
                                   "detail": "to and body must be strings.", "client_id": client_id}))
            return
        peer = to.casefold()
        if peer not in self.users:
            outbox.put(json.dumps({"type": "error", "code": "unknown_user",
                                   "detail": "No such user.", "client_id": client_id}))
            return
        message = {"id": self.next_message_id, "from": self.users[key]["username"],
                   "to": self.users[peer]["username"], "body": body,
                   "sent_at": now_iso(), "client_id": client_id}
        self.next_message_id += 1
        outbox.put(json.dumps({"type": "ack", "client_id": client_id, "message": message}))
        text = json.dumps({"type": "message", "message": message})
        self.to_user(key, text)
        if peer != key:
            self.to_user(peer, text)


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
    username, password = given
    key = username.casefold()
    if key in relay.users:
        return error(409, "username_taken", "That username is taken.")
    relay.users[key] = {"id": len(relay.users) + 1, "username": username, "password": password}
    return relay.sign_in(key, 201)


async def login(request: Request) -> Response:
    given = await credentials(request)
    if given is None:
        return error(400, "bad_request", "Send a JSON object with username and password.")
    username, password = given
    user = relay.users.get(username.casefold())
    if user is None or not secrets.compare_digest(user["password"], password):
        return error(401, "bad_credentials", "Wrong username or password.")
    return relay.sign_in(username.casefold(), 200)


async def users(request: Request) -> Response:
    me = relay.sessions.get(request.cookies.get(COOKIE, ""))
    if me is None:
        return error(401, "not_authenticated", "Sign in first.")
    listed = [
        {**relay.public(key), "status": relay.status(key),
         "last_seen": relay.last_seen.get(key), "unread": 0}
        for key in sorted(relay.users, key=lambda k: relay.users[k]["username"])
        if key != me
    ]
    return JSONResponse({"users": listed})


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
    elif frame.get("type") == "ping":
        outbox.put('{"type": "pong"}')
    else:
        outbox.put(json.dumps({"type": "error", "code": "unknown_type", "detail": "Unknown frame type."}))


app = Starlette(routes=[
    Route("/api/register", register, methods=["POST"]),
    Route("/api/login", login, methods=["POST"]),
    Route("/api/users", users, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    WebSocketRoute("/ws", chat_socket),
])
