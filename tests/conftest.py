"""Fixtures: ChatX apps in-process (TestClient) and as real uvicorn processes,
on a real SQLite file, a real PostgreSQL database and real Redis servers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import resource
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import asyncpg
import httpx2 as httpx
import pytest
from starlette.testclient import TestClient
from websockets.sync.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import chatx  # noqa: E402

PASSWORD = "correct horse battery"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"

# Tests send one way far more than a person would to someone who never
# answered: the first-contact budget is off unless a test sets it (in-process
# apps and uvicorn processes alike read it from the environment).
os.environ.setdefault("CHATX_FIRST_CONTACTS_PER_SENDER", "0")
os.environ.setdefault("CHATX_FIRST_CONTACTS_PER_RECIPIENT", "0")


# ---- the fast lane -------------------------------------------------------------------

# Areas that start browsers, nginx, faults or package builds, tests that start
# a cluster of uvicorn processes, and tests that wait out long timeouts or run
# the command line: `make test-fast` (pytest -m "not slow") leaves them out;
# `make test` runs everything.
SLOW_AREAS = {"test_browser.py", "test_deploy.py", "test_faults.py", "test_packaging.py"}
SLOW_FIXTURES = {"browser", "cluster"}
SLOW_TESTS = {
    # uvicorn processes waiting out ChatX's fixed deadlines
    "test_slow_headers_idle_connections_and_slow_bodies_are_cut_off",  # the head and body deadlines
    "test_trickled_requests_are_cut_off_and_a_real_user_is_served_under_a_low_open_file_limit",  # the same
    "test_http_clients_that_do_not_read_their_responses_hold_bounded_memory_and_are_cut_off",  # the response stall
    "test_readers_that_stop_reading_hold_a_bounded_backlog_and_are_closed_with_1013_after_10_s",  # the send stall
    "test_a_socket_that_stops_answering_pings_is_closed_by_chatx_with_1013_before_the_server_s_1011",  # pings
    # floods that take both cores for seconds: many real password hashes at once, eight readers at full speed
    "test_a_heavy_reader_gets_429_while_a_person_using_the_page_normally_never_notices",
    "test_a_real_sign_in_stays_fast_while_50_bad_ones_are_in_flight",
    "test_a_real_sign_in_gets_a_hash_while_ten_addresses_flood_sign_up",
    "test_the_command_line_refuses_bad_input_with_a_clear_error_and_status_1",
    "test_the_command_line_creates_resets_and_deletes_accounts_while_a_server_runs",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if (item.path.name in SLOW_AREAS or SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
                or getattr(item, "originalname", None) in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(tryfirst=True)  # before pytest reads the parametrize marks
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked `validation` proves what bad input gets, which does not
    depend on the database: `database_url` gives it SQLite alone."""
    if "database_url" in metafunc.fixturenames and metafunc.definition.get_closest_marker("validation"):
        metafunc.definition.add_marker(pytest.mark.parametrize("database_url", ["sqlite"], indirect=True))


# ---- in-process apps ------------------------------------------------------------


class Person:
    """A signed-in user of an in-process app: their cookie goes on every call."""

    def __init__(self, client: TestClient, username: str, cookie: str, user_id: int) -> None:
        self.client, self.username, self.cookie, self.id = client, username, cookie, user_id

    @property
    def headers(self) -> dict[str, str]:
        return {"cookie": f"{chatx.SESSION_COOKIE}={self.cookie}"}

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, headers={**self.headers, **kwargs.pop("headers", {})}, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.post(path, headers={**self.headers, **kwargs.pop("headers", {})}, **kwargs)

    def put(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.put(path, headers={**self.headers, **kwargs.pop("headers", {})}, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.delete(path, headers={**self.headers, **kwargs.pop("headers", {})}, **kwargs)

    def ws(self, after: int | None = None, headers: dict[str, str] | None = None, prefix: str = "",
           since: int | None = None):
        """A socket of this person: `since=S` resumes the stream above seq S, `after=N` (v1) the messages above id N."""
        path = f"{prefix}/ws{ws_query(after=after, since=since)}"
        return self.client.websocket_connect(path, headers={**self.headers, **(headers or {})})


def ws_query(**cursors: Any) -> str:
    """`?since=S&after=N` for the cursors given (None: left out)."""
    given = [f"{name}={value}" for name, value in cursors.items() if value is not None]
    return "?" + "&".join(given) if given else ""


def sign_up(client: TestClient, username: str, prefix: str = "") -> Person:
    client.cookies.clear()
    response = client.post(f"{prefix}/api/register", json={"username": username, "password": PASSWORD})
    assert response.status_code == 201, response.text
    cookie = response.cookies[chatx.SESSION_COOKIE]
    client.cookies.clear()
    return Person(client, username, cookie, response.json()["user"]["id"])


def delete_me(person_or_client, password: str | None) -> Any:
    """DELETE /api/me with a JSON body (httpx's delete() takes none)."""
    client = getattr(person_or_client, "client", person_or_client)
    headers = getattr(person_or_client, "headers", {})
    return client.request("DELETE", "/api/me", headers=headers,
                          **({} if password is None else {"json": {"password": password}}))


def login(client: TestClient, username: str, password: str = PASSWORD, cookie: str | None = None) -> httpx.Response:
    """POST /api/login, from a browser holding `cookie` if given; the client keeps no cookie."""
    client.cookies.clear()
    headers = {} if cookie is None else {"cookie": f"{chatx.SESSION_COOKIE}={cookie}"}
    response = client.post("/api/login", json={"username": username, "password": password}, headers=headers)
    client.cookies.clear()
    return response


def sign_in(client: TestClient, username: str) -> Person:
    """A new session of a user who has signed up (from another browser)."""
    response = login(client, username)
    assert response.status_code == 200, response.text
    return Person(client, username, response.cookies[chatx.SESSION_COOKIE], response.json()["user"]["id"])


def history(person: Person, peer: str, **query: Any) -> dict[str, Any]:
    response = person.get(f"/api/conversations/{peer}/messages", params=query)
    assert response.status_code == 200, response.text
    return response.json()


def directory(person: Person, **query: Any) -> dict[str, Any]:
    response = person.get("/api/users", params=query)
    assert response.status_code == 200, response.text
    return response.json()


def run_job(client: TestClient, job: Any, *args: Any) -> Any:
    """Run a write job (`job(connection, *args)`) on an in-process app's own
    writer, from the test thread; its result once committed."""
    storage = client.app.state.chat.storage

    async def write() -> Any:
        return await storage.write(job, *args)

    return client.portal.call(write)


async def store_message(storage: Any, sender: Any, recipient: Any, body: str) -> dict[str, Any]:
    result = await storage.write_bulk(chatx.insert_messages, chatx.NewMessage(sender, recipient, body, None, None))
    assert isinstance(result, chatx.Stored), result
    return result.message


def make_partners(a: Any, b: Any, body: str = "hello, partner", server: ChatServer | None = None) -> dict[str, Any]:
    """Make a and b conversation partners (v2: presence goes only to partners)
    by storing one message from a to b, straight through the server's write
    job: no socket opens or closes, so no presence changes on the way. Both
    in-process Persons (the app's own writer) and Remotes of a `cluster`
    (pass one of its servers: a writer of the test's own on the shared
    database, whose write transactions the servers' are serialised with).
    Call it before opening sockets of the two: it delivers no frame. Returns
    the stored message."""
    assert a.id is not None and b.id is not None, "make_partners needs both user ids (remote_sign_up gives them)"
    sender, recipient = chatx.User(a.id, a.username), chatx.User(b.id, b.username)
    if server is None:
        storage = a.client.app.state.chat.storage
        return a.client.portal.call(store_message, storage, sender, recipient, body)

    async def on_shared_database() -> dict[str, Any]:
        storage = chatx.Storage(server.env["CHATX_DATABASE_URL"])
        await storage.start(chatx.migrate)
        try:
            return await store_message(storage, sender, recipient, body)
        finally:
            await storage.stop()

    return run_async(on_shared_database)


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


@pytest.fixture(autouse=True)
def cheap_hashes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process apps hash with scrypt at N=2^10 (the stored hash names its
    parameters, so checking follows), which on a loaded two-core machine is
    the difference between seconds and minutes; a test about the cost of a
    hash is marked `real_hashes`. Servers run as subprocesses hash for real."""
    if request.node.get_closest_marker("real_hashes"):
        return

    def cheap(password: str, salt: bytes | None = None) -> str:
        salt = salt or secrets.token_bytes(16)
        digest = hashlib.scrypt(password.encode(), salt=salt, n=2**10, r=8, p=1)
        return f"scrypt$1024$8$1${salt.hex()}${digest.hex()}"

    monkeypatch.setattr(chatx, "hash_password", cheap)
    monkeypatch.setattr(chatx, "DUMMY_HASH", "scrypt$1024$8$1$" + "00" * 16 + "$" + "00" * 64)


def acked(ws: Any, to: str, body: str, client_id: str,
          others: tuple[str, ...] = ("message", "read", "edit", "delete")) -> dict[str, Any]:
    """Send; return the ack's message once the socket's own copy of it came
    too. Frames of the types in `others` may come between."""
    ws.send_json({"type": "send", "to": to, "body": body, "client_id": client_id})
    ack = copy = None
    while ack is None or copy is None:
        frame = next_frame(ws)
        if frame["type"] == "ack":
            assert frame["client_id"] == client_id, frame
            ack = frame["message"]
        else:
            assert frame["type"] in others, frame
            if frame["type"] == "message" and frame["message"]["client_id"] == client_id:
                copy = frame["message"]
    return ack


def next_frame(ws: Any, kind: str | None = None) -> dict[str, Any]:
    """The next frame, skipping presence frames unless asked for by kind."""
    while True:
        frame = ws.receive_json()
        if kind is None and frame["type"] == "presence":
            continue
        if kind is None or frame["type"] == kind:
            return frame
        if frame["type"] != "presence":
            raise AssertionError(f"expected a {kind} frame, got {frame}")


def ack_and_copy(ws: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """After a new send: its ack and the sending socket's own message frame,
    which docs/protocol.md lets come in either order."""
    ack, copy = sorted((next_frame(ws), next_frame(ws)), key=lambda frame: frame["type"] != "ack")
    assert ack["type"] == "ack" and copy["type"] == "message" and copy["message"] == ack["message"], (ack, copy)
    return ack, copy


def quiet(ws: Any) -> list[dict[str, Any]]:
    """Everything the socket receives before the answer to a ping: proof that
    nothing else is on its way (frames to one socket arrive in order)."""
    ws.send_json({"type": "ping"})
    frames = []
    while (frame := ws.receive_json())["type"] != "pong":
        frames.append(frame)
    return frames


def settle(*sockets: Any) -> None:
    """Wait until every broadcast already published has reached these sockets."""
    for ws in sockets:
        quiet(ws)


def silent(ws: Any) -> list[dict[str, Any]]:
    """What reaches the socket before a pong, presence frames aside (a first message makes partners)."""
    return [frame for frame in quiet(ws) if frame["type"] != "presence"]


def hello_of(ws: Any) -> dict[str, Any]:
    hello = ws.receive_json()
    assert hello["type"] == "hello", hello
    return hello


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'chat.db'}"


def run_async(coroutine_function, *args: Any) -> Any:
    """Run a coroutine to completion on a thread of its own: the main thread may
    already run an event loop (Playwright's sync API leaves one there)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine_function(*args)).result()


def postgres_answers() -> bool:
    async def probe() -> None:
        connection = await asyncpg.connect(PG_ADMIN, timeout=3)
        await connection.close()

    try:
        run_async(probe)
        return True
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError):
        return False


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test, dropped afterwards."""
    if not postgres_answers():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL does not answer at 127.0.0.1:5432, and CI must run the PostgreSQL tests")
        pytest.skip("PostgreSQL does not answer at 127.0.0.1:5432")
    name = f"chatx_test_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(PG_ADMIN)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    run_async(admin, f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        run_async(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class RowLock:
    """A user's row of chatx_users locked (SELECT … FOR UPDATE in an open
    transaction) by a connection of the test's own, as a write transaction
    of that user holds it; on an event loop in a thread of its own."""

    def __init__(self, database_url: str, user_id: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.connection = self.call(asyncpg.connect(database_url))
        self.call(self.connection.execute("BEGIN"))
        self.call(self.connection.execute("SELECT FROM chatx_users WHERE id = $1 FOR UPDATE", user_id))

    def call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def lock_waiters(self) -> int:
        """Other connections of this database waiting for a lock now."""
        return self.call(self.connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"))

    def release(self) -> None:
        if self.thread.is_alive():
            self.call(self.connection.close())  # ends the transaction: the row is free
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()


@contextmanager
def user_row_locked(database_url: str, user_id: int) -> Iterator[RowLock]:
    lock = RowLock(database_url, user_id)
    try:
        yield lock
    finally:
        lock.release()


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_database(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Settings for a cluster: its default SQLite file, or a fresh PostgreSQL
    database (requested before `cluster`, so dropped after its processes stop)."""
    if request.param == "sqlite":
        yield {}
    else:
        with fresh_postgres_database() as url:
            yield {"CHATX_DATABASE_URL": url}


@pytest.fixture
def shared_postgres() -> Iterator[dict[str, str]]:
    """Settings for a cluster on a fresh PostgreSQL database (request it before
    `cluster`, so that it is dropped after the processes stop)."""
    with fresh_postgres_database() as url:
        yield {"CHATX_DATABASE_URL": url}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test that takes this runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'chat.db'}"
    else:
        with fresh_postgres_database() as url:
            yield url


@pytest.fixture
def make_client(sqlite_url: str):
    """Build and start in-process apps; settings default to a fresh SQLite file."""
    clients: list[TestClient] = []

    def make(client_address: tuple[str, int] = ("testclient", 50000), **settings: Any) -> TestClient:
        settings.setdefault("database_url", sqlite_url)
        client = TestClient(chatx.create_app(**settings), client=client_address)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in reversed(clients):
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


# ---- real processes ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition, timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class RedisServer:
    """A redis-server of the test's own, on a free port, that can be stopped and restarted."""

    options: tuple[str, ...] = ()  # more of redis-server's command line

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), *self.options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self.answers, what="redis-server to answer")

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


class ChatServer:
    """ChatX under a real uvicorn process, started as `make run` starts it
    (`python -m chatx serve`: chatx.SERVE_OPTIONS are its uvicorn options); or
    another ASGI app (`app`, a module in `workdir`), ready when `ready` answers 200."""

    def __init__(self, env: dict[str, str], workdir: Path, port: int | None = None, app: str = "chatx:app",
                 ready: str = "/healthz", serve_args: tuple[str, ...] = ()) -> None:
        self.app, self.ready, self.serve_args = app, ready, serve_args
        self.port = port or free_port()
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        self.workdir = workdir
        self.process: subprocess.Popen | None = None
        self.log = workdir / f"uvicorn-{self.port}.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.launch()
        wait_until(self.healthy, timeout=30, what=f"uvicorn on port {self.port} (log: {self.log})")

    def launch(self) -> None:
        """Start the process without waiting for it to be healthy."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "chatx", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 *self.serve_args]
                if self.app == "chatx:app" else
                [sys.executable, "-m", "uvicorn", self.app, "--host", "127.0.0.1", "--port", str(self.port),
                 "--ws-max-size", "65536", "--ws-per-message-deflate", "false"],
                cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )

    def healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"server exited: {self.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.base}{self.ready}", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def health(self) -> tuple[int, dict[str, Any]]:
        response = httpx.get(f"{self.base}/healthz", timeout=3)
        return response.status_code, response.json()

    def metric(self, sample: str) -> float:
        """The sum of the /metrics lines that start with `sample` (CHATX_METRICS must be on)."""
        text = httpx.get(f"{self.base}/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def make_run_command(port: int) -> list[str]:
    """The uvicorn command line of `make run`, read from the Makefile, on `port`."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nrun:", 1)[1].split("\n", 1)[1]
    lines = []
    for line in recipe.splitlines():
        lines.append(line.strip().rstrip("\\"))
        if not line.endswith("\\"):
            break
    command = " ".join(lines).replace("$(PY)", sys.executable).replace("$(PORT)", str(port))
    return shlex.split(command)


class DocumentedServer(ChatServer):
    """ChatX as `make run` starts it (the Makefile's own command line), under
    an optional limit on open files (`ulimit -n`)."""

    def __init__(self, env: dict[str, str], workdir: Path, open_files: int | None = None) -> None:
        super().__init__(env, workdir)
        self.open_files = open_files

    def limit_open_files(self) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                make_run_command(self.port), cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=self.limit_open_files if self.open_files else None,
            )
        wait_until(self.healthy, timeout=20, what=f"uvicorn on port {self.port} (log: {self.log})")


class Remote:
    """A signed-in user of a real server: HTTP with httpx, sockets with websockets."""

    def __init__(self, username: str, cookie: str, user_id: int | None = None) -> None:
        self.username, self.cookie, self.id = username, cookie, user_id

    def headers(self) -> dict[str, str]:
        return {"Cookie": f"{chatx.SESSION_COOKIE}={self.cookie}"}

    def ws(self, server: ChatServer, after: int | None = None, since: int | None = None) -> ClientConnection:
        query = ws_query(after=after, since=since)
        return connect(f"{server.ws_base}/ws{query}", additional_headers=self.headers(), open_timeout=10,
                       max_size=2**20)

    def get(self, server: ChatServer, path: str) -> httpx.Response:
        return httpx.get(f"{server.base}{path}", headers=self.headers(), timeout=10)

    def post(self, server: ChatServer, path: str) -> httpx.Response:
        return httpx.post(f"{server.base}{path}", headers=self.headers(), timeout=10)

    def put(self, server: ChatServer, path: str) -> httpx.Response:
        return httpx.put(f"{server.base}{path}", headers=self.headers(), timeout=10)

    def delete(self, server: ChatServer, path: str) -> httpx.Response:
        return httpx.delete(f"{server.base}{path}", headers=self.headers(), timeout=10)


def remote_sign_up(server: ChatServer, username: str) -> Remote:
    """With patience: a real server hashes for real, in threads at nice 10, so on
    a busy machine one sign-up can take longer than 10 s."""
    response = httpx.post(f"{server.base}/api/register", json={"username": username, "password": PASSWORD},
                          timeout=60)
    assert response.status_code == 201, response.text
    return Remote(username, response.cookies[chatx.SESSION_COOKIE], response.json()["user"]["id"])


def remote_sign_in(server: ChatServer, username: str) -> Remote:
    """A second session of an existing user."""
    response = httpx.post(f"{server.base}/api/login", json={"username": username, "password": PASSWORD}, timeout=60)
    assert response.status_code == 200, response.text
    return Remote(username, response.cookies[chatx.SESSION_COOKIE], response.json()["user"]["id"])


def health_is(server: ChatServer, status: int, broadcast: str) -> bool:
    try:
        code, body = server.health()
    except httpx.HTTPError:
        return False
    return code == status and body["checks"]["broadcast"] == broadcast


def receive(ws: ClientConnection, kind: str | None = None, timeout: float = 10) -> dict[str, Any]:
    """The next frame from a real socket (skipping presence unless asked for)."""
    deadline = time.monotonic() + timeout
    while True:
        frame = json.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
        if kind is None and frame["type"] == "presence":
            continue
        if kind is None or frame["type"] == kind:
            return frame


def stalled_socket(server: ChatServer, cookie: str, query: str = "") -> socket.socket:
    """A websocket that completes its handshake by hand and never reads again,
    with a receive buffer as small as the kernel allows: a client on a dead link."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window for good
    raw.connect(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    raw.sendall((f"GET /ws{query} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                 f"Cookie: {chatx.SESSION_COOKIE}={cookie}\r\n\r\n").encode())
    head = b""
    raw.settimeout(10)
    while b"\r\n\r\n" not in head:
        chunk = raw.recv(1)  # one byte at a time: nothing past the head is read
        assert chunk, f"the server closed the handshake: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return raw


def drain(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every frame up to the answer to a ping."""
    ws.send(json.dumps({"type": "ping"}))
    frames = []
    while (frame := json.loads(ws.recv(timeout=10)))["type"] != "pong":
        frames.append(frame)
    return frames


@pytest.fixture
def cluster(tmp_path: Path, redis_server: RedisServer):
    """Start uvicorn processes sharing one SQLite file and one Redis."""
    servers: list[ChatServer] = []

    def start(count: int = 2, **env: str) -> list[ChatServer]:
        settings = {
            "CHATX_DATABASE_URL": f"sqlite:///{tmp_path / 'shared.db'}",
            "CHATX_BROADCAST_URL": redis_server.url,
            **env,
        }
        started = [ChatServer(settings, tmp_path) for _ in range(count)]
        for server in started:
            server.start()
            servers.append(server)
        return started

    yield start
    for server in servers:
        server.stop(signal.SIGKILL)


# ---- the browser ---------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def browser():
    """One Debian Chromium for the whole run: Playwright's sync API keeps an
    event loop in the main thread, so a second sync_playwright() would fail."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
