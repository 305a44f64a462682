"""ChatX: one-to-one web chat with live presence, in one Starlette module.

Run it with `uvicorn chatx:app`; build more apps with `create_app(**settings)`.
The interface (HTTP, WebSocket frames, presence, embedding) is the one in
CONTRACT.md; each rule is implemented under the section that names it.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gc
import hashlib
import hmac
import inspect
import json
import logging
import os
import random
import re
import secrets
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import aiosqlite
import redis.asyncio as aioredis
import sqlalchemy as sa
from broadcaster import Broadcast, BroadcastBackend, Event
from databases import Database
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.schema import CreateIndex, CreateTable
from starlette.applications import Starlette
from starlette.config import Config
from starlette.datastructures import CommaSeparatedStrings
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

logger = logging.getLogger("chatx")
HERE = Path(__file__).resolve().parent

USERNAME_RE = re.compile(r"[A-Za-z0-9_.-]{3,32}")
PASSWORD_MIN, PASSWORD_MAX = 8, 1024
BODY_MAX = 4000
FRAME_MAX_BYTES = 64 * 1024
HTTP_BODY_MAX = 64 * 1024
PAGE_DEFAULT, PAGE_MAX = 50, 200
REPLAY_PAGE = 500
BACKLOG_MAX = 1000
# A writer that committed less than COMMIT_BUSY_S ago waits COMMIT_LINGER_S before
# the next commit. At half the maximum rate on SQLite that took about a tenth off
# the server's CPU and a third off its p99; an idle server commits at once.
COMMIT_BUSY_S = 0.005
COMMIT_LINGER_S = 0.001
# SQLite's log is copied into the database by a thread at most every
# CHECKPOINT_INTERVAL_S while commits come, and by a commit only past WAL_BACKSTOP_PAGES.
CHECKPOINT_INTERVAL_S = 0.1
WAL_BACKSTOP_PAGES = 10_000
SENDS_IN_FLIGHT_MAX = 64  # a socket's sends awaiting their commit before it stops reading frames
SESSION_COOKIE = "chatx_session"
SESSION_DAYS = 30
CLIENT_ID_MAX = 128


# ---- settings ---------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///chatx.db"
    broadcast_url: str = "memory://"
    secret_key: str | None = None
    presence_ttl: float = 30.0
    allowed_origins: tuple[str, ...] = ()
    send_rate: float = 5.0
    send_burst: float = 30.0
    tune_gc: bool = True


def load_settings(**overrides: Any) -> Settings:
    """Keyword arguments win over the environment, which wins over `.env`."""
    unknown = set(overrides) - set(Settings.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown ChatX setting(s): {', '.join(sorted(unknown))}")
    env_file = ".env" if os.path.isfile(".env") else None
    config = Config(env_file, env_prefix="CHATX_")
    values: dict[str, Any] = {
        "database_url": config("DATABASE_URL", default=Settings.database_url),
        "broadcast_url": config("BROADCAST_URL", default=Settings.broadcast_url),
        "secret_key": config("SECRET_KEY", default=None) or None,
        "presence_ttl": config("PRESENCE_TTL", cast=float, default=Settings.presence_ttl),
        "allowed_origins": config("ALLOWED_ORIGINS", cast=CommaSeparatedStrings, default=""),
        "send_rate": config("SEND_RATE", cast=float, default=Settings.send_rate),
        "send_burst": config("SEND_BURST", cast=float, default=Settings.send_burst),
        "tune_gc": config("TUNE_GC", cast=bool, default=Settings.tune_gc),
    }
    values.update(overrides)
    origins = values["allowed_origins"]
    if isinstance(origins, str):
        origins = CommaSeparatedStrings(origins)
    values["allowed_origins"] = tuple(o.rstrip("/") for o in origins if o)
    return Settings(**values)


# ---- database schema --------------------------------------------------------

metadata = sa.MetaData()

users = sa.Table(
    "chatx_users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("username", sa.String(32), nullable=False),
    sa.Column("username_key", sa.String(32), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(256), nullable=False),
    sa.Column("status", sa.String(8), nullable=False, server_default="offline"),
    sa.Column("last_seen", sa.BigInteger, nullable=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)

sessions = sa.Table(
    "chatx_sessions",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # sha256 of the token: a leaked table signs no one in
    sa.Column("user_id", sa.Integer, sa.ForeignKey("chatx_users.id"), nullable=False, index=True),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
)

messages = sa.Table(
    "chatx_messages",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("sender_id", sa.Integer, nullable=False),
    sa.Column("recipient_id", sa.Integer, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("sent_at", sa.BigInteger, nullable=False),
    sa.Column("client_id", sa.String(CLIENT_ID_MAX), nullable=True),
    sa.UniqueConstraint("sender_id", "client_id", name="chatx_messages_client_id"),
    # On PostgreSQL a foreign key locks the user's row for every message, about
    # 40 % of an insert: chatx_insert_messages() checks the ids once per commit
    # instead, which is enough because no user is ever deleted.
    sa.ForeignKeyConstraint(["sender_id"], ["chatx_users.id"]).ddl_if(dialect="sqlite"),
    sa.ForeignKeyConstraint(["recipient_id"], ["chatx_users.id"]).ddl_if(dialect="sqlite"),
    # Every index is another page written per message. This one finds a
    # conversation in both directions and counts the unread; replay finds what
    # a user sent through the (sender_id, client_id) index above.
    sa.Index("chatx_messages_recipient", "recipient_id", "sender_id", "id"),
)

read_cursors = sa.Table(
    "chatx_read_cursors",
    metadata,
    sa.Column("user_id", sa.Integer, sa.ForeignKey("chatx_users.id"), primary_key=True),
    sa.Column("peer_id", sa.Integer, sa.ForeignKey("chatx_users.id"), primary_key=True),
    sa.Column("up_to", sa.Integer, nullable=False),
)

processes = sa.Table(
    "chatx_processes",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("heartbeat_at", sa.BigInteger, nullable=False),
)

sockets = sa.Table(
    "chatx_sockets",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("process_id", sa.String(32), nullable=False, index=True),
    sa.Column("user_id", sa.Integer, nullable=False, index=True),
)

settings_table = sa.Table(
    "chatx_settings",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


def now_ms() -> int:
    return int(time.time() * 1000)


def iso_time(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso(ms: int | None) -> str | None:
    return None if ms is None else iso_time(datetime.fromtimestamp(ms / 1000, timezone.utc))


class SQLiteWithPragmas(sqlite3.Connection):
    """databases opens a connection per task and a PRAGMA sent through it does
    not stick, so every new SQLite connection applies the server settings here."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The automatic checkpoint only backs up the Checkpointer: it runs inside a commit.
        for pragma in ("busy_timeout=5000", "journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON",
                       f"wal_autocheckpoint={WAL_BACKSTOP_PAGES}"):
            self.execute(f"PRAGMA {pragma}")


class Checkpointer:
    """Copies SQLite's write-ahead log into the database file from a thread
    of its own, on a connection of its own, a moment after each commit.

    SQLite's automatic checkpoint runs inside a commit, on the writer's
    thread, and syncs both files: at 4,500 msg/s that held the writer 8-15 ms
    eight times a second, and once 280 ms, while no message could be stored.
    A passive checkpoint elsewhere lets commits go on meanwhile."""

    def __init__(self, path: str, interval: float = CHECKPOINT_INTERVAL_S) -> None:
        self.path, self.interval = path, interval
        self._written = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="chatx-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def written(self) -> None:
        """Called after each commit."""
        self._written.set()

    def stop(self) -> None:
        self._stopping = True
        self._written.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            while self._written.wait() and not self._stopping:
                self._written.clear()
                try:
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:
                    logger.exception("a background checkpoint failed; the writer's own will do")
                time.sleep(self.interval)  # let several commits' pages be copied at once
        finally:
            connection.close()


def open_database(url: str, connections: int = 10) -> Database:
    if url.startswith("sqlite"):
        return Database(url, factory=SQLiteWithPragmas, timeout=5.0)
    return Database(url, min_size=1, max_size=connections)


class HeldConnections:
    """A few SQLite connections opened once, which every task reads through.

    databases ties a connection to a task, so on SQLite each query of a new
    task opened a connection and an aiosqlite thread of its own: most of the
    cost of opening a socket, and memory left behind in malloc's arenas."""

    def __init__(self, database: Database, size: int = 3) -> None:
        self.database, self.size = database, size
        self._connections: list[Any] = []
        self._holders: list[asyncio.Task] = []
        self._turn = 0

    async def connect(self) -> None:
        self._release = asyncio.Event()
        loop = asyncio.get_running_loop()
        opened = [loop.create_future() for _ in range(self.size)]
        self._holders = [asyncio.create_task(self._hold(future)) for future in opened]
        self._connections = list(await asyncio.gather(*opened))

    async def disconnect(self) -> None:
        self._release.set()
        await asyncio.gather(*self._holders, return_exceptions=True)

    async def _hold(self, opened: asyncio.Future) -> None:
        try:
            async with self.database.connection() as connection:
                opened.set_result(connection)
                await self._release.wait()
        except Exception as exc:
            if not opened.done():
                opened.set_exception(exc)
            raise

    def _next(self) -> Any:
        self._turn = (self._turn + 1) % self.size
        return self._connections[self._turn]

    async def fetch_all(self, query: Any) -> list[Any]:
        return await self._next().fetch_all(query)

    async def fetch_one(self, query: Any) -> Any:
        return await self._next().fetch_one(query)

    async def fetch_val(self, query: Any) -> Any:
        return await self._next().fetch_val(query)

    async def fetch_raw(self, sql: str, args: Sequence[Any]) -> list[tuple]:
        return await self._next().raw_connection.execute_fetchall(sql, args)


@functools.lru_cache(maxsize=64)
def postgres_marks(sql: str) -> str:
    """SQLite's `?` marks as asyncpg's `$1, $2, …` (the SQL here has no `?` in literals)."""
    numbers = iter(range(1, sql.count("?") + 1))
    return re.sub(r"\?", lambda _: f"${next(numbers)}", sql)


async def fetch_raw(conn: Any, sql: str, *args: Any) -> list[Any]:
    """SQL written once, with SQLite's marks, straight to the driver of a
    databases connection: databases compiles every statement anew, which was
    most of the CPU of a socket opening or closing."""
    driver = conn.raw_connection
    if isinstance(driver, aiosqlite.Connection):
        return await driver.execute_fetchall(sql, args)
    return await driver.fetch(postgres_marks(sql), *args)


def is_unique_violation(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.IntegrityError) or type(exc).__name__ == "UniqueViolationError"


@dataclass
class Job:
    """One write for the Writer: `function(connection, *args)`."""

    function: Callable[..., Awaitable[Any]]
    args: tuple
    bulk: bool = False
    one_statement: bool = False
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Writer:
    """Runs every write transaction of this process, in order, on one task
    that holds one connection; jobs queued together share one commit.

    databases 0.9 binds connections to tasks and SQLite's deferred BEGIN makes
    concurrent writers fail with "database is locked"; one writer per process
    with BEGIN IMMEDIATE (the busy timeout covers other processes) avoids both,
    and group commit keeps a commit per message off the hot path."""

    def __init__(self, url: str) -> None:
        # A one-connection pool of its own: the writer holds it for good, readers never queue behind it.
        self.database = open_database(url, connections=1)
        self.sqlite = self.database.url.dialect == "sqlite"
        self._jobs: asyncio.Queue[Job | None] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.checkpointer = Checkpointer(self.database.url.database) if self.sqlite else None

    async def start(self) -> None:
        await self.database.connect()
        self._task = asyncio.create_task(self._serve(), name="chatx-writer")
        if self.checkpointer:
            self.checkpointer.start()

    async def stop(self) -> None:
        """Finish the queued jobs, then close. Cancelling a job mid-query would
        leave an asyncpg connection unusable, so that is only a last resort."""
        self._stopping = True
        if self._task:
            self._jobs.put_nowait(None)
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 10)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        if self.checkpointer:
            await asyncio.to_thread(self.checkpointer.stop)
        await self.database.disconnect()

    async def run(self, job: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run `job(connection, *args)` in a write transaction; return once committed."""
        return await self._submit(Job(job, args))

    def submit_bulk(self, job: Callable[..., Awaitable[list]], item: Any, *, one_statement: bool = False) -> asyncio.Future:
        """Queue `item` without waiting: the items queued together for one job
        reach it as one list, `job(connection, items)`, which returns a result
        per item. The future is resolved once that commit is done.

        `one_statement` says the job writes with a single statement, which
        the database makes atomic by itself: a batch of such jobs alone is
        sent without BEGIN and COMMIT, two fewer trips to the database."""
        return self._submit(Job(job, (item,), bulk=True, one_statement=one_statement))

    def _submit(self, job: Job) -> asyncio.Future:
        self._jobs.put_nowait(job)
        return job.future

    async def _serve(self) -> None:
        while True:
            try:
                async with self.database.connection() as conn:
                    return await self._serve_on(conn)
            except Exception:
                if self._stopping:
                    return
                logger.exception("the writer's database connection failed; opening a new one")
                await asyncio.sleep(0.5)

    async def _serve_on(self, conn: Any) -> None:
        last_commit = 0.0
        while True:
            batch = [await self._jobs.get()]
            if time.monotonic() - last_commit < COMMIT_BUSY_S:
                await asyncio.sleep(COMMIT_LINGER_S)
            while not self._jobs.empty() and len(batch) < 256:
                batch.append(self._jobs.get_nowait())
            jobs = [item for item in batch if item is not None]
            if jobs:
                await self._commit(conn, jobs)
                last_commit = time.monotonic()
                if self.checkpointer:
                    self.checkpointer.written()
            if len(jobs) < len(batch):  # stop() was called
                return

    async def _commit(self, conn: Any, batch: list[Job]) -> None:
        try:
            if all(job.one_statement for job in batch):
                results = await self._run_jobs(conn, batch)
            else:
                async with self._transaction(conn):
                    results = await self._run_jobs(conn, batch)
        except Exception:
            # One failing job must not fail the others: retry each alone.
            for job in batch:
                await self._run_alone(conn, job)
            await conn.fetch_val("SELECT 1")  # a dead connection raises here: _serve opens another
            return
        for job, result in zip(batch, results):
            if not job.future.done():
                job.future.set_result(result)

    async def _run_jobs(self, conn: Any, batch: list[Job]) -> list:
        results: list[Any] = [None] * len(batch)
        bulk: dict[Callable, list[int]] = {}
        for index, job in enumerate(batch):
            if job.bulk:
                bulk.setdefault(job.function, []).append(index)
            else:
                results[index] = await job.function(conn, *job.args)
        for function, indexes in bulk.items():
            for index, result in zip(indexes, await function(conn, [batch[i].args[0] for i in indexes])):
                results[index] = result
        return results

    async def _run_alone(self, conn: Any, job: Job) -> None:
        try:
            async with self._transaction(conn):
                (result,) = await self._run_jobs(conn, [job])
        except Exception as exc:
            if not job.future.done():
                job.future.set_exception(exc)
        else:
            if not job.future.done():
                job.future.set_result(result)

    @asynccontextmanager
    async def _transaction(self, conn: Any) -> AsyncIterator[None]:
        if not self.sqlite:
            async with conn.transaction():
                yield
            return
        # Straight to the driver: databases would compile these statements on every commit.
        driver = conn.raw_connection
        await driver.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            try:
                await driver.execute("ROLLBACK")
            except Exception:
                pass
            raise
        await driver.execute("COMMIT")


async def create_schema(conn: Any, postgres: bool) -> None:
    if postgres:  # processes starting together must not race on CREATE TABLE
        await conn.execute("SELECT pg_advisory_xact_lock(734215)")
    for table in metadata.sorted_tables:
        await conn.execute(CreateTable(table, if_not_exists=True))
        for index in table.indexes:
            await conn.execute(CreateIndex(index, if_not_exists=True))
    await conn.execute("DROP INDEX IF EXISTS chatx_messages_sender")  # made by ChatX before 2026-12-03
    if postgres:
        await conn.execute(INSERT_MESSAGES_POSTGRES)
        await drop_message_foreign_keys(conn)


async def drop_message_foreign_keys(conn: Any) -> None:
    """Databases made before chatx_insert_messages() checked the user ids have
    foreign keys on chatx_messages; that check replaces them (see the table)."""
    names = await conn.fetch_all(
        "SELECT conname FROM pg_constraint WHERE conrelid = 'chatx_messages'::regclass AND contype = 'f' "
        "AND confrelid = 'chatx_users'::regclass")
    if names:
        await conn.execute("ALTER TABLE chatx_messages "
                           + ", ".join(f'DROP CONSTRAINT "{row[0]}"' for row in names))


# ---- accounts and sessions -------------------------------------------------


@dataclass(frozen=True)
class User:
    id: int
    username: str

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "username": self.username}


@dataclass(frozen=True)
class Session:
    id: str
    user: User


def hash_password(password: str, salt: bytes | None = None) -> str:
    """scrypt at OWASP's N=2^14, r=8, p=5 (16 MiB, about 0.1 s here)."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=5, maxmem=64 * 1024 * 1024)
    return f"scrypt$16384$8$5${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    _, n, r, p, salt, digest = stored.split("$")
    candidate = hashlib.scrypt(
        password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), maxmem=64 * 1024 * 1024
    )
    return hmac.compare_digest(candidate.hex(), digest)


# Compared against when the username is unknown, so a login takes as long either way.
DUMMY_HASH = "scrypt$16384$8$5$" + "00" * 16 + "$" + "00" * 64


def yield_to_the_event_loop() -> None:
    """Lowest CPU priority for a hashing thread (Linux gives threads their own
    nice value): where the server has one core, sign-ins must not slow chat."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def sign(secret: str, token: str) -> str:
    mac = hmac.new(secret.encode(), token.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def session_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def username_problem(username: str) -> str | None:
    if not USERNAME_RE.fullmatch(username):
        return "Usernames are 3 to 32 characters from A-Z, a-z, 0-9, '_', '.' and '-'."
    return None


def password_problem(password: str) -> str | None:
    if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        return f"Passwords are {PASSWORD_MIN} to {PASSWORD_MAX} characters long."
    return None


async def insert_user(conn: Any, username: str, password_hash: str, now: int) -> User | None:
    key = username.lower()
    if await conn.fetch_one(sa.select(users.c.id).where(users.c.username_key == key)):
        return None
    user_id = await conn.execute(
        users.insert().values(
            username=username, username_key=key, password_hash=password_hash, status="offline", created_at=now
        )
    )
    return User(user_id, username)


async def insert_session(conn: Any, sid: str, user_id: int, expires_at: int) -> None:
    await conn.execute(sessions.insert().values(id=sid, user_id=user_id, expires_at=expires_at))


async def delete_session(conn: Any, sid: str) -> None:
    await conn.execute(sessions.delete().where(sessions.c.id == sid))


async def ensure_secret(conn: Any, insert: Any, candidate: str) -> str:
    """The first process to start on a database picks the key; all others read it."""
    await conn.execute(
        insert(settings_table).values(name="secret_key", value=candidate).on_conflict_do_nothing(index_elements=["name"])
    )
    return await conn.fetch_val(sa.select(settings_table.c.value).where(settings_table.c.name == "secret_key"))


# ---- messages and read cursors ------------------------------------------------

sender_alias = users.alias("sender")
recipient_alias = users.alias("recipient")
MESSAGE_COLUMNS = [
    messages.c.id,
    sender_alias.c.username.label("sender"),
    recipient_alias.c.username.label("recipient"),
    messages.c.body,
    messages.c.sent_at,
    messages.c.client_id,
]
MESSAGE_FROM = messages.join(sender_alias, sender_alias.c.id == messages.c.sender_id).join(
    recipient_alias, recipient_alias.c.id == messages.c.recipient_id
)


def message_object(message_id: int, sender: str, recipient: str, body: str, sent_at: int,
                   client_id: str | None) -> dict[str, Any]:
    return {"id": message_id, "from": sender, "to": recipient, "body": body, "sent_at": iso(sent_at),
            "client_id": client_id}


def message_from_row(row: Any) -> dict[str, Any]:
    """A row of select_messages() as the contract's message object."""
    return message_object(row["id"], row["sender"], row["recipient"], row["body"], row["sent_at"], row["client_id"])


def select_messages(*where: Any) -> sa.Select:
    return sa.select(*MESSAGE_COLUMNS).select_from(MESSAGE_FROM).where(*where)


def conversation(me: int, peer: int) -> Any:
    return sa.or_(
        sa.and_(messages.c.sender_id == me, messages.c.recipient_id == peer),
        sa.and_(messages.c.sender_id == peer, messages.c.recipient_id == me),
    )


@dataclass(frozen=True)
class NewMessage:
    sender: User
    recipient: User
    body: str
    client_id: str | None


async def insert_messages(conn: Any, items: list[NewMessage], *, postgres: bool) -> list[dict[str, Any]]:
    """Store the messages of one commit in one statement and return them. A
    (sender, client_id) stored before, or earlier in the same list, stores
    nothing and gets the original."""
    keys = [(item.sender.id, item.client_id) for item in items]
    first: dict[tuple[int, str | None], int] = {}
    owners = [first.setdefault(key, index) if key[1] is not None else index for index, key in enumerate(keys)]
    fresh = sorted(set(owners))
    sent_at = now_ms()
    rows = [(items[i].sender.id, items[i].recipient.id, items[i].body, sent_at, items[i].client_id) for i in fresh]
    inserted = await (insert_message_rows_postgres if postgres else insert_message_rows_sqlite)(conn, rows)
    ids = dict(zip(fresh, inserted))
    originals = await messages_by_client_id(conn, {keys[index] for index in fresh if ids[index] is None})
    results: list[dict[str, Any]] = []
    for owner in owners:
        if ids[owner] is None:
            results.append(originals[keys[owner]])
            continue
        item = items[owner]
        results.append(message_object(ids[owner], item.sender.username, item.recipient.username, item.body,
                                      sent_at, item.client_id))
    return results


# The hottest statements go to the driver itself: databases compiles every query anew.
INSERT_MESSAGES = "INSERT INTO chatx_messages ({columns}) VALUES {rows} ON CONFLICT (sender_id, client_id) DO NOTHING"


async def insert_message_rows_sqlite(conn: Any, rows: list[tuple]) -> list[int | None]:
    """Insert rows of (sender_id, recipient_id, body, sent_at, client_id); return
    each one's id, or None where that client_id was stored before.

    One statement, which SQLite commits by itself: the writer sends it without
    BEGIN and COMMIT, one trip to the database thread per commit. The rows one
    statement stores get consecutive ids, up to the last one inserted.
    No RETURNING: the sqlite3 module lets go of the GIL for every row it
    steps through, and under load each row then waited for the event loop's
    thread to hand the GIL back."""
    driver = conn.raw_connection
    sql = INSERT_MESSAGES.format(columns="sender_id, recipient_id, body, sent_at, client_id",
                                 rows=", ".join(["(?, ?, ?, ?, ?)"] * len(rows)))
    cursor = await driver.execute(sql, [value for row in rows for value in row])
    stored, last = cursor.rowcount, cursor.lastrowid
    if stored == len(rows):
        return list(range(last - stored + 1, last + 1))
    if stored == 0:
        return [None] * len(rows)
    # Some client_id was stored before: which rows are new, by their (sender, client_id).
    new = await driver.execute_fetchall("SELECT id, sender_id, client_id FROM chatx_messages WHERE id BETWEEN ? AND ?",
                                        (last - stored + 1, last))
    new_keys = {(sender_id, client_id) for _, sender_id, client_id in new}
    ids = iter(sorted(message_id for message_id, _, _ in new))
    return [next(ids) if row[4] is None or (row[0], row[4]) in new_keys else None for row in rows]


# Ids are taken in order under a lock held to commit: ids then commit in id
# order, as under SQLite's single writer, so no reader can pass an id whose
# message is still uncommitted. A function, so that a commit is one statement,
# one round trip, instead of five. It checks the user ids first, in place of
# foreign keys (see chatx_messages).
INSERT_MESSAGES_POSTGRES = """
CREATE OR REPLACE FUNCTION chatx_insert_messages(
    senders integer[], recipients integer[], bodies text[], sent_ats bigint[], client_ids text[],
    OUT ids integer[], OUT inserted integer[]
) LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT FROM unnest(senders || recipients) AS u(id)
               WHERE NOT EXISTS (SELECT FROM chatx_users WHERE chatx_users.id = u.id)) THEN
        RAISE foreign_key_violation USING MESSAGE = 'chatx_messages: no such user';
    END IF;
    PERFORM pg_advisory_xact_lock(734216);
    ids := ARRAY(SELECT nextval(pg_get_serial_sequence('chatx_messages', 'id'))::integer
                 FROM generate_series(1, cardinality(senders)) ORDER BY 1);
    WITH stored AS (
        INSERT INTO chatx_messages (id, sender_id, recipient_id, body, sent_at, client_id)
        SELECT ids[n::integer], s, r, b, t, c
        FROM unnest(senders, recipients, bodies, sent_ats, client_ids) WITH ORDINALITY AS u(s, r, b, t, c, n)
        ON CONFLICT (sender_id, client_id) DO NOTHING
        RETURNING id
    ) SELECT array_agg(id) INTO inserted FROM stored;
END
$$
"""


async def insert_message_rows_postgres(conn: Any, rows: list[tuple]) -> list[int | None]:
    """As insert_message_rows_sqlite, in one call of chatx_insert_messages()."""
    record = await conn.raw_connection.fetchrow(
        "SELECT ids, inserted FROM chatx_insert_messages($1, $2, $3, $4, $5)", *map(list, zip(*rows)))
    inserted = set(record["inserted"] or ())
    return [message_id if message_id in inserted else None for message_id in record["ids"]]


async def messages_by_client_id(conn: Any, keys: set[tuple[int, str | None]]) -> dict[tuple, dict[str, Any]]:
    if not keys:
        return {}
    rows = await conn.fetch_all(
        select_messages(sa.tuple_(messages.c.sender_id, messages.c.client_id).in_(sorted(keys)))
        .add_columns(messages.c.sender_id)
    )
    return {(row["sender_id"], row["client_id"]): message_from_row(row) for row in rows}


async def advance_read_cursor(conn: Any, insert: Any, me: int, peer: int, up_to: int) -> int | None:
    """Move my cursor to max(old, min(up_to, newest)); return it if it moved."""
    await lock_user(conn, me)  # two processes moving one cursor must not move it back
    newest = await conn.fetch_val(sa.select(sa.func.max(messages.c.id)).where(conversation(me, peer))) or 0
    old = await read_cursor(conn, me, peer)
    target = min(up_to, newest)
    if target <= old:
        return None
    await conn.execute(
        insert(read_cursors)
        .values(user_id=me, peer_id=peer, up_to=target)
        .on_conflict_do_update(index_elements=["user_id", "peer_id"], set_={"up_to": target})
    )
    return target


async def read_cursor(conn: Any, me: int, peer: int) -> int:
    query = sa.select(read_cursors.c.up_to).where(read_cursors.c.user_id == me, read_cursors.c.peer_id == peer)
    return await conn.fetch_val(query) or 0


# ---- presence and the status hook -------------------------------------------

StatusCallback = Callable[[str, str, datetime], Any]
Transition = tuple[str, str, int]  # username, status, last_seen in ms


class StatusHook:
    """Every committed change of a user's status passes through `send`, the way
    Django's post_save does; publishing the presence frame is one callback."""

    def __init__(self) -> None:
        self.callbacks: list[StatusCallback] = []

    def connect(self, callback: StatusCallback) -> StatusCallback:
        self.callbacks.append(callback)
        return callback

    async def send(self, username: str, status: str, last_seen: datetime) -> None:
        for callback in list(self.callbacks):
            try:
                result = callback(username, status, last_seen)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("status callback %r failed", callback)


def presence_frame(username: str, status: str, last_seen: str | None) -> dict[str, Any]:
    return {"type": "presence", "username": username, "status": status, "last_seen": last_seen}


async def lock_user(conn: Any, user_id: int) -> None:
    """Serialise presence changes of one user across processes (no-op on SQLite,
    where BEGIN IMMEDIATE already serialises every writer)."""
    if not isinstance(conn.raw_connection, aiosqlite.Connection):
        await fetch_raw(conn, "SELECT id FROM chatx_users WHERE id = ? FOR UPDATE", user_id)


async def mark_online(conn: Any, user_id: int, now: int) -> list[Transition]:
    rows = await fetch_raw(conn, "UPDATE chatx_users SET status = 'online', last_seen = ? "
                                 "WHERE id = ? AND status = 'offline' RETURNING username", now, user_id)
    return [(rows[0][0], "online", now)] if rows else []


async def mark_offline_if_unconnected(conn: Any, user_id: int, now: int) -> list[Transition]:
    rows = await fetch_raw(conn, "UPDATE chatx_users SET status = 'offline', last_seen = ? "
                                 "WHERE id = ? AND status = 'online' "
                                 "AND NOT EXISTS (SELECT 1 FROM chatx_sockets WHERE user_id = ?) RETURNING username",
                           now, user_id, user_id)
    return [(rows[0][0], "offline", now)] if rows else []


async def open_socket(conn: Any, socket_id: str, process_id: str, user_id: int) -> list[Transition]:
    await lock_user(conn, user_id)
    await fetch_raw(conn, "INSERT INTO chatx_sockets (id, process_id, user_id) VALUES (?, ?, ?)",
                    socket_id, process_id, user_id)
    return await mark_online(conn, user_id, now_ms())


async def close_socket(conn: Any, socket_id: str, user_id: int) -> list[Transition]:
    await lock_user(conn, user_id)
    await fetch_raw(conn, "DELETE FROM chatx_sockets WHERE id = ?", socket_id)
    return await mark_offline_if_unconnected(conn, user_id, now_ms())


async def heartbeat(conn: Any, process_id: str, live: list[tuple[str, int]]) -> list[Transition]:
    """Refresh this process's heartbeat. If a sweeper took it for dead (a long
    pause), put its sockets back and its users online again."""
    now = now_ms()
    found = await conn.fetch_one(
        processes.update().where(processes.c.id == process_id).values(heartbeat_at=now).returning(processes.c.id)
    )
    if found:
        return []
    await conn.execute(processes.insert().values(id=process_id, heartbeat_at=now))
    transitions: list[Transition] = []
    for socket_id, user_id in live:
        transitions += await open_socket(conn, socket_id, process_id, user_id)
    return transitions


async def sweep(conn: Any, ttl_ms: int) -> list[Transition]:
    """Forget processes that stopped heartbeating, then take offline everyone
    left online without a socket."""
    now = now_ms()
    stale = sa.select(processes.c.id).where(processes.c.heartbeat_at < now - ttl_ms)
    await conn.execute(sockets.delete().where(sockets.c.process_id.in_(stale)))
    await conn.execute(processes.delete().where(processes.c.heartbeat_at < now - ttl_ms))
    return await offline_unconnected(conn, now)


async def unregister_process(conn: Any, process_id: str) -> list[Transition]:
    await conn.execute(sockets.delete().where(sockets.c.process_id == process_id))
    await conn.execute(processes.delete().where(processes.c.id == process_id))
    return await offline_unconnected(conn, now_ms())


async def offline_unconnected(conn: Any, now: int) -> list[Transition]:
    orphaned = sa.select(users.c.id).where(
        users.c.status == "online", ~sa.exists().where(sockets.c.user_id == users.c.id)
    )
    transitions: list[Transition] = []
    for row in await conn.fetch_all(orphaned):
        await lock_user(conn, row["id"])
        transitions += await mark_offline_if_unconnected(conn, row["id"], now)
    return transitions


# ---- broadcast backend --------------------------------------------------------


@dataclass(frozen=True)
class Resync:
    """Told to every subscriber after the broadcast connection came back:
    what was published while it was away is gone and must be read from the database."""

    lost_at: int


# For each i: PUBLISH KEYS[i] ARGV[2i-1], unless the channel has no subscriber
# but the ARGV[2i] of the caller. One script, so no process can subscribe between
# the count and the publish: one that subscribes after it reads the database
# after this commit.
PUBLISH_IF_OTHERS = """
for i, channel in ipairs(KEYS) do
    if redis.call('PUBSUB', 'NUMSUB', channel)[2] > tonumber(ARGV[2 * i]) then
        redis.call('PUBLISH', channel, ARGV[2 * i - 1])
    end
end
return 0
"""


def redis_command(*args: str | int) -> bytes:
    """One command in Redis's wire format (RESP)."""
    encoded = [arg.encode() if isinstance(arg, str) else b"%d" % arg for arg in args]
    return b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in encoded)


class RedisPubSubBackend(BroadcastBackend):
    """Redis pub/sub that survives Redis restarts and reports its health.

    broadcaster 0.3.1's RedisBackend delivers nothing with redis-py 8 on
    Python 3.11 and its listener dies for good when Redis restarts
    (encode/broadcaster#144, reconnects declined upstream). This one owns the
    connection: it reconnects with backoff, resubscribes, and then hands every
    subscribed channel a `Resync` event so sockets catch up from the database.

    Each payload travels as "<origin> <message>": a message its own process
    has delivered already is published with that process's origin, and the
    process drops it when it comes back. Such a message is not published at
    all when Redis counts no subscriber of its channel but this process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.origin = uuid.uuid4().hex
        self.healthy = False
        self._lost_at: int | None = None
        self._last_heard = 0.0
        self._pubsub: Any = None
        self._channels: set[str] = set()
        self._confirmed: dict[str, asyncio.Future] = {}
        # Channels Redis has confirmed this process's subscription to, with no
        # unsubscribe of them on the way: what publish_elsewhere() may count as its own.
        self._subscribed_here: set[str] = set()
        self._unsubscribing: dict[str, int] = {}
        self._outgoing: list[tuple[str, str, asyncio.Future | None, int | None]] = []

    async def connect(self) -> None:
        # No client retries: failures surface at once and the loops below back off.
        self._redis = aioredis.Redis.from_url(
            self.url, socket_connect_timeout=2, socket_timeout=5, retry=Retry(NoBackoff(), 0)
        )
        self._publishing = self._redis.connection_pool.make_connection()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._wake_publisher = asyncio.Event()
        self._closing = False
        self._listener = asyncio.create_task(self._listen_forever())
        self._publisher = asyncio.create_task(self._publish_forever())

    async def disconnect(self) -> None:
        # publish_elsewhere() does not wait: the publisher sends what it left, then ends.
        self._closing = True
        self._wake_publisher.set()
        await asyncio.wait([self._publisher], timeout=2)
        for task in (self._listener, self._publisher):
            task.cancel()
        await asyncio.gather(self._listener, self._publisher, return_exceptions=True)
        await self._publishing.disconnect()
        await self._redis.aclose()

    async def subscribe(self, channel: str) -> None:
        """Return once Redis confirmed the subscription (so a reader of the
        database after this misses nothing), or at once while Redis is away."""
        self._channels.add(channel)
        if not self.healthy:
            # Subscribed once the connection is (back); what it misses until then is resynced.
            self._lost_at = self._lost_at or now_ms()
            return
        confirmed = self._confirmed.setdefault(channel, asyncio.get_running_loop().create_future())
        try:
            await self._pubsub.subscribe(channel)
            await asyncio.wait_for(asyncio.shield(confirmed), 2)
        except (RedisError, OSError, asyncio.TimeoutError):
            pass  # the listener reconnects, resubscribes and resyncs

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        self._confirmed.pop(channel, None)
        self._subscribed_here.discard(channel)
        self._unsubscribing[channel] = self._unsubscribing.get(channel, 0) + 1
        if self.healthy:
            try:
                await self._pubsub.unsubscribe(channel)
            except (RedisError, OSError):
                pass

    async def publish(self, channel: str, message: Any) -> None:
        """Publishes are pipelined: all waiting ones go out in one round trip."""
        future = asyncio.get_running_loop().create_future()
        self._outgoing.append((channel, "* " + message, future, None))
        self._wake_publisher.set()
        await future

    def publish_elsewhere(self, channel: str, message: str) -> None:
        """Publish to the other processes only, without waiting: it joins the
        next pipeline, and a failure is logged. Redis itself skips it when no
        one else subscribes (PUBLISH_IF_OTHERS): with one process, nothing
        comes back to be parsed and dropped."""
        mine = 1 if channel in self._subscribed_here else 0
        self._outgoing.append((channel, f"{self.origin} {message}", None, mine))
        self._wake_publisher.set()

    async def next_published(self) -> Event:
        return await self._events.get()

    async def _publish_forever(self) -> None:
        while True:
            if not self._outgoing:
                if self._closing:
                    return
                await self._wake_publisher.wait()
            self._wake_publisher.clear()
            if not self._outgoing:
                continue
            batch, self._outgoing = self._outgoing, []
            try:
                await self._send_pipeline(batch)
            except Exception:
                # The connection may predate a Redis restart: once more on a fresh one.
                try:
                    await self._publishing.disconnect()
                    await self._send_pipeline(batch)
                except Exception as exc:
                    unawaited = sum(1 for _, _, future, _ in batch if future is None)
                    if unawaited:
                        logger.warning("%d publishes failed: %s", unawaited, exc)
                    for _, _, future, _ in batch:
                        if future is not None and not future.done():
                            future.set_exception(exc)
                    continue
            for _, _, future, _ in batch:
                if future is not None and not future.done():
                    future.set_result(None)

    async def _send_pipeline(self, batch: list[tuple[str, str, asyncio.Future | None, int | None]]) -> None:
        """The batch in one write, then its replies, on the publisher's own
        connection. Each run of publish_elsewhere() items is one script call.
        A redis-py Pipeline per batch, or its command packing, took a tenth of
        the server's CPU when messages came one at a time."""
        commands: list[bytes] = []
        others: list[tuple[str, str, int]] = []
        for channel, message, _, mine in batch:
            if mine is not None:
                others.append((channel, message, mine))
                continue
            if others:
                commands.append(self._publish_if_others(others))
                others = []
            commands.append(redis_command("PUBLISH", channel, message))
        if others:
            commands.append(self._publish_if_others(others))
        connection = self._publishing  # reconnects by itself once disconnected
        await connection.send_packed_command(b"".join(commands), check_health=False)
        for _ in commands:
            await connection.read_response()

    @staticmethod
    def _publish_if_others(items: list[tuple[str, str, int]]) -> bytes:
        channels = [channel for channel, _, _ in items]
        values = [value for _, message, mine in items for value in (message, mine)]
        return redis_command("EVAL", PUBLISH_IF_OTHERS, len(channels), *channels, *values)

    async def _listen_forever(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._listen()
            except Exception as exc:  # whatever broke, the listener must come back
                if self._lost_at is None:
                    logger.warning("broadcast connection lost: %s", exc)
                    self._lost_at = now_ms()
                    await self._publishing.disconnect()  # publishes must not reuse a dead connection
                if self.healthy:
                    backoff = 0.1
                self.healthy = False
                try:
                    await self._pubsub.aclose()
                except Exception:
                    pass
                await asyncio.sleep(backoff * (1 + random.random()))
                backoff = min(backoff * 2, 2.0)

    async def _listen(self) -> None:
        """Subscribe everything wanted, then read until the connection breaks.
        A PING follows the SUBSCRIBE; its PONG proves the subscriptions are in place."""
        self._subscribed_here.clear()
        self._unsubscribing.clear()
        pubsub = self._pubsub = self._redis.pubsub()
        subscribed = {"chatx:keepalive", *self._channels}
        await pubsub.subscribe(*subscribed)
        await pubsub.ping()
        self._last_heard, resubscribing = time.monotonic(), True
        watchdog = asyncio.create_task(self._keep_alive(pubsub))
        try:
            while True:
                # Blocking reads: a read timeout per message cost a tenth of the CPU under load.
                message = await pubsub.get_message(timeout=None)
                self._last_heard = time.monotonic()
                kind = message["type"] if message else None
                if kind == "message":
                    origin, _, data = message["data"].decode().partition(" ")
                    if origin != self.origin:
                        self._events.put_nowait(Event(message["channel"].decode(), data))
                elif kind == "subscribe":
                    channel = message["channel"].decode()
                    if channel in self._channels and not self._unsubscribing.get(channel):
                        self._subscribed_here.add(channel)
                    confirmed = self._confirmed.pop(channel, None)
                    if confirmed and not confirmed.done():
                        confirmed.set_result(None)
                elif kind == "unsubscribe":
                    channel = message["channel"].decode()
                    if self._unsubscribing.get(channel, 0) > 1:
                        self._unsubscribing[channel] -= 1
                    else:
                        self._unsubscribing.pop(channel, None)
                elif kind == "pong" and resubscribing:
                    if late := self._channels - subscribed:  # wanted while this connection was made
                        subscribed |= late
                        await pubsub.subscribe(*late)
                        await pubsub.ping()
                    else:
                        resubscribing, self.healthy = False, True
                        self._resync_subscribers()
        finally:
            watchdog.cancel()

    def _resync_subscribers(self) -> None:
        if self._lost_at is not None:
            logger.warning("broadcast connection restored; subscribers catch up")
            for channel in self._channels:
                self._events.put_nowait(Event(channel, Resync(self._lost_at)))
            self._lost_at = None

    async def _keep_alive(self, pubsub: Any) -> None:
        """PING a quiet connection. One silent for 15 s (a host gone without a
        reset) is closed, so the blocked read fails and the listener reconnects."""
        while True:
            await asyncio.sleep(5)
            silent = time.monotonic() - self._last_heard
            try:
                if silent > 15:
                    logger.warning("no answer from Redis for %.0f s; reconnecting", silent)
                    await pubsub.connection.disconnect()
                    return
                if silent >= 5:
                    await pubsub.ping()
            except (RedisError, OSError):
                return  # the listener sees the same failure


# ---- HTTP routes ------------------------------------------------------------

ERROR_CODES = {400: "bad_request", 401: "not_authenticated", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "too_large"}
CURSOR_RE = re.compile(r"[0-9]{1,18}")
ID_MAX = 2**31 - 1  # message ids are 32-bit integers; a larger cursor means "past the end"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        self.status, self.code, self.detail = status, code, detail


def error_response(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "detail": detail}}, status_code=status)


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.detail)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, ERROR_CODES.get(exc.status_code, "error"), str(exc.detail))


async def server_error(request: Request, exc: Exception) -> Response:
    return error_response(500, "internal_error", "Something went wrong on the server; nothing was lost.")


def own_origin(conn: HTTPConnection) -> str:
    scheme = "https" if conn.url.scheme in ("https", "wss") else "http"
    return f"{scheme}://{conn.headers.get('host', '')}"


def origin_allowed(conn: HTTPConnection, allowed: tuple[str, ...]) -> bool:
    """No Origin header means a scripted client, judged by its session alone."""
    origin = conn.headers.get("origin")
    return origin is None or origin.rstrip("/") in (own_origin(conn), *allowed)


async def json_object(request: Request) -> dict[str, Any]:
    chat = chat_of(request)
    if not origin_allowed(request, chat.settings.allowed_origins):
        raise ApiError(403, "forbidden", "Requests from other sites are not accepted.")
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(400, "bad_request", "Send a JSON object with Content-Type: application/json.")
    try:
        data = json.loads(await limited_body(request))
    except ValueError:
        raise ApiError(400, "bad_request", "The body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", "The body must be a JSON object.")
    return data


async def limited_body(request: Request) -> bytes:
    """Read at most HTTP_BODY_MAX bytes. (Starlette's max_body_size answers in
    plain text, and every /api error must be JSON.)"""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > HTTP_BODY_MAX:
            raise ApiError(413, "too_large", f"Request bodies are at most {HTTP_BODY_MAX} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def storable(text: str) -> bool:
    """JSON admits lone surrogates and NUL; neither UTF-8 nor PostgreSQL text does."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def string_field(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not storable(value):
        raise ApiError(400, "bad_request", f"'{name}' is required and must be a string.")
    return value


def chat_of(conn: HTTPConnection) -> ChatX:
    return conn.app.state.chat


async def signed_in(request: Request) -> Session:
    session = await chat_of(request).session_from(request)
    if session is None:
        raise ApiError(401, "not_authenticated", "Sign in first.")
    return session


def with_session_cookie(response: Response, request: Request, value: str) -> Response:
    response.set_cookie(
        SESSION_COOKIE, value, max_age=SESSION_DAYS * 86400, path=request.scope.get("root_path") or "/",
        httponly=True, samesite="lax", secure=request.url.scheme == "https",
    )
    return response


async def register(request: Request) -> Response:
    data = await json_object(request)
    username, password = string_field(data, "username"), string_field(data, "password")
    if problem := username_problem(username):
        raise ApiError(400, "invalid_username", problem)
    if problem := password_problem(password):
        raise ApiError(400, "weak_password", problem)
    chat = chat_of(request)
    user = await chat.create_user(username, password)
    if user is None:
        raise ApiError(409, "username_taken", f"The username {username!r} is taken.")
    cookie = await chat.create_session(user)
    return with_session_cookie(JSONResponse({"user": user.public()}, status_code=201), request, cookie)


async def login(request: Request) -> Response:
    data = await json_object(request)
    username, password = string_field(data, "username"), string_field(data, "password")
    chat = chat_of(request)
    user = await chat.authenticate(username, password)
    if user is None:
        raise ApiError(401, "bad_credentials", "Wrong username or password.")
    cookie = await chat.create_session(user)
    return with_session_cookie(JSONResponse({"user": user.public()}), request, cookie)


async def logout(request: Request) -> Response:
    chat = chat_of(request)
    if not origin_allowed(request, chat.settings.allowed_origins):
        raise ApiError(403, "forbidden", "Requests from other sites are not accepted.")
    session = await chat.session_from(request)
    if session is not None:
        await chat.revoke_session(session)
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path=request.scope.get("root_path") or "/")
    return response


async def me(request: Request) -> Response:
    session = await signed_in(request)
    return JSONResponse({"user": session.user.public()})


async def user_list(request: Request) -> Response:
    session = await signed_in(request)
    return JSONResponse({"users": await chat_of(request).contacts(session.user)})


def query_cursor(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    if not CURSOR_RE.fullmatch(value):
        raise ApiError(400, "bad_request", f"'{name}' must be a whole number of at least 0.")
    return min(int(value), ID_MAX)


async def conversation_messages(request: Request) -> Response:
    session = await signed_in(request)
    chat = chat_of(request)
    before, after = query_cursor(request, "before"), query_cursor(request, "after")
    if before is not None and after is not None:
        raise ApiError(400, "bad_request", "Give 'before' or 'after', not both.")
    limit_text = request.query_params.get("limit", str(PAGE_DEFAULT))
    if not re.fullmatch(r"-?[0-9]{1,18}", limit_text) or int(limit_text) < 1:
        raise ApiError(400, "bad_request", "'limit' must be a whole number of at least 1.")
    peer = await chat.find_user(request.path_params["username"])
    if peer is None:
        raise ApiError(404, "unknown_user", "There is no such user.")
    page = await chat.conversation_page(session.user, peer, before, after, min(int(limit_text), PAGE_MAX))
    return JSONResponse(page)


async def healthz(request: Request) -> Response:
    checks = await chat_of(request).health()
    ok = all(value == "ok" for value in checks.values())
    return JSONResponse({"status": "ok" if ok else "fail", "checks": checks}, status_code=200 if ok else 503)


def page_context(request: Request, **extra: Any) -> dict[str, Any]:
    return {"base": request.scope.get("root_path", ""), **extra}


async def chat_page(request: Request) -> Response:
    chat = chat_of(request)
    session = await chat.session_from(request)
    if session is None:
        return RedirectResponse(request.url_for("login_page"), status_code=303)
    return chat.templates.TemplateResponse(request, "chat.html", page_context(request, user=session.user.public()))


async def login_page(request: Request) -> Response:
    return chat_of(request).templates.TemplateResponse(request, "login.html", page_context(request))


async def register_page(request: Request) -> Response:
    return chat_of(request).templates.TemplateResponse(request, "register.html", page_context(request))


class SecurityHeaders:
    """Adds the Content-Security-Policy and friends to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                    (b"x-frame-options", b"DENY"),
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


# ---- WebSocket protocol -------------------------------------------------------


class FrameError(Exception):
    def __init__(self, code: str, detail: str) -> None:
        self.code, self.detail = code, detail


def dumps(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


# Message frames are made by message_frame() with the id first, so each socket
# reads the id from this prefix instead of parsing the whole frame again.
MESSAGE_FRAME_START = '{"type":"message","message":{"id":'


def message_frame(message: dict[str, Any], encoded: str | None = None) -> str:
    return '{"type":"message","message":' + (encoded or dumps(message)) + "}"


def frame_field(frame: dict[str, Any], name: str, kind: type) -> Any:
    value = frame.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is str and not storable(value)):
        raise FrameError("invalid_field", f"'{name}' is required and must be a {kind.__name__}.")
    return value


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    stamp: float = field(default_factory=time.monotonic)

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class WebSocketEndpoint:
    """/ws as an ASGI app rather than a function of a WebSocket: frames go out
    through the ASGI `send` itself. Starlette's WebSocket.send_text and the
    route's exception wrapper around `send` are three coroutine layers per
    frame, and a storm of 1,000 people connecting sends some 750,000 frames."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive, send)
        chat = chat_of(websocket)
        session = await chat.session_from(websocket)
        if session is None or not origin_allowed(websocket, chat.settings.allowed_origins):
            await websocket.close()  # before accept(): the handshake is refused with 403
            return
        after = websocket.query_params.get("after")
        await websocket.accept()
        if after is not None and not CURSOR_RE.fullmatch(after):
            await websocket.send_text(dumps({"type": "error", "code": "invalid_field",
                                             "detail": "'after' must be a whole number of at least 0."}))
            await websocket.close(1008)
            return
        await ChatSocket(chat, websocket, send, session).serve(None if after is None else min(int(after), ID_MAX))


class ChatSocket:
    """One open /ws connection: hello, replay, live delivery, the client's frames.

    Message frames are deduplicated by id: `floor` and `seen` say what this
    socket already has, so replay, live frames and a catch-up after a broadcast
    outage never send one twice, while a message that is published late (another
    process committed it earlier) still gets through."""

    def __init__(self, chat: ChatX, websocket: WebSocket, send: Send, session: Session) -> None:
        self.chat, self.ws, self.session, self.user = chat, websocket, session, session.user
        self.send = send
        # A list and a future rather than an asyncio.Queue: a Queue costs 3 kB per idle socket.
        self.outbox: list[Any] = []  # frames, broadcast events and close codes, in order
        self.outbox_ready: asyncio.Future | None = None
        self.unsent = 0  # of the batch send_outbox is writing
        self.sends_in_flight = 0
        self.socket_id = uuid.uuid4().hex
        self.floor, self.high, self.seen, self.prune_at = 0, 0, set[int](), 2048
        loop = asyncio.get_running_loop()
        self.finished = loop.create_future()
        self.ended = loop.create_future()  # the first task to end, or a close code

    async def serve(self, after: int | None) -> None:
        chat = self.chat
        try:
            # Read before subscribing: a message stored after this is delivered live, never skipped.
            self.floor = after if after is not None else await chat.newest_message_id()
            try:
                await chat.listen_for(self)  # from here on, the user's channel reaches this socket
                if not await chat.session_alive(self.session.id):  # signed out before we listened
                    await self.close(4401)
                    return
                try:
                    # Committed and announced before the snapshot: hello knows every change
                    # committed here before ours, as when people connect one after another.
                    mine = await chat.writer.run(open_socket, self.socket_id, chat.process_id, self.user.id)
                    await chat.announce(mine)
                    # No await from the snapshot to joining: every later presence frame queues
                    # up behind hello, and none repeats what hello says.
                    hello = chat.hello(self.user)
                    chat.sockets.add(self)
                    for username, status, last_seen in mine:  # announced before this socket joined
                        self.enqueue(dumps(presence_frame(username, status, iso(last_seen))))
                    await self.send({"type": "websocket.send", "text": hello})
                    del hello  # serve() lasts as long as the socket: keep no large frame alive in it
                    await self.catch_up()
                    code = await self.run_until_closed()
                finally:
                    await self.leave()
            finally:
                chat.stop_listening(self)
            if code is not None:
                await self.close(code)
        except (WebSocketDisconnect, OSError):
            pass
        finally:
            self.finished.set_result(None)

    async def leave(self) -> None:
        self.chat.sockets.discard(self)
        # Shielded: a socket row left behind would keep its user online for good.
        await asyncio.shield(self.chat.spawn(self.chat.socket_closed(self.socket_id, self.user.id)))

    async def close(self, code: int) -> None:
        try:
            await asyncio.wait_for(self.ws.close(code), 5)
        except Exception:
            pass  # the client is gone or not reading; the transport closes anyway

    def shut(self, code: int) -> None:
        self.enqueue(code)

    def end(self, outcome: asyncio.Task | int) -> None:
        if not self.ended.done():
            self.ended.set_result(outcome)

    async def run_until_closed(self) -> int | None:
        """Run until the client leaves (None) or the socket must close (a code)."""
        tasks = [asyncio.create_task(self.receive_frames()), asyncio.create_task(self.send_outbox())]
        for task in tasks:
            task.add_done_callback(self.end)
        try:
            outcome = await self.ended
        finally:
            for task in tasks:
                task.remove_done_callback(self.end)
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if isinstance(outcome, int):
            return outcome
        failure = None if outcome.cancelled() else outcome.exception()
        if failure is None:
            return None if outcome.cancelled() else outcome.result()
        if not isinstance(failure, (WebSocketDisconnect, OSError)):
            logger.error("socket of %s failed", self.user.username, exc_info=failure)
            return 1011
        return None

    def enqueue(self, item: Any) -> None:
        """Queue a frame or event for this socket; a reader too far behind is cut off."""
        self.outbox.append(item)
        if len(self.outbox) + self.unsent > BACKLOG_MAX:
            self.end(1013)
        if self.outbox_ready is not None and not self.outbox_ready.done():
            self.outbox_ready.set_result(None)

    async def send_outbox(self) -> int | None:
        while True:
            if not self.outbox:
                self.outbox_ready = asyncio.get_running_loop().create_future()
                await self.outbox_ready
            batch, self.outbox = self.outbox, []
            for index, item in enumerate(batch):
                self.unsent = len(batch) - index
                if isinstance(item, int):
                    return item
                if isinstance(item, str):
                    await self.send({"type": "websocket.send", "text": item})
                elif (code := await self.deliver(item)) is not None:
                    return code
            self.unsent = 0

    async def deliver(self, event: Event) -> int | None:
        text = event.message
        if isinstance(text, Resync):
            if not await self.chat.session_alive(self.session.id):
                return 4401
            await self.catch_up()
            return None
        if text.startswith(MESSAGE_FRAME_START):
            if not self.remember(int(text[len(MESSAGE_FRAME_START):text.index(",", len(MESSAGE_FRAME_START))])):
                return None
        elif text.startswith('{"type":"revoke"'):
            return 4401 if json.loads(text)["session"] == self.session.id else None
        await self.send({"type": "websocket.send", "text": text})
        return None

    def remember(self, message_id: int) -> bool:
        """Record a message as sent; False if this socket already has it."""
        if message_id <= self.floor or message_id in self.seen:
            return False
        self.seen.add(message_id)
        self.high = max(self.high, message_id)
        if len(self.seen) > self.prune_at:
            # A message published 100,000 ids late is beyond any real delay.
            self.floor = max(self.floor, self.high - 100_000)
            self.seen = {i for i in self.seen if i > self.floor}
            self.prune_at = max(2048, 2 * len(self.seen))
        return True

    async def catch_up(self) -> None:
        """Send, in id order, every message of mine above `floor` not yet sent."""
        cursor = self.floor
        while True:
            page = await self.chat.messages_since(self.user, cursor, REPLAY_PAGE)
            for message in page:
                if self.remember(message["id"]):
                    await self.send({"type": "websocket.send", "text": message_frame(message)})
            if len(page) < REPLAY_PAGE:
                return
            cursor = page[-1]["id"]

    async def receive_frames(self) -> int | None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return None
            text = message.get("text")
            if text is None:
                size = len(message.get("bytes") or b"")
            else:  # a character is at most 4 bytes: only long frames need measuring
                size = len(text) if 4 * len(text) <= FRAME_MAX_BYTES else len(text.encode())
            if size > FRAME_MAX_BYTES:
                return 1009
            if text is None:
                self.reply_error("bad_json", "Frames are JSON text, not binary.")
                continue
            await self.handle(text)

    async def handle(self, text: str) -> None:
        try:
            frame = json.loads(text)
        except ValueError:
            return self.reply_error("bad_json", "The frame is not valid JSON.")
        if not isinstance(frame, dict):
            return self.reply_error("bad_json", "A frame is a JSON object.")
        client_id = frame.get("client_id") if isinstance(frame.get("client_id"), str) else None
        handler = FRAME_HANDLERS.get(frame.get("type"))
        if handler is None:
            return self.reply_error("unknown_type", f"Unknown frame type {frame.get('type')!r}.", client_id)
        try:
            await handler(self, frame)
        except FrameError as exc:
            self.reply_error(exc.code, exc.detail, client_id)

    def reply(self, frame: dict[str, Any]) -> None:
        self.enqueue(dumps(frame))

    def reply_error(self, code: str, detail: str, client_id: str | None = None) -> None:
        frame = {"type": "error", "code": code, "detail": detail}
        if client_id is not None:
            frame["client_id"] = client_id
        self.reply(frame)

    async def peer(self, frame: dict[str, Any], name: str) -> User:
        peer = await self.chat.find_user(frame_field(frame, name, str))
        if peer is None:
            raise FrameError("unknown_user", f"There is no user {frame[name]!r}.")
        return peer

    async def on_send(self, frame: dict[str, Any]) -> None:
        body = frame_field(frame, "body", str)
        client_id = frame.get("client_id")
        if client_id is not None and (
            not isinstance(client_id, str) or not 0 < len(client_id) <= CLIENT_ID_MAX or not storable(client_id)
        ):
            raise FrameError("invalid_field", f"'client_id' must be a string of 1 to {CLIENT_ID_MAX} characters.")
        recipient = await self.peer(frame, "to")
        if not body.strip():
            raise FrameError("empty_body", "The message is empty.")
        if len(body) > BODY_MAX:
            raise FrameError("body_too_long", f"Messages are at most {BODY_MAX} characters.")
        if not self.chat.send_bucket(self.user.id).take():
            raise FrameError("rate_limited", "Too many messages; slow down and send again.")
        # Not awaited: the next frames are read meanwhile, so one commit takes many
        # sends of a socket. The queue keeps their order; the callback acks and publishes.
        stored = self.chat.store_message(self.user, recipient, body, client_id)
        stored.add_done_callback(functools.partial(self.message_stored, recipient, client_id))
        self.sends_in_flight += 1
        if self.sends_in_flight > SENDS_IN_FLIGHT_MAX:
            await asyncio.wait([stored])

    def message_stored(self, recipient: User, client_id: str | None, stored: asyncio.Future) -> None:
        """Ack, then deliver, once the message is committed; this runs even when
        the socket closed meanwhile, so no stored message stays unpublished. A
        retry (same client_id) gets the original, published again in case the
        first attempt was cut off; sockets that already have it drop it by id."""
        self.sends_in_flight -= 1
        if stored.cancelled():
            return
        if (failure := stored.exception()) is not None:
            logger.error("storing a message of %s failed", self.user.username, exc_info=failure)
            self.shut(1011)  # the client resends with the same client_id; nothing is stored twice
            return
        message = stored.result()
        encoded = dumps(message)
        self.enqueue('{"type":"ack","client_id":' + dumps(client_id) + ',"message":' + encoded + "}")
        self.chat.deliver_message(message_frame(message, encoded), self.user, recipient)

    async def on_typing(self, frame: dict[str, Any]) -> None:
        recipient = await self.peer(frame, "to")
        await self.chat.publish(f"user:{recipient.id}", dumps({"type": "typing", "from": self.user.username}))

    async def on_read(self, frame: dict[str, Any]) -> None:
        peer = await self.peer(frame, "with")
        up_to = frame_field(frame, "up_to", int)
        if up_to < 0:
            raise FrameError("invalid_field", "'up_to' must be at least 0.")
        moved = await self.chat.writer.run(advance_read_cursor, self.chat.insert, self.user.id, peer.id, up_to)
        if moved is not None:
            read = dumps({"type": "read", "reader": self.user.username, "with": peer.username, "up_to": moved})
            for user_id in {self.user.id, peer.id}:
                await self.chat.publish(f"user:{user_id}", read)

    async def on_ping(self, frame: dict[str, Any]) -> None:
        self.reply({"type": "pong"})


FRAME_HANDLERS = {"send": ChatSocket.on_send, "typing": ChatSocket.on_typing, "read": ChatSocket.on_read,
                  "ping": ChatSocket.on_ping}


# ---- app factory --------------------------------------------------------------


class ChatX:
    """Everything one ChatX app holds; `create_app` makes one per app, so two
    apps in one process share nothing."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process_id = uuid.uuid4().hex
        self.status_hook = StatusHook()
        self.status_hook.connect(self.publish_presence)
        self.templates = Jinja2Templates(directory=HERE / "templates")
        self.sockets: set[ChatSocket] = set()
        self.local: dict[int, set[ChatSocket]] = {}  # user id -> this process's open sockets
        self.relays: dict[int, tuple[asyncio.Task, asyncio.Future]] = {}  # user id -> relay, subscribed
        self.ending_relays: dict[int, asyncio.Task] = {}
        self.presence: dict[str, tuple[str, str | None]] = {}  # username key -> status, last_seen
        self.online: dict[str, str] = {}  # username key -> its hello entry, as JSON
        self.buckets: dict[int, TokenBucket] = {}
        self.users_by_key: dict[str, User] = {}
        self.background: set[asyncio.Task] = set()
        self.backend: RedisPubSubBackend | None = None

    def on_status_change(self, callback: StatusCallback) -> StatusCallback:
        """Register `callback(username, status, last_seen)`, plain or async; it
        runs once per committed change of status made by this process."""
        return self.status_hook.connect(callback)

    # lifecycle

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        url = self.settings.database_url
        self.database = open_database(url)
        await self.database.connect()
        postgres = self.postgres = self.database.url.dialect == "postgresql"
        self.insert = postgresql_insert if postgres else sqlite_insert
        self.insert_messages = functools.partial(insert_messages, postgres=postgres)
        self.writer = Writer(url)
        await self.writer.start()
        await self.writer.run(create_schema, postgres)
        # asyncpg's pool holds its connections already; SQLite needs its own (opened
        # once the writer has put the file in WAL mode, which takes a lock that waits for no one).
        self.reads: Any = self.database if postgres else HeldConnections(self.database)
        if not postgres:
            await self.reads.connect()
        secret = self.settings.secret_key or await self.writer.run(ensure_secret, self.insert, secrets.token_urlsafe(32))
        self.secret = secret
        # Apps on other databases may share one Redis: their channels must not meet.
        self.namespace = "chatx:" + hashlib.sha256(secret.encode()).hexdigest()[:16]
        scheme = urlsplit(self.settings.broadcast_url).scheme
        self.single_process = scheme == "memory"  # memory:// reaches no other process
        if scheme in ("redis", "rediss"):
            self.backend = RedisPubSubBackend(self.settings.broadcast_url)
            self.broadcast = Broadcast(backend=self.backend)
        else:
            self.broadcast = Broadcast(self.settings.broadcast_url)
        await self.broadcast.connect()
        presence_known = asyncio.get_running_loop().create_future()
        self.presence_relay = asyncio.create_task(self.relay_presence(presence_known))
        await asyncio.wait([presence_known, self.presence_relay], return_when=asyncio.FIRST_COMPLETED)
        if not presence_known.done():
            self.presence_relay.result()  # it failed before it could start: say why
        self.hashers = ThreadPoolExecutor(2, thread_name_prefix="chatx-hash", initializer=yield_to_the_event_loop)
        await self.writer.run(heartbeat, self.process_id, [])
        self.upkeep = asyncio.create_task(self.keep_presence())
        if self.settings.tune_gc:
            tune_collector()

    async def stop(self) -> None:
        """Close sockets with 1012 so clients reconnect elsewhere, then leave."""
        for socket in list(self.sockets):
            socket.shut(1012)
        waiting = [socket.finished for socket in list(self.sockets)]
        if waiting:
            await asyncio.wait(waiting, timeout=5)
        self.upkeep.cancel()
        await asyncio.gather(self.upkeep, *self.background, return_exceptions=True)
        try:
            await self.announce(await self.writer.run(unregister_process, self.process_id))
        except Exception:
            logger.exception("could not unregister this process; the sweep will")
        self.presence_relay.cancel()
        await asyncio.gather(self.presence_relay, return_exceptions=True)
        try:
            await self.broadcast.disconnect()
        except Exception:
            logger.exception("broadcast did not disconnect cleanly")
        await self.writer.stop()
        if self.reads is not self.database:
            await self.reads.disconnect()
        await self.database.disconnect()
        self.hashers.shutdown(wait=False)

    def spawn(self, coroutine: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    # accounts and sessions

    async def create_user(self, username: str, password: str) -> User | None:
        password_hash = await self.off_loop(hash_password, password)
        try:
            return await self.writer.run(insert_user, username, password_hash, now_ms())
        except Exception as exc:
            if is_unique_violation(exc):
                return None
            raise

    async def authenticate(self, username: str, password: str) -> User | None:
        row = await self.reads.fetch_one(
            sa.select(users.c.id, users.c.username, users.c.password_hash).where(
                users.c.username_key == username.lower()
            )
        )
        matches = await self.off_loop(check_password, password, row["password_hash"] if row else DUMMY_HASH)
        return User(row["id"], row["username"]) if row and matches else None

    async def off_loop(self, function: Callable[..., Any], *args: Any) -> Any:
        """Slow hashes run in the hashing threads, never on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.hashers, function, *args)

    async def create_session(self, user: User) -> str:
        token = secrets.token_urlsafe(32)
        await self.writer.run(insert_session, session_id(token), user.id, now_ms() + SESSION_DAYS * 86_400_000)
        return f"{token}.{sign(self.secret, token)}"

    async def fetch_raw(self, sql: str, *args: Any) -> list[Any]:
        """A hot read straight to the driver, in SQLite's SQL: databases compiles
        every query anew, which was most of the CPU of opening a socket."""
        if self.postgres:
            async with self.database.connection() as conn:
                return await conn.raw_connection.fetch(postgres_marks(sql), *args)
        return await self.reads.fetch_raw(sql, args)

    async def session_from(self, conn: HTTPConnection) -> Session | None:
        token, _, signature = conn.cookies.get(SESSION_COOKIE, "").rpartition(".")
        if not token or not hmac.compare_digest(signature, sign(self.secret, token)):
            return None
        rows = await self.fetch_raw(
            "SELECT s.id, u.id, u.username FROM chatx_sessions s JOIN chatx_users u ON u.id = s.user_id "
            "WHERE s.id = ? AND s.expires_at > ?", session_id(token), now_ms())
        return Session(rows[0][0], User(rows[0][1], rows[0][2])) if rows else None

    async def session_alive(self, sid: str) -> bool:
        return bool(await self.fetch_raw("SELECT 1 FROM chatx_sessions WHERE id = ?", sid))

    async def revoke_session(self, session: Session) -> None:
        """Delete the session, then close its sockets on every process with 4401."""
        await self.writer.run(delete_session, session.id)
        await self.publish(f"user:{session.user.id}", dumps({"type": "revoke", "session": session.id}))

    async def find_user(self, username: str) -> User | None:
        key = username.lower()
        user = self.users_by_key.get(key)
        if user is None:
            rows = await self.fetch_raw("SELECT id, username FROM chatx_users WHERE username_key = ?", key)
            if not rows:
                return None
            user = self.users_by_key[key] = User(rows[0][0], rows[0][1])
        return user

    # messages

    def store_message(self, sender: User, recipient: User, body: str, client_id: str | None) -> asyncio.Future:
        """Queue the message for the next commit; the future gives the stored
        message, or the original for a (sender, client_id) stored before."""
        return self.writer.submit_bulk(self.insert_messages, NewMessage(sender, recipient, body, client_id),
                                       one_statement=True)

    def deliver_message(self, frame: str, sender: User, recipient: User) -> None:
        """Hand the frame to this process's sockets of both people at once (no
        trip through Redis), then publish it for the other processes' sockets."""
        for user_id in {sender.id, recipient.id}:
            event = Event(f"{self.namespace}:user:{user_id}", frame)  # deduplicated by id, like a published one
            for socket in list(self.local.get(user_id, ())):
                socket.enqueue(event)
            self.publish_elsewhere(f"user:{user_id}", frame)

    async def messages_since(self, user: User, after: int, limit: int) -> list[dict[str, Any]]:
        rows = await self.fetch_raw(
            "SELECT m.id, s.username, r.username, m.body, m.sent_at, m.client_id FROM chatx_messages m "
            "JOIN chatx_users s ON s.id = m.sender_id JOIN chatx_users r ON r.id = m.recipient_id "
            "WHERE (m.sender_id = ? OR m.recipient_id = ?) AND m.id > ? ORDER BY m.id LIMIT ?",
            user.id, user.id, after, limit)
        return [message_object(*row) for row in rows]  # columns in message_object's order

    async def newest_message_id(self) -> int:
        return (await self.fetch_raw("SELECT max(id) FROM chatx_messages"))[0][0] or 0

    async def conversation_page(self, me: User, peer: User, before: int | None, after: int | None, limit: int):
        query = select_messages(conversation(me.id, peer.id))
        if after is not None:
            query = query.where(messages.c.id > after).order_by(messages.c.id)
        else:
            if before is not None:
                query = query.where(messages.c.id < before)
            query = query.order_by(messages.c.id.desc())
        rows = await self.reads.fetch_all(query.limit(limit + 1))
        page = [message_from_row(row) for row in rows[:limit]]
        if after is None:
            page.reverse()
        read_up_to = {
            me.username: await read_cursor(self.reads, me.id, peer.id),
            peer.username: await read_cursor(self.reads, peer.id, me.id),
        }
        return {"messages": page, "has_more": len(rows) > limit, "read_up_to": read_up_to}

    async def contacts(self, me: User) -> list[dict[str, Any]]:
        cursor = (
            sa.select(read_cursors.c.up_to)
            .where(read_cursors.c.user_id == me.id, read_cursors.c.peer_id == users.c.id)
            .scalar_subquery()
        )
        unread = (
            sa.select(sa.func.count())
            .select_from(messages)
            .where(messages.c.recipient_id == me.id, messages.c.sender_id == users.c.id,
                   messages.c.id > sa.func.coalesce(cursor, 0))
            .scalar_subquery()
        )
        rows = await self.reads.fetch_all(
            sa.select(users.c.id, users.c.username, users.c.status, users.c.last_seen, unread.label("unread"))
            .where(users.c.id != me.id)
            .order_by(users.c.username_key)
        )
        return [
            {"id": r["id"], "username": r["username"], "status": r["status"], "last_seen": iso(r["last_seen"]),
             "unread": r["unread"]}
            for r in rows
        ]

    def send_bucket(self, user_id: int) -> TokenBucket:
        bucket = self.buckets.get(user_id)
        if bucket is None:
            burst = self.settings.send_burst
            bucket = self.buckets[user_id] = TokenBucket(self.settings.send_rate, burst, burst)
        return bucket

    # presence

    def hello(self, user: User) -> str:
        """From this process's view of presence, which is kept in step with the
        presence frames handed to sockets (no query per socket). Entries are
        encoded once, when they change: in a storm of connections every hello
        lists hundreds of people."""
        me = user.username.lower()
        entries = ",".join(entry for key, entry in self.online.items() if key != me)
        return '{"type":"hello","user":' + dumps(user.public()) + ',"presence":[' + entries + "]}"

    def note_presence(self, entry: dict[str, Any]) -> bool:
        """Record a presence change; False if it is no news (this process knows
        the same or a later one: frames from several processes may cross)."""
        key = entry["username"].lower()
        known = self.presence.get(key)
        if known is not None:
            if known == (entry["status"], entry["last_seen"]):
                return False  # a repeat
            if (known[1] or "") > (entry["last_seen"] or ""):  # fixed-width ISO times sort as strings
                return False  # older than what this process knows
        self.presence[key] = (entry["status"], entry["last_seen"])
        if entry["status"] == "online":
            self.online[key] = dumps({"username": entry["username"], "status": "online",
                                      "last_seen": entry["last_seen"]})
        else:
            self.online.pop(key, None)
        return True

    async def refresh_presence(self) -> None:
        """Read every user's presence again and tell local sockets what changed,
        oldest first: after a broadcast outage, and every heartbeat in case a
        process died between committing a change and publishing it."""
        rows = await self.fetch_raw("SELECT username, status, last_seen FROM chatx_users ORDER BY last_seen")
        entries = [presence_frame(username, status, iso(last_seen)) for username, status, last_seen in rows]
        self.fan_out([dumps(entry) for entry in entries if self.note_presence(entry)])

    def fan_out(self, frames: list[str]) -> None:
        if frames:
            for socket in list(self.sockets):
                for frame in frames:
                    socket.enqueue(frame)

    async def socket_closed(self, socket_id: str, user_id: int) -> None:
        await self.announce(await self.writer.run(close_socket, socket_id, user_id))

    async def announce(self, transitions: list[Transition]) -> None:
        for username, status, last_seen in transitions:
            await self.status_hook.send(username, status, datetime.fromtimestamp(last_seen / 1000, timezone.utc))

    def publish_presence(self, username: str, status: str, last_seen: datetime) -> None:
        """This process's sockets learn at once, the other processes through the broadcast."""
        frame = presence_frame(username, status, iso_time(last_seen))
        text = dumps(frame)
        if self.note_presence(frame):
            self.fan_out([text])
        self.publish_elsewhere("presence", text)

    async def keep_presence(self) -> None:
        """Heartbeat this process and sweep dead ones. Beats every TTL/4 and a
        process silent for TTL/2 is dead, so its users are offline within TTL."""
        ttl = self.settings.presence_ttl
        while True:
            await asyncio.sleep(max(ttl / 4, 0.25))
            try:
                live = [(socket.socket_id, socket.user.id) for socket in list(self.sockets)]
                transitions = await self.writer.run(heartbeat, self.process_id, live)
                transitions += await self.writer.run(sweep, int(ttl * 500))
                await self.announce(transitions)
                await self.refresh_presence()
            except Exception:
                logger.exception("presence upkeep failed; trying again")

    # broadcast

    async def relay_presence(self, known: asyncio.Future) -> None:
        """One subscription per process hands presence frames to every local
        socket and keeps the view that hello frames are made from. A frame
        that is no news (an older one arriving late) goes to no one."""
        async with self.subscribe("presence") as subscriber:
            await self.refresh_presence()  # after subscribing: no change falls in between
            known.set_result(None)
            while True:
                event = await subscriber.get()
                if isinstance(event.message, Resync):
                    await self.refresh_presence()
                elif self.note_presence(json.loads(event.message)):
                    self.fan_out([event.message])

    async def listen_for(self, socket: ChatSocket) -> None:
        """Hand `socket` everything published to its user; return once that is
        subscribed. One subscription and one relay task per user serve all of
        that user's sockets on this process."""
        user_id = socket.user.id
        if user_id not in self.local:
            self.local[user_id] = set()
            subscribed = asyncio.get_running_loop().create_future()
            self.relays[user_id] = (asyncio.create_task(self.relay_user(user_id, subscribed)), subscribed)
        self.local[user_id].add(socket)
        await asyncio.shield(self.relays[user_id][1])

    def stop_listening(self, socket: ChatSocket) -> None:
        user_id = socket.user.id
        sockets = self.local.get(user_id)
        if sockets is None:
            return
        sockets.discard(socket)
        if not sockets:
            del self.local[user_id]
            relay, subscribed = self.relays.pop(user_id)
            relay.cancel()
            subscribed.cancel()
            self.ending_relays[user_id] = relay
            relay.add_done_callback(functools.partial(self.relay_ended, user_id))

    def relay_ended(self, user_id: int, relay: asyncio.Task) -> None:
        if self.ending_relays.get(user_id) is relay:
            del self.ending_relays[user_id]

    async def relay_user(self, user_id: int, subscribed: asyncio.Future) -> None:
        # A relay of this user that is still unsubscribing must finish first, or
        # its UNSUBSCRIBE would land after this SUBSCRIBE.
        if (ending := self.ending_relays.get(user_id)) is not None:
            await asyncio.gather(ending, return_exceptions=True)
        async with self.subscribe(f"user:{user_id}") as subscriber:
            subscribed.set_result(None)
            while True:
                event = await subscriber.get()
                for socket in list(self.local.get(user_id, ())):
                    socket.enqueue(event)

    def subscribe(self, channel: str) -> Any:
        # One subscriber per channel and process (presence, and a relay per user),
        # so broadcaster's race between two first subscribers of a channel cannot occur.
        return self.broadcast.subscribe(f"{self.namespace}:{channel}")

    async def publish(self, channel: str, frame: str) -> None:
        """Best effort: while Redis is away the message is already stored, and
        sockets catch up from the database once it is back."""
        try:
            await self.broadcast.publish(f"{self.namespace}:{channel}", frame)
        except (RedisError, OSError) as exc:
            logger.warning("publish to %s failed: %s", channel, exc)

    def publish_elsewhere(self, channel: str, frame: str) -> None:
        """Publish, without waiting, a frame this process has delivered already."""
        if self.backend is not None:
            self.backend.publish_elsewhere(f"{self.namespace}:{channel}", frame)  # Redis: others only
        elif not self.single_process:
            self.spawn(self.publish(channel, frame))  # comes back too: sockets and the view drop repeats

    async def health(self) -> dict[str, str]:
        try:
            await asyncio.wait_for(self.database.fetch_val("SELECT 1"), 2)  # opens a connection: is the file still there?
            database = "ok"
        except Exception:
            database = "fail"
        broadcast = "ok" if self.backend is None or self.backend.healthy else "fail"
        return {"database": database, "broadcast": broadcast}


def tune_collector() -> None:
    """Freeze what is alive once started, and collect young objects less often.

    Measured under load: every second or two a full collection walked the
    ~100,000 objects that live as long as the process (modules, SQLAlchemy's
    tables) and stalled the event loop for about 80 ms; the young generation's
    threshold of 700 cost half a millisecond some 14 times a second. Frozen,
    with a threshold of 10,000, the collector took 2 % of that time, its
    longest pause 5.5 ms."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def create_app(**settings: Any) -> Starlette:
    """A fresh ChatX ASGI app; keyword settings win over CHATX_* variables and `.env`."""
    chat = ChatX(load_settings(**settings))
    routes = [
        Route("/", chat_page, name="chat_page"),
        Route("/login", login_page, name="login_page"),
        Route("/register", register_page, name="register_page"),
        Route("/api/register", register, methods=["POST"]),
        Route("/api/login", login, methods=["POST"]),
        Route("/api/logout", logout, methods=["POST"]),
        Route("/api/me", me),
        Route("/api/users", user_list),
        Route("/api/conversations/{username}/messages", conversation_messages),
        Route("/healthz", healthz),
        WebSocketRoute("/ws", WebSocketEndpoint()),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=chat.lifespan,
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error},
    )
    app.add_middleware(SecurityHeaders)
    app.state.chat = chat
    return app


app = create_app()
