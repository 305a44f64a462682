"""Run the whole benchmark: the bare relay, then ChatX on SQLite and on
PostgreSQL (both with Redis broadcast), each freshly started on an empty
database, and report ChatX as a fraction of the relay.

    python -m bench.run            # defaults: the targets' sizes but 10,000 sockets
    python -m bench.run --quick    # tiny sizes, a smoke test (a minute or two)
    python -m bench.run --sockets 10000   # the full targets
"""

import argparse
import asyncio
import contextlib
import hashlib
import io
import os
import platform
import secrets
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import asyncpg
import httpx
import uvloop
from PIL import Image

from bench import report
from bench.client import User, http_client
from bench.loadgen import (CpuMeter, Seeder, Target, collector_paused, directory, everyone_partners, fixed_rate,
                           idle_connections, make_partners, presence_storm, register_users, ring_partners,
                           short_error, sign_in_under_load, throughput, uploads_under_load, wait_all_offline)
from bench.server import REPO, Server, ServerDied, ServerSpec, raise_fd_limit

SERVERS = ("relay", "sqlite", "postgres")
REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
# Limits off (0) or out of reach: the benchmark signs up thousands of users from one
# address and opens 100 sockets per user; offline is at once, as in the relay.
CHATX_ENV = {"CHATX_BROADCAST_URL": REDIS_URL, "CHATX_SEND_RATE": "100000",
             "CHATX_SEND_BURST": "100000", "CHATX_PRESENCE_TTL": "30", "CHATX_PRESENCE_GRACE": "0",
             "CHATX_MAX_SOCKETS_PER_USER": "0", "CHATX_SIGNUPS_PER_ADDRESS": "0",
             "CHATX_LOGIN_FAILURES_PER_ADDRESS": "0", "CHATX_LOGIN_FAILURES_PER_USER": "0",
             "CHATX_FIRST_CONTACTS_PER_SENDER": "0", "CHATX_FIRST_CONTACTS_PER_RECIPIENT": "0",
             "CHATX_DIRECTORY_RATE": "0", "CHATX_FRAME_RATE": "0", "CHATX_READ_RATE": "0",
             "CHATX_HTTP_CONNECTIONS_PER_ADDRESS": "0", "CHATX_ATTACHMENT_BYTES_PER_DAY": "0"}
IDLE_SOCKET_USERS = 100  # idle sockets are spread over this many users
WORKLOADS = ("connections", "presence_storm", "partner_storm", "throughput", "fixed_rate", "sign_in",
             "uploads", "directory")


@dataclass
class Sizes:
    pairs: int = 50
    window: int = 8
    duration: float = 8.0
    fixed_duration: float = 8.0
    rate: float | None = None  # fixed offered rate; default: half the measured maximum
    sockets: int = 2000
    storm_users: int = 200
    partner_storm_users: int = 2000
    partner_storm_partners: int = 20
    signin_people: int = 50
    signin_pairs: int = 10
    signin_rate: float = 200.0
    signin_baseline: float = 3.0
    body_size: int = 64
    upload_clients: int = 20
    upload_pairs: int = 20
    upload_rate: float = 200.0
    upload_baseline: float = 8.0
    upload_duration: float = 8.0
    upload_rounds: int = 3
    directory_users: int = 100_000
    directory_small: int = 100
    directory_conversations: int = 20
    directory_requests: int = 50

    def users_needed(self) -> int:
        """The first ones for every workload but the partner storm, which has the last ones."""
        return (max(2 * self.pairs, self.storm_users, 2 * self.signin_pairs + self.signin_people,
                    2 * self.upload_pairs + self.upload_clients)
                + self.partner_storm_users)


QUICK = Sizes(pairs=4, window=4, duration=2.0, fixed_duration=2.0, sockets=100, storm_users=20,
              partner_storm_users=40, signin_people=10, signin_pairs=2, signin_rate=100.0,
              signin_baseline=1.0, directory_requests=30, upload_clients=4, upload_pairs=4, upload_rate=50.0,
              upload_baseline=1.5, upload_duration=3.0)


SIZE_HELP = {
    "pairs": "sender/receiver pairs in the throughput and fixed-rate runs",
    "window": "sends each sender may have unacknowledged",
    "duration": "seconds of the throughput run",
    "fixed_duration": "seconds of the fixed-rate run",
    "rate": "offered msgs/s of the fixed-rate run (default: half the measured maximum)",
    "sockets": "idle sockets to open; the target is 10000",
    "storm_users": "users in the presence storm, each a partner of every other (one message each way)",
    "partner_storm_users": "users in the partner storm; the target is 2000",
    "partner_storm_partners": "conversation partners of each one in the partner storm; the target is 20",
    "signin_people": "people who sign in at once",
    "signin_pairs": "pairs chatting while they sign in",
    "signin_rate": "msgs/s those pairs send in all",
    "signin_baseline": "seconds of chat measured before the sign-ins",
    "body_size": "characters per message body",
    "upload_clients": "clients each uploading 1 MiB images one after another (ChatX only)",
    "upload_pairs": "pairs chatting meanwhile",
    "upload_rate": "msgs/s those pairs send in all",
    "upload_baseline": "seconds of chat measured without uploads, each round",
    "upload_duration": "seconds of uploads, each round",
    "upload_rounds": "rounds of chat without and then with uploads (the median ratio is reported)",
    "directory_users": "users in all in the directory workload's second half; the target is 100000",
    "directory_small": "users in all in its first half; the target is 100",
    "directory_conversations": "conversations of the user whose requests are timed",
    "directory_requests": "timed requests of each kind, per half (the median is reported)",
}


class Skipped(Exception):
    """A server cannot be benchmarked on this machine (and that is not an error)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (a minute or two)")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"comma-separated subset of {','.join(SERVERS)}")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results",
                        help="where the JSON and PNG go")
    for field, default in asdict(Sizes()).items():
        flag = "--" + field.replace("_", "-")
        kind = float if isinstance(default, float) or default is None else int
        defaults = "" if default is None else f" (default {default}, {getattr(QUICK, field)} with --quick)"
        parser.add_argument(flag, type=kind, default=None, help=SIZE_HELP[field] + defaults)
    args = parser.parse_args(argv)
    unknown = set(args.servers.split(",")) - set(SERVERS)
    if unknown:
        parser.error(f"unknown server(s): {', '.join(sorted(unknown))}")
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    return args


def sizes_from(args: argparse.Namespace) -> Sizes:
    base = asdict(QUICK if args.quick else Sizes())
    given = {k: getattr(args, k) for k in base if getattr(args, k) is not None}
    return Sizes(**{**base, **given})


def pin_cpus() -> tuple[int | None, int | None]:
    """(server CPU, load generator CPU): separate cores when there are two."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    os.sched_setaffinity(0, {cpus[1]})
    return cpus[0], cpus[1]


def answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=2):
        return True
    return False


@contextlib.contextmanager
def server_spec(name: str) -> Iterator[ServerSpec]:
    """The app and environment for one server, with a fresh empty database."""
    if name == "relay":
        yield ServerSpec("relay", "bench.relay:app")
        return
    if not (REPO / "chatx.py").exists():
        raise Skipped("chatx.py not found")
    if not answers("127.0.0.1", 6379):
        raise Skipped("Redis does not answer at 127.0.0.1:6379")
    if name == "sqlite":
        with tempfile.TemporaryDirectory(prefix="chatx-bench-") as tmp:
            url = f"sqlite:///{tmp}/bench.db"
            yield ServerSpec("chatx-sqlite", "chatx:app", {**CHATX_ENV, "CHATX_DATABASE_URL": url})
        return
    if not answers(POSTGRES["host"], POSTGRES["port"]):
        raise Skipped("PostgreSQL does not answer at 127.0.0.1:5432")
    database = f"chatx_bench_{os.getpid()}"
    asyncio.run(postgres_admin(f'CREATE DATABASE "{database}"'))
    try:
        url = f"postgresql://{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{database}"
        yield ServerSpec("chatx-postgres", "chatx:app", {**CHATX_ENV, "CHATX_DATABASE_URL": url})
    finally:
        asyncio.run(postgres_admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


async def postgres_admin(statement: str) -> None:
    connection = await asyncpg.connect(database="postgres", **POSTGRES)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def pair_up(users: list[User], count: int) -> list[tuple[User, User]]:
    """(sender, receiver) pairs from the first 2 * count users."""
    return [(users[2 * i], users[2 * i + 1]) for i in range(count)]


def one_mib_image() -> bytes:
    """A PNG of noise, about 1 MiB: it does not compress, so every byte travels."""
    side = 592  # 592 * 592 * 3 bytes of noise is just over 1 MiB as a PNG
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, "PNG")
    return out.getvalue()


# ---------------------------------------------------------------- seeding the directory

SEEDED_PASSWORD_HASH = "!bench-seeded: no password signs in"


def chatx_skeleton(username: str) -> str:
    """ChatX's own look-alike folding of a username, for its `skeleton` column."""
    import chatx  # noqa: PLC0415  (only when that column exists; the load generator needs nothing else of it)
    return chatx.skeleton(username)


def seed_values(names: list[str], present: set[str], required: set[str]) -> tuple[list[str], list[tuple]]:
    """Columns and rows for chatx_users (v2: id, username, username_key, skeleton, password_hash,
    status, last_seen, created_at, seq); refuses a table that needs a column it cannot fill."""
    now = int(time.time() * 1000)
    known = {"username": lambda n: n, "username_key": str.lower, "skeleton": lambda n: chatx_skeleton(n.lower()),
             "password_hash": lambda n: SEEDED_PASSWORD_HASH, "status": lambda n: "offline",
             "last_seen": lambda n: None, "created_at": lambda n: now, "seq": lambda n: 0}
    unfillable = required - known.keys()
    if unfillable:
        raise RuntimeError(f"chatx_users needs column(s) the benchmark cannot fill: {', '.join(sorted(unfillable))}")
    columns = [c for c in known if c in present]
    return columns, [tuple(known[c](n) for c in columns) for n in names]


def seed_sqlite(path: str, names: list[str]) -> None:
    with contextlib.closing(sqlite3.connect(path, timeout=60)) as db:
        info = db.execute("PRAGMA table_info(chatx_users)").fetchall()  # cid, name, type, notnull, default, pk
        if not info:
            raise RuntimeError(f"no table chatx_users in {path}")
        columns, rows = seed_values(names, {r[1] for r in info},
                                    {r[1] for r in info if r[3] and r[4] is None and not r[5]})
        with db:  # one transaction
            db.executemany(f"INSERT INTO chatx_users ({', '.join(columns)}) "
                           f"VALUES ({', '.join('?' * len(columns))})", rows)


async def seed_postgres(url: str, names: list[str]) -> None:
    connection = await asyncpg.connect(url)
    try:
        info = await connection.fetch(
            "SELECT column_name, is_nullable, column_default, is_identity FROM information_schema.columns "
            "WHERE table_name = 'chatx_users' AND table_schema = current_schema()")
        if not info:
            raise RuntimeError("no table chatx_users")
        columns, rows = seed_values(names, {r["column_name"] for r in info}, {
            r["column_name"] for r in info
            if r["is_nullable"] == "NO" and r["column_default"] is None and r["is_identity"] != "YES"})
        await connection.copy_records_to_table("chatx_users", records=rows, columns=columns)
        await connection.execute("ANALYZE chatx_users")  # as autovacuum would, soon after
    finally:
        await connection.close()


def seeder_for(spec: ServerSpec, server: Server) -> Seeder:
    """How to add users by name quickly: the relay's bulk route, or ChatX's user table."""
    if spec.name == "relay":
        async def seed(names: list[str]) -> None:
            async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=120) as http:
                response = await http.post("/bench/users", json={"usernames": names})
                response.raise_for_status()
        return seed
    url = spec.env["CHATX_DATABASE_URL"]
    if url.startswith("sqlite:///"):
        return lambda names: asyncio.to_thread(seed_sqlite, url.removeprefix("sqlite:///"), names)
    return lambda names: seed_postgres(url, names)


# ---------------------------------------------------------------- one server

async def measure(server: Server, sizes: Sizes, workloads: list[str]) -> dict:
    """The workloads but the directory against one running server, reusing its registered users."""
    target = Target(server.url, server)
    prefix = f"b{secrets.token_hex(3)}_"  # unique names: Redis is shared between runs
    async with http_client(server.url) as http:
        started = time.perf_counter()
        users = await server.watch(register_users(http, prefix, sizes.users_needed()))
        results: dict = {"registered": len(users), "register_s": time.perf_counter() - started,
                         "register_busy_retries": getattr(http, "busy_retries", 0)}

        async def step(name: str, work) -> bool:
            print(f"  {name} ...", file=sys.stderr, flush=True)
            with collector_paused():
                meter = CpuMeter(server)
                try:
                    result = await server.watch(work)
                    results[name] = {**meter.busy(), **result}  # the workload's own figures win
                except ServerDied:
                    raise
                except Exception as exc:  # a workload that breaks is reported; the others still run
                    results[name] = {"error": short_error(exc)}
            left = await server.watch(wait_all_offline(http, users[0], users, prefix))
            if left:
                results[name]["still_online_after"] = left
            return "error" not in results[name]

        first = users[:len(users) - sizes.partner_storm_users]
        pairs = pair_up(first, sizes.pairs)
        if "connections" in workloads:
            await step("connections", idle_connections(target, first[:IDLE_SOCKET_USERS], sizes.sockets))
        if "presence_storm" in workloads:
            # v2: presence reaches conversation partners only, so everyone first exchanges a message with everyone
            people = first[:sizes.storm_users]
            partners, edges = everyone_partners([u.username for u in people])
            if await step("presence_storm_partners", make_partners(target, people, edges, each_way=True)):
                await step("presence_storm", presence_storm(
                    target, people, partners, timeout_s=max(30.0, 0.03 * sizes.storm_users)))
        if "partner_storm" in workloads and sizes.partner_storm_users:
            people = users[len(users) - sizes.partner_storm_users:]
            partners, edges = ring_partners([u.username for u in people], sizes.partner_storm_partners)
            if await step("partner_storm_partners", make_partners(target, people, edges, each_way=False)):
                await step("partner_storm", presence_storm(
                    target, people, partners, timeout_s=max(30.0, 0.03 * sizes.partner_storm_users)))
        if "throughput" in workloads:
            await step("throughput", throughput(target, pairs, sizes.window, sizes.duration, sizes.body_size))
        rate = sizes.rate or 0.5 * (results.get("throughput") or {}).get("msgs_per_s", 0)
        if "fixed_rate" in workloads and rate > 0:
            await step("fixed_rate", fixed_rate(target, pairs, rate, sizes.fixed_duration, sizes.body_size))
        if "sign_in" in workloads:
            chatters = 2 * sizes.signin_pairs
            await step("sign_in", sign_in_under_load(
                target, http, pair_up(first, sizes.signin_pairs), first[chatters:chatters + sizes.signin_people],
                sizes.signin_rate, sizes.signin_baseline, sizes.body_size))
        if "uploads" in workloads and server.spec.name != "relay":  # the relay has no attachments
            chatters = 2 * sizes.upload_pairs
            await step("uploads", uploads_under_load(
                target, pair_up(first, sizes.upload_pairs), first[chatters:chatters + sizes.upload_clients],
                one_mib_image(), sizes.upload_rate, sizes.upload_baseline, sizes.upload_duration, sizes.body_size,
                sizes.upload_rounds))
    return results


async def measure_directory(server: Server, spec: ServerSpec, sizes: Sizes) -> dict:
    """The directory workload, on a server of its own (fresh, empty): nothing else shares its database."""
    print("  directory ...", file=sys.stderr, flush=True)
    async with http_client(server.url) as http:
        with collector_paused():
            meter = CpuMeter(server)
            try:
                result = await server.watch(directory(
                    Target(server.url, server), http, f"d{secrets.token_hex(3)}_", seeder_for(spec, server),
                    sizes.directory_small, sizes.directory_users, sizes.directory_conversations,
                    sizes.directory_requests))
                return {"directory": {**meter.busy(), **result}}
            except ServerDied:
                raise
            except Exception as exc:
                return {"directory": {"error": short_error(exc)}}


async def measure_connections_partners(server: Server, sizes: Sizes) -> dict:
    """The connections workload again, on a server of its own (fresh: RSS that
    earlier sockets left behind would hide the growth), once each of its 100
    users is a partner of every other (99 partners each): what a socket holds
    must not grow with its user's partners."""
    print("  connections with partners ...", file=sys.stderr, flush=True)
    target = Target(server.url, server)
    async with http_client(server.url) as http:
        users = await server.watch(register_users(http, f"p{secrets.token_hex(3)}_", IDLE_SOCKET_USERS))
        partners, edges = everyone_partners([u.username for u in users])
        made = await server.watch(make_partners(target, users, edges, each_way=False))
        await asyncio.sleep(1)  # every partner socket closed and gone offline before counting
        with collector_paused():
            meter = CpuMeter(server)
            try:
                result = await server.watch(idle_connections(target, users, sizes.sockets))
                return {"connections_partners": {**meter.busy(), **result, "partners_each": len(users) - 1,
                                                 "partner_messages": made["messages"]}}
            except ServerDied:
                raise
            except Exception as exc:
                return {"connections_partners": {"error": short_error(exc)}}


def on_fresh_server(name: str, server_cpu: int | None, fd_limit: int, work) -> dict:
    """Start `name` on an empty database, run work(server, spec) on it, stop it."""
    try:
        with server_spec(name) as spec:
            server = Server(spec, server_cpu, fd_limit)
            try:
                server.start()
                return {"status": "ok", **uvloop.run(work(server, spec))}
            except ServerDied as exc:
                print(f"\nERROR: {exc}", file=sys.stderr, flush=True)
                return {"status": "died", "error": str(exc)}
            except Exception as exc:  # e.g. registration refused: no workload could run
                print(f"\nERROR: {name}: {short_error(exc)}", file=sys.stderr, flush=True)
                return {"status": "error", "error": short_error(exc)}
            finally:
                server.close()
    except Skipped as exc:
        print(f"  skipped: {exc}", file=sys.stderr)
        return {"status": "skipped", "error": str(exc)}


def bench_server(name: str, sizes: Sizes, server_cpu: int | None, fd_limit: int, workloads: list[str]) -> dict:
    print(f"\n== {name}", file=sys.stderr, flush=True)
    result = {"status": "ok"}
    if set(workloads) - {"directory"}:
        result = on_fresh_server(name, server_cpu, fd_limit,
                                 lambda server, spec: measure(server, sizes, workloads))
    if "connections" in workloads and result["status"] != "skipped":
        found = on_fresh_server(name, server_cpu, fd_limit,
                                lambda server, spec: measure_connections_partners(server, sizes))
        result["connections_partners"] = (found.get("connections_partners")
                                          or {"error": found.get("error", "").split("\n")[0]})
    if "directory" in workloads and result["status"] != "skipped":
        found = on_fresh_server(name, server_cpu, fd_limit,
                                lambda server, spec: measure_directory(server, spec, sizes))
        result["directory"] = found.get("directory") or {"error": found.get("error", "").split("\n")[0]}
        result["directory_status"] = found["status"]
        if result["status"] == "ok" and found["status"] != "ok":
            result.update(status=found["status"], error=found["error"])
    return result


def environment(server_cpu: int | None, loadgen_cpu: int | None, fd_limit: int) -> dict:
    chatx = REPO / "chatx.py"
    packages = ["starlette", "uvicorn", "websockets", "httpx", "uvloop", "databases",
                "broadcaster", "redis", "asyncpg", "aiosqlite", "SQLAlchemy"]
    versions = {}
    for package in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "load_average_before": os.getloadavg()[0],
            "server_cpu": server_cpu, "loadgen_cpu": loadgen_cpu, "fd_limit": fd_limit,
            "packages": versions,
            "chatx_sha256": hashlib.sha256(chatx.read_bytes()).hexdigest() if chatx.exists() else None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sizes_from(args)
    server_cpu, loadgen_cpu = pin_cpus()
    most = max(sizes.sockets, sizes.storm_users, sizes.partner_storm_users)
    fd_limit = raise_fd_limit(most + 1024)
    if fd_limit < most + 100:
        print(f"warning: open-file limit {fd_limit} is too low for {sizes.sockets} sockets", file=sys.stderr)
    started = time.strftime("%Y%m%d-%H%M%S")
    machine = environment(server_cpu, loadgen_cpu, fd_limit)
    workloads = args.workloads.split(",")
    servers = {name: bench_server(name, sizes, server_cpu, fd_limit, workloads)
               for name in args.servers.split(",")}
    data = {"started": started, "quick": args.quick, "sizes": asdict(sizes), "workloads": workloads,
            "environment": machine, "servers": servers}
    data["ratios"] = report.ratios(data)
    data["checks"] = report.checks(data)
    print(report.table(data))
    print(report.check_lines(data["checks"]))
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"bench-{started}{'-quick' if args.quick else ''}"
    report.write_json(stem.with_suffix(".json"), data)
    report.chart(stem.with_suffix(".png"), data)
    print(f"\nresults: {stem}.json, {stem}.png")
    failed = [n for n, r in servers.items() if r["status"] in ("died", "error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
