"""The ChatX contract as seen by a scripted client: HTTP sign-up/sign-in and /ws.

Nothing here depends on how a server is built, so the load generator drives
ChatX, the bare relay, or any other server that speaks the contract.
"""

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx
import orjson
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.uri import parse_uri

PASSWORD = "bench-password-0123"

FrameHandler = Callable[["Socket", dict, float], None]
STREAM_FRAMES = frozenset({"message", "read", "edit", "delete"})  # frames numbered in the stream (v2)


@dataclass
class User:
    username: str
    cookie: str = ""  # the Cookie header value that signs this user in


def http_client(base_url: str) -> httpx.AsyncClient:
    """A client that keeps no cookies, so concurrent sign-ins never mix sessions."""
    jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return httpx.AsyncClient(base_url=base_url, cookies=httpx.Cookies(jar), trust_env=False,
                             timeout=120, limits=httpx.Limits(max_connections=64))


def cookie_header(response: httpx.Response) -> str:
    pairs = [value.split(";", 1)[0].strip() for value in response.headers.get_list("set-cookie")]
    return "; ".join(pair for pair in pairs if pair)


BUSY_RETRIES = 200  # answers 503 busy / 429 rate_limited taken before giving up


async def post_credentials(http: httpx.AsyncClient, path: str, username: str) -> httpx.Response:
    """POST username and password, waiting out 503 `busy` and 429 `rate_limited`
    (v2 bounds the password hashes it queues) as a client would: Retry-After,
    capped at 2 s. `http.busy_retries` counts the waits."""
    for _ in range(BUSY_RETRIES):
        response = await http.post(path, json={"username": username, "password": PASSWORD})
        if response.status_code not in (429, 503):
            return response
        http.busy_retries = getattr(http, "busy_retries", 0) + 1
        try:
            wait = float(response.headers.get("retry-after", "0.2"))
        except ValueError:
            wait = 0.2
        await asyncio.sleep(min(max(wait, 0.05), 2.0))
    return response


async def register(http: httpx.AsyncClient, username: str) -> User:
    response = await post_credentials(http, "/api/register", username)
    if response.status_code != 201:
        raise RuntimeError(f"register {username}: HTTP {response.status_code} {response.text[:200]}")
    return User(username, cookie_header(response))


async def login(http: httpx.AsyncClient, user: User) -> None:
    response = await post_credentials(http, "/api/login", user.username)
    if response.status_code != 200:
        raise RuntimeError(f"login {user.username}: HTTP {response.status_code} {response.text[:200]}")
    user.cookie = cookie_header(response) or user.cookie


async def get_json(http: httpx.AsyncClient, viewer: User, path: str, **params) -> dict:
    response = await http.get(path, params=params, headers={"Cookie": viewer.cookie})
    if response.status_code != 200:
        raise RuntimeError(f"GET {path} {params}: HTTP {response.status_code} {response.text[:200]}")
    return response.json()


async def search_all(http: httpx.AsyncClient, viewer: User, q: str) -> list[dict]:
    """Every directory entry (GET /api/users?q=, v2) whose username starts with `q`,
    page after page; the viewer is never listed."""
    found: list[dict] = []
    params = {"q": q, "limit": 100}
    while True:
        page = await get_json(http, viewer, "/api/users", **params)
        found.extend(page["users"])
        if not page.get("has_more") or not page["users"]:
            return found
        params["after"] = page["users"][-1]["username"]


async def statuses(http: httpx.AsyncClient, viewer: User, q: str) -> dict[str, str | None]:
    """username -> "online"/"offline" (None where `viewer` is no partner) for every user but `viewer`
    whose name starts with `q`."""
    return {entry["username"]: entry["status"] for entry in await search_all(http, viewer, q)}


class Socket(asyncio.Protocol):
    """One signed-in /ws connection whose frames go to a handler as they arrive.

    The handler is called as handler(socket, frame, perf_counter_time) for every
    frame after hello; `hello` holds the first frame. Built on websockets'
    Sans-I/O protocol and called straight from the transport: the asyncio client
    woke a task per frame, which left the load generator, not the server, the
    limit of the presence storm.
    """

    def __init__(self, user: User, handler: FrameHandler | None = None) -> None:
        self.user = user
        self.handler = handler
        self.connection: asyncio.Transport | None = None
        self.protocol: ClientProtocol | None = None
        self.hello: dict | None = None
        self.hello_at = 0.0
        self.frames = 0
        self.seq: int | None = None  # the newest seq of the user's stream seen on this socket
        self.seq_errors = 0  # stream frames whose seq was not the one after the last (gap, repeat, order)
        self.seq_absent = 0  # stream frames without a seq (a v1 server)
        self.close_code: int | None = None
        self.fragments: list[bytes] = []
        self.early: list[dict] | None = []  # frames after hello, held until open() has returned
        self.first: asyncio.Future | None = None
        self.lost: asyncio.Future | None = None
        self.writable: asyncio.Future | None = None

    async def open(self, ws_url: str, timeout: float = 30.0) -> None:
        """Connect and wait for the hello frame; raise if it does not come first."""
        loop = asyncio.get_running_loop()
        uri = parse_uri(ws_url)
        self.protocol = ClientProtocol(uri, max_size=2 ** 20)
        request = self.protocol.connect()
        request.headers["Cookie"] = self.user.cookie
        self.protocol.send_request(request)
        self.first, self.lost = loop.create_future(), loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(lambda: self, uri.host, uri.port)
                first = await self.first
        except BaseException:
            if self.connection is not None:
                self.connection.abort()
            raise
        if first.get("type") != "hello":
            raise RuntimeError(f"first frame for {self.user.username} was {first.get('type')!r}, not hello")
        self.hello, self.hello_at = first, time.perf_counter()
        self.seq = first.get("seq")
        # As with a reader task started here: the caller's code after `await open()`
        # sees hello before any later frame reaches the handler.
        loop.call_soon(self.release_early)

    def release_early(self) -> None:
        early, self.early = self.early, None
        for message in early:
            self.deliver(message)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connection = transport
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                self.on_frame(event)
            elif self.protocol.handshake_exc is not None:
                self.fail(self.protocol.handshake_exc)
        self.flush()

    def on_frame(self, frame: Frame) -> None:
        if frame.opcode not in (Opcode.TEXT, Opcode.CONT):
            if frame.opcode is Opcode.CLOSE:
                self.close_code = Close.parse(frame.data).code
                self.flush()  # the close reply, before the transport closes
                self.connection.close()
            return
        if not frame.fin:
            self.fragments.append(frame.data)
            return
        data = b"".join([*self.fragments, frame.data]) if self.fragments else frame.data
        self.fragments = []
        message = orjson.loads(data)
        if not self.first.done():
            self.first.set_result(message)
        elif self.early is not None:
            self.early.append(message)
        else:
            self.deliver(message)

    def deliver(self, message: dict) -> None:
        self.frames += 1
        if message.get("type") in STREAM_FRAMES:
            self.check_seq(message.get("seq"))
        if self.handler is not None:
            self.handler(self, message, time.perf_counter())

    def check_seq(self, seq: int | None) -> None:
        """v2: a socket gets its user's stream live in seq order, each event once,
        starting just after hello's seq."""
        if seq is None:
            self.seq_absent += 1
            return
        if self.seq is not None and seq != self.seq + 1:
            self.seq_errors += 1
        self.seq = seq if self.seq is None else max(self.seq, seq)

    def flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data and not self.connection.is_closing():
                self.connection.write(data)

    def fail(self, exc: BaseException) -> None:
        if not self.first.done():
            self.first.set_exception(exc)
        self.connection.close()

    def eof_received(self) -> None:
        self.protocol.receive_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_code is None:
            self.close_code = 1006  # no close frame came
        if not self.first.done():
            self.first.set_exception(exc or ConnectionError("closed before hello"))
        if not self.lost.done():
            self.lost.set_result(None)
        self.resume_writing()

    def pause_writing(self) -> None:
        self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    async def send(self, frame: dict) -> None:
        if self.writable is not None:
            await self.writable
        if self.closed:
            raise ConnectionError(f"socket of {self.user.username} is closed")
        self.protocol.send_text(orjson.dumps(frame))
        self.flush()

    @property
    def closed(self) -> bool:
        return self.lost is not None and self.lost.done()

    async def close(self) -> None:
        if self.connection is None or self.closed:
            return
        self.protocol.send_close(1000)
        self.flush()
        try:
            await asyncio.wait_for(asyncio.shield(self.lost), 5)
        except TimeoutError:
            self.connection.abort()
