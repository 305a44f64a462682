"""Faults (issue 19): ChatX recovers from every outage on its own, never lets an
acknowledged message miss an open socket, and keeps /healthz truthful.

Each test starts its own services on free ports: its own Redis, its own
PostgreSQL cluster (initdb and pg_ctl as the user postgres), SQLite on a small
tmpfs, iptables rules on the test's own Redis port only. Each one runs two
ChatX processes (uvicorn, with the options of `make run`) under load: a sender
thread sends about 20 messages a second, each with a client_id, and sends it
again, with the same client_id, after an `unavailable` error, a missing ack or
a reconnect, the way a client does. Sockets of the same user are open on both
processes, read by threads of their own that reconnect with `since=` when
closed. Each test then checks (see `verify`):

- every acknowledged message was stored, as acknowledged (SQL on the database);
- every socket that stayed open received its user's stream, with every stored
  event, exactly once, in seq order, within a bound of seconds after the fault
  healed; a socket that was closed and reconnected with `since=` lost nothing;
- no socket was closed with 1011;
- ChatX serves again without a restart: /healthz is 200, a new socket replays
  the whole stream, a new send is acknowledged and delivered;
- /healthz was 503 while ChatX could not serve, where the issue asks.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import asyncpg
import httpx2 as httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

import chatx
from conftest import ChatServer, RedisServer, Remote, free_port, make_partners, remote_sign_up, run_async, \
    stalled_socket, wait_until

Frame = dict[str, Any]
STREAM_KINDS = ("message", "read", "edit", "delete")
PG_BIN = Path("/usr/lib/postgresql/15/bin")


# ---- processes ------------------------------------------------------------------------


class Server(ChatServer):
    """A ChatX process started the way `make run` starts it (conftest's), with what these tests read of it."""

    def answers(self) -> bool:
        """uvicorn accepts requests (whatever /healthz says)."""
        try:
            httpx.get(f"{self.base}/healthz", timeout=3)
            return True
        except httpx.HTTPError:
            return False

    def rss_kb(self) -> int:
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))


def as_postgres(*command: str | Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "postgres", "--", *map(str, command)], capture_output=True, text=True,
                          timeout=timeout)


class PostgresCluster:
    """A PostgreSQL 15 cluster of the test's own: initdb and pg_ctl as postgres,
    on a free port, its unix socket inside its data directory."""

    def __init__(self) -> None:
        # Outside pytest's tmp_path, whose directories only root may enter.
        self.root = Path(tempfile.mkdtemp(prefix="chatx-pg-"))
        self.data = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self.port = free_port()
        shutil.chown(self.root, "postgres", "postgres")
        done = as_postgres(PG_BIN / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync",
                           "-E", "UTF8")
        assert done.returncode == 0, done.stderr
        with open(self.data / "postgresql.conf", "a") as conf:
            # fsync off: a process killed outright loses nothing that was
            # committed (the log is in the kernel's cache); only a host crash would.
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.data}'\nfsync = off\nmax_connections = 100\n")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def pg_ctl(self, *args: str, timeout: float = 60) -> None:
        done = as_postgres(PG_BIN / "pg_ctl", *args, "-D", self.data, "-l", self.logfile, "-w", "-t", "30",
                           timeout=timeout)
        assert done.returncode == 0, f"pg_ctl {' '.join(args)}: {done.stdout}{done.stderr}"

    def start(self) -> None:
        self.pg_ctl("start")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("stop", "-m", mode)

    def restart(self, mode: str) -> None:
        self.pg_ctl("restart", "-m", mode)

    def destroy(self) -> None:
        as_postgres(PG_BIN / "pg_ctl", "stop", "-D", self.data, "-m", "immediate", timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


class Database:
    """Direct SQL on the test's database: what was stored, whatever ChatX says."""

    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, sql: str, *args: Any) -> list[tuple]:
        if self.url.startswith("sqlite"):
            with sqlite3.connect(self.url.removeprefix("sqlite:///"), timeout=10) as connection:
                return [tuple(row) for row in connection.execute(sql, args).fetchall()]

        async def fetch() -> list[tuple]:
            connection = await asyncpg.connect(self.url, timeout=10)
            try:
                return [tuple(row) for row in await connection.fetch(chatx.postgres_marks(sql), *args)]
            finally:
                await connection.close()

        return run_async(fetch)

    def messages_by_client_id(self, sender_id: int) -> dict[str, tuple]:
        rows = self.query("SELECT client_id, id, body, recipient_id FROM chatx_messages WHERE sender_id = ?",
                          sender_id)
        stored: dict[str, tuple] = {}
        for client_id, message_id, body, recipient_id in rows:
            if client_id is None:  # make_partners' first message
                continue
            assert client_id not in stored, f"client_id {client_id} stored twice"
            stored[client_id] = (message_id, body, recipient_id)
        return stored

    def newest_seq(self, user_id: int) -> int:
        return int(self.query("SELECT seq FROM chatx_users WHERE id = ?", user_id)[0][0])

    def message_ids_of(self, user_id: int) -> set[int]:
        rows = self.query("SELECT id FROM chatx_messages WHERE sender_id = ? OR recipient_id = ?", user_id, user_id)
        return {row[0] for row in rows}


# ---- clients --------------------------------------------------------------------------


def open_socket(person: Remote, server: ChatServer, since: int | None = None) -> ClientConnection:
    query = "" if since is None else f"?since={since}"
    return connect(f"{server.ws_base}/ws{query}", additional_headers=person.headers(), open_timeout=5,
                   close_timeout=2, max_size=2**22, legacy=True)


def first_frame(ws: ClientConnection, timeout: float = 10) -> Frame:
    frame = json.loads(ws.recv(timeout=timeout))
    assert frame["type"] == "hello", frame
    return frame


def close_code_of(closed: ConnectionClosed) -> int:
    return 1006 if closed.rcvd is None else closed.rcvd.code


@dataclass
class Connection:
    opened_at: float
    start_seq: int  # the seq the stream resumes after
    seqs: list[int] = field(default_factory=list)
    closed_at: float | None = None
    code: int | None = None  # the server's close code; None: still open, or closed by the test


class Receiver(threading.Thread):
    """One client's sockets of a user on one server, read all the time. A
    socket the server closes is reopened with `since=` its newest seq, as
    docs/protocol.md tells clients to (Close codes)."""

    def __init__(self, person: Remote, server: ChatServer, name: str, reconnect: bool = True) -> None:
        super().__init__(name=name, daemon=True)
        self.person, self.server, self.label, self.reconnect = person, server, name, reconnect
        self.seq = 0
        self.connections: list[Connection] = []
        self.stream: list[tuple[float, Frame]] = []  # every stream frame, with when it came
        self.presence: list[tuple[float, Frame]] = []
        self.other: list[Frame] = []
        self.refusals: list[str] = []  # failed (re)connects, and why
        self.ws: ClientConnection | None = None
        self.opened = threading.Event()
        self._halt = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                ws = open_socket(self.person, self.server, since=self.seq)
                first_frame(ws)
            except ConnectionClosed as closed:
                self.refusals.append(f"closed {close_code_of(closed)} before hello")
                time.sleep(0.5)
                continue
            except InvalidStatus as refused:
                self.refusals.append(f"HTTP {refused.response.status_code}")
                time.sleep(0.5)
                continue
            except (OSError, TimeoutError) as exc:
                self.refusals.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.5)
                continue
            self.ws = ws
            connection = Connection(time.monotonic(), self.seq)
            self.connections.append(connection)
            self.opened.set()
            try:
                while not self._halt.is_set():
                    try:
                        frame = json.loads(ws.recv(timeout=0.2))
                    except TimeoutError:
                        continue
                    self.record(connection, frame)
            except ConnectionClosed as closed:
                if not self._halt.is_set():
                    connection.code = close_code_of(closed)
            finally:
                connection.closed_at = time.monotonic()
                ws.close()
            if not self.reconnect:
                return
            time.sleep(0.2)

    def record(self, connection: Connection, frame: Frame) -> None:
        now = time.monotonic()
        with self.lock:
            if frame["type"] in STREAM_KINDS:
                connection.seqs.append(frame["seq"])
                self.seq = max(self.seq, frame["seq"])
                self.stream.append((now, frame))
            elif frame["type"] == "presence":
                self.presence.append((now, frame))
            else:
                self.other.append(frame)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    @property
    def stayed_open(self) -> bool:
        return len(self.connections) == 1 and self.connections[0].code is None

    def received(self) -> dict[int, list[float]]:
        """message id -> when each copy of its message frame came."""
        with self.lock:
            seen: dict[int, list[float]] = {}
            for at, frame in self.stream:
                if frame["type"] == "message":
                    seen.setdefault(frame["message"]["id"], []).append(at)
            return seen

    def stream_problems(self) -> list[str]:
        """Each connection resumes right after the seq it asked for, and goes
        on one by one: no gap, no repeat, no disorder."""
        problems = []
        with self.lock:
            connections = [(c.start_seq, list(c.seqs)) for c in self.connections]
        for number, (start_seq, seqs) in enumerate(connections):
            expected = list(range(start_seq + 1, start_seq + 1 + len(seqs)))
            if seqs != expected:
                first_bad = next(i for i, (a, b) in enumerate(zip(seqs, expected)) if a != b)
                problems.append(f"{self.label} connection {number} (since={start_seq}): seqs "
                                f"{seqs[max(first_bad - 3, 0):first_bad + 5]} around position "
                                f"{first_bad}, expected {expected[max(first_bad - 3, 0):first_bad + 5]}")
        return problems

    def close_codes(self) -> list[int | None]:
        return [c.code for c in self.connections]


@dataclass
class Pending:
    to: str
    body: str
    due: float  # when to send (again)
    attempts: int = 0
    first_sent: float | None = None


class Sender(threading.Thread):
    """A client sending about `rate` messages a second from one socket, each
    with a client_id, and sending one again with the same client_id after an
    `unavailable` error, an ack missing for `ack_timeout` s, or a reconnect.
    It reconnects to the next of `servers` when its socket closes."""

    def __init__(self, person: Remote, servers: list[ChatServer], recipients: list[str], rate: float = 20,
                 body_size: int = 40, prefix: str = "m", ack_timeout: float = 5.0, max_pending: int = 200,
                 ready: Callable[[str], bool] | None = None) -> None:
        super().__init__(name=f"sender-{person.username}", daemon=True)
        self.person, self.servers, self.recipients = person, servers, recipients
        self.rate, self.body_size, self.prefix = rate, body_size, prefix
        self.ack_timeout, self.max_pending, self.ready = ack_timeout, max_pending, ready
        self.server_index = 0
        self.pending: dict[str, Pending] = {}
        self.acked: dict[str, tuple[float, Frame]] = {}  # client_id -> when, the acked message
        self.unavailable: list[tuple[float, str]] = []
        self.errors: list[Frame] = []  # error frames other than unavailable
        self.closes: list[tuple[float, int]] = []
        self.refusals: list[str] = []
        self.producing = True
        self.hold = threading.Event()  # set: do not reconnect
        self.burst_requested = 0
        self.burst_sent = threading.Event()
        self.count = 0
        self.turn = 0
        self.lock = threading.Lock()
        self._halt = threading.Event()
        self.ws: ClientConnection | None = None

    # -- control from the test

    def burst(self, count: int) -> None:
        with self.lock:
            self.burst_sent.clear()
            self.burst_requested += count

    def stop_producing(self) -> None:
        self.producing = False

    def finish(self, timeout: float = 40) -> None:
        """Stop making new messages; wait until every one made is acknowledged."""
        self.producing = False
        wait_until(lambda: not self.pending, timeout=timeout, interval=0.1,
                   what=f"every message of {self.person.username} to be acknowledged "
                        f"({len(self.pending)} pending: {sorted(self.pending)[:10]})")
        self.stop()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        if self.ws is not None:
            self.ws.close()

    # -- the client

    def new_message(self, now: float) -> None:
        to = self.recipients[self.turn % len(self.recipients)]
        if self.ready is not None:
            for _ in range(len(self.recipients)):
                if self.ready(to):
                    break
                self.turn += 1
                to = self.recipients[self.turn % len(self.recipients)]
            else:
                return
        self.turn += 1
        self.count += 1
        client_id = f"{self.prefix}-{self.count}"
        body = f"{client_id} " + "x" * max(self.body_size - len(client_id) - 1, 0)
        with self.lock:
            self.pending[client_id] = Pending(to, body, now)

    def connect(self) -> bool:
        server = self.servers[self.server_index % len(self.servers)]
        try:
            ws = open_socket(self.person, server)
            first_frame(ws)
        except (WebSocketException, OSError, TimeoutError) as exc:  # a process shutting down may answer anything
            self.refusals.append(f"{server.port}: {type(exc).__name__}: {exc}")
            self.server_index += 1
            return False
        self.ws = ws
        now = time.monotonic()
        with self.lock:
            for pending in self.pending.values():
                pending.due = now  # what the old socket did not get acknowledged goes again
        return True

    def run(self) -> None:
        next_new = time.monotonic()
        while not self._halt.is_set():
            if self.ws is None:
                if self.hold.is_set() or not self.connect():
                    time.sleep(0.2)
                    continue
            now = time.monotonic()
            if self.burst_requested:
                with self.lock:
                    count, self.burst_requested = self.burst_requested, 0
                for _ in range(count):
                    self.new_message(now)
                self.send_due(now)
                self.burst_sent.set()
            if self.producing and now >= next_new and len(self.pending) < self.max_pending:
                self.new_message(now)
                next_new = max(next_new + 1 / self.rate, now - 0.5)
            self.send_due(now)
            if self.ws is None:  # the socket closed while sending: reconnect first
                continue
            wake = min([next_new] + [p.due for p in self.pending.values()])
            try:
                text = self.ws.recv(timeout=min(max(wake - time.monotonic(), 0.005), 0.1))
            except TimeoutError:
                continue
            except ConnectionClosed as closed:
                self.lost(close_code_of(closed))
                continue
            self.handle(json.loads(text))

    def send_due(self, now: float) -> None:
        if self.ws is None:  # it closed while sending: what is due goes again on the next socket
            return
        with self.lock:
            due = [(cid, p) for cid, p in self.pending.items() if p.due <= now]
        for client_id, pending in due:
            try:
                self.ws.send(json.dumps({"type": "send", "to": pending.to, "body": pending.body,
                                         "client_id": client_id}))
            except ConnectionClosed as closed:
                self.lost(close_code_of(closed))
                return
            pending.attempts += 1
            pending.first_sent = pending.first_sent or now
            pending.due = now + self.ack_timeout

    def lost(self, code: int) -> None:
        self.closes.append((time.monotonic(), code))
        if self.ws is not None:
            self.ws.close()
        self.ws = None

    def handle(self, frame: Frame) -> None:
        now = time.monotonic()
        if frame["type"] == "ack":
            with self.lock:
                self.pending.pop(frame["client_id"], None)
                first = frame["client_id"] not in self.acked
                if first:
                    self.acked[frame["client_id"]] = (now, frame["message"])
            if not first:
                assert self.acked[frame["client_id"]][1] == frame["message"], \
                    f"a second ack of {frame['client_id']} names another message"
        elif frame["type"] == "error":
            client_id = frame.get("client_id")
            if frame["code"] == "unavailable" and client_id in self.pending:
                self.unavailable.append((now, client_id))
                self.pending[client_id].due = now + 0.5  # the client's backoff
            else:
                self.errors.append(frame)


# ---- observers ------------------------------------------------------------------------


class HealthLog(threading.Thread):
    """/healthz of each server, every tenth of a second."""

    def __init__(self, servers: list[ChatServer]) -> None:
        super().__init__(name="healthz", daemon=True)
        self.servers = servers
        self.samples: list[tuple[float, int, int | None, dict]] = []  # when, port, status (None: no answer), checks
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for server in self.servers:
                if server.process is None or server.process.poll() is not None:
                    continue
                at = time.monotonic()
                try:
                    response = httpx.get(f"{server.base}/healthz", timeout=2)
                    self.samples.append((at, server.port, response.status_code, response.json().get("checks", {})))
                except (httpx.HTTPError, ValueError):
                    self.samples.append((at, server.port, None, {}))
            self._halt.wait(0.1)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def between(self, server: ChatServer, start: float, end: float) -> list[tuple[float, int | None, dict]]:
        return [(at, status, checks) for at, port, status, checks in self.samples
                if port == server.port and start <= at <= end]

    def failed(self, server: ChatServer, start: float, end: float, check: str) -> bool:
        return any(status == 503 and checks.get(check) == "fail"
                   for _, status, checks in self.between(server, start, end))


def tcp_state(sock: socket.socket) -> int:
    """The kernel's state of a TCP socket, without reading from it (1: established)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


TCP_ESTABLISHED = 1
CLOSED_1013 = 'chatx_sockets_closed_total{code="1013"}'


def server_side_state(server: ChatServer, client: socket.socket) -> str | None:
    """The state of the server's end of `client`'s connection, as `ss` shows it
    (None: no such socket any more). A server that aborts the transport closes
    its end; with data still unsent, the kernel then holds it in FIN-WAIT-1,
    owned by no process, and the client (which reads nothing) sees no FIN yet."""
    client_port = client.getsockname()[1]
    done = subprocess.run(["ss", "-Htan", f"( sport = :{server.port} and dport = :{client_port} )"],
                          capture_output=True, text=True, timeout=10)
    lines = done.stdout.split()
    return lines[0] if lines else None


def send_queue(server: ChatServer, client: socket.socket) -> int:
    """Bytes the server's kernel holds unsent for `client`."""
    client_port = client.getsockname()[1]
    done = subprocess.run(["ss", "-Htan", f"( sport = :{server.port} and dport = :{client_port} )"],
                          capture_output=True, text=True, timeout=10)
    fields = done.stdout.split()
    return int(fields[2]) if len(fields) > 2 else 0


def owns_connection(server: ChatServer, client: socket.socket) -> bool:
    """Whether the server process still holds its end of `client`'s connection open."""
    assert server.process is not None
    client_port = client.getsockname()[1]
    done = subprocess.run(["ss", "-Htanp", f"( sport = :{server.port} and dport = :{client_port} )"],
                          capture_output=True, text=True, timeout=10)
    return f"pid={server.process.pid}," in done.stdout


# ---- the checks -----------------------------------------------------------------------


def verify(db: Database, sender: Sender, receivers: list[Receiver], steady: list[Receiver], heal: float,
           bound: float, latency_from_ack: float | None = None) -> None:
    """The guarantees of issue 19, for one run (see the module's docstring)."""
    # Nothing acked without being stored, and stored as acked.
    sender_id = sender.person.id
    stored = db.messages_by_client_id(sender_id)
    for client_id, (_, message) in sender.acked.items():
        assert client_id in stored, f"{client_id} was acknowledged ({message}) but is not in the database"
        message_id, body, _ = stored[client_id]
        assert (message_id, body) == (message["id"], message["body"]), (client_id, stored[client_id], message)

    # Every receiver reaches its user's newest seq: every stored event, acked or not.
    people = {r.person.id for r in receivers}
    newest = {user_id: db.newest_seq(user_id) for user_id in people}
    deadline = max(heal + bound, time.monotonic() + 2)
    for receiver in receivers:
        try:
            wait_until(lambda: receiver.seq >= newest[receiver.person.id], timeout=max(deadline - time.monotonic(), 1),
                       interval=0.05, what=f"{receiver.label} to reach seq {newest[receiver.person.id]}")
        except AssertionError:
            pytest.fail(f"{receiver.label} is at seq {receiver.seq} of {newest[receiver.person.id]} {bound} s "
                        f"after the fault healed; closes {receiver.close_codes()}; "
                        f"problems {receiver.stream_problems()[:3]}")
    time.sleep(0.3)  # anything repeated late comes now

    problems = [p for r in receivers for p in r.stream_problems()]
    assert not problems, "\n".join(problems)
    for receiver in receivers:
        codes = receiver.close_codes()
        assert 1011 not in codes, f"{receiver.label} was closed with 1011: {codes}"
        seen = receiver.received()
        repeated = {m: len(t) for m, t in seen.items() if len(t) > 1}
        assert not repeated, f"{receiver.label} received messages more than once: {repeated}"
        expected = db.message_ids_of(receiver.person.id)
        assert set(seen) == expected, (f"{receiver.label}: missing {sorted(expected - set(seen))[:20]}, "
                                       f"unexpected {sorted(set(seen) - expected)[:20]}")

    # Sockets that stayed open got every acked message, within the bound.
    for receiver in steady:
        assert receiver.stayed_open, (f"{receiver.label} should have stayed open; closes {receiver.close_codes()}, "
                                      f"reconnect failures {receiver.refusals[:5]}")
        seen = receiver.received()
        late = []
        for client_id, (acked_at, message) in sender.acked.items():
            if receiver.person.username not in (message["from"], message["to"]):
                continue
            arrived = seen[message["id"]][0]
            allowed = max(acked_at, heal) + bound
            if latency_from_ack is not None:
                allowed = min(allowed, acked_at + latency_from_ack)
            if arrived > allowed:
                late.append((client_id, round(arrived - acked_at, 2)))
        assert not late, f"{receiver.label}: acked messages arrived late (client_id, s after the ack): {late[:20]}"
    assert not sender.errors, f"unexpected error frames: {sender.errors[:5]}"
    assert 1011 not in [code for _, code in sender.closes], f"the sender was closed with 1011: {sender.closes}"


def serves_again(db: Database, servers: list[ChatServer], sender: Remote, recipient: Remote,
                 steady: list[Receiver] = ()) -> None:
    """Without a restart: /healthz is 200, a fresh socket replays the whole
    stream from the database, and a new message is acked and delivered."""
    for server in servers:
        wait_until(lambda: server.health()[0] == 200, timeout=15, what=f"{server.base}/healthz to be 200 again")
    for number, server in enumerate(servers):
        newest = db.newest_seq(sender.id)
        with open_socket(sender, server, since=0) as ws:
            hello = first_frame(ws)
            assert hello["seq"] >= newest
            replayed = []
            while len(replayed) < hello["seq"]:
                frame = json.loads(ws.recv(timeout=10))
                if frame["type"] in STREAM_KINDS:
                    replayed.append(frame["seq"])
            assert replayed == list(range(1, hello["seq"] + 1))
            client_id = f"again-{server.port}-{number}"
            ws.send(json.dumps({"type": "send", "to": recipient.username, "body": "after the fault",
                                "client_id": client_id}))
            deadline = time.monotonic() + 10
            while True:
                frame = json.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
                if frame["type"] == "ack":
                    assert frame["client_id"] == client_id
                    message = frame["message"]
                    break
                assert frame["type"] != "error", frame
        stored = db.messages_by_client_id(sender.id)[client_id]
        assert stored[0] == message["id"]
        for receiver in steady:
            wait_until(lambda: message["id"] in receiver.received(), timeout=10,
                       what=f"{receiver.label} to receive a message sent after the fault")


# ---- the services of one test ----------------------------------------------------------


class Services:
    """Everything one test starts, stopped in reverse order whatever happens."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.stack = ExitStack()
        self.servers: list[Server] = []
        self.threads: list[Any] = []

    def redis(self) -> RedisServer:
        redis = RedisServer(self.tmp_path)
        redis.start()
        self.stack.callback(redis.stop)
        return redis

    def postgres(self) -> PostgresCluster:
        cluster = PostgresCluster()
        self.stack.callback(cluster.destroy)
        cluster.start()
        return cluster

    def chatx(self, count: int, database_url: str, redis: RedisServer, healthy: bool = True,
              **env: str) -> list[Server]:
        """`count` ChatX processes; with `healthy`, each answering /healthz 200 before the next starts."""
        settings = {"CHATX_DATABASE_URL": database_url, "CHATX_BROADCAST_URL": redis.url,
                    "CHATX_SEND_RATE": "100000", "CHATX_SEND_BURST": "100000", "CHATX_PRESENCE_GRACE": "0",
                    "CHATX_PRESENCE_TTL": "4", "CHATX_MAX_SOCKETS_PER_USER": "100", **env}
        started = []
        for _ in range(count):
            server = Server(settings, self.tmp_path)
            self.stack.callback(server.stop, signal.SIGKILL)
            if healthy:
                server.start()
            else:
                server.launch()
                wait_until(server.answers, timeout=30, what=f"uvicorn on port {server.port} (log: {server.log})")
            started.append(server)
        self.servers += started
        return started

    def thread(self, thread: Any) -> Any:
        self.threads.append(thread)
        self.stack.callback(thread.stop)
        thread.start()
        return thread

    def close(self) -> None:
        self.stack.close()


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    started = Services(tmp_path)
    try:
        yield started
    finally:
        started.close()


def people(server: ChatServer, *names: str) -> list[Remote]:
    return [remote_sign_up(server, name) for name in names]


def open_receivers(services: Services, specs: list[tuple[Remote, ChatServer, str]]) -> list[Receiver]:
    receivers = [services.thread(Receiver(person, server, label)) for person, server, label in specs]
    for receiver in receivers:
        assert receiver.opened.wait(10), f"{receiver.label} did not open: {receiver.refusals}"
    return receivers


def log_tail(server: ChatServer, lines: int = 30) -> str:
    return "\n".join(server.log.read_text(errors="replace").splitlines()[-lines:])


# ---- 1. PostgreSQL restarts -----------------------------------------------------------


@pytest.mark.timeout(150)
@pytest.mark.parametrize("outage", ["restart-fast", "restart-immediate", "stop-10s"])
def test_a_postgresql_restart_is_recovered_without_restarting_chatx(services: Services, outage: str):
    cluster = services.postgres()
    redis = services.redis()
    a, b = services.chatx(2, cluster.url, redis)
    db = Database(cluster.url)
    alice, bob = people(a, "alice", "bob")
    make_partners(alice, bob, server=a)
    receivers = open_receivers(services, [(bob, a, "bob@A"), (bob, b, "bob@B"), (alice, b, "alice@B")])
    health = services.thread(HealthLog([a, b]))
    sender = services.thread(Sender(alice, [a, b], ["bob"]))
    time.sleep(2)

    started = time.monotonic()
    refused: list[str] = []
    if outage == "stop-10s":
        cluster.stop("fast")
        time.sleep(4)
        for server in (a, b):  # a socket opened during the outage is refused cleanly
            try:
                with open_socket(bob, server) as ws:
                    frame = json.loads(ws.recv(timeout=10))
                    refused.append(f"got {frame['type']}")
            except InvalidStatus as exc:
                refused.append(f"HTTP {exc.response.status_code}")
            except ConnectionClosed as closed:
                refused.append(f"close {close_code_of(closed)}")
        time.sleep(6)
        cluster.start()
    else:
        cluster.restart(outage.removeprefix("restart-"))
    healed = time.monotonic()
    time.sleep(4)  # load goes on
    try:
        sender.finish(timeout=30)
    except AssertionError:
        raise AssertionError(f"sends are not acknowledged again after the database came back; "
                             f"log of A:\n{log_tail(a)}") from None
    health.stop()

    verify(db, sender, receivers, steady=[], heal=healed, bound=10)
    for receiver in receivers:  # a socket the outage closed was closed with 1013, and reconnected
        assert all(code in (None, 1013) for code in receiver.close_codes()), (receiver.label, receiver.close_codes())
    if outage == "stop-10s":
        assert all(r in ("HTTP 503", "close 1013") for r in refused), \
            f"sockets opened during the outage should get 503 or 1013: {refused}"
        for server in (a, b):
            assert health.failed(server, started + 1, healed, "database"), \
                f"{server.base}/healthz never said the database failed while PostgreSQL was stopped: " \
                f"{health.between(server, started, healed)}"
        assert sender.unavailable, "no send got `unavailable` while PostgreSQL was stopped"
    serves_again(db, [a, b], alice, bob, steady=[])
    print(f"{outage}: {len(sender.acked)} acked, {len(sender.unavailable)} unavailable, "
          f"receiver closes {[r.close_codes() for r in receivers]}")


# ---- 2. the unsubscribe race ----------------------------------------------------------


@pytest.mark.timeout(120)
def test_an_acked_message_reaches_the_open_socket_elsewhere_while_the_last_local_socket_closes(services: Services):
    """alice sends on A to bob0..bob3, whose sockets on A open and close all
    the time; each keeps one socket open on B. A message's publish must not be
    skipped because A's UNSUBSCRIBE reached Redis first. The heartbeat
    backstop (TTL/4) is 15 s here, so a skipped publish shows as a message
    late by seconds: each message to a bob is sent only once his steady socket
    has the previous one, so no later message reveals the gap."""
    redis = services.redis()
    tmp = services.tmp_path
    url = f"sqlite:///{tmp / 'chat.db'}"
    a, b = services.chatx(2, url, redis, CHATX_PRESENCE_TTL="60", CHATX_PRESENCE_GRACE="5")
    db = Database(url)
    alice, *bobs = people(a, "alice", "bob0", "bob1", "bob2", "bob3")
    for bob in bobs:
        make_partners(alice, bob, server=a)
    steady = open_receivers(services, [(bob, b, f"{bob.username}@B") for bob in bobs]
                            + [(alice, b, "alice@B")])
    by_name = {r.person.username: r for r in steady}

    churned = {bob.username: 0 for bob in bobs}
    stop_churn = threading.Event()

    def churn(bob: Remote) -> None:
        while not stop_churn.is_set():
            try:
                with open_socket(bob, a) as ws:
                    first_frame(ws)
                    time.sleep(0.002 * (churned[bob.username] % 10))
                churned[bob.username] += 1
            except (WebSocketException, OSError, TimeoutError):
                time.sleep(0.05)

    churners = [threading.Thread(target=churn, args=(bob,), daemon=True) for bob in bobs]
    for thread in churners:
        thread.start()

    sender: Sender

    def ready(to: str) -> bool:
        """The previous message to `to` reached his steady socket (or is 4 s late: the checks report it)."""
        if any(p.to == to for p in sender.pending.values()):
            return False
        mine = [(at, m) for at, m in sender.acked.values() if m["to"] == to]
        if not mine:
            return True
        acked_at, last = max(mine, key=lambda item: item[1]["id"])
        return last["id"] in by_name[to].received() or time.monotonic() - acked_at > 4

    sender = services.thread(Sender(alice, [a], [bob.username for bob in bobs], rate=40, ready=ready))
    time.sleep(15)
    sender.finish(timeout=20)
    stop_churn.set()
    for thread in churners:
        thread.join(timeout=10)
    healed = time.monotonic()
    print(f"race: {len(sender.acked)} acked, sockets opened and closed on A: {churned}")
    assert min(churned.values()) > 20, f"too little churn to race: {churned}"
    verify(db, sender, steady, steady=steady, heal=healed, bound=15, latency_from_ack=3)


# ---- 3. a Redis partition -------------------------------------------------------------


def iptables(*args: str) -> None:
    done = subprocess.run(["iptables", "-w", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"iptables {' '.join(args)}: {done.stderr}"


def iptables_usable() -> bool:
    try:
        return subprocess.run(["iptables", "-w", "-L", "-n"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextmanager
def dropped(port: int) -> Iterator[None]:
    """Packets to and from `port` dropped (not refused), with iptables."""
    rules = [("INPUT", "--dport"), ("OUTPUT", "--sport")]
    added = []
    try:
        for chain, port_option in rules:
            iptables("-A", chain, "-p", "tcp", port_option, str(port), "-j", "DROP")
            added.append((chain, port_option))
        yield
    finally:
        for chain, port_option in added:
            iptables("-D", chain, "-p", "tcp", port_option, str(port), "-j", "DROP")


@contextmanager
def partitioned(redis: RedisServer) -> Iterator[str]:
    """Packets to and from the test's own Redis port dropped (not refused);
    without iptables, the redis-server stopped with SIGSTOP instead."""
    if iptables_usable():
        with dropped(redis.port):
            yield "iptables"
    else:
        assert redis.process is not None
        redis.process.send_signal(signal.SIGSTOP)
        try:
            yield "SIGSTOP"
        finally:
            redis.process.send_signal(signal.SIGCONT)


NOTICED_S = 4.5  # into a partition, by when the silence must have been noticed


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seconds", [5, 10, 20])
def test_a_redis_partition_loses_no_live_delivery(services: Services, seconds: int):
    redis = services.redis()
    url = f"sqlite:///{services.tmp_path / 'chat.db'}"
    a, b = services.chatx(2, url, redis)
    db = Database(url)
    alice, bob = people(a, "alice", "bob")
    make_partners(alice, bob, server=a)
    receivers = open_receivers(services, [(bob, a, "bob@A"), (bob, b, "bob@B"), (alice, b, "alice@B")])
    health = services.thread(HealthLog([a, b]))
    sender = services.thread(Sender(alice, [a], ["bob"]))
    time.sleep(2)
    started = time.monotonic()
    with partitioned(redis) as how:
        time.sleep(seconds)
        healing = time.monotonic()  # the rules go now: a /healthz answered from here on may be ok again
    healed = time.monotonic()
    time.sleep(3)
    sender.finish(timeout=20)
    health.stop()
    print(f"partition of {seconds} s by {how}: {len(sender.acked)} acked")
    verify(db, sender, receivers, steady=receivers, heal=healed, bound=10)
    serves_again(db, [a, b], alice, bob, steady=[receivers[1], receivers[2]])
    # Packets dropped: the keepalive notices a silent Redis after 3 s (a ping
    # after 1 s of silence): from then until the partition heals, /healthz says fail.
    for server in (a, b):
        samples = health.between(server, started + NOTICED_S, healing - 0.2)
        lies = [(round(at - started, 2), status, checks) for at, status, checks in samples
                if status != 503 or checks.get("broadcast") != "fail"]
        assert samples and not lies, (f"{server.base}/healthz during a {seconds} s partition, from "
                                      f"{NOTICED_S} s in (s into the partition, status, checks): {lies[:8]}")


# ---- 4. the sending process dies between commit and publish ----------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_messages_stored_by_a_process_that_died_reach_open_sockets_within_a_heartbeat(services: Services, sig):
    redis = services.redis()
    url = f"sqlite:///{services.tmp_path / 'chat.db'}"
    a, b = services.chatx(2, url, redis)  # presence TTL 4 s: a heartbeat (and stream check) every second
    db = Database(url)
    alice, bob = people(a, "alice", "bob")
    make_partners(alice, bob, server=a)
    steady = open_receivers(services, [(bob, b, "bob@B"), (alice, b, "alice@B")])
    doomed = open_receivers(services, [(bob, a, "bob@A")])
    for receiver in doomed:
        receiver.reconnect = False
    sender = services.thread(Sender(alice, [a, b], ["bob"], max_pending=1000))
    time.sleep(2)

    sender.hold.set()  # it reconnects (to B) only once the backstop has been seen at work
    acked = len(sender.acked)
    sender.burst(400)  # many sends in flight when the process dies
    assert sender.burst_sent.wait(10)
    # The first of them acknowledged: the writer is committing the rest.
    wait_until(lambda: len(sender.acked) > acked, timeout=10, interval=0.001, what="the burst's first ack")
    assert a.process is not None
    a.process.send_signal(sig)
    a.process.wait(timeout=30)
    died = time.monotonic()
    acked_before = set(sender.acked)
    stored = db.messages_by_client_id(alice.id)
    unacked_stored = sorted(set(stored) - acked_before)
    # Within one heartbeat (1 s), and before any new message could reveal the gap.
    for receiver in steady:
        target = db.newest_seq(receiver.person.id)
        try:
            wait_until(lambda: receiver.seq >= target, timeout=3, what=f"{receiver.label} to reach seq {target}")
        except AssertionError:
            pytest.fail(f"{receiver.label} is at seq {receiver.seq} of {target} 3 s after A died; "
                        f"{len(unacked_stored)} messages were stored but not acked: {unacked_stored[:10]}")
    print(f"{sig.name}: died {round(time.monotonic() - died, 2)} s ago; "
          f"{len(unacked_stored)} stored but not acked when it died")

    sender.hold.clear()
    time.sleep(3)
    sender.finish(timeout=30)
    healed = died
    verify(db, sender, steady, steady=steady, heal=healed, bound=15)
    serves_again(db, [b], alice, bob, steady=steady)


# ---- 5. a stuck reader ----------------------------------------------------------------


@pytest.mark.timeout(150)
def test_a_stuck_reader_is_cut_off_memory_stays_bounded_and_sigterm_finishes(services: Services):
    redis = services.redis()
    url = f"sqlite:///{services.tmp_path / 'chat.db'}"
    a, b = services.chatx(2, url, redis, CHATX_METRICS="1")
    assert chatx.SERVE_OPTIONS.get("timeout_graceful_shutdown"), "`make run` sets no graceful shutdown timeout"
    db = Database(url)
    bob, carol, dave = people(a, "bob", "carol", "dave")
    make_partners(bob, carol, server=a)
    make_partners(bob, dave, server=a)
    readers = open_receivers(services, [(carol, b, "carol@B")])
    stuck = stalled_socket(a, carol.cookie)
    rss_before = a.rss_kb()
    rss_peak = rss_before

    flooder = services.thread(Sender(bob, [a], ["carol"], rate=400, body_size=4000, max_pending=300,
                                     ack_timeout=20, prefix="flood"))
    started = time.monotonic()
    cut_at = closed_at = None
    while time.monotonic() - started < 60:
        rss_peak = max(rss_peak, a.rss_kb())
        # The connection first, then the count: ChatX counts a close right after
        # its abort, and the kernel lets go of the socket a loop turn later.
        owned = owns_connection(a, stuck)
        if cut_at is None and a.metric(CLOSED_1013) >= 1:
            cut_at = time.monotonic()
            flooder.stop_producing()
        if not owned:
            closed_at = time.monotonic()
            break
        if cut_at is not None and time.monotonic() - cut_at > 15:
            break
        time.sleep(0.2)
    flooder.stop_producing()
    sent = flooder.count
    state = server_side_state(a, stuck)
    assert cut_at is not None, f"the stuck reader was not closed with 1013 after {sent} messages of 4 kB in 60 s"
    assert closed_at is not None, (f"A still holds the stuck reader's connection ({state}) "
                                   f"{time.monotonic() - cut_at:.0f} s after closing it with 1013")
    print(f"stuck reader: 1013 after {round(cut_at - started, 1)} s and {sent} messages, connection closed "
          f"{round(closed_at - cut_at, 1)} s later (the server's end now: {state}, client's TCP state "
          f"{tcp_state(stuck)}); RSS {rss_before // 1024} MB -> peak {rss_peak // 1024} MB")
    assert rss_peak - rss_before < 200 * 1024, f"A's memory grew by {(rss_peak - rss_before) // 1024} MB"
    flooder.finish(timeout=60)
    verify(db, flooder, readers, steady=readers, heal=time.monotonic(), bound=20)
    stuck.close()

    # SIGTERM while a stuck reader is connected: dave's socket, its buffers
    # full (the kernel's send queue no longer grows), yet not cut off.
    still = stalled_socket(a, dave.cookie)
    flood = services.thread(Sender(bob, [a], ["dave"], rate=0.01, body_size=4000, max_pending=5000,
                                   ack_timeout=30, prefix="dave"))
    queued: list[int] = []
    for _ in range(30):
        flood.burst(50)
        wait_until(lambda: not flood.pending, timeout=30, what="50 messages to dave to be acknowledged")
        time.sleep(0.3)
        queued.append(send_queue(a, still))
        if len(queued) >= 3 and queued[-1] == queued[-2] == queued[-3] > 0:
            break
    flood.burst(300)  # these wait in ChatX and uvicorn, behind a full kernel buffer
    flood.finish(timeout=30)
    print(f"dave: {flood.count} messages; the server's send queue grew {queued}")
    assert owns_connection(a, still), "dave's stuck socket was cut before the shutdown"
    assert a.process is not None
    a.process.send_signal(signal.SIGTERM)
    term = time.monotonic()
    try:
        a.process.wait(timeout=40)
    except subprocess.TimeoutExpired:
        pytest.fail(f"A had not exited 40 s after SIGTERM with a stuck reader connected:\n{log_tail(a)}")
    took = time.monotonic() - term
    print(f"SIGTERM with a stuck reader connected: exit after {took:.1f} s")
    assert took < 20, f"A took {took:.1f} s to exit after SIGTERM with a stuck reader connected"
    still.close()
    stored = db.messages_by_client_id(bob.id)
    for client_id, (_, message) in flood.acked.items():
        assert stored[client_id][0] == message["id"]


# ---- 6. a full disk under SQLite ------------------------------------------------------


@contextmanager
def small_tmpfs(where: Path, size: str = "4m") -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here ({done.stderr.strip()}): the full-disk test needs one "
                    f"(run as root, or give the container CAP_SYS_ADMIN)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        try:
            while True:
                out.write(b"\0" * 512)
        except OSError:
            pass
    return filler


@pytest.mark.timeout(150)
def test_a_full_disk_gets_unavailable_then_everything_recovers_with_presence_correct(services: Services):
    disk = services.stack.enter_context(small_tmpfs(services.tmp_path / "disk"))
    redis = services.redis()
    url = f"sqlite:///{disk / 'chat.db'}"
    a, b = services.chatx(2, url, redis)  # presence TTL 4 s, no grace
    db = Database(url)
    alice, bob, carol = people(a, "alice", "bob", "carol")
    make_partners(alice, bob, server=a)
    make_partners(carol, bob, server=a)
    make_partners(carol, alice, server=a)
    receivers = open_receivers(services, [(bob, a, "bob@A"), (bob, b, "bob@B"), (alice, b, "alice@B")])
    carol_ws = open_socket(carol, a)
    first_frame(carol_ws)
    wait_until(lambda: any(f["username"] == "carol" and f["status"] == "online" for _, f in receivers[1].presence),
               timeout=10, what="bob to see carol online")
    health = services.thread(HealthLog([a, b]))
    sender = services.thread(Sender(alice, [a], ["bob"], body_size=2000))
    time.sleep(2)

    filler = fill(disk)
    full_at = time.monotonic()
    try:
        wait_until(lambda: any(at > full_at for at, _ in sender.unavailable), timeout=20,
                   what="a send to get `unavailable` on the full disk")
        carol_ws.close()  # her socket row cannot be deleted now
        carol_closed = time.monotonic()
        time.sleep(3)
    finally:
        filler.unlink()
    freed = time.monotonic()
    time.sleep(3)
    sender.finish(timeout=30)
    health.stop()

    unavailable = [cid for at, cid in sender.unavailable if full_at <= at <= freed]
    print(f"full disk: {len(unavailable)} unavailable, {len(sender.acked)} acked; "
          f"acks while full: {sum(1 for at, _ in sender.acked.values() if full_at < at < freed)}")
    verify(db, sender, receivers, steady=receivers, heal=freed, bound=10)
    assert not sender.closes, f"the sender's socket was closed on the full disk: {sender.closes}"
    for server in (a, b):
        assert health.failed(server, full_at, freed + 1, "database"), \
            f"{server.base}/healthz never said the database failed while the disk was full"

    # carol's socket closed while full: she is offline within the presence TTL of the space coming back.
    offline = [(at, f) for at, f in receivers[1].presence
               if f["username"] == "carol" and f["status"] == "offline" and at > carol_closed]
    assert offline, f"bob never saw carol go offline: {[f for _, f in receivers[1].presence]}"
    assert offline[0][0] - freed < 4 + 1, f"carol went offline {offline[0][0] - freed:.1f} s after space was freed"
    for server in (a, b):
        for name, status in (("carol", "offline"), ("alice", "online")):
            response = bob.get(server, f"/api/users?q={name}")
            assert response.status_code == 200, response.text
            found = next(u for u in response.json()["users"] if u["username"] == name)
            assert found["status"] == status, (server.base, found)
    serves_again(db, [a, b], alice, bob, steady=receivers[1:])


# ---- 7. start-up before the database, a silent PostgreSQL, a full disk again (issue 23) ----


@pytest.mark.timeout(300)
def test_a_disk_filled_and_freed_three_times_recovers_every_time_and_chatx_starts_on_a_full_disk(
        services: Services):
    disk = services.stack.enter_context(small_tmpfs(services.tmp_path / "disk"))
    redis = services.redis()
    url = f"sqlite:///{disk / 'chat.db'}"
    (a,) = services.chatx(1, url, redis)
    db = Database(url)
    alice, bob = people(a, "alice", "bob")
    make_partners(alice, bob, server=a)
    receivers = open_receivers(services, [(bob, a, "bob@A")])
    sender = services.thread(Sender(alice, [a], ["bob"], body_size=1000))
    time.sleep(2)

    recoveries: list[float] = []
    logs: list[int] = []
    for cycle in range(1, 4):
        filler = fill(disk)
        full_at = time.monotonic()
        try:
            wait_until(lambda: any(at > full_at for at, _ in sender.unavailable), timeout=20,
                       what=f"a send to get `unavailable` on the full disk (cycle {cycle})")
            time.sleep(3)
        finally:
            filler.unlink()
        freed = time.monotonic()
        try:
            wait_until(lambda: any(at > freed for at, _ in sender.acked.values()), timeout=10, interval=0.02,
                       what="an ack")
        except AssertionError:
            raise AssertionError(f"no ack within 10 s of space returning (cycle {cycle}); "
                                 f"log:\n{log_tail(a)}") from None
        recoveries.append(min(at for at, _ in sender.acked.values() if at > freed) - freed)
        time.sleep(3)  # the load goes on: the log must not take the space back
        assert any(at > time.monotonic() - 1.5 for at, _ in sender.acked.values()), \
            f"acks stopped again after space returned (cycle {cycle}); log:\n{log_tail(a)}"
        wal = disk / "chat.db-wal"
        logs.append(wal.stat().st_size if wal.exists() else 0)
    print(f"full disk 3 times: first ack {[round(r, 2) for r in recoveries]} s after space returned; "
          f"log sizes {logs}; {len(sender.acked)} acked, {len(sender.unavailable)} unavailable")
    assert max(recoveries) < 2, f"acks came back {recoveries} s after space returned"
    sender.finish(timeout=30)
    verify(db, sender, receivers, steady=receivers, heal=freed, bound=10)

    # Restarted on a full disk: it serves 503 meanwhile, then everything once space returns.
    a.stop()
    filler = fill(disk)
    try:
        (again,) = services.chatx(1, url, redis, healthy=False)
        time.sleep(3)
        assert again.process is not None and again.process.poll() is None, f"ChatX exited:\n{log_tail(again)}"
        refused_while_starting(again, alice)
    finally:
        filler.unlink()
    wait_until(again.healthy, timeout=10, what=f"ChatX to serve once space returned (log: {again.log})")
    serves_again(db, [again], alice, bob)
    assert max(logs) <= 1.25 * chatx.WAL_LIMIT_BYTES, f"the write-ahead log grew to {logs} bytes"


def refused_while_starting(server: ChatServer, person: Remote | None = None) -> None:
    """/healthz answers 503 quickly; the API answers 503 `unavailable`."""
    started = time.monotonic()
    response = httpx.get(f"{server.base}/healthz", timeout=3)
    assert response.status_code == 503 and response.json()["checks"]["database"] == "fail", response.text
    assert time.monotonic() - started < 3
    response = httpx.post(f"{server.base}/api/register", json={"username": "early", "password": "long enough 1"},
                          timeout=10)
    assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable", response.text
    if person is not None:
        response = person.get(server, "/api/me")
        assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable", response.text


@pytest.mark.timeout(150)
def test_chatx_started_while_postgresql_is_down_answers_503_and_serves_once_it_is_up(services: Services):
    cluster = services.postgres()
    redis = services.redis()
    cluster.stop("fast")
    (a,) = services.chatx(1, cluster.url, redis, healthy=False)
    time.sleep(6)  # ChatX gave up with status 3 within this, before it retried
    assert a.process is not None and a.process.poll() is None, f"ChatX exited:\n{log_tail(a)}"
    refused_while_starting(a)
    cluster.start()
    up = time.monotonic()
    wait_until(a.healthy, timeout=15, what=f"ChatX to serve once PostgreSQL is up (log: {a.log})")
    print(f"ChatX served {time.monotonic() - up:.1f} s after PostgreSQL came up")
    db = Database(cluster.url)
    alice, bob = people(a, "alice", "bob")
    make_partners(alice, bob, server=a)
    serves_again(db, [a], alice, bob)


def answered_within(server: ChatServer, bound: float) -> tuple[int | None, float]:
    """/healthz's status (None: no answer within `bound` s) and how long it took."""
    started = time.monotonic()
    try:
        status = httpx.get(f"{server.base}/healthz", timeout=bound).status_code
    except httpx.HTTPError:
        status = None
    return status, time.monotonic() - started


@pytest.mark.timeout(180)
def test_a_silent_postgresql_is_noticed_within_seconds_recovered_from_and_does_not_hold_up_sigterm(
        services: Services):
    if not iptables_usable():
        pytest.fail("the silent-database test drops packets with iptables (run as root, with NET_ADMIN)")
    cluster = services.postgres()
    redis = services.redis()
    (a,) = services.chatx(1, cluster.url, redis)
    db = Database(cluster.url)
    alice, bob = people(a, "alice", "bob")
    make_partners(alice, bob, server=a)
    receivers = open_receivers(services, [(bob, a, "bob@A")])
    sender = services.thread(Sender(alice, [a], ["bob"]))
    time.sleep(2)

    probes: list[tuple[float, int | None, float]] = []
    with dropped(cluster.port):
        silent_at = time.monotonic()
        while time.monotonic() - silent_at < 12:
            status, took = answered_within(a, 3.5)
            probes.append((time.monotonic() - silent_at, status, took))
            time.sleep(0.3)
    healed = time.monotonic()
    unavailable = [round(at - silent_at, 2) for at, _ in sender.unavailable if at > silent_at]
    print(f"silent PostgreSQL: first `unavailable` {unavailable[:1]} s in; /healthz (s in, status, took) "
          f"{[(round(at, 1), status, round(took, 1)) for at, status, took in probes]}")
    assert unavailable and unavailable[0] < 8, f"no send got `unavailable` within 8 s: {unavailable[:5]}"
    slow = [(round(at, 1), status, round(took, 1)) for at, status, took in probes if took >= 3]
    assert not slow, f"/healthz took 3 s or more during the silence (s in, status, took): {slow}"
    wrong = [(round(at, 1), status) for at, status, _ in probes if at > 3 and status != 503]
    assert not wrong, f"/healthz did not say 503 from 3 s into the silence: {wrong}"

    try:
        sender.finish(timeout=40)
    except AssertionError:
        raise AssertionError(f"sends are not acknowledged again after the silence; log:\n{log_tail(a)}") from None
    verify(db, sender, receivers, steady=[], heal=healed, bound=15)
    serves_again(db, [a], alice, bob)

    # SIGTERM during a silence ends the process within --timeout-graceful-shutdown + 5 s.
    graceful = chatx.SERVE_OPTIONS["timeout_graceful_shutdown"]
    with open_socket(alice, a) as ws:
        first_frame(ws)
        with dropped(cluster.port):
            ws.send(json.dumps({"type": "send", "to": "bob", "body": "into the silence", "client_id": "last"}))
            time.sleep(2)
            assert a.process is not None
            a.process.send_signal(signal.SIGTERM)
            term = time.monotonic()
            try:
                a.process.wait(timeout=graceful + 20)
            except subprocess.TimeoutExpired:
                pytest.fail(f"ChatX had not exited {graceful + 20} s after SIGTERM during a silence:\n{log_tail(a)}")
            took = time.monotonic() - term
    print(f"SIGTERM during the silence: exit after {took:.1f} s")
    assert took < graceful + 5, f"ChatX took {took:.1f} s to exit after SIGTERM during a silence:\n{log_tail(a)}"
