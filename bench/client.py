"""The ChatX contract as seen by a scripted client: HTTP sign-up/sign-in and /ws.

Nothing here depends on how a server is built, so the load generator drives
ChatX, the bare relay, or any other server that speaks the contract.
"""

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

PASSWORD = "bench-password-0123"

FrameHandler = Callable[["Socket", dict, float], None]


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


async def register(http: httpx.AsyncClient, username: str) -> User:
    response = await http.post("/api/register", json={"username": username, "password": PASSWORD})
    if response.status_code != 201:
        raise RuntimeError(f"register {username}: HTTP {response.status_code} {response.text[:200]}")
    return User(username, cookie_header(response))


async def login(http: httpx.AsyncClient, user: User) -> None:
    response = await http.post("/api/login", json={"username": user.username, "password": PASSWORD})
    if response.status_code != 200:
        raise RuntimeError(f"login {user.username}: HTTP {response.status_code} {response.text[:200]}")
    user.cookie = cookie_header(response) or user.cookie


async def statuses(http: httpx.AsyncClient, viewer: User) -> dict[str, str]:
    """username -> "online"/"offline" for every user but `viewer` (GET /api/users)."""
    response = await http.get("/api/users", headers={"Cookie": viewer.cookie})
    response.raise_for_status()
    return {entry["username"]: entry["status"] for entry in response.json()["users"]}


class Socket:
    """One signed-in /ws connection whose frames go to a handler as they arrive.

    The handler is called as handler(socket, frame, perf_counter_time) for every
    frame after hello; `hello` holds the first frame.
    """

    def __init__(self, user: User, handler: FrameHandler | None = None) -> None:
        self.user = user
        self.handler = handler
        self.connection: ClientConnection | None = None
        self.hello: dict | None = None
        self.hello_at = 0.0
        self.frames = 0
        self.close_code: int | None = None
        self.reader: asyncio.Task | None = None

    async def open(self, ws_url: str, timeout: float = 30.0) -> None:
        """Connect and wait for the hello frame; raise if it does not come first."""
        self.connection = await connect(
            ws_url, additional_headers={"Cookie": self.user.cookie}, compression=None,
            proxy=None, ping_interval=None, open_timeout=timeout, close_timeout=5,
            max_size=2 ** 20)
        first = json.loads(await asyncio.wait_for(self.connection.recv(), timeout))
        if first.get("type") != "hello":
            raise RuntimeError(f"first frame for {self.user.username} was {first.get('type')!r}, not hello")
        self.hello, self.hello_at = first, time.perf_counter()
        self.reader = asyncio.create_task(self.read_all())

    async def read_all(self) -> None:
        try:
            async for raw in self.connection:
                self.frames += 1
                if self.handler is not None:
                    self.handler(self, json.loads(raw), time.perf_counter())
        except ConnectionClosed:
            pass
        self.close_code = self.connection.close_code

    async def send(self, frame: dict) -> None:
        await self.connection.send(json.dumps(frame))

    @property
    def closed(self) -> bool:
        return self.reader is not None and self.reader.done()

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
        if self.reader is not None:
            await self.reader
