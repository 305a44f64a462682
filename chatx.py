"""ChatX: one-to-one web chat with live presence, in one Starlette module.

Run it with `uvicorn chatx:app`; build more apps with `create_app(**settings)`.
docs/protocol.md describes the interface: HTTP, WebSocket frames, presence,
embedding. Each section below uses only the sections above it
(tests/test_layering.py checks it):

    helpers: time and JSON, limits and close codes, settings and logging,
    schema, storage front (Connection, Writer, Storage), queries and write
    jobs, wire frames (and STREAM_KINDS), broadcast transport, services
    (OpenSocket, Metrics, Limits, Accounts, Identity, Fanout, Presence, a
    message's fields, Messenger, Attachments), requests and sockets alike,
    the WebSocket (SocketServices, ChatSocket, the frame handlers), HTTP,
    the composition root and the app (ChatX, create_app), and the command
    line (`python -m chatx`).

Where each rule lives:

    a stream's order, one seq per event   Writer, Connection.begin, lock_users, append_events, number_messages
    a stream event's frame                STREAM_KINDS (MessageEvent, ReadEvent), EVENT_QUERY
    who sees whose presence               Presence, the queries audience/partner_presence, SEES_PRESENCE
    blocks                                Presence.blocked/unblocked, BLOCKED_EITHER_WAY
    rate and size limits                  Limits (TokenBucket), the constants in "limits and close codes"
    the first-contact budget              Messenger.first_contact, check_first_contact
    sessions, passwords, revocation       Accounts (Revoke goes out through Fanout)
    a host's own sign-in                  Identity
    attachments: upload, check, read      Attachments, AttachmentStore, readable_attachment
    who may read a message or a page      the read queries, given the reader (history_page, ...)
    frames a client may send              FRAME_HANDLERS, and the *_field checks (also of ChatX.send)
    a slow or lagging reader              ChatSocket (outbox, backlog, catch-up), Fanout.close_stalled
    Origin and Host checks                origin_allowed, TrustedHosts
    the schema and its upgrades           migrate, which ChatX.start hands to Storage.start

How to add an event kind (one that is stored in people's streams, like an
edit) takes six places: (1) a member of EventKind; (2) a write job in
"queries and write jobs" that changes the rows, calls lock_users then
append_events with the kind and returns Stored, its own values in `fields`
(as change_message and advance_read_cursor do); (3) its entry in
STREAM_KINDS, which makes its frame from the Stored when live and from its
named row of EVENT_QUERY when replayed; (4) a Messenger method that writes the
job and announces the result; (5) its handler in FRAME_HANDLERS (or a route)
that calls it; (6) a case in static/frames.js FrameHandler.apply. Then
docs/protocol.md and tests. A kind with values of its own (not a message's)
also needs their columns: in chatx_events, a step of migrate, and EVENT_QUERY.
A frame that is not stored (like typing) needs only the handler, a Frame
delivered through Fanout, the case in frames.js, the docs and a test.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import functools
import gc
import getpass
import hashlib
import hmac
import inspect
import io
import ipaddress
import json
import logging
import math
import multiprocessing
import operator
import os
import random
import re
import secrets
import shutil
import sqlite3
import struct
import sys
import tempfile
import threading
import time
import unicodedata
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from socket import AF_INET, AF_INET6, IPPROTO_TCP, SO_KEEPALIVE, SO_LINGER, SOL_SOCKET
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Protocol, TypeVar, Union
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import aiosqlite
import asyncpg
import jwt
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
import redis.asyncio as aioredis
import sqlalchemy as sa
from broadcaster import Broadcast, BroadcastBackend, Event
from databases import Database
from PIL import Image, ImageOps
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from sqlalchemy.dialects.sqlite import pysqlite
from sqlalchemy.schema import CreateIndex, CreateTable
from starlette import status as codes
from starlette.applications import Starlette
from starlette.config import Config
from starlette.datastructures import CommaSeparatedStrings
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.schemas import SchemaGenerator
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import ClientDisconnected, is_ssl
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState

try:
    from socket import TCP_KEEPCNT, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_USER_TIMEOUT  # Linux
except ImportError:
    TCP_KEEPCNT = TCP_KEEPIDLE = TCP_KEEPINTVL = TCP_USER_TIMEOUT = None

__version__ = "2.0.0"
logger = logging.getLogger("chatx")
HERE = Path(__file__).resolve().parent
# templates/ and static/ sit beside chatx.py in a clone, and in chatx_assets/ beside it once installed.
ASSETS = HERE / "chatx_assets" if (HERE / "chatx_assets").is_dir() else HERE


# ---- helpers: time and JSON ---------------------------------------------------------


def now_ms() -> int:
    return int(time.time() * 1000)


def iso_time(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@functools.lru_cache(maxsize=1024)  # the messages of one commit share their sent_at
def iso(ms: int | None) -> str | None:
    return None if ms is None else iso_time(datetime.fromtimestamp(ms / 1000, timezone.utc))


# json.dumps with options other than its defaults builds a new encoder for
# every call, and a message is encoded several times on its way: the encoder
# is built once here, the only place that goes around json's public API.
_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_encode_chunks = None if json.encoder.c_make_encoder is None else json.encoder.c_make_encoder(
    None, _encoder.default, json.encoder.encode_basestring, None, ":", ",", False, False, True)


def dumps(value: Any) -> str:
    """Compact JSON text, non-ASCII characters as they are."""
    if _encode_chunks is None:
        return _encoder.encode(value)
    return "".join(_encode_chunks(value, 0))


# ---- limits and close codes -----------------------------------------------------

USERNAME_RE = re.compile(r"[A-Za-z0-9_.-]{3,32}")
PASSWORD_MIN, PASSWORD_MAX = 8, 1024
BODY_MAX = 4000
CLIENT_ID_MAX = 128
FRAME_MAX_BYTES = 64 * 1024
HTTP_BODY_MAX = 64 * 1024
PAGE_DEFAULT, PAGE_MAX = 50, 200  # conversation history and the conversation list
PAGE_BYTES_MAX = 256 * 1024  # a page stops short of this many bytes of JSON (always holding one item)
DIRECTORY_DEFAULT, DIRECTORY_MAX = 20, 100
QUERY_MAX = 32
# Rows of a heartbeat's presence refresh read and held at once: there is one
# per user here and partner of theirs who changed, thousands when many come online together.
REFRESH_PAGE = 500
REPLAY_PAGE = 50  # events read and held at once by a socket catching up (at most 16 kB each)
SEND_STALL_S = 10  # a socket whose client has not taken a frame for this long is closed with CLOSE_TRY_LATER
# A socket with more queued than this (frames, or UTF-8 bytes of their text)
# reads its stream from the database instead, at its reader's pace (see ChatSocket).
BACKLOG_FRAMES = 1000
BACKLOG_BYTES = 1024 * 1024
# What stays queued then (acks and errors: answers to a client that sends
# without reading) past this, or past BACKLOG_FRAMES, closes it with CLOSE_TRY_LATER.
REPLIES_BYTES_MAX = 4 * 1024 * 1024
WRITE_BYTES = 64 * 1024  # a socket writes its ready frames once this many UTF-8 bytes are ready, or at its batch's end
SENDS_IN_FLIGHT_MAX = 64  # a socket's sends awaiting their commit before it stops reading frames
SESSION_COOKIE = "chatx_session"
JWT_SECRET_MIN = 32  # bytes, the length of HS256's hash (RFC 7518 section 3.2)
SECURE_SESSION_COOKIE = "__Host-chatx_session"  # over HTTPS: only this origin can set it, no sibling subdomain
THEME_COOKIE = "chatx_theme"  # set by static/theme.js; not a secret
THEMES = ("light", "dark")  # "system" is the absence of a choice
SESSION_DAYS = 30  # a session ends this long after sign-in, or after CHATX_SESSION_IDLE_DAYS unused
SESSION_TOUCH_MS = 3_600_000  # how stale a session's last use may be recorded
LOGIN_WINDOW_MS = 15 * 60_000
SIGNUP_WINDOW_MS = 3_600_000
HASHES_WAITING_MAX = 16  # password hashes of existing users queued in this process; beyond, 503 busy
SIGNUP_HASHES_WAITING_MAX = 4  # those of sign-ups, in threads of their own
HASHES_PER_ADDRESS_MAX = 2  # password hashes in flight for one client address
DEPTH_MAX = 32  # nesting of a JSON frame
HEAD_TIMEOUT_S = 10  # for a request's line and headers to arrive (HTTPProtocol)
BODY_TIMEOUT_S = 10  # for a request's body to arrive
# HTTPProtocol: a whole request, head and body, arrives within REQUEST_TIMEOUT_S,
# plus a second for every REQUEST_BYTES_PER_S of body it has sent so far.
REQUEST_TIMEOUT_S = 20
REQUEST_BYTES_PER_S = 16 * 1024
RESPONSE_STALL_S = 10  # a client that takes nothing of its response for this long is cut off (HTTPProtocol)
RESPONSE_SLICE_BYTES = 64 * 1024  # response bodies go out in slices, each written once the last was taken
ID_MAX = 2**31 - 1  # message ids are 32-bit integers; a larger cursor means "past the end"
COUNTED_CHANNELS_MAX = 100_000  # channels the publisher remembers another process on (RedisPubSubBackend)
# A writer that committed less than COMMIT_BUSY_S ago waits COMMIT_LINGER_S
# before the next commit, so that one commit takes the sends of many sockets.
COMMIT_BUSY_S = 0.005
COMMIT_LINGER_S = 0.001
JOBS_PER_COMMIT = 256
COMMIT_RETRIES = 5  # a batch PostgreSQL ended for a deadlock or serialization failure runs again this often
COMMIT_FAILURE_MEMORY_S = 5  # /healthz says the database fails this long after a commit failed
# SQLite's log is copied into the database by a thread at most every
# CHECKPOINT_INTERVAL_S while commits come, and by a commit only past WAL_BACKSTOP_PAGES.
CHECKPOINT_INTERVAL_S = 0.1
WAL_BACKSTOP_PAGES = 10_000
# A full disk: the log is kept under WAL_LIMIT_BYTES, and a file of RESERVE_BYTES
# is kept beside the database, released so that a checkpoint can run once the
# disk is full, and made again before writes resume.
WAL_LIMIT_BYTES = 1024 * 1024
RESERVE_BYTES = 512 * 1024
RESERVE_RETRY_S = 0.25
# A database that stops answering without closing the connection fails like
# one that closed it: every statement, connection and health probe has a deadline,
# and the kernel resets a PostgreSQL connection silent for TCP_SILENCE_S.
STATEMENT_TIMEOUT_S = 5
CONNECT_TIMEOUT_S = 3
TCP_SILENCE_S = 4
HEALTH_TIMEOUT_S = 2
START_RETRY_MAX_S = 2  # the longest wait between attempts to start while the database or broker is away
SHUTDOWN_S = 4  # the services' share of a shutdown, after uvicorn's --timeout-graceful-shutdown
ATTACHMENT_CHUNK_BYTES = 128 * 1024  # an attachment is stored, and read back, this much at a time
ATTACHMENT_NAME_MAX = 255
UPLOAD_SPOOL_BYTES = 256 * 1024  # an upload larger than this waits in a temporary file, not in memory
UPLOAD_WRITE_BYTES = 256 * 1024  # a body is gathered into pieces this large before a thread writes it out
CHUNKS_READ_AT_ONCE = 4  # attachment chunks a thread reads back from the temporary file at a time
UPLOAD_SWEEP_S = 60  # at most this long between sweeps of unsent uploads
THUMBNAIL_MAX = 320  # pixels on the long side
IMAGE_PIXELS_MAX = 50_000_000  # a larger image is a file: decoding it would cost too much memory
IMAGES_DECODED_AT_ONCE = 2  # uploads whose image is checked and thumbnailed at once, each in a process of its own
DECODER_NICE = 10  # the decoder processes' CPU priority below the server's
CHUNKS_QUEUED_MAX = 1  # attachment chunks being written at once: on SQLite a commit of messages carries no more
# Only these are shown in the page; everything else is downloaded (an HTML or SVG file never runs in ChatX's origin).
INLINE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}

CLOSE_POLICY = codes.WS_1008_POLICY_VIOLATION  # a bad query string
CLOSE_TOO_BIG = codes.WS_1009_MESSAGE_TOO_BIG
CLOSE_ERROR = codes.WS_1011_INTERNAL_ERROR  # a server fault, never a client's input
CLOSE_RESTART = codes.WS_1012_SERVICE_RESTART
CLOSE_TRY_LATER = codes.WS_1013_TRY_AGAIN_LATER
CLOSE_REVOKED = 4401
CLOSE_TOO_MANY = 4429


# ---- settings and logging -----------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///chatx.db"
    broadcast_url: str = "memory://"
    secret_key: str | None = None
    presence_ttl: float = 30.0
    presence_grace: float = 5.0
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ("*",)
    trusted_proxies: tuple[str, ...] = ()
    send_rate: float = 5.0
    send_burst: float = 30.0
    frame_rate: float = 20.0
    frame_burst: float = 100.0
    directory_rate: float = 1.0
    directory_burst: float = 30.0
    first_contacts_per_sender: int = 20
    first_contacts_per_recipient: int = 60
    typing_interval: float = 2.0
    max_sockets_per_user: int = 20
    http_connections_per_address: int = 32
    read_rate: float = 5.0
    read_burst: float = 30.0
    login_failures_per_user: int = 5
    login_failures_per_address: int = 20
    signups_per_address: int = 10
    registration: str = "open"
    session_idle_days: float = 14.0
    metrics: bool = False
    metrics_allow: tuple[str, ...] = ("127.0.0.1", "::1")
    log_format: str = "text"
    tune_gc: bool = True
    jwt_secret: str = ""
    login_url: str = ""
    max_attachment_bytes: int = 10 * 1024 * 1024
    attachment_bytes_per_day: int = 200 * 1024 * 1024
    unsent_upload_s: float = 3600.0  # an upload no message used for this long is erased


def load_settings(**overrides: Any) -> Settings:
    """Keyword arguments win over the environment, which wins over `.env`."""
    unknown = set(overrides) - set(Settings.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown ChatX setting(s): {', '.join(sorted(unknown))}")
    config = Config(".env" if os.path.isfile(".env") else None, env_prefix="CHATX_")
    values: dict[str, Any] = {
        "database_url": config("DATABASE_URL", default=Settings.database_url),
        "broadcast_url": config("BROADCAST_URL", default=Settings.broadcast_url),
        "secret_key": config("SECRET_KEY", default=None) or None,
        "presence_ttl": config("PRESENCE_TTL", cast=float, default=Settings.presence_ttl),
        "presence_grace": config("PRESENCE_GRACE", cast=float, default=Settings.presence_grace),
        "allowed_origins": config("ALLOWED_ORIGINS", cast=CommaSeparatedStrings, default=""),
        "allowed_hosts": config("ALLOWED_HOSTS", cast=CommaSeparatedStrings, default="*"),
        "trusted_proxies": config("TRUSTED_PROXIES", cast=CommaSeparatedStrings, default=""),
        "send_rate": config("SEND_RATE", cast=float, default=Settings.send_rate),
        "send_burst": config("SEND_BURST", cast=float, default=Settings.send_burst),
        "frame_rate": config("FRAME_RATE", cast=float, default=Settings.frame_rate),
        "frame_burst": config("FRAME_BURST", cast=float, default=Settings.frame_burst),
        "directory_rate": config("DIRECTORY_RATE", cast=float, default=Settings.directory_rate),
        "directory_burst": config("DIRECTORY_BURST", cast=float, default=Settings.directory_burst),
        "first_contacts_per_sender": config("FIRST_CONTACTS_PER_SENDER", cast=int,
                                            default=Settings.first_contacts_per_sender),
        "first_contacts_per_recipient": config("FIRST_CONTACTS_PER_RECIPIENT", cast=int,
                                               default=Settings.first_contacts_per_recipient),
        "typing_interval": config("TYPING_INTERVAL", cast=float, default=Settings.typing_interval),
        "max_sockets_per_user": config("MAX_SOCKETS_PER_USER", cast=int, default=Settings.max_sockets_per_user),
        "http_connections_per_address": config("HTTP_CONNECTIONS_PER_ADDRESS", cast=int,
                                               default=Settings.http_connections_per_address),
        "read_rate": config("READ_RATE", cast=float, default=Settings.read_rate),
        "read_burst": config("READ_BURST", cast=float, default=Settings.read_burst),
        "login_failures_per_user": config("LOGIN_FAILURES_PER_USER", cast=int,
                                          default=Settings.login_failures_per_user),
        "login_failures_per_address": config("LOGIN_FAILURES_PER_ADDRESS", cast=int,
                                             default=Settings.login_failures_per_address),
        "signups_per_address": config("SIGNUPS_PER_ADDRESS", cast=int, default=Settings.signups_per_address),
        "registration": config("REGISTRATION", default=Settings.registration),
        "session_idle_days": config("SESSION_IDLE_DAYS", cast=float, default=Settings.session_idle_days),
        "metrics": config("METRICS", cast=bool, default=Settings.metrics),
        "metrics_allow": config("METRICS_ALLOW", cast=CommaSeparatedStrings, default="127.0.0.1,::1"),
        "log_format": config("LOG_FORMAT", default=Settings.log_format),
        "tune_gc": config("TUNE_GC", cast=bool, default=Settings.tune_gc),
        "jwt_secret": config("JWT_SECRET", default=Settings.jwt_secret),
        "login_url": config("LOGIN_URL", default=Settings.login_url),
        "max_attachment_bytes": config("MAX_ATTACHMENT_BYTES", cast=int, default=Settings.max_attachment_bytes),
        "attachment_bytes_per_day": config("ATTACHMENT_BYTES_PER_DAY", cast=int,
                                           default=Settings.attachment_bytes_per_day),
        "unsent_upload_s": config("UNSENT_UPLOAD_S", cast=float, default=Settings.unsent_upload_s),
    }
    values.update(overrides)
    for name in ("allowed_origins", "allowed_hosts", "trusted_proxies", "metrics_allow"):
        if isinstance(values[name], str):
            values[name] = CommaSeparatedStrings(values[name])
        values[name] = tuple(item.strip().rstrip("/") for item in values[name] if item.strip())
    if values["registration"] not in ("open", "closed"):
        raise ValueError("CHATX_REGISTRATION is 'open' or 'closed'")
    if values["log_format"] not in ("text", "json"):
        raise ValueError("CHATX_LOG_FORMAT is 'text' or 'json'")
    if values["unsent_upload_s"] <= 0:
        raise ValueError("CHATX_UNSENT_UPLOAD_S is a number of seconds above 0")
    if values["jwt_secret"] and len(values["jwt_secret"].encode()) < JWT_SECRET_MIN:
        raise ValueError(f"CHATX_JWT_SECRET is at least {JWT_SECRET_MIN} bytes: a shorter one can be guessed")
    return Settings(**values)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line (CHATX_LOG_FORMAT=json)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": iso(int(record.created * 1000)), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return dumps(entry)


def configure_logging(log_format: str) -> None:
    """Give ChatX's log lines a time, level and name, unless the host set up logging itself."""
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


# ---- schema -------------------------------------------------------------------------
#
# SCHEMA_VERSION is kept in chatx_settings; migrate() brings an older database
# up to it on start. Version 1 is every database made before the version was
# recorded.

SCHEMA_VERSION = 3

metadata = sa.MetaData()

users = sa.Table(
    "chatx_users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("username", sa.String(32), nullable=False),
    # Byte order on PostgreSQL too, so that a prefix is a range of the index.
    sa.Column("username_key", sa.String(32).with_variant(sa.String(32, collation="C"), "postgresql"),
              nullable=False, unique=True),
    # The key with look-alike characters folded (see skeleton()): no two users share one.
    sa.Column("skeleton", sa.String(32), nullable=False, index=True),
    sa.Column("password_hash", sa.String(256), nullable=False),
    sa.Column("status", sa.String(8), nullable=False, server_default="offline"),
    sa.Column("last_seen", sa.BigInteger, nullable=True),
    sa.Column("gone_at", sa.BigInteger, nullable=True),  # when the last socket closed: the grace starts
    sa.Column("seq", sa.BigInteger, nullable=False, server_default="0"),  # the newest seq of the stream
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Index("chatx_users_last_seen", "last_seen"),
    sqlite_autoincrement=True,  # ids grow: a deleted user's id is never given again
)

sessions = sa.Table(
    "chatx_sessions",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # sha256 of the token: a leaked table signs no one in
    sa.Column("user_id", sa.Integer, sa.ForeignKey("chatx_users.id"), nullable=False, index=True),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Column("used_at", sa.BigInteger, nullable=False, server_default="0"),  # to within SESSION_TOUCH_MS
)

# Failed sign-ins and sign-ups, by user or client address, kept for their window.
attempts = sa.Table(
    "chatx_attempts",
    metadata,
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("key", sa.String(64), nullable=False),
    sa.Column("at", sa.BigInteger, nullable=False),
    sa.Index("chatx_attempts_key", "kind", "key", "at"),
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
    sa.Column("edited_at", sa.BigInteger, nullable=True),
    sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("reply_to", sa.Integer, nullable=True),
    sa.Column("attachment_id", sa.String(32), nullable=True),
    sa.UniqueConstraint("sender_id", "client_id", name="chatx_messages_client_id"),
    # On PostgreSQL a foreign key locks the user's row for every message:
    # chatx_insert_messages() checks the ids once per commit instead.
    sa.ForeignKeyConstraint(["sender_id"], ["chatx_users.id"]).ddl_if(dialect="sqlite"),
    sa.ForeignKeyConstraint(["recipient_id"], ["chatx_users.id"]).ddl_if(dialect="sqlite"),
    # Every index is another page written per message. This one finds a
    # conversation in both directions and counts the unread.
    sa.Index("chatx_messages_recipient", "recipient_id", "sender_id", "id"),
    sqlite_autoincrement=True,  # ids grow: a client resuming `after` an erased id misses nothing
)


class EventKind(enum.IntEnum):
    MESSAGE = 1
    READ = 2
    EDIT = 3
    DELETE = 4


# A user's stream: every event that concerns them, numbered 1, 2, 3, ... A row
# points at what happened; the frame is made from the current state when it is
# replayed, so an erased message leaves no text behind here.
events = sa.Table(
    "chatx_events",
    metadata,
    sa.Column("user_id", sa.Integer, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.SmallInteger, nullable=False),
    sa.Column("message_id", sa.Integer, nullable=True),  # message, edit, delete
    sa.Column("reader_id", sa.Integer, nullable=True),  # read
    sa.Column("with_id", sa.Integer, nullable=True),  # read
    sa.Column("up_to", sa.Integer, nullable=True),  # read
    sa.PrimaryKeyConstraint("user_id", "seq"),
    sqlite_with_rowid=False,
)

# One row per person and partner, kept up to date at commit, so that the
# conversation list costs its page and not the size of the database.
conversations = sa.Table(
    "chatx_conversations",
    metadata,
    sa.Column("user_id", sa.Integer, nullable=False),
    sa.Column("peer_id", sa.Integer, nullable=False),
    sa.Column("last_message_id", sa.Integer, nullable=False),
    sa.Column("unread", sa.Integer, nullable=False, server_default="0"),
    sa.Column("read_up_to", sa.Integer, nullable=False, server_default="0"),
    sa.PrimaryKeyConstraint("user_id", "peer_id"),
    sa.Index("chatx_conversations_recent", "user_id", "last_message_id"),
)

blocks = sa.Table(
    "chatx_blocks",
    metadata,
    sa.Column("user_id", sa.Integer, nullable=False),
    sa.Column("blocked_id", sa.Integer, nullable=False),
    sa.PrimaryKeyConstraint("user_id", "blocked_id"),
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
    sa.Column("session_id", sa.String(64), nullable=True),  # a socket of an ended session is closed
)

# A file or image uploaded by `uploader_id`; `message_id` is the message that
# carries it, NULL until sent. Its bytes are in chatx_attachment_chunks
# (DatabaseAttachmentStore), its thumbnail here.
attachments = sa.Table(
    "chatx_attachments",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),  # random: an id says nothing and cannot be guessed
    sa.Column("uploader_id", sa.Integer, nullable=False, index=True),
    sa.Column("message_id", sa.Integer, nullable=True, index=True),
    sa.Column("name", sa.String(ATTACHMENT_NAME_MAX), nullable=False),
    sa.Column("type", sa.String(128), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("width", sa.Integer, nullable=True),
    sa.Column("height", sa.Integer, nullable=True),
    sa.Column("thumbnail", sa.LargeBinary, nullable=True),
    sa.Column("created_at", sa.BigInteger, nullable=False, index=True),
)

attachment_chunks = sa.Table(
    "chatx_attachment_chunks",
    metadata,
    sa.Column("attachment_id", sa.String(32), nullable=False),
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.PrimaryKeyConstraint("attachment_id", "n"),
)

# Bytes each user uploaded each day (days since the epoch, UTC), for CHATX_ATTACHMENT_BYTES_PER_DAY.
upload_days = sa.Table(
    "chatx_upload_days",
    metadata,
    sa.Column("user_id", sa.Integer, nullable=False),
    sa.Column("day", sa.Integer, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.PrimaryKeyConstraint("user_id", "day"),
)

settings_table = sa.Table(
    "chatx_settings",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


# ---- storage front --------------------------------------------------------------------
#
# The only code that goes around `databases` to its drivers. databases compiles
# every statement anew, which was most of the CPU of storing a message or
# opening a socket; the SQL below is written once, with SQLite's `?` marks.


@functools.lru_cache(maxsize=256)
def postgres_marks(sql: str) -> str:
    """SQLite's `?` marks as asyncpg's `$1, $2, …` (the SQL here has no `?` in literals)."""
    numbers = iter(range(1, sql.count("?") + 1))
    return re.sub(r"\?", lambda _: f"${next(numbers)}", sql)


def marks(count: int) -> str:
    return ", ".join(["?"] * count)


T = TypeVar("T")
SQLITE_DIALECT = pysqlite.dialect(paramstyle="qmark")  # as databases compiles DDL for SQLite


class SQLiteWithPragmas(sqlite3.Connection):
    """databases opens a connection per task and a PRAGMA sent through it does
    not stick, so every new SQLite connection applies the server settings here."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # secure_delete: an erased message's text is overwritten, not left in a free page.
        for pragma in ("busy_timeout=5000", "journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON",
                       "secure_delete=ON", f"wal_autocheckpoint={WAL_BACKSTOP_PAGES}",
                       f"journal_size_limit={WAL_LIMIT_BYTES}"):
            self.execute(f"PRAGMA {pragma}")


class Connection:
    """One database connection as the queries use it."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection  # databases' own: DDL goes through SQLAlchemy
        self.driver = connection.raw_connection
        self.postgres = not isinstance(self.driver, aiosqlite.Connection)

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        if self.postgres:
            return await self.driver.fetch(postgres_marks(sql), *args)
        return list(await self.driver.execute_fetchall(sql, args))

    async def fetch_named(self, sql: str, *args: Any) -> list[Any]:
        """Rows whose columns are read by name (`row["seq"]`): asyncpg's records,
        sqlite3.Row on SQLite."""
        if self.postgres:
            return await self.fetch(sql, *args)
        async with self.driver.execute(sql, args) as cursor:
            cursor.row_factory = sqlite3.Row
            return await cursor.fetchall()

    async def fetch_one(self, sql: str, *args: Any) -> Any:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetch_value(self, sql: str, *args: Any) -> Any:
        row = await self.fetch_one(sql, *args)
        return None if row is None else row[0]

    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; return how many rows it changed."""
        if self.postgres:
            status = await self.driver.execute(postgres_marks(sql), *args)
            count = status.rsplit(" ", 1)[-1]
            return int(count) if count.isdigit() else 0
        cursor = await self.driver.execute(sql, args)
        return cursor.rowcount

    async def execute_many(self, sql: str, rows: list[tuple]) -> int | None:
        """Run one statement per row; on SQLite, return how many rows they changed."""
        if not rows:
            return 0
        if self.postgres:
            await self.driver.executemany(postgres_marks(sql), rows)
            return None
        cursor = await self.driver.executemany(sql, rows)
        return cursor.rowcount

    async def ddl(self, statement: Any) -> None:
        await self.connection.execute(statement)

    async def begin(self) -> None:
        """On SQLite, BEGIN IMMEDIATE takes the file's write lock: one writer at
        a time. On PostgreSQL writers run side by side; a write job locks the
        rows of the users it numbers events for (lock_users)."""
        await self.driver.execute("BEGIN" if self.postgres else "BEGIN IMMEDIATE")

    async def commit(self) -> None:
        await self.driver.execute("COMMIT")

    async def rollback(self) -> None:
        try:
            await self.driver.execute("ROLLBACK")
        except Exception:
            pass  # a broken connection has nothing to roll back

    async def at_once(self, job: Callable[[Connection], Awaitable[T]]) -> T:
        """SQLite: `job(connection)` whole on the driver's thread, its
        statements handed over together rather than one at a time."""
        # aiosqlite hands every statement to its thread and waits for the loop
        # to be woken with the result, which cost more CPU than the statements
        # of a commit of messages; its private _execute and _conn are the only
        # way to run several statements in one hand-over.
        return await self.driver._execute(run_to_end, job, SQLiteAtOnce(self.driver._conn))


class SQLiteAtOnce(Connection):
    """The calls of Connection, made at once on sqlite3 in the driver's thread (Connection.at_once)."""

    def __init__(self, driver: sqlite3.Connection) -> None:
        self.connection = None
        self.driver = driver
        self.postgres = False

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return self.driver.execute(sql, args).fetchall()

    async def fetch_named(self, sql: str, *args: Any) -> list[Any]:
        cursor = self.driver.execute(sql, args)
        cursor.row_factory = sqlite3.Row
        try:
            return cursor.fetchall()
        finally:
            cursor.close()

    async def execute(self, sql: str, *args: Any) -> int:
        return self.driver.execute(sql, args).rowcount

    async def execute_many(self, sql: str, rows: list[tuple]) -> int | None:
        return self.driver.executemany(sql, rows).rowcount if rows else 0

    async def ddl(self, statement: Any) -> None:
        self.driver.execute(str(statement.compile(dialect=SQLITE_DIALECT)))

    async def begin(self) -> None:
        self.driver.execute("BEGIN IMMEDIATE")

    async def commit(self) -> None:
        self.driver.execute("COMMIT")

    async def rollback(self) -> None:
        try:
            self.driver.execute("ROLLBACK")
        except Exception:
            pass  # a broken connection has nothing to roll back


def run_to_end(job: Callable[[Connection], Awaitable[T]], connection: SQLiteAtOnce) -> T:
    """Run `job(connection)`, whose awaits all finish at once on SQLiteAtOnce, to its result."""
    coroutine = job(connection)
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("a write job waited for something other than SQLite")


def is_unique_violation(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.IntegrityError) or type(exc).__name__ == "UniqueViolationError"


class Unavailable(Exception):
    """The database cannot be reached or written now; the caller may try again later."""


# What a database says when it, not the query, is the trouble: gone, restarting,
# out of disk or of connections. SQLite's OperationalError is a locked, full or
# unreadable file.
FAULT_TYPES = (OSError, sqlite3.OperationalError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
               asyncpg.exceptions.InsufficientResourcesError, asyncpg.exceptions.OperatorInterventionError,
               asyncio.TimeoutError)


def as_unavailable(exc: BaseException) -> BaseException:
    return Unavailable(f"{type(exc).__name__}: {exc}") if isinstance(exc, FAULT_TYPES) else exc


def is_disk_full(exc: BaseException) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


class Checkpointer:
    """Copies SQLite's write-ahead log into the database file from a thread
    of its own, on a connection of its own, a moment after each commit.

    SQLite's automatic checkpoint runs inside a commit, on the writer's
    thread, and syncs both files, holding up every message meanwhile. A
    passive checkpoint elsewhere lets commits go on.

    It also keeps a full disk from stopping ChatX for good. A checkpoint
    needs room to grow the database file; without it the log cannot be
    emptied, and once space returns the log's growth takes it all again. So
    the log is emptied once it passes WAL_LIMIT_BYTES, and a reserve file of
    RESERVE_BYTES sits beside the database: when the disk is full it is
    deleted, a truncating checkpoint empties the log, and the reserve is made
    again. Writes go on only while `room` (Writer._submit): the reserve is in
    place and as much again is free, as seen every RESERVE_RETRY_S; processes
    sharing the file share the reserve too."""

    def __init__(self, path: str, interval: float = CHECKPOINT_INTERVAL_S) -> None:
        self.path, self.interval = path, interval
        self.reserve = path + "-reserve"
        self.room = False
        self._written = threading.Event()
        self._stopping = False
        self._truncate = False
        self._full = False
        self._connection: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None

    def prepare(self) -> bool:
        """Before the writer opens the database: empty the log and make the
        reserve if it is missing; whether there is room to write."""
        self._connection = sqlite3.connect(self.path, isolation_level=None)
        try:
            self._make_room(release=False)
        finally:
            self._connection.close()
        return self.room

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="chatx-checkpoint", daemon=True)
        self._thread.start()

    def written(self) -> None:
        """Called after each commit."""
        self._written.set()

    def erase(self) -> None:
        """The next checkpoint empties the log: erased text must not stay in old pages there."""
        self._truncate = True
        self._written.set()

    def disk_full(self) -> None:
        """A commit found the disk full."""
        self.room = False
        self._full = True
        self._written.set()

    def stop(self) -> None:
        self._stopping = True
        self._written.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        self._connection = sqlite3.connect(self.path, isolation_level=None)
        try:
            while not self._stopping:
                written = self._written.wait(RESERVE_RETRY_S)
                if self._stopping:
                    break
                self._written.clear()
                if self._full or not self.room:
                    self._make_room(release=self._full)
                    continue
                if written:
                    if not self._truncate:
                        self._checkpoint("PASSIVE")
                    # After the passive one: a truncating checkpoint holds up
                    # commits while it runs, so it copies only what came since.
                    if self._truncate or self._log_bytes() > WAL_LIMIT_BYTES:
                        self._truncate = False
                        self._checkpoint("TRUNCATE")
                self._see_room()
                if written:
                    time.sleep(self.interval)  # let several commits' pages be copied at once
        finally:
            self._connection.close()

    def _log_bytes(self) -> int:
        try:
            return os.path.getsize(self.path + "-wal")
        except OSError:
            return 0

    def _checkpoint(self, mode: str) -> None:
        assert self._connection is not None
        try:
            self._connection.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
        except sqlite3.Error as exc:
            if is_disk_full(exc):
                self.disk_full()
            else:
                logger.warning("a background checkpoint failed (%s); the writer's own will do", exc)

    def _make_room(self, release: bool) -> None:
        """Release the reserve if asked, empty the log while the reserve is
        missing, make it again, and see whether there is room to write."""
        self._full = False
        if release:
            with suppress(FileNotFoundError):
                os.remove(self.reserve)
        if not os.path.exists(self.reserve):
            self._checkpoint("TRUNCATE")
            self._full = False  # that checkpoint is what the released reserve was for
            self._make_reserve()
        self._see_room()

    def _see_room(self) -> None:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(self.path))).free
        room = os.path.exists(self.reserve) and free >= RESERVE_BYTES
        if room != self.room and self._thread is not None:
            if room:
                logger.warning("the disk has room again; writes resume")
            else:
                logger.warning("the disk is full (%d bytes free); writes wait for room", free)
        self.room = room

    def _make_reserve(self) -> None:
        partial = f"{self.reserve}.{os.getpid()}"
        try:
            descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(descriptor, 0, RESERVE_BYTES)
            finally:
                os.close(descriptor)
            os.replace(partial, self.reserve)
        except OSError:
            with suppress(OSError):
                os.remove(partial)


async def watch_silence(connection: asyncpg.Connection) -> None:
    """asyncpg has no keepalive setting. With these, the kernel resets a TCP
    connection to PostgreSQL once its data or keepalive probes go unanswered
    for TCP_SILENCE_S (packets dropped, a host gone), and what waited on it
    fails at once, as when the server closes it."""
    sock = connection._transport.get_extra_info("socket")  # asyncpg keeps its transport private
    if sock is None or sock.family not in (AF_INET, AF_INET6) or TCP_USER_TIMEOUT is None:
        return
    sock.setsockopt(SOL_SOCKET, SO_KEEPALIVE, 1)
    sock.setsockopt(IPPROTO_TCP, TCP_KEEPIDLE, 1)
    sock.setsockopt(IPPROTO_TCP, TCP_KEEPINTVL, 1)
    sock.setsockopt(IPPROTO_TCP, TCP_KEEPCNT, TCP_SILENCE_S)
    sock.setsockopt(IPPROTO_TCP, TCP_USER_TIMEOUT, TCP_SILENCE_S * 1000)


def one_statement_on_postgres(when: Callable[[list[Any]], bool]) -> Callable[[Callable], Callable]:
    """Mark a bulk write job that sends PostgreSQL a single statement for the
    items for which `when(items)` holds: a batch of it alone then runs as that
    statement's own transaction, one round trip with no BEGIN and COMMIT."""
    def mark(function: Callable[..., Awaitable[list]]) -> Callable[..., Awaitable[list]]:
        function.one_statement_on_postgres = when  # type: ignore[attr-defined]
        return function

    return mark


def open_database(url: str, connections: int = 10) -> Database:
    if url.startswith("sqlite"):
        return Database(url, factory=SQLiteWithPragmas, timeout=5.0)
    return Database(url, min_size=1, max_size=connections, timeout=CONNECT_TIMEOUT_S,
                    command_timeout=STATEMENT_TIMEOUT_S, init=watch_silence)


async def close_database(database: Database) -> None:
    """Close a pool within CONNECT_TIMEOUT_S. asyncpg's graceful close waits on
    the server, so a silent one would hold it for good: it is then terminated
    (databases does not expose the pool)."""
    try:
        await asyncio.wait_for(database.disconnect(), CONNECT_TIMEOUT_S)
    except asyncio.TimeoutError:
        pool = getattr(database._backend, "_pool", None)
        if pool is not None:
            pool.terminate()
            database._backend._pool = None
        database.is_connected = False


@dataclass
class Job:
    """One write for the Writer: `function(connection, *args)`; a bulk job's
    items queued together reach it as one list."""

    function: Callable[..., Awaitable[Any]]
    args: tuple
    bulk: bool = False
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Writer:
    """Runs every write transaction of this process, in order, on one task
    that holds one connection; jobs queued together share one commit (on
    PostgreSQL, a run of sends does: _leading_run).

    databases binds connections to tasks, and concurrent SQLite writers fail
    with "database is locked"; one writer per process avoids both, and group
    commit keeps a commit per message off the hot path. Its transactions go
    to the driver: databases' Transaction kept a connection that PostgreSQL
    had dropped marked as in use, so a restart of the database stopped every
    write until ChatX itself restarted."""

    def __init__(self, url: str, observe: Callable[[float], None] = lambda seconds: None,
                 retried: Callable[[], None] = lambda: None) -> None:
        # A one-connection pool of its own: the writer holds it, readers never queue behind it.
        self.database = open_database(url, connections=1)
        self.observe = observe  # told each commit's duration
        self.retried = retried  # told each batch run again after a deadlock or serialization failure
        self.sqlite = self.database.url.dialect == "sqlite"
        self.healthy = True  # connected, as far as the last attempt showed
        self.failed_at = -math.inf  # when a commit last failed for the database's sake
        # A list and a future rather than an asyncio.Queue, whose put and get
        # were a few microseconds of every message.
        self._jobs: list[Job | None] = []  # None: stop() was called
        self._jobs_waiting: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.checkpointer = Checkpointer(self.database.url.database) if self.sqlite else None

    async def start(self) -> None:
        self._jobs, self._stopping, self.healthy = [], False, True  # a start may follow a failed one
        if self.checkpointer and not await asyncio.to_thread(self.checkpointer.prepare):
            await asyncio.to_thread(self.checkpointer.stop)
            raise Unavailable("the disk is full")
        await self.database.connect()
        self._task = asyncio.create_task(self._serve(), name="chatx-writer")
        if self.checkpointer:
            self.checkpointer.start()

    async def stop(self) -> None:
        """Finish the queued jobs, then close. Cancelling a job mid-query would
        leave an asyncpg connection unusable, so that is only a last resort,
        once a statement's deadline has passed."""
        self._stopping = True
        if self._task:
            self._queue(None)
            try:
                await asyncio.wait_for(asyncio.shield(self._task), STATEMENT_TIMEOUT_S)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()
                await asyncio.wait([self._task], timeout=1)
        if self.checkpointer:
            await asyncio.to_thread(self.checkpointer.stop)
        await close_database(self.database)

    def run(self, function: Callable[..., Awaitable[Any]], *args: Any) -> asyncio.Future:
        """Run `function(connection, *args)` in a write transaction; the future
        gives its result once committed."""
        return self._submit(Job(function, args))

    def run_bulk(self, function: Callable[..., Awaitable[list]], item: Any) -> asyncio.Future:
        """Queue `item` for `function(connection, items)`, which returns a
        result per item; the future gives this item's once committed."""
        return self._submit(Job(function, (item,), bulk=True))

    def _submit(self, job: Job) -> asyncio.Future:
        """A write while the database is away, or while SQLite has no room
        (the disk is full), fails at once rather than waiting for a reconnect."""
        if self._stopping and self._task is None:
            job.future.set_exception(Unavailable("the writer has stopped"))
        elif not self.healthy:
            job.future.set_exception(Unavailable("the database is not answering"))
        elif self.checkpointer and not self.checkpointer.room:
            job.future.set_exception(Unavailable("the disk is full"))
        else:
            self._queue(job)
        return job.future

    def _queue(self, job: Job | None) -> None:
        self._jobs.append(job)
        if self._jobs_waiting is not None and not self._jobs_waiting.done():
            self._jobs_waiting.set_result(None)

    async def _serve(self) -> None:
        backoff = 0.1
        while True:
            try:
                async with self.database.connection() as connection:
                    await self._serve_on(Connection(connection))
                    return
            except Exception as exc:
                if self._stopping:
                    self._fail_queued(exc)
                    return
                self.healthy = False
                logger.error("the database connection failed (%s); reconnecting", exc)
                self._fail_queued(exc)
                await asyncio.sleep(backoff * (1 + random.random()))
                backoff = min(backoff * 2, 2.0)
                await self._reopen()

    async def _reopen(self) -> None:
        """A new pool: databases keeps a connection bound to this task otherwise."""
        try:
            await close_database(self.database)
        except Exception:
            pass
        try:
            await self.database.connect()
        except Exception as exc:
            logger.warning("the database does not answer yet: %s", exc)

    def _fail_queued(self, cause: BaseException) -> None:
        """Jobs waiting while the database is away fail at once rather than hang."""
        end = self._jobs.index(None) if None in self._jobs else len(self._jobs)
        failed, self._jobs = self._jobs[:end], self._jobs[end:]
        for job in failed:
            if job is not None and not job.future.done():
                job.future.set_exception(Unavailable(str(cause)))

    async def _serve_on(self, connection: Connection) -> None:
        await connection.fetch("SELECT 1")
        self.healthy = True
        last_commit = 0.0
        while True:
            if not self._jobs:
                self._jobs_waiting = asyncio.get_running_loop().create_future()
                await self._jobs_waiting
            if time.monotonic() - last_commit < COMMIT_BUSY_S:
                await asyncio.sleep(COMMIT_LINGER_S)
            size = JOBS_PER_COMMIT if self.sqlite else self._leading_run(self._jobs)
            batch, self._jobs = self._jobs[:size], self._jobs[size:]
            jobs = [job for job in batch if job is not None]
            if jobs:
                started = time.monotonic()
                await self._commit(connection, jobs)
                last_commit = time.monotonic()
                self.observe(last_commit - started)
                if self.checkpointer:
                    self.checkpointer.written()
            if len(jobs) < len(batch):  # stop() was called
                return

    @staticmethod
    def _leading_run(jobs: list[Job | None]) -> int:
        """How many queued jobs PostgreSQL commits together: a run of bulk jobs
        of one function (sends, locking all their users at once), or one job.
        Each locks its users in one go, in id order, so no two commits can
        wait for each other; two jobs in one commit could, one after the other."""
        first = jobs[0]
        if first is None or not first.bulk:
            return 1
        count = 1
        while count < min(JOBS_PER_COMMIT, len(jobs)) and (job := jobs[count]) is not None and job.bulk \
                and job.function is first.function:
            count += 1
        return count

    async def _commit(self, connection: Connection, batch: list[Job]) -> None:
        try:
            results = await self._retried(connection, batch)
        except Exception as failure:
            try:
                await connection.fetch("SELECT 1")
            except Exception:
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(Unavailable(f"{type(failure).__name__}: {failure}"))
                raise  # _serve opens another connection
            # One failing job must not fail the others: each alone, then.
            failed = 0
            for job in batch:
                try:
                    (result,) = await self._retried(connection, [job])
                except Exception as exc:
                    failed += 1
                    if not job.future.done():
                        job.future.set_exception(as_unavailable(exc))
                else:
                    if not job.future.done():
                        job.future.set_result(result)
            if failed == len(batch) and isinstance(failure, FAULT_TYPES):
                self.failed_at = time.monotonic()
                if self.checkpointer and is_disk_full(failure):
                    self.checkpointer.disk_full()
            return
        self.healthy = True
        for job, result in zip(batch, results):
            if not job.future.done():
                job.future.set_result(result)

    async def _retried(self, connection: Connection, batch: list[Job]) -> list[Any]:
        """PostgreSQL ends a transaction for a deadlock or serialization
        failure (none of ChatX's own writes should cause one: _leading_run):
        the batch runs again."""
        attempt = 1
        while True:
            try:
                return await self._transaction(connection, batch)
            except asyncpg.exceptions.TransactionRollbackError:
                if attempt == COMMIT_RETRIES:
                    raise
                self.retried()
                await asyncio.sleep(0.005 * attempt * random.random())
                attempt += 1

    async def _transaction(self, connection: Connection, batch: list[Job]) -> list[Any]:
        one_statement = getattr(batch[0].function, "one_statement_on_postgres", None)
        # On PostgreSQL a batch led by a bulk job is a run of that one function (_leading_run).
        if (connection.postgres and one_statement is not None and batch[0].bulk
                and one_statement([job.args[0] for job in batch])):
            return await self._run_jobs(connection, batch)  # one statement: a transaction of its own
        if not connection.postgres:
            return await connection.at_once(functools.partial(self._in_transaction, batch=batch))
        return await self._in_transaction(connection, batch)

    async def _in_transaction(self, connection: Connection, batch: list[Job]) -> list[Any]:
        await connection.begin()
        try:
            results = await self._run_jobs(connection, batch)
        except BaseException:
            await connection.rollback()
            raise
        await connection.commit()
        return results

    @staticmethod
    async def _run_jobs(connection: Connection, batch: list[Job]) -> list[Any]:
        """In the order queued; a run of bulk jobs of one function is one call,
        so a read queued after a send never lands before it."""
        results: list[Any] = [None] * len(batch)
        run: list[int] = []
        for index, job in enumerate([*batch, None]):
            if run and (job is None or not job.bulk or job.function is not batch[run[0]].function):
                items = [batch[i].args[0] for i in run]
                for position, result in zip(run, await batch[run[0]].function(connection, items)):
                    results[position] = result
                run = []
            if job is None:
                break
            if job.bulk:
                run.append(index)
            else:
                results[index] = await job.function(connection, *job.args)
        return results


class HeldConnections:
    """A few SQLite connections opened once, which every task reads through.

    databases ties a connection to a task, so on SQLite each query of a new
    task opened a connection and an aiosqlite thread of its own: most of the
    cost of opening a socket, and memory left behind in malloc's arenas."""

    def __init__(self, database: Database, size: int = 3) -> None:
        self.database, self.size = database, size
        self._connections: list[Connection] = []
        self._holders: list[asyncio.Task] = []
        self._turn = 0

    async def connect(self) -> None:
        self._release = asyncio.Event()
        loop = asyncio.get_running_loop()
        opened = [loop.create_future() for _ in range(self.size)]
        self._holders = [asyncio.create_task(self._hold(future)) for future in opened]
        self._connections = [Connection(c) for c in await asyncio.gather(*opened)]

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

    def next(self) -> Connection:
        self._turn = (self._turn + 1) % self.size
        return self._connections[self._turn]


class Storage:
    """The database: writes through the Writer, reads through connections of
    their own (held ones on SQLite, asyncpg's pool on PostgreSQL)."""

    def __init__(self, url: str, observe_commit: Callable[[float], None] = lambda seconds: None,
                 commit_retried: Callable[[], None] = lambda: None) -> None:
        self.database = open_database(url)
        self.postgres = self.database.url.dialect == "postgresql"
        self.writer = Writer(url, observe_commit, commit_retried)
        self._held = None if self.postgres else HeldConnections(self.database)
        self._vacuum: asyncio.Task | None = None
        self._probe: asyncio.Task | None = None

    async def start(self, schema_job: Callable[[Connection], Awaitable[None]]) -> None:
        """Open the database and bring its schema up to date with `schema_job`
        (`migrate`, which the composition root passes in)."""
        await self.database.connect()
        try:
            await self.writer.start()
        except BaseException:
            await close_database(self.database)
            raise
        try:
            await self.migrate(schema_job)
            if self._held:  # opened once the writer put the file in WAL mode
                await self._held.connect()
        except BaseException:
            await self.writer.stop()
            await close_database(self.database)
            raise

    async def stop(self) -> None:
        for task in (self._vacuum, self._probe):
            if task:
                task.cancel()
                await asyncio.wait([task], timeout=1)
        await self.writer.stop()
        if self._held:
            await self._held.disconnect()
        await close_database(self.database)

    async def migrate(self, schema_job: Callable[[Connection], Awaitable[None]]) -> None:
        """On PostgreSQL, on a connection of its own without STATEMENT_TIMEOUT_S:
        upgrading a large database may take minutes. Connection.begin
        serialises it with the writers of other processes all the same."""
        if not self.postgres:
            await self.write(schema_job)
            return
        database = Database(str(self.database.url), min_size=1, max_size=1, timeout=CONNECT_TIMEOUT_S,
                            init=watch_silence)
        await database.connect()
        try:
            async with database.connection() as connection:
                conn = Connection(connection)
                await conn.begin()
                try:
                    await schema_job(conn)
                except BaseException:
                    await conn.rollback()
                    raise
                await conn.commit()
        finally:
            await close_database(database)

    def write(self, function: Callable[..., Awaitable[Any]], *args: Any) -> asyncio.Future:
        return self.writer.run(function, *args)

    def write_bulk(self, function: Callable[..., Awaitable[list]], item: Any) -> asyncio.Future:
        return self.writer.run_bulk(function, item)

    async def write_apart(self, function: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """A write of one statement that needs no order with any other (an
        attachment's bytes). On PostgreSQL it commits on its own connection,
        beside the writer and its lock; SQLite takes one writer at a time, so
        there it queues for the writer."""
        if self.postgres:
            return await self.read(function, *args)  # asyncpg commits a statement outside a transaction
        return await self.write(function, *args)

    async def read(self, query: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run `query(connection, *args)` on a reading connection; a database
        that cannot answer raises Unavailable."""
        try:
            if self._held:
                return await query(self._held.next(), *args)
            async with self.database.connection() as connection:
                return await query(Connection(connection), *args)
        except FAULT_TYPES as exc:
            raise Unavailable(f"{type(exc).__name__}: {exc}") from exc

    def erase_soon(self) -> None:
        """Text was erased: see that no old copy stays behind on disk. SQLite
        keeps one in its log until a checkpoint empties it, PostgreSQL in the
        old row version until a vacuum removes it."""
        if self.writer.checkpointer:
            self.writer.checkpointer.erase()
        elif self._vacuum is None or self._vacuum.done():
            self._vacuum = asyncio.create_task(self._vacuum_messages())

    async def _vacuum_messages(self) -> None:
        await asyncio.sleep(1)  # one vacuum for the erasures of a second
        try:
            async with self.database.connection() as connection:
                await Connection(connection).execute(
                    "VACUUM (INDEX_CLEANUP OFF) chatx_messages, chatx_attachments, chatx_attachment_chunks")
        except Exception as exc:
            logger.warning("vacuuming erased messages failed: %s", exc)

    async def healthy(self) -> bool:
        """Commits work (none failed for the database's sake in the last few
        seconds: with a full disk some small writes still pass; SQLite has room)
        and a connection answers within HEALTH_TIMEOUT_S. A probe that overruns
        is left to its statement timeout, not awaited: cancelling a query on a
        silent server waits on that server."""
        writer = self.writer
        if (not writer.healthy or time.monotonic() - writer.failed_at < COMMIT_FAILURE_MEMORY_S
                or (writer.checkpointer and not writer.checkpointer.room)):
            return False
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self.database.fetch_val("SELECT 1"))
        probe = self._probe  # a concurrent check may start the next probe while this one waits
        done, _ = await asyncio.wait([probe], timeout=HEALTH_TIMEOUT_S)
        return bool(done) and not probe.cancelled() and probe.exception() is None


# ---- queries and write jobs ---------------------------------------------------------
#
# Each function takes a Connection. Write jobs run inside the Writer's
# transaction; nothing below this section writes SQL.


async def table_exists(conn: Connection, name: str) -> bool:
    if conn.postgres:
        return await conn.fetch_value("SELECT to_regclass(?) IS NOT NULL", name)
    return bool(await conn.fetch("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", name))


async def schema_version(conn: Connection) -> int:
    """0 for an empty database, 1 for one made before versions were recorded."""
    if not await table_exists(conn, "chatx_users"):
        return 0
    if not await table_exists(conn, "chatx_settings"):
        return 1
    value = await conn.fetch_value("SELECT value FROM chatx_settings WHERE name = 'schema_version'")
    return 1 if value is None else int(value)


async def migrate(conn: Connection) -> None:
    """Create the schema, or bring an older one up to SCHEMA_VERSION, keeping everything in it."""
    if conn.postgres:  # processes starting together migrate one at a time; nothing else takes this lock
        await conn.execute("SELECT pg_advisory_xact_lock(734216)")
    version = await schema_version(conn)
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"the database has schema version {version}; this ChatX knows {SCHEMA_VERSION}")
    if version == 1:
        await add_version_2_columns(conn)
    if 0 < version < 3:
        await add_attachment_column(conn)
    for table in metadata.sorted_tables:
        await conn.ddl(CreateTable(table, if_not_exists=True))
        for index in table.indexes:
            await conn.ddl(CreateIndex(index, if_not_exists=True))
    if version == 1:
        await fill_version_2_tables(conn)
    if 0 < version < 3:
        await autoincrement_ids(conn)
    if conn.postgres and 0 < version < 3:
        await per_user_ordering(conn)
    if conn.postgres:
        await conn.execute(INSERT_MESSAGES_POSTGRES)
    await conn.execute("DELETE FROM chatx_settings WHERE name = 'schema_version'")
    await conn.execute("INSERT INTO chatx_settings (name, value) VALUES ('schema_version', ?)", str(SCHEMA_VERSION))


async def add_version_2_columns(conn: Connection) -> None:
    for statement in (
        "ALTER TABLE chatx_users ADD COLUMN gone_at BIGINT",
        "ALTER TABLE chatx_users ADD COLUMN seq BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE chatx_users ADD COLUMN skeleton VARCHAR(32) NOT NULL DEFAULT ''",
        "ALTER TABLE chatx_sessions ADD COLUMN used_at BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE chatx_sockets ADD COLUMN session_id VARCHAR(64)",
        "ALTER TABLE chatx_messages ADD COLUMN edited_at BIGINT",
        f"ALTER TABLE chatx_messages ADD COLUMN deleted BOOLEAN NOT NULL DEFAULT {'false' if conn.postgres else '0'}",
        "ALTER TABLE chatx_messages ADD COLUMN reply_to INTEGER",
        "DROP INDEX IF EXISTS chatx_messages_sender",
    ):
        await conn.execute(statement)
    if conn.postgres:
        await conn.execute('ALTER TABLE chatx_users ALTER COLUMN username_key TYPE VARCHAR(32) COLLATE "C"')
        names = await conn.fetch(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'chatx_messages'::regclass AND contype = 'f'")
        for (name,) in names:
            await conn.execute(f'ALTER TABLE chatx_messages DROP CONSTRAINT "{name}"')


async def add_attachment_column(conn: Connection) -> None:
    await conn.execute("ALTER TABLE chatx_messages ADD COLUMN attachment_id VARCHAR(32)")


async def fill_version_2_tables(conn: Connection) -> None:
    """Number every stored message in both people's streams, in id order, and
    make the conversation rows, read cursors included."""
    await conn.execute_many("UPDATE chatx_users SET skeleton = ? WHERE id = ?",
                            [(skeleton(name), user_id) for user_id, name in
                             await conn.fetch("SELECT id, username FROM chatx_users")])
    await conn.execute("UPDATE chatx_sessions SET used_at = ?", now_ms())
    await conn.execute(
        "INSERT INTO chatx_events (user_id, seq, kind, message_id) "
        "SELECT user_id, ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY message_id), ?, message_id FROM ("
        " SELECT sender_id AS user_id, id AS message_id FROM chatx_messages"
        " UNION ALL SELECT recipient_id, id FROM chatx_messages WHERE recipient_id <> sender_id) AS mine",
        int(EventKind.MESSAGE))
    await conn.execute("UPDATE chatx_users SET seq = COALESCE("
                       "(SELECT max(seq) FROM chatx_events WHERE chatx_events.user_id = chatx_users.id), 0)")
    await conn.execute(
        "INSERT INTO chatx_conversations (user_id, peer_id, last_message_id, unread, read_up_to) "
        "SELECT user_id, peer_id, max(id), 0, 0 FROM ("
        " SELECT sender_id AS user_id, recipient_id AS peer_id, id FROM chatx_messages"
        " UNION ALL SELECT recipient_id, sender_id, id FROM chatx_messages) AS mine GROUP BY user_id, peer_id")
    if await table_exists(conn, "chatx_read_cursors"):
        await conn.execute(
            "UPDATE chatx_conversations SET read_up_to = COALESCE((SELECT up_to FROM chatx_read_cursors r "
            "WHERE r.user_id = chatx_conversations.user_id AND r.peer_id = chatx_conversations.peer_id), 0)")
        await conn.execute("DROP TABLE chatx_read_cursors")
    await conn.execute(
        "UPDATE chatx_conversations SET unread = (SELECT count(*) FROM chatx_messages m "
        "WHERE m.recipient_id = chatx_conversations.user_id AND m.sender_id = chatx_conversations.peer_id "
        "AND m.id > chatx_conversations.read_up_to)")


async def autoincrement_ids(conn: Connection) -> None:
    """Version 3: on SQLite, user and message ids are never given again once
    deleted (AUTOINCREMENT, which needs the table made anew; its sequence
    starts from the ids already stored). Skeletons fold more look-alikes."""
    if not conn.postgres:
        await conn.execute("PRAGMA defer_foreign_keys = ON")  # chatx_users is gone for a moment
        for table in (users, messages):
            columns = ", ".join(column.name for column in table.columns)
            await conn.execute(f"CREATE TABLE {table.name}_v2 AS SELECT {columns} FROM {table.name}")
            await conn.execute(f"DROP TABLE {table.name}")
            await conn.ddl(CreateTable(table))
            for index in table.indexes:
                await conn.ddl(CreateIndex(index))
            await conn.execute(f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM {table.name}_v2")
            await conn.execute(f"DROP TABLE {table.name}_v2")
    await conn.execute_many("UPDATE chatx_users SET skeleton = ? WHERE id = ?",
                            [(skeleton(name), user_id) for user_id, name in
                             await conn.fetch("SELECT id, username FROM chatx_users")])


async def per_user_ordering(conn: Connection) -> None:
    """Version 3 on PostgreSQL: the message insert that took a lock shared by
    all users gives way to chatx_insert_messages() of INSERT_MESSAGES_POSTGRES."""
    await conn.execute("DROP FUNCTION IF EXISTS chatx_insert_messages(integer[], integer[], text[], bigint[], text[])")


# -- accounts and sessions


@dataclass(frozen=True)
class User:
    id: int
    username: str

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "username": self.username}


@dataclass(frozen=True)
class Session:
    """A ChatX session (`id`), or a person the host named: no session (None)
    that signing out or a new password could end."""

    id: str | None
    user: User


# Characters that look alike in common fonts, folded together. Usernames are
# ASCII; widening them would add Unicode's confusables (UTS #39) here.
LOOK_ALIKES = str.maketrans({"i": "l", "1": "l", "0": "o"})
LOOK_ALIKE_PAIRS = (("rn", "m"), ("vv", "w"))


def skeleton(username: str) -> str:
    """What a username looks like: `aIice`, `alice` and `a1ice` share one, as
    do `rnallory` and `mallory`, `vvendy` and `wendy`, `bobby_` and `bobby`."""
    folded = username.lower().translate(LOOK_ALIKES)
    for pair, single in LOOK_ALIKE_PAIRS:
        folded = folded.replace(pair, single)
    return folded.strip("_.-")


async def username_taken(conn: Connection, username: str) -> bool:
    """The name, or one that looks like it, belongs to someone."""
    key = username.lower()
    return bool(await conn.fetch("SELECT 1 FROM chatx_users WHERE username_key = ? OR skeleton = ?",
                                 key, skeleton(key)))


async def insert_user(conn: Connection, username: str, password_hash: str, now: int) -> User | None:
    """None if the name, or one that looks like it, is taken."""
    key = username.lower()
    if await username_taken(conn, username):
        return None
    await conn.execute("INSERT INTO chatx_users (username, username_key, skeleton, password_hash, status, seq, "
                       "created_at) VALUES (?, ?, ?, ?, 'offline', 0, ?)",
                       username, key, skeleton(key), password_hash, now)
    user_id = await conn.fetch_value("SELECT id FROM chatx_users WHERE username_key = ?", key)
    return User(user_id, username)


async def set_password(conn: Connection, user_id: int, password_hash: str, keep_session: str | None) -> None:
    """A new password ends every session of the user but `keep_session`."""
    await conn.execute("UPDATE chatx_users SET password_hash = ? WHERE id = ?", password_hash, user_id)
    await delete_sessions(conn, user_id, keep_session)


async def delete_sessions(conn: Connection, user_id: int, keep_session: str | None = None) -> None:
    await conn.execute("DELETE FROM chatx_sessions WHERE user_id = ? AND id <> ?", user_id, keep_session or "")


async def delete_account(conn: Connection, user_id: int) -> None:
    """The user and everything of theirs: messages sent or received (and their
    places in both streams), conversations, blocks, sessions, sockets."""
    await lock_users(conn, [user_id])
    mine = "SELECT id FROM chatx_messages WHERE sender_id = ? OR recipient_id = ?"
    theirs = await conn.fetch(f"SELECT id FROM chatx_attachments WHERE uploader_id = ? OR message_id IN ({mine})",
                              user_id, user_id, user_id)
    await erase_attachments(conn, [row[0] for row in theirs])
    await conn.execute("DELETE FROM chatx_upload_days WHERE user_id = ?", user_id)
    await conn.execute(f"DELETE FROM chatx_events WHERE message_id IN ({mine})", user_id, user_id)
    await conn.execute("DELETE FROM chatx_events WHERE user_id = ? OR reader_id = ? OR with_id = ?",
                       user_id, user_id, user_id)
    await conn.execute("DELETE FROM chatx_messages WHERE sender_id = ? OR recipient_id = ?", user_id, user_id)
    await conn.execute("UPDATE chatx_messages SET reply_to = NULL WHERE reply_to IS NOT NULL AND NOT EXISTS "
                       "(SELECT 1 FROM chatx_messages r WHERE r.id = chatx_messages.reply_to)")
    for table, columns in (("chatx_conversations", ("user_id", "peer_id")), ("chatx_blocks", ("user_id", "blocked_id")),
                           ("chatx_sessions", ("user_id",)), ("chatx_sockets", ("user_id",))):
        await conn.execute(f"DELETE FROM {table} WHERE " + " OR ".join(f"{c} = ?" for c in columns),
                           *[user_id] * len(columns))
    await conn.execute("DELETE FROM chatx_users WHERE id = ?", user_id)


async def add_attempt(conn: Connection, kind: str, key: str, now: int) -> None:
    await conn.execute("INSERT INTO chatx_attempts (kind, key, at) VALUES (?, ?, ?)", kind, key, now)


async def attempts_since(conn: Connection, kind: str, key: str, since: int) -> tuple[int, int | None]:
    """How many attempts of a kind and key since `since`, and the oldest one's time."""
    row = await conn.fetch_one("SELECT count(*), min(at) FROM chatx_attempts WHERE kind = ? AND key = ? AND at > ?",
                               kind, key, since)
    return row[0], row[1]


async def clear_attempts(conn: Connection, kind: str, key: str) -> None:
    await conn.execute("DELETE FROM chatx_attempts WHERE kind = ? AND key = ?", kind, key)


async def purge_expired(conn: Connection, now: int, idle_ms: int) -> None:
    await conn.execute("DELETE FROM chatx_sessions WHERE expires_at <= ? OR used_at <= ?", now, now - idle_ms)
    await conn.execute("DELETE FROM chatx_attempts WHERE at <= ?", now - max(LOGIN_WINDOW_MS, SIGNUP_WINDOW_MS))


async def user_by_key(conn: Connection, key: str) -> User | None:
    row = await conn.fetch_one("SELECT id, username FROM chatx_users WHERE username_key = ?", key)
    return None if row is None else User(row[0], row[1])


async def password_of(conn: Connection, key: str) -> tuple[User, str] | None:
    row = await conn.fetch_one("SELECT id, username, password_hash FROM chatx_users WHERE username_key = ?", key)
    return None if row is None else (User(row[0], row[1]), row[2])


async def insert_session(conn: Connection, sid: str, user_id: int, expires_at: int, replaces: str | None) -> None:
    """A new session; the one the browser signed in with before (`replaces`) ends."""
    if replaces:
        await conn.execute("DELETE FROM chatx_sessions WHERE id = ?", replaces)
    await conn.execute("INSERT INTO chatx_sessions (id, user_id, expires_at, used_at) VALUES (?, ?, ?, ?)",
                       sid, user_id, expires_at, now_ms())


async def touch_session(conn: Connection, sid: str, now: int) -> None:
    await conn.execute("UPDATE chatx_sessions SET used_at = ? WHERE id = ?", now, sid)


async def delete_session(conn: Connection, sid: str) -> None:
    await conn.execute("DELETE FROM chatx_sessions WHERE id = ?", sid)


async def session_row(conn: Connection, sid: str, now: int, idle_ms: int) -> tuple[Session, int] | None:
    """A live session and when it was last used."""
    row = await conn.fetch_one("SELECT s.id, u.id, u.username, s.used_at FROM chatx_sessions s JOIN chatx_users u "
                               "ON u.id = s.user_id WHERE s.id = ? AND s.expires_at > ? AND s.used_at > ?",
                               sid, now, now - idle_ms)
    return None if row is None else (Session(row[0], User(row[1], row[2])), row[3])


async def session_exists(conn: Connection, sid: str) -> bool:
    return bool(await conn.fetch("SELECT 1 FROM chatx_sessions WHERE id = ?", sid))


async def ensure_secret(conn: Connection, candidate: str) -> str:
    """The first process to start on a database picks the key; all others read it."""
    await conn.execute("INSERT INTO chatx_settings (name, value) VALUES ('secret_key', ?) "
                       "ON CONFLICT (name) DO NOTHING", candidate)
    return await conn.fetch_value("SELECT value FROM chatx_settings WHERE name = 'secret_key'")


# A blocked pair, either way round: neither sees the other's presence.
BLOCKED_EITHER_WAY = ("EXISTS (SELECT 1 FROM chatx_blocks b WHERE (b.user_id = {a} AND b.blocked_id = {b}) "
                      "OR (b.user_id = {b} AND b.blocked_id = {a}))")
# The audience of presence, the one rule every presence query is built on:
# the two people of a row `c` of chatx_conversations (partners) see each
# other's presence unless one blocks the other. It holds both ways round.
SEES_PRESENCE = "c.peer_id <> c.user_id AND NOT " + BLOCKED_EITHER_WAY.format(a="c.user_id", b="c.peer_id")


async def directory_page(conn: Connection, me: int, prefix: str, after: str, limit: int) -> list[tuple]:
    """Users but me whose key starts with `prefix`, after `after`, by key: a
    range of the key's index. Status and last seen only where I see their presence."""
    seen = f"EXISTS (SELECT 1 FROM chatx_conversations c WHERE c.user_id = ? AND c.peer_id = u.id AND {SEES_PRESENCE})"
    # One lower bound: given two, SQLite ranges over the index from the first only.
    lower, start = ("u.username_key > ?", after) if after >= prefix else ("u.username_key >= ?", prefix)
    return await conn.fetch(
        f"SELECT u.id, u.username, u.status, u.last_seen, {seen} FROM chatx_users u "
        f"WHERE {lower} AND u.username_key < ? AND u.id <> ? "
        "ORDER BY u.username_key LIMIT ?", me, start, prefix + "\U0010ffff", me, limit)


async def insert_block(conn: Connection, me: int, other: int) -> None:
    await lock_users(conn, [me])  # a send to me commits wholly before the block or wholly after it
    await conn.execute("INSERT INTO chatx_blocks (user_id, blocked_id) VALUES (?, ?) ON CONFLICT DO NOTHING", me, other)


async def delete_block(conn: Connection, me: int, other: int) -> None:
    await conn.execute("DELETE FROM chatx_blocks WHERE user_id = ? AND blocked_id = ?", me, other)


async def blocked_users(conn: Connection, me: int) -> list[User]:
    rows = await conn.fetch("SELECT u.id, u.username FROM chatx_blocks b JOIN chatx_users u ON u.id = b.blocked_id "
                            "WHERE b.user_id = ? ORDER BY u.username_key", me)
    return [User(*row) for row in rows]


async def blocks_me(conn: Connection, me: int, other: int) -> bool:
    return bool(await conn.fetch("SELECT 1 FROM chatx_blocks WHERE user_id = ? AND blocked_id = ?", other, me))


async def has_answered(conn: Connection, sender: int, recipient: int) -> bool:
    """Whether `recipient` ever sent `sender` a message: a key lookup in chatx_messages_recipient."""
    return bool(await conn.fetch("SELECT 1 FROM chatx_messages WHERE recipient_id = ? AND sender_id = ? LIMIT 1",
                                 sender, recipient))


async def blocked_either_way(conn: Connection, me: int, other: int) -> bool:
    return bool(await conn.fetch("SELECT 1 WHERE " + BLOCKED_EITHER_WAY.format(a="?", b="?"), me, other, other, me))


# -- messages, streams and conversations


def attachment_object(attachment_id: str | None, name: str | None = None, kind: str | None = None,
                      size: int | None = None, width: int | None = None, height: int | None = None
                      ) -> dict[str, Any] | None:
    if attachment_id is None:
        return None
    return {"id": attachment_id, "name": name, "type": kind, "size": size, "width": width, "height": height}


def message_object(message_id: int, sender: str, recipient: str, body: str, sent_at: int, client_id: str | None,
                   edited_at: int | None, deleted: Any, reply_to: int | None, *attachment: Any) -> dict[str, Any]:
    """`attachment`: the columns of attachment_object(), all None (or none) without one."""
    return {"id": message_id, "from": sender, "to": recipient, "body": body, "sent_at": iso(sent_at),
            "client_id": client_id, "edited_at": iso(edited_at), "deleted": bool(deleted), "reply_to": reply_to,
            "attachment": attachment_object(*attachment) if attachment else None}


def message_of(row: Any) -> dict[str, Any]:
    """message_object() of a named row holding NAMED_MESSAGE_COLUMNS."""
    return message_object(*MESSAGE_VALUES(row))


# The columns message_object() takes, in its order, by the names a named row has them under.
MESSAGE_FIELDS = {"id": "m.id", "sender": "s.username", "recipient": "r.username", "body": "m.body",
                  "sent_at": "m.sent_at", "client_id": "m.client_id", "edited_at": "m.edited_at",
                  "deleted": "m.deleted", "reply_to": "m.reply_to", "attachment_id": "a.id",
                  "attachment_name": "a.name", "attachment_type": "a.type", "attachment_size": "a.size",
                  "attachment_width": "a.width", "attachment_height": "a.height"}
MESSAGE_COLUMNS = ", ".join(MESSAGE_FIELDS.values())
NAMED_MESSAGE_COLUMNS = ", ".join(f"{column} AS {name}" for name, column in MESSAGE_FIELDS.items())
MESSAGE_WIDTH = len(MESSAGE_FIELDS)
MESSAGE_VALUES = operator.itemgetter(*MESSAGE_FIELDS)  # of a named row, in message_object()'s order
ATTACHMENT_COLUMNS = "a.id, a.name, a.type, a.size, a.width, a.height"
MESSAGE_JOINS = ("JOIN chatx_users s ON s.id = m.sender_id JOIN chatx_users r ON r.id = m.recipient_id "
                 "LEFT JOIN chatx_attachments a ON a.id = m.attachment_id")


@dataclass(frozen=True)
class NewMessage:
    sender: User
    recipient: User
    body: str
    client_id: str | None
    reply_to: int | None
    attachment: str | None = None  # the id of an upload of the sender's


@dataclass(frozen=True)
class Refused:
    """A write the rules refuse, with the error frame's code."""

    code: str
    detail: str


@dataclass(frozen=True)
class Stored:
    """A message, edit, delete or read as committed, with each person's place in
    their stream; `seqs` is empty for a retry that stored nothing new. Its frame
    is made by its kind's entry in STREAM_KINDS."""

    kind: EventKind
    seqs: dict[int, int]  # user id -> seq
    message: dict[str, Any] | None = None
    fields: dict[str, Any] | None = None  # of a kind that is not about a message (a read: reader, with, up_to)
    new_partners: tuple[int, int] | None = None  # a first message made these two partners

    @functools.cached_property
    def message_text(self) -> str | None:
        """The message as JSON, encoded once for the ack and every frame."""
        return None if self.message is None else dumps(self.message)


async def lock_users(conn: Connection, user_ids: Iterable[int]) -> None:
    """Lock these users' rows until the commit, in id order. On SQLite the
    writer holds the whole file already (Connection.begin)."""
    if conn.postgres:
        await conn.execute("SELECT FROM chatx_users WHERE id = ANY(?) ORDER BY id FOR UPDATE", sorted(set(user_ids)))


async def append_events(conn: Connection, rows: list[tuple[int, EventKind, int | None, int | None, int | None,
                                                            int | None]]) -> list[int]:
    """Number events (user_id, kind, message_id, reader_id, with_id, up_to) in
    their users' streams and store them; return each one's seq. The caller
    holds those users' rows (lock_users)."""
    user_ids = sorted({row[0] for row in rows})
    newest = dict(await conn.fetch(f"SELECT id, seq FROM chatx_users WHERE id IN ({marks(len(user_ids))})",
                                   *user_ids))
    seqs = []
    for row in rows:
        newest[row[0]] += 1
        seqs.append(newest[row[0]])
    await conn.execute_many(
        "INSERT INTO chatx_events (user_id, seq, kind, message_id, reader_id, with_id, up_to) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(row[0], seq, int(row[1]), *row[2:]) for row, seq in zip(rows, seqs)])
    await conn.execute_many("UPDATE chatx_users SET seq = ? WHERE id = ?",
                            [(newest[user_id], user_id) for user_id in user_ids])
    return seqs


@one_statement_on_postgres(when=lambda items: not any(item.attachment for item in items))
async def insert_messages(conn: Connection, items: list[NewMessage]) -> list[Stored | Refused]:
    """Store the messages of one commit; number them in both streams; bring the
    conversation rows up to date. A (sender, client_id) stored before, or
    earlier in the same list, stores nothing and gets the original."""
    if conn.postgres:
        return await insert_messages_postgres(conn, items)
    refusals = await send_refusals(conn, items)
    attached = await attachments_to_send(conn, items)
    refusals.update(attachment_refusals(items, attached, refusals))
    keys = [(item.sender.id, item.client_id) for item in items]
    first: dict[tuple[int, str | None], int] = {}
    owners = [index if index in refusals or key[1] is None else first.setdefault(key, index)
              for index, key in enumerate(keys)]
    fresh = sorted(set(owners) - set(refusals))
    sent_at = now_ms()
    rows = [(items[i].sender.id, items[i].recipient.id, items[i].body, sent_at, items[i].client_id,
             items[i].reply_to) for i in fresh]
    inserted = await insert_message_rows_sqlite(conn, rows)
    ids = dict(zip(fresh, inserted))
    stored = {index: message_id for index, message_id in ids.items() if message_id is not None}
    originals = await messages_by_client_id(conn, {keys[index] for index in fresh if ids[index] is None})
    # Attachments are few: linked by an update each, which leaves the inserts of messages as they are.
    attaching = [(items[i].attachment, stored[i]) for i in sorted(stored) if items[i].attachment]
    await conn.execute_many("UPDATE chatx_messages SET attachment_id = ? WHERE id = ?", attaching)
    await conn.execute_many("UPDATE chatx_attachments SET message_id = ? WHERE id = ?",
                            [(message_id, attachment_id) for attachment_id, message_id in attaching])
    numbered = await number_messages(conn, [(items[i], stored[i]) for i in sorted(stored)])
    results: list[Stored | Refused] = []
    for index, owner in enumerate(owners):
        item = items[index]
        if owner in refusals:
            results.append(refusals[owner])
            continue
        if owner in stored:
            seqs, partners = numbered[stored[owner]]
            first = items[owner]
            original = message_object(stored[owner], first.sender.username, first.recipient.username, first.body,
                                      sent_at, first.client_id, None, False, first.reply_to,
                                      *attached.get(first.attachment, ())[3:])
        else:
            seqs, partners, original = {}, None, originals[keys[owner]]
        if owner != index or owner not in stored:
            results.append(retry_outcome(original, item))
        else:
            results.append(Stored(EventKind.MESSAGE, seqs, original, new_partners=partners))
    return results


def retry_outcome(original: dict[str, Any], item: NewMessage) -> Stored | Refused:
    """A client_id stored before: the original's ack and nothing delivered
    again, unless the item is another message under the same client_id."""
    if (original["to"], original["body"], (original["attachment"] or {}).get("id")) != (
            item.recipient.username, item.body, item.attachment):
        return Refused("invalid_field", "This client_id belongs to another message.")
    return Stored(EventKind.MESSAGE, {}, original)


async def send_refusals(conn: Connection, items: list[NewMessage]) -> dict[int, Refused]:
    """Sends to someone who blocks the sender, and replies to a message of another conversation."""
    refusals: dict[int, Refused] = {}
    pairs = sorted({(item.recipient.id, item.sender.id) for item in items})
    blocked = set()
    if pairs:
        where = " OR ".join(["(user_id = ? AND blocked_id = ?)"] * len(pairs))
        blocked = {tuple(row) for row in await conn.fetch(
            f"SELECT user_id, blocked_id FROM chatx_blocks WHERE {where}", *[v for pair in pairs for v in pair])}
    replied = sorted({item.reply_to for item in items if item.reply_to is not None})
    targets = {}
    if replied:
        targets = {row[0]: (row[1], row[2]) for row in await conn.fetch(
            f"SELECT id, sender_id, recipient_id FROM chatx_messages WHERE id IN ({marks(len(replied))})", *replied)}
    for index, item in enumerate(items):
        if (item.recipient.id, item.sender.id) in blocked:
            refusals[index] = send_refusal("blocked", item)
        elif item.reply_to is not None and sorted(targets.get(item.reply_to, ())) != sorted(
                (item.sender.id, item.recipient.id)):
            refusals[index] = send_refusal("reply_to", item)
    return refusals


async def attachments_to_send(conn: Connection, items: list[NewMessage]) -> dict[str, tuple]:
    """The attachments the items name: id -> (uploader_id, message_id, that
    message's client_id, *the columns of attachment_object())."""
    ids = sorted({item.attachment for item in items if item.attachment})
    if not ids:
        return {}
    rows = await conn.fetch(f"SELECT a.uploader_id, a.message_id, m.client_id, {ATTACHMENT_COLUMNS} "
                            "FROM chatx_attachments a LEFT JOIN chatx_messages m ON m.id = a.message_id "
                            f"WHERE a.id IN ({marks(len(ids))})"
                            # Until the commit: a send of the same upload on another process waits, then sees it sent.
                            + (" FOR UPDATE OF a" if conn.postgres else ""), *ids)
    return {row[3]: tuple(row) for row in rows}


def attachment_refusals(items: list[NewMessage], attached: dict[str, tuple],
                        refused: dict[int, Refused]) -> dict[int, Refused]:
    """An attachment must be an upload of the sender's that no message carries,
    or the one its own retry (same client_id) carries; one message per upload."""
    refusals, claimed = {}, {}
    for index, item in enumerate(items):
        if not item.attachment or index in refused:
            continue
        uploader, message_id, client_id = attached.get(item.attachment, (None, None, None))[:3]
        retry = message_id is not None and item.client_id is not None and client_id == item.client_id
        owner = item.client_id or index  # the send that claims the upload first in this commit
        if (uploader != item.sender.id or (message_id is not None and not retry)
                or claimed.setdefault(item.attachment, owner) != owner):
            refusals[index] = Refused("unknown_attachment", "There is no such upload of yours to send.")
    return refusals


def send_refusal(reason: str, item: NewMessage) -> Refused:
    if reason == "blocked":
        return Refused("blocked", f"{item.recipient.username} does not accept your messages.")
    return Refused("invalid_field", "'reply_to' must name a message of this conversation.")


async def number_messages(conn: Connection, stored: list[tuple[NewMessage, int]]
                          ) -> dict[int, tuple[dict[int, int], tuple[int, int] | None]]:
    """Append new messages to both streams and the conversation rows; per message
    id, the seqs and, for a conversation's first message, the new partners."""
    if not stored:
        return {}
    event_rows, owners = [], []
    for item, message_id in stored:
        for user_id in dict.fromkeys((item.sender.id, item.recipient.id)):
            event_rows.append((user_id, EventKind.MESSAGE, message_id, None, None, None))
            owners.append(message_id)
    seqs: dict[int, dict[int, int]] = {}
    for row, owner, seq in zip(event_rows, owners, await append_events(conn, event_rows)):
        seqs.setdefault(owner, {})[row[0]] = seq
    # Conversation rows: the newest message and the unread count of each (person, partner).
    changes: dict[tuple[int, int], list[int]] = {}
    for item, message_id in stored:
        for me, peer in {(item.sender.id, item.recipient.id), (item.recipient.id, item.sender.id)}:
            change = changes.setdefault((me, peer), [0, 0])
            change[0] = max(change[0], message_id)
            change[1] += me == item.recipient.id
    known = await conversations_known(conn, sorted(changes))
    await conn.execute_many(
        "INSERT INTO chatx_conversations (user_id, peer_id, last_message_id, unread, read_up_to) "
        "VALUES (?, ?, ?, ?, 0) ON CONFLICT (user_id, peer_id) DO UPDATE SET "
        "last_message_id = excluded.last_message_id, unread = chatx_conversations.unread + excluded.unread",
        [(me, peer, newest, unread) for (me, peer), (newest, unread) in changes.items()])
    numbered = {}
    introduced: set[tuple[int, int]] = set()
    for item, message_id in stored:
        pair = (item.sender.id, item.recipient.id)
        new = pair[0] != pair[1] and pair not in known and pair not in introduced
        if new:
            introduced.add(pair)
            introduced.add(pair[::-1])
        numbered[message_id] = (seqs[message_id], pair if new else None)
    return numbered


async def conversations_known(conn: Connection, pairs: list[tuple[int, int]]) -> set[tuple[int, int]]:
    """Which of these (person, partner) pairs have a conversation: a key lookup each."""
    where = " OR ".join(["(user_id = ? AND peer_id = ?)"] * len(pairs))
    rows = await conn.fetch(f"SELECT user_id, peer_id FROM chatx_conversations WHERE {where}",
                            *[value for pair in pairs for value in pair])
    return {tuple(row) for row in rows}


async def insert_message_rows_sqlite(conn: Connection, rows: list[tuple]) -> list[int | None]:
    """Insert rows of (sender_id, recipient_id, body, sent_at, client_id, reply_to);
    return each one's id, or None where that client_id was stored before.

    Under the write lock each new row's id is the AUTOINCREMENT high-water
    mark plus one (never an id given before, even one since erased), so the
    rows stored get consecutive ids after it. One
    prepared statement run per row: a statement of many rows is compiled anew
    for every count of rows, which cost more than the rows themselves. No
    RETURNING: the sqlite3 module lets go of the GIL for every row it steps
    through, and under load each row then waited for the event loop's thread
    to hand the GIL back."""
    if not rows:
        return []
    newest = await conn.fetch_value(
        "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'chatx_messages'), 0)")
    stored = await conn.execute_many(
        "INSERT INTO chatx_messages (sender_id, recipient_id, body, sent_at, client_id, reply_to) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (sender_id, client_id) DO NOTHING", rows)
    if stored == len(rows):
        return list(range(newest + 1, newest + stored + 1))
    if stored == 0:
        return [None] * len(rows)
    # Some client_id was stored before: which rows are new, by their (sender, client_id).
    new = await conn.fetch("SELECT id, sender_id, client_id FROM chatx_messages WHERE id > ?", newest)
    new_keys = {(sender_id, client_id) for _, sender_id, client_id in new}
    ids = iter(sorted(message_id for message_id, _, _ in new))
    return [next(ids) if row[4] is None or (row[0], row[4]) in new_keys else None for row in rows]


# The ordering rule of every stream on PostgreSQL. Writers run side by side,
# and a commit first locks the rows (chatx_users) of every user it numbers
# events for, in id order, so two writers never wait for each other in a
# circle; other write jobs do the same through lock_users(). That is enough
# because every promise of a stream is about one user: a user's seq is read
# and raised under that user's lock, so it is gap-free and each seq commits
# before the next is handed out (commit order is seq order per user), and a
# message id, taken from the sequence after both people's locks, grows in
# both streams' order. Commits of other users may interleave in any way: no
# socket sees them, since a socket shows one user's stream, publishes per
# user, and reads a gap from the database (ChatSocket.deliver), where every
# event below a delivered seq is committed. A function, so that a commit of
# messages is one round trip: refusals, ids, the messages, both streams and
# the conversation rows. It checks the user ids, in place of foreign keys (see
# chatx_messages). Per item it returns: the refusal, the item whose
# (sender, client_id) it is (which alone stores it), whether that one stored
# it now, the message id, both seqs, whether it made two people partners, and
# for a client_id stored before, that message's recipient, body, sent_at,
# edited_at, deleted and reply_to.
INSERT_MESSAGES_POSTGRES = """
CREATE OR REPLACE FUNCTION chatx_insert_messages(
    senders integer[], recipients integer[], bodies text[], client_ids text[], reply_tos integer[], sent bigint
) RETURNS TABLE (refusal text, owner integer, fresh boolean, message_id integer, sender_seq bigint,
                 recipient_seq bigint, introduced boolean, recipient text, body text, sent_at bigint,
                 edited_at bigint, deleted boolean, reply_to integer)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    people integer[] := ARRAY(SELECT DISTINCT unnest(senders || recipients) ORDER BY 1);
    locked integer;
    refusals text[];
    owners integer[];
    news integer[];
    ids integer[];
BEGIN
    PERFORM FROM chatx_users WHERE id = ANY(people) ORDER BY id FOR UPDATE;
    GET DIAGNOSTICS locked = ROW_COUNT;
    IF locked < cardinality(people) THEN
        RAISE foreign_key_violation USING MESSAGE = 'chatx_messages: no such user';
    END IF;
    SELECT array_agg(i.refusal ORDER BY i.n),
           array_agg(CASE WHEN i.refusal IS NULL THEN coalesce(i.first, i.n) END ORDER BY i.n)
    INTO refusals, owners
    FROM (SELECT u.n::integer AS n, v.refusal, CASE WHEN u.c IS NOT NULL THEN
                 (min(u.n) FILTER (WHERE v.refusal IS NULL) OVER (PARTITION BY u.s, u.c))::integer END AS first
          FROM unnest(senders, recipients, client_ids, reply_tos) WITH ORDINALITY AS u(s, r, c, p, n),
          LATERAL (SELECT CASE
              WHEN EXISTS (SELECT FROM chatx_blocks b WHERE b.user_id = u.r AND b.blocked_id = u.s) THEN 'blocked'
              WHEN u.p IS NOT NULL AND NOT EXISTS (SELECT FROM chatx_messages m WHERE m.id = u.p
                   AND (m.sender_id, m.recipient_id) IN ((u.s, u.r), (u.r, u.s))) THEN 'reply_to'
              END) AS v(refusal)) AS i;
    news := ARRAY(SELECT n FROM generate_subscripts(senders, 1) AS n WHERE owners[n] = n ORDER BY n);
    ids := ARRAY(SELECT nextval(pg_get_serial_sequence('chatx_messages', 'id'))::integer
                 FROM generate_series(1, cardinality(news)) ORDER BY 1);
    RETURN QUERY
    WITH stored AS (
        INSERT INTO chatx_messages (id, sender_id, recipient_id, body, sent_at, client_id, reply_to)
        SELECT ids[k], senders[n], recipients[n], bodies[n], sent, client_ids[n], reply_tos[n]
        FROM unnest(news) WITH ORDINALITY AS f(n, k)
        ON CONFLICT (sender_id, client_id) DO NOTHING
        RETURNING id
    ), kept AS (
        SELECT f.n, f.id, f.n = min(f.n) OVER (PARTITION BY least(senders[f.n], recipients[f.n]),
                                                            greatest(senders[f.n], recipients[f.n])) AS first_of_pair
        FROM unnest(news, ids) AS f(n, id) JOIN stored ON stored.id = f.id
    ), mine AS (
        SELECT kept.n, kept.id, e.user_id, e.role
        FROM kept, LATERAL (VALUES (senders[kept.n], 0), (recipients[kept.n], 1)) AS e(user_id, role)
        WHERE e.role = 0 OR recipients[kept.n] <> senders[kept.n]
    ), numbered AS (
        SELECT mine.*, u.seq + row_number() OVER (PARTITION BY mine.user_id ORDER BY mine.n, mine.role) AS seq
        FROM mine, LATERAL (SELECT seq FROM chatx_users WHERE id = mine.user_id) AS u
    ), events AS (
        INSERT INTO chatx_events (user_id, seq, kind, message_id) SELECT user_id, seq, 1, id FROM numbered
    ), newest AS (
        UPDATE chatx_users u SET seq = t.seq
        FROM (SELECT user_id, max(seq) AS seq FROM numbered GROUP BY user_id) AS t
        WHERE u.id = t.user_id AND u.id = ANY(people)
    ), sides AS (
        SELECT senders[n] AS me, recipients[n] AS peer, id, (senders[n] = recipients[n])::integer AS unread FROM kept
        UNION ALL SELECT recipients[n], senders[n], id, 1 FROM kept WHERE senders[n] <> recipients[n]
    ), conversations AS (
        INSERT INTO chatx_conversations (user_id, peer_id, last_message_id, unread, read_up_to)
        SELECT me, peer, max(id), sum(unread), 0 FROM sides GROUP BY me, peer
        ON CONFLICT (user_id, peer_id) DO UPDATE SET last_message_id = excluded.last_message_id,
            unread = chatx_conversations.unread + excluded.unread
    )
    SELECT refusals[i.n], owners[i.n], kept.id IS NOT NULL, coalesce(kept.id, o.id), s.seq, r.seq,
           coalesce(kept.n = i.n AND kept.first_of_pair AND senders[i.n] <> recipients[i.n] AND known.user_id IS NULL,
                    false),
           o.recipient, o.body, o.sent_at, o.edited_at, o.deleted, o.reply_to
    FROM generate_subscripts(senders, 1) AS i(n)
    LEFT JOIN kept ON kept.n = owners[i.n]
    LEFT JOIN numbered s ON s.n = i.n AND s.role = 0
    LEFT JOIN numbered r ON r.n = i.n AND r.role = 1
    -- Key lookups each, for the rows that need one. LIMIT keeps the planner
    -- from making either a join, which read and sorted every message (or
    -- conversation) of the database in every commit.
    LEFT JOIN LATERAL (
        SELECT c.user_id FROM chatx_conversations c
        WHERE kept.n = i.n AND kept.first_of_pair AND c.user_id = senders[i.n] AND c.peer_id = recipients[i.n]
        LIMIT 1) AS known ON true
    LEFT JOIN LATERAL (
        SELECT m.id, ou.username::text AS recipient, m.body, m.sent_at, m.edited_at, m.deleted, m.reply_to
        FROM chatx_messages m JOIN chatx_users ou ON ou.id = m.recipient_id
        WHERE kept.id IS NULL AND owners[i.n] IS NOT NULL
          AND m.sender_id = senders[i.n] AND m.client_id = client_ids[i.n]
        LIMIT 1) AS o ON true
    ORDER BY i.n;
END
$$
"""


async def insert_messages_postgres(conn: Connection, items: list[NewMessage]) -> list[Stored | Refused]:
    """insert_messages in one call of chatx_insert_messages(). Attachments are
    checked before it and linked after it, in the batch's transaction (the
    Writer opens one where an item carries an attachment)."""
    attached = await attachments_to_send(conn, items)
    results: dict[int, Stored | Refused] = attachment_refusals(items, attached, {})
    kept = [index for index in range(len(items)) if index not in results]
    results.update(zip(kept, await call_insert_messages(conn, [items[index] for index in kept], attached)))
    attaching = [(items[i].attachment, results[i].message["id"]) for i in kept
                 if items[i].attachment and isinstance(results[i], Stored) and results[i].seqs]
    await conn.execute_many("UPDATE chatx_messages SET attachment_id = ? WHERE id = ?", attaching)
    await conn.execute_many("UPDATE chatx_attachments SET message_id = ? WHERE id = ?",
                            [(message_id, attachment_id) for attachment_id, message_id in attaching])
    return [results[index] for index in range(len(items))]


async def call_insert_messages(conn: Connection, items: list[NewMessage],
                               attached: dict[str, tuple]) -> list[Stored | Refused]:
    if not items:
        return []
    sent_at = now_ms()
    rows = await conn.fetch("SELECT * FROM chatx_insert_messages(?, ?, ?, ?, ?, ?)",
                            [item.sender.id for item in items], [item.recipient.id for item in items],
                            [item.body for item in items], [item.client_id for item in items],
                            [item.reply_to for item in items], sent_at)
    results: list[Stored | Refused] = []
    for index, (item, row) in enumerate(zip(items, rows)):
        refusal, owner, fresh, message_id, sender_seq, recipient_seq, introduced = row[:7]
        if refusal is not None:
            results.append(send_refusal(refusal, item))
            continue
        if fresh:
            first = items[owner - 1]
            original = message_object(message_id, first.sender.username, first.recipient.username, first.body,
                                      sent_at, first.client_id, None, False, first.reply_to,
                                      *attached.get(first.attachment, ())[3:])
        elif item.attachment:  # a retry of a send with an attachment: the original as stored, attachment too
            original = await message_by_id(conn, message_id)
        else:
            recipient, body, stored_at, edited_at, deleted, reply_to = row[7:]
            original = message_object(message_id, item.sender.username, recipient, body, stored_at, item.client_id,
                                      edited_at, deleted, reply_to)
        if owner != index + 1 or not fresh:
            results.append(retry_outcome(original, item))
        else:
            seqs = {item.sender.id: sender_seq} if recipient_seq is None else {
                item.sender.id: sender_seq, item.recipient.id: recipient_seq}
            results.append(Stored(EventKind.MESSAGE, seqs, original,
                                  new_partners=(item.sender.id, item.recipient.id) if introduced else None))
    return results


async def messages_by_client_id(conn: Connection, keys: set[tuple[int, str | None]]) -> dict[tuple, dict[str, Any]]:
    if not keys:
        return {}
    where = " OR ".join(["(m.sender_id = ? AND m.client_id = ?)"] * len(keys))
    rows = await conn.fetch(f"SELECT {MESSAGE_COLUMNS}, m.sender_id FROM chatx_messages m {MESSAGE_JOINS} "
                            f"WHERE {where}", *[value for key in sorted(keys) for value in key])
    return {(row[MESSAGE_WIDTH], row[5]): message_object(*row[:MESSAGE_WIDTH]) for row in rows}


async def message_by_id(conn: Connection, message_id: int) -> dict[str, Any] | None:
    row = await conn.fetch_one(f"SELECT {MESSAGE_COLUMNS} FROM chatx_messages m {MESSAGE_JOINS} WHERE m.id = ?",
                               message_id)
    return None if row is None else message_object(*row)


async def change_message(conn: Connection, me: int, message_id: int, body: str | None) -> Stored | Refused:
    """Edit (a body) or delete (None) a message of mine that is not deleted."""
    row = await conn.fetch_one("SELECT sender_id, recipient_id, attachment_id FROM chatx_messages "
                               "WHERE id = ? AND NOT deleted", message_id)
    if row is None or row[0] != me:
        return Refused("unknown_message", "You have no such message.")
    people = list(dict.fromkeys(row[:2]))
    await lock_users(conn, people)  # then no other writer changes this message: only its sender may
    if row[1] != me and await blocks_me(conn, me, row[1]):
        return Refused("blocked", "The recipient blocks you: the message stays as they have it.")
    if body is None:
        changed = await conn.execute("UPDATE chatx_messages SET body = '', deleted = ?, attachment_id = NULL "
                                     "WHERE id = ? AND NOT deleted", True, message_id)
        kind = EventKind.DELETE
    else:
        changed = await conn.execute("UPDATE chatx_messages SET body = ?, edited_at = ? WHERE id = ? AND NOT deleted",
                                     body, now_ms(), message_id)
        kind = EventKind.EDIT
    if not changed:  # deleted by another process meanwhile
        return Refused("unknown_message", "You have no such message.")
    if body is None:
        await erase_attachments(conn, [row[2]] if row[2] else [])
    seqs = await append_events(conn, [(user_id, kind, message_id, None, None, None) for user_id in people])
    return Stored(kind, dict(zip(people, seqs)), await message_by_id(conn, message_id))


async def advance_read_cursor(conn: Connection, me: User, peer: User, up_to: int) -> Stored | None:
    """Move my cursor to max(old, min(up_to, newest)); None if it did not move."""
    await lock_users(conn, (me.id, peer.id))
    row = await conn.fetch_one("SELECT last_message_id, read_up_to FROM chatx_conversations "
                               "WHERE user_id = ? AND peer_id = ?", me.id, peer.id)
    if row is None or min(up_to, row[0]) <= row[1]:
        return None
    target = min(up_to, row[0])
    newly_read = await conn.fetch_value("SELECT count(*) FROM chatx_messages WHERE recipient_id = ? "
                                        "AND sender_id = ? AND id > ? AND id <= ?", me.id, peer.id, row[1], target)
    await conn.execute("UPDATE chatx_conversations SET read_up_to = ?, unread = unread - ? "
                       "WHERE user_id = ? AND peer_id = ?", target, newly_read, me.id, peer.id)
    # While a block stands either way, my read receipt reaches only my own stream.
    hidden = peer.id != me.id and await blocked_either_way(conn, me.id, peer.id)
    people = [me.id] if hidden else list(dict.fromkeys((me.id, peer.id)))
    seqs = await append_events(conn, [(user_id, EventKind.READ, None, me.id, peer.id, target) for user_id in people])
    return Stored(EventKind.READ, dict(zip(people, seqs)),
                  fields={"reader": me.username, "with": peer.username, "up_to": target})


EVENT_QUERY = (
    f"SELECT e.seq AS seq, e.kind AS kind, {NAMED_MESSAGE_COLUMNS}, rd.username AS reader, w.username AS read_with, "
    "e.up_to AS up_to FROM chatx_events e "
    "LEFT JOIN chatx_messages m ON m.id = e.message_id "
    "LEFT JOIN chatx_users s ON s.id = m.sender_id LEFT JOIN chatx_users r ON r.id = m.recipient_id "
    "LEFT JOIN chatx_attachments a ON a.id = m.attachment_id "
    "LEFT JOIN chatx_users rd ON rd.id = e.reader_id LEFT JOIN chatx_users w ON w.id = e.with_id "
    "WHERE e.user_id = ? AND e.seq > ? ORDER BY e.seq LIMIT ?")


async def events_after(conn: Connection, user_id: int, seq: int, limit: int) -> list[Any]:
    """Named rows of a stream, by seq: seq, kind, NAMED_MESSAGE_COLUMNS, reader, read_with, up_to."""
    return await conn.fetch_named(EVENT_QUERY, user_id, seq, limit)


async def newest_seq(conn: Connection, user_id: int) -> int:
    return await conn.fetch_value("SELECT seq FROM chatx_users WHERE id = ?", user_id) or 0


async def newest_seqs_here(conn: Connection, process_id: str) -> list[tuple[int, int]]:
    """(user id, newest seq) of every user with a socket on this process."""
    return await conn.fetch("SELECT id, seq FROM chatx_users WHERE id IN "
                            "(SELECT user_id FROM chatx_sockets WHERE process_id = ?)", process_id)


async def seq_before_message(conn: Connection, user_id: int, after_id: int) -> int | None:
    """The seq just before my first message event with an id above `after_id` (v1's `after=`)."""
    first = await conn.fetch_value("SELECT min(seq) FROM chatx_events WHERE user_id = ? AND kind = ? "
                                   "AND message_id > ?", user_id, int(EventKind.MESSAGE), after_id)
    return None if first is None else first - 1


async def history_page(conn: Connection, me: int, peer: int, before: int | None, after: int | None,
                       limit: int) -> tuple[list[dict[str, Any]], bool, int, int]:
    """Messages between two people, ascending; whether there are more; both
    read cursors (theirs 0 while a block stands either way)."""
    mine = "((m.sender_id = ? AND m.recipient_id = ?) OR (m.sender_id = ? AND m.recipient_id = ?))"
    args: list[Any] = [me, peer, peer, me]
    if after is not None:
        where, order = mine + " AND m.id > ?", "m.id"
        args.append(after)
    elif before is not None:
        where, order = mine + " AND m.id < ?", "m.id DESC"
        args.append(before)
    else:
        where, order = mine, "m.id DESC"
    # The bodies' sizes first: rows past PAGE_BYTES_MAX bytes of bodies cannot fit in the page
    # (Messenger.history cuts it exactly), and are not read (the issue's 200 rows were 3.2 MB).
    size = "octet_length(m.body)" if conn.postgres else "length(CAST(m.body AS BLOB))"
    sizes = await conn.fetch(f"SELECT m.id, {size} FROM chatx_messages m WHERE {where} ORDER BY {order} LIMIT ?",
                             *args, limit + 1)
    fit, total = 0, 0
    for _, body_size in sizes:
        total += body_size or 0
        if total > PAGE_BYTES_MAX and fit:
            break
        fit += 1
    more = fit > limit or fit < len(sizes)
    ids = [sizes[0][0], sizes[fit - 1][0]] if sizes else [0, 0]  # the rows sized, whatever came since
    rows = await conn.fetch(f"SELECT {MESSAGE_COLUMNS} FROM chatx_messages m {MESSAGE_JOINS} WHERE {where} "
                            f"AND m.id BETWEEN ? AND ? ORDER BY {order}", *args, min(ids), max(ids))
    page = [message_object(*row) for row in rows[:limit]]
    if after is None:
        page.reverse()
    cursors = dict(await conn.fetch("SELECT user_id, read_up_to FROM chatx_conversations WHERE "
                                    "(user_id = ? AND peer_id = ?) OR (user_id = ? AND peer_id = ?)",
                                    me, peer, peer, me))
    theirs = 0 if peer != me and await blocked_either_way(conn, me, peer) else cursors.get(peer, 0)
    return page, more, cursors.get(me, 0), theirs


async def conversation_rows(conn: Connection, me: int, before: int | None, limit: int) -> list[tuple]:
    """My conversations by newest message, with the partner, both cursors and the last message."""
    blocked = BLOCKED_EITHER_WAY.format(a="c.user_id", b="c.peer_id")
    older = "" if before is None else " AND c.last_message_id < ?"
    return await conn.fetch(
        f"SELECT p.id, p.username, p.status, p.last_seen, c.unread, c.read_up_to, pc.read_up_to, {blocked}, "
        f"{MESSAGE_COLUMNS} FROM chatx_conversations c JOIN chatx_users p ON p.id = c.peer_id "
        "LEFT JOIN chatx_conversations pc ON pc.user_id = c.peer_id AND pc.peer_id = c.user_id "
        f"JOIN chatx_messages m ON m.id = c.last_message_id {MESSAGE_JOINS} "
        f"WHERE c.user_id = ?{older} ORDER BY c.last_message_id DESC LIMIT ?",
        me, *([] if before is None else [before]), limit)


# -- attachments


async def erase_attachments(conn: Connection, ids: list[str]) -> None:
    """Attachments and their bytes, in the transaction that made them unwanted.
    The rows go first: on PostgreSQL that waits for a chunk being written
    (insert_attachment_chunk), which the chunks' DELETE then sees."""
    if ids:
        await conn.execute(f"DELETE FROM chatx_attachments WHERE id IN ({marks(len(ids))})", *ids)
        await conn.execute(f"DELETE FROM chatx_attachment_chunks WHERE attachment_id IN ({marks(len(ids))})", *ids)


async def uploaded_on(conn: Connection, user_id: int, day: int) -> int:
    return await conn.fetch_value("SELECT bytes FROM chatx_upload_days WHERE user_id = ? AND day = ?",
                                  user_id, day) or 0


async def insert_attachment(conn: Connection, uploader_id: int, columns: tuple, thumbnail: bytes | None,
                            day: int, quota: int) -> bool:
    """Record an upload before its bytes are stored, counting them against the
    day's quota; False (nothing recorded) if they would go over it (0: no quota)."""
    attachment_id, name, kind, size, width, height = columns
    used = await uploaded_on(conn, uploader_id, day)
    if quota and used + size > quota:
        return False
    await conn.execute("INSERT INTO chatx_upload_days (user_id, day, bytes) VALUES (?, ?, ?) ON CONFLICT "
                       "(user_id, day) DO UPDATE SET bytes = chatx_upload_days.bytes + excluded.bytes",
                       uploader_id, day, size)
    await conn.execute("INSERT INTO chatx_attachments (id, uploader_id, message_id, name, type, size, width, "
                       "height, thumbnail, created_at) VALUES (?, ?, NULL, ?, ?, ?, ?, ?, ?, ?)",
                       attachment_id, uploader_id, name, kind, size, width, height, thumbnail, now_ms())
    return True


async def insert_attachment_chunk(conn: Connection, attachment_id: str, n: int, data: bytes) -> bool:
    """Store a chunk if its attachment is still recorded; False if it was
    erased. On PostgreSQL the row is locked until the chunk commits, so an
    erasure waits for it (on SQLite the writer runs one job at a time)."""
    lock = " FOR KEY SHARE" if conn.postgres else ""
    return bool(await conn.execute("INSERT INTO chatx_attachment_chunks (attachment_id, n, data) "
                                   f"SELECT id, ?, ? FROM chatx_attachments WHERE id = ?{lock}",
                                   n, data, attachment_id))


async def attachment_chunk(conn: Connection, attachment_id: str, n: int) -> bytes | None:
    return await conn.fetch_value("SELECT data FROM chatx_attachment_chunks WHERE attachment_id = ? AND n = ?",
                                  attachment_id, n)


async def readable_attachment(conn: Connection, attachment_id: str, me: int) -> tuple | None:
    """The columns of attachment_object() and whether there is a thumbnail, if
    I uploaded it or am the other person of the message that carries it."""
    return await conn.fetch_one(
        f"SELECT {ATTACHMENT_COLUMNS}, a.thumbnail IS NOT NULL FROM chatx_attachments a "
        "LEFT JOIN chatx_messages m ON m.id = a.message_id "
        "WHERE a.id = ? AND (a.uploader_id = ? OR m.recipient_id = ?)", attachment_id, me, me)


async def attachment_thumbnail(conn: Connection, attachment_id: str) -> bytes | None:
    return await conn.fetch_value("SELECT thumbnail FROM chatx_attachments WHERE id = ?", attachment_id)


async def expire_uploads(conn: Connection, made_before: int, day_before: int) -> int:
    """Erase uploads no message used that were made before `made_before`, and
    forget the quotas of days gone; return how many uploads were erased."""
    ids = [row[0] for row in await conn.fetch(
        "SELECT id FROM chatx_attachments WHERE message_id IS NULL AND created_at < ?", made_before)]
    await erase_attachments(conn, ids)
    await conn.execute("DELETE FROM chatx_upload_days WHERE day < ?", day_before)
    return len(ids)


# -- presence

Transition = tuple[str, str, int]  # username, status, last_seen in ms


async def mark_online(conn: Connection, user_id: int, now: int) -> list[Transition]:
    rows = await conn.fetch("UPDATE chatx_users SET status = 'online', last_seen = ? "
                            "WHERE id = ? AND status = 'offline' RETURNING username", now, user_id)
    return [(rows[0][0], "online", now)] if rows else []


async def mark_offline(conn: Connection, user_id: int, now: int) -> list[Transition]:
    rows = await conn.fetch("UPDATE chatx_users SET status = 'offline', last_seen = ? "
                            "WHERE id = ? AND status = 'online' RETURNING username", now, user_id)
    return [(rows[0][0], "offline", now)] if rows else []


async def offline_if_gone(conn: Connection, user_id: int, now: int, grace_ms: int) -> list[Transition]:
    """Offline, if no socket of theirs is open anywhere and the last one closed at least `grace_ms` ago."""
    rows = await conn.fetch(
        "UPDATE chatx_users SET status = 'offline', last_seen = ? WHERE id = ? AND status = 'online' "
        "AND COALESCE(gone_at, 0) <= ? AND NOT EXISTS (SELECT 1 FROM chatx_sockets WHERE user_id = ?) "
        "RETURNING username", now, user_id, now - grace_ms, user_id)
    return [(rows[0][0], "offline", now)] if rows else []


async def open_socket(conn: Connection, socket_id: str, process_id: str, user_id: int, limit: int = 0,
                      session_id: str | None = None) -> list[Transition] | None:
    """Record an open socket; None, recording nothing, when the user has `limit` open already (0: no limit)."""
    if limit and await conn.fetch_value("SELECT count(*) FROM chatx_sockets WHERE user_id = ?", user_id) >= limit:
        return None
    await conn.execute("INSERT INTO chatx_sockets (id, process_id, user_id, session_id) VALUES (?, ?, ?, ?)",
                       socket_id, process_id, user_id, session_id)
    return await mark_online(conn, user_id, now_ms())


async def close_socket(conn: Connection, socket_id: str, user_id: int, grace_ms: int) -> list[Transition]:
    """Forget the socket; with no grace, its user goes offline at once if it was their last."""
    now = now_ms()
    await conn.execute("DELETE FROM chatx_sockets WHERE id = ?", socket_id)
    await conn.execute("UPDATE chatx_users SET gone_at = ? WHERE id = ?", now, user_id)
    return await offline_if_gone(conn, user_id, now, grace_ms) if grace_ms == 0 else []


async def heartbeat(conn: Connection, process_id: str, live: list[tuple[str, int, str]]) -> list[Transition]:
    """Refresh this process's heartbeat. If a sweeper took it for dead (a long
    pause), put its sockets back and its users online again."""
    now = now_ms()
    if await conn.execute("UPDATE chatx_processes SET heartbeat_at = ? WHERE id = ?", now, process_id):
        return []
    await conn.execute("INSERT INTO chatx_processes (id, heartbeat_at) VALUES (?, ?)", process_id, now)
    transitions: list[Transition] = []
    for socket_id, user_id, session_id in sorted(live, key=lambda socket: socket[1]):  # users in id order
        transitions += await open_socket(conn, socket_id, process_id, user_id, session_id=session_id)
    return transitions


async def sockets_of_ended_sessions(conn: Connection, process_id: str) -> list[str]:
    """This process's sockets whose session is gone: ended where no publish reached."""
    return [row[0] for row in await conn.fetch(
        "SELECT k.id FROM chatx_sockets k WHERE k.process_id = ? AND k.session_id IS NOT NULL AND NOT EXISTS "
        "(SELECT 1 FROM chatx_sessions s WHERE s.id = k.session_id)", process_id)]


async def sweep(conn: Connection, ttl_ms: int, grace_ms: int) -> list[Transition]:
    """Forget processes that stopped heartbeating, then take offline everyone
    left online without a socket once their grace is over."""
    now = now_ms()
    stale = "SELECT id FROM chatx_processes WHERE heartbeat_at < ?"
    await conn.execute(f"DELETE FROM chatx_sockets WHERE process_id IN ({stale})", now - ttl_ms)
    await conn.execute("DELETE FROM chatx_processes WHERE heartbeat_at < ?", now - ttl_ms)
    return await offline_unconnected(conn, now, grace_ms)


async def unregister_process(conn: Connection, process_id: str) -> list[Transition]:
    await conn.execute("DELETE FROM chatx_sockets WHERE process_id = ?", process_id)
    await conn.execute("DELETE FROM chatx_processes WHERE id = ?", process_id)
    return await offline_unconnected(conn, now_ms(), 0)


async def offline_unconnected(conn: Connection, now: int, grace_ms: int) -> list[Transition]:
    orphaned = await conn.fetch("SELECT id FROM chatx_users u WHERE status = 'online' AND NOT EXISTS "
                                "(SELECT 1 FROM chatx_sockets s WHERE s.user_id = u.id) ORDER BY id")
    transitions: list[Transition] = []
    for (user_id,) in orphaned:
        transitions += await offline_if_gone(conn, user_id, now, grace_ms)
    return transitions


async def audience(conn: Connection, username: str) -> list[int]:
    """Ids of the online users who see a user's presence."""
    rows = await conn.fetch(
        "SELECT c.peer_id FROM chatx_users u JOIN chatx_conversations c ON c.user_id = u.id "
        f"JOIN chatx_users p ON p.id = c.peer_id WHERE u.username_key = ? AND p.status = 'online' "
        f"AND {SEES_PRESENCE}", username.lower())
    return [row[0] for row in rows]


async def partner_presence(conn: Connection, user_id: int) -> list[tuple[str, str, int | None]]:
    """(username, status, last_seen) of the online users whose presence I see."""
    return await conn.fetch(
        "SELECT p.username, p.status, p.last_seen FROM chatx_conversations c JOIN chatx_users p ON p.id = c.peer_id "
        f"WHERE c.user_id = ? AND p.status = 'online' AND {SEES_PRESENCE}", user_id)


async def presence_of(conn: Connection, user_id: int, seen_by: int) -> tuple[str, str, int | None] | None:
    """A user's presence if `seen_by` sees it, else None."""
    return await conn.fetch_one(
        "SELECT p.username, p.status, p.last_seen FROM chatx_conversations c JOIN chatx_users p ON p.id = c.peer_id "
        f"WHERE c.user_id = ? AND c.peer_id = ? AND {SEES_PRESENCE}", seen_by, user_id)


async def presence_changes(conn: Connection, process_id: str, since: int, after: tuple[int, int, int],
                           limit: int) -> list[tuple[int, str, str, int, int]]:
    """Changes since `since` seen by this process's users, a page of them
    past `after` in the order (last_seen, whose socket, whose presence):
    (whose socket, username, status, last_seen, whose presence). What a lost
    publish left untold. A change made between pages moves its rows to a later page."""
    # EXISTS, not a join with the sockets: a user with ten sockets here is one row, not ten to sort out.
    return await conn.fetch(
        "SELECT c.user_id, p.username, p.status, p.last_seen, p.id FROM chatx_users p "
        "JOIN chatx_conversations c ON c.peer_id = p.id "
        f"WHERE p.last_seen >= ? AND (p.last_seen, c.user_id, p.id) > (?, ?, ?) AND {SEES_PRESENCE} "
        "AND EXISTS (SELECT 1 FROM chatx_sockets s WHERE s.user_id = c.user_id AND s.process_id = ?) "
        "ORDER BY p.last_seen, c.user_id, p.id LIMIT ?",
        since, *after, process_id, limit)


# -- administration


async def database_figures(conn: Connection) -> dict[str, int]:
    queries = {"users": "SELECT count(*) FROM chatx_users",
               "online": "SELECT count(*) FROM chatx_users WHERE status = 'online'",
               "messages": "SELECT count(*) FROM chatx_messages",
               "conversations": "SELECT count(*) FROM chatx_conversations WHERE user_id <= peer_id",
               "sessions": "SELECT count(*) FROM chatx_sessions",
               "open sockets": "SELECT count(*) FROM chatx_sockets",
               "processes": "SELECT count(*) FROM chatx_processes"}
    return {name: await conn.fetch_value(sql) for name, sql in queries.items()}


# ---- wire frames ----------------------------------------------------------------------
#
# What a socket's outbox holds, as typed values. The ones that travel between
# processes are encoded as a JSON array whose first element names the type.


@dataclass(frozen=True, slots=True)
class Frame:
    """A frame sent as it is: ack, typing, error, pong."""

    text: str


@dataclass(frozen=True, slots=True)
class StreamFrame:
    """A numbered event of the socket's user: sent once, in seq order."""

    seq: int
    text: str


@dataclass(frozen=True, slots=True)
class PresenceFrame:
    """A partner's presence: sent unless the socket knows it already."""

    username: str
    status: str
    last_seen: str | None

    @property
    def text(self) -> str:
        return dumps({"type": "presence", "username": self.username, "status": self.status,
                      "last_seen": self.last_seen})


@dataclass(frozen=True, slots=True)
class Revoke:
    """Sessions ended: one (`session_id`), or every one of the user but `keep`.
    Their sockets close with CLOSE_REVOKED."""

    session_id: str | None
    keep: str | None = None

    def ends(self, session_id: str | None) -> bool:
        """A socket of a person the host named (no session) ends with every session."""
        if self.session_id:
            return session_id == self.session_id
        return session_id is None or session_id != self.keep


@dataclass(frozen=True, slots=True)
class UserGone:
    """An account was deleted: every process forgets what it knew of the name."""

    username_key: str


@dataclass(frozen=True, slots=True)
class Resync:
    """Read the stream from the database, past what the socket has sent: what
    was published may be lost, or never was. Three producers: the broadcast
    connection came back (RedisPubSubBackend._resync_subscribers, `lost_at`
    is when it went; on the process channel Fanout's resync callbacks tell
    presence again since then), the heartbeat found a socket behind its
    stream (Messenger.watch), and a socket starts with its replay
    (ChatSocket.serve). ChatSocket.send_item checks the session is alive,
    then catches up."""

    lost_at: int


OutboxItem = Union[Frame, StreamFrame, PresenceFrame, Revoke, Resync]


Published = Union[Frame, StreamFrame, PresenceFrame, Revoke, UserGone]
WIRE_NAMES: dict[type, str] = {StreamFrame: "stream", PresenceFrame: "presence", Revoke: "revoke", Frame: "frame",
                               UserGone: "gone"}
WIRE_TYPES = {name: kind for kind, name in WIRE_NAMES.items()}


def encode_item(item: Published) -> str:
    return dumps([WIRE_NAMES[type(item)], *(getattr(item, name) for name in item.__slots__)])


def decode_item(text: str) -> Published:
    name, *fields = json.loads(text)
    return WIRE_TYPES[name](*fields)


def hello_frame(user: User, seq: int, presence: list[tuple[str, str, str | None]]) -> str:
    return dumps({"type": "hello", "user": user.public(), "seq": seq,
                  "presence": [{"username": name, "status": status, "last_seen": last_seen}
                               for name, status, last_seen in presence]})


def error_frame(code: str, detail: str, client_id: str | None = None) -> Frame:
    frame = {"type": "error", "code": code, "detail": detail}
    if client_id is not None:
        frame["client_id"] = client_id
    return Frame(dumps(frame))


# -- stream events: each kind of EventKind makes its frame, live from what was
# Stored and replayed from its named row of events_after().


class StreamKind(Protocol):
    """One kind of event: its frame, live and replayed."""

    def frame(self, seq: int, stored: Stored) -> StreamFrame: ...

    def replayed(self, row: Any) -> StreamFrame: ...


class MessageEvent:
    """A message, edit or delete: the frame carries the message, as it is now
    when replayed (an erased one replays erased)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def frame(self, seq: int, stored: Stored) -> StreamFrame:
        return StreamFrame(seq, f'{{"type":"{self.name}","seq":{seq},"message":{stored.message_text}}}')

    def replayed(self, row: Any) -> StreamFrame:
        seq = row["seq"]
        return StreamFrame(seq, f'{{"type":"{self.name}","seq":{seq},"message":{dumps(message_of(row))}}}')


class ReadEvent:
    """A read receipt: `reader` read the conversation with `with` up to message `up_to`."""

    __slots__ = ()

    def frame(self, seq: int, stored: Stored) -> StreamFrame:
        return StreamFrame(seq, dumps({"type": "read", "seq": seq, **stored.fields}))

    def replayed(self, row: Any) -> StreamFrame:
        seq = row["seq"]
        return StreamFrame(seq, dumps({"type": "read", "seq": seq, "reader": row["reader"],
                                       "with": row["read_with"], "up_to": row["up_to"]}))


STREAM_KINDS: dict[EventKind, StreamKind] = {
    EventKind.MESSAGE: MessageEvent("message"), EventKind.READ: ReadEvent(), EventKind.EDIT: MessageEvent("edit"),
    EventKind.DELETE: MessageEvent("delete")}


# ---- broadcast transport ----------------------------------------------------------------

def redacted(url: str) -> str:
    """A URL fit for a log: its password masked."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return parts._replace(netloc=parts.netloc.replace(":" + parts.password + "@", ":***@", 1)).geturl()


def redis_command(*args: str | int) -> bytes:
    """One command in Redis's wire format (RESP)."""
    encoded = [arg.encode() if isinstance(arg, str) else b"%d" % arg for arg in args]
    return b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in encoded)


# A publish waiting for the next pipeline: (channel, message, future, mine).
# publish_elsewhere() gives a function that makes the text and, for `mine`, 1
# if this process subscribes to the channel; the publish barrier has no
# channel, and a future.
Outgoing = tuple[Union[str, None], Union[str, Callable[[], str]], Union[asyncio.Future, None], Union[int, None]]


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
    all when Redis counts no subscriber of its channel but this process
    (_send_pipeline says why no other process misses one)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.origin = uuid.uuid4().hex
        self.healthy = False
        self._connected_before = False
        self._lost_at: int | None = None
        self._last_heard = 0.0
        self._pubsub: Any = None
        self._channels: set[str] = set()
        self._confirmed: dict[str, asyncio.Future] = {}
        # Channels Redis has confirmed this process's subscription to, with no
        # unsubscribe of them on the way: what publish_elsewhere() may count as its own.
        self._subscribed_here: set[str] = set()
        self._unsubscribing: dict[str, int] = {}
        self._outgoing: list[Outgoing] = []
        # Channel -> subscribers PUBSUB NUMSUB last counted, kept while that is more
        # than this process: the next batch publishes to them without waiting for its count.
        self._counted_elsewhere: dict[str, int] = {}

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
        """Within a few seconds whatever Redis does. redis-py may turn the
        cancellation of a blocked read into its own TimeoutError, which the
        listener would take for a lost connection: it ends once closing instead."""
        # publish_elsewhere() does not wait: the publisher sends what it left, then ends.
        self._closing = True
        self._wake_publisher.set()
        await asyncio.wait([self._publisher], timeout=2)
        for task in (self._listener, self._publisher):
            task.cancel()
        await asyncio.wait([self._listener, self._publisher], timeout=1)
        try:
            await asyncio.wait_for(self._publishing.disconnect(), 1)
            await asyncio.wait_for(self._redis.aclose(), 1)
        except (RedisError, OSError, asyncio.TimeoutError):
            pass

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
        """Publishes queued before this have run before Redis sees the
        UNSUBSCRIBE: they counted this process among the subscribers."""
        self._channels.discard(channel)
        self._confirmed.pop(channel, None)
        self._subscribed_here.discard(channel)
        self._unsubscribing[channel] = self._unsubscribing.get(channel, 0) + 1
        if self.healthy:
            try:
                await self._publish_queued()
                await self._pubsub.unsubscribe(channel)
            except (RedisError, OSError):
                pass

    async def _publish_queued(self) -> None:
        barrier = asyncio.get_running_loop().create_future()
        self._outgoing.append((None, "", barrier, None))
        self._wake_publisher.set()
        await barrier

    def publish_elsewhere(self, channel: str, message: Callable[[], str]) -> None:
        """Publish `message()` to the other processes only, without waiting: it
        joins the next pipeline, and a failure is logged. It is made and sent
        only when Redis counts a subscriber of the channel besides this process:
        with one process, nothing is encoded, sent, or comes back to be dropped."""
        mine = 1 if channel in self._subscribed_here else 0
        self._outgoing.append((channel, message, None, mine))
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
                        await self._drop_subscriptions()
                    for _, _, future, _ in batch:
                        if future is not None and not future.done():
                            future.set_exception(exc)
                    continue
            for _, _, future, _ in batch:
                if future is not None and not future.done():
                    future.set_result(None)

    async def _send_pipeline(self, batch: list[Outgoing]) -> None:
        """The batch's commands on the publisher's own connection: one PUBSUB
        NUMSUB of its channels, and with it, in the same write, the publishes
        to channels another process was counted on last time; then, once
        NUMSUB answers, those to the channels it counts another process on.

        Why nothing is missed: a publish nobody reads is harmless, so only
        leaving a frame out needs a reason, and the only reason is this
        batch's own NUMSUB, sent after the commits of the batch's frames. A
        process it does not count subscribed after those commits, and reads
        the database after subscribing. A remembered count only ever lets a
        frame out early, never keeps one back: a process that joins a channel
        while frames flow costs at most one batch's wait, never a frame.
        A redis-py Pipeline per batch, or its command packing, took a tenth
        of the server's CPU when messages came one at a time."""
        connection = self._publishing  # reconnects by itself once disconnected
        highest: dict[str, int] = {}  # channel -> the most this process counted itself as subscribed
        for channel, _, _, mine in batch:
            if mine is not None and highest.get(channel, -1) < mine:
                highest[channel] = mine
        counted = self._counted_elsewhere
        early = {channel for channel, mine in highest.items() if counted.get(channel, 0) > mine}
        first: list[bytes] = [redis_command("PUBSUB", "NUMSUB", *highest)] if highest else []
        then: list[bytes] = []
        late: list[Outgoing] = []
        for item in batch:
            channel, message, _, _ = item
            if channel is None:
                then.append(redis_command("PING"))
            elif channel in early:
                first.append(redis_command("PUBLISH", channel, f"{self.origin} {message()}"))
            else:
                late.append(item)
        if first:
            await connection.send_packed_command(b"".join(first), check_health=False)
        if highest:
            subscribers = dict(zip(highest, (await connection.read_response())[1::2]))
            self._remember(subscribers, highest)
            then[:0] = [redis_command("PUBLISH", channel, f"{self.origin} {message()}")
                        for channel, message, _, mine in late if subscribers[channel] > mine]
        if then:
            await connection.send_packed_command(b"".join(then), check_health=False)
        for _ in range(len(first) - (1 if highest else 0) + len(then)):
            await connection.read_response()

    def _remember(self, subscribers: dict[str, int], highest: dict[str, int]) -> None:
        """Keep the channels another process subscribes to, for the next batch (bounded: forgetting is safe)."""
        counted = self._counted_elsewhere
        for channel, count in subscribers.items():
            if count > highest[channel]:
                counted[channel] = count
            else:
                counted.pop(channel, None)
        if len(counted) > COUNTED_CHANNELS_MAX:
            counted.clear()

    async def _listen_forever(self) -> None:
        backoff = 0.1
        while not self._closing:
            try:
                await self._listen()
            except Exception as exc:  # whatever broke, the listener must come back
                if self._closing:
                    return
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

    async def _drop_subscriptions(self) -> None:
        """Publishes were lost: this process resubscribes, and its subscribers
        catch up from the database (the others learn from Messenger.watch)."""
        self._lost_at = self._lost_at or now_ms()
        try:
            await self._pubsub.connection.disconnect()
        except Exception:
            pass

    def _resync_subscribers(self) -> None:
        if not self._connected_before:
            self._connected_before = True
            logger.info("broadcast connected to %s", redacted(self.url))
        elif self._lost_at is not None:
            logger.warning("broadcast connection restored; subscribers catch up")
        if self._lost_at is None:
            return
        for channel in self._channels:
            self._events.put_nowait(Event(channel, Resync(self._lost_at)))
        self._lost_at = None

    async def _keep_alive(self, pubsub: Any) -> None:
        """PING a connection quiet for a second. One silent for 3 s (a host gone
        without a reset, packets dropped) is closed well inside the publish
        timeout, so the blocked read fails and the listener reconnects."""
        while True:
            await asyncio.sleep(1)
            silent = time.monotonic() - self._last_heard
            try:
                if silent > 3:
                    logger.warning("no answer from Redis for %.0f s; reconnecting", silent)
                    self.healthy = False  # at once: reconnecting may take the connect timeout
                    self._lost_at = self._lost_at or now_ms()
                    await pubsub.connection.disconnect()
                    return
                if silent >= 1:
                    await pubsub.ping()
            except (RedisError, OSError):
                return  # the listener sees the same failure


# ---- services -------------------------------------------------------------------------
#
# Each owns one concern and its state. Sockets (ChatSocket, below) are
# referred to only as an OpenSocket: what is used of them here.


class OpenSocket(Protocol):
    """What the services read of an open socket and call on it."""

    user: User
    session: Session
    socket_id: str
    seq: int  # the newest event of its stream it has sent or skipped
    sending_since: float  # when the frame being sent was handed to the server; 0 when none is

    def enqueue(self, item: OutboxItem) -> None: ...

    def end(self, outcome: asyncio.Task | int) -> None: ...

    def pong_overdue(self) -> bool: ...


class Metrics:
    """What an operator watches, in Prometheus's text format at /metrics. A
    registry of this app's own: two apps in one process share nothing."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.messages_stored = Counter("chatx_messages_stored", "Messages stored by this process",
                                       registry=self.registry)
        self.commit_seconds = Histogram("chatx_commit_seconds", "Duration of one write transaction",
                                        buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5),
                                        registry=self.registry)
        self.commit_retries = Counter("chatx_commit_retries", "Batches run again after a deadlock or "
                                      "serialization failure", registry=self.registry)
        self.sockets_closed = Counter("chatx_sockets_closed", "WebSocket connections closed, by close code",
                                      ["code"], registry=self.registry)
        self.refusals = Counter("chatx_refusals", "Requests and frames refused by a limit", ["limit"],
                                registry=self.registry)
        self.open_sockets = Gauge("chatx_open_sockets", "Open WebSocket connections of this process",
                                  registry=self.registry)
        self.users_connected = Gauge("chatx_users_connected", "Users with a socket open on this process",
                                     registry=self.registry)
        self.broadcast_up = Gauge("chatx_broadcast_up", "1 while the broadcast connection works",
                                  registry=self.registry)
        self.database_up = Gauge("chatx_database_up", "1 while the last commit worked", registry=self.registry)


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    stamp: float = field(default_factory=time.monotonic)

    def take(self) -> bool:
        if not self.has_one():
            return False
        self.tokens -= 1
        return True

    def has_one(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens >= 1

    def wait(self) -> float:
        """Seconds until the next token (0 with one at hand)."""
        return max(0.0, (1 - self.tokens) / self.rate)


def bucket_of(buckets: dict[int, TokenBucket], key: int, rate: float, burst: float) -> TokenBucket:
    """The key's bucket, full when first used."""
    bucket = buckets.get(key)
    if bucket is None:
        bucket = buckets[key] = TokenBucket(rate, burst, burst)
    return bucket


class Limits:
    """How often one account may act on this process, so that it cannot hurt others."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.buckets: dict[int, TokenBucket] = {}
        self.frame_buckets: dict[int, TokenBucket] = {}
        self.directory_buckets: dict[int, TokenBucket] = {}
        self.first_contacts_sent: dict[int, TokenBucket] = {}
        self.first_contacts_received: dict[int, TokenBucket] = {}
        self.read_buckets: dict[int, TokenBucket] = {}
        self.typed: dict[tuple[int, int], float] = {}  # (sender, peer) -> when a typing frame last went

    def allow_typing(self, sender: int, peer: int) -> bool:
        """At most one typing frame per `typing_interval` from one person to another."""
        interval, now = self.settings.typing_interval, time.monotonic()
        if now - self.typed.get((sender, peer), -interval) < interval:
            return False
        if len(self.typed) > 10_000:
            self.typed = {pair: at for pair, at in self.typed.items() if now - at < interval}
        self.typed[(sender, peer)] = now
        return True

    def allow_send(self, user_id: int) -> bool:
        """`send`, `read`, `edit` and `delete` frames share one bucket per user."""
        return bucket_of(self.buckets, user_id, self.settings.send_rate, self.settings.send_burst).take()

    def allow_frame(self, user_id: int) -> bool:
        """Every frame a user's sockets send, whatever it is, costs a token: a
        ping or a typing frame to an unknown name is work too. Never tighter
        than the send bucket, so that it is not the one sends run into."""
        if not self.settings.frame_rate:
            return True
        return bucket_of(self.frame_buckets, user_id, max(self.settings.frame_rate, self.settings.send_rate),
                         max(self.settings.frame_burst, self.settings.send_burst)).take()

    def directory_wait(self, user_id: int) -> float:
        """0 if the user may search the directory now, else the seconds until they may."""
        rate, burst = self.settings.directory_rate, self.settings.directory_burst
        if not rate:
            return 0.0
        bucket = bucket_of(self.directory_buckets, user_id, rate, burst)
        return 0.0 if bucket.take() else bucket.wait()

    def allow_first_contact(self, sender: int, recipient: int) -> bool:
        """A message to someone who never answered the sender takes from the
        sender's budget and the recipient's, each so many a minute; a message
        refused by one takes nothing from the other."""
        budgets = []
        for buckets, user_id, per_minute in (
                (self.first_contacts_sent, sender, self.settings.first_contacts_per_sender),
                (self.first_contacts_received, recipient, self.settings.first_contacts_per_recipient)):
            if per_minute:
                budgets.append(bucket_of(buckets, user_id, per_minute / 60, per_minute))
        if not all(bucket.has_one() for bucket in budgets):
            return False
        for bucket in budgets:
            bucket.take()
        return True

    def allow_read(self, user_id: int) -> bool:
        """History pages and the conversation list share one bucket per user
        (CHATX_READ_RATE / CHATX_READ_BURST; a rate of 0 means no limit)."""
        if not self.settings.read_rate:
            return True
        return bucket_of(self.read_buckets, user_id, self.settings.read_rate, self.settings.read_burst).take()


def hash_password(password: str, salt: bytes | None = None) -> str:
    """scrypt at OWASP's N=2^14, r=8, p=5 (16 MiB)."""
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
# The password of a user the host named: no scrypt digest is empty, so none matches.
NO_PASSWORD = "scrypt$16384$8$5$" + "00" * 16 + "$"


def lower_thread_priority() -> None:
    """A lower CPU priority for a hashing thread (Linux gives threads
    their own nice value): where the server has one core, sign-ins must not
    slow chat.
    Not the lowest: at 19 a busy machine left a sign-in waiting for seconds."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
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


class Busy(Exception):
    """Too many password hashes are waiting; the client tries again shortly."""


class TooManyAttempts(Exception):
    def __init__(self, kind: str, retry_after: int) -> None:
        self.kind, self.retry_after = kind, retry_after


class ChatError(Exception):
    """What the chat refuses, by the code of the contract's error frame: what
    `chat.send` raises, and the parent of a frame's refusal."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


def session_cookie(conn: HTTPConnection) -> str:
    """The session cookie's name: over HTTPS with the `__Host-` prefix, which
    a browser lets only this origin set (Secure, Path=/, no Domain), so that a
    sibling subdomain or a plain-HTTP page cannot plant a second one."""
    return SECURE_SESSION_COOKIE if conn.url.scheme in ("https", "wss") else SESSION_COOKIE


class Accounts:
    """Users, their passwords and sessions, and the limits on signing in and up."""

    def __init__(self, storage: Storage, fanout: Fanout, settings: Settings) -> None:
        self.storage, self.fanout, self.settings = storage, fanout, settings
        self.users_by_key: dict[str, User] = {}
        self.secret = ""
        # Existing users' hashes and sign-ups' in pools and queues of their own:
        # however many sign-ups come, a sign-in finds a place.
        self.hashers: dict[str, ThreadPoolExecutor] = {}
        self.hashes_waiting = {"sign-in": 0, "sign-up": 0}
        self.hashes_by_address: dict[str, int] = {}
        self.idle_ms = int(settings.session_idle_days * 86_400_000) or 2**62
        self.purger: asyncio.Task | None = None
        self.fanout.gone_callbacks.append(self.forget)
        self.deleting: list[Callable[[User], Awaitable[None]]] = []  # run as an account is deleted

    async def start(self) -> None:
        self.secret = self.settings.secret_key or await self.storage.write(ensure_secret, secrets.token_urlsafe(32))
        self.hashers = {lane: ThreadPoolExecutor(threads, thread_name_prefix=f"chatx-{lane}",
                                                 initializer=lower_thread_priority)
                        for lane, threads in (("sign-in", 2), ("sign-up", 1))}
        self.purger = asyncio.create_task(self.purge())

    async def stop(self) -> None:
        if self.purger:
            self.purger.cancel()
            await asyncio.gather(self.purger, return_exceptions=True)
        for hashers in self.hashers.values():
            hashers.shutdown(wait=False)

    async def purge(self) -> None:
        """Expired and idle sessions, and attempts past their window, go."""
        while True:
            try:
                await self.storage.write(purge_expired, now_ms(), self.idle_ms)
            except Exception as exc:
                logger.warning("purging expired sessions failed: %s", exc)
            await asyncio.sleep(600)

    async def hash(self, address: str, function: Callable[..., Any], *args: Any, lane: str = "sign-in") -> Any:
        """Run a slow hash in the hashing threads of its lane, never on the
        event loop. A bounded queue per lane, and a bound per client address:
        one client's flood of guesses is refused (Busy) rather than delay
        everyone's sign-in."""
        most = SIGNUP_HASHES_WAITING_MAX if lane == "sign-up" else HASHES_WAITING_MAX
        if self.hashes_waiting[lane] >= most or self.hashes_by_address.get(address, 0) >= HASHES_PER_ADDRESS_MAX:
            raise Busy()
        self.hashes_waiting[lane] += 1
        self.hashes_by_address[address] = self.hashes_by_address.get(address, 0) + 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.hashers[lane], function, *args)
        finally:
            self.hashes_waiting[lane] -= 1
            if self.hashes_by_address[address] == 1:
                del self.hashes_by_address[address]
            else:
                self.hashes_by_address[address] -= 1

    async def check_attempts(self, kind: str, key: str, limit: int, window_ms: int) -> None:
        """Raise TooManyAttempts if `limit` attempts of this kind and key fall within the window (0: no limit)."""
        if not limit:
            return
        now = now_ms()
        count, oldest = await self.storage.read(attempts_since, kind, key, now - window_ms)
        if count >= limit:
            raise TooManyAttempts(kind, max(1, -(-(oldest + window_ms - now) // 1000)))

    async def register(self, username: str, password: str, address: str) -> User | None:
        """None if the name, or one like it, is taken: found before hashing, so a
        taken name costs no hash (the answer says it is taken anyway). Every
        attempt counts against the address's limit."""
        if self.settings.signups_per_address:
            await self.check_attempts("signup", address, self.settings.signups_per_address, SIGNUP_WINDOW_MS)
            await self.storage.write(add_attempt, "signup", address, now_ms())
        if await self.storage.read(username_taken, username):
            return None
        password_hash = await self.hash(address, hash_password, password, lane="sign-up")
        try:
            return await self.storage.write(insert_user, username, password_hash, now_ms())
        except Exception as exc:
            if is_unique_violation(exc):
                return None
            raise

    async def authenticate(self, username: str, password: str, address: str) -> User | None:
        """The user, if the password is theirs. Past the failure limits, even
        the right password is refused (TooManyAttempts) until the window passes."""
        key = username.lower()
        await self.check_login_attempts(key, address)
        found = await self.storage.read(password_of, key)
        if found and await self.hash(address, check_password, password, found[1]):
            await self.storage.write(clear_attempts, "login-user", key)
            return found[0]
        if not found:
            await self.hash(address, check_password, password, DUMMY_HASH)  # as slow as a wrong password
        await self.add_login_failure(key, address)
        return None

    async def check_login_attempts(self, key: str, address: str) -> None:
        await self.check_attempts("login-user", key, self.settings.login_failures_per_user, LOGIN_WINDOW_MS)
        await self.check_attempts("login-address", address, self.settings.login_failures_per_address, LOGIN_WINDOW_MS)

    async def add_login_failure(self, key: str, address: str) -> None:
        now = now_ms()
        await self.storage.write(add_attempt, "login-user", key, now)
        await self.storage.write(add_attempt, "login-address", address, now)

    async def create_session(self, user: User, replaces: Session | None = None) -> str:
        """A new session (a new token at every sign-in); the one it `replaces` ends."""
        token = secrets.token_urlsafe(32)
        await self.storage.write(insert_session, session_id(token), user.id, now_ms() + SESSION_DAYS * 86_400_000,
                                 replaces.id if replaces else None)
        if replaces:
            self.fanout.deliver(replaces.user.id, Revoke(replaces.id))
        return f"{token}.{sign(self.secret, token)}"

    async def session_from(self, conn: HTTPConnection) -> Session | None:
        token, _, signature = conn.cookies.get(session_cookie(conn), "").rpartition(".")
        if not token or not hmac.compare_digest(signature.encode(errors="replace"),
                                                sign(self.secret, token).encode(errors="replace")):
            return None
        now = now_ms()
        found = await self.storage.read(session_row, session_id(token), now, self.idle_ms)
        if found is None:
            return None
        session, used_at = found
        if used_at < now - SESSION_TOUCH_MS:
            await self.storage.write(touch_session, session.id, now)
        return session

    async def session_alive(self, sid: str | None) -> bool:
        return sid is None or await self.storage.read(session_exists, sid)

    async def revoke(self, session: Session) -> None:
        """End the session; its sockets close with CLOSE_REVOKED on every process."""
        await self.storage.write(delete_session, session.id)
        self.fanout.deliver(session.user.id, Revoke(session.id))

    async def revoke_all(self, user: User) -> None:
        await self.storage.write(delete_sessions, user.id)
        self.fanout.deliver(user.id, Revoke(None))

    async def password_matches(self, user: User, password: str, address: str) -> bool:
        """A wrong password here (a password change, an account deletion) is
        a failed sign-in: it counts, and past the limits even the right one
        is refused (TooManyAttempts)."""
        key = user.username.lower()
        await self.check_login_attempts(key, address)
        found = await self.storage.read(password_of, key)
        if found is not None and await self.hash(address, check_password, password, found[1]):
            return True
        await self.add_login_failure(key, address)
        return False

    async def change_password(self, session: Session, new_password: str, address: str) -> None:
        """The new password, and every other session of the user ends."""
        password_hash = await self.hash(address, hash_password, new_password)
        await self.storage.write(set_password, session.user.id, password_hash, session.id)
        self.fanout.deliver(session.user.id, Revoke(None, keep=session.id))

    async def delete(self, user: User) -> None:
        """The account and all its messages go; the `deleting` callbacks run
        first (Presence: partners see it go offline), and every process
        forgets the name, which may be registered again."""
        for callback in self.deleting:
            await callback(user)
        await self.storage.write(delete_account, user.id)
        self.storage.erase_soon()
        self.fanout.deliver(user.id, Revoke(None))
        self.fanout.deliver_everywhere(UserGone(user.username.lower()))

    def forget(self, item: UserGone) -> None:
        self.users_by_key.pop(item.username_key, None)

    async def named(self, username: str) -> User:
        """The user the host names, made on first sight with no password.
        ChatError for a name that breaks the rules or looks like another's."""
        if problem := username_problem(username):
            raise ChatError("invalid_username", problem)
        user = await self.find_user(username)
        if user is None:
            try:
                user = await self.storage.write(insert_user, username, NO_PASSWORD, now_ms())
            except Exception as exc:
                if not is_unique_violation(exc):
                    raise
            user = user or await self.find_user(username)  # None: made by another process meanwhile
        if user is None:
            raise ChatError("username_taken", f"The username {username!r} looks like another user's.")
        return user

    async def find_user(self, username: str) -> User | None:
        key = username.lower()
        user = self.users_by_key.get(key)
        if user is None:
            user = await self.storage.read(user_by_key, key)
            if user is not None:
                self.users_by_key[key] = user
        return user

    async def directory(self, me: User, prefix: str, after: str, limit: int) -> dict[str, Any]:
        rows = await self.storage.read(directory_page, me.id, prefix.lower(), after.lower(), limit + 1)
        found = [{"id": user_id, "username": username, "status": status if seen else None,
                  "last_seen": iso(last_seen) if seen else None}
                 for user_id, username, status, last_seen, seen in rows[:limit]]
        return {"users": found, "has_more": len(rows) > limit}

    async def blocked(self, me: User) -> list[User]:
        return await self.storage.read(blocked_users, me.id)

    async def blocks_me(self, me: User, other: User) -> bool:
        return await self.storage.read(blocks_me, me.id, other.id)


Authenticate = Callable[[HTTPConnection], Union[str, None, Awaitable[Union[str, None]]]]


class Identity:
    """Who a request or socket handshake comes from: ChatX's session cookie,
    else the host's `authenticate`, else a token the host signed
    (CHATX_JWT_SECRET); the first that names someone. A person named by the
    host or a token has a Session with no id."""

    def __init__(self, accounts: Accounts, settings: Settings, authenticate: Authenticate | None) -> None:
        self.accounts, self.settings, self.authenticate = accounts, settings, authenticate

    @property
    def hosted(self) -> bool:
        """The host names people: ChatX's own sign-up and sign-in are off."""
        return self.authenticate is not None

    def presents_token(self, conn: HTTPConnection) -> bool:
        """A browser adds an Authorization header across sites only where CORS
        lets it, so a request that carries one is no forgery."""
        return bool(self.settings.jwt_secret) and self.bearer(conn) is not None

    @staticmethod
    def bearer(conn: HTTPConnection) -> str | None:
        scheme, _, token = conn.headers.get("authorization", "").partition(" ")
        return token.strip() or None if scheme.lower() == "bearer" else None

    async def of(self, conn: HTTPConnection) -> Session | None:
        """The person, or None. ChatError for a name that breaks the rules."""
        session = await self.accounts.session_from(conn)
        if session is None and self.authenticate is not None:
            name = self.authenticate(conn)
            if inspect.isawaitable(name):
                name = await name
            if name is not None:
                session = Session(None, await self.user_named(name, "authenticate"))
        if session is None and self.settings.jwt_secret:
            name = self.token_subject(self.bearer(conn) or conn.scope.get("chatx.token"))
            if name is not None:
                session = Session(None, await self.user_named(name, "a token"))
        return session

    def token_subject(self, token: str | None) -> str | None:
        """The `sub` of an HS256 token signed with our secret that has not
        expired; None for any other (`alg: none` and other algorithms too)."""
        if not token:
            return None
        try:
            claims = jwt.decode(token, self.settings.jwt_secret, algorithms=["HS256"],
                                options={"require": ["exp", "sub"]})
        except jwt.PyJWTError:
            return None
        return claims["sub"]

    async def user_named(self, name: Any, source: str) -> User:
        try:
            if not isinstance(name, str):
                raise ChatError("invalid_username", "A username is a string.")
            return await self.accounts.named(name)
        except ChatError as exc:
            logger.warning("refused the username %r that %s gave: %s", name, source, exc.detail)
            raise


class Fanout:
    """Hands items to every open socket of a user: at once to this process's
    sockets, and through the broadcast to the other processes' (local first).
    One subscription and one relay task per user serve all of that user's
    sockets on this process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.local: dict[int, set[OpenSocket]] = {}  # user id -> this process's open sockets
        # user id -> partner key -> (username, status, last_seen) that the user's sockets here were
        # told: one per user, not per socket, so that a socket's memory does not grow with partners.
        self.presence_told: dict[int, dict[str, tuple[str, str, str | None]]] = {}
        self.presence_complete: set[int] = set()  # users whose presence_told began with a hello from storage
        self.relays: dict[int, tuple[asyncio.Task, asyncio.Future]] = {}  # user id -> relay, subscribed
        self.ending_relays: dict[int, asyncio.Task] = {}
        self.resync_callbacks: list[Callable[[int], Awaitable[None]]] = []
        self.gone_callbacks: list[Callable[[UserGone], None]] = []
        self.backend: RedisPubSubBackend | None = None
        self.namespace = "chatx"

    async def start(self, namespace: str) -> None:
        # Apps on other databases may share one Redis: their channels must not meet.
        self.namespace = namespace
        scheme = urlsplit(self.settings.broadcast_url).scheme
        if scheme in ("redis", "rediss"):
            self.backend = RedisPubSubBackend(self.settings.broadcast_url)
            self.broadcast = Broadcast(backend=self.backend)
        elif scheme == "memory":
            self.broadcast = Broadcast(self.settings.broadcast_url)
        else:
            raise ValueError(f"CHATX_BROADCAST_URL must be memory:// or redis://, not {scheme}://")
        await self.broadcast.connect()
        subscribed = asyncio.get_running_loop().create_future()
        self.process_relay = asyncio.create_task(self.relay_process(subscribed))
        await asyncio.shield(subscribed)
        self.stall_watch = asyncio.create_task(self.close_stalled())

    async def stop(self) -> None:
        for task in (self.process_relay, self.stall_watch):
            task.cancel()
        await asyncio.gather(self.process_relay, self.stall_watch, return_exceptions=True)
        try:
            await self.broadcast.disconnect()
        except Exception:
            logger.exception("broadcast did not disconnect cleanly")

    @property
    def healthy(self) -> bool:
        return self.backend is None or self.backend.healthy

    def sockets(self) -> list[OpenSocket]:
        return [socket for group in self.local.values() for socket in group]

    def deliver(self, user_id: int, item: Frame | StreamFrame | PresenceFrame | Revoke) -> None:
        """To every socket of the user, here at once, elsewhere through the broadcast."""
        self.deliver_here(user_id, item)
        if self.backend is not None:
            self.backend.publish_elsewhere(self.channel(user_id), functools.partial(encode_item, item))

    async def close_stalled(self) -> None:
        """A socket whose client took no frame for SEND_STALL_S is closed: its
        replay or backlog must not hold the server's memory, and its client
        reconnects with `since=` and loses nothing. So is one whose client
        left the server's keepalive ping unanswered for half its timeout:
        closed by ChatX with CLOSE_TRY_LATER, before the server fails it with 1011."""
        while True:
            await asyncio.sleep(1)
            now = time.monotonic()
            for socket in self.sockets():
                if (socket.sending_since and now - socket.sending_since > SEND_STALL_S) or socket.pong_overdue():
                    socket.end(CLOSE_TRY_LATER)

    def deliver_everywhere(self, item: UserGone) -> None:
        """To every process, this one first."""
        for callback in self.gone_callbacks:
            callback(item)
        if self.backend is not None:
            self.backend.publish_elsewhere(f"{self.namespace}:process", functools.partial(encode_item, item))

    def deliver_here(self, user_id: int, item: OutboxItem) -> None:
        if isinstance(item, PresenceFrame) and not self.news(user_id, item.username, item.status, item.last_seen):
            return
        for socket in list(self.local.get(user_id, ())):
            socket.enqueue(item)

    def news(self, user_id: int, username: str, status: str, last_seen: str | None) -> bool:
        """Record a presence the user's sockets here are told; False for a
        repeat or one older than what they were told (a heartbeat's refresh).
        A presence without a time (a block starting) is news unless repeated."""
        told = self.presence_told.get(user_id)
        if told is None:
            return False  # no socket of the user here
        key = username.lower()
        known = told.get(key)
        status = "online" if status == "online" else "offline"
        if known is not None and (known[1:] == (status, last_seen)
                                  or (last_seen is not None and (known[2] or "") > last_seen)):
            return False  # fixed-width ISO times sort as strings
        # Interned: the users told of this partner share one copy of its name, key and time.
        told[sys.intern(key)] = (sys.intern(username), status, None if last_seen is None else sys.intern(last_seen))
        return True

    def learn(self, user_id: int, online: list[tuple[str, str, str | None]]) -> None:
        """What a hello read from storage told: the user's next sockets here say the same without reading it."""
        for username, status, last_seen in online:
            self.news(user_id, username, status, last_seen)
        if user_id in self.presence_told:
            self.presence_complete.add(user_id)

    def online_told(self, user_id: int) -> list[tuple[str, str, str | None]] | None:
        """The user's partners online as this process's sockets of the user were
        last told (kept current by every presence frame, and each heartbeat's
        refresh); None before a hello read them from storage."""
        if user_id not in self.presence_complete:
            return None
        return [state for state in self.presence_told[user_id].values() if state[1] == "online"]

    def channel(self, user_id: int) -> str:
        return f"{self.namespace}:user:{user_id}"

    async def attach(self, socket: OpenSocket) -> None:
        """Hand `socket` everything delivered to its user; return once subscribed."""
        user_id = socket.user.id
        if user_id not in self.local:
            self.local[user_id] = set()
            self.presence_told[user_id] = {}
            subscribed = asyncio.get_running_loop().create_future()
            self.relays[user_id] = (asyncio.create_task(self.relay_user(user_id, subscribed)), subscribed)
        self.local[user_id].add(socket)
        await asyncio.shield(self.relays[user_id][1])

    def detach(self, socket: OpenSocket) -> None:
        user_id = socket.user.id
        group = self.local.get(user_id)
        if group is None:
            return
        group.discard(socket)
        if not group:
            del self.local[user_id]
            del self.presence_told[user_id]
            self.presence_complete.discard(user_id)
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
        async with self.broadcast.subscribe(self.channel(user_id)) as subscriber:
            subscribed.set_result(None)
            while True:
                event = await subscriber.get()
                item = event.message if isinstance(event.message, Resync) else decode_item(event.message)
                self.deliver_here(user_id, item)

    async def relay_process(self, subscribed: asyncio.Future) -> None:
        """The channel every process subscribes to: news for the process itself."""
        async with self.broadcast.subscribe(f"{self.namespace}:process") as subscriber:
            subscribed.set_result(None)
            while True:
                event = await subscriber.get()
                if isinstance(event.message, Resync):
                    for resync in self.resync_callbacks:
                        await resync(event.message.lost_at)
                    continue
                item = decode_item(event.message)
                if isinstance(item, UserGone):
                    for gone in self.gone_callbacks:
                        gone(item)


StatusCallback = Callable[[str, str, datetime], Any]


class Hook:
    """Every committed change of one kind passes through `send`, the way
    Django's post_save does: each change of a user's status (publishing the
    presence frame is one callback), each message stored. Callbacks are plain
    or async; one that raises is logged and harms nothing else."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[..., Any]] = []

    def connect(self, callback: Callable[..., Any]) -> Callable[..., Any]:
        self.callbacks.append(callback)
        return callback

    async def send(self, *args: Any) -> None:
        for callback in list(self.callbacks):
            try:
                result = callback(*args)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("callback %r failed", callback)


class Presence:
    """Who is online, told to their partners, never across a block: the whole
    rule of who sees whose presence lives here (and in SEES_PRESENCE, the
    audience every presence query is built on). The socket rows are the truth;
    each status change is committed, then passes through the status hook,
    whose first callback delivers it to the partners who are online. Blocks
    start and end here too, since each changes what two people see.

    A user's last socket closing takes effect `presence_grace` seconds later,
    so a quick reconnect changes nothing. A process that dies is swept by the
    others' heartbeats within the presence TTL."""

    def __init__(self, storage: Storage, fanout: Fanout, settings: Settings, process_id: str) -> None:
        self.storage, self.fanout, self.settings, self.process_id = storage, fanout, settings, process_id
        self.hook = Hook()
        self.hook.connect(self.publish)
        self.grace_ms = int(settings.presence_grace * 1000)
        self.pending: set[asyncio.Task] = set()
        self.upkeep: asyncio.Task | None = None
        self.unclosed: dict[str, User] = {}  # socket rows a failed write left behind: the heartbeat retries
        self.fanout.resync_callbacks.append(self.refresh)

    async def start(self) -> None:
        await self.change(heartbeat, self.process_id, [])
        self.upkeep = asyncio.create_task(self.keep())

    async def stop(self) -> None:
        for task in [self.upkeep, *self.pending]:
            if task:
                task.cancel()
        await asyncio.gather(*[task for task in [self.upkeep, *self.pending] if task], return_exceptions=True)
        try:
            await self.change(unregister_process, self.process_id)
        except Unavailable as exc:
            logger.warning("could not unregister this process (%s); the sweep will", exc)
        except Exception:
            logger.exception("could not unregister this process; the sweep will")

    def spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def socket_opened(self, socket_id: str, session: Session) -> bool:
        """False, recording nothing, when the user has the most sockets allowed open already."""
        return await self.change(open_socket, socket_id, self.process_id, session.user.id,
                                 self.settings.max_sockets_per_user, session.id) is not None

    async def socket_closed(self, socket_id: str, user: User) -> None:
        """Never raises: a row that cannot be deleted now is retried by the heartbeat."""
        try:
            await self.change(close_socket, socket_id, user.id, self.grace_ms)
        except Exception as exc:
            logger.warning("could not record that a socket of %s closed (%s); retrying", user.username, exc)
            self.unclosed[socket_id] = user
            return
        self.unclosed.pop(socket_id, None)
        if self.grace_ms:
            self.spawn(self.expire(user))

    async def expire(self, user: User) -> None:
        await asyncio.sleep(self.grace_ms / 1000 + 0.05)
        try:
            await self.change(offline_if_gone, user.id, now_ms(), self.grace_ms)
        except Unavailable as exc:
            logger.warning("could not take %s offline (%s); the heartbeat will", user.username, exc)

    async def partners(self, user: User) -> list[tuple[str, str, int | None]]:
        """What hello says: my online partners."""
        return await self.storage.read(partner_presence, user.id)

    async def introduce(self, first: int, second: int) -> None:
        """Two people just became partners: each one's sockets learn the other's presence."""
        for user_id, other in ((first, second), (second, first)):
            found = await self.storage.read(presence_of, other, user_id)
            if found is not None:
                self.fanout.deliver(user_id, PresenceFrame(found[0], found[1], iso(found[2])))

    async def blocked(self, me: User, other: User) -> None:
        """Block `other`: from now on neither sees the other's presence, and
        each one's open sockets are told at once that the other is offline,
        with no time: the last one they saw is no longer theirs to know."""
        await self.storage.write(insert_block, me.id, other.id)
        self.fanout.deliver(me.id, PresenceFrame(other.username, "offline", None))
        self.fanout.deliver(other.id, PresenceFrame(me.username, "offline", None))

    async def unblocked(self, me: User, other: User) -> None:
        """End my block of `other`: each who sees the other's presence again
        (partners, and no block the other way) is told it as it is now."""
        await self.storage.write(delete_block, me.id, other.id)
        await self.introduce(me.id, other.id)

    async def account_deleted(self, user: User) -> None:
        """An account is being deleted: whoever sees its presence sees it go
        offline now, through the status hook like any other change."""
        await self.change(mark_offline, user.id, now_ms())

    async def change(self, job: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Commit a write job that returns the status changes it made (None:
        it did nothing), then announce them: the one way a status changes."""
        transitions = await self.storage.write(job, *args)
        for username, status, last_seen in transitions or ():
            await self.hook.send(username, status, datetime.fromtimestamp(last_seen / 1000, timezone.utc))
        return transitions

    async def publish(self, username: str, status: str, last_seen: datetime) -> None:
        """The hook's first callback: the change goes to its audience, the partners who are online."""
        frame = PresenceFrame(username, status, iso_time(last_seen))
        for watcher in await self.storage.read(audience, username):
            self.fanout.deliver(watcher, frame)

    async def refresh(self, since: int) -> None:
        """Tell this process's sockets every partner's change since `since`
        again: after a broadcast outage, and every heartbeat in case a process
        died between committing a change and publishing it. Sockets drop what
        they know already."""
        after = (since, 0, 0)
        while True:
            page = await self.storage.read(presence_changes, self.process_id, since, after, REFRESH_PAGE)
            for user_id, username, status, last_seen, _ in page:
                self.fanout.deliver_here(user_id, PresenceFrame(username, status, iso(last_seen)))
            if len(page) < REFRESH_PAGE:
                return
            user_id, _, _, last_seen, partner_id = page[-1]
            after = (last_seen, user_id, partner_id)

    async def keep(self) -> None:
        """Heartbeat this process and sweep dead ones. Beats every TTL/4 and a
        process silent for TTL/2 is dead, so its users are offline within TTL."""
        ttl = self.settings.presence_ttl
        interval = max(ttl / 4, 0.25)
        checked = now_ms()
        while True:
            await asyncio.sleep(interval)
            try:
                open_sockets = {socket.socket_id: socket for socket in self.fanout.sockets()}
                live = [(socket.socket_id, socket.user.id, socket.session.id) for socket in open_sockets.values()]
                await self.change(heartbeat, self.process_id, live)
                await self.change(sweep, int(ttl * 500), self.grace_ms)
                for socket_id, user in list(self.unclosed.items()):
                    await self.socket_closed(socket_id, user)
                for socket_id in await self.storage.read(sockets_of_ended_sessions, self.process_id):
                    if socket_id in open_sockets:
                        open_sockets[socket_id].enqueue(Revoke(open_sockets[socket_id].session.id))
                started = now_ms()
                await self.refresh(checked - int(interval * 1000))
                checked = started
            except Unavailable as exc:
                logger.warning("presence upkeep waits for the database: %s", exc)
            except Exception:
                logger.exception("presence upkeep failed; trying again")


def encoded_page(items: list[dict[str, Any]], nearest_last: bool = False) -> tuple[bytes, int]:
    """A page's items as a UTF-8 JSON array, encoded once, item by item, and
    how many it holds: it stops short of PAGE_BYTES_MAX bytes (never below
    one item) at its end away from the cursor (the start, when `nearest_last`).
    A page is bounded in bytes, not only in count, so that one request costs
    a bounded encoding and a client that does not read holds a bounded amount."""
    pieces: list[bytes] = []
    size = 0
    for item in reversed(items) if nearest_last else items:
        piece = dumps(item).encode()
        size += len(piece) + 1
        if size > PAGE_BYTES_MAX and pieces:
            break
        pieces.append(piece)
    if nearest_last:
        pieces.reverse()
    return b"[" + b",".join(pieces) + b"]", len(pieces)


def page_body(name: str, items: bytes, **fields: Any) -> bytes:
    """`{name: items, **fields}` as UTF-8 JSON, the items encoded already."""
    return b'{"' + name.encode() + b'":' + items + b"," + dumps(fields)[1:].encode()


# -- a message's fields, checked alike in a send frame and in the host's ChatX.send


def storable(text: str) -> bool:
    """JSON admits lone surrogates and NUL; neither UTF-8 nor PostgreSQL text does."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


class FrameError(ChatError):
    """A frame refused: the socket replies with an error frame of its code."""


def frame_field(frame: dict[str, Any], name: str, kind: type) -> Any:
    value = frame.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is str and not storable(value)):
        raise FrameError("invalid_field", f"'{name}' is required and must be a {kind.__name__}.")
    return value


# Characters that show nothing: white space, format and control characters,
# variation selectors, the default-ignorable ranges, and the blank letters of
# Hangul and Braille. What this leaves is checked by its category (visible()).
VISIBLE_RE = re.compile("[^\\s\x00-\x1f\x7f-\x9f\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5"
                        "\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f\u2800\u3164\ufe00-\ufe0f"
                        "\ufeff\uffa0\ufff0-\ufff8\U000e0000-\U000e0fff]")
# Format characters anywhere in Unicode (U+1D173, U+13430, ...), separators,
# and combining marks, which show nothing without a letter to sit on.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Mc", "Me"})


def visible(text: str) -> bool:
    """Some character of the text shows: in ordinary text the first one looked
    at, which is checked without a generator over the rest."""
    found = VISIBLE_RE.search(text)
    if found is None:
        return False
    return unicodedata.category(found.group()) not in INVISIBLE_CATEGORIES or any(
        unicodedata.category(later.group()) not in INVISIBLE_CATEGORIES
        for later in VISIBLE_RE.finditer(text, found.end()))


def body_field(frame: dict[str, Any]) -> str:
    body = frame_field(frame, "body", str)
    if not visible(body):
        raise FrameError("empty_body", "The message is empty.")
    if len(body) > BODY_MAX:
        raise FrameError("body_too_long", f"Messages are at most {BODY_MAX} characters.")
    return body


def client_id_field(frame: dict[str, Any]) -> str | None:
    client_id = frame.get("client_id")
    if client_id is not None and (
        not isinstance(client_id, str) or not 0 < len(client_id) <= CLIENT_ID_MAX or not storable(client_id)
    ):
        raise FrameError("invalid_field", f"'client_id' must be a string of 1 to {CLIENT_ID_MAX} characters.")
    return client_id


def caption_field(frame: dict[str, Any], attachment: str | None) -> str:
    """The body of a send: with an attachment it may be empty."""
    return body_field(frame) if attachment is None or VISIBLE_RE.search(frame.get("body", "")) else ""


class Messenger:
    """Stores and delivers: a send, edit, delete or read is committed with its
    place in each person's stream, then handed to Fanout for both people. It
    counts the new messages, sent by sockets or by the host (send_as)."""

    def __init__(self, storage: Storage, fanout: Fanout, presence: Presence, accounts: Accounts, metrics: Metrics,
                 settings: Settings) -> None:
        self.storage, self.fanout, self.presence, self.settings = storage, fanout, presence, settings
        self.accounts, self.metrics = accounts, metrics  # the host's senders are named on first sight
        self.watcher: asyncio.Task | None = None
        self.message_hook = Hook()  # each new message, once, on the process that stored it
        self.pending: set[asyncio.Task] = set()
        self.answered: set[tuple[int, int]] = set()  # (sender, recipient): the recipient wrote to the sender

    async def start(self) -> None:
        self.watcher = asyncio.create_task(self.watch())

    async def stop(self) -> None:
        for task in [self.watcher, *self.pending]:
            if task:
                task.cancel()
        await asyncio.gather(*[task for task in [self.watcher, *self.pending] if task], return_exceptions=True)

    async def watch(self) -> None:
        """Every heartbeat, sockets whose stream has events they were not handed
        read them from the database. That covers an event whose publish was
        lost with no later one to reveal the gap: its process died between
        commit and publish, or the broadcast dropped it."""
        while True:
            await asyncio.sleep(max(self.settings.presence_ttl / 4, 0.25))
            try:
                newest = dict(await self.storage.read(newest_seqs_here, self.presence.process_id))
            except Exception as exc:
                logger.warning("could not check the streams of this process's sockets: %s", exc)
                continue
            for socket in self.fanout.sockets():
                if socket.seq < newest.get(socket.user.id, 0):
                    socket.enqueue(Resync(now_ms()))

    def send(self, message: NewMessage,
             acknowledge: Callable[[Stored | Refused | BaseException], None]) -> asyncio.Future:
        """Queue the message for the next commit, without waiting: once it is
        committed, `acknowledge` gets the outcome, then both people's sockets
        get the message. This runs even if the sender's socket closed meanwhile."""
        stored = self.storage.write_bulk(insert_messages, message)
        stored.add_done_callback(functools.partial(self.message_stored, acknowledge))
        return stored

    def message_stored(self, acknowledge: Callable[[Any], None], future: asyncio.Future) -> None:
        if future.cancelled():
            return
        outcome = future.exception() or future.result()
        if isinstance(outcome, Stored) and outcome.seqs:  # a new message, not a retry's ack
            self.metrics.messages_stored.inc()
        acknowledge(outcome)
        if isinstance(outcome, Stored):
            self.announce(outcome)
            if outcome.seqs and self.message_hook.callbacks:  # a new message, not a retry's ack
                task = asyncio.ensure_future(self.message_hook.send(dict(outcome.message)))
                self.pending.add(task)
                task.add_done_callback(self.pending.discard)

    def announce(self, stored: Stored) -> None:
        """A committed event goes to the streams of both people (and new
        partners see each other's presence)."""
        kind = STREAM_KINDS[stored.kind]
        for user_id, seq in stored.seqs.items():
            self.fanout.deliver(user_id, kind.frame(seq, stored))
        if stored.new_partners:
            self.presence.spawn(self.presence.introduce(*stored.new_partners))

    async def send_as(self, sender: str, to: str, body: str, client_id: str | None,
                      attachment: str | None) -> dict[str, Any]:
        """The host's send (ChatX.send): checked as a send frame is, from a
        sender named on first sight; a refusal raises ChatError."""
        frame = {"to": to, "body": body, "client_id": client_id, "attachment": attachment}
        frame_field(frame, "to", str)
        frame_field(frame, "body", str)
        if attachment is not None:
            frame_field(frame, "attachment", str)
        body = caption_field(frame, attachment)
        client_id = client_id_field(frame)
        if not isinstance(sender, str):
            raise ChatError("invalid_username", "The sender's username is a string.")
        try:
            author = await self.accounts.named(sender)
            recipient = await self.accounts.find_user(to)
        except Unavailable as exc:
            raise ChatError("unavailable", "The database is not answering; send it again.") from exc
        if recipient is None:
            raise ChatError("unknown_user", f"There is no user {to!r}.")
        try:
            outcome = await self.send(NewMessage(author, recipient, body, client_id, None, attachment),
                                      lambda outcome: None)
        except Exception as exc:
            raise ChatError("unavailable", "The message could not be stored; send it again.") from exc
        if isinstance(outcome, Refused):
            raise ChatError(outcome.code, outcome.detail)
        return outcome.message

    async def change(self, me: User, message_id: int, body: str | None) -> Stored | Refused:
        """Edit (a new body) or delete (None) a message of mine."""
        outcome = await self.storage.write(change_message, me.id, message_id, body)
        if isinstance(outcome, Stored):
            self.storage.erase_soon()
            self.announce(outcome)
        return outcome

    async def read(self, me: User, peer: User, up_to: int) -> None:
        moved = await self.storage.write(advance_read_cursor, me, peer, up_to)
        if moved is not None:
            self.announce(moved)

    async def first_contact(self, sender: User, recipient: User) -> bool:
        """Whether the recipient never wrote to the sender. An answer stays
        (ids are never given again), so once seen it is kept in memory."""
        pair = (sender.id, recipient.id)
        if sender.id == recipient.id or pair in self.answered:
            return False
        if not await self.storage.read(has_answered, sender.id, recipient.id):
            return True
        if len(self.answered) > 100_000:
            self.answered.clear()
        self.answered.add(pair)
        return False

    async def typing(self, me: User, peer: User) -> None:
        if not await self.storage.read(blocks_me, me.id, peer.id):
            self.fanout.deliver(peer.id, Frame(dumps({"type": "typing", "from": me.username})))

    async def replay(self, user: User, seq: int, limit: int) -> list[StreamFrame]:
        rows = await self.storage.read(events_after, user.id, seq, limit)
        return [STREAM_KINDS[row["kind"]].replayed(row) for row in rows]

    async def newest_seq(self, user: User) -> int:
        return await self.storage.read(newest_seq, user.id)

    async def seq_before_message(self, user: User, after_id: int) -> int | None:
        return await self.storage.read(seq_before_message, user.id, after_id)

    async def history(self, me: User, peer: User, before: int | None, after: int | None,
                      limit: int) -> bytes:
        """The page as JSON: `{"messages", "has_more", "read_up_to"}`."""
        page, more, mine, theirs = await self.storage.read(history_page, me.id, peer.id, before, after, limit)
        messages, fit = encoded_page(page, nearest_last=after is None)  # newest first: older ones are cut
        return page_body("messages", messages, has_more=more or fit < len(page),
                         read_up_to={me.username: mine, peer.username: theirs})

    async def conversations(self, me: User, before: int | None, limit: int) -> bytes:
        """The page as JSON: `{"conversations", "has_more"}`."""
        rows = await self.storage.read(conversation_rows, me.id, before, limit + 1)
        listed = []
        for row in rows[:limit]:
            peer_id, peer, status, last_seen, unread, mine, theirs, blocked = row[:8]
            listed.append({
                "user": {"id": peer_id, "username": peer},
                "status": "offline" if blocked else status,
                "last_seen": None if blocked else iso(last_seen),
                "unread": unread,
                "last_message": message_object(*row[8:8 + MESSAGE_WIDTH]),
                "read_up_to": {me.username: mine, peer: 0 if blocked else theirs or 0},
            })
        conversations, fit = encoded_page(listed)
        return page_body("conversations", conversations, has_more=len(rows) > limit or fit < len(listed))


class AttachmentStore:
    """Where attachments' bytes are kept, by attachment id. The database is the
    one store today; an S3-compatible one would implement these three."""

    async def put(self, attachment_id: str, source: Any) -> None:
        """Store everything `source` (a binary file) holds from where it stands,
        for an attachment already recorded; raise UploadErased if it was erased meanwhile."""
        raise NotImplementedError

    def read(self, attachment_id: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes start..end-1, a piece at a time."""
        raise NotImplementedError

    async def delete(self, attachment_ids: list[str]) -> None:
        raise NotImplementedError


class UploadErased(Exception):
    """The attachment whose bytes were being stored was erased meanwhile."""


class DatabaseAttachmentStore(AttachmentStore):
    """Bytes in chatx_attachment_chunks, ATTACHMENT_CHUNK_BYTES a row, so that
    every process and host sees them, a backup holds them, and no file is ever
    in memory whole. Deleting a message or an account erases its attachments'
    chunks in the same transaction (erase_attachments). A chunk is written only
    while its attachment's row exists (insert_attachment_chunk), so erasing the
    row and its chunks leaves nothing, even of an upload still being written."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        # One at a time: on SQLite chunks share the writer with messages, whose commits must stay quick.
        self.queued = asyncio.Semaphore(CHUNKS_QUEUED_MAX)

    async def put(self, attachment_id: str, source: Any) -> None:
        n = 0
        while data := await asyncio.to_thread(source.read, CHUNKS_READ_AT_ONCE * ATTACHMENT_CHUNK_BYTES):  # a file
            for start in range(0, len(data), ATTACHMENT_CHUNK_BYTES):
                async with self.queued:
                    chunk = data[start:start + ATTACHMENT_CHUNK_BYTES]
                    if not await self.storage.write_apart(insert_attachment_chunk, attachment_id, n, chunk):
                        raise UploadErased(attachment_id)
                n += 1

    async def read(self, attachment_id: str, start: int, end: int) -> AsyncIterator[bytes]:
        for n in range(start // ATTACHMENT_CHUNK_BYTES, (end - 1) // ATTACHMENT_CHUNK_BYTES + 1):
            data = await self.storage.read(attachment_chunk, attachment_id, n)
            if data is None:  # erased meanwhile
                return
            offset = n * ATTACHMENT_CHUNK_BYTES
            yield bytes(data[max(start - offset, 0):end - offset])

    async def delete(self, attachment_ids: list[str]) -> None:
        await self.storage.write(erase_attachments, attachment_ids)


EXIF_ORIENTATION = 0x0112
MIME_RE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}")


IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")


def image_bytes(source: Any) -> bytes | None:
    """All of `source` if its first bytes are a PNG's, JPEG's, GIF's or WebP's
    (nothing else is shown as an image); None otherwise, without reading further."""
    source.seek(0)
    head = source.read(12)
    source.seek(0)
    if not (head.startswith(IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")):
        return None
    data = source.read()
    source.seek(0)
    return data


def inspect_image(data: bytes) -> tuple[str, int, int, bytes] | None:
    """In a decoder process: the type an image really has, its width and
    height, and its thumbnail; None if it is none of INLINE_TYPES that decodes."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = INLINE_TYPES.get(image.format or "")
            if kind and image.width * image.height <= IMAGE_PIXELS_MAX:
                width, height = image.size
                if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # a browser shows it turned
                    width, height = height, width
                image.draft("RGB", (THUMBNAIL_MAX, THUMBNAIL_MAX))  # JPEG: decode at a fraction of the size
                image.thumbnail((THUMBNAIL_MAX, THUMBNAIL_MAX))
                return kind, width, height, thumbnail_bytes(ImageOps.exif_transpose(image))
    except Exception:  # any failure to decode untrusted bytes: not an image
        pass
    return None


def file_type(declared: str) -> str:
    """The type a file that is not an image is served with: what the client
    said, unless it claimed an image or is no MIME type at all."""
    if declared.startswith("image/") or not MIME_RE.fullmatch(declared):
        return "application/octet-stream"
    return declared


def thumbnail_bytes(image: Image.Image) -> bytes:
    """PNG where the image has transparency, JPEG otherwise."""
    out = io.BytesIO()
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image.convert("RGBA").save(out, "PNG", optimize=True)
    else:
        image.convert("RGB").save(out, "JPEG", quality=80)
    return out.getvalue()


def today() -> int:
    """Days since the epoch, UTC: the unit of the upload quota."""
    return now_ms() // 86_400_000


class DecoderStopped(Exception):
    """The process decoding an upload's image ended before it answered."""


def start_decoder(server: int) -> None:
    """In a decoder process: a lower CPU priority, and an exit once the server
    is gone (a killed server leaves its pool's processes waiting for work)."""
    with suppress(OSError):
        os.nice(DECODER_NICE)
    threading.Thread(target=exit_without, args=(server,), daemon=True).start()


def exit_without(server: int) -> None:
    while os.getppid() == server:
        time.sleep(1)
    os._exit(0)


class Decoders:
    """Image checks and thumbnails in IMAGES_DECODED_AT_ONCE processes at a
    lower CPU priority, started on the first image and replaced if one dies.

    Not threads: a decoding thread holds the GIL between Pillow's steps (the
    reads, the pieces of the PNG decoder, the thumbnail's encoding), and one at
    a lower priority that the kernel preempts while it holds the GIL stops the
    event loop with it, so chat waited behind uploads. A process has a GIL of
    its own, and its lower priority costs only itself. Spawned, not forked: a
    fork would share the server's sockets and copy its threads' held locks. It
    gets the file's bytes (image_bytes), so an image is in memory whole while
    it is checked, IMAGES_DECODED_AT_ONCE of them at most; other files never are."""

    def __init__(self) -> None:
        self.pool: ProcessPoolExecutor | None = None
        self.slots = asyncio.Semaphore(IMAGES_DECODED_AT_ONCE)

    def stop(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def running(self) -> ProcessPoolExecutor:
        if self.pool is None:
            self.pool = ProcessPoolExecutor(IMAGES_DECODED_AT_ONCE, multiprocessing.get_context("spawn"),
                                            initializer=start_decoder, initargs=(os.getpid(),))
        return self.pool

    async def inspect(self, source: Any) -> tuple[str, int, int, bytes] | None:
        """inspect_image() of an upload, if it starts as an image does;
        DecoderStopped if its process died while it decoded this one."""
        async with self.slots:  # taken before the bytes are read: no more than that many in memory
            data = await asyncio.to_thread(image_bytes, source)
            if data is None:
                return None
            try:
                decoded = self.running().submit(inspect_image, data)
            except BrokenProcessPool:  # one died while idle, not of these bytes: a new pool
                self.stop()
                decoded = self.running().submit(inspect_image, data)
            pool = self.pool
            try:
                return await asyncio.wrap_future(decoded)
            except BrokenProcessPool:
                if self.pool is pool:
                    self.stop()
                raise DecoderStopped() from None


class Attachments:
    """Uploads: checked and stored, read back, and erased when no message
    used them within settings.unsent_upload_s. An upload is recorded before its
    bytes are stored: one a killed process left half written is an unsent
    upload like any other, and the sweep erases it with its chunks. Its id is
    told to no one until it is whole, so no one can read or send it before."""

    def __init__(self, storage: Storage, settings: Settings) -> None:
        self.storage, self.settings = storage, settings
        self.store: AttachmentStore = DatabaseAttachmentStore(storage)
        self.decoders = Decoders()
        self.sweeper: asyncio.Task | None = None

    async def start(self) -> None:
        self.sweeper = asyncio.create_task(self.sweep())

    async def stop(self) -> None:
        if self.sweeper:
            self.sweeper.cancel()
            await asyncio.gather(self.sweeper, return_exceptions=True)
        self.decoders.stop()

    async def sweep(self) -> None:
        while True:
            await asyncio.sleep(min(UPLOAD_SWEEP_S, self.settings.unsent_upload_s))
            try:
                await self.expire(now_ms())
            except Exception as exc:
                logger.warning("erasing unsent uploads failed: %s", exc)

    async def expire(self, now: int) -> None:
        made_before = now - int(self.settings.unsent_upload_s * 1000)
        if await self.storage.write(expire_uploads, made_before, now // 86_400_000 - 1):
            self.storage.erase_soon()

    async def allowance(self, user: User) -> int | None:
        """Bytes I may still upload today; None without a quota."""
        quota = self.settings.attachment_bytes_per_day
        return quota - await self.storage.read(uploaded_on, user.id, today()) if quota else None

    async def add(self, user: User, name: str, declared: str, source: Any, size: int) -> dict[str, Any] | None:
        """Store an upload received into `source`; None if it is over the day's
        quota; DecoderStopped if its image could not be checked."""
        image = await self.decoders.inspect(source)
        kind, width, height, thumbnail = image or (file_type(declared), None, None, None)
        columns = (secrets.token_urlsafe(18), name, kind, size, width, height)
        if not await self.storage.write(insert_attachment, user.id, columns, thumbnail, today(),
                                        self.settings.attachment_bytes_per_day):
            return None
        try:
            await self.store.put(columns[0], source)
        except BaseException:
            await asyncio.shield(self.store.delete([columns[0]]))
            raise
        return attachment_object(*columns)

    async def readable(self, attachment_id: str, me: User) -> tuple | None:
        return await self.storage.read(readable_attachment, attachment_id, me.id)

    async def thumbnail(self, attachment_id: str) -> bytes | None:
        return await self.storage.read(attachment_thumbnail, attachment_id)


# ---- requests and sockets alike -----------------------------------------------------


def chat_of(conn: HTTPConnection) -> ChatX:
    return conn.app.state.chat


def own_origin(conn: HTTPConnection) -> str:
    scheme = "https" if conn.url.scheme in ("https", "wss") else "http"
    return f"{scheme}://{conn.headers.get('host', '')}"


def origin_allowed(conn: HTTPConnection, allowed: tuple[str, ...]) -> bool:
    """No Origin header means a scripted client, judged by its session alone."""
    origin = conn.headers.get("origin")
    return origin is None or origin.rstrip("/") in (own_origin(conn), *allowed)


def client_address(conn: HTTPConnection) -> str:
    """The peer, or with CHATX_TRUSTED_PROXIES the address the proxy saw (ChatXApp)."""
    return conn.client.host if conn.client else ""


# ---- the WebSocket ------------------------------------------------------------------
#
# ChatSocket is the connection: hello, replay, the outbox, reading frames.
# What a client frame does is decided by the frame handlers after it.

CURSOR_RE = re.compile(r"[0-9]+")


def cursor_value(text: str) -> int:
    """A cursor's digits as a number: one beyond any id (19 digits or 20) is ID_MAX, past the end."""
    return ID_MAX if len(text) > 18 else min(int(text), ID_MAX)


def transport_of(scope: Scope) -> Any | None:
    """The transport under a websocket, where the server is uvicorn: the
    server's own `send` (kept by ChatXApp) belongs to its protocol object,
    which holds it. ASGI offers no way to it; elsewhere, None."""
    protocol = getattr(scope.get("chatx.server_send"), "__self__", None)
    return getattr(protocol, "transport", None)


def abort_connection(scope: Scope) -> None:
    """Drop the TCP connection of a websocket whose client stopped reading:
    uvicorn waits for a close frame that cannot be written."""
    transport = transport_of(scope)
    if transport is not None:
        reset(transport)


def reset(transport: Any) -> None:
    """Drop a connection and whatever waits to be written to it."""
    connection = transport.get_extra_info("socket")
    if connection is not None:  # a reset, not a FIN the client would wait behind unread data for
        set_option(connection, SOL_SOCKET, SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def set_option(connection: Any, level: int, option: int, value: int | bytes) -> None:
    """setsockopt on a connection the client may have reset meanwhile: a closed
    socket has no descriptor (ValueError) and a dead one says OSError."""
    try:
        connection.setsockopt(level, option, value)
    except (OSError, ValueError):
        pass  # the connection is gone; writing to it ends the socket as a disconnect


async def send_frames(send: Send, texts: list[str]) -> None:
    """Text frames in order through the server's `send`; where the server is
    uvicorn's websockets-sansio protocol, in one write."""
    protocol = getattr(send, "__self__", None)
    if isinstance(protocol, WebSocketsSansIOProtocol):
        # The one place that goes around uvicorn's ASGI send: it writes every
        # frame on its own, a system call and a TCP segment each, which cost
        # more than making the frame. Here its websockets connection makes the
        # frames as its send does, under its send's checks, and they are written
        # together; anything but an open connection is left to its send.
        await protocol.writable.wait()
        if not (protocol.disconnected or protocol.close_sent or not protocol.handshake_complete
                or protocol.initial_response is not None):
            try:
                for text in texts:
                    protocol.conn.send_text(text.encode())
            except InvalidState:
                raise ClientDisconnected() from None
            protocol.transport.write(b"".join(protocol.conn.data_to_send()))
            return
    for text in texts:
        await send({"type": "websocket.send", "text": text})


def utf8_size(text: str) -> int:
    """Bytes of `text` in UTF-8, without encoding the common case."""
    return len(text) if text.isascii() else len(text.encode())


@dataclass(frozen=True, slots=True)
class SocketServices:
    """The services a socket and its frame handlers use; ChatX makes one."""

    settings: Settings
    metrics: Metrics
    limits: Limits
    accounts: Accounts
    fanout: Fanout
    presence: Presence
    messenger: Messenger


class ChatSocket:
    """One open /ws connection of a signed-in user.

    Its outbox holds typed items in order. Stream frames are sent in seq
    order, each once: one at or below `seq` is a repeat, and one past `seq + 1`
    means another process committed events this socket has not been handed
    yet, which are read from the database first. Local-first delivery,
    publishes from other processes and catch-up after a broadcast outage may
    interleave in any way.

    A reader that falls behind (more queued than BACKLOG_FRAMES or
    BACKLOG_BYTES) is not buffered for: its queued stream frames are dropped
    and, while it is `behind`, its stream is read from the database a page at
    a time as it takes them, live frames dropped meanwhile, until it has
    everything up to the newest frame it dropped. Each event is committed
    before its frame is handed out, so the database always has what was
    dropped. Only a reader that takes nothing for SEND_STALL_S is closed."""

    __slots__ = ("services", "ws", "session", "user", "send", "outbox", "outbox_ready", "backlog_bytes",
                 "sending", "unsent", "unsent_bytes", "behind", "dropped_seq", "sends_in_flight", "throttled",
                 "socket_id", "seq", "disconnect_code", "sending_since", "finished", "ended")

    def __init__(self, services: SocketServices, websocket: WebSocket, send: Send, session: Session) -> None:
        self.services, self.ws, self.session, self.user = services, websocket, session, session.user
        self.send = send
        # A list and a future rather than an asyncio.Queue: a Queue costs 3 kB per idle socket.
        self.outbox: list[OutboxItem] = []
        self.outbox_ready: asyncio.Future | None = None
        self.backlog_bytes = 0  # UTF-8 bytes of the frames in the outbox
        self.sending: list[OutboxItem | None] | tuple = ()  # the batch send_outbox is writing
        self.unsent: list[str] = []  # its frames made ready, written together (send_later, send_unsent)
        self.unsent_bytes = 0
        self.behind = False  # reading the stream from the database (catch-up mode)
        self.dropped_seq = 0  # the newest stream frame dropped while behind
        self.sends_in_flight = 0
        self.throttled = False  # the last frame was over the frame bucket
        self.socket_id = uuid.uuid4().hex
        self.seq = 0  # the newest event of the stream this socket has sent or skipped
        self.disconnect_code: int | None = None  # as the server reported the connection's end
        self.sending_since = 0.0  # when the frame being sent was handed to the server
        loop = asyncio.get_running_loop()
        self.finished = loop.create_future()
        self.ended = loop.create_future()  # the first task to end, or a close code

    async def serve(self, since: int | None, after: int | None) -> None:
        services = self.services
        code: int | None = None
        try:
            await services.fanout.attach(self)  # from here on, everything for this user reaches this socket
            try:
                if not await services.accounts.session_alive(self.session.id):  # signed out before we listened
                    code = CLOSE_REVOKED
                    return
                if not await services.presence.socket_opened(self.socket_id, self.session):
                    services.metrics.refusals.labels("sockets").inc()
                    code = CLOSE_TOO_MANY
                    return
                try:
                    await self.say_hello(since, after)
                    code = await self.run_until_closed()
                finally:
                    await asyncio.shield(services.presence.socket_closed(self.socket_id, self.user))
            finally:
                services.fanout.detach(self)
                if code is not None:
                    await self.close(code)
        except (WebSocketDisconnect, OSError):
            pass
        except Unavailable:
            code = CLOSE_TRY_LATER
            await self.close(code)
        finally:
            if code is None and self.disconnect_code == CLOSE_RESTART:
                code = CLOSE_RESTART  # uvicorn, shutting down, closed it before ChatX's lifespan ends
            services.metrics.sockets_closed.labels("client" if code is None else str(code)).inc()
            self.finished.set_result(None)

    async def say_hello(self, since: int | None, after: int | None) -> None:
        """Send hello and set `seq` where the replay starts. A method of its own
        so that the partners it tells are not held by `serve` while the socket is open."""
        services = self.services
        # After attaching: every later event arrives live, every earlier one is in the database.
        newest = await services.messenger.newest_seq(self.user)
        partners = services.fanout.online_told(self.user.id)  # as the user's other sockets here know it
        if partners is None:
            partners = [(name, status, iso(seen)) for name, status, seen in
                        await services.presence.partners(self.user)]
            services.fanout.learn(self.user.id, partners)  # what hello tells is not told again
        self.forget_queued_presence(partners)
        await self.send_text(hello_frame(self.user, newest, partners))
        self.seq = newest
        if since is not None:
            self.seq = min(since, newest)
        elif after is not None:
            found = await services.messenger.seq_before_message(self.user, after)
            self.seq = newest if found is None else found
        # The replay runs first in the outbox, where a reader too far behind is cut off.
        self.outbox.insert(0, Resync(now_ms()))

    async def send_text(self, text: str) -> None:
        self.unsent.append(text)
        await self.send_unsent()

    async def send_later(self, text: str) -> None:
        """Make a frame ready; the ready ones go out together, at the latest
        once WRITE_BYTES are ready (the rest of the batch stays where a reader
        falling behind drops it)."""
        self.unsent.append(text)
        self.unsent_bytes += utf8_size(text)
        if self.unsent_bytes >= WRITE_BYTES:
            await self.send_unsent()

    async def send_unsent(self) -> None:
        if not self.unsent:
            return
        texts, self.unsent, self.unsent_bytes = self.unsent, [], 0
        self.sending_since = time.monotonic()  # uvicorn holds a send while the client does not read
        await send_frames(self.send, texts)
        self.sending_since = 0.0

    async def close(self, code: int) -> None:
        """Send the close frame; a client that does not take it within seconds is cut off."""
        try:
            await asyncio.wait_for(self.ws.close(code), 5)
        except Exception:
            abort_connection(self.ws.scope)

    def pong_overdue(self) -> bool:
        """The server's keepalive ping (uvicorn's websockets-sansio protocol)
        has waited for its pong longer than half the server's timeout."""
        protocol = getattr(self.ws.scope.get("chatx.server_send"), "__self__", None)
        timeout = getattr(protocol, "ping_timeout", None)
        if not timeout or getattr(protocol, "pending_ping_payload", None) is None:
            return False
        return protocol.loop.time() - protocol.ping_sent_at > timeout / 2

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
        if isinstance(failure, Unavailable):
            return CLOSE_TRY_LATER
        if not isinstance(failure, (WebSocketDisconnect, OSError)):
            logger.error("socket of %s failed", self.user.username, exc_info=failure)
            return CLOSE_ERROR
        return None

    def enqueue(self, item: OutboxItem) -> None:
        """Queue an item for this socket; past the backlog's bound, catch up from the database."""
        if self.ended.done():
            return
        if isinstance(item, StreamFrame) and self.behind:
            self.dropped_seq = max(self.dropped_seq, item.seq)
            return
        self.outbox.append(item)
        if isinstance(item, (Frame, StreamFrame)):
            self.backlog_bytes += utf8_size(item.text)
        if self.backlog_full():
            self.fall_behind()
        if self.outbox_ready is not None and not self.outbox_ready.done():
            self.outbox_ready.set_result(None)

    def forget_queued_presence(self, told: list[tuple[str, str, str | None]]) -> None:
        """Presence frames queued before the hello (a heartbeat's refresh can
        come between attaching and the hello) that the hello tells as well."""
        said = set(told)
        self.outbox[:] = [item for item in self.outbox if not (
            isinstance(item, PresenceFrame) and (item.username, item.status, item.last_seen) in said)]

    def backlog_full(self) -> bool:
        return len(self.outbox) > BACKLOG_FRAMES or self.backlog_bytes > BACKLOG_BYTES

    def fall_behind(self) -> None:
        """Drop the queued stream frames, to be read from the database (catch-up
        mode). What cannot be read again stays: answers to the client's own
        frames (acks, errors) past REPLIES_BYTES_MAX are a client that sends
        without reading, cut off."""
        if self.behind:
            if len(self.outbox) > BACKLOG_FRAMES or self.backlog_bytes > REPLIES_BYTES_MAX:
                self.end(CLOSE_TRY_LATER)
            return
        self.behind = True
        kept: list[OutboxItem] = []
        for item in self.outbox:
            if isinstance(item, StreamFrame):
                self.dropped_seq = max(self.dropped_seq, item.seq)
            else:
                kept.append(item)
        for index, item in enumerate(self.sending):
            if isinstance(item, StreamFrame):
                self.dropped_seq = max(self.dropped_seq, item.seq)
                self.sending[index] = None
        self.outbox = kept
        self.backlog_bytes = sum(utf8_size(item.text) for item in kept if isinstance(item, Frame))

    def reply(self, frame: dict[str, Any]) -> None:
        self.enqueue(Frame(dumps(frame)))

    def reply_error(self, code: str, detail: str, client_id: str | None = None) -> None:
        self.enqueue(error_frame(code, detail, client_id))

    async def send_outbox(self) -> int | None:
        while True:
            if self.behind:
                if await self.send_page() < REPLAY_PAGE and self.seq >= self.dropped_seq:
                    self.behind = False  # caught up: no await between the check and this
            elif not self.outbox:
                self.outbox_ready = asyncio.get_running_loop().create_future()
                await self.outbox_ready
            batch, self.outbox = self.outbox, []
            self.backlog_bytes = 0
            self.sending = batch
            for item in batch:
                if item is not None and (code := await self.send_item(item)) is not None:
                    await self.send_unsent()
                    return code
            await self.send_unsent()
            self.sending = ()

    async def send_item(self, item: OutboxItem) -> int | None:
        """Make one outbox item's frame ready (send_later); what must wait for
        the database sends the ready ones first. A close code ends the socket."""
        if isinstance(item, StreamFrame):
            if item.seq > self.seq + 1:
                await self.send_unsent()
                await self.catch_up()  # the events before it are committed: read them
            if item.seq > self.seq:
                self.seq = item.seq
                await self.send_later(item.text)
        elif isinstance(item, (Frame, PresenceFrame)):  # Fanout dropped the presence the user's sockets know
            await self.send_later(item.text)
        elif isinstance(item, Revoke):
            return CLOSE_REVOKED if item.ends(self.session.id) else None
        elif isinstance(item, Resync):
            await self.send_unsent()
            if not await self.services.accounts.session_alive(self.session.id):
                return CLOSE_REVOKED
            await self.catch_up()
        return None

    async def catch_up(self) -> None:
        """Send every event of the stream above `seq`, in order, from the database."""
        while await self.send_page() == REPLAY_PAGE:
            pass

    async def send_page(self) -> int:
        """Send the next page of the stream above `seq` from the database; how many events it had."""
        page = await self.services.messenger.replay(self.user, self.seq, REPLAY_PAGE)
        for frame in page:
            self.seq = frame.seq
            await self.send_later(frame.text)
        await self.send_unsent()
        return len(page)

    async def receive_frames(self) -> int | None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                self.disconnect_code = message.get("code")
                return None
            text = message.get("text")
            if text is None:
                size = len(message.get("bytes") or b"")
            else:  # a character is at most 4 bytes: only long frames need measuring
                size = len(text) if 4 * len(text) <= FRAME_MAX_BYTES else len(text.encode())
            if size > FRAME_MAX_BYTES:
                return CLOSE_TOO_BIG
            if not self.services.limits.allow_frame(self.user.id):
                # Dropped unread; one error per run of dropped frames, so that
                # a flood costs no more than reading it.
                self.services.metrics.refusals.labels("frame_rate").inc()
                if not self.throttled:
                    self.reply_error("rate_limited", "Too many frames; slow down and send again.")
                self.throttled = True
                continue
            self.throttled = False
            if text is None:
                self.reply_error("bad_json", "Frames are JSON text, not binary.")
                continue
            await handle_frame(self, text)

    def acknowledge(self, client_id: str | None, outcome: Stored | Refused | BaseException) -> None:
        """Acknowledge a send once its commit is done (or say why not)."""
        self.sends_in_flight -= 1
        if isinstance(outcome, Refused):
            self.reply_error(outcome.code, outcome.detail, client_id)
        elif isinstance(outcome, BaseException):
            logger.warning("a message of %s could not be stored: %s", self.user.username, outcome)
            self.reply_error("unavailable", "The message could not be stored; send it again.", client_id)
        else:
            self.enqueue(Frame('{"type":"ack","client_id":' + dumps(client_id) + ',"message":'
                               + outcome.message_text + "}"))


# -- frame handlers


def id_field(frame: dict[str, Any], name: str) -> int:
    value = frame_field(frame, name, int)
    if not 0 < value <= ID_MAX:
        raise FrameError("invalid_field", f"'{name}' must be a message id.")
    return value


async def peer_field(socket: ChatSocket, frame: dict[str, Any], name: str) -> User:
    peer = await socket.services.accounts.find_user(frame_field(frame, name, str))
    if peer is None:
        raise FrameError("unknown_user", f"There is no user {frame[name]!r}.")
    return peer


def take_token(socket: ChatSocket) -> None:
    if not socket.services.limits.allow_send(socket.user.id):
        socket.services.metrics.refusals.labels("send_rate").inc()
        raise FrameError("rate_limited", "Too many frames; slow down and send again.")


async def check_first_contact(socket: ChatSocket, recipient: User) -> None:
    """Messages to someone who never answered have a small budget of their own."""
    services = socket.services
    if not (services.settings.first_contacts_per_sender or services.settings.first_contacts_per_recipient):
        return
    if await services.messenger.first_contact(socket.user, recipient) and not services.limits.allow_first_contact(
            socket.user.id, recipient.id):
        services.metrics.refusals.labels("first_contact").inc()
        raise FrameError("rate_limited", f"Too many messages to people who have not answered; "
                                         f"wait for {recipient.username} to answer, or try later.")


async def on_send(socket: ChatSocket, frame: dict[str, Any]) -> None:
    attachment = None if frame.get("attachment") is None else frame_field(frame, "attachment", str)
    if attachment is None or "body" in frame:
        frame_field(frame, "body", str)
    client_id = client_id_field(frame)
    reply_to = None if frame.get("reply_to") is None else id_field(frame, "reply_to")
    recipient = await peer_field(socket, frame, "to")
    body = caption_field(frame, attachment)
    take_token(socket)
    await check_first_contact(socket, recipient)
    # Not awaited: the next frames are read meanwhile, so one commit takes many
    # sends of a socket; the writer's queue keeps their order.
    socket.sends_in_flight += 1
    stored = socket.services.messenger.send(NewMessage(socket.user, recipient, body, client_id, reply_to, attachment),
                                            functools.partial(socket.acknowledge, client_id))
    if socket.sends_in_flight > SENDS_IN_FLIGHT_MAX:
        await asyncio.wait([stored])


async def on_edit(socket: ChatSocket, frame: dict[str, Any]) -> None:
    message_id = id_field(frame, "id")
    body = body_field(frame)
    take_token(socket)
    outcome = await socket.services.messenger.change(socket.user, message_id, body)
    if isinstance(outcome, Refused):
        raise FrameError(outcome.code, outcome.detail)


async def on_delete(socket: ChatSocket, frame: dict[str, Any]) -> None:
    message_id = id_field(frame, "id")
    take_token(socket)
    outcome = await socket.services.messenger.change(socket.user, message_id, None)
    if isinstance(outcome, Refused):
        raise FrameError(outcome.code, outcome.detail)


async def on_typing(socket: ChatSocket, frame: dict[str, Any]) -> None:
    peer = await peer_field(socket, frame, "to")
    if socket.services.limits.allow_typing(socket.user.id, peer.id):
        await socket.services.messenger.typing(socket.user, peer)
    else:
        socket.services.metrics.refusals.labels("typing").inc()


async def on_read(socket: ChatSocket, frame: dict[str, Any]) -> None:
    peer = await peer_field(socket, frame, "with")
    up_to = frame_field(frame, "up_to", int)
    if up_to < 0:
        raise FrameError("invalid_field", "'up_to' must be at least 0.")
    take_token(socket)
    await socket.services.messenger.read(socket.user, peer, up_to)


async def on_ping(socket: ChatSocket, frame: dict[str, Any]) -> None:
    socket.reply({"type": "pong"})


FRAME_HANDLERS: dict[str, Callable[[ChatSocket, dict[str, Any]], Awaitable[None]]] = {
    "send": on_send, "edit": on_edit, "delete": on_delete, "typing": on_typing, "read": on_read, "ping": on_ping}


def too_deep(text: str) -> bool:
    """Nested deeper than DEPTH_MAX; counted only for frames with that many brackets at all."""
    if text.count("[") + text.count("{") <= DEPTH_MAX:
        return False
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > DEPTH_MAX:
                return True
        elif char in "]}":
            depth -= 1
    return False


async def handle_frame(socket: ChatSocket, text: str) -> None:
    if too_deep(text):
        return socket.reply_error("bad_json", f"Frames are nested at most {DEPTH_MAX} levels deep.")
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):
        return socket.reply_error("bad_json", "The frame is not valid JSON.")
    if not isinstance(frame, dict):
        return socket.reply_error("bad_json", "A frame is a JSON object.")
    client_id = frame.get("client_id")
    client_id = client_id if isinstance(client_id, str) and storable(client_id) else None
    kind = frame.get("type")
    handler = FRAME_HANDLERS.get(kind) if isinstance(kind, str) else None
    if handler is None:
        return socket.reply_error("unknown_type", "Unknown frame type.", client_id)
    try:
        await handler(socket, frame)
    except FrameError as exc:
        socket.reply_error(exc.code, exc.detail, client_id)
    except Unavailable:
        socket.reply_error("unavailable", "The server cannot store this now; try again.", client_id)


class WebSocketEndpoint:
    """/ws as an ASGI app rather than a function of a WebSocket: frames go out
    through the ASGI `send` that ChatXApp was given. Starlette's
    WebSocket.send_text, and each middleware's wrapper around `send` (none of
    which touches a websocket message), are a coroutine layer per frame."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive, send)
        chat = chat_of(websocket)
        try:
            session = await chat.identity.of(websocket)
        except Unavailable:
            await websocket.accept()
            await websocket.close(CLOSE_TRY_LATER)
            return
        except ChatError:
            session = None
        if session is None or not origin_allowed(websocket, chat.settings.allowed_origins):
            await websocket.close()  # before accept(): the handshake is refused with 403
            return
        most = chat.settings.max_sockets_per_user
        if most and len(chat.fanout.local.get(session.user.id, ())) >= most:
            chat.metrics.refusals.labels("sockets").inc()
            await websocket.close()  # over the limit on this process; across processes, ChatSocket checks
            return
        cursors = {name: websocket.query_params.get(name) for name in ("since", "after")}
        await websocket.accept()
        for name, value in cursors.items():
            if value is not None and not CURSOR_RE.fullmatch(value):
                await websocket.send_text(dumps({"type": "error", "code": "invalid_field",
                                                 "detail": f"'{name}' must be a whole number of at least 0."}))
                await websocket.close(CLOSE_POLICY)
                return
        since, after = (None if value is None else cursor_value(value) for value in cursors.values())
        socket = ChatSocket(chat.socket_services, websocket, scope.get("chatx.server_send", send), session)
        await socket.serve(since, after)


# ---- HTTP -----------------------------------------------------------------------------

ERROR_CODES = {400: "bad_request", 401: "not_authenticated", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "too_large"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, retry_after: int | None = None) -> None:
        self.status, self.code, self.detail, self.retry_after = status, code, detail, retry_after


def error_response(status: int, code: str, detail: str, retry_after: int | None = None) -> JSONResponse:
    headers = None if retry_after is None else {"Retry-After": str(retry_after)}
    return JSONResponse({"error": {"code": code, "detail": detail}}, status_code=status, headers=headers)


async def api_error(request: Request, exc: Exception) -> Response:
    refusals = chat_of(request).metrics.refusals
    if isinstance(exc, Unavailable):
        return error_response(503, "unavailable", "The database is not answering; try again shortly.", 1)
    if isinstance(exc, Busy):
        refusals.labels("hash_queue").inc()
        return error_response(503, "busy", "The server is busy signing people in; try again in a moment.", 1)
    if isinstance(exc, TooManyAttempts):
        refusals.labels(exc.kind).inc()
        return error_response(429, "rate_limited", "Too many attempts; try again later.", exc.retry_after)
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.detail, exc.retry_after)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, ERROR_CODES.get(exc.status_code, "error"), str(exc.detail))


async def server_error(request: Request, exc: Exception) -> Response:
    return error_response(500, "internal_error", "Something went wrong on the server; nothing was lost.")


def check_origin(request: Request) -> None:
    chat = chat_of(request)
    if not chat.identity.presents_token(request) and not origin_allowed(request, chat.settings.allowed_origins):
        raise ApiError(403, "forbidden", "Requests from other sites are not accepted.")


async def json_object(request: Request) -> dict[str, Any]:
    check_origin(request)
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(400, "bad_request", "Send a JSON object with Content-Type: application/json.")
    try:
        data = json.loads(await limited_body(request))
    except (ValueError, RecursionError):
        raise ApiError(400, "bad_request", "The body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", "The body must be a JSON object.")
    return data


async def limited_body(request: Request) -> bytes:
    """Read at most HTTP_BODY_MAX bytes within BODY_TIMEOUT_S. (Starlette's
    max_body_size answers in plain text, and every /api error must be JSON.)"""
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                size += len(chunk)
                if size > HTTP_BODY_MAX:
                    raise ApiError(413, "too_large", f"Request bodies are at most {HTTP_BODY_MAX} bytes.")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, "timeout", f"The body did not arrive within {BODY_TIMEOUT_S} s.") from None
    except ClientDisconnect:  # gone, or cut off by HTTPProtocol's deadline: the answer reaches no one
        raise ApiError(400, "bad_request", "The connection closed before the body arrived.") from None
    return b"".join(chunks)


def string_field(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not storable(value):
        raise ApiError(400, "bad_request", f"'{name}' is required and must be a string.")
    return value


def query_cursor(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    if not CURSOR_RE.fullmatch(value):
        raise ApiError(400, "bad_request", f"'{name}' must be a whole number of at least 0.")
    return cursor_value(value)


def query_limit(request: Request, default: int, most: int) -> int:
    """A limit above `most` (of any number of digits) is taken as `most`; below 1 is a bad request."""
    text = request.query_params.get("limit", str(default))
    if not CURSOR_RE.fullmatch(text) or not text.strip("0"):
        raise ApiError(400, "bad_request", "'limit' must be a whole number of at least 1.")
    return most if len(text) > 18 else min(int(text), most)


def count_read(request: Request, user: User) -> None:
    """A history page or the conversation list costs its reader a token (Limits.allow_read)."""
    chat = chat_of(request)
    if not chat.limits.allow_read(user.id):
        chat.metrics.refusals.labels("read_rate").inc()
        raise ApiError(429, "rate_limited", "Too many reads at once; try again in a moment.",
                       max(1, math.ceil(1 / chat.settings.read_rate)))


async def signed_in(request: Request) -> Session:
    try:
        session = await chat_of(request).identity.of(request)
    except ChatError as exc:
        raise ApiError(403, exc.code, exc.detail) from None
    if session is None:
        raise ApiError(401, "not_authenticated", "Sign in first.")
    return session


async def named_user(request: Request) -> User:
    user = await chat_of(request).accounts.find_user(request.path_params["username"])
    if user is None:
        raise ApiError(404, "unknown_user", "There is no such user.")
    return user


def cookie_path(request: Request) -> str:
    """The app's root path; `/` over HTTPS, as the `__Host-` prefix requires."""
    return "/" if session_cookie(request) == SECURE_SESSION_COOKIE else request.scope.get("root_path") or "/"


def with_session_cookie(response: Response, request: Request, value: str) -> Response:
    response.set_cookie(
        session_cookie(request), value, max_age=SESSION_DAYS * 86400, path=cookie_path(request),
        httponly=True, samesite="lax", secure=request.url.scheme == "https",
    )
    return response


async def register(request: Request) -> Response:
    """Create an account and sign in.
    ---
    summary: Create an account
    requestBody:
      required: true
      content: {application/json: {schema: {type: object, required: [username, password], properties: {username: {type: string}, password: {type: string}}}}}
    responses:
      "201": {description: "{user}; signed in"}
      "400": {description: "bad_request, invalid_username, weak_password"}
      "403": {description: "registration_closed"}
      "409": {description: "username_taken"}
      "429": {description: "rate_limited"}
      "503": {description: "busy"}
    """
    data = await json_object(request)
    chat = chat_of(request)
    if chat.settings.registration == "closed":
        raise ApiError(403, "registration_closed", "Accounts are made by the administrator here.")
    username, password = string_field(data, "username"), string_field(data, "password")
    if problem := username_problem(username):
        raise ApiError(400, "invalid_username", problem)
    if problem := password_problem(password):
        raise ApiError(400, "weak_password", problem)
    user = await chat.accounts.register(username, password, client_address(request))
    if user is None:
        raise ApiError(409, "username_taken", f"The username {username!r}, or one that looks like it, is taken.")
    cookie = await chat.accounts.create_session(user)
    return with_session_cookie(JSONResponse({"user": user.public()}, status_code=201), request, cookie)


async def login(request: Request) -> Response:
    """Sign in with a username and password; a session this browser had ends.
    ---
    summary: Sign in
    requestBody:
      required: true
      content: {application/json: {schema: {type: object, required: [username, password], properties: {username: {type: string}, password: {type: string}}}}}
    responses:
      "200": {description: "{user}; signed in"}
      "400": {description: "bad_request"}
      "401": {description: "bad_credentials"}
      "429": {description: "rate_limited"}
      "503": {description: "busy"}
    """
    data = await json_object(request)
    username, password = string_field(data, "username"), string_field(data, "password")
    accounts = chat_of(request).accounts
    user = await accounts.authenticate(username, password, client_address(request))
    if user is None:
        raise ApiError(401, "bad_credentials", "Wrong username or password.")
    cookie = await accounts.create_session(user, replaces=await accounts.session_from(request))
    return with_session_cookie(JSONResponse({"user": user.public()}), request, cookie)


async def logout(request: Request) -> Response:
    """End this session, or with `everywhere=true` every session of mine; their sockets close with 4401.
    ---
    summary: Sign out
    parameters:
      - {name: everywhere, in: query, required: false, schema: {type: string}, description: "true ends every session of mine"}
    responses:
      "204": {description: "signed out"}
    """
    check_origin(request)
    accounts = chat_of(request).accounts
    session = await accounts.session_from(request)
    if session is not None:
        if request.query_params.get("everywhere") == "true":
            await accounts.revoke_all(session.user)
        else:
            await accounts.revoke(session)
    return without_session_cookie(Response(status_code=204), request)


def without_session_cookie(response: Response, request: Request) -> Response:
    response.delete_cookie(session_cookie(request), path=cookie_path(request), httponly=True, samesite="lax",
                           secure=request.url.scheme == "https")
    return response


async def change_password(request: Request) -> Response:
    """A new password; every other session of mine ends.
    ---
    summary: Change my password
    requestBody:
      required: true
      content: {application/json: {schema: {type: object, required: [password, new_password], properties: {password: {type: string}, new_password: {type: string}}}}}
    responses:
      "204": {description: "changed"}
      "400": {description: "bad_request, weak_password"}
      "401": {description: "bad_credentials"}
      "429": {description: "rate_limited"}
    """
    data = await json_object(request)
    session = await signed_in(request)
    password, new_password = string_field(data, "password"), string_field(data, "new_password")
    if problem := password_problem(new_password):
        raise ApiError(400, "weak_password", problem)
    accounts, address = chat_of(request).accounts, client_address(request)
    if not await accounts.password_matches(session.user, password, address):
        raise ApiError(401, "bad_credentials", "The current password is wrong.")
    await accounts.change_password(session, new_password, address)
    return Response(status_code=204)


async def delete_me(request: Request) -> Response:
    """Delete my account and every message I sent or received.
    ---
    summary: Delete my account
    requestBody:
      required: true
      content: {application/json: {schema: {type: object, required: [password], properties: {password: {type: string}}}}}
    responses:
      "204": {description: "deleted"}
      "400": {description: "bad_request"}
      "401": {description: "bad_credentials"}
      "429": {description: "rate_limited"}
    """
    data = await json_object(request)
    session = await signed_in(request)
    accounts = chat_of(request).accounts
    if not await accounts.password_matches(session.user, string_field(data, "password"), client_address(request)):
        raise ApiError(401, "bad_credentials", "The password is wrong.")
    await accounts.delete(session.user)
    return without_session_cookie(Response(status_code=204), request)


async def me(request: Request) -> Response:
    """The signed-in user.
    ---
    summary: Who I am
    responses:
      "200": {description: "{user}"}
      "401": {description: "not_authenticated"}
    """
    session = await signed_in(request)
    return JSONResponse({"user": session.user.public()})


async def conversation_list(request: Request) -> Response:
    """My conversations, newest last message first, paged with `before`.
    ---
    summary: My conversations
    parameters:
      - {name: before, in: query, required: false, schema: {type: integer}, description: "a message id: conversations whose last message is older"}
      - {name: limit, in: query, required: false, schema: {type: integer}, description: "1 to 200, default 50"}
    responses:
      "200": {description: "{conversations, has_more}"}
      "400": {description: "bad_request"}
      "401": {description: "not_authenticated"}
    """
    session = await signed_in(request)
    count_read(request, session.user)
    before, limit = query_cursor(request, "before"), query_limit(request, PAGE_DEFAULT, PAGE_MAX)
    return Response(await chat_of(request).messenger.conversations(session.user, before, limit),
                    media_type="application/json")


async def directory(request: Request) -> Response:
    """Users whose username starts with `q`, by username, paged with `after`.
    ---
    summary: Search the directory
    parameters:
      - {name: q, in: query, required: true, schema: {type: string}, description: "the start of a username, 1 to 32 characters"}
      - {name: after, in: query, required: false, schema: {type: string}, description: "a username: continue after it"}
      - {name: limit, in: query, required: false, schema: {type: integer}, description: "1 to 100, default 20"}
    responses:
      "200": {description: "{users, has_more}"}
      "400": {description: "bad_request"}
      "401": {description: "not_authenticated"}
      "429": {description: "rate_limited"}
    """
    session = await signed_in(request)
    prefix, after = request.query_params.get("q", ""), request.query_params.get("after", "")
    if not 1 <= len(prefix) <= QUERY_MAX or not storable(prefix) or len(after) > QUERY_MAX or not storable(after):
        raise ApiError(400, "bad_request", f"'q' is required: 1 to {QUERY_MAX} characters.")
    limit = query_limit(request, DIRECTORY_DEFAULT, DIRECTORY_MAX)
    chat = chat_of(request)
    if wait := chat.limits.directory_wait(session.user.id):
        chat.metrics.refusals.labels("directory").inc()
        raise ApiError(429, "rate_limited", "Too many searches; try again in a moment.", math.ceil(wait))
    return JSONResponse(await chat.accounts.directory(session.user, prefix, after, limit))


async def conversation_messages(request: Request) -> Response:
    """Messages between me and a user, paged with `before` or `after`.
    ---
    summary: A conversation's messages
    parameters:
      - {name: username, in: path, required: true, schema: {type: string}}
      - {name: before, in: query, required: false, schema: {type: integer}, description: "a message id"}
      - {name: after, in: query, required: false, schema: {type: integer}, description: "a message id"}
      - {name: limit, in: query, required: false, schema: {type: integer}, description: "1 to 200, default 50"}
    responses:
      "200": {description: "{messages, has_more, read_up_to}"}
      "400": {description: "bad_request"}
      "401": {description: "not_authenticated"}
      "404": {description: "unknown_user"}
    """
    session = await signed_in(request)
    count_read(request, session.user)
    before, after = query_cursor(request, "before"), query_cursor(request, "after")
    if before is not None and after is not None:
        raise ApiError(400, "bad_request", "Give 'before' or 'after', not both.")
    limit = query_limit(request, PAGE_DEFAULT, PAGE_MAX)
    peer = await named_user(request)
    return Response(await chat_of(request).messenger.history(session.user, peer, before, after, limit),
                    media_type="application/json")


async def block_list(request: Request) -> Response:
    """The users I block.
    ---
    summary: Users I block
    responses:
      "200": {description: "{blocks}"}
      "401": {description: "not_authenticated"}
    """
    session = await signed_in(request)
    blocked = await chat_of(request).accounts.blocked(session.user)
    return JSONResponse({"blocks": [user.public() for user in blocked]})


async def block(request: Request) -> Response:
    """PUT blocks a user, DELETE unblocks them.
    ---
    summary: Block or unblock a user
    parameters:
      - {name: username, in: path, required: true, schema: {type: string}}
    responses:
      "204": {description: "done"}
      "401": {description: "not_authenticated"}
      "404": {description: "unknown_user"}
    """
    check_origin(request)
    session = await signed_in(request)
    other = await named_user(request)
    presence = chat_of(request).presence
    if request.method == "PUT":
        await presence.blocked(session.user, other)
    else:
        await presence.unblocked(session.user, other)
    return Response(status_code=204)


def file_name(request: Request) -> str:
    """The `name` query parameter as a plain file name: no directories, no
    control or format characters, at most ATTACHMENT_NAME_MAX characters."""
    name = re.split(r"[/\\]", request.query_params.get("name", ""))[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip().lstrip(".")
    if not name:
        raise ApiError(400, "bad_request", "'name' is required: the file's name.")
    if len(name) > ATTACHMENT_NAME_MAX:
        stem, dot, extension = name.rpartition(".")
        keep = extension[:16] if dot else ""
        name = (name[:ATTACHMENT_NAME_MAX - len(keep) - 1] + "." + keep) if keep else name[:ATTACHMENT_NAME_MAX]
    return name


async def upload_attachment(request: Request) -> Response:
    """Upload a file or image for a message; the body is its bytes.
    ---
    summary: Upload an attachment
    parameters: [{name: name, in: query, required: true, schema: {type: string}}]
    responses:
      "201": {description: "{attachment}: an upload a send may use within an hour"}
      "400": {description: "bad_request"}
      "401": {description: "not_authenticated"}
      "413": {description: "too_large"}
      "429": {description: "rate_limited: over the day's upload bytes"}
      "503": {description: "busy: the process checking its image ended; try again"}
    """
    check_origin(request)
    session = await signed_in(request)
    name = file_name(request)
    chat = chat_of(request)
    limit = chat.settings.max_attachment_bytes
    too_large = ApiError(413, "too_large", f"Attachments are at most {limit} bytes.")
    over_quota = ApiError(429, "rate_limited", "You uploaded as much as a day allows; try again tomorrow.")
    length = request.headers.get("content-length", "")
    declared_size = int(length) if length.isdigit() else None
    if limit and declared_size is not None and declared_size > limit:
        raise too_large
    allowance = await chat.attachments.allowance(session.user)
    if allowance is not None and declared_size is not None and declared_size > allowance:
        raise over_quota
    declared = request.headers.get("content-type", "").split(";")[0].strip().lower()
    with tempfile.SpooledTemporaryFile(UPLOAD_SPOOL_BYTES) as spool:
        size = 0
        pieces: list[bytes] = []  # a thread writes them out UPLOAD_WRITE_BYTES at a time: one hop, not one a piece
        chunks = request.stream().__aiter__()
        while True:
            try:
                async with asyncio.timeout(BODY_TIMEOUT_S):  # for each piece: a large file may take minutes
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise ApiError(408, "timeout", f"The body stalled for {BODY_TIMEOUT_S} s.") from None
            except ClientDisconnect:
                raise ApiError(400, "bad_request", "The upload was cut off.") from None
            size += len(chunk)
            if limit and size > limit:  # refused as it comes, whatever Content-Length said
                raise too_large
            if allowance is not None and size > allowance:
                raise over_quota
            pieces.append(chunk)
            if size - spool.tell() >= UPLOAD_WRITE_BYTES:
                await asyncio.to_thread(spool.writelines, pieces)  # past UPLOAD_SPOOL_BYTES, a write to disk
                pieces = []
        if pieces:
            await asyncio.to_thread(spool.writelines, pieces)
        if size == 0:
            raise ApiError(400, "bad_request", "The file is empty.")
        try:
            attachment = await chat.attachments.add(session.user, name, declared, spool, size)
        except UploadErased:  # the account was deleted meanwhile (401), or storing took past the deadline
            await signed_in(request)
            raise ApiError(408, "timeout", "The upload was erased before it was stored whole.") from None
        except DecoderStopped:
            raise ApiError(503, "busy", "Checking the image failed; try the upload again.", 1) from None
    if attachment is None:
        raise over_quota
    return JSONResponse({"attachment": attachment}, status_code=201)


ATTACHMENT_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
RANGE_RE = re.compile(r"bytes=([0-9]{0,18})-([0-9]{0,18})")


async def attachment_for(request: Request) -> tuple:
    """The attachment the path names, if I may read it: the same 404 for an id
    that never existed and for one of others, after the same one query."""
    session = await signed_in(request)
    attachment_id = request.path_params["id"]
    found = None
    if ATTACHMENT_ID_RE.fullmatch(attachment_id):
        found = await chat_of(request).attachments.readable(attachment_id, session.user)
    if found is None:
        raise ApiError(404, "unknown_attachment", "There is no such attachment for you.")
    return tuple(found)


def content_disposition(kind: str, name: str) -> str:
    """Inline for the images a page may show, a download for everything else;
    the name as RFC 6266 / 5987 have it, with an ASCII fallback."""
    fallback = re.sub(r'[^A-Za-z0-9._ -]', "_", name)
    disposition = "inline" if kind in INLINE_TYPES.values() else "attachment"
    return f"{disposition}; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def attachment_headers(etag: str, kind: str) -> dict[str, str]:
    return {"ETag": etag, "Cache-Control": "private, max-age=86400", "Content-Security-Policy": "sandbox",
            "X-Content-Type-Options": "nosniff", "Content-Type": kind}


async def attachment_bytes(request: Request) -> Response:
    """An attachment's bytes, to the uploader and the other person of its message.
    ---
    summary: Download an attachment (Range requests too)
    responses:
      "200": {description: "the bytes"}
      "206": {description: "the range asked"}
      "401": {description: "not_authenticated"}
      "404": {description: "unknown_attachment"}
    """
    attachment_id, name, kind, size, *_ = await attachment_for(request)
    headers = {**attachment_headers(f'"{attachment_id}"', kind), "Accept-Ranges": "bytes",
               "Content-Disposition": content_disposition(kind, name)}
    if request.headers.get("if-none-match") == headers["ETag"]:
        return Response(status_code=304, headers=headers)
    start, end, status = 0, size, 200
    asked = request.headers.get("range")
    if asked and request.headers.get("if-range", headers["ETag"]) == headers["ETag"]:
        match = RANGE_RE.fullmatch(asked.strip())
        first, last = match.groups() if match else ("", "")
        if match and (first or last):
            if not first:  # the last N bytes
                start = max(size - int(last), 0)
            else:
                start, end = int(first), min(int(last) + 1, size) if last else size
            if start >= end or start >= size:
                return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    return StreamingResponse(chat_of(request).attachments.store.read(attachment_id, start, end), status_code=status,
                             headers=headers)


async def attachment_thumbnail_bytes(request: Request) -> Response:
    """An image attachment's thumbnail, at most 320 px on the long side.
    ---
    summary: An image's thumbnail
    responses:
      "200": {description: "JPEG or PNG"}
      "401": {description: "not_authenticated"}
      "404": {description: "unknown_attachment"}
    """
    attachment_id, *_, has_thumbnail = await attachment_for(request)
    thumbnail = await chat_of(request).attachments.thumbnail(attachment_id) if has_thumbnail else None
    if thumbnail is None:
        raise ApiError(404, "unknown_attachment", "There is no such attachment for you.")
    kind = "image/png" if thumbnail.startswith(b"\x89PNG") else "image/jpeg"
    headers = attachment_headers(f'"{attachment_id}-thumbnail"', kind)
    if request.headers.get("if-none-match") == headers["ETag"]:
        return Response(status_code=304, headers=headers)
    return Response(bytes(thumbnail), headers={**headers, "Content-Disposition": "inline"})


def address_allowed(address: str, allowed: tuple[str, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(network, strict=False) for network in allowed)


async def metrics(request: Request) -> Response:
    """Prometheus's text format; on with CHATX_METRICS, for CHATX_METRICS_ALLOW addresses.
    ---
    summary: Metrics for Prometheus
    responses:
      "200": {description: "text format 0.0.4"}
      "403": {description: "forbidden"}
      "404": {description: "not_found"}
    """
    chat = chat_of(request)
    if not chat.settings.metrics:
        raise ApiError(404, "not_found", "Metrics are off (CHATX_METRICS).")
    if not address_allowed(client_address(request), chat.settings.metrics_allow):
        raise ApiError(403, "forbidden", "Metrics are not served to this address.")
    chat.refresh_metrics()
    return Response(generate_latest(chat.metrics.registry), media_type=CONTENT_TYPE_LATEST)


SCHEMAS = SchemaGenerator({"openapi": "3.0.0", "info": {"title": "ChatX", "version": __version__}})


async def openapi(request: Request) -> Response:
    """The HTTP API as OpenAPI, from the handlers' docstrings."""
    return JSONResponse(SCHEMAS.get_schema(routes=request.app.routes))


async def healthz(request: Request) -> Response:
    """Whether the database takes commits and the broadcast is connected.
    ---
    summary: Health
    responses:
      "200": {description: "{status: ok, checks}"}
      "503": {description: "{status: fail, checks}"}
    """
    checks = await chat_of(request).health()
    ok = all(value == "ok" for value in checks.values())
    return JSONResponse({"status": "ok" if ok else "fail", "checks": checks}, status_code=200 if ok else 503)


def page_context(request: Request, **extra: Any) -> dict[str, Any]:
    """The page's base path, and the theme the browser chose (static/theme.js
    keeps it in a cookie), so that the first paint is already in that theme."""
    theme = request.cookies.get(THEME_COOKIE)
    return {"base": request.scope.get("root_path", ""), "theme": theme if theme in THEMES else None, **extra}


async def chat_page(request: Request) -> Response:
    chat = chat_of(request)
    try:
        session = await chat.identity.of(request)
    except ChatError as exc:
        raise ApiError(403, exc.code, exc.detail) from None
    if session is None and chat.settings.login_url:
        return RedirectResponse(chat.settings.login_url, status_code=303)
    if session is None and chat.identity.hosted:
        raise ApiError(401, "not_authenticated", "Sign in first.")
    if session is None:  # relative to the root path: the Host header does not make the URL
        return RedirectResponse(request.scope.get("root_path", "") + "/login", status_code=303)
    return chat.templates.TemplateResponse(request, "chat.html", page_context(
        request, user=session.user.public(), hosted=chat.identity.hosted))


async def not_found(request: Request) -> Response:
    """ChatX's own accounts where the host names people (`authenticate`)."""
    raise ApiError(404, "not_found", "Accounts are the host application's here.")


async def login_page(request: Request) -> Response:
    return chat_of(request).templates.TemplateResponse(request, "login.html", page_context(request))


async def register_page(request: Request) -> Response:
    return chat_of(request).templates.TemplateResponse(request, "register.html", page_context(request))


SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]


class SecurityHeaders:
    """Adds the Content-Security-Policy and friends to every HTTP response,
    and `Cache-Control: no-store` to the API's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Not a coroutine itself: what passes through is handed on as the next
        layer's coroutine, so that an open socket does not hold a suspended
        frame of this layer for its whole life."""
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        return self.secured(scope, receive, send)

    async def secured(self, scope: Scope, receive: Receive, send: Send) -> None:
        api = scope["path"].startswith(scope.get("root_path", "") + "/api/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                given = {name.lower() for name, _ in headers}  # an attachment's own CSP and caching stand
                message["headers"] = headers + [header for header in SECURITY_HEADERS if header[0] not in given]
                if api and b"cache-control" not in given:
                    message["headers"].append((b"cache-control", b"no-store"))
            await send(message)

        await self.app(scope, receive, send_with_headers)


class ConnectionCounts:
    """Open HTTP connections per client address on one app's server
    (HTTPProtocol), so that one address cannot take every file descriptor:
    at most `most` each (0: no limit), proxies in CHATX_TRUSTED_PROXIES excepted."""

    def __init__(self, most: int, proxies: tuple[str, ...]) -> None:
        self.most, self.proxies = most, proxies
        self.open: dict[str, int] = {}

    def admit(self, address: str) -> bool:
        count = self.open.get(address, 0)
        if self.most and count >= self.most and not address_allowed(address, self.proxies):
            return False
        self.open[address] = count + 1
        return True

    def release(self, address: str) -> None:
        count = self.open.pop(address) - 1
        if count:
            self.open[address] = count


def connection_counts(app: Any) -> ConnectionCounts | None:
    """The ChatX app's ConnectionCounts, under the middleware uvicorn may wrap it in."""
    for _ in range(8):
        chat = getattr(getattr(app, "state", None), "chat", None)
        if chat is not None:
            return chat.connections
        app = getattr(app, "app", None)
    return None


TOO_MANY_CONNECTIONS = (b'{"error": {"code": "rate_limited", "detail": '
                        b'"Too many connections from this address; try again in a moment."}}')
TOO_MANY_CONNECTIONS_RESPONSE = (b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
                                 b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(TOO_MANY_CONNECTIONS), TOO_MANY_CONNECTIONS))


class HTTPProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the deadlines and limits uvicorn
    lacks, so that a slow or silent client holds neither a connection nor
    memory for long:
    - a request's head arrives within HEAD_TIMEOUT_S of its first byte (or of
      the connection), the whole request within REQUEST_TIMEOUT_S plus a
      second per REQUEST_BYTES_PER_S of body sent so far; past either, the
      connection is closed;
    - a response given before its request's body was all sent closes the
      connection after it (uvicorn would read the rest, however slowly it came);
    - a client that leaves its response untaken for RESPONSE_STALL_S is cut
      off, and what waited for it is dropped;
    - at most CHATX_HTTP_CONNECTIONS_PER_ADDRESS open per client address;
      one more is answered 429 and closed.
    `make run` and `python -m chatx serve` pass it as `--http chatx:HTTPProtocol`."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.request_deadline: asyncio.TimerHandle | None = None
        self.send_deadline: asyncio.TimerHandle | None = None
        self.request_began, self.in_head, self.body_received = 0.0, True, 0
        self.running: Any = None
        self.counts, self.counted = connection_counts(self.app), None
        address = self.client[0] if self.client else None
        if self.counts is not None and address:
            if not self.counts.admit(address):
                transport.write(TOO_MANY_CONNECTIONS_RESPONSE)
                transport.close()
                return
            self.counted = address
        self.start_request()

    def data_received(self, data: bytes) -> None:
        if self.request_deadline is None:  # the first bytes after a request: the next one's
            self.start_request()
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.request_deadline is None:
            self.start_request()

    def on_headers_complete(self) -> None:
        self.in_head = False
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.body_received += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self.stop_request_deadline()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self.cycle.response_complete and self.cycle.more_body and not self.transport.is_closing():
            self.transport.close()  # answered before its body came: the rest is not worth waiting for
        super().on_response_complete()

    def handle_websocket_upgrade(self) -> None:
        self.stop_request_deadline()
        self.release()  # a socket is limited per user from here on
        super().handle_websocket_upgrade()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.send_deadline is None:
            self.send_deadline = self.loop.call_later(RESPONSE_STALL_S, self.send_late)

    def resume_writing(self) -> None:
        self.stop_send_deadline()
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_request_deadline()
        self.stop_send_deadline()
        self.release()
        self.disconnect_cycles()
        super().connection_lost(exc)

    def start_request(self) -> None:
        self.request_began, self.in_head, self.body_received = self.loop.time(), True, 0
        self.request_deadline = self.loop.call_later(HEAD_TIMEOUT_S, self.request_late)

    def request_late(self) -> None:
        self.request_deadline = None
        allowed = HEAD_TIMEOUT_S if self.in_head else REQUEST_TIMEOUT_S + self.body_received / REQUEST_BYTES_PER_S
        remaining = self.request_began + allowed - self.loop.time()
        if remaining > 0:
            self.request_deadline = self.loop.call_later(remaining, self.request_late)
        elif not self.transport.is_closing():
            self.transport.close()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self.running = cycle  # uvicorn tells only its newest cycle of a lost connection, maybe a queued one
        super()._start_asgi_task(cycle, app)

    def send_late(self) -> None:
        self.send_deadline = None
        self.disconnect_cycles()
        self.flow.resume_writing()
        reset(self.transport)

    def disconnect_cycles(self) -> None:
        """Every request of this connection, the one answered, the newest and
        those pipelined behind them, returns rather than write to a closed
        transport: uvicorn tells only its newest cycle."""
        for cycle in (self.running, self.cycle, *(cycle for cycle, _ in self.pipeline)):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()

    def stop_request_deadline(self) -> None:
        if self.request_deadline is not None:
            self.request_deadline.cancel()
            self.request_deadline = None

    def stop_send_deadline(self) -> None:
        if self.send_deadline is not None:
            self.send_deadline.cancel()
            self.send_deadline = None

    def release(self) -> None:
        if self.counted is not None:
            self.counts.release(self.counted)
            self.counted = None


# ---- the composition root and the app -------------------------------------------------

# What keeps ChatX from starting for now: its database or broker cannot be reached.
START_FAULTS = (Unavailable, RedisError, *FAULT_TYPES)


async def cancel(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


class ChatX:
    """One ChatX app: its settings and services, started and stopped together.
    `create_app` makes one per app, so two apps in one process share nothing."""

    def __init__(self, settings: Settings, authenticate: Authenticate | None = None) -> None:
        self.settings = settings
        self.process_id = uuid.uuid4().hex
        self.templates = Jinja2Templates(directory=ASSETS / "templates")
        self.metrics = Metrics()
        self.storage = Storage(settings.database_url, self.metrics.commit_seconds.observe,
                               self.metrics.commit_retries.inc)
        self.fanout = Fanout(settings)
        self.limits = Limits(settings)
        self.connections = ConnectionCounts(settings.http_connections_per_address, settings.trusted_proxies)
        self.accounts = Accounts(self.storage, self.fanout, settings)
        self.identity = Identity(self.accounts, settings, authenticate)
        self.presence = Presence(self.storage, self.fanout, settings, self.process_id)
        self.messenger = Messenger(self.storage, self.fanout, self.presence, self.accounts, self.metrics, settings)
        self.attachments = Attachments(self.storage, settings)
        self.socket_services = SocketServices(settings, self.metrics, self.limits, self.accounts, self.fanout,
                                              self.presence, self.messenger)
        self.serving = False  # started; until then requests get 503 (Starting)
        self.shutdown_by: float | None = None
        self.accounts.deleting.append(self.presence.account_deleted)

    def on_status_change(self, callback: StatusCallback) -> StatusCallback:
        """Register `callback(username, status, last_seen)`, plain or async; it
        runs once per committed change of status made by this process."""
        return self.presence.hook.connect(callback)

    def on_message(self, callback: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
        """Register `callback(message)`, plain or async; it runs once per new
        message, after its commit, on the process that stored it."""
        return self.messenger.message_hook.connect(callback)

    async def send(self, sender: str, to: str, body: str, client_id: str | None = None,
                   attachment: str | None = None) -> dict[str, Any]:
        """Store and deliver a message from `sender` (made on first sight, as
        the host names them) as their `send` frame would, and return it; the
        frame's refusals raise ChatError. The host's code is not rate-limited."""
        return await self.messenger.send_as(sender, to, body, client_id, attachment)

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Start the services; while the database or broker cannot be reached,
        serve 503 (see Starting) and try again with backoff. Stop them in
        reverse, all within SHUTDOWN_S whatever the database and broker do."""
        configure_logging(self.settings.log_format)
        async with AsyncExitStack() as started:
            started.callback(logger.info, "ChatX stopped")
            try:
                await self.start(started)
            except START_FAULTS as exc:
                logger.warning("ChatX cannot start yet (%s); it answers 503 meanwhile and tries again", exc)
                starting = asyncio.create_task(self.keep_starting(started))
                started.push_async_callback(self.stop_within, functools.partial(cancel, starting))
            yield
            self.shutdown_by = time.monotonic() + SHUTDOWN_S

    async def start(self, started: AsyncExitStack) -> None:
        """Start the services in order; when one fails, stop those started."""
        async with AsyncExitStack() as services:
            await self.storage.start(migrate)
            services.push_async_callback(self.stop_within, self.storage.stop)
            await self.accounts.start()
            services.push_async_callback(self.stop_within, self.accounts.stop)
            await self.fanout.start("chatx:" + hashlib.sha256(self.accounts.secret.encode()).hexdigest()[:16])
            services.push_async_callback(self.stop_within, self.fanout.stop)
            for service in (self.presence, self.messenger, self.attachments):
                await service.start()
                services.push_async_callback(self.stop_within, service.stop)
            services.push_async_callback(self.stop_within, self.close_sockets)
            started.push_async_callback(services.pop_all().aclose)
        if self.settings.tune_gc:
            tune_collector()
        self.serving = True
        logger.info("ChatX %s started: database %s, broadcast %s", __version__,
                    redacted(self.settings.database_url), redacted(self.settings.broadcast_url))

    async def keep_starting(self, started: AsyncExitStack) -> None:
        backoff = 0.25
        while True:
            await asyncio.sleep(backoff * (1 + random.random()))
            backoff = min(backoff * 2, START_RETRY_MAX_S / 2)
            try:
                await self.start(started)
                return
            except START_FAULTS as exc:
                logger.warning("ChatX cannot start yet: %s", exc)
            except Exception:
                logger.exception("ChatX failed to start; trying again")

    async def stop_within(self, stop: Callable[[], Awaitable[None]]) -> None:
        """One step of stopping, given what is left of the shutdown's
        SHUTDOWN_S (or SHUTDOWN_S after a failed start); a step that overruns
        is cancelled and left behind, so that the next ones still run."""
        deadline = self.shutdown_by or time.monotonic() + SHUTDOWN_S
        name = getattr(stop, "__qualname__", "stopping")
        step = asyncio.ensure_future(stop())
        done, _ = await asyncio.wait([step], timeout=max(deadline - time.monotonic(), 0.1))
        if not done:
            step.cancel()
            logger.warning("%s did not finish within the shutdown's %d s; going on", name, SHUTDOWN_S)
        elif not step.cancelled() and step.exception() is not None:
            logger.error("%s failed: %s", name, step.exception())

    async def close_sockets(self) -> None:
        """Close sockets with 1012 so clients reconnect elsewhere."""
        open_sockets = self.fanout.sockets()
        for socket in open_sockets:
            socket.end(CLOSE_RESTART)  # ahead of its backlog: a client that stopped reading must not hold us
        if open_sockets:
            await asyncio.wait([socket.finished for socket in open_sockets], timeout=10)
        closed = self.metrics.registry.get_sample_value("chatx_sockets_closed_total", {"code": str(CLOSE_RESTART)})
        logger.info("closed %d sockets with %d", closed or 0, CLOSE_RESTART)

    def refresh_metrics(self) -> None:
        """The gauges, read when scraped."""
        self.metrics.open_sockets.set(len(self.fanout.sockets()))
        self.metrics.users_connected.set(len(self.fanout.local))
        self.metrics.broadcast_up.set(int(self.fanout.healthy))
        self.metrics.database_up.set(int(self.storage.writer.healthy))

    async def health(self) -> dict[str, str]:
        """Both fail until ChatX has started."""
        return {"database": "ok" if self.serving and await self.storage.healthy() else "fail",
                "broadcast": "ok" if self.serving and self.fanout.healthy else "fail"}


def tune_collector() -> None:
    """Freeze what is alive once started, and collect young objects less often:
    full collections walked the objects that live as long as the process
    (modules, SQLAlchemy's tables) and stalled the event loop under load."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


# Served whatever the Host header to a peer on this host or allowed to read
# metrics, asking directly (not through a proxy): a scrape or health check
# names the process by address and port (127.0.0.1:8001), not by the chat's
# name. Both only read.
ANY_HOST_PATHS = ("/healthz", "/metrics")
PROXY_HEADERS = (b"x-forwarded-for", b"forwarded")


class TrustedHosts(TrustedHostMiddleware):
    """Starlette's check of the Host header, its refusal in ChatX's error shape.
    It sees the client address CHATX_TRUSTED_PROXIES made (ChatXApp): a request
    through the proxy is the browser's, not the host's own."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str], monitors: tuple[str, ...] = ()) -> None:
        async def allowed(scope: Scope, receive: Receive, send: Send) -> None:
            scope["chatx.host_allowed"] = True
            await app(scope, receive, send)

        super().__init__(allowed, allowed_hosts=allowed_hosts)
        # A handshake's refusal has no body to put in ChatX's shape: sockets
        # get Starlette's check alone, without the layers an HTTP answer needs.
        self.sockets = TrustedHostMiddleware(app, allowed_hosts=allowed_hosts)
        self.monitors = ("127.0.0.0/8", "::1", *monitors)

    def monitoring(self, scope: Scope) -> bool:
        """A request for a path of ANY_HOST_PATHS, straight from a peer on this host or in `monitors`."""
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        client = scope.get("client")
        return (path in ANY_HOST_PATHS and client is not None and address_allowed(client[0], self.monitors)
                and not any(name in PROXY_HEADERS for name, _ in scope["headers"]))

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Not a coroutine itself, as SecurityHeaders.__call__. Sockets and the
        lifespan go to Starlette's check alone."""
        if scope["type"] != "http":
            return self.sockets(scope, receive, send)
        if self.monitoring(scope):
            return self.app(scope, receive, send)
        return self.checked(scope, receive, send)

    async def checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def answer(message: Message) -> None:
            if scope.get("chatx.host_allowed"):
                await send(message)
            elif message["type"] == "http.response.start" and message["status"] == 400:
                await error_response(400, "bad_request", "This server does not serve that host.")(
                    scope, receive, send)
            elif message["type"] == "http.response.start":  # Starlette's redirect to www.
                scope["chatx.host_allowed"] = True
                await send(message)

        await super().__call__(scope, receive, answer)


class Starting:
    """Until ChatX has started (its database or broker was away at start-up),
    every request but /healthz and /static gets 503 `unavailable`, and a
    socket is closed with CLOSE_TRY_LATER, as during an outage."""

    def __init__(self, app: ASGIApp, chat: ChatX) -> None:
        self.app, self.chat = app, chat

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Not a coroutine itself, as SecurityHeaders.__call__."""
        if self.chat.serving or scope["type"] not in ("http", "websocket"):
            return self.app(scope, receive, send)
        return self.refuse(scope, receive, send)

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path == "/healthz" or path.startswith("/static/"):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            websocket = WebSocket(scope, receive, send)
            await websocket.accept()
            await websocket.close(CLOSE_TRY_LATER)
        else:
            await error_response(503, "unavailable", "ChatX is starting: its database or broadcast cannot be "
                                 "reached yet; try again shortly.", 1)(scope, receive, send)


def undo_server_proxy_headers(scope: Scope) -> None:
    """Put back the connection's own peer and scheme: uvicorn believes
    X-Forwarded-For and -Proto from its --forwarded-allow-ips (127.0.0.1
    unless started with --no-proxy-headers), and ChatX believes only the
    proxies of CHATX_TRUSTED_PROXIES."""
    transport = transport_of(scope)
    if transport is None:
        return
    peer = transport.get_extra_info("peername")  # kept by the transport: no system call
    client = (str(peer[0]), int(peer[1])) if isinstance(peer, (list, tuple)) and len(peer) >= 2 else None
    if scope.get("client") != client:  # else uvicorn's equal one stays, rather than a copy for the socket's life
        scope["client"] = client
    secure = is_ssl(transport)
    if scope["type"] == "http":
        scope["scheme"] = "https" if secure else "http"
    else:
        scope["scheme"] = "wss" if secure else "ws"


def sliced(send: Send) -> Send:
    """Response bodies go out RESPONSE_SLICE_BYTES at a time: the server waits
    for a client to take one before it writes the next, so a client that does
    not read holds a slice, not the whole body (HTTPProtocol cuts it off)."""
    async def send_sliced(message: Message) -> None:
        body = message.get("body", b"")
        if message["type"] != "http.response.body" or len(body) <= RESPONSE_SLICE_BYTES:
            return await send(message)
        more = message.get("more_body", False)
        for start in range(0, len(body), RESPONSE_SLICE_BYTES):
            end = start + RESPONSE_SLICE_BYTES
            await send({"type": "http.response.body", "body": body[start:end], "more_body": more or end < len(body)})

    return send_sliced


class ChatXApp(Starlette):
    """Starlette with ChatX's outermost layers, which see every response, 500s
    included (user middleware sits inside Starlette's error handler): the
    connection's own peer and scheme, sliced response bodies, the security
    headers, and with CHATX_TRUSTED_PROXIES uvicorn's proxy-headers
    middleware, which makes the scheme and client address the proxy's."""

    def build_middleware_stack(self) -> ASGIApp:
        app: ASGIApp = SecurityHeaders(super().build_middleware_stack())
        proxies = self.state.chat.settings.trusted_proxies
        if proxies:
            app = ProxyHeadersMiddleware(app, trusted_hosts=list(proxies))
        return app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope["chatx.server_send"] = send  # see abort_connection() and WebSocketEndpoint
            hide_token(scope)
            undo_server_proxy_headers(scope)
        if scope["type"] == "http":
            send = sliced(send)
        await super().__call__(scope, receive, send)


def hide_token(scope: Scope) -> None:
    """Move `token` from a handshake's query string to scope["chatx.token"]:
    uvicorn logs the handshake's path and query string from this scope."""
    query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    tokens = [value for name, value in query if name == "token"]
    if tokens:
        scope["chatx.token"] = tokens[-1]
        scope["query_string"] = urlencode([(name, value) for name, value in query if name != "token"]).encode()


def cors(settings: Settings) -> list[Middleware]:
    """With tokens, pages of CHATX_ALLOWED_ORIGINS may read the API's answers
    to their Bearer requests; never to requests with cookies."""
    if not (settings.jwt_secret and settings.allowed_origins):
        return []
    return [Middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                       allow_methods=["GET", "POST", "PUT", "DELETE"], allow_headers=["Authorization", "Content-Type"])]


OWN_ACCOUNTS = (login_page, register_page, register, login, logout, change_password, delete_me)


def create_app(authenticate: Authenticate | None = None, **settings: Any) -> Starlette:
    """A fresh ChatX ASGI app; keyword settings win over CHATX_* variables and
    `.env`. With `authenticate(connection)`, the host names who is signed in."""
    chat = ChatX(load_settings(**settings), authenticate)
    routes = [
        Route("/", chat_page, name="chat_page"),
        Route("/login", login_page, name="login_page"),
        Route("/register", register_page, name="register_page"),
        Route("/api/register", register, methods=["POST"]),
        Route("/api/login", login, methods=["POST"]),
        Route("/api/logout", logout, methods=["POST"]),
        Route("/api/password", change_password, methods=["POST"]),
        Route("/api/me", me, methods=["GET"]),
        Route("/api/me", delete_me, methods=["DELETE"]),
        Route("/api/conversations", conversation_list),
        Route("/api/users", directory),
        Route("/api/conversations/{username}/messages", conversation_messages),
        Route("/api/blocks", block_list),
        Route("/api/blocks/{username}", block, methods=["PUT", "DELETE"]),
        Route("/api/attachments", upload_attachment, methods=["POST"]),
        Route("/api/attachments/{id}", attachment_bytes),
        Route("/api/attachments/{id}/thumbnail", attachment_thumbnail_bytes),
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        Route("/api/openapi.json", openapi, include_in_schema=False),
        WebSocketRoute("/ws", WebSocketEndpoint()),
        Mount("/static", StaticFiles(directory=ASSETS / "static"), name="static"),
    ]
    if authenticate is not None:
        routes = [Route(route.path, not_found, methods=route.methods, include_in_schema=False)
                  if isinstance(route, Route) and route.endpoint in OWN_ACCOUNTS else route for route in routes]
    app = ChatXApp(
        routes=routes,
        lifespan=chat.lifespan,
        exception_handlers={ApiError: api_error, Busy: api_error, TooManyAttempts: api_error, Unavailable: api_error,
                            HTTPException: http_error, Exception: server_error},
        middleware=[Middleware(TrustedHosts, allowed_hosts=list(chat.settings.allowed_hosts),
                               monitors=chat.settings.metrics_allow), *cors(chat.settings),
                    Middleware(Starting, chat=chat)],
    )
    app.state.chat = chat
    return app


app = create_app()


# ---- command line: python -m chatx ----------------------------------------------------

SERVE_OPTIONS = {"ws_max_size": FRAME_MAX_BYTES, "ws_per_message_deflate": False, "http": "chatx:HTTPProtocol",
                 "timeout_keep_alive": 5, "timeout_graceful_shutdown": 10, "proxy_headers": False}


def read_password(prompt: str) -> str:
    """From the terminal, or the first line of standard input when it is not one."""
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    return sys.stdin.readline().rstrip("\n")


class CommandError(Exception):
    pass


@asynccontextmanager
async def accounts_of(settings: Settings) -> AsyncIterator[Accounts]:
    """The accounts of the database the settings name, and its broadcast, so
    that running servers hear of ended sessions."""
    chat = ChatX(settings)
    async with AsyncExitStack() as started:
        await chat.storage.start(migrate)
        started.push_async_callback(chat.storage.stop)
        await chat.accounts.start()
        started.push_async_callback(chat.accounts.stop)
        await chat.fanout.start("chatx:" + hashlib.sha256(chat.accounts.secret.encode()).hexdigest()[:16])
        started.push_async_callback(chat.fanout.stop)
        yield chat.accounts


async def existing_user(accounts: Accounts, username: str) -> User:
    user = await accounts.find_user(username)
    if user is None:
        raise CommandError(f"there is no user {username!r}")
    return user


async def create_user_command(settings: Settings, username: str) -> str:
    if problem := username_problem(username):
        raise CommandError(problem)
    password = read_password(f"Password for {username}: ")
    if problem := password_problem(password):
        raise CommandError(problem)
    async with accounts_of(settings) as accounts:
        user = await accounts.storage.write(insert_user, username, await asyncio.to_thread(hash_password, password),
                                            now_ms())
    if user is None:
        raise CommandError(f"the username {username!r}, or one that looks like it, is taken")
    return f"created {user.username} (id {user.id})"


async def set_password_command(settings: Settings, username: str) -> str:
    password = read_password(f"New password for {username}: ")
    if problem := password_problem(password):
        raise CommandError(problem)
    async with accounts_of(settings) as accounts:
        user = await existing_user(accounts, username)
        await accounts.storage.write(set_password, user.id, await asyncio.to_thread(hash_password, password), None)
        accounts.fanout.deliver(user.id, Revoke(None))
    return f"set the password of {user.username}; every session of theirs has ended"


async def delete_user_command(settings: Settings, username: str) -> str:
    async with accounts_of(settings) as accounts:
        user = await existing_user(accounts, username)
        await accounts.delete(user)
    return f"deleted {user.username} and every message they sent or received"


async def stats_command(settings: Settings) -> str:
    storage = Storage(settings.database_url)
    await storage.start(migrate)
    try:
        figures = await storage.read(database_figures)
    finally:
        await storage.stop()
    return "\n".join(f"{name}: {value}" for name, value in figures.items())


def backup_command(settings: Settings, path: str) -> str:
    """SQLite's online backup: a consistent copy while servers keep writing."""
    url = urlsplit(settings.database_url)
    if url.scheme.startswith("postgresql"):
        raise CommandError(f"on PostgreSQL use its own tool: pg_dump --format=custom --file {path} "
                           f"'{redacted(settings.database_url)}' (the password from PGPASSWORD or ~/.pgpass)")
    source_path = Database(settings.database_url).url.database
    if not os.path.isfile(source_path):
        raise CommandError(f"there is no database at {source_path}")
    if os.path.exists(path):
        raise CommandError(f"{path} exists already; name a new file")
    with sqlite3.connect(source_path) as source, sqlite3.connect(path) as target:
        source.backup(target)
    return f"backed up {source_path} to {path}"


def serving_problem(settings: Settings, host: str) -> str | None:
    """What is unsafe about serving these settings on `host`: with any Host
    allowed, a page on another site that rebinds its DNS name to this server
    passes the Origin check, which compares the Origin with the Host."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if "*" not in settings.allowed_hosts or loopback:
        return None
    return (f"CHATX_ALLOWED_HOSTS is '*' while serving on {host}: any Host header is served, and a site that "
            "rebinds its DNS name to this server passes the Origin check. Set CHATX_ALLOWED_HOSTS to the host "
            "names people use (docs/deploy.md).")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m chatx", description="Run and administer a ChatX server.")
    parser.add_argument("--database-url", help="overrides CHATX_DATABASE_URL")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve ChatX with uvicorn, as `make run` does")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--ws-ping-interval", type=float, default=20.0, help="seconds between protocol pings")
    serve.add_argument("--ws-ping-timeout", type=float, default=20.0,
                       help="seconds a ping may go unanswered (ChatX closes the socket with 1013 at half of it)")
    for name, text in (("create-user", "make an account (the password is read from the terminal or stdin)"),
                       ("set-password", "set a password (read likewise); every session of the user ends"),
                       ("delete-user", "delete an account and every message it sent or received")):
        commands.add_parser(name, help=text).add_argument("username")
    commands.add_parser("backup", help="copy the SQLite database while it is in use").add_argument("path")
    commands.add_parser("stats", help="count users, messages, sessions and sockets")
    args = parser.parse_args(argv)
    if args.command == "serve":  # ChatX's lifespan sets up its own log lines (configure_logging)
        import uvicorn

        if problem := serving_problem(load_settings(), args.host):
            logger.warning(problem)
        uvicorn.run("chatx:app", host=args.host, port=args.port, workers=args.workers,
                    ws_ping_interval=args.ws_ping_interval, ws_ping_timeout=args.ws_ping_timeout, **SERVE_OPTIONS)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(**({"database_url": args.database_url} if args.database_url else {}))
    try:
        if args.command == "backup":
            print(backup_command(settings, args.path))
            return 0
        command = {"create-user": create_user_command, "set-password": set_password_command,
                   "delete-user": delete_user_command}.get(args.command)
        result = asyncio.run(command(settings, args.username) if command else stats_command(settings))
    except CommandError as exc:
        print(f"chatx: {exc}", file=sys.stderr)
        return 1
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
