"""Run the whole benchmark: the bare relay, then ChatX on SQLite and on
PostgreSQL (both with Redis broadcast), each freshly started on an empty
database, and report ChatX as a fraction of the relay.

    python -m bench.run            # defaults: a few minutes on 2 cores
    python -m bench.run --quick    # tiny sizes, ~30 s, a smoke test
    python -m bench.run --sockets 10000 --storm-users 1000   # the full targets
"""

import argparse
import asyncio
import contextlib
import hashlib
import os
import platform
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import asyncpg
import uvloop

from bench import report
from bench.client import User, http_client
from bench.loadgen import (CpuMeter, Target, collector_paused, fixed_rate, idle_connections, presence_storm,
                           register_users, short_error, sign_in_under_load, throughput, wait_all_offline)
from bench.server import REPO, Server, ServerDied, ServerSpec, raise_fd_limit

SERVERS = ("relay", "sqlite", "postgres")
REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
CHATX_ENV = {"CHATX_BROADCAST_URL": REDIS_URL, "CHATX_SEND_RATE": "100000",
             "CHATX_SEND_BURST": "100000", "CHATX_PRESENCE_TTL": "30"}
IDLE_SOCKET_USERS = 100  # idle sockets are spread over this many users


@dataclass
class Sizes:
    pairs: int = 50
    window: int = 8
    duration: float = 8.0
    fixed_duration: float = 8.0
    rate: float | None = None  # fixed offered rate; default: half the measured maximum
    sockets: int = 2000
    storm_users: int = 200
    signin_people: int = 50
    signin_pairs: int = 10
    signin_rate: float = 200.0
    signin_baseline: float = 3.0
    body_size: int = 64

    def users_needed(self) -> int:
        return max(2 * self.pairs, self.storm_users, 2 * self.signin_pairs + self.signin_people)


QUICK = Sizes(pairs=4, window=4, duration=2.0, fixed_duration=2.0, sockets=100, storm_users=20,
              signin_people=10, signin_pairs=2, signin_rate=100.0, signin_baseline=1.0)


SIZE_HELP = {
    "pairs": "sender/receiver pairs in the throughput and fixed-rate runs",
    "window": "sends each sender may have unacknowledged",
    "duration": "seconds of the throughput run",
    "fixed_duration": "seconds of the fixed-rate run",
    "rate": "offered msgs/s of the fixed-rate run (default: half the measured maximum)",
    "sockets": "idle sockets to open; the target is 10000",
    "storm_users": "users in the presence storm; the target is 1000",
    "signin_people": "people who sign in at once",
    "signin_pairs": "pairs chatting while they sign in",
    "signin_rate": "msgs/s those pairs send in all",
    "signin_baseline": "seconds of chat measured before the sign-ins",
    "body_size": "characters per message body",
}


class Skipped(Exception):
    """A server cannot be benchmarked on this machine (and that is not an error)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (~30 s)")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"comma-separated subset of {','.join(SERVERS)}")
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


async def measure(server: Server, sizes: Sizes) -> dict:
    """All workloads against one running server, reusing its registered users."""
    target = Target(server.url, server)
    prefix = f"b{secrets.token_hex(3)}_"  # unique names: Redis is shared between runs
    async with http_client(server.url) as http:
        started = time.perf_counter()
        users = await server.watch(register_users(http, prefix, sizes.users_needed()))
        results: dict = {"registered": len(users), "register_s": time.perf_counter() - started}

        async def step(name: str, work) -> None:
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
            left = await server.watch(wait_all_offline(http, users[0], users))
            if left:
                results[name]["still_online_after"] = left

        pairs = pair_up(users, sizes.pairs)
        await step("connections", idle_connections(
            target, users[:IDLE_SOCKET_USERS], sizes.sockets))
        await step("presence_storm", presence_storm(
            target, users[:sizes.storm_users], timeout_s=max(30.0, 0.03 * sizes.storm_users)))
        await step("throughput", throughput(
            target, pairs, sizes.window, sizes.duration, sizes.body_size))
        rate = sizes.rate or 0.5 * results["throughput"].get("msgs_per_s", 0)
        if rate > 0:
            await step("fixed_rate", fixed_rate(target, pairs, rate, sizes.fixed_duration, sizes.body_size))
        chatters = 2 * sizes.signin_pairs
        await step("sign_in", sign_in_under_load(
            target, http, pair_up(users, sizes.signin_pairs), users[chatters:chatters + sizes.signin_people],
            sizes.signin_rate, sizes.signin_baseline, sizes.body_size))
    return results


def bench_server(name: str, sizes: Sizes, server_cpu: int | None, fd_limit: int) -> dict:
    print(f"\n== {name}", file=sys.stderr, flush=True)
    try:
        with server_spec(name) as spec:
            server = Server(spec, server_cpu, fd_limit)
            try:
                server.start()
                return {"status": "ok", **uvloop.run(measure(server, sizes))}
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
    fd_limit = raise_fd_limit(sizes.sockets + sizes.storm_users + 1024)
    if fd_limit < sizes.sockets + sizes.storm_users + 100:
        print(f"warning: open-file limit {fd_limit} is too low for {sizes.sockets} sockets", file=sys.stderr)
    started = time.strftime("%Y%m%d-%H%M%S")
    machine = environment(server_cpu, loadgen_cpu, fd_limit)
    servers = {name: bench_server(name, sizes, server_cpu, fd_limit) for name in args.servers.split(",")}
    data = {"started": started, "quick": args.quick, "sizes": asdict(sizes),
            "environment": machine, "servers": servers}
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
