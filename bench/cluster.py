"""The multi-host lab: do more ChatX processes on more hosts deliver more?

Hosts are Linux network namespaces joined by a bridge: a "db" host with its
own PostgreSQL cluster (fsync on) and Redis, two "app" hosts running the ChatX
processes, and a "load" host for the load generator. A user-space forwarder on
the db host (bench/delayproxy.py) holds every chunk for a fixed one-way delay,
since this kernel has no netem; a `SELECT 1` timing from the load host checks
the round trip it gives.

For each number of processes and each delay it reports: delivered msgs/s flat
out (8 sender/recipient pairs per process, each sender keeping a window of
sends in flight), p50/p99 send-to-delivery at a fixed offered rate, commits/s
and messages per commit (from each process's /metrics), the CPU of the ChatX
processes, of the db host and of the whole machine, and any lost message or
seq error. Every recipient is on another process than its sender (with one
process, the same one).

    make cluster-bench                                   # 1, 2, 4 processes at 0 and 1 ms
    make cluster-bench CLUSTER_ARGS="--processes 1,4 --delays 1 --repeat 3"

Needs root (ip netns) and Debian's PostgreSQL server binaries; without them it
says why and exits 0. It uses only addresses inside the namespaces it makes
(10.231.0.0/24) and tears everything down afterwards, also when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.run import CHATX_ENV as BENCH_ENV

REPO = Path(__file__).resolve().parent.parent
PREFIX = "cxlab"
SUBNET = "10.231.0"
HOSTS = {"db": 1, "app1": 11, "app2": 12, "load": 21}
APP_HOSTS = ("app1", "app2")
DB_IP = f"{SUBNET}.{HOSTS['db']}"
PG_PORT, REDIS_PORT = 5432, 6379
CHATX_PORT = 8000
PAIRS_PER_PROCESS = 8
# The benchmark's limits (out of reach), with /metrics open to the lab's hosts.
CHATX_ENV = {**BENCH_ENV, "CHATX_METRICS": "1", "CHATX_METRICS_ALLOW": f"{SUBNET}.0/24"}
CHATX_ENV.pop("CHATX_BROADCAST_URL")


class Skipped(Exception):
    """The lab cannot run on this machine."""


def run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=check, capture_output=True, text=True)


def in_host(host: str, *command: str) -> list[str]:
    return ["ip", "netns", "exec", f"{PREFIX}-{host}", *command]


def host_ip(host: str) -> str:
    return f"{SUBNET}.{HOSTS[host]}"


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise Skipped("no PostgreSQL server binaries (Debian's postgresql package)")
    return Path(found[-1]).parent


def check_machine() -> None:
    if os.geteuid() != 0:
        raise Skipped("network namespaces need root")
    if shutil.which("ip") is None:
        raise Skipped("no `ip` command (Debian's iproute2)")
    if shutil.which("redis-server") is None:
        raise Skipped("no redis-server")
    postgres_bin()


# ---------------------------------------------------------------- the hosts

class Lab:
    """The namespaces, the db host's services, and every process started in them."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="chatx-lab-"))
        self.logs: list[Path] = []

    def build(self) -> None:
        self.teardown_namespaces()  # what an interrupted run may have left
        net = f"{PREFIX}-net"
        run("ip", "netns", "add", net)
        run(*in_host("net", "ip", "link", "add", "br0", "type", "bridge"))
        run(*in_host("net", "ip", "link", "set", "br0", "up"))
        for host, number in HOSTS.items():
            ns = f"{PREFIX}-{host}"
            run("ip", "netns", "add", ns)
            inside, outside = f"cx{number}i", f"cx{number}o"
            run("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
            run("ip", "link", "set", inside, "netns", ns)
            run("ip", "link", "set", outside, "netns", net)
            run(*in_host("net", "ip", "link", "set", outside, "master", "br0", "up"))
            run(*in_host(host, "ip", "addr", "add", f"{host_ip(host)}/24", "dev", inside))
            run(*in_host(host, "ip", "link", "set", inside, "up"))
            run(*in_host(host, "ip", "link", "set", "lo", "up"))

    def start(self, host: str, name: str, command: list[str], env: dict[str, str] | None = None,
              user: str | None = None) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        self.logs.append(log)
        wrapped = in_host(host, *(["runuser", "-u", user, "--"] if user else []), *command)
        process = subprocess.Popen(wrapped, cwd=REPO, env={**os.environ, **(env or {})},
                                   stdin=subprocess.DEVNULL, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append(process)
        return process

    def start_database(self) -> None:
        bindir = postgres_bin()
        data = self.workdir / "pg"
        data.mkdir()
        shutil.chown(self.workdir, "postgres")
        shutil.chown(data, "postgres")
        subprocess.run(["runuser", "-u", "postgres", "--", str(bindir / "initdb"), "-D", str(data),
                        "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True)
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {SUBNET}.0/24 trust\n")
        self.start("db", "postgres", [str(bindir / "postgres"), "-D", str(data), "-p", str(PG_PORT),
                                      "-c", f"listen_addresses=127.0.0.1,{DB_IP}", "-c", "fsync=on",
                                      "-c", f"unix_socket_directories={data}", "-c", "max_connections=300"],
                   user="postgres")
        self.start("db", "redis", ["redis-server", "--port", str(REDIS_PORT), "--bind", f"127.0.0.1 {DB_IP}",
                                   "--save", "", "--appendonly", "no", "--protected-mode", "no"])
        deadline = time.monotonic() + 60
        while run(*in_host("db", "pg_isready", "-h", "127.0.0.1", "-p", str(PG_PORT)), check=False).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError("the lab's PostgreSQL did not start")
            time.sleep(0.3)

    def psql(self, statement: str) -> None:
        run(*in_host("db", "psql", "-h", "127.0.0.1", "-p", str(PG_PORT), "-U", "postgres", "-d", "postgres",
                     "-c", statement))

    def start_delay(self, delay_ms: float) -> tuple[int, int]:
        """Forwarders to PostgreSQL and Redis holding each chunk `delay_ms`; their ports."""
        if delay_ms == 0:
            return PG_PORT, REDIS_PORT
        ports = []
        for target in (PG_PORT, REDIS_PORT):
            port = target + 1000 + int(delay_ms * 10)
            # Real-time priority: the forwarder stands for the wire, which does not wait
            # for the hosts' CPUs; on two shared cores it otherwise queues behind them.
            self.start("db", f"delay-{target}-{delay_ms}", [
                "chrt", "--fifo", "10", sys.executable, "-m", "bench.delayproxy", "--listen", f"{DB_IP}:{port}",
                "--target", f"127.0.0.1:{target}", "--delay-ms", str(delay_ms)])
            ports.append(port)
        time.sleep(0.5)
        return ports[0], ports[1]

    def stop(self, processes: list[subprocess.Popen]) -> None:
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes = [p for p in self.processes if p not in processes]

    def teardown_namespaces(self) -> None:
        listed = run("ip", "netns", "list", check=False).stdout.split()
        for ns in (name for name in listed if name.startswith(f"{PREFIX}-")):
            for pid in run("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", ns, check=False)

    def teardown(self) -> None:
        self.stop(list(self.processes))
        self.teardown_namespaces()
        shutil.rmtree(self.workdir, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def descendants(pid: int) -> list[int]:
    """pid and every process below it (a postmaster's backends, a runuser's child)."""
    found, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        for path in glob.glob(f"/proc/{parent}/task/*/children"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in Path(path).read_text().split()]
                found += children
                frontier += children
    return found


# ---------------------------------------------------------------- one configuration

@dataclass
class Config:
    processes: int
    delay_ms: float
    duration: float
    rate: float
    window: int


@dataclass
class Row:
    processes: int
    delay_ms: float
    round_trip_ms: float | None = None
    flat_msgs_per_s: float | None = None
    flat_p50_ms: float | None = None
    rate_p50_ms: float | None = None
    rate_p99_ms: float | None = None
    rate_ack_p50_ms: float | None = None  # send to the sender's ack: the commit
    rate_hop_p50_ms: float | None = None  # the sender's ack to the recipient's delivery: the fan-out
    rate_delivered_per_s: float | None = None
    commits_per_s: float | None = None
    msgs_per_commit: float | None = None
    chatx_cpu: float | None = None  # cores used by the ChatX processes, flat out
    db_cpu: float | None = None  # cores used by PostgreSQL, Redis and the forwarders, flat out
    machine_cpu: float | None = None  # cores busy on the whole machine, flat out
    lost: int = 0
    duplicates: int = 0
    seq_errors: int = 0
    errors: dict = field(default_factory=dict)


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def measure(lab: Lab, config: Config, db_pids: list[int]) -> Row:
    database = f"chatx_{config.processes}_{int(config.delay_ms * 10)}_{os.getpid()}_{int(time.time())}"
    lab.psql(f'CREATE DATABASE "{database}"')
    pg_port, redis_port = lab.start_delay(config.delay_ms)
    forwarders = [p for p in lab.processes if "delayproxy" in " ".join(map(str, p.args))]
    env = {**CHATX_ENV, "CHATX_DATABASE_URL": f"postgresql://postgres@{DB_IP}:{pg_port}/{database}",
           "CHATX_BROADCAST_URL": f"redis://{DB_IP}:{redis_port}/0"}
    servers, urls = [], []
    for index in range(config.processes):
        host = APP_HOSTS[index % len(APP_HOSTS)]
        port = CHATX_PORT + index
        servers.append(lab.start(host, f"chatx-{config.processes}-{config.delay_ms}-{index}", [
            sys.executable, "-m", "uvicorn", "chatx:app", "--host", host_ip(host), "--port", str(port),
            "--ws-max-size", "65536", "--ws-per-message-deflate", "false", "--http", "chatx:HTTPProtocol",
            "--no-proxy-headers", "--log-level", "warning"], env))
        urls.append(f"http://{host_ip(host)}:{port}")
    try:
        plan = {"urls": urls, "database": f"postgresql://postgres@{DB_IP}:{pg_port}/{database}",
                "chatx_pids": [p.pid for p in servers], "db_pids": db_pids + [p.pid for p in forwarders],
                **asdict(config)}
        driver = subprocess.run(in_host("load", sys.executable, "-m", "bench.cluster", "--drive", json.dumps(plan)),
                                cwd=REPO, capture_output=True, text=True, timeout=600)
        if driver.returncode != 0:
            logs = "".join(f"\n--- {log.name}:\n{log.read_text()[-2000:]}" for log in lab.logs[-len(servers):])
            raise RuntimeError(f"the load generator failed:\n{driver.stderr[-3000:]}\nthe ChatX processes' logs:{logs}")
        return Row(**json.loads(driver.stdout.strip().splitlines()[-1]))
    finally:
        lab.stop(servers + forwarders)
        with contextlib.suppress(subprocess.CalledProcessError):
            lab.psql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


# ---------------------------------------------------------------- the load host

def parse_metrics(text: str) -> dict[str, float]:
    wanted = {"chatx_messages_stored_total", "chatx_commit_seconds_count"}
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            found[name] = float(value)
    return found


async def scrape(http, urls: list[str]) -> dict[str, float]:
    total = {"chatx_messages_stored_total": 0.0, "chatx_commit_seconds_count": 0.0}
    for url in urls:
        response = await http.get(url + "/metrics")
        for name, value in parse_metrics(response.text).items():
            total[name] += value
    return total


async def round_trip_ms(database: str) -> float:
    import asyncpg

    connection = await asyncpg.connect(database)
    try:
        times = []
        for _ in range(50):
            start = time.perf_counter()
            await connection.fetchval("SELECT 1")
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)
    finally:
        await connection.close()


async def wait_healthy(urls: list[str], timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(trust_env=False, timeout=2) as http:
        for url in urls:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(url + "/healthz")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} did not answer /healthz with 200 within {timeout:.0f} s")
                await asyncio.sleep(0.2)


async def drive(plan: dict) -> dict:
    """Runs on the load host: sign up, pair across processes, then the fixed rate and the flat-out phases."""
    import secrets

    from bench.client import Socket, User, http_client, register
    from bench.loadgen import Traffic, latency_summary, send_paced, send_windowed, stream_order

    urls = plan["urls"]
    await wait_healthy(urls)
    row = {"processes": plan["processes"], "delay_ms": plan["delay_ms"],
           "round_trip_ms": await round_trip_ms(plan["database"])}
    count = len(urls)
    prefix = f"l{secrets.token_hex(3)}_"
    async with http_client(urls[0]) as http:
        users = await asyncio.gather(*(register(http, f"{prefix}{i}") for i in range(2 * PAIRS_PER_PROCESS * count)))
    placed: list[tuple[User, str, User, str]] = []  # sender, its process, recipient, its process
    for process in range(count):
        for i in range(PAIRS_PER_PROCESS):
            k = 2 * (process * PAIRS_PER_PROCESS + i)
            placed.append((users[k], urls[process], users[k + 1], urls[(process + 1) % count]))
    traffic = Traffic(64)
    sockets = []
    for sender, sender_url, recipient, recipient_url in placed:
        a, b = Socket(sender, traffic.handle), Socket(recipient, traffic.handle)
        await a.open(sender_url.replace("http", "ws", 1) + "/ws")
        await b.open(recipient_url.replace("http", "ws", 1) + "/ws")
        sockets.append((a, b))
    flat = [s for pair in sockets for s in pair]
    # Each recipient answers first, so nobody is a first contact and both are partners.
    for a, b in sockets:
        await traffic.send(b, a.user.username, f"{b.user.username}-hello", time.perf_counter())
        await traffic.send(a, b.user.username, f"{a.user.username}-hello", time.perf_counter())
    await traffic.drain()
    warmup = 1.0

    stop = asyncio.Event()
    start = time.perf_counter()
    await send_paced(sockets, traffic, plan["rate"], stop, plan["duration"], tag="r")
    await traffic.drain()
    rate_latency = latency_summary(traffic.latencies(since=start + warmup, until=start + plan["duration"]))
    to_ack, after_ack = traffic.split_latencies(since=start + warmup, until=start + plan["duration"])
    delivered = [t for t in traffic.delivered_at.values() if start + warmup <= t <= start + plan["duration"]]
    row.update(rate_p50_ms=rate_latency["p50_ms"], rate_p99_ms=rate_latency["p99_ms"],
               rate_ack_p50_ms=latency_summary(to_ack)["p50_ms"], rate_hop_p50_ms=latency_summary(after_ack)["p50_ms"],
               rate_delivered_per_s=len(delivered) / (plan["duration"] - warmup))

    metrics_client = http_client(urls[0])
    async with metrics_client as http:
        before = await scrape(http, urls)
        chatx_before = sum(cpu_seconds(p) for pid in plan["chatx_pids"] for p in descendants(pid))
        db_before = sum(cpu_seconds(p) for pid in plan["db_pids"] for p in descendants(pid))
        busy_before, total_before = machine_busy()
        start = time.perf_counter()
        end = start + plan["duration"]

        async def release_at_end() -> None:
            await asyncio.sleep(plan["duration"])
            for slots in traffic.windows.values():
                slots.release()

        await asyncio.gather(release_at_end(), *(send_windowed(a, b.user.username, traffic, plan["window"], end)
                                                 for a, b in sockets))
        elapsed = time.perf_counter() - start
        chatx_after = sum(cpu_seconds(p) for pid in plan["chatx_pids"] for p in descendants(pid))
        db_after = sum(cpu_seconds(p) for pid in plan["db_pids"] for p in descendants(pid))
        busy_after, total_after = machine_busy()
        after = await scrape(http, urls)
        await traffic.drain()
    counted = sum(1 for t in traffic.delivered_at.values() if start + warmup <= t <= end)
    commits = after["chatx_commit_seconds_count"] - before["chatx_commit_seconds_count"]
    stored = after["chatx_messages_stored_total"] - before["chatx_messages_stored_total"]
    cores = os.cpu_count() or 1
    row.update(flat_msgs_per_s=counted / (plan["duration"] - warmup),
               flat_p50_ms=latency_summary(traffic.latencies(since=start + warmup))["p50_ms"],
               commits_per_s=commits / elapsed, msgs_per_commit=stored / commits if commits else None,
               chatx_cpu=(chatx_after - chatx_before) / elapsed, db_cpu=(db_after - db_before) / elapsed,
               machine_cpu=cores * (busy_after - busy_before) / max(1, total_after - total_before))
    counts = traffic.counts()
    row.update(lost=counts["lost"], duplicates=counts["duplicates"], errors=counts["errors"],
               seq_errors=stream_order(flat)["seq_errors"])
    for socket_ in flat:
        await socket_.close()
    return row


# ---------------------------------------------------------------- the report

def median_row(rows: list[Row]) -> Row:
    """Each figure the median of the runs; losses and errors summed."""
    def med(name: str) -> float | None:
        values = [getattr(r, name) for r in rows if getattr(r, name) is not None]
        return statistics.median(values) if values else None

    merged = Row(rows[0].processes, rows[0].delay_ms)
    for name in ("round_trip_ms", "flat_msgs_per_s", "flat_p50_ms", "rate_p50_ms", "rate_p99_ms", "rate_ack_p50_ms",
                 "rate_hop_p50_ms", "rate_delivered_per_s", "commits_per_s", "msgs_per_commit", "chatx_cpu", "db_cpu",
                 "machine_cpu"):
        setattr(merged, name, med(name))
    merged.lost = sum(r.lost for r in rows)
    merged.duplicates = sum(r.duplicates for r in rows)
    merged.seq_errors = sum(r.seq_errors for r in rows)
    return merged


def spread(rows: list[Row], name: str) -> str:
    values = [getattr(r, name) for r in rows if getattr(r, name) is not None]
    if len(values) < 2:
        return ""
    return f" ({min(values):,.0f}–{max(values):,.0f})"


def fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def table(runs: dict[tuple[int, float], list[Row]], rate: float) -> str:
    lines = [f"| processes | one-way delay | SELECT 1 | flat out msgs/s | p50 / p99 at {rate:.0f}/s "
             "| p50 to ack + ack to delivery | commits/s | msgs/commit | ChatX CPU | db CPU | machine CPU "
             "| lost / dup / seq errors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (processes, delay), rows in sorted(runs.items(), key=lambda item: (item[0][1], item[0][0])):
        m = median_row(rows)
        lines.append(
            f"| {processes} | {delay:g} ms | {fmt(m.round_trip_ms, 2)} ms "
            f"| {fmt(m.flat_msgs_per_s)}{spread(rows, 'flat_msgs_per_s')} "
            f"| {fmt(m.rate_p50_ms, 1)} / {fmt(m.rate_p99_ms, 1)} ms "
            f"| {fmt(m.rate_ack_p50_ms, 1)} + {fmt(m.rate_hop_p50_ms, 1)} ms | {fmt(m.commits_per_s)} "
            f"| {fmt(m.msgs_per_commit, 1)} | {fmt(m.chatx_cpu, 2)} | {fmt(m.db_cpu, 2)} | {fmt(m.machine_cpu, 2)} "
            f"| {m.lost} / {m.duplicates} / {m.seq_errors} |")
    return "\n".join(lines)


def targets(runs: dict[tuple[int, float], list[Row]]) -> list[str]:
    def get(processes: int, delay: float, name: str) -> float | None:
        rows = runs.get((processes, delay))
        return getattr(median_row(rows), name) if rows else None

    found = []
    for label, top, bottom, goal, want_low in (
            ("p50 at 1 ms, 4 processes / 1 process", get(4, 1.0, "rate_p50_ms"), get(1, 1.0, "rate_p50_ms"), 1.3, True),
            ("flat out at 1 ms, 4 processes / 1 process", get(4, 1.0, "flat_msgs_per_s"),
             get(1, 1.0, "flat_msgs_per_s"), 2.5, False),
            ("flat out at 0 ms, 4 processes / 1 process", get(4, 0.0, "flat_msgs_per_s"),
             get(1, 0.0, "flat_msgs_per_s"), 2.5, False),
            ("p50 of 1 process, 1 ms / 0 ms", get(1, 1.0, "rate_p50_ms"), get(1, 0.0, "rate_p50_ms"), 3.0, True)):
        if top is None or not bottom:
            continue
        ratio = top / bottom
        met = ratio <= goal if want_low else ratio >= goal
        found.append(f"- {label}: x{ratio:.2f} (target {'<=' if want_low else '>='} {goal}): "
                     f"{'met' if met else 'NOT met'}")
    clean = all(r.lost == 0 and r.duplicates == 0 and r.seq_errors == 0 for rows in runs.values() for r in rows)
    found.append(f"- nothing lost, duplicated or out of seq order in every run: {'yes' if clean else 'NO'}")
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2,4", help="comma-separated process counts")
    parser.add_argument("--delays", default="0,1", help="comma-separated one-way delays in ms")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of each phase")
    parser.add_argument("--rate", type=float, default=200.0, help="offered msgs/s of the fixed-rate phase")
    parser.add_argument("--window", type=int, default=8, help="sends in flight per sender, flat out")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each configuration (median reported)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--drive", help=argparse.SUPPRESS)  # the load host's half, in its namespace
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.drive:
        import uvloop

        print(json.dumps(uvloop.run(drive(json.loads(args.drive)))))
        return 0
    try:
        check_machine()
    except Skipped as exc:
        print(f"cluster-bench skipped: {exc}", file=sys.stderr)
        return 0
    lab = Lab()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that teardown runs
    runs: dict[tuple[int, float], list[Row]] = {}
    try:
        print("building the lab ...", file=sys.stderr, flush=True)
        lab.build()
        lab.start_database()
        db_pids = [p.pid for p in lab.processes]
        for _ in range(args.repeat):
            for delay in (float(d) for d in args.delays.split(",")):
                for processes in (int(n) for n in args.processes.split(",")):
                    print(f"  {processes} process(es), {delay:g} ms one way ...", file=sys.stderr, flush=True)
                    config = Config(processes, delay, args.duration, args.rate, args.window)
                    runs.setdefault((processes, delay), []).append(measure(lab, config, db_pids))
    finally:
        lab.teardown()
    report = table(runs, args.rate) + "\n\n" + "\n".join(targets(runs))
    print(report)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count(),
                                "runs": [asdict(r) for rows in runs.values() for r in rows]}, indent=2))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
